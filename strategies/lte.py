"""LTE strategies (LoRA-the-Explorer, Huh et al., arXiv 2402.16828) for Flower's Message API.

:class:`LTE` is the paper's synchronous round: every sampled client trains its own LoRA head for
T steps against the server's ``W`` and replies with its low-rank delta; the server merges
``W <- W + mean_n delta_n`` (fp32 master, ``fedcola.lte.heads.merge``) and next round sends each client
the merged update as factors (dense where smaller) so it can advance its own ``W``.

The asynchronous variant is ``strategies.lte_async.LTEAsync``.

Message layout: ``fedcola.lte.client``. Replies are screened like every fedcola strategy
(``fedcola.fl.screening``): a client error, missing metrics, wrong keys, shapes or rank, or
non-finite values skip that reply with a logged reason and a ledger entry; the run goes on.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor, nn

from fedcola.fl.ledger import Ledger
from fedcola.fl.robust import check_aggregation
from fedcola.lte.merge import Delta, InvalidDeltaError, delta_nbytes, delta_norm, merge, merge_robust, validate_delta
from fedcola.lte.client import STATE_SPEC, delta_record, record_delta
from fedcola.lte.heads import base_weights, frozen_parameters
from fedcola.lte.spec import LTESpec
from fedcola.fl.wire import nbytes
from fedcola.fl.screening import MAX_EXAMPLES, Screened, Skips, record_clients, reply_problem

MESSAGE_TYPE = "train.lte"
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class LTE(Screened, Strategy):
    """Synchronous LTE. ``start(grid, initial_arrays=W, num_rounds, train_config=ConfigRecord(config),
    evaluate_fn=...)`` as any Flower strategy; ``initial_arrays`` holds the mergeable weights
    (``fedcola.lte.heads.base_weights``), ``frozen_arrays`` the frozen non-LoRA parameters sent with
    every full sync. ``r`` (head rank) bounds the accepted factor rank at ``2 r``; ``weighted``
    weights the mean by examples (the paper: plain mean); ``aggregation`` = ``median`` or
    ``trimmed-mean`` (``trim`` of each tail cut) replaces the mean by a Byzantine-robust one
    (``merge_robust``). A delta whose norm exceeds ``max_update_ratio`` x the other replies' median is
    skipped.

    Each round waits up to ``node_wait`` s for ``min_available_nodes`` connected nodes, then goes on
    with those connected (logged, ledger ``nodes_connected``; a node the SuperLink declared offline
    is no longer listed); a sampled node whose reply has not come when ``start``'s ``timeout`` ends
    the round is skipped (logged, ledger ``skipped``) and gets a full sync when it answers again."""

    def __init__(
        self,
        model: nn.Module,
        spec: LTESpec = LTESpec(),
        *,
        fraction_train: float = 1.0,
        min_available_nodes: int = 1,
        node_wait: float = 60.0,
        weighted: bool = False,
        max_examples: int = MAX_EXAMPLES,
        max_update_ratio: float = 10.0,
        aggregation: str = "mean",
        trim: float = 0.2,
        allow_empty_rounds: bool = False,
        ledger: Ledger | None = None,
        message_type: str = MESSAGE_TYPE,
    ) -> None:
        check_aggregation(aggregation, trim)
        model = spec.attach(model)  # the server's copy of the heads is never trained: only W and the frozen parameters are read
        self.spec, self.r = spec, spec.r
        self.frozen = ArrayRecord(frozen_parameters(model))
        self.fraction_train = fraction_train
        self.min_available_nodes = min_available_nodes
        self.node_wait = node_wait
        self.weighted, self.max_examples, self.max_update_ratio = weighted, max_examples, max_update_ratio
        self.aggregation, self.trim = aggregation, trim
        self.skips = Skips(ledger, allow_empty_rounds)
        self.message_type = message_type
        self.W: dict[str, Tensor] = base_weights(model)
        self.version = 0
        self.history: dict[int, tuple[ArrayRecord | None, int]] = {}  # version v -> (merged update v-1 -> v, its bytes)
        self.history_size = 1
        self._full: tuple[int, ArrayRecord] | None = None  # (version, W as a record), built once per version
        self.sent: dict[int, tuple[int, int]] = {}  # node -> (version its W holds, bytes sent)
        self._round_messages: list[Message] = []  # this round's, their ids set by the Grid when pushed
        self.round_offset = 0  # a resumed run: Flower's round r is the run's round r + offset (`load_state`)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: EvaluateFn | None = None) -> Result:
        """Flower's round loop from ``initial_arrays`` (default: the model's ``W``)."""
        return super().start(grid, ArrayRecord(self.W) if initial_arrays is None else initial_arrays, num_rounds, timeout,
                             train_config, evaluate_config, evaluate_fn)

    # --- sending -------------------------------------------------------------------------------

    def _init_weights(self, arrays: ArrayRecord) -> None:
        """Start from ``arrays`` (``start``'s initial arrays) once, before the first merge."""
        if self.version == 0 and arrays is not None and len(arrays):
            self.W = {k: v.float() for k, v in arrays.to_torch_state_dict().items()}

    def _full_nbytes(self) -> int:
        return delta_nbytes(self.W) + nbytes(self.frozen)

    def _full_payload(self) -> RecordDict:
        if self._full is None or self._full[0] != self.version:
            self._full = (self.version, ArrayRecord(self.W))
        return RecordDict({"weights": self._full[1], "frozen": self.frozen, STATE_SPEC: self.spec.to_record(),
                           "lte": ConfigRecord({"version": self.version, "base": -1})})

    def _payload(self, node: int) -> RecordDict:
        """The merged updates the node lacks, or the full ``W`` + frozen parameters if those are not
        larger (tensor bytes from shapes) or the node's version is unknown or older than the
        kept history. Each record is serialised once, whatever the number of nodes it goes to."""
        base = self.sent.get(node, (None, 0))[0]
        missing = range(base + 1, self.version + 1) if base is not None else None
        if missing is None or any(v not in self.history for v in missing):
            return self._full_payload()
        if sum(self.history[v][1] for v in missing) >= self._full_nbytes():
            return self._full_payload()
        updates = {f"update.{v}": self.history[v][0] for v in missing}
        return RecordDict(updates | {"lte": ConfigRecord({"version": self.version, "base": base})})

    def _message(self, node: int, config: ConfigRecord, server_round: int) -> Message:
        content = self._payload(node)
        content["config"] = ConfigRecord(dict(config) | {"server-round": server_round})
        self.sent[node] = (self.version, sum(nbytes(r) for r in content.array_records.values()))
        return Message(content, dst_node_id=node, message_type=self.message_type, group_id=str(server_round))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._init_weights(arrays)
        if self.ledger is not None:
            self.ledger.begin_round(server_round)
        available = self._available_nodes(server_round, grid)
        if self.ledger is not None and len(available) < self.min_available_nodes:
            self.ledger.server(server_round, nodes_connected=len(available))
        self._round_messages = [self._message(node, config, server_round)
                                for node in random.sample(available, max(1, int(len(available) * self.fraction_train)))]
        return self._round_messages

    def _available_nodes(self, server_round: int, grid: Grid) -> list[int]:
        """The connected nodes after waiting up to ``node_wait`` s for ``min_available_nodes`` of them
        (then for at least one, as Flower's ``sample_nodes`` does)."""
        deadline = time.time() + self.node_wait
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes and (not nodes or time.time() < deadline):
            time.sleep(1.0)
        if len(nodes) < self.min_available_nodes:
            log(WARNING, "round %d: %d of %d nodes connected after %.0f s; going on with them", server_round,
                len(nodes), self.min_available_nodes, self.node_wait)
        return nodes

    # --- receiving -----------------------------------------------------------------------------

    def _delta(self, msg: Message) -> dict[str, Delta] | str:
        """The validated delta of a reply that passed ``reply_problem``, or why it cannot be merged."""
        node = msg.metadata.src_node_id
        if node not in self.sent:
            return "reply from a node with no outstanding work"
        if "arrays" not in msg.content.array_records:
            return "reply has no 'arrays' ArrayRecord"
        metrics = msg.content.metric_records["metrics"]
        if "base-version" not in metrics:
            return "reply metrics lack base-version"
        if int(metrics["base-version"]) != self.sent[node][0]:
            return f"trained against W version {metrics['base-version']}, was sent {self.sent[node][0]}"
        try:
            delta = record_delta(msg.content.array_records["arrays"])
            validate_delta(self.W, delta, self.r)
        except InvalidDeltaError as err:
            return str(err)
        return delta

    def _screen(self, server_round: int, replies: Iterable[Message]) -> list[tuple[Message, dict[str, Delta]]]:
        """Usable replies with their deltas; the others are logged and recorded as skipped."""
        kept = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():  # it may not have applied what it was sent: full sync next time
                self.sent.pop(node, None)
            problem = reply_problem(msg, None, max_examples=self.max_examples)
            delta = problem if problem is not None else self.skips.guard(server_round, node, lambda: self._delta(msg))
            if isinstance(delta, str):
                self.skips.skip(server_round, node, delta)
            elif delta is not None:
                kept.append((msg, delta))
        return kept

    def _record(self, server_round: int, kept: list[tuple[Message, dict[str, Delta]]]) -> None:
        for msg, _ in kept:
            record_clients(server_round, [msg], self.ledger, self.sent.get(msg.metadata.src_node_id, (0, 0))[1])

    def _advance(self, update: dict[str, Delta]) -> None:
        """Keep the merged update as a record, unless it is too large to ever be sent (W goes instead)."""
        self.version += 1
        size = delta_nbytes(update)
        self.history[self.version] = (delta_record(update) if size < self._full_nbytes() else None, size)
        self.history.pop(self.version - self.history_size, None)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        self.skips.begin_round(server_round)
        replies = list(replies)
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in self._round_messages}
        for node in sorted(set(dst.values()) - {dst.get(m.metadata.reply_to_message_id) for m in replies}):
            self.sent.pop(node, None)  # no reply: unknown whether it applied the update
            self.skips.skip(server_round, node, "no reply within the round timeout; dropped")
        for m in replies:  # an error the SuperLink sends for an unavailable node names itself as the source
            if m.has_error():
                self.sent.pop(dst.get(m.metadata.reply_to_message_id), None)
        kept = self._screen(server_round, replies)
        far = self.skips.drop_outliers(server_round, {m.metadata.src_node_id: delta_norm(d) for m, d in kept}, self.max_update_ratio, "delta norm")
        kept = [(m, d) for m, d in kept if m.metadata.src_node_id not in far]
        self._record(server_round, kept)
        self.skips.accepted(len(kept))
        self.skips.end_round(server_round)  # no usable reply: the run fails (or, if allowed, W stays as it is)
        if not kept:
            return None, None
        examples = [float(m.content.metric_records["metrics"]["num-examples"]) for m, _ in kept]
        weights = examples if self.weighted else None
        deltas = [d for _, d in kept]
        robust = self.aggregation != "mean"
        self._advance(merge_robust(self.W, deltas, self.aggregation, self.trim, self.r) if robust else merge(self.W, deltas, weights, r=self.r))
        losses = [float(m.content.metric_records["metrics"]["train-loss"]) for m, _ in kept]
        metrics = MetricRecord({
            "train-loss": sum(loss * n for loss, n in zip(losses, examples)) / sum(examples),
            "num-merged": len(kept), "version": self.version,
        })
        return ArrayRecord(self.W), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # evaluation is server-side (evaluate_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(INFO, "\t├── %s: head rank r=%s, %s mean, %d mergeable tensors", type(self).__name__, self.r,
            "example-weighted" if self.weighted else "plain", len(self.W))

    # --- checkpoint (server resume) --------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """The fp32 master ``W`` and its version, at the end of a round (``fedcola.fl.checkpoint``). The
        per-node bookkeeping (``sent``, ``history``) is not kept: a resumed run's nodes are unknown to
        it, so each gets one full sync of ``W`` (bit-identical to the ``W`` its restored state holds)."""
        return self.W, {"version": self.version}

    def load_state(self, server_round: int, tensors: dict[str, Tensor], state: dict) -> ArrayRecord:
        """Continue after ``server_round`` from :meth:`state_dict`'s output; returns ``W`` as ``start``'s
        ``initial_arrays``. """
        self.W = {k: v.float() for k, v in tensors.items()}
        self.version, self.round_offset = int(state["version"]), server_round
        return ArrayRecord(self.W)
