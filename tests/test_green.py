"""GreenTrainer core: FLOPs profile vs FlopCounterMode, DP optimality, importance bookkeeping."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, ViTConfig, ViTForImageClassification)

from fedcola.green.flops import measure_step_flops, profile_tensors
from fedcola.green.select import GreenSelector, apply_selection, dp_select, select, smallest_feasible_rho, tensor_importance
from fedcola.lte.heads import attach_heads

B, L, V, D = 2, 32, 500, 64
QK = re.compile(r"(query|key|[qk]_proj)\.")


def _tiny(kind: str) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    ids = torch.randint(0, V, (B, L))
    if kind == "bert":
        cfg = BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, num_labels=3)
        return BertForSequenceClassification(cfg), {"input_ids": ids, "labels": torch.tensor([0, 2])}
    if kind == "llama":  # grouped-query attention, like SmolLM2
        cfg = LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128)
        return LlamaForCausalLM(cfg), {"input_ids": ids, "labels": ids}
    if kind == "lte":  # LTE heads (fedcola.lte.heads.LTELinear: A, B, bias on one module) on every Linear of a Llama
        model, batch = _tiny("llama")
        return attach_heads(model, r=4, alpha=8.0, seed=1), batch
    if kind == "gpt2":  # tied LM head
        cfg = GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=4, n_positions=L, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg), {"input_ids": ids, "labels": ids}
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, num_labels=3)
    return ViTForImageClassification(cfg), {"pixel_values": torch.randn(B, 3, 32, 32), "labels": torch.tensor([0, 1])}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["bert", "llama", "gpt2", "vit", "lte"])
def tiny(request):
    model, batch = _tiny(request.param)
    return model, batch, profile_tensors(model, batch)


# ---------------------------------------------------------------- profiler vs FlopCounterMode

def _assert_profile_bounds(profile: float, counted: float, label: str = "", upper: float = 1.025) -> None:
    """One-sided: counted <= profile <= upper * counted (the profile may only overestimate)."""
    assert counted <= profile <= upper * counted, (label, profile, counted, profile / counted if counted else None)


def _selections(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Full, output-side prefixes, and random selections whose deepest tensor is not a q/k projection."""
    n = len(names)
    sels = {"all": np.ones(n, dtype=int)}
    for label, start in (("top-third", n // 3), ("top-half", n // 2)):
        cut = next(k for k in range(start, n) if not QK.search(names[k]))
        sels[label] = (np.arange(n) <= cut).astype(int)
    rng = np.random.default_rng(1)
    while len(sels) < 6:
        m = (rng.random(n) < 0.35).astype(int)
        if m.any() and not QK.search(names[np.flatnonzero(m).max()]):
            sels[f"random{len(sels)}"] = m
    return sels


def test_forward_flops_match_flop_counter(tiny):
    model, batch, prof = tiny
    fwd, _ = measure_step_flops(model, batch, set(prof.names))
    _assert_profile_bounds(prof.forward_flops, fwd, "forward")


def test_backward_flops_match_flop_counter(tiny):
    model, batch, prof = tiny
    for label, m in _selections(prof.names).items():
        _, bwd = measure_step_flops(model, batch, set(prof.selected_names(m)))
        _assert_profile_bounds(prof.backward_flops(m), bwd, label)


def test_order_is_output_to_input_and_head_only_backward_is_exact():
    model, batch = _tiny("llama")
    prof = profile_tensors(model, batch)
    assert prof.names[0] == "lm_head.weight" and prof.names[-1] == "model.embed_tokens.weight"
    assert prof.names.index("model.layers.1.mlp.down_proj.weight") < prof.names.index("model.layers.0.mlp.down_proj.weight")
    head_only = (np.arange(len(prof.names)) == 0).astype(int)
    _, bwd = measure_step_flops(model, batch, {"lm_head.weight"})
    assert bwd == prof.backward_flops(head_only) == 2 * B * L * D * V  # dW of the head, no dy at all


def test_every_prefix_of_linear_only_llama_matches():
    """With only Linear weights trainable, nearly all counted work is matmuls, so each prefix
    (deepest tensor moving down one step at a time) checks where every dy chunk is attributed."""
    model, batch = _tiny("llama")
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("proj.weight") or name == "lm_head.weight")
    prof = profile_tensors(model, batch)
    for k, name in enumerate(prof.names):
        if QK.search(name):
            continue
        m = (np.arange(len(prof.names)) <= k).astype(int)
        _, bwd = measure_step_flops(model, batch, set(prof.selected_names(m)))
        _assert_profile_bounds(prof.backward_flops(m), bwd, name, upper=1.02)


def test_tied_embedding_pulls_dy_through_whole_model():
    model, batch = _tiny("gpt2")
    prof = profile_tensors(model, batch)
    assert prof.names[-1] == "transformer.wte.weight"  # first use is the input embedding
    only_wte = (np.arange(len(prof.names)) == len(prof.names) - 1).astype(int)
    _, bwd = measure_step_flops(model, batch, {"transformer.wte.weight"})
    _assert_profile_bounds(prof.backward_flops(only_wte), bwd, "only wte")
    assert prof.backward_flops(only_wte) > 0.5 * prof.full_backward_flops


def test_qk_deepest_selection_is_bounded_overestimate():
    """Documented inexactness: with k (or q) as the deepest selected tensor autograd skips dV (and
    dK); the profile charges them, at most 2 attention matmuls of one block. v is exact."""
    model, batch = _tiny("bert")
    prof = profile_tensors(model, batch)
    attn_matmul = 2 * B * L * L * D
    above = prof.names.index("bert.encoder.layer.0.attention.output.dense.bias")
    for name, extra in (("query", 2), ("key", 1), ("value", 0)):
        m = (np.arange(len(prof.names)) <= above).astype(int)
        m[prof.names.index(f"bert.encoder.layer.0.attention.self.{name}.weight")] = 1
        _, bwd = measure_step_flops(model, batch, set(prof.selected_names(m)))
        assert bwd + extra * attn_matmul <= prof.backward_flops(m) <= bwd * 1.025 + extra * attn_matmul, name


# ---------------------------------------------------------------- dynamic program

def _brute_force(imp, dw, dy, budget):
    n = len(imp)
    masks = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    deepest = np.where(masks.any(1), n - 1 - np.argmax(masks[:, ::-1], axis=1), -1)
    cost = masks @ dw + np.array([dy[: d + 1].sum() for d in deepest])
    value = masks @ imp
    return value[cost <= budget].max()


def _cost(m, dw, dy):
    deepest = np.flatnonzero(m).max() if m.any() else -1
    return m @ dw + dy[: deepest + 1].sum()


@pytest.mark.parametrize("seed", range(120))
def test_dp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 13))
    dw, dy = rng.integers(0, 40, n), rng.integers(0, 40, n)
    imp = rng.normal(size=n)
    budget = int(rng.integers(0, dw.sum() + dy.sum() + 2))
    m = dp_select(imp, dw, dy, budget)
    assert _cost(m, dw, dy) <= budget
    assert m @ imp == pytest.approx(_brute_force(imp, dw, dy, budget), abs=1e-12)
    assert not (m & (imp <= 0)).any()


@pytest.mark.parametrize("seed", range(30))
def test_dp_with_coarse_resolution_respects_real_budget(seed):
    rng = np.random.default_rng(1000 + seed)
    n = 12
    dw, dy = rng.uniform(0, 1e9, n), rng.uniform(0, 1e9, n)
    imp = rng.normal(size=n)
    budget = rng.uniform(0, dw.sum() + dy.sum())
    m = dp_select(imp, dw, dy, budget, resolution=budget / 37 + 1)
    assert _cost(m, dw, dy) <= budget
    assert m @ imp <= _brute_force(imp, dw, dy, budget) + 1e-12


@pytest.mark.parametrize("rho", [0.45, 0.6, 0.8, 1.0])
def test_selection_respects_rho_budget(tiny, rho):
    _, _, prof = tiny
    imp = np.random.default_rng(3).normal(size=len(prof.names))
    if rho < smallest_feasible_rho(prof):  # LTE heads: the forward is about half of a step
        with pytest.raises(ValueError, match="smallest feasible rho"):
            select(prof, imp, rho)
        return
    m = select(prof, imp, rho)
    assert prof.forward_flops + prof.backward_flops(m) <= rho * (prof.forward_flops + prof.full_backward_flops)
    assert m.any() and not (m & (imp <= 0)).any()


# ---------------------------------------------------------------- importance

def _closure(model, batch):
    return [lambda: model(**batch).loss]


def _train_some(model, batch, names, opt, steps=2):
    apply_selection(model, set(names))
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()


def test_importance_restores_weights_and_adamw_state():
    model, batch = _tiny("llama")
    names = profile_tensors(model, batch).names
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_some(model, batch, names[:5], opt)  # only some tensors have optimizer state
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {p: copy.deepcopy(s) for p, s in opt.state.items()}
    imp = tensor_importance(model, names, _closure(model, batch), opt)

    assert np.isfinite(imp).all() and np.abs(imp).max() == pytest.approx(1.0)
    assert np.count_nonzero(imp) == len(names)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]) and p.requires_grad == flags[n], n
    assert set(opt.state) == set(state)
    for p, s in state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], s[key])


def test_importance_with_adamw_is_first_step_for_every_tensor():
    """dw is a fresh AdamW's first step, -lr g / (|g| + eps) (weight decay 0), for trained and
    untrained tensors alike: I_k = lr sum g^2 / (|g| + eps) > 0, whatever the live momentum says."""
    model, batch = _tiny("bert")
    model.eval()  # no dropout: the gradient is deterministic
    names = profile_tensors(model, batch).names
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    _train_some(model, batch, names[:6], opt, steps=3)
    for p in opt.state:  # momentum pointing uphill: a live step would raise the loss
        opt.state[p]["exp_avg"].neg_()
    apply_selection(model, set(names))
    model.zero_grad()
    model(**batch).loss.backward()
    g = [params[n].grad.double() for n in names]
    expected = np.array([(x * x / (x.abs() + 1e-8)).sum().item() for x in g])
    model.zero_grad(set_to_none=True)
    imp = tensor_importance(model, names, _closure(model, batch), opt)
    np.testing.assert_allclose(imp, expected / expected.max(), rtol=1e-4, atol=1e-9)
    assert (imp > 0).all()


def test_importance_over_batches_uses_their_mean_gradient():
    """Several closures: g is the gradient of the mean loss (here SGD, so I_k = lr ||g_k||^2)."""
    model, batch = _tiny("bert")
    model.eval()
    half = {k: v[: len(v) // 2] for k, v in batch.items()}
    rest = {k: v[len(v) // 2:] for k, v in batch.items()}
    names = profile_tensors(model, batch).names
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    split = tensor_importance(model, names, _closure(model, half) + _closure(model, rest), sgd)
    params = dict(model.named_parameters())
    model.zero_grad()
    ((model(**half).loss + model(**rest).loss) / 2).backward()
    sq = np.array([params[n].grad.double().pow(2).sum().item() for n in names])
    np.testing.assert_allclose(split, sq / sq.max(), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="at least one batch"):
        tensor_importance(model, names, [], sgd)


def test_importance_with_sgd_is_normalised_squared_gradient_norm():
    """One SGD step gives dw = -lr g, so I_k = lr ||g_k||^2, normalised by its maximum."""
    model, batch = _tiny("bert")
    model.eval()  # no dropout: the closure's gradient is deterministic
    names = profile_tensors(model, batch).names
    params = dict(model.named_parameters())
    model.zero_grad()
    model(**batch).loss.backward()
    sq = np.array([params[n].grad.double().pow(2).sum().item() for n in names])
    model.zero_grad(set_to_none=True)
    imp = tensor_importance(model, names, _closure(model, batch), torch.optim.SGD(model.parameters(), lr=0.1))
    np.testing.assert_allclose(imp, sq / sq.max(), rtol=1e-4, atol=1e-9)


def test_selector_reselects_every_interval_and_sets_requires_grad():
    model, batch = _tiny("llama")
    prof = profile_tensors(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sel = GreenSelector(prof, rho=0.6, interval=2)
    chosen = sel.update(0, model, _closure(model, batch), opt)
    first = sel.importance
    assert chosen and sel.achieved_rho <= 0.6
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(chosen)
    sel.update(1, model, _closure(model, batch), opt)
    assert sel.importance is first
    sel.update(2, model, _closure(model, batch), opt)
    assert sel.importance is not first


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("rho", [0.0, 1.5, -0.2])
def test_rho_outside_unit_interval(rho):
    model, batch = _tiny("llama")
    prof = profile_tensors(model, batch)
    with pytest.raises(ValueError, match="rho must be in"):
        select(prof, np.ones(len(prof.names)), rho)
    with pytest.raises(ValueError, match="rho must be in"):
        GreenSelector(prof, rho)


def test_too_small_budget_names_smallest_feasible_rho():
    model, batch = _tiny("llama")
    prof = profile_tensors(model, batch)
    full = prof.forward_flops + prof.full_backward_flops
    rho_min = min((prof.forward_flops + prof.t_dw[k] + prof.t_dy[: k + 1].sum()) / full for k in range(len(prof.names)))
    with pytest.raises(ValueError) as err:
        select(prof, np.ones(len(prof.names)), rho_min * 0.999)
    assert f"{rho_min:.6g}" in str(err.value)
    assert select(prof, np.ones(len(prof.names)), rho_min * 1.01).any()


def test_unknown_module_type_is_rejected():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.alpha

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.scale = nn.Linear(4, 4), Scale()

        def forward(self, x):
            return self.scale(self.lin(x))

    with pytest.raises(ValueError, match="Scale"):
        profile_tensors(Net(), {"x": torch.randn(2, 4)})
    net = Net()
    net.scale.alpha.requires_grad_(False)  # frozen unknown modules are allowed
    assert profile_tensors(net, {"x": torch.randn(2, 4)}).names == ("lin.weight", "lin.bias")
