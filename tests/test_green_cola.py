"""Green-ColA (issue 5, ColA integration): the ColA server updates only the adapted layers selected
under rho; their pairs alone travel, the backward stops at the deepest one, clients train only them."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from transformers import BertConfig, BertForSequenceClassification
from tests import helpers
from fedcola.cola import client as cola_client
from fedcola.cola import records as cola_fl
from fedcola.cola import gl
from fedcola import specs, config as cfg
from fedcola.cola.adapters import layer_dims, make_adapter
from fedcola.cola.server import ColaServer
from fedcola.green.cola import LayerSelector, aggregate_importance, layer_profile
from fedcola.fl.ledger import Ledger

pytestmark = pytest.mark.usefixtures("one_thread", "task_identity")


def _contexts(nodes):
    return {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in nodes}


def _state(context):
    return {k: v.clone() for k, v in context.state.array_records[cola_client.ADAPTERS].to_torch_state_dict().items()}


def _optimizer_state(context):
    return {k: v.clone() for k, v in context.state.array_records[cola_client.OPTIMIZER].to_torch_state_dict().items()}


@pytest.mark.parametrize("rho", [0.0, -0.5, 1.5])
def test_bad_rho_is_a_one_line_config_error(rho):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.build({"method": "cola", "cola.green-rho": rho})
    assert str(err.value) == f"config key 'cola.green-rho' must be in (0, 1], got {rho}"
    with pytest.raises(cfg.ConfigError, match="'cola.green-every' must be >= 1"):
        cfg.build({"method": "cola", "cola.green-every": 0})


def test_rho_one_is_plain_cola_and_a_probe_interval_equals_a_plain_interval(cola_config):
    """rho = 1 switches Green-ColA off; at rho < 1 the first interval (the probe: every layer) leaves the
    clients' adapters and optimizer state exactly as plain ColA's interval does."""
    assert helpers.cola_strategy(cola_config).green is None
    runs = {}
    for name, rho in (("plain", 1.0), ("green", 0.5)):
        config = cfg.build({**cola_config, "cola.green-rho": rho, "local-steps": 1})  # a round of one interval
        strategy, grid = helpers.cola_strategy(config), helpers.ColaLoopGrid([1, 2], config)
        strategy.start(grid=grid, num_rounds=1, timeout=10, train_config=ConfigRecord(dict(config)))
        (fits,) = grid.fit_calls()
        assert ("layers" in fits[0].content.config_records["control"]) == (name == "green")
        runs[name] = {n: (_state(c), _optimizer_state(c)) for n, c in grid.contexts.items()}
    for n in (1, 2):
        for plain, green in zip(runs["plain"][n], runs["green"][n]):
            assert plain.keys() == green.keys() and all(torch.equal(plain[k], green[k]) for k in plain)


def test_selection_respects_the_budget_and_prefers_important_layers(cola_config):
    strategy = helpers.cola_strategy(cfg.build({**cola_config, "cola.green-rho": 0.5}))
    profile = strategy.green.profile
    assert set(profile.names) == set(strategy.dims) and profile.names[0] == "classifier" and profile.t_dy[0] == 0  # the head: nothing to propagate
    assert profile.names[-1] == "bert.encoder.layer.0.attention.self.query" and np.all(profile.t_dy[1:] > 0)
    rng = np.random.default_rng(0)
    for rho in (0.05, 0.3, 0.5, 0.8, 1.0):
        selector = LayerSelector(profile, rho)
        for _ in range(20):
            importance = rng.uniform(0.01, 1.0, len(profile.names))
            assert selector.update({1: dict(zip(profile.names, importance))}, {1: 1.0})
            assert profile.backward_flops(selector.mask) <= rho * profile.full_backward_flops
            assert selector.backward_fraction <= rho
    selector = LayerSelector(profile, 0.5)  # only the head is worth anything: the backward is skipped altogether
    selector.update({1: {layer: 1.0 if layer == "classifier" else -1.0 for layer in profile.names}}, {1: 1.0})
    assert selector.selected == ("classifier",) and selector.backward_fraction == 0.0
    assert not selector.update({1: {layer: -1.0 for layer in profile.names}}, {1: 1.0})  # nothing positive: selection kept
    assert selector.selected == ("classifier",)


def test_rho_too_small_for_any_layer_names_the_smallest_feasible_rho(cola_config):
    config = cfg.build({**cola_config, "cola.targets": "query", "cola.green-rho": 0.01})
    with pytest.raises(ValueError, match="smallest feasible rho is"):
        helpers.cola_strategy(config)


def test_server_importance_is_the_weighted_mean_normalised():
    reports = {1: {"a": 2.0, "b": -1.0}, 2: {"a": 0.0, "b": 4.0}, 3: {"a": 9.0}}  # node 3 did not report "b": left out
    importance = aggregate_importance(("a", "b"), reports, {1: 1.0, 2: 3.0, 3: 100.0})
    expected = np.array([2.0 / 4, (-1.0 + 12.0) / 4])
    assert np.allclose(importance, expected / np.abs(expected).max())
    with pytest.raises(ValueError, match="every adapted layer"):
        aggregate_importance(("a", "b"), {3: {"a": 1.0}}, {3: 1.0})


def test_client_importance_is_minus_g_dot_dw_of_the_step_taken():
    torch.manual_seed(0)
    adapters = {"l1": torch.nn.Linear(4, 3), "l2": torch.nn.Linear(4, 2)}
    client = gl.GLClient(adapters, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    x, G = torch.randn(5, 4), {"l1": torch.randn(5, 3), "l2": torch.randn(5, 2)}
    grads = {layer: gl.vjp_grads(adapters[layer], x, G[layer]) for layer in adapters}
    client.step({layer: (x, G[layer]) for layer in adapters})
    for layer, g in grads.items():  # SGD: dw = -lr g, so I = lr |g|^2
        assert client.importance[layer] == pytest.approx(0.1 * sum(float(v.double().pow(2).sum()) for v in g.values()), rel=1e-6)


def test_unselected_layers_do_not_travel_and_stay_untouched_on_the_client(cola_config, tmp_path):
    """After the probe, a selected interval sends pairs of the selected layers only; on the client the
    other adapters and their AdamW state (weight decay on) are bitwise unchanged. One round of two
    intervals (the probe: every layer, then the selection) through ``ColA.start``."""
    config = cfg.build({**cola_config, "cola.green-rho": 0.5, "weight-decay": 0.1, "local-steps": 2})
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy, grid = helpers.cola_strategy(config, ledger), helpers.ColaLoopGrid([1, 2], config)
    before = {}

    def after_the_probe(call):
        if call.args == (1, 0):
            before.update({n: (_state(c), _optimizer_state(c)) for n, c in grid.contexts.items()})

    helpers.spy(strategy, "end_interval", after=after_the_probe)
    strategy.start(grid=grid, num_rounds=1, timeout=10, train_config=ConfigRecord(dict(config)))
    contexts = grid.contexts
    selected = [layer for layer in strategy.dims if layer in strategy.green.selected]
    assert 0 < len(selected) < len(strategy.dims)
    _, fits = grid.fit_calls()
    for msg in fits:
        assert list(msg.content.config_records["control"]["layers"]) == selected
        layers = {key.split("/")[1] for key in msg.content.array_records["pairs"].keys()}
        assert layers == set(selected)
    optimizer_index = {key: i for i, key in enumerate(cola_fl.adapter_record(specs.build_adapters(config, 0)).keys())}  # GLClient's order
    for n, context in contexts.items():
        weights, opt = _state(context), _optimizer_state(context)
        for key, value in weights.items():
            layer = key.split("/")[0]
            moved_state = any(not torch.equal(opt[k], before[n][1][k]) for k in opt if k.split("/")[0] == str(optimizer_index[key]))
            if layer in selected:
                assert not torch.equal(value, before[n][0][key]) and moved_state, key
            else:
                assert torch.equal(value, before[n][0][key]) and not moved_state, key
    server = ledger._round["server"]  # the round's record, written by `ColA.start`
    assert server["green"]["selected"] == selected and server["green"]["probe_intervals"] == 1
    assert 0 < server["backward_flops"] < server["flops"] and 0 < server["green"]["backward_fraction"] <= 0.5


def test_bad_importance_is_skipped_with_a_reason(cola_config, tmp_path):
    config = cfg.build({**cola_config, "cola.green-rho": 0.5})
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy, contexts = helpers.cola_strategy(config, ledger), _contexts((1,))
    strategy._step = 0
    queries = strategy.configure_train(1, ArrayRecord(), ConfigRecord(dict(config)), helpers.Nodes([1]))
    batches = strategy._accept_queries(1, [helpers.cola_query(queries[0], contexts[1], config, (0, 2))])
    strategy.begin_interval(1, 0)
    fit = strategy.configure_fit(strategy.hidden_pairs(batches), ConfigRecord(dict(config)))[0]
    reply = helpers.cola_fit(fit, contexts[1], config, (0, 2))
    assert set(reply.content.config_records["importance"]) == set(strategy.dims)  # named by layer on the wire
    reply.content.config_records["importance"] = ConfigRecord({layer: float("nan") for layer in strategy.dims})
    _, kept = strategy.aggregate_train(1, [reply])
    assert kept["clients"] == 0 and "importance record" in ledger._round["skipped"][0]["reason"]
    reply.content.config_records["importance"] = ConfigRecord({layer: 1.0 for layer in list(strategy.dims)[1:]})  # a layer missing
    _, kept = strategy.aggregate_train(1, [reply])
    assert kept["clients"] == 0 and "importance record" in ledger._round["skipped"][1]["reason"]


def test_each_clients_importance_reaches_the_server_under_its_layer(cola_config):
    """Values that tell layers apart: the server's aggregated importance of layer m is the mean of what
    the clients reported for m (max-normalised), whatever order either side lists the layers in."""
    config = cfg.build({**cola_config, "cola.green-rho": 0.5})
    strategy, contexts = helpers.cola_strategy(config), _contexts((1, 2))
    strategy._step = 0
    queries = strategy.configure_train(1, ArrayRecord(), ConfigRecord(dict(config)), helpers.Nodes([1, 2]))
    batches = strategy._accept_queries(1, [helpers.cola_query(q, contexts[q.metadata.dst_node_id], config, (q.metadata.dst_node_id - 1, 2)) for q in queries])
    strategy.begin_interval(1, 0)
    fits = strategy.configure_fit(strategy.hidden_pairs(batches), ConfigRecord(dict(config)))
    replies = [helpers.cola_fit(m, contexts[m.metadata.dst_node_id], config, (m.metadata.dst_node_id - 1, 2)) for m in fits]
    layers = list(strategy.dims)
    told = {n: {layer: float(n * 10 + i + 1) for i, layer in enumerate(reversed(layers))} for n in (1, 2)}
    for r in replies:
        r.content.config_records["importance"] = ConfigRecord(told[r.metadata.src_node_id])
    _, kept = strategy.aggregate_train(1, replies)
    assert kept["clients"] == 2 and strategy.green.reports == told
    strategy.end_interval(1, 0)
    mean = {layer: (told[1][layer] + told[2][layer]) / 2 for layer in layers}
    got = dict(zip(strategy.green.profile.names, strategy.green.importance.tolist()))
    assert got == pytest.approx({layer: v / max(mean.values()) for layer, v in mean.items()}, rel=1e-12)


def test_client_rejects_a_selection_of_unknown_layers(cola_config):
    config = cfg.build({**cola_config, "cola.green-rho": 0.5})
    with pytest.raises(ValueError, match="not adapted layers"):
        specs.cola_client_spec(config).selected(["bert.encoder.layer.9.attention.self.query"])


def test_measured_server_backward_flops_match_the_profile():
    """For every depth cutoff (and a sparse selection), the backward FLOPs FlopCounterMode counts in
    `ColaServer.hidden_grads` are at most the layer profile's T_bp(selection) and within 2.5% of it."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=500, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                                                     intermediate_size=512, num_labels=2))
    server = ColaServer(model, ["query", "value", "classifier"], mode="merged")
    ids = torch.randint(5, 500, (8, 32))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    profile = layer_profile(server.model, server.targets, inputs)
    adapters = {0: _adapters(server)}
    batches = {0: {**inputs, "labels": torch.randint(0, 2, (8,))}}
    names = profile.names
    selections = [names[: d + 1] for d in range(len(names))] + [(names[0], names[3], names[-1])]
    for chosen in selections:
        mask = np.array([n in chosen for n in names])
        predicted = profile.backward_flops(mask)
        measured = server.hidden_grads(batches, adapters, layers=chosen).backward_flops
        if predicted == 0:
            assert measured == 0, chosen
        else:
            assert measured <= predicted <= 1.025 * measured, (chosen, measured, predicted, predicted / measured)
    full = server.hidden_grads(batches, adapters).backward_flops
    assert full <= profile.full_backward_flops <= 1.025 * full, (full, profile.full_backward_flops)


def _adapters(server):
    """Low-rank auxiliary models with non-zero B on every adapted layer of `server`."""
    out = {}
    for layer, module in server.targets.items():
        d_in, d_out = layer_dims(module)
        out[layer] = make_adapter("low-rank", d_in, d_out, r=4, alpha=8.0)
        torch.nn.init.normal_(out[layer].B, std=0.02)
        out[layer].requires_grad_(False)
    return out
