"""A user's own ServerApp that runs fedcola's strategies next to Flower's (docs/deploy.md, "Your own
ServerApp").

The ClientApp stays ``fedcola.client_app:app`` (it answers ``train`` for FedAvg on LoRA tensors,
``query.cola`` / ``train.cola`` for ColA and ``train.lte`` for LTE); point your app's pyproject at
this ServerApp (``serverapp = "examples.own_server_app:app"``). The run config's ``method`` picks
Flower's own ``FedAvg`` (over the LoRA tensors), ``strategies.ColA`` or ``strategies.LTE``.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from fedcola import runtime
from fedcola.cola import records as cola_fl
from fedcola.fedavg_lora import client as fedavg_lora
from fedcola.lte import client as lte_client
from fedcola import config as cfg
from fedcola.cola.server import ColaServer
from strategies.cola import ColA
from strategies.lte import LTE


def make_strategy(config: dict) -> tuple[Strategy, ArrayRecord | None]:
    """The strategy of ``config['method']`` and the arrays it starts from."""
    if config["method"] == "cola":  # the server holds the frozen base model; clients hold only adapters
        server = ColaServer(runtime.base_model(config), cola_fl.targets_of(config), mode=config["cola.mode"])
        return ColA(server, config), None
    if config["method"] == "lte":  # the server holds W; clients train LoRA heads, W merges their deltas
        weights, frozen = lte_client.initial_arrays(config)
        return LTE(r=config["lte.r"], frozen_arrays=frozen, min_available_nodes=config["num-clients"]), weights
    model = fedavg_lora.build_model(config)  # Flower's own FedAvg, weighted by the replies' num-examples
    return FedAvg(fraction_evaluate=0.0, min_available_nodes=config["num-clients"]), ArrayRecord(fedavg_lora.trainable_state(model))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = cfg.from_run_config(context.run_config)
    strategy, arrays = make_strategy(config)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=config["rounds"], train_config=ConfigRecord(dict(config)))
    log(INFO, "%s finished: %s", type(strategy).__name__, result.train_metrics_clientapp)
