"""FedAvg over peft LoRA adapters: the baseline every other method is compared with.

Every client wraps the same frozen base model with peft LoRA (``lora.r``, ``lora.alpha`` on the
``lora.targets`` modules; a classifier head is trained in full), trains ``local-steps`` steps on
its partition, and returns its trainable tensors; the server averages them weighted by examples
(McMahan et al. 2017), which is Flower's FedAvg.

A client with a FLOPs budget rho_k < 1 (node config ``green-rho``) trains only the tensors that
GreenTrainer selects for it (`fedcola.green.select.select_under_budget`, re-selected every round on its
first local batch) and reports which ones it trained; the server averages each tensor over the
clients that trained it (`strategies.FedAvgLoRA`).
"""

from __future__ import annotations

import functools

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedcola import runtime, train
from fedcola.config import names
from fedcola.green.select import train_under_budget


def lora_config(config: dict) -> LoraConfig:
    task_type = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(config["task"])
    return LoraConfig(
        r=config["lora.r"], lora_alpha=config["lora.alpha"], lora_dropout=0.0,
        target_modules=names(config, "lora.targets"), task_type=task_type,
    )


def build_model(config: dict) -> nn.Module:
    """The peft-wrapped model with seeded LoRA and head initialisation."""
    base = runtime.base_model(config)
    try:
        return get_peft_model(base, lora_config(config))
    except ValueError as err:
        raise ValueError(f"lora.targets '{config['lora.targets']}' do not fit model '{config['model']}': {err}") from None


@functools.lru_cache(maxsize=2)
def _cached_model(frozen_items: tuple) -> nn.Module:
    return build_model(dict(frozen_items))


TRAINED = "trained"  # reply ConfigRecord: {"names": the tensors this client trained this round}

MODEL_KEYS = ("model", "task", "dataset", "seed", "data.block-chars", "data.text-column", "data.label-column", "lora.r", "lora.alpha", "lora.targets")


def cached_model(config: dict) -> nn.Module:
    """One model per process and architecture: every round overwrites all its trainable tensors."""
    return _cached_model(tuple((k, config[k]) for k in MODEL_KEYS))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def client_train(config: dict, state: dict[str, torch.Tensor], partition_id: int, num_partitions: int, server_round: int,
                 rho: float = 1.0):
    """One round of local LoRA training from the global state at FLOPs ratio `rho`.

    Returns (new state of every trainable tensor, train.StepStats, examples, the
    `green.BudgetSelection` or None at rho = 1). At rho < 1 the stats' FLOPs and wall time include
    the selection's own (one profiling forward, one forward + backward for importance: about 1.3
    steps' worth, paid once per round), and the tensors not selected come back exactly as received.
    rho is relative to training every LoRA tensor, whose backward already runs through the whole
    model, so with LoRA the smallest feasible rho is about 0.5 (the forward's share)."""
    model = cached_model(config)
    load_trainable(model, state)
    part = runtime.client_split(config, partition_id, num_partitions)
    seed = runtime.round_seed(config, server_round, partition_id)
    torch.manual_seed(seed)  # dropout: a round's result depends on (seed, round, client) only, so a resumed run repeats it
    batches = train.cycle(runtime.loader(config, part, shuffle=True, seed=seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.make_optimizer(config["optimizer"], params, config["lr"], config["weight-decay"])
    stats, selection = train_under_budget(model, batches, config["local-steps"], optimizer, rho)
    return trainable_state(model), stats, len(part), selection
