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
from flwr.supercore.task_identity import TaskIdentity

from fedcola import lte_client, train
from fedcola.config import DEFAULTS
from fedcola.ledger import Ledger
from fedcola.lte import apply_merged_update, head_delta, head_parameters
from fedcola.wire import nbytes
from strategies.lte import LTE, make_strategy

R = 4
CONFIG = dict(DEFAULTS) | {
    "method": "lte", "model": "gpt-tiny", "task": "causal-lm", "dataset": "hamlet", "data.max-length": 48,
    "data.block-chars": 48, "local-steps": 12, "batch-size": 8, "lr": 3e-3, "eval.max-examples": 48,
    "lte.r": R, "lte.alpha": 8.0, "scratch.hidden": 32, "scratch.layers": 2, "scratch.heads": 4,
}
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


@pytest.fixture(autouse=True)
def _one_thread_and_identity():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    torch.set_num_threads(threads)


def _context(pid: int, n: int = 2) -> Context:
    return Context(run_id=1, node_id=10 + pid, node_config={"partition-id": pid, "num-partitions": n}, state=RecordDict(), run_config={})


def _factor_bytes(W: dict[str, torch.Tensor], rank: int) -> int:
    """Wire bytes of rank-``rank`` factors for every weight (what a client must send)."""
    zeros = {}
    for key, w in W.items():
        zeros |= {f"{key}@U": torch.zeros(w.shape[0], rank), f"{key}@V": torch.zeros(rank, w.shape[1])}
    return nbytes(ArrayRecord(zeros))


def test_client_state_round_trips_through_context_state():
    model = lte_client.build_model(CONFIG, head_seed=1)
    optimizer = train.make_optimizer("adamw", head_parameters(model), 1e-2, 0.0)
    batch = {"input_ids": torch.randint(2, 60, (2, 12)), "labels": torch.randint(2, 60, (2, 12))}
    for _ in range(2):
        train.train_steps(model, iter([batch, batch]), 2, optimizer)
        apply_merged_update(model, head_delta(model))  # W moves, snapshot (A~, B~) <- (A, B) != 0
    state = RecordDict()
    lte_client.save_state(state, model, optimizer, version=7, rounds=2)
    state = recorddict_from_proto(recorddict_to_proto(state))  # what a SuperNode persists
    again = lte_client.build_model(CONFIG, head_seed=99)
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
    weights, frozen = lte_client.initial_arrays(CONFIG)
    ledger = Ledger(tmp_path / "ledger.json", "lte", CONFIG)
    strategy = LTE(r=R, frozen_arrays=frozen, ledger=ledger)
    strategy._init_weights(weights)
    contexts = {10: _context(0), 11: _context(1)}
    for rnd in (1, 2):
        replies = [lte_client.lte_train(strategy._message(node, ConfigRecord(CONFIG), rnd), ctx, CONFIG) for node, ctx in contexts.items()]
        _poison(replies[1])
        strategy.aggregate_train(rnd, replies)
        ledger.end_round(rnd)
        assert [s["node_id"] for s in ledger.rounds[-1]["skipped"]] == [11] and "non-finite" in ledger.rounds[-1]["skipped"][0]["reason"]
    model = lte_client.build_model(CONFIG, head_seed=0)
    lte_client.sync_model(strategy._payload(10), contexts[10], model)
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
        reply = lte_client.lte_train(msg, context, dict(msg.content.config_records["config"]))
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
        evaluator = lte_client.make_evaluator(config)
        weights = None
        for ledger, phase in zip(ledgers, ({"lte.async": False}, {"lte.async": True})):
            strategy, initial = make_strategy(config | phase, ledger)

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
