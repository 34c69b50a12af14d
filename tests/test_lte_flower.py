"""LTE on Flower (Huh et al., arXiv 2402.16828): client state, the sync/async strategies end to end
in Flower's simulation engine on a tiny character-level GPT on hamlet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from safetensors.torch import load_file

from tests import helpers
from fedcola import client_app, specs, runtime, server_app, train
from fedcola.lte import client as lte_client
from fedcola.config import DEFAULTS
from fedcola.fl.ledger import Ledger
from fedcola.lte.heads import LTELinear, apply_merged_update, head_delta, head_parameters, reset_heads
from fedcola.lte.merge import dense, use_factors
from fedcola.lte.client import record_delta
from fedcola.fl.wire import nbytes
from strategies.lte import LTE

R = 4
CONFIG = dict(DEFAULTS) | {
    "method": "lte", "model": "gpt-tiny", "task": "causal-lm", "dataset": "hamlet", "data.max-length": 48,
    "data.block-chars": 48, "local-steps": 12, "batch-size": 8, "lr": 3e-3, "eval.max-examples": 48,
    "lte.r": R, "lte.alpha": 8.0, "scratch.hidden": 32, "scratch.layers": 2, "scratch.heads": 4,
}
FAST = CONFIG | {"local-steps": 3}  # in-process runs: a few steps show every property
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


pytestmark = pytest.mark.usefixtures("one_thread", "task_identity")


def _context(pid: int, n: int = 2) -> Context:
    return Context(run_id=1, node_id=10 + pid, node_config={"partition-id": pid, "num-partitions": n}, state=RecordDict(), run_config={})


def _factor_bytes(W: dict[str, torch.Tensor], rank: int) -> int:
    """Wire bytes of rank-``rank`` factors for every weight (what a client must send)."""
    zeros = {}
    for key, w in W.items():
        zeros |= {f"{key}@U": torch.zeros(w.shape[0], rank), f"{key}@V": torch.zeros(rank, w.shape[1])}
    return nbytes(ArrayRecord(zeros))


def test_client_state_round_trips_through_context_state():
    model = specs.lte_model(CONFIG, head_seed=1)
    optimizer = train.make_optimizer("adamw", head_parameters(model), 1e-2, 0.0)
    batch = {"input_ids": torch.randint(2, 60, (2, 12)), "labels": torch.randint(2, 60, (2, 12))}
    for _ in range(2):
        train.train_steps(model, iter([batch, batch]), 2, optimizer)
        apply_merged_update(model, head_delta(model))  # W moves, snapshot (A~, B~) <- (A, B) != 0
    state = RecordDict()
    lte_client.save_state(state, model, optimizer, version=7, rounds=2)
    state = recorddict_from_proto(recorddict_to_proto(state))  # what a SuperNode persists
    again = specs.lte_model(CONFIG, head_seed=99)
    opt2 = train.make_optimizer("adamw", head_parameters(again), 1e-2, 0.0)
    assert lte_client.restore_model(state, again) == (7, 2)
    train.load_optimizer_record(opt2, state[lte_client.STATE_OPTIMIZER])
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and any(k.endswith("B_snap") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    s1, s2 = optimizer.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(torch.as_tensor(s1[i][k]), torch.as_tensor(s2[i][k])) for i in s1 for k in s1[i])


def test_client_w_tracks_server_w_exactly_and_bad_delta_is_skipped(tmp_path):
    """Full sync, then merged updates as factors: the client's W stays bit-identical to the master."""
    weights, frozen = helpers.lte_initial(CONFIG)
    ledger = Ledger(tmp_path / "ledger.json", "lte", CONFIG)
    strategy = helpers.lte_strategy(CONFIG, ledger)
    strategy._init_weights(weights)
    contexts = {10: _context(0), 11: _context(1)}
    for rnd in (1, 2):
        replies = [client_app.lte_train(strategy._message(node, ConfigRecord(CONFIG), rnd), ctx, CONFIG) for node, ctx in contexts.items()]
        _poison(replies[1])
        strategy.aggregate_train(rnd, replies)
        ledger.end_round(rnd)
        assert [s["node_id"] for s in ledger.rounds[-1]["skipped"]] == [11] and "non-finite" in ledger.rounds[-1]["skipped"][0]["reason"]
    model = specs.lte_model(CONFIG, head_seed=0)
    lte_client.sync_model(strategy._payload(10), contexts[10], model, seed=0)
    assert all(torch.equal(model.get_submodule(k.rpartition(".")[0]).W, w) for k, w in strategy.W.items())


def _poison(reply: Message) -> None:
    """A client whose delta went NaN (same keys and shapes)."""
    arrays = reply.content.array_records["arrays"]
    name = next(iter(arrays))
    arrays[name] = Array(np.full(arrays[name].shape, np.nan, dtype=np.float32))


def _client_app(nan_partition: int | None = None, slow_partition: int | None = None) -> ClientApp:
    app = ClientApp()

    @app.train("lte")
    def train_lte(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        if pid == slow_partition:
            context.node_config["slowdown"] = 2.5
        reply = client_app.lte_train(msg, context, dict(msg.content.config_records["config"]))
        if pid == nan_partition:
            _poison(reply)
        return reply

    return app


def _server_app(config: dict, rounds: int, ledgers: list[Ledger], out: dict) -> ServerApp:
    """Synchronous LTE for ``rounds`` rounds, then LTEAsync from its weights on the same clients."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        evaluator = specs.lte_evaluator(config)
        weights = None
        for ledger, phase in zip(ledgers, ({"lte.async": False}, {"lte.async": True})):
            strategy, initial = specs.lte_strategy(config | phase, ledger)

            def evaluate_fn(server_round: int, arrays: ArrayRecord, ledger: Ledger = ledger) -> MetricRecord:
                metrics = evaluator(arrays)
                ledger.server(server_round, **metrics)
                ledger.end_round(server_round)
                return MetricRecord(metrics)

            result = strategy.start(grid=grid, initial_arrays=weights or initial, num_rounds=rounds,
                                    train_config=ConfigRecord(config | phase), evaluate_fn=evaluate_fn)
            weights = result.arrays
            out[type(strategy).__name__] = (strategy, result)

    return app


def test_lte_simulation_sync_then_async(tmp_path):
    """3 clients: partition 2 replies NaN, partition 1 is a straggler (slowdown 2.5).

    Sync: validation loss falls, each kept client sends rank-r (round 1) / rank-2r (round 2) factors,
    less than dense W, the NaN reply is skipped. Async (continuing from the sync weights): the target
    merges complete and the straggler's deltas were merged with staleness > 0 at a discounted weight.
    """
    config = CONFIG | {"num-clients": 3}
    ledgers, out = [Ledger(tmp_path / f"{name}.json", "lte", config) for name in ("sync", "async")], {}
    run_simulation(server_app=_server_app(config, 2, ledgers, out), client_app=_client_app(nan_partition=2, slow_partition=1),
                   num_supernodes=3, backend_config=BACKEND)

    strategy, result = out["LTE"]
    evals = result.evaluate_metrics_serverapp
    assert evals[2]["loss"] < evals[0]["loss"] - 0.3, evals
    dense = nbytes(ArrayRecord(strategy.W))
    for rnd, rank in ((1, R), (2, 2 * R)):  # after the first merge the delta carries the snapshot term
        record = next(r for r in ledgers[0].rounds if r["round"] == rnd)
        assert sorted(c["partition_id"] for c in record["clients"]) == [0, 1]
        assert all(c["bytes_up"] == _factor_bytes(strategy.W, rank) < dense for c in record["clients"]), record["clients"]
        assert len(record["skipped"]) == 1 and "non-finite" in record["skipped"][0]["reason"]
        assert all(c["bytes_down"] < dense for c in record["clients"]) == (rnd == 2)  # full W once, then factors

    strategy, result = out["LTEAsync"]
    log = strategy.merge_log
    assert [m["version"] for m in log] == list(range(1, 7)) and {m["partition_id"] for m in log} == {0, 1}
    slow = [m for m in log if m["partition_id"] == 1]
    assert all(m["staleness"] > 0 and m["weight"] < 1 / 3 for m in slow), log
    assert [r["round"] for r in ledgers[1].rounds] == [0, 1, 2] and ledgers[1].rounds[1]["server"]["merges"]
    assert any("non-finite" in s["reason"] for r in ledgers[1].rounds for s in r["skipped"])
    assert result.evaluate_metrics_serverapp[2]["loss"] < evals[2]["loss"]


# --- in-process runs: the strategy's messages handled by lte_client.lte_train, no Ray ----------------


def _run(config: dict, rounds: int, n: int = 2, strategy: LTE | None = None) -> tuple[LTE, dict[int, Context], list[list[Message]]]:
    """``rounds`` synchronous rounds of ``n`` clients; returns the strategy, the clients' contexts and
    every round's replies."""
    weights, frozen = helpers.lte_initial(config)
    strategy = strategy or helpers.lte_strategy(config)
    strategy._init_weights(weights)
    contexts = {10 + p: _context(p, n) for p in range(n)}
    history = []
    for rnd in range(1, rounds + 1):
        replies = [client_app.lte_train(strategy._message(node, ConfigRecord(config), rnd), ctx, config) for node, ctx in contexts.items()]
        strategy.aggregate_train(rnd, replies)
        history.append(replies)
    return strategy, contexts, history


def _flat(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def test_run_is_reproducible_from_its_seed_and_the_cached_model_carries_nothing_over():
    """Same seed, same W bit for bit: once with a freshly built client model, once with the process's
    cached model left dirty by the first run (every client state is loaded into it per message)."""
    specs._lte_cached_model.cache_clear()
    first, _, replies_a = _run(FAST, rounds=2)
    assert specs.lte_cached_model(FAST) is specs.lte_cached_model(FAST | {"server-round": 7})
    again, _, replies_b = _run(FAST, rounds=2)
    other, _, _ = _run(FAST | {"seed": 1}, rounds=2)
    assert first.W.keys() == again.W.keys() == other.W.keys()
    assert all(torch.equal(first.W[k], again.W[k]) for k in first.W)
    for ra, rb in zip(replies_a[-1], replies_b[-1], strict=True):
        a, b = _flat(ra.content.array_records["arrays"]), _flat(rb.content.array_records["arrays"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(first.W[k], other.W[k]) for k in first.W)
    # first contact re-draws the heads of the cached model exactly as building it with the client's seed
    cached, fresh = specs.lte_cached_model(FAST), specs.lte_model(FAST, head_seed=5)
    reset_heads(cached, 5)
    heads = lambda m: {n: t for n, t in m.state_dict().items() if n.endswith((".A", ".B", "A_snap", "B_snap"))}
    assert heads(cached).keys() == heads(fresh).keys() and all(torch.equal(heads(cached)[n], t) for n, t in heads(fresh).items())


def test_factors_travel_both_ways_never_a_dense_delta_when_factors_are_smaller():
    config = FAST | {"scratch.hidden": 64}  # vocab ~65: lm_head 65 x 64 still smaller as rank-2r factors
    strategy, contexts, history = _run(config, rounds=2)
    shapes = {k: tuple(w.shape) for k, w in strategy.W.items()}
    for rnd, rank in ((0, R), (1, 2 * R)):
        for reply in history[rnd]:
            arrays = _flat(reply.content.array_records["arrays"])
            for key, (d_out, d_in) in shapes.items():
                assert use_factors(rank, d_out, d_in), key
                assert key not in arrays and arrays[key + "@U"].shape == (d_out, rank) and arrays[key + "@V"].shape == (rank, d_in)
    down = strategy._payload(10)  # round 3's message to a client holding version 1: the merged update of round 2
    assert set(down.array_records) == {"update.2"}
    update = _flat(down.array_records["update.2"])
    for key, (d_out, d_in) in shapes.items():  # the mean of 2 rank-2r deltas: rank 4r
        assert key not in update and update[key + "@U"].shape == (d_out, 4 * R) and update[key + "@V"].shape == (4 * R, d_in)
    # where factors are not smaller, the dense delta travels: rank 64 > 32 * 32 / 64
    wide = FAST | {"lte.r": 64, "lte.alpha": 128.0}
    _, _, history = _run(wide, rounds=1, n=1)
    arrays = _flat(history[0][0].content.array_records["arrays"])
    q = "model.layers.0.self_attn.q_proj.W"
    assert q in arrays and arrays[q].shape == (32, 32) and q + "@U" not in arrays


def _tamper(reply: Message, key: str, U: torch.Tensor, V: torch.Tensor) -> None:
    arrays = reply.content.array_records["arrays"]
    arrays[key + "@U"], arrays[key + "@V"] = Array(U.numpy()), Array(V.numpy())


def test_bad_rank_shape_and_staleness_are_dropped_with_a_logged_reason(tmp_path, caplog):
    weights, frozen = helpers.lte_initial(FAST)
    ledger = Ledger(tmp_path / "ledger.json", "lte", FAST)
    strategy, contexts, history = _run(FAST, 1, n=3, strategy=helpers.lte_strategy(CONFIG, ledger))
    key = "model.layers.0.mlp.down_proj.W"
    d_out, d_in = strategy.W[key].shape
    replies = [client_app.lte_train(strategy._message(node, ConfigRecord(FAST), 2), ctx, FAST) for node, ctx in contexts.items()]
    _tamper(replies[1], key, torch.zeros(d_out, 2 * R + 1), torch.zeros(2 * R + 1, d_in))  # rank above 2r
    _tamper(replies[2], key, torch.zeros(d_out + 1, 2 * R), torch.zeros(2 * R, d_in))  # wrong shape
    W_before = {k: v.clone() for k, v in strategy.W.items()}
    good = record_delta(replies[0].content.array_records["arrays"])
    strategy.aggregate_train(2, replies)
    ledger.end_round(2)
    skipped = {s["node_id"]: s["reason"] for s in ledger.rounds[-1]["skipped"]}
    assert "rank 9 exceeds 8" in skipped[11] and "do not give" in skipped[12], skipped
    assert [c["node_id"] for c in ledger.rounds[-1]["clients"]] == [10] and strategy.version == 2
    assert all(torch.allclose(strategy.W[k], W_before[k] + dense(good[k]), rtol=0, atol=1e-6) for k in strategy.W)
    assert "skipping reply from node 11" in caplog.text

    # asynchronous: node 11 trains against version 2; nodes 10 and 12 merge twice before it arrives
    async_ledger = Ledger(tmp_path / "async.json", "lte", FAST)
    late = helpers.lte_strategy(FAST, async_ledger, asynchronous=True, max_staleness=1, mix=1 / 3)
    late._init_weights(ArrayRecord(strategy.W))
    late.sent = {node: (0, 0) for node in contexts}
    late.version, late.history = 2, {}
    messages = {node: late._message(node, ConfigRecord(FAST), 1) for node in contexts}
    straggler = client_app.lte_train(messages[11], contexts[11], FAST)
    for node in (10, 12):
        assert late._merge_reply(1, client_app.lte_train(messages[node], contexts[node], FAST), 1 / 3)
    W_before = {k: v.clone() for k, v in late.W.items()}
    assert not late._merge_reply(1, straggler, 1 / 3)
    assert all(torch.equal(late.W[k], W_before[k]) for k in late.W) and late.version == 4
    reason = async_ledger._round["skipped"][-1]["reason"]
    assert async_ledger._round["skipped"][-1]["node_id"] == 11 and "staleness 2 > max_staleness 1" in reason
    # the run goes on: the straggler is re-dispatched with the updates it lacks and its next delta merges
    retry = client_app.lte_train(late._message(11, ConfigRecord(FAST), 1), contexts[11], FAST)
    assert late._merge_reply(1, retry, 1 / 3) and late.merge_log[-1]["partition_id"] == 1 and late.merge_log[-1]["staleness"] == 0


def test_fedavg_full_rank_is_the_mean_of_fully_trained_clients_and_one_client_is_centralized(tmp_path):
    """``lte.full-rank``: every parameter is trained and travels dense; W = mean of the clients' weights.
    One client, one round: exactly ``server_app.run_centralized`` (same init, data, batches, optimizer)."""
    config = FAST | {"lte.full-rank": True}
    W0 = {k: v.clone() for k, v in helpers.lte_initial(config)[0].to_torch_state_dict().items()}
    strategy, contexts, history = _run(config, rounds=1)
    assert set(strategy.W) == {name for name, _ in specs.lte_model(config, 0).named_parameters()}
    assert not any(isinstance(m, LTELinear) for m in specs.lte_model(config, 0).modules())
    clients = [{k: v for k, v in ctx.state[lte_client.STATE_MODEL].to_torch_state_dict().items() if k in strategy.W} for ctx in contexts.values()]
    for key, w in strategy.W.items():
        assert not torch.equal(w, W0[key]), key  # embeddings and norms train too
        torch.testing.assert_close(w, (clients[0][key] + clients[1][key]) / 2, rtol=0, atol=1e-6)
    for reply in history[0]:
        assert _flat(reply.content.array_records["arrays"]).keys() == strategy.W.keys()  # dense, every parameter

    one = config | {"num-clients": 1, "rounds": 1}
    fedavg, _, _ = _run(one, rounds=1, n=1)
    ledger = server_app.run_centralized(one | {"lte.full-rank": False}, tmp_path / "central")
    central = load_file(tmp_path / "central" / "final.safetensors")
    assert central.keys() == fedavg.W.keys()
    for key in central:
        torch.testing.assert_close(fedavg.W[key], central[key], rtol=0, atol=1e-6)
    assert ledger.data["method"] == "centralized" and ledger.rounds[1]["server"]["loss"] < ledger.rounds[0]["server"]["loss"]


def test_slowdown_from_node_config_or_run_config():
    node = lambda pid, s=1.0: runtime.NodeOptions(pid, 4, s)
    config = FAST | {"lte.slowdown": "3:4, 1:2.5"}
    assert [specs.lte_slowdown(config, node(p)) for p in range(4)] == [1.0, 2.5, 1.0, 4.0]
    assert specs.lte_slowdown(config, node(0, 3.0)) == 3.0  # the node's own config wins
    for bad in ("3", "x:2", "1:0.5", "1:nan", "1:2,2:0", "1:2,x:3", "1:2,2:nan"):
        with pytest.raises(ValueError, match="lte.slowdown"):
            specs.lte_slowdown(FAST | {"lte.slowdown": bad}, node(0))
        with pytest.raises(ValueError, match="lte.slowdown"):
            specs.lte_strategy(FAST | {"lte.slowdown": bad})  # the server refuses it before any client runs
