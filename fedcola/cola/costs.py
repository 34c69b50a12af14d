"""A ColA round's costs: per client (loss, bytes up / down, FLOPs, memory, wall time, client-side
evaluation) and the server's (FLOPs counted by FlopCounterMode, compute time), written to the ledger
once per round (docs/ledger.md)."""

from __future__ import annotations

from collections import defaultdict

from flwr.app import MetricRecord

from fedcola.cola.server import HiddenGrads
from fedcola.fl.ledger import Ledger


class RoundCosts:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.clients: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.server_flops = self.backward_flops = 0
        self.compute_s = 0.0  # the server's own model work: hidden pairs, gradients sent, client-side evaluation
        self.payload = {"grads_layers": 0, "pairs_layers": 0, "shared_inputs": 0, "payload_flops": 0, "payload_s": 0.0}

    def add_server_step(self, hg: HiddenGrads, batches: dict, i: int, interval: int, classification: bool) -> None:
        """One ``hidden_grads`` call over batch index ``i`` of the interval: its FLOPs and each client's loss / accuracy."""
        self.server_flops += hg.forward_flops + hg.backward_flops
        self.backward_flops += hg.backward_flops
        for n in batches:
            cost, labels = self.clients[n], batches[n][i]["labels"]
            cost["loss"] += hg.loss[n] / interval
            cost["intervals"] += 1 / interval
            if classification:
                cost["correct"] += float((hg.logits[n].argmax(-1).cpu() == labels.cpu()).sum())
                cost["seen"] += len(labels)

    def add_payload(self, enc, layers: int, seconds: float) -> None:
        """One client's train payload (``fedcola.cola.payload.Encoded`` over ``layers`` layers): which travelled,
        the FLOPs and time its gradients cost the server."""
        self.payload["grads_layers"] += len(enc.grads)
        self.payload["pairs_layers"] += layers - len(enc.grads)
        self.payload["shared_inputs"] += len(enc.shared)
        self.payload["payload_flops"] += enc.flops
        self.payload["payload_s"] += seconds
        self.compute_s += seconds

    def add_reply(self, node: int, metrics: MetricRecord, bytes_up: int) -> None:
        cost = self.clients[node]
        cost["bytes_up"] += bytes_up
        cost["flops"] += int(metrics["flops"])
        cost["wall_time_s"] += float(metrics["wall-time-s"])
        cost["peak_memory_bytes"] = max(cost["peak_memory_bytes"], int(metrics["peak-memory-bytes"]))
        if "accelerator-peak-bytes" in metrics:  # a client on CUDA
            cost["accelerator_peak_bytes"] = max(cost.get("accelerator_peak_bytes", 0), int(metrics["accelerator-peak-bytes"]))

    def add_evaluation(self, node: int, metrics: dict[str, float]) -> None:
        """A client's client-side evaluation (loss, task metric, examples) for the ledger."""
        for key, value in metrics.items():
            self.clients[node][f"eval_{key.replace('-', '_')}"] = value

    def client_evaluation(self, nodes) -> MetricRecord | None:
        """The example-weighted mean of the evaluated ``nodes``' metrics (``client-<metric>``, ``num-examples``)."""
        evals = [{k[len("eval_"):].replace("_", "-"): v for k, v in self.clients[n].items() if k.startswith("eval_")} for n in nodes]
        total = sum(e["num-examples"] for e in evals)
        if not evals:
            return None
        keys = [k for k in evals[0] if k != "num-examples"]
        return MetricRecord({**{f"client-{k}": sum(e[k] * e["num-examples"] for e in evals) / total for k in keys}, "num-examples": total})

    def flush(self, server_round: int, ledger: Ledger | None, owner: dict[int, int], examples: dict[int, int], **server) -> MetricRecord:
        """Write this round's per-client and server costs to the ledger; return the round's training metrics."""
        losses, correct, seen = [], 0.0, 0.0
        for node, cost in self.clients.items():
            loss = cost["loss"] / cost["intervals"] if cost["intervals"] else None  # None: evaluated only, not trained
            if loss is not None:
                losses.append(loss)
            correct, seen = correct + cost["correct"], seen + cost["seen"]
            if ledger is not None:
                ledger.client(server_round, {
                    "node_id": node, "partition_id": owner.get(node, -1), "num_examples": examples.get(node, 0),
                    "loss": loss, "bytes_up": int(cost["bytes_up"]), "bytes_down": int(cost["bytes_down"]),
                    "flops": int(cost["flops"]), "peak_memory_bytes": int(cost["peak_memory_bytes"]), "wall_time_s": cost["wall_time_s"],
                    **{k: v for k, v in cost.items() if k.startswith("eval_") or k == "accelerator_peak_bytes"},
                })
        if ledger is not None:
            ledger.server(server_round, flops=int(self.server_flops), backward_flops=int(self.backward_flops), compute_s=self.compute_s,
                          **self.payload, **server)
        metrics = {"train-loss": sum(losses) / max(len(losses), 1), "server-flops": float(self.server_flops),
                   "server-backward-flops": float(self.backward_flops)}
        if seen:
            metrics["train-accuracy"] = correct / seen
        self.reset()
        return MetricRecord(metrics)
