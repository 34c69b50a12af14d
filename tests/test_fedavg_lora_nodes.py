"""FedAvg-LoRA waits for the whole federation once, then samples from whoever is connected."""

import signal

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from strategies.fedavg_lora import FedAvgLoRA
from tests import helpers

pytestmark = pytest.mark.usefixtures("task_identity")


def _timeout(*_):
    raise TimeoutError("configure_train waited for a node that is gone")


def _sampled(strategy, server_round, grid):
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(20)  # Flower's sample_nodes would otherwise wait for the missing node forever
    try:
        messages = strategy.configure_train(server_round, ArrayRecord({"w": Array(np.zeros(2, np.float32))}), ConfigRecord({}), grid)
        return sorted(m.metadata.dst_node_id for m in messages)
    finally:
        signal.alarm(0)


def test_a_node_that_never_returns_does_not_stall_later_rounds():
    strategy = FedAvgLoRA(fraction_train=1.0, min_available_nodes=3)
    assert _sampled(strategy, 1, helpers.Nodes([1, 2, 3])) == [1, 2, 3]
    assert _sampled(strategy, 2, helpers.Nodes([1, 2])) == [1, 2]  # node 3 is gone: the round goes on with the others


def test_a_resumed_run_waits_for_the_federation_again():
    strategy = FedAvgLoRA(fraction_train=1.0, min_available_nodes=3, round_offset=4)
    assert strategy.min_available_nodes == 3
    assert _sampled(strategy, 1, helpers.Nodes([1, 2, 3])) == [1, 2, 3]
    assert strategy.min_available_nodes == 3  # the resumed run's first round required all three
    _sampled(strategy, 2, helpers.Nodes([1, 2]))
    assert strategy.min_available_nodes == 1
