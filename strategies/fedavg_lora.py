"""FedAvg of LoRA adapters with screened replies, per-client FLOPs budgets and a cost ledger.

Clients under a GreenTrainer budget rho_k < 1 train different subsets of the tensors
(`fedcola.fedavg_lora.client`). Each reply names the tensors its client trained; the server averages each
tensor over those clients only, weighted by examples (`per_tensor_fedavg`). A copy a client sent
back untrained is the global value it received: counting it as a zero update would shrink every
update that only some clients compute by the share of examples held by the others, so weak
clients would slow down the tensors they cannot afford. This is the per-parameter averaging of
sub-model FL (as in HeteroFL, Diao et al. 2021). When every client trains every tensor it is FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedcola.fedavg_lora.client import TRAINED, trainable_state
from fedcola.fl.ledger import Ledger
from fedcola.fl.robust import check_aggregation, robust_mean
from fedcola.fl.wire import nbytes
from fedcola.fl.screening import MAX_EXAMPLES, Screened, Skips, record_clients, screen
from fedcola.train import OptimizerSpec


def trained_names(content: RecordDict, current: ArrayRecord) -> list[str]:
    """The tensors a reply says its client trained (all of them when it does not say)."""
    record = content.config_records.get(TRAINED)
    return list(current.keys()) if record is None else list(record["names"])


def per_tensor_fedavg(current: ArrayRecord, contents: list[RecordDict], weight_key: str = "num-examples", aggregation: str = "mean",
                      trim: float = 0.2) -> ArrayRecord:
    """w_t <- sum_{k in S_t} n_k w_k,t / sum_{k in S_t} n_k, S_t = the clients that trained tensor t
    (module docstring); a tensor no client trained keeps its current value. ``aggregation`` = ``median``
    (coordinate-wise, Yin et al. 2018) or ``trimmed-mean`` (``trim`` of each tail cut) replaces the mean
    over S_t by Flower's robust aggregates (unweighted)."""
    trained = [set(trained_names(c, current)) for c in contents]
    weights = [float(c.metric_records["metrics"][weight_key]) for c in contents]
    out = {}
    for name, value in current.items():
        mine = [(w, c.array_records["arrays"][name].numpy()) for c, t, w in zip(contents, trained, weights) if name in t]
        if not mine:
            out[name] = value
            continue
        if aggregation == "mean":
            total = sum(w for w, _ in mine)
            mean = sum(w * a.astype(np.float64) for w, a in mine) / total
        else:
            mean = robust_mean([a for _, a in mine], aggregation, trim)
        out[name] = Array(np.asarray(mean).astype(value.numpy().dtype))
    return ArrayRecord(out)


class FedAvgLoRA(Screened, FedAvg):
    """Flower's FedAvg over peft LoRA tensors; malformed replies are skipped, not fatal.

    Usable in any ServerApp: ``FedAvgLoRA(peft_model, local_steps=20, optimizer=OptimizerSpec("adamw",
    2e-3)).start(grid=grid, num_rounds=3)``: the clients (``fedcola.fedavg_lora.client``) get the
    local steps, optimizer and ``seed`` in every message's ``config`` record; the initial arrays are
    the model's trainable tensors. ``round_offset=k`` continues a run after its round k
    (``initial_arrays`` = the round-k weights). ``min_available_nodes`` holds for the run's first round
    only (the federation assembles); later rounds sample from the nodes connected then, so a node that
    never comes back does not stall the run. A round in which no reply was accepted fails the run,
    unless ``allow_empty_rounds``.
    """

    def __init__(self, model: nn.Module | None = None, *args, optimizer: OptimizerSpec = OptimizerSpec(), local_steps: int = 10, seed: int = 0,
                 max_examples: int = MAX_EXAMPLES, max_update_ratio: float = 10.0, aggregation: str = "mean", trim: float = 0.2, allow_empty_rounds: bool = False, ledger: Ledger | None = None, round_offset: int = 0, **kwargs):
        kwargs.setdefault("fraction_evaluate", 0.0)
        kwargs.setdefault("min_train_nodes", 1)
        kwargs.setdefault("min_available_nodes", 1)
        super().__init__(*args, **kwargs)
        check_aggregation(aggregation, trim)
        self.model, self.max_examples, self.max_update_ratio = model, max_examples, max_update_ratio
        self.aggregation, self.trim = aggregation, trim
        self.settings = {"local-steps": local_steps, "optimizer": optimizer.name, "lr": float(optimizer.lr),
                         "weight-decay": float(optimizer.weight_decay), "seed": seed}
        self.skips = Skips(ledger, allow_empty_rounds)
        self.round_offset = round_offset  # a resumed run: Flower's round r is round r + offset of the run
        self._sent: ArrayRecord | None = None

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None, evaluate_fn=None):
        """Flower's FedAvg loop from ``initial_arrays`` (default: the model's trainable tensors)."""
        if initial_arrays is None:
            if self.model is None:
                raise ValueError("FedAvgLoRA.start needs initial_arrays or a model")
            initial_arrays = ArrayRecord(trainable_state(self.model))
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if server_round > 1:
            self.min_available_nodes = self.min_train_nodes
        server_round += self.round_offset
        self._sent = arrays
        if self.ledger is not None:
            self.ledger.begin_round(server_round)
        self.skips.begin_round(server_round)
        return super().configure_train(server_round, arrays, ConfigRecord(self.settings | dict(config)), grid)

    def _names_known(self, server_round: int, msg: Message) -> bool:
        """A reply's ``trained`` record names only tensors of the global model (else it is skipped)."""
        unknown = set() if msg.has_error() else set(trained_names(msg.content, self._sent)) - set(self._sent.keys())
        if unknown:
            self.skips.skip(server_round, msg.metadata.src_node_id, f"trained names unknown tensors {sorted(unknown)[:3]}")
        return not unknown

    def _bounded(self, server_round: int, kept: list[Message]) -> list[Message]:
        """Drop (logged) the replies whose update ||w_k - w|| exceeds ``max_update_ratio`` x the others' median."""
        sent = {k: v.numpy().astype(np.float64) for k, v in self._sent.items()}
        norms = {}
        for msg in kept:
            arrays = msg.content.array_records["arrays"]
            change = sum(float(((arrays[k].numpy().astype(np.float64) - sent[k]) ** 2).sum()) for k in trained_names(msg.content, self._sent))
            norms[msg.metadata.src_node_id] = change ** 0.5
        far = self.skips.drop_outliers(server_round, norms, self.max_update_ratio)
        return [m for m in kept if m.metadata.src_node_id not in far]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        named = [msg for msg in replies if self.skips.guard(server_round, msg.metadata.src_node_id, lambda: self._names_known(server_round, msg))]
        kept = self._bounded(server_round, screen(server_round, named, self._sent, None, nbytes(self._sent), self.skips, self.max_examples))
        record_clients(server_round, kept, self.ledger, nbytes(self._sent))
        self.skips.accepted(len(kept))
        self.skips.end_round(server_round)  # no usable reply: the run fails (or, if allowed, the model stays as it is)
        if not kept:
            return None, None
        contents = [msg.content for msg in kept]
        arrays = per_tensor_fedavg(self._sent, contents, self.weighted_by_key, self.aggregation, self.trim)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
