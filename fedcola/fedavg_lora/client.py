"""FedAvg over peft LoRA adapters, client side: the baseline every other method is compared with.

Every client holds the same base model wrapped with peft LoRA (a classifier head trained in full),
trains ``local-steps`` steps on its data from the global trainable tensors it receives, and returns
them; the server averages them weighted by examples (McMahan et al. 2017), which is Flower's FedAvg.

Use it in your own ClientApp with your own peft model and data::

    def make_client(context):
        pid = context.node_config["partition-id"]
        return FedAvgLoRAClient(get_peft_model(my_model(), my_lora_config), my_batches(pid), client_id=pid)

    app = ClientApp()
    register(app, make_client)        # answers train

The round's settings (``local-steps``, ``optimizer``, ``lr``, ``weight-decay``, ``seed``,
``server-round``) come in the message's ``config`` record (``strategies.FedAvgLoRA`` fills them).
A client with a FLOPs budget rho_k < 1 (``green_rho``) trains only the tensors that GreenTrainer
selects for it (``fedcola.green.select.train_under_budget``, re-selected every round on its first
local batch) and reports which ones it trained; the server averages each tensor over the clients
that trained it (``strategies.FedAvgLoRA``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedcola import train as training
from fedcola.green.select import BudgetSelection, train_under_budget
from fedcola.fl.batches import TrainData, held, num_examples, round_batches

TRAINED = "trained"  # reply ConfigRecord: {"names": the tensors this client trained this round}
SETTINGS = ("local-steps", "optimizer", "lr", "weight-decay", "seed")  # what the server's config record must carry


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def local_round(model: nn.Module, state: Mapping[str, torch.Tensor], batches: Iterator, steps: int, optimizer: training.OptimizerSpec,
                seed: int, rho: float = 1.0) -> tuple[dict[str, torch.Tensor], training.StepStats, BudgetSelection | None]:
    """One round of local LoRA training from the global ``state`` at FLOPs ratio ``rho``; torch is seeded
    with ``seed`` (dropout), so a round's result depends on (seed, round, client) only and a resumed run
    repeats it. Returns the new state of every trainable tensor, the step stats and the GreenTrainer
    selection (None at rho = 1): at rho < 1 the stats include the selection's own cost and the tensors
    not selected come back exactly as received."""
    load_trainable(model, state)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    stats, selection = train_under_budget(model, batches, steps, optimizer.build(params), rho)
    return trainable_state(model), stats, selection


class FedAvgLoRAClient:
    """One FedAvg-LoRA client: a peft ``model`` (any module whose trainable parameters are what the
    server averages), its training batches (cycled iterable, or ``(round, count) -> batches``), its
    ``client_id`` (partition id) and FLOPs budget ``green_rho``."""

    def __init__(self, model: nn.Module, train: TrainData, client_id: int, *, examples: int | None = None, green_rho: float = 1.0) -> None:
        self.model, self.data, self.client_id, self.green_rho = model, held(train), int(client_id), green_rho
        self.num_examples = num_examples(self.data, examples)

    def round(self, state: Mapping[str, torch.Tensor], server_round: int, steps: int, optimizer: training.OptimizerSpec,
              seed: int) -> tuple[dict[str, torch.Tensor], training.StepStats, BudgetSelection | None]:
        """``local_round`` on this client's batches of ``server_round``, torch seeded by (seed, round, client)."""
        return local_round(self.model, state, round_batches(self.data, server_round, steps), steps, optimizer,
                           training.round_seed(seed, server_round, self.client_id), self.green_rho)

    def train(self, msg: Message, context: Context) -> Message:
        config = msg.content.config_records["config"]
        missing = [k for k in (*SETTINGS, "server-round") if k not in config]
        if missing:
            raise ValueError(f"the server's config record lacks {', '.join(missing)}")
        optimizer = training.OptimizerSpec(str(config["optimizer"]), float(config["lr"]), float(config["weight-decay"]))
        state, stats, selection = self.round(msg.content.array_records["arrays"].to_torch_state_dict(), int(config["server-round"]),
                                             int(config["local-steps"]), optimizer, int(config["seed"]))
        metrics = MetricRecord({
            "num-examples": self.num_examples, "train-loss": float(stats.loss), "flops": int(stats.flops),
            "peak-memory-bytes": training.peak_memory_bytes(), "wall-time-s": float(stats.wall_time_s),
            "partition-id": self.client_id, "green-rho": self.green_rho,
            **training.accelerator_metrics(next(self.model.parameters()).device),
        })
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics,
                              TRAINED: ConfigRecord({"names": list(state if selection is None else selection.names)})})
        return Message(content, reply_to=msg)


def register(app: ClientApp, make_client: Callable[[Context], FedAvgLoRAClient]) -> None:
    """Register FedAvg-LoRA's handler (``train``) on ``app``; ``make_client(context)`` builds the node's client."""

    @app.train()
    def fedavg_train(msg: Message, context: Context) -> Message:
        return make_client(context).train(msg, context)
