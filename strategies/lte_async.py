"""LTEAsync: asynchronous LoRA-the-Explorer (Huh et al., arXiv 2402.16828) on Flower's push / pull Grid API.

Each delta is merged as it arrives, discounted by staleness ``(1 + staleness) ** -a``
(``fedcola.lte.heads.merge_async``), and that client is re-dispatched at once with the *accumulated*
merged updates since the version it trained against (the same factors every client receives, applied
in order, so its ``W`` stays bit-identical to the server's); when those would outweigh the dense
weights, or are older than the kept history, it gets a full ``W`` instead.
"""

from __future__ import annotations

import io
import time
from collections import deque
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from torch import nn

from fedcola.lte.merge import Delta, delta_norm, merge_async, staleness_weight
from fedcola.lte.spec import LTESpec
from strategies.lte import LTE, EvaluateFn


class LTEAsync(LTE):
    """Asynchronous LTE: each delta is merged on arrival with weight
    ``mix * (1 + staleness) ** -staleness_exponent``, where staleness is the number of merges since
    the version the client trained against; deltas staler than ``max_staleness`` are dropped (logged,
    ledger ``skipped``). ``mix`` defaults to ``1 / number of nodes`` (a synchronous round's step).

    ``start`` runs ``num_rounds * merges_per_round`` merges (``merges_per_round`` defaults to the
    number of nodes); ``evaluate_fn`` and the ledger round close after every ``merges_per_round``
    merges. ``merge_log`` lists every merge (round, node, partition, base version, staleness, weight).
    A node whose last ``max_failures`` replies were all unusable is not re-dispatched. One reply at a
    time has no round median: a delta whose norm exceeds ``max_update_ratio`` x the median of the last
    2 x (number of nodes) merged deltas' is skipped (the first merge has no reference)."""

    def __init__(
        self,
        model: nn.Module,
        spec: LTESpec = LTESpec(),
        *,
        staleness_exponent: float = 0.5,
        max_staleness: int = 10,
        mix: float | None = None,
        merges_per_round: int | None = None,
        poll_interval: float = 0.1,
        max_failures: int = 3,
        **kwargs,
    ) -> None:
        super().__init__(model, spec, **kwargs)
        self.staleness_exponent = staleness_exponent
        self.max_staleness = max_staleness
        self.mix = mix
        self.merges_per_round = merges_per_round
        self.poll_interval = poll_interval
        self.max_failures = max_failures
        self.history_size = max_staleness + 1
        self.merge_log: list[dict[str, float | int]] = []
        self.recent_norms: deque[float] = deque()  # the last merged deltas' norms: the bound's reference (`start` sizes it)

    def load_state(self, server_round: int, tensors: dict, state: dict) -> ArrayRecord:
        raise ValueError("resuming async LTE is not supported (its merges depend on the arrival order of messages lost with the server)")

    def _delta(self, msg: Message) -> dict[str, Delta] | str:
        delta = super()._delta(msg)
        if isinstance(delta, dict):
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
        norm = delta_norm(delta)
        if self.skips.drop_beyond(period, node, norm, self.recent_norms, self.max_update_ratio, "delta norm"):
            return False
        self.recent_norms.append(norm)
        self._record(period, kept)
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
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Push work to every node, pull replies as they come, merge each at once and re-dispatch
        its sender, until ``num_rounds * merges_per_round`` merges (or ``timeout`` s without a reply)."""
        log(INFO, "Starting %s strategy:", type(self).__name__)
        initial_arrays = ArrayRecord(self.W) if initial_arrays is None else initial_arrays
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self._init_weights(initial_arrays)
        self.summary()
        config = ConfigRecord() if train_config is None else train_config
        result = Result()
        if evaluate_fn is not None and (res := evaluate_fn(0, initial_arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = res
        nodes = self._available_nodes(0, grid)
        self._per_round = self.merges_per_round or len(nodes)
        self.recent_norms = deque(maxlen=2 * len(nodes))
        mix = self.mix if self.mix is not None else 1.0 / len(nodes)
        target, period, merges = num_rounds * self._per_round, 1, 0
        if self.ledger is not None:
            self.ledger.begin_round(period)
        self.skips.begin_round(period)
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
                    self.skips.accepted(1)
                    if merges % self._per_round == 0:
                        result.arrays = ArrayRecord(self.W)
                        if evaluate_fn is not None and (res := evaluate_fn(period, result.arrays)) is not None:
                            result.evaluate_metrics_serverapp[period] = res
                        period += 1
                        self.skips.begin_round(period)
                        if self.ledger is not None and merges < target:
                            self.ledger.begin_round(period)
                if failures[node] >= self.max_failures:
                    log(WARNING, "node %d: %d unusable replies in a row, not re-dispatched", node, failures[node])
                elif merges < target:
                    in_flight.update(grid.push_messages([self._message(node, config, period)]))
        if merges < target:
            self.skips.end_round(period)  # the last period merged nothing: the run fails (or, if allowed, warns)
        result.arrays = ArrayRecord(self.W)
        log(INFO, "%s: %d merges, W version %d, %d messages still in flight (ignored)", type(self).__name__, merges, self.version, len(in_flight))
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        return result
