"""The documented example of a user's own ServerApp (examples/own_server_app.py) builds fedcola's
strategies and Flower's FedAvg from a run config."""

import pytest
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

from examples import own_server_app
from fedcola import config as cfg
from strategies.cola import ColA
from strategies.lte import LTE
from tests.test_deploy_state import tiny_assets


@pytest.mark.parametrize("method, kind, has_arrays", [("cola", ColA, False), ("lte", LTE, True), ("fedavg_lora", FedAvg, True)])
def test_own_server_app_builds_each_strategy(tmp_path, method, kind, has_arrays):
    assets = tiny_assets(tmp_path)
    config = cfg.build({"method": method, "model": str(assets["model"]), "dataset": str(assets["data"]), "num-clients": 2})
    strategy, arrays = own_server_app.make_strategy(config)
    assert isinstance(strategy, kind) and (arrays is not None) == has_arrays
    if arrays is not None:
        assert len(arrays) > 0 and all(a.numpy().size for a in arrays.values())
    assert isinstance(own_server_app.app, ServerApp)
