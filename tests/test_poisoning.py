"""Bounded influence: a client cannot take over example-weighted means with its num-examples, and a
huge but finite update is skipped (norm above max-update-ratio x the other replies' median): the
global model stays the honest clients' aggregate."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcola import client_app
from fedcola.fl.screening import outliers
from strategies import FedAvgLoRA
from tests import helpers
from tests.test_lte_flower import FAST

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")
SENT = ArrayRecord({"lora_A": torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), "lora_B": torch.zeros(8, 4)})


def _reply(node: int, scale: float = 1.0, examples: float = 10) -> Message:
    g = torch.Generator().manual_seed(node)
    arrays = {k: v + scale * 0.01 * torch.randn(v.shape, generator=g) for k, v in SENT.to_torch_state_dict().items()}
    metrics = {"num-examples": examples, "train-loss": 0.5, "flops": 1, "peak-memory-bytes": 1, "wall-time-s": 0.1, "partition-id": node}
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}), reply_to=Message(RecordDict({}), dst_node_id=node, message_type="train"))


def _aggregate(replies, **kwargs):
    strategy = FedAvgLoRA(**kwargs)
    strategy._sent = SENT
    strategy.skips.begin_round(1)
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict(), strategy.skips.reasons


@pytest.mark.parametrize("honest", [1, 3])
def test_fedavg_lora_huge_finite_update_is_skipped(honest):
    clean, _ = _aggregate([_reply(n) for n in range(1, honest + 1)])
    got, reasons = _aggregate([_reply(n) for n in range(1, honest + 1)] + [_reply(9, scale=1e30)])
    assert all(torch.equal(got[k], clean[k]) for k in clean) and all(v.abs().max() < 10 for v in got.values())
    assert len(reasons) == 1 and "node 9: update norm" in reasons[0]
    unbounded, _ = _aggregate([_reply(n) for n in range(1, honest + 1)] + [_reply(9, scale=1e30)], max_update_ratio=0.0)
    assert any(v.abs().max() > 1e20 for v in unbounded.values())  # what the bound prevents


@pytest.mark.parametrize("examples", [-100, 0, 10**12, 2.5])
def test_fedavg_lora_num_examples_cannot_take_over_the_mean(examples):
    clean, _ = _aggregate([_reply(1), _reply(2)])
    got, reasons = _aggregate([_reply(1), _reply(2), _reply(9, examples=examples)], max_examples=10**6)
    assert all(torch.equal(got[k], clean[k]) for k in clean) and "num-examples" in reasons[0]


def test_lte_huge_finite_delta_is_skipped():
    strategy = helpers.lte_strategy(FAST)
    contexts = {10 + p: Context(run_id=1, node_id=10 + p, node_config={"partition-id": p, "num-partitions": 3}, state=RecordDict(), run_config={})
                for p in range(3)}
    replies = [client_app.lte_train(strategy._message(n, ConfigRecord(FAST), 1), ctx, FAST) for n, ctx in contexts.items()]
    attack = replies[2].content.array_records["arrays"]
    replies[2].content.array_records["arrays"] = ArrayRecord({k: v * 1e6 for k, v in attack.to_torch_state_dict().items()})
    honest = helpers.lte_strategy(FAST)
    honest.sent = dict(strategy.sent)
    honest.aggregate_train(1, replies[:2])
    strategy.aggregate_train(1, replies)
    assert all(torch.equal(strategy.W[k], honest.W[k]) for k in honest.W)
    assert "delta norm" in strategy.skips.reasons[0] and "node 12" in strategy.skips.reasons[0]


def test_leave_one_out_median_catches_one_attacker_of_two():
    assert set(outliers({1: 1.0, 2: 1e6}, 10.0)) == {2}
    assert outliers({1: 1.0, 2: 5.0}, 10.0) == {} and outliers({1: 1e9}, 10.0) == {}
