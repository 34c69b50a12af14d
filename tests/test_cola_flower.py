"""ColA's Flower layer: wire format, client state, and bad replies skipped with a reason."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from tests import helpers
from fedcola import specs, data, runtime
from fedcola.cola import client as cola_client
from fedcola.cola import records as cola_fl
from fedcola.fl import wire
from fedcola import config as cfg
from fedcola.fl.ledger import Ledger

pytestmark = pytest.mark.usefixtures("task_identity")


def _query_reply(config, node, pid, step=0):
    request = Message(RecordDict({"config": ConfigRecord(dict(config)), "control": ConfigRecord({"step": step, "send-adapter": True})}),
                      dst_node_id=node, message_type="query.cola")
    context = Context(run_id=1, node_id=node, node_config={"partition-id": pid, "num-partitions": 2}, state=RecordDict(), run_config={})
    return helpers.cola_query(request, context, config, (pid, 2)), context


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "bf16"])
def test_wire_round_trip(dtype):
    t = {"a": torch.randn(5, 3)}
    record = wire.pack(t, dtype)
    back = wire.unpack(record, dtype)["a"]
    tol = {"fp16": 1e-3, "fp32": 0, "bf16": 1e-2}[dtype]
    assert torch.allclose(back, t["a"], rtol=tol, atol=tol)
    assert wire.nbytes(record) < wire.nbytes(wire.pack(t, "fp32")) or dtype == "fp32"
    with pytest.raises(ValueError, match="expected"):
        wire.unpack(record, "fp32" if dtype != "fp32" else "fp16")


def test_client_state_round_trips_through_context(cola_config):
    config = cola_config
    reply, context = _query_reply(config, node=5, pid=0)
    spec = cola_client.ColaClient.spec(context)
    client = cola_client.ColaClient(0, [], examples=0).learner(context, spec)
    dims = specs.layer_dims(config)
    pairs = [{layer: (torch.randn(7, d_in), torch.randn(7, d_out) * 1e-2) for layer, (d_in, d_out) in dims.items()} for _ in range(2)]
    for p in pairs:
        client.step(p)
    cola_client.ColaClient.save(context, client)
    again = cola_client.ColaClient(0, [], examples=0).learner(context, spec)
    for layer in dims:
        for (n, a), (_, b) in zip(client.adapters[layer].state_dict().items(), again.adapters[layer].state_dict().items()):
            assert torch.equal(a, b), n
    s1, s2 = client.optimizer.state_dict()["state"], again.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(torch.as_tensor(s1[i][k]), torch.as_tensor(s2[i][k])) for i in s1 for k in s1[i])


def test_an_interval_updates_the_clients_adapters(cola_config):
    config = cfg.build({**cola_config, "local-steps": 1})  # a round of one interval
    strategy, grid = helpers.cola_strategy(config), helpers.ColaLoopGrid([1, 2], config)
    intervals = helpers.spy(strategy, "interval_batches")
    before = {}
    taken = helpers.spy(strategy, "aggregate_train", before=lambda *_: before.update(
        {n: helpers.adapter_state(cola_fl.adapter_record(strategy.book.adapters[n])) for n in (1, 2)}))
    strategy.start(grid=grid, num_rounds=1, timeout=10, train_config=ConfigRecord(dict(config)))
    (batches,) = [call.result for call in intervals]
    assert sorted(batches) == [1, 2] and len(batches[1]) == 2
    (call,) = taken
    _, metrics = call.result
    assert metrics["clients"] == 2
    for n in (1, 2):
        after = cola_fl.adapter_record(strategy.book.adapters[n]).to_torch_state_dict()
        assert any(not torch.equal(after[k], before[n][k]) for k in after)


def _corrupt_batch(reply, key, value):
    batch = reply.content.array_records["batch"].to_torch_state_dict()
    batch[key] = value
    reply.content.array_records["batch"] = ArrayRecord(batch)
    return reply


def test_bad_query_replies_are_skipped_with_reasons(cola_config, tmp_path):
    config = cola_config | {"cola.identity": "claim"}  # nodes 1, 3, 5, 7 all use partition 0's data: each check's own reason, not the id's
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy = helpers.cola_strategy(config, ledger)
    ok, _ = _query_reply(config, 1, 0)
    ids = ok.content.array_records["batch"]["b0/input_ids"].numpy()
    shape, _ = _query_reply(config, 2, 1)
    _corrupt_batch(shape, "b0/input_ids", torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.int32))
    dtype, _ = _query_reply(config, 3, 0)
    _corrupt_batch(dtype, "b0/input_ids", torch.zeros(ids.shape, dtype=torch.float32))
    vocab, _ = _query_reply(config, 4, 1)
    _corrupt_batch(vocab, "b0/input_ids", torch.full(ids.shape, 10_000, dtype=torch.int32))
    nan, _ = _query_reply(config, 5, 0)
    adapter = nan.content.array_records["adapter"].to_torch_state_dict()
    first = next(iter(adapter))
    adapter[first] = torch.full_like(adapter[first], float("nan"))
    nan.content.array_records["adapter"] = ArrayRecord(adapter)
    unknown, _ = _query_reply(config, 6, 1)
    adapter = unknown.content.array_records["adapter"].to_torch_state_dict()
    adapter["bert.encoder.layer.9.attention.self.query/A"] = adapter.pop(first)
    unknown.content.array_records["adapter"] = ArrayRecord(adapter)
    empty, _ = _query_reply(config, 7, 0)
    _corrupt_batch(empty, "b0/input_ids", torch.zeros(ids.shape[0], 0, dtype=torch.int32))
    _corrupt_batch(empty, "b0/attention_mask", torch.zeros(ids.shape[0], 0, dtype=torch.int32))
    kept = strategy._accept_queries(1, [ok, shape, dtype, vocab, nan, unknown, empty])
    assert list(kept) == [1]
    reasons = {s["node_id"]: s["reason"] for s in ledger._round["skipped"]}
    assert "shape" in reasons[2] and "dtypes" in reasons[3] and "token ids" in reasons[4]
    assert "NaN" in reasons[5] and "names differ" in reasons[6] and "shape" in reasons[7]


def test_causal_lm_labels_are_checked():
    ids = torch.randint(0, 50, (2, 6), dtype=torch.int32)
    mask = torch.ones_like(ids)

    def check(labels):
        return cola_fl.check_batches(ArrayRecord({"b0/input_ids": ids, "b0/attention_mask": mask, "b0/labels": labels}), 1, 4, 50, None, 16)

    assert check(ids.long().masked_fill(torch.rand(2, 6) < 0.3, -100)) is None
    assert "next-token labels" in check(torch.zeros(2, 5, dtype=torch.int64))
    assert "next-token labels" in check(torch.full((2, 6), 50, dtype=torch.int64))


def test_another_clients_adapter_id_is_rejected(cola_config, tmp_path):
    config = cola_config
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy = helpers.cola_strategy(config, ledger)
    first, _ = _query_reply(config, 1, 0)
    strategy._accept_queries(1, [first])
    impostor, _ = _query_reply(config, 1, 1)  # node 1 now claims partition 1's adapter
    assert strategy._accept_queries(1, [impostor]) == {}
    assert "holds adapter 0" in ledger._round["skipped"][0]["reason"]


def test_bad_fit_replies_are_skipped(cola_config, tmp_path):
    config = cola_config
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy = helpers.cola_strategy(config, ledger)
    (q, ctx) = _query_reply(config, 1, 0)
    batches = strategy._accept_queries(1, [q])
    fit_msg = strategy.configure_fit(strategy.hidden_pairs(batches), ConfigRecord(dict(config)))[0]
    good = helpers.cola_fit(fit_msg, ctx, config, (0, 2))
    state = good.content.array_records["adapter"].to_torch_state_dict()
    key = next(iter(state))
    bad_shape = Message(RecordDict({"adapter": ArrayRecord({**state, key: torch.zeros(3, 3)}), "metrics": good.content.metric_records["metrics"]}), reply_to=fit_msg)
    inf = Message(RecordDict({"adapter": ArrayRecord({**state, key: torch.full_like(state[key], float("inf"))}), "metrics": good.content.metric_records["metrics"]}), reply_to=fit_msg)
    versions = [Message(RecordDict({"adapter": good.content.array_records["adapter"], "metrics": MetricRecord(metrics)}), reply_to=fit_msg)
                for metrics in ({k: v for k, v in good.content.metric_records["metrics"].items() if k != "version"},
                                {**good.content.metric_records["metrics"], "version": -1}, {**good.content.metric_records["metrics"], "version": 1.5})]
    before = cola_fl.adapter_record(strategy.book.adapters[1]).to_torch_state_dict()
    _, metrics = strategy.aggregate_train(1, [bad_shape, inf, *versions])
    assert metrics["clients"] == 0
    assert all(torch.equal(v, before[k]) for k, v in cola_fl.adapter_record(strategy.book.adapters[1]).to_torch_state_dict().items())
    reasons = [s["reason"] for s in ledger._round["skipped"]]
    assert "shape (3, 3)" in reasons[0] and "NaN or Inf" in reasons[1]
    assert all("version must be an integer >= 0" in r for r in reasons[2:]) and len(reasons) == 5  # merged replies name their version


def test_client_rejects_malformed_pairs(cola_config):
    config = cola_config
    dims = specs.layer_dims(config)
    layer, (d_in, d_out) = next(iter(dims.items()))
    good = {f"b{i}/{n}/{p}": torch.zeros(3, di if p == "x" else do) for i in range(2) for n, (di, do) in dims.items() for p in ("x", "G")}
    assert len(cola_fl.pairs_from_payload(good, dims, 2)) == 2
    with pytest.raises(ValueError, match="do not fit"):
        cola_fl.pairs_from_payload({**good, f"b0/{layer}/x": torch.zeros(3, d_in + 1)}, dims, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        cola_fl.pairs_from_payload({**good, f"b1/{layer}/G": torch.full((3, d_out), float("nan"))}, dims, 2)
    with pytest.raises(ValueError, match="do not match this client's layers"):
        cola_fl.pairs_from_payload({**good, "b0/classifier.extra/x": torch.zeros(3, 2)}, dims, 2)


def test_client_side_evaluation_on_local_splits(cola_config, tmp_path):
    config = cola_config
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy = helpers.cola_strategy(config, ledger)
    contexts = {}
    for node in (1, 2):
        reply, contexts[node] = _query_reply(config, node, node - 1)
        strategy._accept_queries(1, [reply])
    requests = list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(dict(config)), grid=None))
    assert [m.metadata.dst_node_id for m in requests] == [1, 2]
    replies = [helpers.cola_query(m, contexts[m.metadata.dst_node_id], config, (m.metadata.dst_node_id - 1, 2)) for m in requests]
    local_val = [len(runtime.client_split(config, pid, 2, "validation")) for pid in (0, 1)]
    assert all(r.content.array_records["batch"]["b0/labels"].shape[0] == n for r, n in zip(replies, local_val))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["num-examples"] == sum(local_val) and 0.0 <= metrics["client-accuracy"] <= 1.0
    strategy._flush_round(1)
    records = ledger._round["clients"]
    assert sorted(c["node_id"] for c in records) == [1, 2]
    assert all("eval_accuracy" in c and c["eval_num_examples"] > 0 and c["loss"] is None for c in records)  # evaluated, not trained
    partition = data.load_partition(runtime.dataset_splits(config)["train"], "iid", 0, 2, config["seed"])
    assert len(runtime.client_split(config, 0, 2)) + local_val[0] == len(partition)  # the partition, split in two


def test_merged_linear_server_keeps_only_the_parameter_mean(cola_config):
    """Merged linear auxiliary models: the server holds S = sum_k n_k w_k, clients send changes; after a
    rejected reply the next accepted one carries the whole change, so the server's mean always equals
    the example-weighted mean of the adapters the clients hold, and W + dW(mean) the merged model.
    A round of 4 intervals through ``ColA.start``; node 1's update of interval 1 is lost."""
    config = cfg.build({**cola_config, "cola.adapter": "linear", "cola.weighting": "examples", "local-steps": 4})
    strategy = helpers.cola_strategy(config)
    grid = helpers.ColaLoopGrid([1, 2], config, lose=lambda r: strategy._step == 1 and r.metadata.message_type == "train.cola" and r.metadata.src_node_id == 1)
    contexts = grid.contexts
    examples = {n: len(runtime.client_split(config, n - 1, 2)) for n in (1, 2)}
    taken, delivered, queried = helpers.spy(strategy, "aggregate_train"), [0], []

    def held(node):
        return contexts[node].state.array_records[cola_client.ADAPTERS].to_torch_state_dict()

    def check(call):
        _, step = call.args
        new, delivered[0] = grid.replies[delivered[0]:], len(grid.replies)
        replies = [r for r in new if r.metadata.message_type == "query.cola"]
        answers = [r for r in new if r.metadata.message_type == "train.cola"]
        queried.append(sorted(r.metadata.src_node_id for r in replies))
        assert all(("adapter" in r.content.array_records) == (step == 0) for r in replies)
        _, metrics = taken[-1].result
        assert metrics["clients"] == len(answers)
        assert strategy.book.adapters == {} and set(strategy.book.mean.n) == {1, 2}
        mean = cola_fl.adapter_record(strategy.book.mean.adapters).to_torch_state_dict()
        w1, w2 = held(1), held(2)
        if step == 1:  # node 1's update is lost: the server keeps node 1's previous parameters
            assert any(not torch.allclose(mean[k], (examples[1] * w1[k] + examples[2] * w2[k]) / sum(examples.values()), atol=1e-7) for k in mean)
        else:
            for k in mean:
                assert torch.allclose(mean[k], (examples[1] * w1[k] + examples[2] * w2[k]) / sum(examples.values()), atol=1e-7), (step, k)

    helpers.spy(strategy, "end_interval", after=check)
    strategy.start(grid=grid, num_rounds=1, timeout=10, train_config=ConfigRecord(dict(config)))
    assert queried == [[1, 2], [], [1], []]  # batches ride on train replies; the node whose reply was lost is queried again
    per_client = {}
    for n in (1, 2):
        per_client[n] = specs.build_adapters(config, seed=0)
        cola_fl.load_adapter_record(per_client[n], contexts[n].state.array_records[cola_client.ADAPTERS])
    server = strategy.server
    exact = server.merged_weights(per_client, examples)
    for name, value in server.merged_weights(strategy.book.adapter_sets()).items():
        assert torch.allclose(value, exact[name], atol=1e-6), name


@pytest.mark.parametrize("upload_dtype, lost", [("fp16", "reply"), ("bf16", "reply"), ("fp32", "reply"), ("fp16", "message")])
def test_merged_replies_carry_changes_and_both_copies_stay_identical(cola_config, upload_dtype, lost):
    """Merged low-rank: a train reply carries Delta = w - w_acked in the upload dtype and the client keeps
    w_acked + Delta, so after every interval the server's copy of each client's auxiliary models equals the
    client's bit for bit. Node 1's train reply of interval 1 is lost (the client trained; the next accepted
    reply carries the whole change since the version the server holds), or the message itself (the client
    never trained: the version the server names is its current one). The gradients the server forms from
    its copy keep matching the client's fingerprint (no reply refused). Whole fp32 models are not a change."""
    config = cfg.build({**cola_config, "local-steps": 4, "cola.upload-dtype": upload_dtype, "cola.wire": "grads"})
    strategy = helpers.cola_strategy(config)
    interval_1 = lambda m, node: strategy._step == 1 and m.metadata.message_type == "train.cola" and node == 1  # noqa: E731
    grid = helpers.ColaLoopGrid([1, 2], config, **{"lose": lambda r: interval_1(r, r.metadata.src_node_id)} if lost == "reply"
                                else {"drop": lambda m: interval_1(m, m.metadata.dst_node_id)})
    initial, same = {}, []

    def check(call):
        _, step = call.args
        held = {n: cola_fl.adapter_record(a).to_torch_state_dict() for n, a in strategy.book.adapters.items()}
        initial.update({n: h for n, h in held.items() if n not in initial and step == 0})
        for n in (1, 2):
            client = grid.contexts[n].state.array_records[cola_client.ADAPTERS].to_torch_state_dict()
            same.append((step, n, all(torch.equal(held[n][k], client[k]) for k in client)))

    helpers.spy(strategy, "end_interval", after=check)
    strategy.start(grid=grid, num_rounds=1, timeout=10, train_config=ConfigRecord(dict(config)))
    assert same == [(step, n, lost == "message" or not (step == 1 and n == 1)) for step in range(4) for n in (1, 2)]
    assert strategy.skips.reasons == []
    formed = [(i, m.metadata.dst_node_id, "fingerprint" in m.content.config_records["control"]) for i, call in enumerate(grid.fit_calls()) for m in call]
    assert formed == [(i, n, not (i == 2 and n == 1)) for i in range(4) for n in (1, 2)]  # gradients from the server's copies, pairs after the loss
    packed = {"fp16": torch.float16, "bf16": torch.int16, "fp32": torch.float32}[upload_dtype]
    fits = [r.content.array_records["adapter"] for r in grid.replies if r.metadata.message_type == "train.cola"]
    assert fits and all(v.dtype == packed for r in fits for v in r.to_torch_state_dict().values())
    whole = cola_fl.adapter_record(strategy.book.adapters[1])
    assert (strategy.book.reply_problem(whole) is None) == (upload_dtype == "fp32")
    assert all(not torch.equal(initial[1][k], v) for k, v in cola_fl.adapter_record(strategy.book.adapters[1]).to_torch_state_dict().items() if k.endswith("/B"))


@pytest.mark.parametrize("adapter", ["low-rank", "linear"])
def test_next_interval_batches_ride_on_the_train_reply(cola_config, adapter):
    """One exchange per interval: the batches a train reply carries for the next interval are the ones a
    query would have fetched, so the adapters are bit-identical to querying every interval, with queries
    only in the first interval (and for a client whose reply was lost)."""
    config = cfg.build({**cola_config, "cola.adapter": adapter})
    message_config = ConfigRecord(dict(config))

    def run(fused: bool, lose: int | None = None):
        strategy, grid = helpers.cola_strategy(config), helpers.ColaLoopGrid([1, 2], config)
        for step in range(4):
            strategy._step = step
            batches = strategy.interval_batches(1, message_config, grid, timeout=10)
            fits = strategy.configure_fit(strategy.hidden_pairs(batches), message_config, grid, step + 1 if fused and step < 3 else None)
            answers = [a for a in grid.send_and_receive(fits) if not (step == 1 and a.metadata.src_node_id == lose)]
            strategy.aggregate_train(1, answers)
        return {n: cola_fl.adapter_record(a).to_torch_state_dict() for n, a in strategy.book.adapter_sets().items()}, grid.sent

    for lose in (None, 1):
        (queried, sent_queried), (fused, sent_fused) = run(False, lose), run(True, lose)
        assert sent_queried.count("query.cola") == 8 and sent_fused.count("query.cola") == (2 if lose is None else 3)
        assert sent_fused.count("train.cola") == sent_queried.count("train.cola") == 8
        assert queried.keys() == fused.keys()
        for n in queried:
            assert all(torch.equal(queried[n][k], fused[n][k]) for k in queried[n]), (lose, n)


def test_batches_nobody_asked_for_are_refused(cola_config, tmp_path):
    config = cola_config
    strategy, grid = helpers.cola_strategy(config), helpers.ColaLoopGrid([1], config)
    batches = strategy.interval_batches(1, ConfigRecord(dict(config)), grid, timeout=10)
    fit = strategy.configure_fit(strategy.hidden_pairs(batches), ConfigRecord(dict(config)))[0]
    fit.content.config_records["control"]["next-step"] = 1  # a client answering a question the server did not ask
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy.ledger = ledger
    ledger.begin_round(1)
    _, metrics = strategy.aggregate_train(1, grid.send_and_receive([fit]))
    assert metrics["clients"] == 0 and "nobody asked for" in ledger._round["skipped"][0]["reason"]


def test_a_train_message_to_a_client_without_state_is_refused(cola_config):
    """With one exchange per interval a client may get train messages without a query in between: one
    that lost its state must fail with the reason, never train fresh adapters the server does not hold."""
    config = cola_config
    strategy, grid = helpers.cola_strategy(config), helpers.ColaLoopGrid([1], config)
    batches = strategy.interval_batches(1, ConfigRecord(dict(config)), grid, timeout=10)
    fit = strategy.configure_fit(strategy.hidden_pairs(batches), ConfigRecord(dict(config)))[0]
    lost = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="no state for them"):
        helpers.cola_fit(fit, lost, config, (0, 2))
