"""Reply screening shared by fedcola's strategies: a bad reply is skipped with a logged reason.

Flower's own FedAvg stops the ServerApp on an inconsistent reply; in a federation of edge machines
one broken client must not end everyone's run. A reply is kept only if it carries no error, has the
expected arrays (names, shapes, dtypes) with finite values, and the metrics the ledger needs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from logging import WARNING
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from fedcola.fl.ledger import Ledger
from fedcola.fl.wire import check_arrays, nbytes

T = TypeVar("T")
REQUIRED_METRICS = ("num-examples", "train-loss", "flops", "peak-memory-bytes", "wall-time-s", "partition-id")
MAX_EXAMPLES = 1_000_000  # default cap on a reply's num-examples (its weight in example-weighted means)
COUNTS = ("num-examples",)  # positive integers up to the cap
IDS = ("partition-id", "base-version")  # non-negative integers
AMOUNTS = ("flops", "peak-memory-bytes", "wall-time-s", "rows", "green-rho", "accelerator-peak-bytes")  # non-negative numbers


def metric_problem(metrics: MetricRecord, max_examples: int = MAX_EXAMPLES) -> str | None:
    """Why a reply's metrics cannot be used: every value a finite number, counts positive integers up to
    ``max_examples``, ids non-negative integers, costs non-negative; or None."""
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric {key} is not a finite number: {str(value)[:40]}"
        whole = float(value).is_integer()
        if key in COUNTS and not (whole and 1 <= value <= max_examples):
            return f"metric {key} must be an integer in [1, {max_examples}], got {value}"
        if key in IDS and not (whole and value >= 0):
            return f"metric {key} must be a non-negative integer, got {value}"
        if key in AMOUNTS and value < 0:
            return f"metric {key} must be >= 0, got {value}"
    return None


def reply_problem(msg: Message, expected: ArrayRecord | None, required: tuple[str, ...] = REQUIRED_METRICS,
                  max_examples: int = MAX_EXAMPLES) -> str | None:
    """Why a reply cannot be used, or None."""
    if msg.has_error():
        return f"client error: {msg.error.reason}"
    content = msg.content
    if "metrics" not in content.metric_records:
        return "reply has no 'metrics' MetricRecord"
    missing = [k for k in required if k not in content.metric_records["metrics"]]
    if missing:
        return f"reply metrics lack {', '.join(missing)}"
    problem = metric_problem(content.metric_records["metrics"], max_examples)
    if problem is not None:
        return problem
    if expected is not None:
        if "arrays" not in content.array_records:
            return "reply has no 'arrays' ArrayRecord"
        return check_arrays(content.array_records["arrays"], expected)
    return None


def skip(server_round: int, node: int, problem: str, ledger: Ledger | None) -> None:
    """Log a skipped reply and record it in the ledger."""
    log(WARNING, "round %d: skipping reply from node %d: %s", server_round, node, problem)
    if ledger is not None:
        ledger.skipped(server_round, node, problem)


def screen(server_round: int, replies: Iterable[Message], expected: ArrayRecord | None, ledger: Ledger | None, bytes_down: int,
           skips: Skips | None = None, max_examples: int = MAX_EXAMPLES) -> list[Message]:
    """Keep the usable replies; log and record the others (in ``skips`` when given); record every kept client in the ledger."""
    kept = []
    for msg in replies:
        node = msg.metadata.src_node_id
        problem = reply_problem(msg, expected, max_examples=max_examples)
        if problem is not None:
            if skips is not None:
                skips.skip(server_round, node, problem)
            else:
                skip(server_round, node, problem, ledger)
            continue
        kept.append(msg)
    record_clients(server_round, kept, ledger, bytes_down)
    return kept


def record_clients(server_round: int, kept: Iterable[Message], ledger: Ledger | None, bytes_down: int) -> None:
    """A ledger client record for every kept reply (its metrics, bytes up and ``bytes_down``)."""
    for msg in kept if ledger is not None else ():
        m = msg.content.metric_records["metrics"]
        ledger.client(server_round, {
            "node_id": msg.metadata.src_node_id, "partition_id": int(m["partition-id"]), "num_examples": int(m["num-examples"]),
            "loss": float(m["train-loss"]), "bytes_up": sum(nbytes(a) for a in msg.content.array_records.values()), "bytes_down": bytes_down,
            "flops": int(m["flops"]), "peak_memory_bytes": int(m["peak-memory-bytes"]), "wall_time_s": float(m["wall-time-s"]),
            **({"accelerator_peak_bytes": int(m["accelerator-peak-bytes"])} if "accelerator-peak-bytes" in m else {}),
        })


class NoReplyAccepted(RuntimeError):
    """A round in which no client reply was accepted: the run fails with the round's skip reasons."""


class Skips:
    """Skipped replies of a round (logged, ledger ``skipped``) and the rule that a round in which no
    reply was accepted fails the run, unless ``allow_empty_rounds`` (then a loud warning and the
    ledger's round status ``no-reply-accepted``)."""

    def __init__(self, ledger: Ledger | None, allow_empty_rounds: bool = False) -> None:
        self.ledger, self.allow_empty_rounds = ledger, allow_empty_rounds
        self.reasons: list[str] = []
        self.kept = 0

    def begin_round(self, server_round: int) -> None:
        self.reasons, self.kept = [], 0

    def skip(self, server_round: int, node: int, problem: str) -> None:
        skip(server_round, node, problem, self.ledger)
        self.reasons.append(f"node {node}: {problem}")

    def guard(self, server_round: int, node: int, handle: Callable[[], T]) -> T | None:
        """``handle()`` for one reply; anything it raises is that reply's skip (with the reason), never the run's end."""
        try:
            return handle()
        except Exception as err:  # noqa: BLE001  (a hostile or broken reply must not end everyone's run)
            self.skip(server_round, node, f"{type(err).__name__} while handling the reply: {str(err)[:200]}")
            return None

    def drop_outliers(self, server_round: int, norms: dict[int, float], ratio: float, what: str = "update norm") -> set[int]:
        """Skip (logged, with the figures) the replies whose ``what`` exceeds ``ratio`` x the other
        replies' median (``outliers``); returns their nodes."""
        far = outliers(norms, ratio)
        for node, median in far.items():
            self.skip(server_round, node, f"{what} {norms[node]:.3g} exceeds {ratio:g} x the other replies' median {median:.3g}")
        return set(far)

    def drop_beyond(self, server_round: int, node: int, norm: float, recent: Sequence[float], ratio: float, what: str) -> bool:
        """One reply at a time (async): skip it (logged) if its ``what`` exceeds ``ratio`` x the median of
        the ``recent`` accepted replies' (``beyond``); True if skipped."""
        median = beyond(norm, recent, ratio)
        if median is not None:
            self.skip(server_round, node, f"{what} {norm:.3g} exceeds {ratio:g} x the median {median:.3g} of the last {len(recent)} merged")
        return median is not None

    def accepted(self, count: int) -> None:
        self.kept += count

    def end_round(self, server_round: int) -> None:
        """Fail (or, if allowed, warn loudly) when no reply of the round was accepted."""
        if self.kept:
            return
        reasons = "; ".join(dict.fromkeys(self.reasons)) or "no client replied"
        if not self.allow_empty_rounds:
            raise NoReplyAccepted(f"round {server_round}: no client reply was accepted ({reasons})")
        log(WARNING, "!!! round %d: NO CLIENT REPLY WAS ACCEPTED; the model did not change (%s)", server_round, reasons)
        if self.ledger is not None:
            self.ledger.server(server_round, status="no-reply-accepted")


class Screened:
    """Mixin of fedcola's strategies: the ledger lives in the strategy's ``Skips`` (``self.skips``)."""

    skips: Skips

    @property
    def ledger(self) -> Ledger | None:
        return self.skips.ledger

    @ledger.setter
    def ledger(self, ledger: Ledger | None) -> None:
        self.skips.ledger = ledger


def wait_for_nodes(grid, count: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Wait (up to ``timeout`` s) until ``count`` nodes are connected, as Flower's samplers do; the connected nodes."""
    deadline = time.time() + timeout
    while len(nodes := list(grid.get_node_ids())) < count and time.time() < deadline:
        time.sleep(poll)
    return nodes


def beyond(norm: float, others: Sequence[float], ratio: float) -> float | None:
    """The median of ``others`` if ``norm`` exceeds ``ratio`` x it; None when within, with no ``others``,
    where their median is 0 (they did not move: nothing to judge by), or with ``ratio`` <= 0 (off)."""
    if ratio <= 0 or not others:
        return None
    median = float(np.median(others))
    return median if median > 0 and not norm <= ratio * median else None


def outliers(norms: dict[int, float], ratio: float) -> dict[int, float]:
    """The replies whose update norm exceeds ``ratio`` x the median of the *other* replies' norms (a
    leave-one-out median, so that one attacker among two clients is caught too), with that median."""
    far = {node: beyond(norm, [n for other, n in norms.items() if other != node], ratio) for node, norm in norms.items()}
    return {node: median for node, median in far.items() if median is not None}
