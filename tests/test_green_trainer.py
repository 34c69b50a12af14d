"""Centralized GreenTrainer (fedcola.green.trainer): measured FLOPs respect rho, frozen tensors stay
frozen, reselection every E steps, clear errors (Huang et al., ICLR 2024, arXiv 2309.13192, Sec. 4)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from fedcola.green.flops import measure_step_flops
from fedcola.green.trainer import train_green

B, L, V, D = 4, 32, 500, 64
TOL = 0.05  # profile vs FlopCounterMode on backward FLOPs, as asserted in tests/test_green.py


pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, num_labels=2)
    return BertForSequenceClassification(cfg)


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, V, (B, L), generator=g), "labels": torch.randint(0, 2, (B,), generator=g)}
            for _ in range(4)]


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


def test_measured_flops_respect_budget():
    batches = _batches()
    full = train_green(_model(), itertools.cycle(batches), 3, _adamw, rho=1.0)
    model = _model()
    green = train_green(model, itertools.cycle(batches), 3, _adamw, rho=0.5, reselect_every=10)
    (sel,) = green.selections
    assert 0 < len(sel.names) < len(green.candidates) and sel.achieved_rho <= 0.5
    for g, f in zip(green.steps, full.steps, strict=True):
        assert g.flops <= 0.5 * (1 + TOL) * f.flops
    # the backward alone: T_bp(m) <= rho (T_fp + T_bp(all)) - T_fp, all three measured
    fwd, bwd_full = measure_step_flops(model, batches[0], set(green.candidates))
    _, bwd = measure_step_flops(model, batches[0], set(sel.names))
    assert bwd <= (0.5 * (fwd + bwd_full) - fwd) * (1 + TOL)


def test_frozen_tensors_get_no_grad_and_do_not_change():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with_grad: list[set[str]] = []
    names = {id(p): n for n, p in model.named_parameters()}

    def optimizer_factory(params) -> torch.optim.Optimizer:
        opt = _adamw(params)
        opt.register_step_pre_hook(lambda o, *_: with_grad.append(
            {names[id(p)] for group in o.param_groups for p in group["params"] if p.grad is not None}))
        return opt

    stats = train_green(model, itertools.cycle(_batches()), 3, optimizer_factory, rho=0.5, reselect_every=10)
    selected = set(stats.selections[0].names)
    # the importance step runs on a fresh optimizer: the live one takes only the 3 training steps
    assert with_grad == [selected] * 3
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in selected), n
        assert p.requires_grad  # flags restored


def test_reselects_every_e_steps():
    stats = train_green(_model(), itertools.cycle(_batches()), 5, _adamw, rho=0.6, reselect_every=2)
    assert [s.step for s in stats.selections] == [0, 2, 4]
    assert all(s.flops > 0 and s.achieved_rho <= 0.6 for s in stats.selections)
    assert len(stats.steps) == 5 and stats.selection_flops > 0


def test_rho_one_trains_every_candidate_without_profiling():
    stats = train_green(_model(), itertools.cycle(_batches()), 1, _adamw, rho=1.0)
    assert stats.profile is None and stats.selections[0].names == stats.candidates


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5])
def test_bad_rho_raises(rho):
    with pytest.raises(ValueError, match=r"rho must be in \(0, 1\]"):
        train_green(_model(), itertools.cycle(_batches()), 1, _adamw, rho=rho)


def test_too_small_budget_raises():
    with pytest.raises(ValueError, match="smallest feasible rho is"):
        train_green(_model(), itertools.cycle(_batches()), 1, _adamw, rho=0.01)
