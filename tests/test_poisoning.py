"""Bounded influence: a client cannot take over example-weighted means with its num-examples, and a
huge but finite update is skipped (norm above max-update-ratio x the other replies' median; in async LTE
the last merged deltas'; at a ColA client's first contact a new client's), and robust merges resist a
Byzantine client: the global model stays the honest clients' aggregate."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcola import client_app
from fedcola.fl import wire
from fedcola.fl.screening import outliers
from fedcola.train import DTYPES
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
    """Node 3 answers every train message with a huge but finite change of its auxiliary models: every
    coordinate at half the upload dtype's largest value, packed as an honest change is."""

    def answer(self, msg):
        reply = super().answer(msg)
        if msg.metadata.message_type == "train.cola" and msg.metadata.dst_node_id == 3:
            dtype = self.config["cola.upload-dtype"]
            big = torch.finfo(DTYPES[dtype]).max / 2
            change = {k: torch.full_like(v, big) for k, v in wire.unpack(reply.content.array_records["adapter"], dtype).items()}
            reply.content.array_records["adapter"] = wire.pack(change, dtype)
        return reply


@pytest.mark.parametrize("upload_dtype", ["fp16", "fp32", "bf16"])
def test_cola_merged_huge_finite_adapter_is_skipped(cola_config, tmp_path, upload_dtype):
    """In merged ColA a huge change would make every client's (x, G) non-finite: it is skipped and the
    shared model stays finite; the honest clients train on."""
    from fedcola import config as cfg
    from fedcola.cola import records
    from fedcola.fl.ledger import Ledger

    config = cfg.build({**cola_config, "num-clients": 3, "local-steps": 2, "cola.upload-dtype": upload_dtype})
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


def _lte_replies(strategy, count: int) -> list[Message]:
    """One train reply of each of ``count`` LTE clients (nodes 10, 11, ...) to the strategy's messages."""
    contexts = {10 + p: Context(run_id=1, node_id=10 + p, node_config={"partition-id": p, "num-partitions": count}, state=RecordDict(), run_config={})
                for p in range(count)}
    return [client_app.lte_train(strategy._message(n, ConfigRecord(FAST), 1), ctx, FAST) for n, ctx in contexts.items()]


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
def test_lte_robust_merge_resists_a_byzantine_delta(aggregation):
    """Sync LTE with ``aggregation``: W moves by the coordinate-wise median / trimmed mean of the dense
    deltas (Flower's aggregates), and a client adding +1 to every coordinate (under the norm bound's
    radar: ratio off) drags the plain mean out of the honest range, the robust merge not."""
    from scipy import stats
    from strategies import LTE
    from fedcola import specs
    from fedcola.lte.client import delta_record, record_delta
    from fedcola.lte.merge import dense

    plain = helpers.lte_strategy(FAST, max_update_ratio=0.0)
    robust = LTE(specs.lte_model(FAST, head_seed=0), specs.lte_spec(FAST), max_update_ratio=0.0, aggregation=aggregation, trim=0.2)
    replies = _lte_replies(plain, 5)
    robust.sent = dict(plain.sent)
    before = {k: v.clone() for k, v in plain.W.items()}
    deltas = [record_delta(r.content.array_records["arrays"]) for r in replies]
    shifted = {k: dense(e) + 1.0 for k, e in deltas[4].items()}
    replies[4].content.array_records["arrays"] = delta_record(shifted)
    deltas[4] = shifted
    plain.aggregate_train(1, replies)
    robust.aggregate_train(1, replies)
    for k in deltas[0]:
        stack = torch.stack([dense(d[k]).double() for d in deltas]).numpy()
        want = np.median(stack, axis=0) if aggregation == "median" else stats.trim_mean(stack, 0.2, axis=0)
        assert np.allclose((robust.W[k] - before[k]).numpy(), want, atol=1e-6)
        low, high = stack[:4].min(0), stack[:4].max(0)
        moved = (robust.W[k] - before[k]).double().numpy()
        assert ((moved >= low - 1e-6) & (moved <= high + 1e-6)).all()
        assert ((plain.W[k] - before[k]).double().numpy() - high > 0.1).all()


def test_async_lte_huge_finite_delta_is_skipped():
    """Async LTE merges one delta at a time: a delta whose norm exceeds max-update-ratio x the median of
    the last merged deltas' is skipped (logged) and W stays where the honest merges left it; with the
    bound off it would have been merged."""
    from collections import deque

    def run(ratio):
        strategy = helpers.lte_strategy(FAST, asynchronous=True, max_update_ratio=ratio)
        strategy.recent_norms = deque(maxlen=6)
        replies = _lte_replies(strategy, 3)
        attack = replies[2].content.array_records["arrays"]
        replies[2].content.array_records["arrays"] = ArrayRecord({k: v * 1e6 for k, v in attack.to_torch_state_dict().items()})
        merged = [strategy._merge_reply(1, r, mix=1 / 3) for r in replies[:2]]
        honest = {k: v.clone() for k, v in strategy.W.items()}
        return merged + [strategy._merge_reply(1, replies[2], mix=1 / 3)], strategy, honest

    merged, strategy, honest = run(10.0)
    assert merged == [True, True, False]
    assert all(torch.equal(strategy.W[k], honest[k]) for k in honest)
    assert "delta norm" in strategy.skips.reasons[-1] and "node 12" in strategy.skips.reasons[-1]
    merged, strategy, honest = run(0.0)
    assert merged == [True, True, True] and any((strategy.W[k] - honest[k]).abs().max() > 1e3 for k in honest)


@pytest.mark.parametrize("adapter", ["low-rank", "linear"])
def test_cola_huge_first_contact_adapter_is_refused(cola_config, tmp_path, adapter):
    """A client's first auxiliary models are taken as the server's copy of them (in merged mode: into
    the shared model): a huge but finite set is refused at first contact (logged), an honest one taken."""
    from fedcola.fl.ledger import Ledger
    from tests.test_cola_flower import _query_reply

    config = cola_config | {"cola.adapter": adapter}
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy = helpers.cola_strategy(config, ledger)
    strategy.skips.begin_round(1)
    honest, _ = _query_reply(config, 1, 0)
    attack, _ = _query_reply(config, 2, 1)
    state = attack.content.array_records["adapter"].to_torch_state_dict()
    attack.content.array_records["adapter"] = ArrayRecord({k: v + 1e30 for k, v in state.items()})
    assert list(strategy._accept_queries(1, [honest, attack])) == [1]
    assert strategy.known == {1}
    assert "first auxiliary models' norm" in ledger._round["skipped"][-1]["reason"] and ledger._round["skipped"][-1]["node_id"] == 2


@pytest.mark.parametrize("kind", ["low-rank", "linear"])
def test_a_change_that_would_overflow_the_held_copy_is_refused_and_the_copy_kept(kind):
    """Two finite fp32 changes of 3e38 per coordinate: the first is taken, the second would make the held
    copy (low-rank) or the parameter mean (linear) infinite, so it raises (the strategy's skip) and the
    copy, its version and the mean's S stay as they were."""
    from fedcola.cola import records
    from fedcola.cola.book import AdapterBook
    from fedcola.cola.spec import AdapterSpec

    adapter = AdapterSpec(kind, r=2)
    book = AdapterBook(lambda: adapter.build({"layer": (4, 3)}, seed=0), use_mean=kind == "linear", changes="fp32")
    book.join(1, book.template, 1.0)
    held = lambda: {k: v for ads in book.adapter_sets().values() for k, v in records.adapter_record(ads).to_torch_state_dict().items()}  # noqa: E731
    big = wire.pack({k: torch.full_like(v, 3e38) for k, v in book.template.to_torch_state_dict().items()}, "fp32")
    book.update(1, big, version=1)
    before = held()
    assert all(torch.isfinite(v).all() and v.abs().max() > 1e38 for v in before.values())
    with pytest.raises(ValueError, match="non-finite"):
        book.update(1, big, version=2)
    assert all(torch.equal(v, before[k]) for k, v in held().items()) and book.taken[1] == 1
