"""LTE on Flower, client side (Huh et al., arXiv 2402.16828): the ``train.lte`` message handler and
what client and server share (options, model, data, the wire format of deltas, evaluation).

A client keeps its copy of the main weights ``W``, its LoRA head ``(A, B)``, the snapshot
``(A~, B~)`` and its optimizer state in ``context.state`` (ArrayRecords + one ConfigRecord), so they
survive between messages on a SuperNode and across the virtual clients that share a Ray actor in
simulation. The process builds the run's model once (:func:`cached_model`) and loads a client's
state into it for each message; nothing per-client lives in this module between messages.

``lte.full-rank = true`` turns the same machinery into the FedAvg full-rank baseline: no heads,
every parameter trained and its change averaged at merge (all parameters are replicas, so the
merge is FedAvg's weight average ``W <- mean_n W_n`` when every client starts from ``W``).

Server -> client (``strategies.lte``), records of the message content:

- ``config``: the run config plus ``server-round``;
- ``lte``: ``version`` (of the server's ``W`` after this message is applied) and ``base``: ``-1``
  for a full sync (``weights`` = every mergeable ``W``, ``frozen`` = the frozen non-LoRA parameters),
  else the version the client must hold, followed by the merged updates ``update.<v>`` for
  ``v = base + 1 .. version`` (low-rank factors, dense where smaller), applied in order.

Client -> server: ``arrays`` = its delta ``s (B A - B~ A~)`` per mergeable weight (:func:`delta_record`)
and ``metrics`` (the ledger's fields plus ``base-version``, the version it trained against).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from fedcola import models, runtime, train
from fedcola.config import names
from fedcola.green.select import train_under_budget
from fedcola.lte.heads import (
    Delta,
    InvalidDeltaError,
    apply_merged_update,
    attach_heads,
    base_weights,
    head_delta,
    head_parameters,
    reset_heads,
    set_base_weights,
)

STATE_MODEL, STATE_OPTIMIZER, STATE_META = "lte.model", "lte.optimizer", "lte.meta"
FACTOR_SUFFIXES = ("@U", "@V")


@dataclasses.dataclass(frozen=True)
class LTEOptions:
    """LTE settings of a run (the config keys are listed in :func:`lte_options`)."""

    r: int
    alpha: float
    targets: tuple[str, ...] | None
    non_lora: str
    reset: bool
    weighted: bool
    asynchronous: bool
    staleness_exponent: float
    max_staleness: int
    async_mix: float
    full_rank: bool
    spec: models.ScratchSpec


def lte_options(config: dict) -> LTEOptions:
    """LTE settings from the run config (defaults in ``fedcola.config``: the reference code's ``LTEConfig``)."""
    targets = tuple(names(config, "lte.targets"))
    return LTEOptions(
        r=config["lte.r"], alpha=config["lte.alpha"], targets=targets or None, non_lora=config["lte.non-lora"],
        reset=config["lte.reset"], weighted=config["lte.weighted"], asynchronous=config["lte.async"],
        staleness_exponent=config["lte.staleness-exponent"], max_staleness=config["lte.max-staleness"], async_mix=config["lte.async-mix"],
        full_rank=config["lte.full-rank"],
        spec=models.ScratchSpec(hidden=config["scratch.hidden"], layers=config["scratch.layers"], heads=config["scratch.heads"], patch_size=config["scratch.patch-size"]),
    )


# --- model and data (client and server) -------------------------------------------------------


def build_model(config: dict, head_seed: int) -> nn.Module:
    """The run's model (seeded by ``seed``, so every process builds the same ``W``) with LTE heads
    seeded by ``head_seed`` (a distinct subspace per client); with ``lte.full-rank`` no heads and
    every parameter a replica (trained, averaged at merge)."""
    opts = lte_options(config)
    spec = opts.spec
    if config["task"] == "image-classification":
        channels, height, _ = np.shape(runtime.dataset_splits(config)["train"][0]["pixel_values"])
        spec = dataclasses.replace(spec, image_size=height, channels=channels)
    else:
        spec = dataclasses.replace(spec, vocab_size=len(runtime.tokenizer(config)), max_len=config["data.max-length"])
    torch.manual_seed(config["seed"])
    model = models.load_model(config["model"], config["task"], num_labels=runtime.num_labels(config), spec=spec)
    if opts.full_rank:
        return attach_heads(model, targets=(), non_lora="replicated")
    return attach_heads(model, r=opts.r, alpha=opts.alpha, seed=head_seed, targets=opts.targets, non_lora=opts.non_lora)


@functools.lru_cache(maxsize=2)
def _cached_model(frozen_items: tuple) -> nn.Module:
    return build_model(dict(frozen_items), head_seed=0)


def cached_model(config: dict) -> nn.Module:
    """One model per process and run config (``server-round`` aside): each message loads a client's
    whole state into it (:func:`sync_model`), so it is built once, not per message."""
    return _cached_model(tuple(sorted((k, v) for k, v in config.items() if k != "server-round")))


def frozen_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Non-LoRA parameters that never change (``lte.non-lora = "frozen"``): sent once per full sync."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def initial_arrays(config: dict) -> tuple[ArrayRecord, ArrayRecord]:
    """Server start: the fp32 mergeable weights ``W`` and the frozen parameters."""
    model = build_model(config, head_seed=0)
    return ArrayRecord(base_weights(model)), ArrayRecord(frozen_parameters(model))


def make_evaluator(config: dict) -> Callable[[ArrayRecord], dict[str, float]]:
    """Server-side evaluation of ``W`` on (a prefix of) the validation split (``eval.max-examples``)."""
    model = build_model(config, head_seed=0)
    val_loader = runtime.validation_loader(config)

    def evaluate(weights: ArrayRecord) -> dict[str, float]:
        set_base_weights(model, weights.to_torch_state_dict())
        return {k: float(v) for k, v in train.evaluate(model, val_loader, config["task"]).items()}

    return evaluate


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
    state[STATE_OPTIMIZER] = train.optimizer_record(optimizer)
    state[STATE_META] = ConfigRecord({"version": version, "rounds": rounds})


def restore_model(state: RecordDict, model: nn.Module) -> tuple[int, int] | None:
    """Load the saved model into ``model``; returns ``(version, rounds)``, or None on first contact."""
    if STATE_META not in state:
        return None
    model.load_state_dict(state[STATE_MODEL].to_torch_state_dict())
    meta = state[STATE_META]
    return int(meta["version"]), int(meta["rounds"])


# --- the handler ---------------------------------------------------------------------------------


def head_seed(config: dict, partition_id: int, version: int = 0) -> int:
    """Seed of a client's head: distinct per client (and per version for the reset variant)."""
    return config["seed"] * 1_000_003 + partition_id * 10_007 + version


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


def slowdowns(config: dict) -> dict[int, float]:
    """``lte.slowdown`` (``"partition:factor,..."``) as a map; one-line ValueError if malformed."""
    factors = {}
    for item in names(config, "lte.slowdown"):
        pid, _, text = item.partition(":")
        try:
            partition, factor = int(pid), float(text)
        except ValueError:
            partition, factor = -1, float("nan")
        if not factor >= 1.0:
            raise ValueError(f"lte.slowdown expects 'partition:factor' items with factor >= 1, got {item!r}")
        factors[partition] = factor
    return factors


def slowdown(config: dict, node: runtime.NodeOptions) -> float:
    """The client's straggler factor: its node config's ``slowdown``, else its entry in ``lte.slowdown``
    (for simulations, where nodes have no node config of their own)."""
    return node.slowdown if node.slowdown != 1.0 else slowdowns(config).get(node.partition_id, 1.0)


def lte_train(msg: Message, context: Context, config: dict) -> Message:
    """One LTE round on a client: sync ``W``, train the head ``local-steps`` steps on the partition,
    reply with the delta's factors and the round's costs. Under a FLOPs budget (node config
    ``green-rho`` < 1) GreenTrainer selects the head tensors it trains (``green.train_under_budget``,
    re-selected every round; FLOPs include the selection's) and only the weights it trained travel
    (``lte.head_delta(model, trained)``; the server averages each weight over the clients that sent it). A straggler (:func:`slowdown` > 1) sleeps
    ``(slowdown - 1)`` x the round's work (sync, T steps, saving), so that work takes ``slowdown`` x
    as long; the process's one-time start-up (model build, data load) is not slowed, as it is no part
    of a device's per-round speed."""
    t0 = time.perf_counter()
    opts = lte_options(config)
    node = runtime.node_options(context)
    factor = slowdown(config, node)
    model = cached_model(config)
    part = runtime.client_split(config, node.partition_id, node.num_partitions)
    t_work = time.perf_counter()
    version, rounds = sync_model(msg.content, context, model, head_seed(config, node.partition_id))
    optimizer = train.make_optimizer(config["optimizer"], head_parameters(model), config["lr"], config["weight-decay"])
    if STATE_OPTIMIZER in context.state:
        train.load_optimizer_record(optimizer, context.state[STATE_OPTIMIZER])
    if opts.reset and rounds > 0:
        reset_heads(model, head_seed(config, node.partition_id, version), optimizer)
    batches = train.cycle(runtime.loader(config, part, shuffle=True, seed=runtime.round_seed(config, rounds, node.partition_id)))
    stats, selection = train_under_budget(model, batches, config["local-steps"], optimizer, node.green_rho)
    save_state(context.state, model, optimizer, version, rounds + 1)
    time.sleep((factor - 1.0) * (time.perf_counter() - t_work))
    metrics = MetricRecord({
        "num-examples": len(part), "train-loss": float(stats.loss), "flops": int(stats.flops),
        "peak-memory-bytes": train.peak_memory_bytes(), "wall-time-s": time.perf_counter() - t0,
        "partition-id": node.partition_id, "base-version": version, "green-rho": node.green_rho,
    })
    delta = head_delta(model, None if selection is None else selection.names)  # untrained heads: no delta
    return Message(RecordDict({"arrays": delta_record(delta), "metrics": metrics}), reply_to=msg)
