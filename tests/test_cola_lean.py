"""The ColA server beyond fp32 on one device: merged mode under a bf16 base (the clients' mean as an
fp32 side branch, `capture.MeanBranch`) against an fp32 reference, and the lean-server options
(`offload_pairs`, `recompute`) that must not change a single number."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedcola.cola.adapters import Linear, layer_dims
from fedcola.cola.server import ColaServer
from tests.test_cola_equivalence import BERT_TARGETS, LLAMA_TARGETS, batch, bert, llama, lowrank, rel

MODELS = pytest.mark.parametrize("make,patterns,kind", [(bert, BERT_TARGETS, "cls"), (llama, LLAMA_TARGETS, "lm")], ids=["bert", "llama"])


def _linear(targets: dict[str, nn.Module], seed: int) -> dict[str, Linear]:
    torch.manual_seed(seed)
    out = {n: Linear(*layer_dims(m)) for n, m in targets.items()}
    for a in out.values():
        nn.init.normal_(a.weight, std=0.02)
    return out


def _clients(server: ColaServer, kind: str, adapter: str, dtype=torch.float32):
    make = lowrank if adapter == "low-rank" else _linear
    batches = {k: batch(kind, n, 10, seed=10 + k) for k, n in enumerate([2, 3])}
    adapters = {k: {n: a.to(dtype) for n, a in make(server.targets, seed=20 + k).items()} for k in batches}
    return batches, adapters


@MODELS
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
@pytest.mark.parametrize("options", [{"offload_pairs": True}, {"recompute": True}, {"offload_pairs": True, "recompute": True}],
                         ids=["offload", "recompute", "both"])
def test_lean_server_options_change_no_number(make, patterns, kind, mode, options) -> None:
    """float64: the pairs, losses and logits with host offload and block recomputation equal the plain server's."""
    base = make().to(torch.float64)
    plain = ColaServer(copy.deepcopy(base), patterns, mode)
    lean = ColaServer(copy.deepcopy(base), patterns, mode, **options)
    batches, adapters = _clients(plain, kind, "low-rank", torch.float64)
    want, got = plain.hidden_grads(batches, adapters), lean.hidden_grads(batches, adapters)
    assert got.loss == pytest.approx(want.loss, rel=1e-12)
    for k in batches:
        assert rel(got.logits[k], want.logits[k]) < 1e-12
        for n in plain.targets:
            for a, b in zip(got.pairs[k][n], want.pairs[k][n]):
                assert a.shape == b.shape and rel(a, b) < 1e-12, (k, n)


@MODELS
@pytest.mark.parametrize("adapter", ["low-rank", "linear"])
def test_merged_mode_under_a_bf16_base_matches_an_fp32_reference(make, patterns, kind, adapter) -> None:
    """A bf16 server in merged mode (the clients' mean as an fp32 side branch): pairs, losses and
    predictions match an fp32 server holding the same (bf16-valued) weights to bf16 precision."""
    base = make()
    bf16 = ColaServer(copy.deepcopy(base).to(torch.bfloat16), patterns, "merged")
    assert bf16.low_precision
    reference = ColaServer(copy.deepcopy(base).to(torch.bfloat16).float(), patterns, "merged")
    batches, adapters = _clients(reference, kind, adapter)
    want, got = reference.hidden_grads(batches, adapters), bf16.hidden_grads(batches, adapters)
    for k in batches:
        assert got.loss[k] == pytest.approx(want.loss[k], rel=2e-2)
        for n in reference.targets:
            for a, b in zip(got.pairs[k][n], want.pairs[k][n]):
                assert a.dtype == torch.bfloat16 and rel(a.float(), b) < 3e-2, (k, n)
    evaluation = batch(kind, 3, 10, seed=99)
    assert rel(bf16.predict(evaluation, adapters).float(), reference.predict(evaluation, adapters)) < 2e-2


def test_a_mean_below_bf16_resolution_is_not_lost() -> None:
    """The clients' mean dW, each entry below half of W's bf16 rounding step: folded into bf16 weights it
    vanishes (W + dW == W), as the side branch it reaches the layer's output as computed in fp32,
    rounded once (out = 0 isolates the branch)."""
    base = bert()
    server = ColaServer(copy.deepcopy(base).to(torch.bfloat16), BERT_TARGETS, "merged")
    layer = "bert.encoder.layer.0.attention.self.query"
    module = server.targets[layer]
    adapters = {k: {n: Linear(*layer_dims(m)) for n, m in server.targets.items()} for k in range(2)}
    for k, ads in adapters.items():
        step = torch.finfo(torch.bfloat16).eps * module.weight.float().abs()  # W's rounding step (>= ulp / 2 of each entry)
        with torch.no_grad():
            ads[layer].weight.copy_(0.2 * step * (1 if k == 0 else 0.5) * torch.sign(torch.randn_like(step)))
    folded = server.merged_weights(adapters)[f"{layer}.weight"]
    assert torch.equal(folded, module.weight)  # the mean vanished in bf16
    branch, overrides = server._merged(adapters)
    assert overrides == {}
    x = torch.randn(5, module.in_features, dtype=torch.bfloat16)
    effect = branch(layer, x, torch.zeros(5, module.out_features, dtype=torch.bfloat16))
    mean = sum(0.5 * ads[layer](x.float()) for ads in adapters.values())
    assert effect.abs().max() > 0 and torch.equal(effect, mean.to(torch.bfloat16))


def test_streamed_linear_mean_equals_the_resident_one() -> None:
    """A dense mean held in host memory is uploaded for the forward and again for the backward
    (`capture._Streamed`): output and input gradient equal F.linear's with the weight resident."""
    from fedcola.cola.capture import _Streamed

    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    g = torch.randn(7, 3, dtype=torch.float64)
    y = _Streamed.apply(x, w, b)
    (dx,) = torch.autograd.grad(y, x, g)
    x2 = x.detach().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, w, b)
    (dx2,) = torch.autograd.grad(y2, x2, g)
    assert torch.equal(y, y2) and torch.equal(dx, dx2)


def test_devices_resolve_or_fail_in_one_line() -> None:
    from fedcola import train

    assert train.resolve_device("cpu") == torch.device("cpu")
    assert train.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert train.accelerator_metrics("cpu") == {} and train.accelerator_peak_bytes("cpu") is None
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train.resolve_device("cuda:1")
