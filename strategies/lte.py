"""LTE strategies (LoRA-the-Explorer, Huh et al., arXiv 2402.16828) for Flower's Message API.

:class:`LTE` is the paper's synchronous round: every sampled client trains its own LoRA head for
T steps against the server's ``W`` and replies with its low-rank delta; the server merges
``W <- W + mean_n delta_n`` (fp32 master, ``fedcola.lte.heads.merge``) and next round sends each client
the merged update as factors (dense where smaller) so it can advance its own ``W``.

:class:`LTEAsync` merges each delta as it arrives, discounted by staleness
``(1 + staleness) ** -a`` (``fedcola.lte.heads.merge_async``), and re-dispatches that client at once with
the *accumulated* merged updates since the version it trained against (the same factors every
client receives, applied in order, so its ``W`` stays bit-identical to the server's); when those
would outweigh the dense weights, or are older than the kept history, it gets a full ``W`` instead.

Message layout: ``fedcola.lte.client``. Replies are screened like every fedcola strategy
(``fedcola.fl.screening``): a client error, missing metrics, wrong keys, shapes or rank, or
non-finite values skip that reply with a logged reason and a ledger entry; the run goes on.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from torch import Tensor

from fedcola.fl.ledger import Ledger
from fedcola.lte.heads import Delta, InvalidDeltaError, delta_nbytes, merge, merge_async, staleness_weight, validate_delta
from fedcola.lte.client import delta_record, initial_arrays, lte_options, record_delta, slowdowns
from fedcola.fl.wire import nbytes
from fedcola.fl.screening import screen, skip

MESSAGE_TYPE = "train.lte"
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class LTE(Strategy):
    """Synchronous LTE. ``start(grid, initial_arrays=W, num_rounds, train_config=ConfigRecord(config),
    evaluate_fn=...)`` as any Flower strategy; ``initial_arrays`` holds the mergeable weights
    (``fedcola.lte.heads.base_weights``), ``frozen_arrays`` the frozen non-LoRA parameters sent with
    every full sync. ``r`` (head rank) bounds the accepted factor rank at ``2 r``; ``weighted``
    weights the mean by examples (the paper: plain mean).

    Each round waits up to ``node_wait`` s for ``min_available_nodes`` connected nodes, then goes on
    with those connected (logged, ledger ``nodes_connected``; a node the SuperLink declared offline
    is no longer listed); a sampled node whose reply has not come when ``start``'s ``timeout`` ends
    the round is skipped (logged, ledger ``skipped``) and gets a full sync when it answers again."""

    def __init__(
        self,
        *,
        r: int | None = None,
        frozen_arrays: ArrayRecord | None = None,
        fraction_train: float = 1.0,
        min_available_nodes: int = 1,
        node_wait: float = 60.0,
        weighted: bool = False,
        ledger: Ledger | None = None,
        message_type: str = MESSAGE_TYPE,
    ) -> None:
        self.r = r
        self.frozen = frozen_arrays if frozen_arrays is not None else ArrayRecord()
        self.fraction_train = fraction_train
        self.min_available_nodes = min_available_nodes
        self.node_wait = node_wait
        self.weighted = weighted
        self.ledger = ledger
        self.message_type = message_type
        self.W: dict[str, Tensor] = {}
        self.version = 0
        self.history: dict[int, tuple[ArrayRecord | None, int]] = {}  # version v -> (merged update v-1 -> v, its bytes)
        self.history_size = 1
        self._full: tuple[int, ArrayRecord] | None = None  # (version, W as a record), built once per version
        self.sent: dict[int, tuple[int, int]] = {}  # node -> (version its W holds, bytes sent)
        self._round_messages: list[Message] = []  # this round's, their ids set by the Grid when pushed
        self.round_offset = 0  # a resumed run: Flower's round r is the run's round r + offset (`load_state`)

    # --- sending -------------------------------------------------------------------------------

    def _init_weights(self, arrays: ArrayRecord) -> None:
        if not self.W:
            self.W = {k: v.float() for k, v in arrays.to_torch_state_dict().items()}

    def _full_nbytes(self) -> int:
        return delta_nbytes(self.W) + nbytes(self.frozen)

    def _full_payload(self) -> RecordDict:
        if self._full is None or self._full[0] != self.version:
            self._full = (self.version, ArrayRecord(self.W))
        return RecordDict({"weights": self._full[1], "frozen": self.frozen,
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
        """The reply's validated delta, or why it cannot be merged (client errors: ``{}``, left to ``screen``)."""
        if msg.has_error():
            return {}
        node = msg.metadata.src_node_id
        if node not in self.sent:
            return "reply from a node with no outstanding work"
        if "arrays" not in msg.content.array_records:
            return "reply has no 'arrays' ArrayRecord"
        metrics = msg.content.metric_records.get("metrics", {})
        if "base-version" in metrics and int(metrics["base-version"]) != self.sent[node][0]:
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
            delta = self._delta(msg)
            if isinstance(delta, str):
                skip(server_round, node, delta, self.ledger)
            elif screen(server_round, [msg], None, self.ledger, self.sent.get(node, (0, 0))[1]):
                kept.append((msg, delta))
        return kept

    def _advance(self, update: dict[str, Delta]) -> None:
        """Keep the merged update as a record, unless it is too large to ever be sent (W goes instead)."""
        self.version += 1
        size = delta_nbytes(update)
        self.history[self.version] = (delta_record(update) if size < self._full_nbytes() else None, size)
        self.history.pop(self.version - self.history_size, None)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in self._round_messages}
        for node in sorted(set(dst.values()) - {dst.get(m.metadata.reply_to_message_id) for m in replies}):
            self.sent.pop(node, None)  # no reply: unknown whether it applied the update
            skip(server_round, node, "no reply within the round timeout; dropped", self.ledger)
        for m in replies:  # an error the SuperLink sends for an unavailable node names itself as the source
            if m.has_error():
                self.sent.pop(dst.get(m.metadata.reply_to_message_id), None)
        kept = self._screen(server_round, replies)
        if not kept:
            log(WARNING, "round %d: no usable reply, W unchanged", server_round)
            return None, None
        examples = [float(m.content.metric_records["metrics"]["num-examples"]) for m, _ in kept]
        weights = examples if self.weighted else None
        self._advance(merge(self.W, [d for _, d in kept], weights, r=self.r))
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
        ``initial_arrays``. Synchronous LTE only (``LTEAsync`` loses its messages in flight)."""
        if isinstance(self, LTEAsync):
            raise ValueError("resuming async LTE is not supported")
        self.W = {k: v.float() for k, v in tensors.items()}
        self.version, self.round_offset = int(state["version"]), server_round
        return ArrayRecord(self.W)


class LTEAsync(LTE):
    """Asynchronous LTE: each delta is merged on arrival with weight
    ``mix * (1 + staleness) ** -staleness_exponent``, where staleness is the number of merges since
    the version the client trained against; deltas staler than ``max_staleness`` are dropped (logged,
    ledger ``skipped``). ``mix`` defaults to ``1 / number of nodes`` (a synchronous round's step).

    ``start`` runs ``num_rounds * merges_per_round`` merges (``merges_per_round`` defaults to the
    number of nodes); ``evaluate_fn`` and the ledger round close after every ``merges_per_round``
    merges. ``merge_log`` lists every merge (round, node, partition, base version, staleness, weight).
    A node whose last ``max_failures`` replies were all unusable is not re-dispatched."""

    def __init__(
        self,
        *,
        staleness_exponent: float = 0.5,
        max_staleness: int = 10,
        mix: float | None = None,
        merges_per_round: int | None = None,
        poll_interval: float = 0.1,
        max_failures: int = 3,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.staleness_exponent = staleness_exponent
        self.max_staleness = max_staleness
        self.mix = mix
        self.merges_per_round = merges_per_round
        self.poll_interval = poll_interval
        self.max_failures = max_failures
        self.history_size = max_staleness + 1
        self.merge_log: list[dict[str, float | int]] = []

    def _delta(self, msg: Message) -> dict[str, Delta] | str:
        delta = super()._delta(msg)
        if isinstance(delta, dict) and not msg.has_error():
            staleness = self.version - self.sent[msg.metadata.src_node_id][0]
            if staleness > self.max_staleness:
                return f"delta staleness {staleness} > max_staleness {self.max_staleness}; dropped"
        return delta

    def _merge_reply(self, period: int, msg: Message, mix: float) -> bool:
        """Screen and merge one reply at once; True if it was merged."""
        kept = self._screen(period, [msg])
        if not kept:
            return False
        node, delta = msg.metadata.src_node_id, kept[0][1]
        base = self.sent[node][0]
        staleness = self.version - base
        self._advance(merge_async(self.W, delta, staleness, self.staleness_exponent, self.max_staleness, mix, self.r))
        self.merge_log.append({
            "round": period, "node_id": node, "partition_id": int(msg.content.metric_records["metrics"]["partition-id"]),
            "base_version": base, "version": self.version, "staleness": staleness,
            "weight": mix * staleness_weight(staleness, self.staleness_exponent),
        })
        if self.ledger is not None:
            self.ledger.server(period, merges=[m for m in self.merge_log if m["round"] == period])
        return True

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Push work to every node, pull replies as they come, merge each at once and re-dispatch
        its sender, until ``num_rounds * merges_per_round`` merges (or ``timeout`` s without a reply)."""
        log(INFO, "Starting %s strategy:", type(self).__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self._init_weights(initial_arrays)
        self.summary()
        config = ConfigRecord() if train_config is None else train_config
        result = Result()
        if evaluate_fn is not None and (res := evaluate_fn(0, initial_arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = res
        nodes = self._available_nodes(0, grid)
        self._per_round = self.merges_per_round or len(nodes)
        mix = self.mix if self.mix is not None else 1.0 / len(nodes)
        target, period, merges = num_rounds * self._per_round, 1, 0
        if self.ledger is not None:
            self.ledger.begin_round(period)
        in_flight = set(grid.push_messages([self._message(n, config, period) for n in nodes]))
        last_reply, failures = time.time(), {}
        while merges < target and in_flight:
            replies = list(grid.pull_messages(in_flight))
            if not replies:
                if time.time() - last_reply > timeout:
                    log(WARNING, "no reply for %.0f s: stopping after %d of %d merges", timeout, merges, target)
                    break
                time.sleep(self.poll_interval)
                continue
            last_reply = time.time()
            for msg in replies:
                in_flight.discard(msg.metadata.reply_to_message_id)
                if merges >= target:
                    continue
                node = msg.metadata.src_node_id
                merged = self._merge_reply(period, msg, mix)
                failures[node] = 0 if merged else failures.get(node, 0) + 1
                if merged:
                    merges += 1
                    if merges % self._per_round == 0:
                        result.arrays = ArrayRecord(self.W)
                        if evaluate_fn is not None and (res := evaluate_fn(period, result.arrays)) is not None:
                            result.evaluate_metrics_serverapp[period] = res
                        period += 1
                        if self.ledger is not None and merges < target:
                            self.ledger.begin_round(period)
                if failures[node] >= self.max_failures:
                    log(WARNING, "node %d: %d unusable replies in a row, not re-dispatched", node, failures[node])
                elif merges < target:
                    in_flight.update(grid.push_messages([self._message(node, config, period)]))
        result.arrays = ArrayRecord(self.W)
        log(INFO, "%s: %d merges, W version %d, %d messages still in flight (ignored)", type(self).__name__, merges, self.version, len(in_flight))
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        return result


def make_strategy(config: dict, ledger: Ledger | None = None) -> tuple[LTE, ArrayRecord]:
    """The run's LTE strategy (``lte.async`` picks :class:`LTEAsync`) and its initial ``W``."""
    opts = lte_options(config)
    slowdowns(config)  # a malformed lte.slowdown fails here, not in every client
    weights, frozen = initial_arrays(config)
    common = dict(r=opts.r, frozen_arrays=frozen, fraction_train=config["fraction-train"],
                  min_available_nodes=config["num-clients"], node_wait=config["lte.node-wait-s"], weighted=opts.weighted, ledger=ledger)
    if opts.asynchronous:
        return LTEAsync(staleness_exponent=opts.staleness_exponent, max_staleness=opts.max_staleness,
                        mix=opts.async_mix or None, **common), weights
    return LTE(**common), weights
