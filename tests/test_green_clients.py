"""Per-client FLOPs budgets rho_k for FedAvg-LoRA clients (GreenTrainer, Huang et al., ICLR 2024,
Sec. 4, on each client's own data) and the server's per-tensor averaging of different subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from tests import helpers
from fedcola import client_app, specs, config as cfg
from fedcola import runtime
from fedcola.fedavg_lora import client as fedavg_lora
from fedcola.fl.ledger import Ledger
from strategies.fedavg_lora import FedAvgLoRA, per_tensor_fedavg

pytestmark = pytest.mark.usefixtures("one_thread", "task_identity")

CONFIG = cfg.build({"model": "minilm", "dataset": "rotten_tomatoes", "local-steps": 8, "batch-size": 4,
                    "data.max-length": 16, "lora.targets": "query,value", "lr": 1e-3})


@pytest.fixture(scope="module")
def global_state() -> dict[str, torch.Tensor]:
    return fedavg_lora.trainable_state(specs.fedavg_cached_model(CONFIG))


def test_weak_client_counts_fewer_flops_and_keeps_frozen_tensors(global_state):
    _, full, _, none = specs.fedavg_client_train(CONFIG, global_state, 0, 4, 1)
    weak_state, weak, examples, selection = specs.fedavg_client_train(CONFIG, global_state, 0, 4, 1, rho=0.7)

    names = selection.names
    assert none is None and 0 < len(names) < len(global_state) and selection.achieved_rho <= 0.7
    assert any("classifier" in n for n in names)  # the new head is cheap and important: always picked
    # same batches; the training steps within the budget; fewer FLOPs in all, even with the
    # selection's own profile + importance pass counted
    assert weak.examples == full.examples and examples > 0
    assert weak.flops - selection.flops <= 0.7 * 1.05 * full.flops
    assert weak.flops < full.flops
    for name, before in global_state.items():
        assert torch.equal(weak_state[name], before) == (name not in names), name
    # the cached model is left with every candidate trainable for the next round
    model = specs.fedavg_cached_model(CONFIG)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(global_state)


def _reply(node: int, arrays: dict, examples: int, trained: list[str] | None) -> Message:
    msg = Message(RecordDict({}), dst_node_id=node, message_type="train")
    metrics = {"num-examples": examples, "train-loss": 0.5, "flops": 100, "peak-memory-bytes": 1,
               "wall-time-s": 0.1, "partition-id": node}
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
    if trained is not None:
        content[fedavg_lora.TRAINED] = ConfigRecord({"names": trained})
    return Message(content, reply_to=msg)


def test_per_tensor_average_over_the_clients_that_trained_it():
    current = ArrayRecord({"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.full((2,), 7.0)})
    strong = {"a": torch.full((2,), 1.0), "b": torch.full((2,), 2.0), "c": torch.full((2,), 7.0)}
    weak = {"a": torch.full((2,), 4.0), "b": torch.zeros(2), "c": torch.full((2,), 7.0)}  # b, c untrained
    contents = [_reply(1, strong, 30, ["a", "b"]).content, _reply(2, weak, 10, ["a"]).content]
    out = per_tensor_fedavg(current, contents).to_torch_state_dict()
    torch.testing.assert_close(out["a"], torch.full((2,), (30 * 1.0 + 10 * 4.0) / 40))
    torch.testing.assert_close(out["b"], torch.full((2,), 2.0))  # only the strong client's update, undiluted
    torch.testing.assert_close(out["c"], torch.full((2,), 7.0))  # nobody trained it: unchanged


def test_all_clients_training_everything_is_fedavg():
    g = torch.Generator().manual_seed(0)
    current = ArrayRecord({k: torch.randn(3, 2, generator=g) for k in "xyz"})
    replies = [_reply(i, {k: torch.randn(3, 2, generator=g) for k in "xyz"}, n, t)
               for i, (n, t) in enumerate([(5, None), (11, list("xyz")), (2, None)], start=1)]
    contents = [m.content for m in replies]
    ours = per_tensor_fedavg(current, contents).to_torch_state_dict()
    flower = aggregate_arrayrecords(contents, "num-examples").to_torch_state_dict()
    for k in "xyz":
        torch.testing.assert_close(ours[k], flower[k])


def test_reply_naming_unknown_tensor_is_skipped(tmp_path):
    current = ArrayRecord({"a": torch.zeros(2)})
    ledger = Ledger(tmp_path / "l.json", "fedavg_lora", {})
    strategy = FedAvgLoRA(ledger=ledger)
    strategy._sent = current
    ledger.begin_round(1)
    good = _reply(1, {"a": torch.ones(2)}, 10, ["a"])
    bad = _reply(2, {"a": torch.full((2,), 9.0)}, 10, ["a", "ghost"])
    arrays, metrics = strategy.aggregate_train(1, [good, bad])
    torch.testing.assert_close(arrays.to_torch_state_dict()["a"], torch.ones(2))
    assert "ghost" in ledger._round["skipped"][0]["reason"] and len(ledger._round["clients"]) == 1


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


@pytest.mark.parametrize("rho", [0.0, 1.5, -0.3])
def test_node_green_rho_outside_unit_interval(rho):
    with pytest.raises(ValueError, match=r"green-rho must be in \(0, 1\]"):
        runtime.node_options(_context({"partition-id": 0, "num-partitions": 2, "green-rho": rho}))
    assert runtime.node_options(_context({"partition-id": 0, "num-partitions": 2})).green_rho == 1.0


def test_budget_too_small_for_any_lora_tensor(global_state):
    with pytest.raises(ValueError, match="smallest feasible rho is"):
        specs.fedavg_client_train(CONFIG, global_state, 0, 4, 1, rho=0.05)
    model = specs.fedavg_cached_model(CONFIG)
    assert np.all([p.requires_grad for n, p in model.named_parameters() if n in global_state])


def test_client_app_reply_carries_budget_and_trained_names(global_state, tmp_path):
    """The ClientApp's `train` handler under node config green-rho, and the strategy aggregating it."""
    from fedcola.client_app import train_handler

    content = RecordDict({"arrays": ArrayRecord(global_state), "config": ConfigRecord(CONFIG | {"server-round": 1})})
    msg = Message(content, dst_node_id=1, message_type="train")
    reply = train_handler(msg, _context({"partition-id": 1, "num-partitions": 4, "green-rho": 0.7}))
    metrics = reply.content.metric_records["metrics"]
    names = list(reply.content.config_records[fedavg_lora.TRAINED]["names"])
    assert metrics["green-rho"] == 0.7 and metrics["flops"] > 0 and 0 < len(names) < len(global_state)

    strategy = FedAvgLoRA(ledger=Ledger(tmp_path / "l.json", "fedavg_lora", {}))
    strategy._sent = ArrayRecord(global_state)
    strategy.ledger.begin_round(1)
    arrays, _ = strategy.aggregate_train(1, [reply])
    out = arrays.to_torch_state_dict()
    for name, before in global_state.items():  # one client: its trained tensors, the others unchanged
        assert torch.equal(out[name], before) == (name not in names), name
    assert strategy.ledger._round["clients"][0]["flops"] == metrics["flops"]


# ---------------------------------------------------------------- LTE clients

LTE_CONFIG = cfg.build({
    "method": "lte", "model": "gpt-tiny", "task": "causal-lm", "dataset": "hamlet", "data.max-length": 48,
    "data.block-chars": 48, "local-steps": 12, "batch-size": 8, "lr": 3e-3, "eval.max-examples": 48,
    "lte.r": 4, "lte.alpha": 8.0, "scratch.hidden": 32, "scratch.layers": 2, "scratch.heads": 4,
})


def test_lte_client_under_budget_trains_only_its_selected_heads_and_the_merge_averages_per_weight(tmp_path):
    """Node 11 has green-rho 0.7, node 10 none: node 11 trains only the heads GreenTrainer selected
    (A, B of every other head equal their snapshot), sends only those weights, counts fewer FLOPs in
    the ledger; the server's W moves by the mean over the clients that sent each weight, and both
    clients' W stay bit-identical to the server's."""
    from fedcola.lte import client as lte_client
    from fedcola.lte.merge import dense

    weights, frozen = helpers.lte_initial(LTE_CONFIG)
    ledger = Ledger(tmp_path / "ledger.json", "lte", LTE_CONFIG)
    strategy = helpers.lte_strategy(LTE_CONFIG, ledger)
    strategy._init_weights(weights)
    contexts = {10: _context({"partition-id": 0, "num-partitions": 2}),
                11: _context({"partition-id": 1, "num-partitions": 2, "green-rho": 0.7})}
    for rnd in (1, 2):
        W_old = {k: v.clone() for k, v in strategy.W.items()}
        replies = {node: client_app.lte_train(strategy._message(node, ConfigRecord(LTE_CONFIG), rnd), ctx, LTE_CONFIG)
                   for node, ctx in contexts.items()}
        deltas = {node: lte_client.record_delta(r.content.array_records["arrays"]) for node, r in replies.items()}
        assert deltas[10].keys() == W_old.keys() and 0 < len(deltas[11]) < len(W_old)
        state = contexts[11].state[lte_client.STATE_MODEL].to_torch_state_dict()
        for key in W_old:  # a head changed since its snapshot iff its weight was sent
            layer = key.removesuffix("W")
            moved = any(not torch.equal(state[layer + p], state[layer + p + "_snap"]) for p in ("A", "B"))
            assert moved == (key in deltas[11]), key
        strategy.aggregate_train(rnd, list(replies.values()))
        ledger.end_round(rnd)
        for key, w in strategy.W.items():
            sent = [dense(d[key]) for d in deltas.values() if key in d]
            torch.testing.assert_close(w, W_old[key] + sum(sent) / len(sent), rtol=0, atol=1e-6)
        flops = {c["node_id"]: c["flops"] for c in ledger.rounds[-1]["clients"]}
        assert flops[11] < flops[10]
        assert replies[11].content.metric_records["metrics"]["green-rho"] == 0.7
    model = specs.lte_model(LTE_CONFIG, head_seed=0)
    for node in contexts:
        lte_client.sync_model(strategy._payload(node), contexts[node], model, seed=0)
        assert all(torch.equal(model.get_submodule(k.rpartition(".")[0]).W, w) for k, w in strategy.W.items())
