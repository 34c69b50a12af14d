"""The run config as the library's typed objects: the one edge between TOML / ``--set`` / Flower's run
config and the strategies and clients, which take explicit arguments and the model object.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors.torch import load_file
from torch import nn

from fedcola import models, runtime, train
from fedcola.cola import records
from fedcola.cola.adapters import Adapter, find_targets, layer_dims as module_dims
from fedcola.cola.spec import AdapterSpec, ClientSpec, sends_changes
from fedcola.config import names
from fedcola.fl.ledger import Ledger
from fedcola.green.cola import GreenColA
from fedcola.lte.heads import set_base_weights
from fedcola.lte.spec import LTESpec
from fedcola.train import OptimizerSpec


def cola_targets(config: dict) -> list[str]:
    return names(config, "cola.targets")


def adapter_spec(config: dict) -> AdapterSpec:
    return AdapterSpec(config["cola.adapter"], config["lora.r"], float(config["lora.alpha"]), config["cola.mlp-hidden"])


def optimizer_spec(config: dict) -> OptimizerSpec:
    return OptimizerSpec(config["optimizer"], config["lr"], config["weight-decay"])


@functools.lru_cache(maxsize=4)
def _layer_dims(model: str, task: str, num_labels: int | None, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    found = find_targets(models.skeleton(model, task, num_labels), list(targets))
    return {name: module_dims(m) for name, m in found.items()}


def layer_dims(config: dict) -> dict[str, tuple[int, int]]:
    """{adapted layer: (d_in, d_out)} of the config's model, read from its architecture only (meta device)."""
    return _layer_dims(config["model"], config["task"], runtime.num_labels(config), tuple(cola_targets(config)))


def build_adapters(config: dict, seed: int) -> dict[str, Adapter]:
    """One client's auxiliary models for the config's model."""
    return adapter_spec(config).build(layer_dims(config), seed)


def load_adapters(path: Path, config: dict) -> dict[int | str, dict[str, Adapter]]:
    """Inverse of ``records.save_adapters`` (keys back as ints; ``"mean"`` stays a string)."""
    weights = load_file(str(path))
    out = {}
    for key in sorted({k.split("/", 1)[0] for k in weights}):
        adapters = build_adapters(config, seed=0)
        prefix = f"{key}/"
        records.load_adapter_record(adapters, ArrayRecord({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}))
        out[int(key) if key.isdigit() else key] = adapters
    return out


def cola_client_spec(config: dict) -> ClientSpec:
    """The client spec a ColA strategy built from ``config`` sends (for tests and tools without a server)."""
    adapter = adapter_spec(config)
    return ClientSpec(layer_dims(config), adapter, optimizer_spec(config), config["cola.interval"], config["cola.wire-dtype"],
                      config["seed"], sends_changes=sends_changes(config["cola.mode"]), upload_dtype=config["cola.upload-dtype"])


def cola_strategy(config: dict, model: nn.Module | None = None, ledger: Ledger | None = None):
    """``strategies.ColA`` for the run config (``model``: the run's base model, built when not given)."""
    from strategies.cola import ColA

    if model is None:  # the run's base model, on the server's device and in its dtype
        model = runtime.base_model(config).to(runtime.device(config, "server"), train.DTYPES[config["server.dtype"]])
    return ColA(
        model, cola_targets(config), adapter=adapter_spec(config), mode=config["cola.mode"],
        optimizer=optimizer_spec(config), interval=config["cola.interval"], local_steps=config["local-steps"],
        fraction_train=config["fraction-train"], min_nodes=config["num-clients"], batch_size=config["batch-size"],
        max_length=config["data.max-length"], eval_examples=config["eval.client-max-examples"], wire_dtype=config["cola.wire-dtype"], wire=config["cola.wire"],
        upload_dtype=config["cola.upload-dtype"],
        share_inputs=config["cola.share-inputs"],
        weighting=config["cola.weighting"], seed=config["seed"], green=GreenColA(config["cola.green-rho"], config["cola.green-every"]),
        max_examples=config["max-examples"], max_update_ratio=config["max-update-ratio"], allow_empty_rounds=config["allow-empty-rounds"],
        identity=config["cola.identity"], offload_pairs=config["server.offload-pairs"], recompute=config["server.recompute"], ledger=ledger,
    )


# --- LTE ---------------------------------------------------------------------------------------------


def lte_spec(config: dict) -> LTESpec:
    """LTE's settings from the run config (defaults in ``fedcola.config``: the reference code's ``LTEConfig``)."""
    return LTESpec(r=config["lte.r"], alpha=config["lte.alpha"], targets=tuple(names(config, "lte.targets")) or None,
                   non_lora=config["lte.non-lora"], reset=config["lte.reset"], full_rank=config["lte.full-rank"], seed=config["seed"],
                   optimizer=optimizer_spec(config), local_steps=config["local-steps"])


def lte_model(config: dict, head_seed: int, vocab_size: int | None = None) -> nn.Module:
    """The run's from-scratch model (seeded by ``seed``, so every process builds the same ``W``) with LTE
    heads seeded by ``head_seed``; with ``lte.full-rank`` no heads and every parameter a replica. A text
    model's ``vocab_size`` is its tokenizer's (given by a client that has its split tokenised already)."""
    spec = models.ScratchSpec(hidden=config["scratch.hidden"], layers=config["scratch.layers"], heads=config["scratch.heads"],
                              patch_size=config["scratch.patch-size"])
    if config["task"] == "image-classification":
        channels, height, _ = np.shape(runtime.dataset_splits(config)["train"][0]["pixel_values"])
        spec = dataclasses.replace(spec, image_size=height, channels=channels)
    else:
        spec = dataclasses.replace(spec, vocab_size=vocab_size or len(runtime.tokenizer(config)), max_len=config["data.max-length"])
    torch.manual_seed(config["seed"])
    return lte_spec(config).attach(models.load_model(config["model"], config["task"], num_labels=runtime.num_labels(config), spec=spec), head_seed)


@functools.lru_cache(maxsize=2)
def _lte_cached_model(frozen_items: tuple, vocab_size: int | None) -> nn.Module:
    config = dict(frozen_items)
    return lte_model(config, head_seed=0, vocab_size=vocab_size).to(runtime.device(config, "client"))


def lte_cached_model(config: dict, vocab_size: int | None = None) -> nn.Module:
    """One model per process and run config (``server-round`` aside): each message loads a client's
    whole state into it (``lte.client.sync_model``), so it is built once, not per message."""
    return _lte_cached_model(tuple(sorted((k, v) for k, v in config.items() if k != "server-round")), vocab_size)


def lte_evaluator(config: dict) -> Callable[[ArrayRecord], dict[str, float]]:
    """Server-side evaluation of ``W`` on (a prefix of) the validation split (``eval.max-examples``), on the server's device."""
    model = lte_model(config, head_seed=0).to(runtime.device(config, "server"))
    val_loader = runtime.validation_loader(config)

    def evaluate(weights: ArrayRecord) -> dict[str, float]:
        set_base_weights(model, weights.to_torch_state_dict())
        return {k: float(v) for k, v in train.evaluate(model, val_loader, config["task"]).items()}

    return evaluate


def lte_slowdowns(config: dict) -> dict[int, float]:
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


def lte_slowdown(config: dict, node: runtime.NodeOptions) -> float:
    """The client's straggler factor: its node config's ``slowdown``, else its entry in ``lte.slowdown``
    (for simulations, where nodes have no node config of their own)."""
    return node.slowdown if node.slowdown != 1.0 else lte_slowdowns(config).get(node.partition_id, 1.0)


def lte_strategy(config: dict, ledger: Ledger | None = None):
    """The run's LTE strategy (``lte.async`` picks ``LTEAsync``) and its initial ``W``."""
    from strategies import LTE, LTEAsync

    lte_slowdowns(config)  # a malformed lte.slowdown fails here, not in every client
    common = dict(fraction_train=config["fraction-train"], min_available_nodes=config["num-clients"], node_wait=config["lte.node-wait-s"],
                  weighted=config["lte.weighted"], max_examples=config["max-examples"], max_update_ratio=config["max-update-ratio"],
                  allow_empty_rounds=config["allow-empty-rounds"], ledger=ledger)
    model, spec = lte_model(config, head_seed=0), lte_spec(config)
    if config["lte.async"]:
        strategy = LTEAsync(model, spec, staleness_exponent=config["lte.staleness-exponent"], max_staleness=config["lte.max-staleness"],
                            mix=config["lte.async-mix"] or None, **common)
    else:
        strategy = LTE(model, spec, aggregation=config["lte.aggregation"], trim=config["lte.trim"], **common)
    return strategy, ArrayRecord(strategy.W)


# --- FedAvg-LoRA -------------------------------------------------------------------------------------


def lora_config(config: dict):
    from peft import LoraConfig

    task_type = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(config["task"])
    return LoraConfig(r=config["lora.r"], lora_alpha=config["lora.alpha"], lora_dropout=0.0, target_modules=names(config, "lora.targets"),
                      task_type=task_type)


def fedavg_model(config: dict) -> nn.Module:
    """The run's base model wrapped with peft LoRA (seeded LoRA and head initialisation)."""
    from peft import get_peft_model

    base = runtime.base_model(config)
    try:
        return get_peft_model(base, lora_config(config))
    except ValueError as err:
        raise ValueError(f"lora.targets '{config['lora.targets']}' do not fit model '{config['model']}': {err}") from None


FEDAVG_MODEL_KEYS = ("model", "task", "dataset", "seed", "data.block-chars", "data.text-column", "data.label-column", "lora.r", "lora.alpha", "lora.targets",
                     "client.device")


@functools.lru_cache(maxsize=2)
def _fedavg_cached_model(frozen_items: tuple) -> nn.Module:
    config = dict(frozen_items)
    return fedavg_model(config).to(runtime.device(config, "client"))


def fedavg_cached_model(config: dict) -> nn.Module:
    """One model per process and architecture: every round overwrites all its trainable tensors."""
    return _fedavg_cached_model(tuple((k, config[k]) for k in FEDAVG_MODEL_KEYS))


def fedavg_client(config: dict, partition_id: int, num_partitions: int, rho: float = 1.0):
    """fedcola's own FedAvg-LoRA client: the cached model, round r's batches drawn from (seed, r, partition)."""
    from fedcola.fedavg_lora.client import FedAvgLoRAClient

    part = runtime.client_data(config, partition_id, num_partitions)
    return FedAvgLoRAClient(fedavg_cached_model(config), runtime.seeded_batches(config, part, partition_id), partition_id,
                            examples=len(part), green_rho=rho)


def fedavg_client_train(config: dict, state: dict, partition_id: int, num_partitions: int, server_round: int, rho: float = 1.0):
    """One local round of fedcola's own client (``fedavg_client``): (new state, stats, examples, GreenTrainer selection or None)."""
    client = fedavg_client(config, partition_id, num_partitions, rho)
    new, stats, selection = client.round(state, server_round, config["local-steps"], optimizer_spec(config), config["seed"])
    return new, stats, client.num_examples, selection
