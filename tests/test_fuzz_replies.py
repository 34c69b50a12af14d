"""Fault and attack fuzzing of every strategy's reply handling: randomly mutated replies (dtypes, shapes,
values, metrics, masks, ids, sizes, missing or extra records, client errors) are fed in beside the good
ones. Nothing raises out of the strategy, and the global model equals the one from the good replies
alone: each bad reply is a logged skip, never a crash or a silent change of the shared model.

Huge but finite updates are not in these mutations: bounding them is a separate defence."""

import copy
import math
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedcola import client_app
from fedcola import config as cfg
from fedcola.cola import records
from strategies import FedAvgLoRA
from tests import helpers
from tests.test_lte_flower import FAST

MUTANTS = 1000  # per strategy
pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")

BAD_NUMBERS = (float("nan"), float("inf"), -float("inf"), -1.0)
BAD_COUNTS = (0, -100, 10**12, 2.5, float("nan"))
OPTIONAL = ("green-rho", "batch", "adapter")  # a reply may leave these out (a known node sends no adapter): a mutation breaks them instead


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in record.items()}


def _mutate_arrays(arrays: dict[str, np.ndarray], rng: random.Random) -> dict[str, np.ndarray] | None:
    """A copy of ``arrays`` that a strategy must refuse (None: drop the whole record)."""
    out = dict(arrays)
    key = rng.choice(sorted(out))
    a = out[key]
    kind = rng.randrange(9)
    if kind == 0:
        return None
    if kind == 1:
        del out[key]
    elif kind == 2:
        out[key + ".extra"] = a
    elif kind == 3:
        out[rng.choice(["", "x", "bert.encoder.layer.9.q"]) + "/" + key] = out.pop(key)
    elif kind == 4:
        out[key] = a.astype(rng.choice([t for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8) if t != a.dtype]))
    elif kind == 5:
        out[key] = np.zeros(a.shape + (2,), dtype=a.dtype) if rng.random() < 0.5 else np.zeros((a.shape[0] + 1,) + a.shape[1:], dtype=a.dtype)
    elif kind == 6:
        out[key] = np.zeros((0,), dtype=a.dtype)
    elif np.issubdtype(a.dtype, np.floating):
        b = a.copy().reshape(-1)
        b[rng.randrange(b.size)] = rng.choice([float("nan"), float("inf"), -float("inf")])
        out[key] = b.reshape(a.shape)
    else:
        out[key] = np.full_like(a, rng.choice([-5, 10**6, 2**30]))
    return out


def _mutate_metrics(metrics: dict, rng: random.Random) -> dict | None:
    out = dict(metrics)
    key = rng.choice(sorted(out))
    kind = rng.randrange(4)
    if kind == 0:
        return None
    if kind == 1 and key not in OPTIONAL:
        del out[key]
    elif key == "num-examples":
        out[key] = rng.choice(BAD_COUNTS)
    elif key in ("partition-id", "base-version"):
        out[key] = rng.choice((-1, 1.5, float("nan"), float("inf")))
    elif key == "train-loss":
        out[key] = rng.choice((float("nan"), float("inf")))
    else:
        out[key] = rng.choice(BAD_NUMBERS)
    return out


def _mutant(good: Message, rng: random.Random, mutate_extra=None) -> Message:
    """A bad copy of ``good`` (same sender, same request): one record or value broken, or a client error."""
    request = Message(RecordDict({}), dst_node_id=good.metadata.src_node_id, message_type=good.metadata.message_type)
    if rng.random() < 0.05:
        return Message(Error(code=rng.randrange(5), reason="client crashed"), reply_to=request)
    content = good.content
    arrays = {name: _arrays(r) for name, r in content.array_records.items()}
    metrics = {name: dict(r) for name, r in content.metric_records.items()}
    configs = {name: dict(r) for name, r in content.config_records.items()}
    target = rng.choice(["arrays", "metrics", "extra"] if mutate_extra else ["arrays", "metrics"])
    if target == "arrays":
        name = rng.choice(sorted(arrays))
        mutated = _mutate_arrays(arrays[name], rng)
        while mutated is None and name in OPTIONAL:  # a reply may leave an optional record out
            mutated = _mutate_arrays(arrays[name], rng)
        arrays[name] = mutated
    elif target == "metrics":
        metrics["metrics"] = _mutate_metrics(metrics["metrics"], rng)
    else:
        mutate_extra(arrays, metrics, configs, rng)
    out = RecordDict()
    for name, a in arrays.items():
        if a is not None:
            out[name] = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items()})
    for name, m in metrics.items():
        if m is not None:
            out[name] = MetricRecord(m)
    for name, c in configs.items():
        out[name] = ConfigRecord(c)
    return Message(out, reply_to=request)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fedavg_lora_survives_mutated_replies_and_keeps_the_clean_model():
    rng = random.Random(0)
    sent = ArrayRecord({"lora_A": torch.randn(4, 8), "lora_B": torch.zeros(8, 4), "head": torch.randn(2, 8)})
    metrics = {"num-examples": 10, "train-loss": 0.5, "flops": 100, "peak-memory-bytes": 1, "wall-time-s": 0.1, "partition-id": 0}

    def good(node):
        request = Message(RecordDict({}), dst_node_id=node, message_type="train")
        arrays = ArrayRecord({k: v + node for k, v in sent.to_torch_state_dict().items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics | {"partition-id": node})}), reply_to=request)

    goods = [good(n) for n in (1, 2, 3)]

    def aggregate(replies):
        strategy = FedAvgLoRA()
        strategy._sent = sent
        strategy.skips.begin_round(1)
        arrays, _ = strategy.aggregate_train(1, replies)
        return arrays.to_torch_state_dict(), strategy.skips.reasons

    clean, _ = aggregate(goods)
    mutants = [_mutant(rng.choice(goods), rng, _mutate_trained) for _ in range(MUTANTS)]
    for chunk in range(0, MUTANTS, 100):
        mixed = goods + mutants[chunk:chunk + 100]
        rng.shuffle(mixed)
        got, reasons = aggregate(mixed)
        assert _equal(got, clean) and len(reasons) == 100


def _mutate_trained(arrays, metrics, configs, rng):
    configs["trained"] = {"names": rng.choice([["nope"], ["lora_A", "../etc"], [""]])}


def test_lte_survives_mutated_replies_and_keeps_the_clean_model():
    rng = random.Random(1)
    base = helpers.lte_strategy(FAST)
    contexts = {10 + p: Context(run_id=1, node_id=10 + p, node_config={"partition-id": p, "num-partitions": 2}, state=RecordDict(), run_config={})
                for p in range(2)}
    goods = [client_app.lte_train(base._message(node, ConfigRecord(FAST), 1), ctx, FAST) for node, ctx in contexts.items()]

    def aggregate(replies):
        strategy = copy.deepcopy(base)
        strategy.aggregate_train(1, replies)
        return strategy

    clean = aggregate(goods)
    for _ in range(MUTANTS):  # one at a time, after the good replies (a node's error reply ends its outstanding work)
        mutant = _mutant(rng.choice(goods), rng, _mutate_factors)
        got = aggregate(goods + [mutant])
        assert got.version == clean.version == 1 and _equal(got.W, clean.W)
        assert len(got.skips.reasons) == 1, got.skips.reasons


def test_async_lte_survives_mutated_replies_and_keeps_the_clean_model():
    """Async LTE merges each reply on arrival (``_merge_reply``): a mutant arriving after the good
    replies is skipped with a reason and leaves W and its version as the good replies left them."""
    from collections import deque

    rng = random.Random(3)
    base = helpers.lte_strategy(FAST, asynchronous=True)
    base.recent_norms = deque(maxlen=4)
    contexts = {10 + p: Context(run_id=1, node_id=10 + p, node_config={"partition-id": p, "num-partitions": 2}, state=RecordDict(), run_config={})
                for p in range(2)}
    goods = [client_app.lte_train(base._message(node, ConfigRecord(FAST), 1), ctx, FAST) for node, ctx in contexts.items()]
    assert all(base._merge_reply(1, g, mix=0.5) for g in goods)
    for _ in range(MUTANTS):
        got = copy.deepcopy(base)
        assert got._merge_reply(1, _mutant(rng.choice(goods), rng, _mutate_factors), mix=0.5) is False
        assert got.version == base.version == 2 and _equal(got.W, base.W) and got.recent_norms == base.recent_norms
        assert len(got.skips.reasons) == 1, got.skips.reasons


def _mutate_factors(arrays, metrics, configs, rng):
    """LTE: a lone factor, a rank above 2r, or a base version the client was not sent."""
    delta = arrays["arrays"]
    key = rng.choice(sorted(k for k in delta if k.endswith("@U")))
    kind = rng.randrange(3)
    if kind == 0:
        del delta[key[:-2] + rng.choice(["@U", "@V"])]
    elif kind == 1:
        U, V = delta[key], delta[key[:-2] + "@V"]
        extra = 2 * FAST["lte.r"] + 1 - U.shape[1]
        delta[key], delta[key[:-2] + "@V"] = np.pad(U, ((0, 0), (0, extra))), np.pad(V, ((0, extra), (0, 0)))
    else:
        metrics["metrics"]["base-version"] = 7


def test_cola_survives_mutated_replies_and_keeps_the_clean_adapters(cola_config):
    """Query replies (batches, auxiliary models at first contact) and train replies (auxiliary models,
    next-interval batches, Green-ColA importance), in merged low-rank ColA with Green-ColA on."""
    rng = random.Random(2)
    config = cfg.build({**cola_config, "cola.green-rho": 0.5, "local-steps": 2})
    strategy = helpers.cola_strategy(config)
    grid = helpers.ColaLoopGrid([1, 2], config)
    record = ConfigRecord(dict(config) | {"server-round": 1})
    strategy._step = 0
    queries = list(strategy.configure_train(1, ArrayRecord(), record, grid))
    query_replies = [grid.answer(q) for q in queries]
    before = copy.deepcopy(strategy)
    batches = strategy._accept_queries(1, query_replies)
    strategy.begin_interval(1, 0)
    fits = strategy.configure_fit(strategy.hidden_pairs(batches), record, grid, next_step=1)
    fit_replies = [grid.answer(m) for m in fits]

    def state(s):
        return {**records.adapter_record(s.book.adapters[1]).to_torch_state_dict()}, {n: records.adapter_record(a).to_torch_state_dict() for n, a in s.book.adapters.items()}

    def run_queries(replies):
        s = copy.deepcopy(before)
        s._connected = {1, 2}
        got = s._accept_queries(1, replies)
        return s, got

    clean, clean_batches = run_queries(query_replies)
    mutants = [_mutant(rng.choice(query_replies), rng, _mutate_batch) for _ in range(MUTANTS // 2)]
    for chunk in range(0, len(mutants), 100):
        mixed = query_replies + mutants[chunk:chunk + 100]  # the good replies bind each node's adapter id first
        s, got = run_queries(mixed)
        assert sorted(got) == [1, 2] and all(all(torch.equal(x[k], y[k]) for k in x) for n in got for x, y in zip(got[n], clean_batches[n]))
        assert state(s)[1].keys() == state(clean)[1].keys() and all(_equal(state(s)[1][n], state(clean)[1][n]) for n in state(clean)[1])
        assert s.book.owner == clean.book.owner == {1: 0, 2: 1} and len(s.skips.reasons) == 100

    def run_fits(replies):
        s = copy.deepcopy(strategy)
        s.skips.begin_round(1)
        _, metrics = s.aggregate_train(1, replies)
        return s, metrics

    clean, _ = run_fits(fit_replies)
    mutants = [_mutant(rng.choice(fit_replies), rng, _mutate_fit) for _ in range(MUTANTS - MUTANTS // 2)]
    for chunk in range(0, len(mutants), 100):
        mixed = mutants[chunk:chunk + 100] + fit_replies
        rng.shuffle(mixed)
        s, metrics = run_fits(mixed)
        assert metrics["clients"] == 2 and len(s.skips.reasons) == 100, s.skips.reasons[:3]
        assert all(_equal(state(s)[1][n], state(clean)[1][n]) for n in (1, 2))
        assert s.green.reports == clean.green.reports and sorted(s._prefetched) == [1, 2]


def _mutate_batch(arrays, metrics, configs, rng):
    """ColA query replies: token ids, masks, labels and shapes of a batch; another client's adapter id."""
    batch = arrays["batch"]
    key = rng.choice(sorted(batch))
    a = batch[key]
    kind = rng.randrange(6)
    if kind == 0 and key.endswith("attention_mask"):
        a = a.copy()
        a.flat[rng.randrange(a.size)] = rng.choice([2, -1, 7])
        batch[key] = a
    elif kind == 1 and key.endswith("attention_mask"):
        batch[key] = np.zeros_like(a)
    elif kind == 2 and key.endswith("input_ids"):
        batch[key] = np.full_like(a, rng.choice([-1, 10**6]))
    elif kind == 3 and key.endswith("labels"):
        batch[key] = np.full_like(a, rng.choice([-5, 2, 10**6]))
    elif kind == 4:
        batch[key] = np.concatenate([a, a], axis=0)
    else:
        metrics["metrics"]["partition-id"] = 1 - int(metrics["metrics"]["partition-id"])  # another client's adapter id


def _mutate_fit(arrays, metrics, configs, rng):
    """ColA train replies: the importance record (names, values), batches nobody asked of it, another id."""
    kind = rng.randrange(3)
    if kind == 0:
        layers = sorted(configs["importance"])
        values = dict(configs["importance"])
        if rng.random() < 0.5:
            del values[rng.choice(layers)]
        else:
            values[rng.choice(layers)] = rng.choice([float("nan"), float("inf")])
        configs["importance"] = values
    elif kind == 1:
        arrays["batch"] = {k: np.concatenate([v, v], axis=0) for k, v in arrays["batch"].items()}
    else:
        metrics["metrics"]["partition-id"] = 1 - int(metrics["metrics"]["partition-id"])


def test_metric_screen_names_the_bad_value():
    from fedcola.fl.screening import metric_problem

    ok = {"num-examples": 3, "partition-id": 0, "flops": 1.0}
    assert metric_problem(MetricRecord(ok)) is None
    assert "num-examples" in metric_problem(MetricRecord(ok | {"num-examples": 10**12}), max_examples=1000)
    assert "finite" in metric_problem(MetricRecord(ok | {"flops": math.inf}))
    assert "partition-id" in metric_problem(MetricRecord(ok | {"partition-id": -1}))
    assert metric_problem(MetricRecord(ok | {"accelerator-peak-bytes": 2**30})) is None  # a client on CUDA
    for bad in (-1.0, math.nan, math.inf):
        assert "accelerator-peak-bytes" in metric_problem(MetricRecord(ok | {"accelerator-peak-bytes": bad}))
