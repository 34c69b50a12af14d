"""LTE on Flower, client side (Huh et al., arXiv 2402.16828): ``LTEClient`` (the ``train.lte`` message
handler) and the wire format of deltas and merged updates that client and server share.

Use it in your own ClientApp with your own model (its architecture: ``W`` arrives from the server)
and data::

    def make_client(context):
        pid = context.node_config["partition-id"]
        return LTEClient(build_my_model(), my_batches(pid), client_id=pid)

    app = ClientApp()
    register(app, make_client)        # answers train.lte

``train`` is an iterable of batches (cycled; round k's T batches continue where round k - 1 stopped
reading), or a callable ``(round, count) -> count batches``. A client keeps its copy of the main
weights ``W``, its LoRA head ``(A, B)``, the snapshot ``(A~, B~)``, its optimizer state and the run's
``LTESpec`` in ``context.state``, so they survive between messages on a SuperNode and across the
virtual clients that share a Ray actor in simulation.

Server -> client (``strategies.lte``), records of the message content:

- ``lte``: ``version`` (of the server's ``W`` after this message is applied) and ``base``: ``-1``
  for a full sync (``weights`` = every mergeable ``W``, ``frozen`` = the frozen non-LoRA parameters,
  ``lte.spec`` = the run's ``LTESpec``), else the version the client must hold, followed by the merged
  updates ``update.<v>`` for ``v = base + 1 .. version`` (low-rank factors, dense where smaller), applied in order.

Client -> server: ``arrays`` = its delta ``s (B A - B~ A~)`` per mergeable weight (:func:`delta_record`)
and ``metrics`` (the ledger's fields plus ``base-version``, the version it trained against).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedcola import train as training
from fedcola.fl.batches import TrainData, held, num_examples, round_batches
from fedcola.green.select import train_under_budget
from fedcola.lte.heads import apply_merged_update, head_delta, head_parameters, reset_heads, set_base_weights
from fedcola.lte.merge import Delta, InvalidDeltaError
from fedcola.lte.spec import LTESpec

STATE_MODEL, STATE_OPTIMIZER, STATE_META, STATE_SPEC = "lte.model", "lte.optimizer", "lte.meta", "lte.spec"
FACTOR_SUFFIXES = ("@U", "@V")


# --- wire format of deltas and merged updates ------------------------------------------------


def delta_record(delta: dict[str, Delta]) -> ArrayRecord:
    """``key@U`` / ``key@V`` for low-rank factors, ``key`` for a dense entry."""
    arrays: dict[str, torch.Tensor] = {}
    for key, entry in delta.items():
        if isinstance(entry, tuple):
            arrays |= {key + s: t.contiguous() for s, t in zip(FACTOR_SUFFIXES, entry)}
        else:
            arrays[key] = entry.contiguous()
    return ArrayRecord(arrays)


def record_delta(record: ArrayRecord) -> dict[str, Delta]:
    """Inverse of :func:`delta_record`; a lone factor is an :class:`InvalidDeltaError`."""
    tensors = record.to_torch_state_dict()
    delta: dict[str, Delta] = {}
    for name, t in tensors.items():
        if name.endswith(FACTOR_SUFFIXES[1]):
            continue
        if name.endswith(FACTOR_SUFFIXES[0]):
            key = name[: -len(FACTOR_SUFFIXES[0])]
            if key + FACTOR_SUFFIXES[1] not in tensors:
                raise InvalidDeltaError(f"{key}: factor U without V")
            delta[key] = (t, tensors[key + FACTOR_SUFFIXES[1]])
        else:
            delta[name] = t
    lone = [n for n in tensors if n.endswith(FACTOR_SUFFIXES[1]) and n[: -len(FACTOR_SUFFIXES[1])] not in delta]
    if lone:
        raise InvalidDeltaError(f"{lone[0]}: factor V without U")
    return delta


def update_records(content: RecordDict) -> list[ArrayRecord]:
    """The merged updates of a server message, in version order."""
    names = [n for n in content.array_records if n.startswith("update.")]
    return [content.array_records[n] for n in sorted(names, key=lambda n: int(n.split(".", 1)[1]))]


# --- client state in context.state -------------------------------------------------------------


def save_state(state: RecordDict, model: nn.Module, optimizer: torch.optim.Optimizer, version: int, rounds: int) -> None:
    """Model (``W``, heads, snapshot, frozen parameters), optimizer state flattened to
    ``"<param index>.<name>"`` tensors, and the version of ``W`` the client holds."""
    state[STATE_MODEL] = ArrayRecord({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    state[STATE_OPTIMIZER] = training.optimizer_record(optimizer)
    state[STATE_META] = ConfigRecord({"version": version, "rounds": rounds})


def restore_model(state: RecordDict, model: nn.Module) -> tuple[int, int] | None:
    """Load the saved model into ``model``; returns ``(version, rounds)``, or None on first contact."""
    if STATE_META not in state:
        return None
    model.load_state_dict(state[STATE_MODEL].to_torch_state_dict())
    meta = state[STATE_META]
    return int(meta["version"]), int(meta["rounds"])


def sync_model(content: RecordDict, context: Context, model: nn.Module, seed: int) -> tuple[int, int]:
    """Load the client's state into ``model`` (first contact: fresh heads seeded by ``seed``) and bring
    its ``W`` to the server's version; returns ``(version, rounds trained)``."""
    sync = content.config_records["lte"]
    version, base = int(sync["version"]), int(sync["base"])
    held = restore_model(context.state, model)
    if held is None:
        reset_heads(model, seed)  # what attach_heads(seed=seed) draws: the same layers in the same order
    if base < 0:
        unexpected = model.load_state_dict(content.array_records["frozen"].to_torch_state_dict(), strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"server sent unknown frozen parameters {unexpected[:3]}")
        set_base_weights(model, content.array_records["weights"].to_torch_state_dict())
    elif held is None or held[0] != base:
        raise ValueError(f"client holds W version {None if held is None else held[0]}, the update starts at {base}: needs a full sync")
    else:
        for record in update_records(content):
            apply_merged_update(model, record_delta(record))
    return version, 0 if held is None else held[1]


# --- the client ----------------------------------------------------------------------------------


class LTEClient:
    """One LTE client: ``model`` (the run's architecture, heads attached here from the server's spec
    when it has none), its training batches, its ``client_id`` (partition id: seeds its head), its
    FLOPs budget ``green_rho`` (GreenTrainer, < 1 on weak devices) and straggler ``slowdown``."""

    def __init__(self, model: nn.Module, train: TrainData, client_id: int, *, examples: int | None = None,
                 green_rho: float = 1.0, slowdown: float = 1.0) -> None:
        self.model, self.data, self.client_id = model, held(train), int(client_id)
        self.num_examples = num_examples(self.data, examples)
        self.green_rho, self.slowdown = green_rho, slowdown

    def train(self, msg: Message, context: Context) -> Message:
        """One LTE round: sync ``W``, train the head T steps, reply with the delta's factors and the round's
        costs. Under a FLOPs budget (``green_rho`` < 1) GreenTrainer selects the head tensors it trains
        (``green.train_under_budget``, re-selected every round) and only the weights it trained travel.
        A straggler sleeps ``(slowdown - 1)`` x the round's work (sync, T steps, saving)."""
        t0 = time.perf_counter()
        if STATE_SPEC in msg.content.config_records:
            context.state[STATE_SPEC] = msg.content.config_records[STATE_SPEC]
        if STATE_SPEC not in context.state.config_records:
            raise ValueError("this LTE client has no state and the message is no full sync: it needs the server's spec")
        spec = LTESpec.from_record(context.state.config_records[STATE_SPEC])
        model = spec.attach(self.model)
        version, rounds = sync_model(msg.content, context, model, spec.head_seed(self.client_id))
        optimizer = spec.optimizer.build(head_parameters(model))
        if STATE_OPTIMIZER in context.state:
            training.load_optimizer_record(optimizer, context.state[STATE_OPTIMIZER])
        if spec.reset and rounds > 0:
            reset_heads(model, spec.head_seed(self.client_id, version), optimizer)
        batches = round_batches(self.data, rounds, spec.local_steps)
        stats, selection = train_under_budget(model, batches, spec.local_steps, optimizer, self.green_rho)
        save_state(context.state, model, optimizer, version, rounds + 1)
        time.sleep((self.slowdown - 1.0) * (time.perf_counter() - t0))
        metrics = MetricRecord({
            "num-examples": self.num_examples, "train-loss": float(stats.loss), "flops": int(stats.flops),
            "peak-memory-bytes": training.peak_memory_bytes(), "wall-time-s": time.perf_counter() - t0,
            "partition-id": self.client_id, "base-version": version, "green-rho": self.green_rho,
            **training.accelerator_metrics(next(model.parameters()).device),
        })
        delta = head_delta(model, None if selection is None else selection.names)  # untrained heads: no delta
        return Message(RecordDict({"arrays": delta_record(delta), "metrics": metrics}), reply_to=msg)


def register(app: ClientApp, make_client: Callable[[Context], LTEClient]) -> None:
    """Register LTE's handler (``train.lte``) on ``app``; ``make_client(context)`` builds the node's client."""

    @app.train("lte")
    def lte_train(msg: Message, context: Context) -> Message:
        return make_client(context).train(msg, context)
