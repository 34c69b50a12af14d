"""``ColA``: the Flower strategy of Collaborative Adaptation with Gradient Learning (arXiv 2404.13844).

One interval (DESIGN.md, "ColA round"): ``query.cola`` -> each sampled client sends I batches (and its
auxiliary models when the server does not hold them yet); the server runs its frozen base model once
per batch index over all clients' batches (``fedcola.cola.server.ColaServer``) and sends each client its own
rows of (x_m, G_m) in a ``train.cola`` message; the client does gradient learning and replies with
its updated auxiliary models. A Flower round runs ``local-steps`` intervals, then evaluation.

One message exchange per interval: a ``train.cola`` message also asks a client sampled for the next
interval for that interval's batches (``control["next-step"]``), which its reply carries, so only
clients without such a batch (the first interval, a newly sampled or a failed client) get a query.
Client batches are drawn from the interval's index, so this changes no number, only round trips.

Use it in your own ServerApp::

    server = ColaServer(model, targets, mode="merged")
    ColA(server, config, ledger=Ledger(...)).start(grid=grid, num_rounds=10, evaluate_fn=...)

Replies with wrong shapes, dtypes, NaN/Inf, unknown layers or another client's adapter id are
skipped with a logged reason; the interval goes on with the others.

Green-ColA (``cola.green-rho`` < 1, `fedcola.green.cola`): per interval only the selected adapted layers
are captured (the backward stops at the deepest one), their pairs travel, and the ``train.cola``
message lists them in ``control["layers"]``; clients report each trained layer's importance in their
reply's ``importance`` metric, from which the server re-selects after each probe interval.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedcola import train
from fedcola.cola import records as cola_fl
from fedcola.fl import wire
from fedcola.cola.adapters import Adapter
from fedcola.cola.server import ColaServer, ParameterMean
from fedcola.green.cola import LayerSelector, layer_profile
from fedcola.fl.ledger import Ledger
from fedcola.fl.screening import reply_problem, skip

QUERY, FIT = f"{MessageType.QUERY}.cola", f"{MessageType.TRAIN}.cola"
FIT_METRICS = ("rows", "flops", "peak-memory-bytes", "wall-time-s", "partition-id")


class ColA(Strategy):
    """ColA server strategy: holds the frozen base model and every client's auxiliary models (as the
    server knows them), computes only hidden-representation gradients."""

    def __init__(self, server: ColaServer, config: dict, ledger: Ledger | None = None, vocab_size: int | None = None, num_labels: int | None = None):
        self.server, self.config, self.ledger = server, config, ledger
        self.dims = cola_fl.layer_dims(config)
        self.template = cola_fl.adapter_record(cola_fl.build_adapters(config, seed=0))
        self.adapters: dict[int, dict[str, Adapter]] = {}  # per client, unless `mean` holds them
        self.mean = ParameterMean(cola_fl.build_adapters(config, seed=0)) if cola_fl.sends_changes(config) else None
        self.synced: dict[int, bool] = {}  # node -> the server holds the adapters of the node's last reply
        self.owner: dict[int, int] = {}  # node id -> adapter id (its partition id) fixed at first contact
        self.examples: dict[int, int] = {}
        self.vocab_size = vocab_size or server.model.config.vocab_size
        self.num_labels = num_labels
        self._costs: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._server_flops = self._backward_flops = 0
        self._compute_s = 0.0  # the server's own model work this round: hidden pairs and client-side evaluation
        self._connected: set[int] = set()  # the nodes connected when this interval was configured
        self._step = 0  # the interval's global index: seeds client sampling and the clients' batch draws
        self._sampled: list[int] = []  # this interval's clients
        self._prefetched: dict[int, list[dict[str, torch.Tensor]]] = {}  # node -> batches of interval `_prefetch_step`
        self._prefetch_step = -1
        self.green = self._green_selector() if config["cola.green-rho"] < 1.0 else None
        self._layers: tuple[str, ...] | None = None  # this interval's selected layers (Green-ColA), None = all
        self._reports: dict[int, dict[str, float]] = {}  # node -> {layer: importance} of this interval
        self._probes = 0
        self.round_offset = 0  # a resumed run continues after this round (`load_state`)
        self._resumed: dict[int, int] = {}  # adapter id -> the checkpoint's node id, until a node of this run claims it

    def _green_selector(self) -> LayerSelector:
        """Green-ColA's selector, profiled at the run's server batch: the sampled clients' batches of
        ``data.max-length`` tokens (fixed-seed token ids)."""
        c = self.config
        rows = max(1, math.ceil(c["fraction-train"] * c["num-clients"])) * c["batch-size"]
        ids = torch.randint(0, self.vocab_size, (rows, c["data.max-length"]), generator=torch.Generator().manual_seed(c["seed"]))
        profile = layer_profile(self.server.model, self.server.targets, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        return LayerSelector(profile, c["cola.green-rho"], c["cola.green-every"])

    @property
    def known(self) -> set[int]:
        """Nodes whose auxiliary models the server holds."""
        return set(self.adapters) | (set(self.mean.n) if self.mean is not None else set())

    def adapter_sets(self) -> dict:
        """The auxiliary models the server holds (what merged mode folds into W): per client, or their
        parameter mean ("mean") for merged linear auxiliary models."""
        return {"mean": self.mean.adapters} if self.mean is not None else self.adapters

    def evaluation_groups(self) -> list[dict]:
        """The models the server evaluates: the shared merged model, or each client's personal model."""
        if self.server.mode == "merged":
            return [self.adapter_sets()]
        return [{n: a} for n, a in self.adapters.items()]

    def _control(self, node: int, **extra) -> ConfigRecord:
        """A message's control record; a resumed run lists the adapter ids whose checkpointed state no node
        has claimed yet (``held``): such a client must continue from its saved state, not start afresh."""
        held = {"held": sorted(self._resumed)} if self._resumed else {}
        return ConfigRecord({"synced": self.synced.get(node, False), **held, **extra})

    def summary(self) -> None:
        c = self.config
        log(INFO, "\tColA: mode %s, %s auxiliary models on %d layers, interval I=%d, wire %s",
            self.server.mode, c["cola.adapter"], len(self.dims), c["cola.interval"], c["cola.wire-dtype"])
        if self.green is not None:
            log(INFO, "\tGreen-ColA: rho %g of the server backward, re-selected every %d round(s)", self.green.rho, self.green.every)

    # --- step 1/2: query ------------------------------------------------------------------------
    def sample(self, grid: Grid, step: int) -> list[int]:
        """The clients of interval ``step``: a ``fraction-train`` sample of the connected nodes, seeded by the step."""
        nodes = sorted(grid.get_node_ids())
        self._connected = set(nodes)
        k = max(1, math.ceil(self.config["fraction-train"] * len(nodes)))
        return sorted(random.Random(self.config["seed"] * 100_003 + step).sample(nodes, k))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Query messages for the sampled clients of this interval whose batches did not come with
        their last reply."""
        self._sampled = self.sample(grid, self._step)
        if self._prefetch_step != self._step:
            self._prefetched = {}
        return [
            Message(RecordDict({"config": config, "control": self._control(node, step=self._step, **{"send-adapter": node not in self.known})}),
                    dst_node_id=node, message_type=QUERY)
            for node in self._sampled if node not in self._prefetched
        ]

    def interval_batches(self, server_round: int, config: ConfigRecord, grid: Grid, timeout: float) -> dict[int, list[dict[str, torch.Tensor]]]:
        """This interval's usable batches by node (in node order): prefetched ones, and the query replies
        of the sampled clients that had none."""
        queries = list(self.configure_train(server_round, ArrayRecord(), config, grid))
        batches = self._accept_queries(server_round, grid.send_and_receive(queries, timeout=timeout)) if queries else {}
        batches |= {n: b for n, b in self._prefetched.items() if n in self._sampled}
        self._prefetched = {}
        return dict(sorted(batches.items()))

    def _new_adapters(self, record: ArrayRecord) -> dict[str, Adapter]:
        adapters = cola_fl.build_adapters(self.config, seed=0)
        cola_fl.load_adapter_record(adapters, record)
        for a in adapters.values():
            a.requires_grad_(False)
        return adapters

    def _accept_queries(self, server_round: int, replies: Iterable[Message], evaluation: bool = False) -> dict[int, list[dict[str, torch.Tensor]]]:
        """Usable batches by node: I training batches, or up to ``eval.client-max-examples`` local
        validation examples (``evaluation``); bad replies are skipped with the reason."""
        batches = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            problem = reply_problem(msg, None, required=("num-examples", "partition-id"))
            if problem is None:
                problem = self._check_owner(node, int(msg.content.metric_records["metrics"]["partition-id"]))
            if problem is None:
                problem = self._batch_problem(msg, evaluation)
            if problem is None:
                self._own(node, int(msg.content.metric_records["metrics"]["partition-id"]))
            if problem is None and node not in self.known:
                if "adapter" not in msg.content.array_records:
                    problem = "first query reply lacks the client's auxiliary models"
                else:
                    problem = wire.check_arrays(msg.content.array_records["adapter"], self.template)
                    if problem is None:
                        self._join(node, msg.content.array_records["adapter"], int(msg.content.metric_records["metrics"]["num-examples"]))
            if problem is not None:
                skip(server_round, node, problem, self.ledger)
                continue
            self._costs[node]["bytes_up"] += sum(wire.nbytes(r) for r in msg.content.array_records.values())
            batches[node] = self._take_batches(node, msg, evaluation)
        return batches

    def _batch_problem(self, msg: Message, evaluation: bool) -> str | None:
        """Why a reply's ``batch`` record is unusable: I training batches, or up to
        ``eval.client-max-examples`` local validation examples (``evaluation``)."""
        c = self.config
        max_batches = math.ceil(c["eval.client-max-examples"] / c["batch-size"]) if evaluation else c["cola.interval"]
        if "batch" not in msg.content.array_records:
            return "reply has no 'batch' ArrayRecord"
        if "num-examples" not in msg.content.metric_records["metrics"]:
            return "a reply with batches lacks the num-examples metric"
        record = msg.content.array_records["batch"]
        problem = cola_fl.check_batches(record, max_batches, c["batch-size"], self.vocab_size, self.num_labels, c["data.max-length"])
        if problem is None and not evaluation and cola_fl.batch_count(record) != max_batches:
            problem = f"reply has {cola_fl.batch_count(record)} batches, the interval needs {max_batches}"
        return problem

    def _take_batches(self, node: int, msg: Message, evaluation: bool) -> list[dict[str, torch.Tensor]]:
        if not evaluation:
            self.examples[node] = int(msg.content.metric_records["metrics"]["num-examples"])
        return cola_fl.unpack_batches(msg.content.array_records["batch"])

    def _join(self, node: int, record: ArrayRecord, num_examples: int) -> None:
        if self.mean is not None:
            self.mean.add(node, record.to_torch_state_dict(), n=num_examples if self.config["cola.weighting"] == "examples" else 1.0)
        else:
            self.adapters[node] = self._new_adapters(record)
        self.synced[node] = True

    def _check_owner(self, node: int, adapter_id: int) -> str | None:
        """A node keeps the adapter id of its first reply; a connected node's id is not another's."""
        if node in self.owner and self.owner[node] != adapter_id:
            return f"reply carries adapter id {adapter_id}, but node {node} holds adapter {self.owner[node]}"
        held_by = [n for n, a in self.owner.items() if a == adapter_id and n != node and n in self._connected]
        return f"adapter id {adapter_id} is held by connected node {held_by[0]}" if held_by else None

    def _own(self, node: int, adapter_id: int) -> None:
        """Record ``node`` as the holder of ``adapter_id``. A restarted SuperNode comes back with a new
        node id: it takes over the adapter id of the departed node, whose entries go (in merged mode
        they would otherwise count that client twice). In the parameter mean (merged linear) its share
        and its `synced` flag pass to the new node: the node's restored state (``state-dir``) continues
        the changes it sends from the version the server holds."""
        resumed = self._resumed.pop(adapter_id, None)
        if resumed is not None and node not in self.owner:
            self._rekey(resumed, node)
        if node not in self.owner:
            for old in [n for n, a in self.owner.items() if a == adapter_id]:
                log(INFO, "adapter id %d rejoined as node %d (was node %d)", adapter_id, node, old)
                for held in (self.owner, self.adapters, self.examples):
                    held.pop(old, None)
                if self.mean is not None and old in self.mean.n:
                    self.mean.n[node] = self.mean.n.pop(old)
                    self.synced[node] = self.synced.pop(old, False)
        self.owner[node] = adapter_id

    # --- step 3/4: hidden gradients -------------------------------------------------------------
    def hidden_pairs(self, batches: dict[int, list[dict[str, torch.Tensor]]]) -> dict[int, list[dict]]:
        """One forward + backward per batch index over all clients' batches; per-client rows of (x, G)
        (of the interval's selected layers only, with Green-ColA)."""
        weights = self.examples if self.config["cola.weighting"] == "examples" and self.mean is None else None
        known = self.adapter_sets() if self.server.mode == "merged" else {n: self.adapters[n] for n in batches}
        out: dict[int, list[dict]] = {n: [] for n in batches}
        t0 = time.perf_counter()
        for i in range(self.config["cola.interval"]):
            hg = self.server.hidden_grads({n: b[i] for n, b in batches.items()}, known, weights, layers=self._layers)
            self._server_flops += hg.forward_flops + hg.backward_flops
            self._backward_flops += hg.backward_flops
            for n in batches:
                out[n].append(hg.pairs[n])
                labels = batches[n][i]["labels"]
                self._costs[n]["loss"] += hg.loss[n] / self.config["cola.interval"]
                self._costs[n]["intervals"] += 1 / self.config["cola.interval"]
                if self.config["task"] == "classification":
                    self._costs[n]["correct"] += float((hg.logits[n].argmax(-1) == labels).sum())
                    self._costs[n]["seen"] += len(labels)
        self._compute_s += time.perf_counter() - t0
        return out

    def configure_fit(self, pairs: dict[int, list[dict]], config: ConfigRecord, grid: Grid | None = None, next_step: int | None = None) -> list[Message]:
        """``train.cola`` messages with each client's pairs; those sampled for interval ``next_step``
        (None: no next interval) are asked for its batches as well."""
        self._prefetch_step = -1 if next_step is None else next_step
        following = set(self.sample(grid, next_step)) if next_step is not None else set()
        messages = []
        for node, per_batch in pairs.items():
            record = wire.pack(cola_fl.pairs_payload(per_batch), self.config["cola.wire-dtype"])
            self._costs[node]["bytes_down"] += wire.nbytes(record)
            extra = {} if self._layers is None else {"layers": list(self._layers)}
            control = self._control(node, **extra, **({"next-step": next_step} if node in following else {}))
            messages.append(Message(RecordDict({"pairs": record, "config": config, "control": control}), dst_node_id=node, message_type=FIT))
            self.synced[node] = False  # until its reply is taken
        return messages

    # --- step 6: updated auxiliary models -------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Take each client's updated auxiliary models, or the change of its parameters (`mean`); the
        server re-merges them next interval. Batches for the next interval that a reply carries are kept
        for it."""
        kept = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            problem = reply_problem(msg, self.template, required=FIT_METRICS, arrays_key="adapter")
            if problem is None:
                problem = self._check_owner(node, int(msg.content.metric_records["metrics"]["partition-id"]))
            if problem is None and "batch" in msg.content.array_records:
                problem = self._batch_problem(msg, evaluation=False) if self._prefetch_step >= 0 else "reply carries batches nobody asked for"
            if problem is None and self.green is not None:
                problem = self._take_importance(node, msg.content.metric_records["metrics"])
            if problem is not None:
                skip(server_round, node, problem, self.ledger)
                continue
            if "batch" in msg.content.array_records:
                self._prefetched[node] = self._take_batches(node, msg, evaluation=False)
            if self.mean is not None:
                self.mean.move(node, msg.content.array_records["adapter"].to_torch_state_dict())
            else:
                cola_fl.load_adapter_record(self.adapters[node], msg.content.array_records["adapter"])
            self.synced[node] = True
            m = msg.content.metric_records["metrics"]
            cost = self._costs[node]
            cost["bytes_up"] += sum(wire.nbytes(r) for r in msg.content.array_records.values())
            cost["flops"] += int(m["flops"])
            cost["wall_time_s"] += float(m["wall-time-s"])
            cost["peak_memory_bytes"] = max(cost["peak_memory_bytes"], int(m["peak-memory-bytes"]))
            kept += 1
        return None, MetricRecord({"clients": kept})

    def _take_importance(self, node: int, metrics: MetricRecord) -> str | None:
        """Keep a reply's per-layer importance (Green-ColA), or say why it is unusable."""
        layers = self._layers or tuple(self.dims)
        values = metrics.get("importance")
        if not isinstance(values, list) or len(values) != len(layers) or not all(math.isfinite(v) for v in values):
            return f"importance metric must be {len(layers)} finite values, one per trained layer"
        self._reports[node] = dict(zip(layers, map(float, values)))
        return None

    def _select(self, server_round: int) -> None:
        """After a probe interval: re-select the layers from the clients' importance reports."""
        weights = {n: self.examples[n] if self.config["cola.weighting"] == "examples" else 1.0 for n in self._reports}
        try:
            if not self.green.update(self._reports, weights):
                log(WARNING, "round %d: Green-ColA selected no layer (no positive importance); selection kept", server_round)
        except ValueError as err:  # no usable report
            log(WARNING, "round %d: Green-ColA selection kept: %s", server_round, err)
        log(INFO, "round %d: Green-ColA selects %d of %d layers (%.3f of the server backward)",
            server_round, len(self.green.selected), len(self.dims), self.green.backward_fraction)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Client-side evaluation: every client whose auxiliary models the server holds sends (a prefix
        of) its local validation split; the server runs that client's model on it (its personal model
        W + g_k, or the shared W + mean dW in merged mode): ColA clients hold no base model."""
        return [Message(RecordDict({"config": config, "control": self._control(n, step=-1, split="validation", **{"send-adapter": False})}),
                        dst_node_id=n, message_type=QUERY) for n in sorted(self.known - set(self._resumed.values()))]  # not the dead run's nodes

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-client loss and task metric on local validation data (ledger), and their example-weighted mean."""
        totals: dict[str, float] = defaultdict(float)
        accepted = self._accept_queries(server_round, replies, evaluation=True)
        t0 = time.perf_counter()
        for node, batches in accepted.items():
            adapters = self.adapter_sets() if self.server.mode == "merged" else {node: self.adapters[node]}
            metrics = train.evaluate_logits(self.server.predictor(adapters), batches, self.config["task"])
            for key, value in metrics.items():
                self._costs[node][f"eval_{key.replace('-', '_')}"] = value
                if key != "num-examples":
                    totals[key] += value * metrics["num-examples"]
            totals["num-examples"] += metrics["num-examples"]
        self._compute_s += time.perf_counter() - t0
        if not totals:
            return None
        return MetricRecord({k if k == "num-examples" else f"client-{k}": v if k == "num-examples" else v / totals["num-examples"] for k, v in totals.items()})

    def _flush_round(self, server_round: int) -> MetricRecord:
        """Write this round's per-client costs to the ledger; return the round's training metrics."""
        losses, correct, seen = [], 0.0, 0.0
        for node, cost in self._costs.items():
            loss = cost["loss"] / cost["intervals"] if cost["intervals"] else None  # None: evaluated only, not trained
            if loss is not None:
                losses.append(loss)
            correct, seen = correct + cost["correct"], seen + cost["seen"]
            if self.ledger is not None:
                self.ledger.client(server_round, {
                    "node_id": node, "partition_id": self.owner.get(node, -1), "num_examples": self.examples.get(node, 0),
                    "loss": loss, "bytes_up": int(cost["bytes_up"]), "bytes_down": int(cost["bytes_down"]),
                    "flops": int(cost["flops"]), "peak_memory_bytes": int(cost["peak_memory_bytes"]), "wall_time_s": cost["wall_time_s"],
                    **{k: v for k, v in cost.items() if k.startswith("eval_")},
                })
        if self.ledger is not None:
            green = {} if self.green is None else {"green": {
                "selected": [layer for layer in self.dims if layer in self.green.selected], "backward_fraction": self.green.backward_fraction,
                "probe_intervals": self._probes, "importance": None if self.green.importance is None else dict(zip(self.green.profile.names, self.green.importance.tolist()))}}
            self.ledger.server(server_round, flops=int(self._server_flops), backward_flops=int(self._backward_flops), compute_s=self._compute_s, **green)
        metrics = {"train-loss": sum(losses) / max(len(losses), 1), "server-flops": float(self._server_flops),
                   "server-backward-flops": float(self._backward_flops)}
        if seen:
            metrics["train-accuracy"] = correct / seen
        self._costs.clear()
        self._server_flops = self._backward_flops = self._probes = 0
        self._compute_s = 0.0
        return MetricRecord(metrics)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Run ``num_rounds`` rounds of ``local-steps`` ColA intervals each (the multi-step round)."""
        log(INFO, "Starting ColA strategy:")
        self.summary()
        config = ConfigRecord() if train_config is None else train_config
        result = Result()
        empty = ArrayRecord()
        if evaluate_fn and not self.round_offset:
            result.evaluate_metrics_serverapp[0] = evaluate_fn(0, empty)
        self._wait_for_nodes(grid, timeout)
        for rnd in range(self.round_offset + 1, self.round_offset + num_rounds + 1):
            if self.ledger is not None:
                self.ledger.begin_round(rnd)
            for step in range(self.config["local-steps"]):
                config["server-round"] = rnd
                self._step = (rnd - 1) * self.config["local-steps"] + step
                batches = self.interval_batches(rnd, config, grid, timeout)
                if not batches:
                    log(WARNING, "round %d step %d: no usable query reply; skipping the interval", rnd, step)
                    continue
                self.begin_interval(rnd, step)
                last = rnd == self.round_offset + num_rounds and step == self.config["local-steps"] - 1
                fit = self.configure_fit(self.hidden_pairs(batches), config, grid, None if last else self._step + 1)
                fit_replies = grid.send_and_receive(fit, timeout=timeout)
                self.aggregate_train(rnd, fit_replies)
                self.end_interval(rnd, step)
            replies = grid.send_and_receive(self.configure_evaluate(rnd, empty, config, grid), timeout=timeout)
            client_eval = self.aggregate_evaluate(rnd, replies)
            if client_eval is not None:
                result.evaluate_metrics_clientapp[rnd] = client_eval
            result.train_metrics_clientapp[rnd] = self._flush_round(rnd)
            log(INFO, "round %d: %s", rnd, result.train_metrics_clientapp[rnd])
            if evaluate_fn:
                result.evaluate_metrics_serverapp[rnd] = evaluate_fn(rnd, empty)
        return result

    def begin_interval(self, rnd: int, step: int) -> None:
        """Green-ColA: the layers whose pairs this interval computes and sends (every layer in a probe)."""
        self._layers = None if self.green is None else tuple(layer for layer in self.dims if layer in self.green.layers(rnd, step))
        self._reports = {}

    def end_interval(self, rnd: int, step: int) -> None:
        """Green-ColA: after a probe interval, re-select from the clients' importance reports."""
        if self.green is not None and self.green.probes(rnd, step):
            self._probes += 1
            self._select(rnd)

    def _wait_for_nodes(self, grid: Grid, timeout: float) -> None:
        """Wait (up to ``timeout``) until ``num-clients`` nodes are connected, as Flower's samplers do."""
        deadline = time.time() + timeout
        while len(list(grid.get_node_ids())) < self.config["num-clients"] and time.time() < deadline:
            time.sleep(1.0)

    # --- checkpoint (server resume) ---------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What the next round needs, at the end of a round (``fedcola.fl.checkpoint``): per-client
        auxiliary models (``adapters/<node>/...``) or the parameter mean's float64 S (``mean/...``) as
        tensors; node -> adapter id, ``synced``, examples, the mean's n_k and Green-ColA's selection as JSON."""
        tensors = {f"adapters/{node}/{k}": v for node, ads in self.adapters.items() for k, v in cola_fl.adapter_record(ads).to_torch_state_dict().items()}
        keyed = lambda held: {str(n): v for n, v in held.items()}  # noqa: E731  (JSON keys are strings)
        state = {"owner": keyed(self.owner), "synced": keyed(self.synced), "examples": keyed(self.examples)}
        if self.mean is not None:
            tensors |= {f"mean/{k}": v for k, v in self.mean.sum.items()}
            state["mean-n"] = keyed(self.mean.n)
        if self.green is not None and self.green.mask is not None:
            state["green"] = {"mask": self.green.mask.tolist(), "importance": self.green.importance.tolist()}
        return tensors, state

    def load_state(self, server_round: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Continue after ``server_round`` from :meth:`state_dict`'s output. Nodes of the new run have new
        ids: the first reply carrying an adapter id takes over that id's state (``_rekey``)."""
        by_node = lambda key: {int(n): v for n, v in state.get(key, {}).items()}  # noqa: E731
        self.round_offset = server_round
        self.owner, self.synced, self.examples = by_node("owner"), by_node("synced"), by_node("examples")
        nodes = {int(k.split("/", 2)[1]) for k in tensors if k.startswith("adapters/")}
        self.adapters = {n: self._new_adapters(ArrayRecord({k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"adapters/{n}/")}))
                         for n in sorted(nodes)}
        if self.mean is not None:
            self.mean.restore({k[len("mean/"):]: v for k, v in tensors.items() if k.startswith("mean/")}, by_node("mean-n"))
        if self.green is not None and "green" in state:
            self.green.mask = np.array(state["green"]["mask"], dtype=bool)
            self.green.importance = np.array(state["green"]["importance"])
        self._resumed = {a: n for n, a in self.owner.items()}

    def _rekey(self, old: int, node: int) -> None:
        """Node ``node`` of a resumed run takes over the checkpointed state of node ``old`` (same adapter id)."""
        for held in (self.owner, self.adapters, self.examples, self.synced):
            if old in held:
                held[node] = held.pop(old)
        if self.mean is not None and old in self.mean.n:
            self.mean.n[node] = self.mean.n.pop(old)
