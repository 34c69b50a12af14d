"""Screening of ColA replies: why a client's query or train reply cannot be used, or None.

Query replies (step 2) carry a client's batches (checked against the model: token ids < vocab, labels
< classes, at most ``batch_size`` x ``max_length``) and, at first contact, its auxiliary models
(checked against the strategy's template: names, shapes, dtypes, finite, and a norm bound). Train replies (step 6) carry
the updated auxiliary models (merged mode: their change in the upload dtype) and may carry the next interval's batches. Every reply names its adapter
id, which is bound to the node at first contact (``AdapterBook.check_owner``).
"""

from __future__ import annotations

import math
from flwr.app import Message

from fedcola.cola import records
from fedcola.fl import wire
from fedcola.fl.screening import reply_problem

FIT_METRICS = ("rows", "flops", "peak-memory-bytes", "wall-time-s", "partition-id")


def version_problem(msg: Message) -> str | None:
    """A merged-mode reply carrying auxiliary models or their change names the client's version after it
    (``ColaClient.sync``): an integer >= 0."""
    version = msg.content.metric_records["metrics"].get("version")
    return None if isinstance(version, int) and version >= 0 else f"reply's version must be an integer >= 0, got {version!r}"


class ReplyCheck:
    """The checks of one ColA strategy, reading its state: the adapter book, batch bounds, the
    interval's layers, skips (``strategies.cola.ColA``: the method packages never import strategies)."""

    def __init__(self, strategy) -> None:
        self.s = strategy

    def batches(self, msg: Message, evaluation: bool) -> str | None:
        """Why a reply's ``batch`` record is unusable: I training batches, or local validation batches
        holding at most ``eval_examples`` examples (``evaluation``)."""
        s = self.s
        max_batches = math.ceil(s.eval_examples / s.batch_size) if evaluation else s.spec.interval
        if "batch" not in msg.content.array_records:
            return "reply has no 'batch' ArrayRecord"
        if "num-examples" not in msg.content.metric_records["metrics"]:
            return "a reply with batches lacks the num-examples metric"
        record = msg.content.array_records["batch"]
        problem = records.check_batches(record, max_batches, s.batch_size, s.vocab_size, s.num_labels, s.max_length)
        if problem is None and not evaluation and records.batch_count(record) != max_batches:
            problem = f"reply has {records.batch_count(record)} batches, the interval needs {max_batches}"
        return problem

    def query(self, msg: Message, node: int, evaluation: bool, connected: set[int]) -> str | None:
        """A query reply: batches, the adapter id's owner, and the auxiliary models on first contact.
        A good reply binds its adapter id to the node (``AdapterBook.own``)."""
        book = self.s.book
        problem = reply_problem(msg, None, required=("num-examples", "partition-id"), max_examples=self.s.max_examples)
        if problem is None:
            problem = book.check_owner(node, int(msg.content.metric_records["metrics"]["partition-id"]), connected)
        if problem is None:
            problem = self.batches(msg, evaluation)
        if problem is None and node not in book.known:
            if "adapter" not in msg.content.array_records:
                problem = "first query reply lacks the client's auxiliary models"
            elif book.changes is not None:
                problem = version_problem(msg)
            if problem is None:
                problem = wire.check_arrays(msg.content.array_records["adapter"], book.template)
                problem = problem or book.first_contact_problem(node, msg.content.array_records["adapter"], self.s.max_update_ratio)
        elif problem is None and "adapter" in msg.content.array_records:
            problem = "reply carries auxiliary models the server did not ask for"
        if problem is None:
            book.own(node, int(msg.content.metric_records["metrics"]["partition-id"]))
        return problem

    def train(self, msg: Message, node: int, connected: set[int], prefetching: bool) -> str | None:
        """A train reply: the updated auxiliary models, the owner, and batches only when asked for."""
        book = self.s.book
        problem = reply_problem(msg, None, required=FIT_METRICS, max_examples=self.s.max_examples)
        if problem is None and book.changes is not None:
            problem = version_problem(msg)
        if problem is None:
            adapter = msg.content.array_records.get("adapter")
            problem = "reply has no 'adapter' ArrayRecord" if adapter is None else book.reply_problem(adapter)
        if problem is None:
            problem = book.check_owner(node, int(msg.content.metric_records["metrics"]["partition-id"]), connected)
        if problem is None and "batch" in msg.content.array_records:
            problem = self.batches(msg, evaluation=False) if prefetching else "reply carries batches nobody asked for"
        return problem

    def train_replies(self, server_round: int, replies) -> dict[int, Message]:
        """The usable train replies by node: screened one by one (``train``, Green-ColA's ``importance``;
        whatever raises is a skip), then a change whose norm exceeds ``max_update_ratio`` x the other
        replies' median is skipped (``Skips.drop_outliers``)."""
        s = self.s
        usable = {msg.metadata.src_node_id: msg for msg in replies
                  if s.skips.guard(server_round, msg.metadata.src_node_id, lambda: self._usable(server_round, msg))}
        norms = {n: s.book.change_norm(n, m.content.array_records["adapter"]) for n, m in usable.items()}
        for node in s.skips.drop_outliers(server_round, norms, s.max_update_ratio, "auxiliary model change"):
            del usable[node]
            if s.green is not None:
                s.green.reports.pop(node, None)
        return usable

    def _usable(self, server_round: int, msg: Message) -> bool:
        s, node = self.s, msg.metadata.src_node_id
        problem = self.train(msg, node, s._connected, s._prefetch_step >= 0)
        if problem is None and s.green is not None:
            problem = self.importance(msg, node, s._layers or tuple(s.dims), s.green.reports)
        if problem is not None:
            s.skips.skip(server_round, node, problem)
        return problem is None

    def importance(self, msg: Message, node: int, layers: tuple[str, ...], reports: dict[int, dict[str, float]]) -> str | None:
        """Keep a train reply's per-layer importance in ``reports`` (Green-ColA: a record naming each
        trained layer with one finite value), or say why it is unusable."""
        values = dict(msg.content.config_records.get("importance", {}))
        if set(values) != set(layers) or not all(isinstance(v, float) and math.isfinite(v) for v in values.values()):
            return f"importance record must name the {len(layers)} trained layers with one finite value each"
        reports[node] = values
        return None
