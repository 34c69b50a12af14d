"""What a ColA train message carries (``fedcola.cola.payload``): shared inputs sent once change no number;
the gradients the server forms (``grads``) give the step the pairs give and peft's LoRA step (low rank),
the full fine-tuning gradient (linear); ``auto`` sends the smaller; a malformed payload or gradients
formed with another client's parameters are refused; int8 pairs are an unbiased approximation whose
gradient error is measured here; the Flower round trip sends and applies each kind."""

from __future__ import annotations

import copy

import pytest
import torch
from flwr.app import ConfigRecord
from torch.utils.flop_counter import FlopCounterMode

from fedcola import config as cfg
from fedcola.cola import payload
from fedcola.cola.adapters import MLP, layer_dims, make_adapter
from fedcola.cola.gl import GLClient, vjp_grads
from fedcola.cola.server import ColaServer
from fedcola.fl import wire
from tests import helpers
from tests.test_cola_flower import _query_reply
from tests.test_cola_equivalence import CASES, OPTIMIZERS, batch, bert, lowrank, model_loss, peft_lora, rel, tol

pytestmark = pytest.mark.usefixtures("one_thread", "task_identity")


def _pairs(model: str, dtype: torch.dtype, interval: int = 1):
    """The server's pairs of ``interval`` batches for one client with LoRA-initialised adapters (B non-zero)."""
    make, patterns, kind = CASES[model]
    base = make().to(dtype)
    server = ColaServer(copy.deepcopy(base), patterns, "merged", dtype=dtype)
    adapters = {n: a.to(dtype) for n, a in lowrank(server.targets, seed=2).items()}
    data = [batch(kind, 6, 10, seed=1 + i) for i in range(interval)]
    return base, patterns, adapters, data, [server.hidden_grads({"c": d}, {"c": adapters}).pairs["c"] for d in data]


def _step_with(adapters: dict, per_batch: list, grads: dict | None, interval: int) -> dict:
    """The update of one interval on a copy of ``adapters``: VJP steps on ``per_batch``, ``grads`` at its end."""
    mine = copy.deepcopy(adapters)
    before = {n: {k: p.detach().clone() for k, p in a.named_parameters()} for n, a in mine.items()}
    client = GLClient(mine, OPTIMIZERS["sgd"], interval=interval)
    for i, pairs in enumerate(per_batch):
        client.step(pairs, mean_grads=grads if i == interval - 1 else None)
    return {n: {k: p.detach() - before[n][k] for k, p in a.named_parameters()} for n, a in mine.items()}


@pytest.mark.parametrize("model", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_a_grads_step_equals_a_pairs_step_and_a_peft_lora_step(model, dtype):
    base, patterns, adapters, data, per_batch = _pairs(model, dtype, interval=2)
    enc = payload.encode(per_batch, adapters, "grads")
    assert sorted(enc.grads) == sorted(adapters) and not any(k.startswith("b") for k in enc.tensors) and enc.flops > 0
    with FlopCounterMode(display=False) as counter:  # the FLOPs the ledger gets are torch's count of the same work
        payload.mean_grads(per_batch, adapters, enc.grads)
    assert enc.flops == counter.get_total_flops()
    pairs, grads = payload.decode(enc.tensors, enc.shared, adapters, {n: layer_dims_of(adapters[n]) for n in adapters}, 2)
    assert pairs == [{}, {}] and set(grads) == set(adapters)
    from_grads = _step_with(adapters, pairs, grads, 2)
    from_pairs = _step_with(adapters, per_batch, None, 2)
    for n in adapters:
        for k in from_pairs[n]:
            assert from_pairs[n][k].norm() > 0 and rel(from_grads[n][k], from_pairs[n][k]) < tol(dtype, 1e-5), (n, k)
    # peft LoRA on the mean loss of the two batches: the same gradient
    pm, params = peft_lora(base, patterns, adapters)
    (sum(model_loss(pm, d) for d in data) / 2).backward()
    for n, d in params.items():
        for k, p in d.items():
            assert p.grad.norm() > 0 and rel(grads[n][k], p.grad) < tol(dtype, 1e-5), (n, k)


def layer_dims_of(adapter) -> tuple[int, int]:
    p = dict(adapter.named_parameters())
    return (p["A"].shape[1], p["B"].shape[0]) if "A" in p else (p["weight"].shape[1], p["weight"].shape[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_linear_gradients_are_the_full_finetuning_gradient(dtype):
    base = bert().to(dtype)
    patterns = ["query", "value", "classifier"]
    data = batch("cls", 5, 9, seed=3)
    ref = copy.deepcopy(base)
    loss = ref(**data).loss if dtype == torch.float32 else None
    server = ColaServer(copy.deepcopy(base), patterns, "merged", dtype=dtype)
    adapters = {n: make_adapter("linear", *layer_dims(m), bias=True).to(dtype) for n, m in server.targets.items()}
    per_batch = [server.hidden_grads({0: data}, {0: adapters}).pairs[0]]
    enc = payload.encode(per_batch, adapters, "grads", own=False)
    assert enc.fingerprint == ""  # a linear model's gradient does not depend on its parameters
    _, grads = payload.decode(enc.tensors, enc.shared, adapters, {n: layer_dims(m) for n, m in server.targets.items()}, 1)
    if loss is None:
        return
    weights = dict(ref.named_parameters())
    flat = torch.autograd.grad(loss, [weights[f"{n}.weight"] for n in server.targets] + [weights[f"{n}.bias"] for n in server.targets])
    k = len(server.targets)
    for j, n in enumerate(server.targets):
        assert rel(grads[n]["weight"], flat[j]) < 1e-5 and rel(grads[n]["bias"], flat[k + j]) < 1e-5, n


@pytest.mark.parametrize("model,shared_with", [("bert", {"value": "query"}), ("llama", {"v_proj": "q_proj"})])
def test_shared_inputs_travel_once_and_change_no_number(model, shared_with):
    _, _, adapters, _, per_batch = _pairs(model, torch.float32, interval=2)
    enc = payload.encode(per_batch, adapters, "pairs")
    assert not enc.grads
    aliases = {key.split("/", 1)[1]: src for key, src in enc.shared.items()}
    for layer, source in shared_with.items():  # in every block, e.g. value reads what query read
        names = [n for n in adapters if n.endswith(layer)]
        assert len(names) == 2 and all(aliases[n] == n[:-len(layer)] + source for n in names)
    assert set(aliases) == {n for n in adapters for layer in shared_with if n.endswith(layer)}
    dims = {n: layer_dims_of(a) for n, a in adapters.items()}
    sent = sum(t.numel() for t in enc.tensors.values())
    assert sent < sum(x.numel() + G.numel() for pairs in per_batch for x, G in pairs.values())
    pairs, grads = payload.decode(enc.tensors, enc.shared, adapters, dims, 2)
    assert not grads
    for mine, theirs in zip(pairs, per_batch):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[n][0], theirs[n][0]) and torch.equal(mine[n][1], theirs[n][1]) for n in theirs)
    assert all(torch.equal(a[n][k], b[n][k]) for a, b in [(_step_with(adapters, pairs, None, 2), _step_with(adapters, per_batch, None, 2))]
               for n in a for k in a[n])


def test_auto_sends_the_smaller_and_never_an_mlps_gradient():
    _, _, adapters, _, per_batch = _pairs("bert", torch.float32)
    assert sorted(payload.choose(per_batch, adapters, "auto")) == sorted(adapters)  # 6 x 10 rows: r (d_in + d_out) is smaller
    short = [{n: (x[:1], G[:1]) for n, (x, G) in pairs.items()} for pairs in per_batch]  # one row: the pairs are smaller
    assert payload.choose(short, adapters, "auto") == []
    assert payload.choose(per_batch, adapters, "pairs") == [] and payload.choose(per_batch, None, "grads") == []
    mlps = {n: MLP(*layer_dims_of(a), hidden=4) for n, a in adapters.items()}
    assert payload.choose(per_batch, mlps, "grads") == []
    with pytest.raises(ValueError, match="unknown ColA wire mode"):
        payload.choose(per_batch, adapters, "fast")


def test_a_malformed_payload_is_refused():
    _, _, adapters, _, per_batch = _pairs("bert", torch.float32, interval=2)
    dims = {n: layer_dims_of(a) for n, a in adapters.items()}
    enc = payload.encode(per_batch, adapters, "auto")
    layer = enc.grads[0]
    cases = {
        "do not fit": {**enc.tensors, f"g/{layer}/A": torch.zeros(1, 1)},
        "NaN or Inf": {**enc.tensors, f"g/{layer}/B": torch.full_like(enc.tensors[f"g/{layer}/B"], float("nan"))},
        "does not match": {k: v for k, v in enc.tensors.items() if not k.startswith(f"g/{layer}/")},
    }
    for reason, tensors in cases.items():
        with pytest.raises(ValueError, match=reason):
            payload.decode(tensors, enc.shared, adapters, dims, 2)
    pairs_enc = payload.encode(per_batch, adapters, "pairs")
    key, source = next(iter(pairs_enc.shared.items()))
    with pytest.raises(ValueError, match="shared input"):
        payload.decode(pairs_enc.tensors, {**pairs_enc.shared, key: "classifier"}, adapters, dims, 2)
    with pytest.raises(ValueError, match="does not match"):
        payload.decode(pairs_enc.tensors, {**pairs_enc.shared, "b5/x": source}, adapters, dims, 2)


def test_int8_pairs_are_unbiased_and_their_gradient_error_is_small():
    _, _, adapters, _, per_batch = _pairs("bert", torch.float32)
    x, G = next(iter(per_batch[0].values()))
    draws = torch.stack([wire.unpack(wire.pack({"x": x}, "int8", torch.Generator().manual_seed(s)), "int8")["x"] for s in range(200)])
    one = rel(draws[0], x)
    assert 0 < one < 0.02 and rel(draws.mean(0), x) < one / 5  # unbiased: the mean of 200 draws is ~sqrt(200) times closer
    packed = wire.pack({n: t for n, (x, G) in per_batch[0].items() for n, t in ((f"{n}/x", x), (f"{n}/G", G))}, "int8", torch.Generator().manual_seed(0))
    back = wire.unpack(packed, "int8")
    assert wire.nbytes(packed) < 0.35 * wire.nbytes(wire.pack(back, "fp32"))  # 1/4 + a scale per row of 32 (and .npy headers)
    for n in adapters:
        exact, approx = vjp_grads(adapters[n], *per_batch[0][n]), vjp_grads(adapters[n], back[f"{n}/x"], back[f"{n}/G"])
        assert all(rel(approx[k], exact[k]) < 0.05 for k in exact), n  # the demo's MiniLM: median 3%, docs/cola/traffic.md
    bad = {k: v for k, v in packed.to_torch_state_dict().items()}
    bad[next(k for k in bad if k.endswith(wire.SCALE))] *= -1
    with pytest.raises(ValueError, match="scale"):
        wire.unpack(wire.to_record(bad), "int8")


def test_the_flower_round_trip_sends_gradients_and_refuses_another_clients(cola_config):
    config = cfg.build({**cola_config, "cola.wire": "grads", "cola.wire-dtype": "fp32"})
    strategy = helpers.cola_strategy(config)
    request, context = _query_reply(config, 1, 0)
    batches = strategy._accept_queries(1, [request])
    fit = strategy.configure_fit(strategy.hidden_pairs(batches), ConfigRecord(dict(config)))[0]
    assert fit.content.config_records["control"]["fingerprint"] and all(k.startswith("g/") for k in fit.content.array_records["pairs"].keys())
    assert strategy.costs.payload["grads_layers"] == len(strategy.dims) and strategy.costs.payload["payload_flops"] > 0
    forged = copy.deepcopy(fit)
    forged.content.config_records["control"]["fingerprint"] = "0" * 64
    with pytest.raises(ValueError, match="other than its own"):
        helpers.cola_fit(forged, copy.deepcopy(context), config, (0, 2))
    reply = helpers.cola_fit(fit, context, config, (0, 2))
    assert reply.content.metric_records["metrics"]["rows"] == 0  # nothing to take a VJP of: the server did
    # a node whose last reply the server did not take gets its pairs again
    strategy.book.synced[1] = False
    again = strategy.configure_fit(strategy.hidden_pairs(batches), ConfigRecord(dict(config)))[0]
    assert "fingerprint" not in again.content.config_records["control"]
    assert not any(k.startswith("g/") for k in again.content.array_records["pairs"].keys())


def test_the_config_refuses_int8_gradients_and_mlp_gradients_in_one_line():
    for keys, reason in (({"cola.wire-dtype": "int8"}, "int8 is a format of the pairs"),
                         ({"cola.adapter": "mlp", "cola.mode": "unmerged", "cola.wire": "grads"}, "low-rank and linear auxiliary models only")):
        with pytest.raises(cfg.ConfigError, match=reason):
            cfg.build({"method": "cola"} | keys)
    assert cfg.build({"method": "cola", "cola.wire-dtype": "int8", "cola.wire": "pairs"})["cola.wire-dtype"] == "int8"
