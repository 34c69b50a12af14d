"""ColA through its own loop, ``ColA.start``, on fedcola's own clients answering in process
(``helpers.ColaLoopGrid``): unmerged (low-rank), detached (MLP) and merged (low-rank) auxiliary models, each
with fraction-train 0.5 of 4 nodes, so that every interval trains a seeded sample of 2 clients."""

import math

import pytest
import torch
from flwr.app import ConfigRecord

from fedcola import config as cfg
from fedcola import models
from fedcola.cola import client as cola_client
from fedcola.cola import records as cola_fl
from fedcola.fl import ledger as ledgers
from fedcola.fl.ledger import Ledger
from tests import helpers

pytestmark = pytest.mark.usefixtures("one_thread", "task_identity")

NODES = [1, 2, 3, 4]
ROUNDS, STEPS = 2, 3  # 6 intervals


def _adapters(strategy) -> dict[int, dict[str, torch.Tensor]]:
    """The auxiliary models the server holds, per node."""
    return {n: helpers.adapter_state(cola_fl.adapter_record(a)) for n, a in strategy.book.adapters.items()}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def _intervals(grid) -> list[tuple[list[int], set[int]]]:
    """Per interval, in order: the nodes its train.cola messages went to, and the nodes it queried first."""
    out, queried = [], set()
    for call in grid.calls:
        if not call or all(helpers.is_evaluation(m) for m in call):
            continue
        nodes = {m.metadata.dst_node_id for m in call}
        if call[0].metadata.message_type == helpers.QUERY:
            queried = nodes
        else:
            out.append((sorted(nodes), queried))
            queried = set()
    return out


@pytest.mark.parametrize("mode, adapter", [("unmerged", "low-rank"), ("detached", "mlp"), ("merged", "low-rank")])
def test_a_sampled_run_through_the_strategy_loop_trains_every_sampled_client(cola_config, tmp_path, mode, adapter):
    config = cfg.build({**cola_config, "cola.mode": mode, "cola.adapter": adapter, "num-clients": len(NODES),
                        "fraction-train": 0.5, "local-steps": STEPS})
    ledger = Ledger(tmp_path / "ledger.json", "cola", config)
    strategy = helpers.cola_strategy(config, ledger)
    grid = helpers.ColaLoopGrid(NODES, config, num_partitions=len(NODES))

    # each interval: the nodes that replied trained (their server-held models changed), the others kept theirs
    held, trained = [], []
    helpers.spy(strategy, "aggregate_train", before=lambda *_: held.append(_adapters(strategy)),
                after=lambda call: trained.append(sorted(r.metadata.src_node_id for r in call.args[1])))
    helpers.spy(strategy, "end_interval", after=lambda _: held.append(_adapters(strategy)))

    result = strategy.start(grid=grid, num_rounds=ROUNDS, timeout=10, train_config=ConfigRecord(dict(config)))
    ledger.finish("completed")

    # sampling: ceil(0.5 * 4) = 2 nodes an interval, the strategy's sample seeded by the run seed and the
    # interval; not the same pair every interval; only sampled nodes are queried and trained
    intervals = _intervals(grid)
    assert len(intervals) == ROUNDS * STEPS
    sampled = [nodes for nodes, _ in intervals]
    again, other_seed = helpers.cola_strategy(config), helpers.cola_strategy(cfg.build({**config, "seed": 1}))
    assert sampled == [again.sample(helpers.Nodes(NODES), step) for step in range(ROUNDS * STEPS)]
    assert sampled != [other_seed.sample(helpers.Nodes(NODES), step) for step in range(ROUNDS * STEPS)]
    assert all(len(nodes) == math.ceil(0.5 * len(NODES)) and set(nodes) <= set(NODES) for nodes in sampled)
    assert len({tuple(nodes) for nodes in sampled}) > 1
    assert all(queried <= set(nodes) for nodes, queried in intervals)
    assert trained == sampled  # every reply accepted

    for (before, after), nodes in zip(zip(held[::2], held[1::2]), sampled):
        assert set(before) >= set(nodes)  # the sampled nodes' models were known before their replies came
        for n in before:
            assert _changed(before[n], after[n]) == (n in nodes), (n, nodes)

    # every client that was sampled trained its own models; the server holds exactly what each client holds
    initial = {r.metadata.src_node_id: helpers.adapter_state(r.content.array_records["adapter"])
               for r in grid.replies if r.metadata.message_type == helpers.QUERY and "adapter" in r.content.array_records}
    final = _adapters(strategy)
    assert set(final) == set(initial) == {n for nodes in sampled for n in nodes}
    for n, models_n in final.items():
        assert _changed(initial[n], models_n), n
        client = grid.contexts[n].state.array_records[cola_client.ADAPTERS].to_torch_state_dict()
        assert not _changed(models_n, client), n
    if mode != "merged":  # personal models
        assert all(_changed(final[a], final[b]) for a in final for b in final if a < b)

    # no reply skipped; each round's ledger lists the clients it trained, with a finite loss
    saved = ledgers.load(ledger.path)
    assert [r["round"] for r in saved["rounds"]] == list(range(1, ROUNDS + 1))
    for r in saved["rounds"]:
        assert r["skipped"] == []
        in_round = {n for nodes in sampled[(r["round"] - 1) * STEPS: r["round"] * STEPS] for n in nodes}
        assert {c["node_id"] for c in r["clients"] if c["loss"] is not None} == in_round
        assert all(math.isfinite(c["loss"]) for c in r["clients"] if c["loss"] is not None)
        assert math.isfinite(result.train_metrics_clientapp[r["round"]]["train-loss"])
        assert result.evaluate_metrics_clientapp[r["round"]]["num-examples"] > 0

    # the frozen base model never changes; merged: W + mean dW differs from W
    base = dict(models.load_model(config["model"], "classification", num_labels=2).named_parameters())
    assert all(torch.equal(p, base[name]) for name, p in strategy.server.model.named_parameters())
    if mode == "merged":
        merged = strategy.server.merged_weights(strategy.book.adapter_sets())
        assert merged.keys() and all(name in base for name in merged)
        assert any(not torch.allclose(w, base[name]) for name, w in merged.items())
