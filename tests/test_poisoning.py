"""Bounded influence: a client cannot take over example-weighted means with its num-examples, and a
huge but finite update is skipped (norm above max-update-ratio x the other replies' median): the
global model stays the honest clients' aggregate."""

import numpy as np
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


class _HugeGrid(helpers.ColaLoopGrid):
    """Node 3 answers every train message with its auxiliary models scaled by 1e30 (finite)."""

    def answer(self, msg):
        reply = super().answer(msg)
        if msg.metadata.message_type == "train.cola" and msg.metadata.dst_node_id == 3:
            reply.content.array_records["adapter"] = ArrayRecord({k: v * 1e30 for k, v in helpers.adapter_state(reply.content.array_records["adapter"]).items()})
        return reply


def test_cola_merged_huge_finite_adapter_is_skipped(cola_config, tmp_path):
    """In merged ColA a 1e30 adapter would make every client's (x, G) non-finite: its change is skipped and
    the shared model stays finite; the honest clients train on."""
    from fedcola import config as cfg
    from fedcola.cola import records
    from fedcola.fl.ledger import Ledger

    config = cfg.build({**cola_config, "num-clients": 3, "local-steps": 2})
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy = helpers.cola_strategy(config, ledger)
    grid = _HugeGrid([1, 2, 3], config, num_partitions=3)
    strategy.start(grid=grid, num_rounds=1, timeout=10)
    held = {n: records.adapter_record(a).to_torch_state_dict() for n, a in strategy.book.adapters.items()}
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for ads in held.values() for v in ads.values())
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in held[3].items() if k.endswith("/B"))  # never taken: still its initial B = 0
    assert all(any(not torch.equal(v, torch.zeros_like(v)) for k, v in held[n].items() if k.endswith("/B")) for n in (1, 2))
    skipped = [s for r in ledger.rounds or [ledger._round] for s in r["skipped"]]
    assert len(skipped) == 2 and all(s["node_id"] == 3 and "auxiliary model change" in s["reason"] for s in skipped)


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_fedavg_lora_robust_aggregation_resists_a_byzantine_client(aggregation):
    """Coordinate median / trimmed mean (Flower's aggregates, per tensor over the clients that trained
    it): one client pushing every coordinate by +5 (under the norm bound's radar: ratio off) moves the
    plain mean by 1, the robust aggregate by at most the honest clients' spread."""
    from scipy import stats

    honest = [_reply(n) for n in range(1, 5)]
    byzantine = _reply(9)
    byzantine.content.array_records["arrays"] = ArrayRecord({k: v + 5.0 for k, v in byzantine.content.array_records["arrays"].to_torch_state_dict().items()})
    mean, _ = _aggregate(honest + [byzantine], max_update_ratio=0.0)
    robust, _ = _aggregate(honest + [byzantine], max_update_ratio=0.0, aggregation=aggregation, trim=0.2)
    values = {k: torch.stack([r.content.array_records["arrays"].to_torch_state_dict()[k] for r in honest]) for k in SENT.keys()}
    for k in SENT.keys():
        low, high = values[k].min(0).values, values[k].max(0).values
        assert ((mean[k] - high) > 0.9).all()  # the plain mean is dragged out of the honest range
        assert ((robust[k] >= low - 1e-6) & (robust[k] <= high + 1e-6)).all()  # the robust one stays within it
        everyone = torch.stack([*values[k], byzantine.content.array_records["arrays"].to_torch_state_dict()[k]]).double().numpy()
        want = np.median(everyone, axis=0) if aggregation == "median" else stats.trim_mean(everyone, 0.2, axis=0)
        assert np.allclose(robust[k].numpy(), want, atol=1e-6)
