"""Shared test assets and drivers: a tiny local BERT + CSV dataset, fedcola's own ColA client answering in
process, fake Grids, and one ColA interval run the way ``ColA.start`` runs it.

Fixtures built on these live in ``tests/conftest.py`` (``task_identity``, ``tiny_assets``, ``cola_config``)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from fedcola import config as cfg
from fedcola import models, specs
from fedcola.client_app import cola_client
from fedcola.cola.client import SPEC

QUERY, FIT = "query.cola", "train.cola"


def set_task_identity(run_id: int = 1) -> None:
    """Flower stamps every message with the task identity of its process (set by Flower's runtime): the
    identity of a ServerApp of run ``run_id`` (task 1, node 0), for messages built in the test process."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0


# --- tiny local model folder and CSV dataset ------------------------------------------------------------

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["good", "bad", "film", "plot", "great", "dull", "fine", "awful"]


def write_tiny_bert(path: str | Path, *, words: list[str] | None = None, vocab_size: int | None = None, seed: int = 0,
                    hidden_size: int = 16, num_hidden_layers: int = 2, num_attention_heads: int = 2, intermediate_size: int = 32,
                    num_labels: int = 2, **bert_config) -> Path:
    """A tiny random ``BertForSequenceClassification`` saved as a local model folder ``path`` (the real loading
    path of ``models.load_model``); its weights are drawn right after ``torch.manual_seed(seed)``. With
    ``words``, a word-level BERT tokenizer over ``SPECIAL_TOKENS + words`` is saved with it and sets
    ``vocab_size``; other ``BertConfig`` fields (``max_position_embeddings``, ...) pass through."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    if words is not None:
        vocab = SPECIAL_TOKENS + list(words)
        with tempfile.TemporaryDirectory() as tmp:  # the folder holds only what the tokenizer saves
            (Path(tmp) / "vocab.txt").write_text("\n".join(vocab))
            tokenizer = BertTokenizerFast(vocab_file=str(Path(tmp) / "vocab.txt"))
        vocab_size = len(vocab)
    torch.manual_seed(seed)
    bert = BertForSequenceClassification(BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                                                    num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                                                    num_labels=num_labels, **bert_config))
    bert.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def write_tiny_assets(root: str | Path) -> dict[str, Path]:
    """Under ``root``: ``model`` (``write_tiny_bert`` over ``WORDS``: vocab 13, hidden 16, 2 layers, seed 0), the
    run's dataset ``data.csv`` (80 rows of 5 random words, labels 0/1 alternating) and a node's own CSV file
    ``own.csv`` (30 more rows), the rows drawn from ``numpy.random.default_rng(0)`` in that order."""
    root = Path(root)
    model = write_tiny_bert(root / "model", words=WORDS)
    rng = np.random.default_rng(0)
    files = {}
    for name, rows in (("data", 80), ("own", 30)):
        files[name] = root / f"{name}.csv"
        files[name].write_text("\n".join(["text,label"] + [f"{' '.join(rng.choice(WORDS, 5))},{i % 2}" for i in range(rows)]))
    return {"model": model, **files}


def tiny_cola_config(assets: dict[str, Path], overrides: dict | None = None) -> dict:
    """A ColA run config on the tiny assets: 2 clients, batches of 4 rows of <= 16 tokens, interval I = 2, lr 1e-2."""
    return cfg.build({"method": "cola", "model": str(assets["model"]), "dataset": str(assets["data"]), "num-clients": 2,
                      "batch-size": 4, "cola.interval": 2, "data.max-length": 16, "lr": 1e-2} | dict(overrides or {}))


# --- ColA: strategy and in-process clients --------------------------------------------------------------

def cola_strategy(config: dict, ledger=None, num_labels: int = 2):
    """``strategies.ColA`` for a test config, on the config's (tiny) classification model."""
    return specs.cola_strategy(config, models.load_model(config["model"], "classification", num_labels=num_labels), ledger)


def _with_spec(msg: Message, context: Context, config: dict) -> Message:
    """A request a test crafted by hand carries the spec that a server built from ``config`` sends first."""
    if SPEC not in msg.content.config_records and SPEC not in context.state.config_records:
        msg.content.config_records[SPEC] = specs.cola_client_spec(config).to_record()
    return msg


def cola_query(msg: Message, context: Context, config: dict, partition: tuple[int, int]) -> Message:
    return cola_client(config, *partition).query(_with_spec(msg, context, config), context)


def cola_fit(msg: Message, context: Context, config: dict, partition: tuple[int, int]) -> Message:
    return cola_client(config, *partition).train(msg, context)


def adapter_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An adapter ArrayRecord as cloned tensors."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def is_evaluation(msg: Message) -> bool:
    """A ``query.cola`` message of client-side evaluation (its validation split), not of an interval."""
    return msg.metadata.message_type == QUERY and msg.content.config_records["control"].get("split", "train") == "validation"


# --- fake Grids ------------------------------------------------------------------------------------------

class Nodes:
    """A Grid that only says which nodes are connected: the one Grid call a strategy's sampling makes."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


class ColaLoopGrid(Nodes):
    """A Grid answered in process by fedcola's own ColA client handlers, one ``Context`` per node (``contexts``,
    fresh ones by default). By default node n is partition n - 1 of ``num_partitions`` of the test's
    ``config``; with ``client_app`` the ClientApp's handlers answer (``fedcola.client_app``: the run config
    from the message, partition and state dir from the context's node config).

    Records every message sent (``messages``, their types in ``sent``, one list per ``send_and_receive`` call
    in ``calls``) and every reply delivered (``replies``). ``lose(reply) -> True`` loses a reply: the client
    handled the message, the server never hears back; ``drop(message) -> True`` loses a message before
    its client handles it."""

    def __init__(self, nodes, config, num_partitions: int = 2, *, contexts: dict[int, Context] | None = None,
                 client_app: bool = False, lose=None, drop=None):
        super().__init__(nodes)
        self.config, self.num_partitions, self.client_app, self.lose, self.drop = config, num_partitions, client_app, lose, drop
        self.contexts = contexts if contexts is not None else {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}
        self.sent: list[str] = []
        self.messages: list[Message] = []
        self.calls: list[list[Message]] = []
        self.replies: list[Message] = []

    def answer(self, msg: Message) -> Message:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        if self.client_app:
            from fedcola import client_app

            return (client_app.cola_query_handler if kind == QUERY else client_app.cola_train_handler)(msg, self.contexts[node])
        return (cola_query if kind == QUERY else cola_fit)(msg, self.contexts[node], self.config, (node - 1, self.num_partitions))

    def send_and_receive(self, messages, timeout=None):
        messages, replies = list(messages), []
        self.calls.append(messages)
        for m in messages:
            self.sent.append(m.metadata.message_type)
            self.messages.append(m)
            if self.drop is not None and self.drop(m):
                continue
            reply = self.answer(m)
            if self.lose is not None and self.lose(reply):
                continue
            self.replies.append(reply)
            replies.append(reply)
        return replies

    def fit_calls(self) -> list[list[Message]]:
        """The ``train.cola`` messages of each interval (``ColA`` sends an interval's in one call)."""
        return [call for call in self.calls if call and call[0].metadata.message_type == FIT]


# --- ColA intervals, as the strategy runs them -----------------------------------------------------------

@dataclass
class Interval:
    queries: list[Message]  # the query.cola messages of this interval (sampled nodes without batches)
    batches: dict  # the interval's usable batches by node (``ColA.interval_batches``)
    fits: list[Message]  # its train.cola messages
    metrics: MetricRecord | None  # ``aggregate_train``'s metrics (None when the fits were not sent)


def cola_interval(strategy, grid: ColaLoopGrid, config: dict, rnd: int, step: int, *, prefetch: bool = False,
                  send: bool = True, timeout: float = 10.0) -> Interval:
    """Interval ``step`` (0-based) of round ``rnd``, the body of ``ColA.start``'s loop for tests that look
    between intervals: ``interval_batches``, ``begin_interval``, ``configure_fit`` (asking for the next
    interval's batches only with ``prefetch``: without, every interval queries its nodes), the fits sent
    over ``grid``, ``aggregate_train``, ``end_interval``. ``send=False`` stops before the fits go out.
    Tests of whole rounds call ``strategy.start`` itself."""
    record = ConfigRecord(dict(config) | {"server-round": rnd})
    strategy._step = (rnd - 1) * strategy.local_steps + step
    sent = len(grid.messages)
    batches = strategy.interval_batches(rnd, record, grid, timeout)
    queries = [m for m in grid.messages[sent:] if m.metadata.message_type == QUERY]
    strategy.begin_interval(rnd, step)
    fits = strategy.configure_fit(strategy.hidden_pairs(batches), record, grid, strategy._step + 1 if prefetch else None)
    if not send:
        return Interval(queries, batches, fits, None)
    _, metrics = strategy.aggregate_train(rnd, grid.send_and_receive(fits, timeout=timeout))
    strategy.end_interval(rnd, step)
    return Interval(queries, batches, fits, metrics)


@dataclass
class Call:
    args: tuple
    kwargs: dict
    result: Any


def spy(obj, name: str, *, before: Callable | None = None, after: Callable[[Call], None] | None = None) -> list[Call]:
    """Wrap the method ``name`` of the instance ``obj`` (it still runs, e.g. inside ``ColA.start``) and record
    each call; ``before(*args, **kwargs)`` runs before it, ``after(call)`` after it."""
    calls: list[Call] = []
    method = getattr(obj, name)

    def wrapped(*args, **kwargs):
        if before is not None:
            before(*args, **kwargs)
        calls.append(Call(args, kwargs, method(*args, **kwargs)))
        if after is not None:
            after(calls[-1])
        return calls[-1].result

    setattr(obj, name, wrapped)
    return calls


# --- LTE ---------------------------------------------------------------------------------------------------

def lte_initial(config: dict) -> tuple[ArrayRecord, ArrayRecord]:
    """The fp32 mergeable weights ``W`` and the frozen parameters of the config's LTE model (what the server starts from)."""
    from fedcola.lte.heads import base_weights, frozen_parameters

    model = specs.lte_model(config, head_seed=0)
    return ArrayRecord(base_weights(model)), ArrayRecord(frozen_parameters(model))


def lte_strategy(config: dict, ledger=None, asynchronous: bool = False, **kwargs):
    """``strategies.LTE`` (or ``LTEAsync``) on the config's model and spec."""
    from strategies import LTE, LTEAsync

    return (LTEAsync if asynchronous else LTE)(specs.lte_model(config, head_seed=0), specs.lte_spec(config), ledger=ledger, **kwargs)
