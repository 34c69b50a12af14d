"""ColA equivalence tests (arXiv 2404.13844): GL steps vs peft LoRA, full fine-tuning and autograd.

All comparisons are on gradients and on the update w_after - w_before, with a relative-norm
tolerance, on tiny random-init transformers models (no hub access). Every equivalence is also
checked in float64 (model and adapters), where it holds to ~1e-14 (~1e-10 through the literal
GL quadratic form) and is asserted at 1e-10 (`F64_TOL`): an fp32 tolerance would hide regressions.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fedcola.cola.adapters import MLP, Linear, LowRank, find_targets, layer_dims, make_adapter
from fedcola.cola.capture import Capture, Router
from fedcola.cola.server import ColaServer, client_losses
from fedcola.cola.gl import GLClient, quadratic_grads, quadratic_target, vjp_grads

R, ALPHA = 4, 8.0
F64_TOL = 1e-10  # float64 equivalences hold to ~1e-14; fp32 ones to ~1e-7
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
BERT_TARGETS = ["query", "value", "classifier"]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]
OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
}


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def tol(dtype: torch.dtype, fp32: float) -> float:
    """The test's fp32 tolerance, or F64_TOL in float64."""
    return fp32 if dtype == torch.float32 else F64_TOL


def bert() -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


def llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def batch(kind: str, n: int, length: int, seed: int) -> dict[str, Tensor]:
    """Random tokens, right padding on every other sample; labels -100 at padding for LMs."""
    g = torch.Generator().manual_seed(seed)
    vocab = 100 if kind == "cls" else 64
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(0, n, 2):
        mask[i, length - 1 - i % (length // 2):] = 0
    ids = ids * mask
    labels = torch.randint(0, 3, (n,), generator=g) if kind == "cls" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lowrank(targets: dict[str, nn.Module], seed: int) -> dict[str, LowRank]:
    """LoRA-initialised adapters with B non-zero, so A's gradient is non-trivial."""
    torch.manual_seed(seed)
    out = {n: LowRank(*layer_dims(m), r=R, alpha=ALPHA) for n, m in targets.items()}
    for a in out.values():
        nn.init.normal_(a.B, std=0.1)
    return out


def peft_lora(base: nn.Module, patterns: list[str], adapters: dict[str, LowRank]) -> tuple[nn.Module, dict]:
    """peft LoRA on a copy of `base` with A, B copied from `adapters`; returns model, {layer: {A, B}}."""
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=patterns, lora_dropout=0.0))
    params = {}
    for name, a in adapters.items():
        mod = pm.base_model.model.get_submodule(name)
        mod.lora_A["default"].to(a.A.dtype)
        mod.lora_B["default"].to(a.B.dtype)
        mod.lora_A["default"].weight.data.copy_(a.A.data)
        mod.lora_B["default"].weight.data.copy_(a.B.data)
        params[name] = {"A": mod.lora_A["default"].weight, "B": mod.lora_B["default"].weight}
    return pm, params


CASES = {"bert": (bert, BERT_TARGETS, "cls"), "llama": (llama, LLAMA_TARGETS, "lm")}


def reference_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the batch (classification) or its next-token targets (causal LM)."""
    if logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def model_loss(model: nn.Module, data: dict[str, Tensor]) -> Tensor:
    """HF's loss in fp32; in float64 `reference_loss`, as HF's causal-LM loss casts logits to fp32."""
    out = model(**data)
    return out.loss if out.logits.dtype == torch.float32 else reference_loss(out.logits, data["labels"])


def peft_and_cola_grads(model: str, mode: str, dtype: torch.dtype, opt: str | None = None):
    """One peft LoRA step and one ColA step from the same base, batch, A and B (B non-zero).

    Returns per layer {A, B}: (cola grad, peft grad, cola update, peft update), plus both losses.
    """
    make, patterns, kind = CASES[model]
    base = make().to(dtype)
    data = batch(kind, 6, 10, seed=1)
    server = ColaServer(copy.deepcopy(base), patterns, mode, dtype=dtype)
    adapters = {n: a.to(dtype) for n, a in lowrank(server.targets, seed=2).items()}
    pm, peft_params = peft_lora(base, patterns, adapters)
    before = {n: {k: p.detach().clone() for k, p in d.items()} for n, d in peft_params.items()}

    popt = OPTIMIZERS[opt or "sgd"]([p for d in peft_params.values() for p in d.values()])
    hf = pm(**data)
    # HF's causal-LM loss casts logits with .float(), i.e. DOWN to fp32 for a float64 model
    peft_loss = hf.loss if dtype == torch.float32 else reference_loss(hf.logits, data["labels"])
    peft_loss.backward()
    popt.step()

    res = server.hidden_grads({"c": data}, {"c": adapters})
    cola_grads = {n: vjp_grads(adapters[n], *res.pairs["c"][n]) for n in adapters}
    assert GLClient(adapters, OPTIMIZERS[opt or "sgd"]).step(res.pairs["c"])

    out = {
        n: {
            k: (cola_grads[n][k], p.grad, getattr(adapters[n], k).detach() - before[n][k], p.detach() - before[n][k])
            for k, p in d.items()
        }
        for n, d in peft_params.items()
    }
    return out, res.loss["c"], float(peft_loss.detach())


@pytest.mark.parametrize("model", list(CASES))
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_lowrank_step_equals_peft_lora_step(model: str, mode: str, opt: str) -> None:
    """Float64 end to end, so that the update comparison is not limited by fp32 rounding: an fp32
    update w_after - w_before of |w| ~ 0.2 is quantised to ulp(w) ~ 1e-8, and AdamW's first step
    lr * g / (|g| + eps) turns fp32 forward noise in elements with |g| ~ 1e-7 into O(lr) changes."""
    out, cola_loss, peft_loss = peft_and_cola_grads(model, mode, torch.float64, opt)
    assert cola_loss == pytest.approx(peft_loss, rel=1e-12)
    for n, d in out.items():
        for k, (cg, pg, cu, pu) in d.items():
            assert pg.norm() > 0 and pu.norm() > 0
            assert rel(cg, pg) < F64_TOL, (n, k)
            assert rel(cu, pu) < F64_TOL, (n, k)


@pytest.mark.parametrize("model", list(CASES))
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_lowrank_grads_equal_peft_fp32(model: str, mode: str) -> None:
    """The production dtype: fp32 master weights and adapters, gradients within 1e-5."""
    out, cola_loss, peft_loss = peft_and_cola_grads(model, mode, torch.float32)
    assert cola_loss == pytest.approx(peft_loss, rel=1e-5)
    for n, d in out.items():
        for k, (cg, pg, _, _) in d.items():
            assert rel(cg, pg) < 1e-5, (n, k)


pytestmark = pytest.mark.usefixtures("one_thread")


@DTYPES
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
@pytest.mark.parametrize(
    "make,patterns,kind", [(gpt2, ["c_attn", "c_fc", "c_proj"], "lm"), (bert, ["query", "dense", "classifier"], "cls")]
)
def test_linear_adapter_grad_equals_full_finetuning(make, patterns, kind, mode, dtype) -> None:
    """dL/d(dW) of a zero-initialised Linear adapter == dL/dW of the adapted layer (GPT-2 Conv1D too)."""
    base = make().to(dtype)
    data = batch(kind, 5, 9, seed=3)
    ref = copy.deepcopy(base)
    ref_targets = find_targets(ref, patterns)
    ref_params = {n: (m.weight, m.bias) for n, m in ref_targets.items()}
    loss = model_loss(ref, data)
    flat = torch.autograd.grad(loss, [p for wb in ref_params.values() for p in wb])
    ref_grads = dict(zip(ref_params, zip(flat[::2], flat[1::2])))

    server = ColaServer(copy.deepcopy(base), patterns, mode, dtype=dtype)
    assert any(type(m).__name__ == "Conv1D" for m in server.targets.values()) == (make is gpt2)
    adapters = {n: make_adapter("linear", *layer_dims(m), bias=True).to(dtype) for n, m in server.targets.items()}
    res = server.hidden_grads({0: data}, {0: adapters})
    assert res.loss[0] == pytest.approx(float(loss.detach()), rel=1e-6 if dtype == torch.float32 else 1e-12)
    for n, m in server.targets.items():
        g = vjp_grads(adapters[n], *res.pairs[0][n])
        gW, gb = ref_grads[n]
        gW = gW.T if type(m).__name__ == "Conv1D" else gW  # Conv1D weight is (d_in, d_out)
        assert gW.norm() > 0
        assert g["weight"].dtype == dtype
        assert rel(g["weight"], gW) < tol(dtype, 1e-5), n
        assert rel(g["bias"], gb) < tol(dtype, 1e-5), n


def lora_reference_grads(base, patterns, adapters, k, data) -> tuple[dict, float]:
    """Independent reference for client k in merged mode: peft LoRA with client k's live (A, B) on a
    base whose weights are W + mean_j dW_j - dW_k, i.e. the model W + mean_j dW_j whose dW_k part
    moves with w_k; loss = HF's mean over client k's samples only."""
    shifted = copy.deepcopy(base)
    K = len(adapters)
    with torch.no_grad():
        for n, m in find_targets(shifted, patterns).items():
            mean = sum(adapters[j][n].delta_weight() for j in adapters) / K
            m.weight += mean - adapters[k][n].delta_weight()
    pm, params = peft_lora(shifted, patterns, adapters[k])
    loss = model_loss(pm, data)
    loss.backward()
    return {n: {key: p.grad for key, p in d.items()} for n, d in params.items()}, float(loss.detach())


@DTYPES
def test_merged_k_clients_matches_autograd_of_own_loss(dtype) -> None:
    """K = 3, unequal batch sizes: client k's GL gradient == autograd of L_k (its own mean loss) in
    W + mean_j dW_j w.r.t. its own adapter; sum-of-client-means convention, no 1/K factor."""
    base = bert().to(dtype)
    server = ColaServer(copy.deepcopy(base), BERT_TARGETS, "merged", dtype=dtype)
    batches = {k: batch("cls", n, 10, seed=10 + k) for k, n in enumerate([2, 3, 4])}
    adapters = {k: {n: a.to(dtype) for n, a in lowrank(server.targets, seed=20 + k).items()} for k in batches}
    res = server.hidden_grads(batches, adapters)
    for k in batches:
        ref, ref_loss = lora_reference_grads(base, BERT_TARGETS, adapters, k, batches[k])
        assert res.loss[k] == pytest.approx(ref_loss, rel=1e-5 if dtype == torch.float32 else 1e-12)
        for n in server.targets:
            g = vjp_grads(adapters[k][n], *res.pairs[k][n])
            for key in ("A", "B"):
                assert rel(g[key], ref[n][key]) < tol(dtype, 1e-5), (k, n, key)

    # with K > 1 unmerged differs: it evaluates client k in its personal model W + dW_k
    unmerged = ColaServer(copy.deepcopy(base), BERT_TARGETS, "unmerged", dtype=dtype).hidden_grads(batches, adapters)
    for n in server.targets:
        assert rel(unmerged.pairs[0][n][1], res.pairs[0][n][1]) > 1e-3, n


@pytest.mark.parametrize(
    "make,patterns,kind", [(bert, BERT_TARGETS, "cls"), (gpt2, ["c_attn", "c_proj", "lm_head"], "lm")]
)
@DTYPES
def test_merged_equals_unmerged_single_client(make, patterns, kind, dtype) -> None:
    """One client, mergeable adapter: same G and same GL gradients. GPT-2 checks the Conv1D
    orientation and a tied lm_head (merging must not leak into the word embedding)."""
    base = make().to(dtype)
    data = batch(kind, 6, 10, seed=4)
    results = {}
    for mode in ("merged", "unmerged"):
        server = ColaServer(copy.deepcopy(base), patterns, mode, dtype=dtype)
        adapters = {n: a.to(dtype) for n, a in lowrank(server.targets, seed=5).items()}
        embedding = server.model.get_input_embeddings().weight.clone()
        res = server.hidden_grads({0: data}, {0: adapters})
        assert torch.equal(embedding, server.model.get_input_embeddings().weight)
        results[mode] = {n: (G, vjp_grads(adapters[n], x, G)) for n, (x, G) in res.pairs[0].items()}
    for n, (G, grads) in results["merged"].items():
        G_u, grads_u = results["unmerged"][n]
        assert G.dtype == dtype
        assert rel(G, G_u) < tol(dtype, 1e-5), n
        for key in grads:
            assert rel(grads[key], grads_u[key]) < tol(dtype, 1e-5), (n, key)


@DTYPES
def test_unmerged_mlp_matches_autograd(dtype) -> None:
    """A non-mergeable adapter through the Router == autograd on a model with g added by hooks."""
    base = bert().to(dtype)
    data = batch("cls", 5, 10, seed=6)
    server = ColaServer(copy.deepcopy(base), BERT_TARGETS, "unmerged", dtype=dtype)
    torch.manual_seed(7)
    adapters = {n: MLP(*layer_dims(m), hidden=16).to(dtype) for n, m in server.targets.items()}
    for a in adapters.values():
        nn.init.normal_(a.fc2.weight, std=0.1)
    res = server.hidden_grads({0: data}, {0: adapters})

    ref = copy.deepcopy(base)
    for n, m in find_targets(ref, BERT_TARGETS).items():
        m.register_forward_hook(lambda mod, args, out, a=adapters[n]: out + a(args[0]))
    params = [p for a in adapters.values() for p in a.parameters()]
    ref_grads = iter(torch.autograd.grad(model_loss(ref, data), params))
    for n, a in adapters.items():
        g = vjp_grads(a, *res.pairs[0][n])
        for key, _ in a.named_parameters():
            assert rel(g[key], next(ref_grads)) < tol(dtype, 1e-5), (n, key)

    with pytest.raises(TypeError, match="not mergeable"):
        ColaServer(copy.deepcopy(base), BERT_TARGETS, "merged", dtype=dtype).hidden_grads({0: data}, {0: adapters})


@DTYPES
def test_detached_differs_below_top_layer(dtype) -> None:
    """Detached (authors' code: g under no_grad): same G at the top adapted layer, different below."""
    base = bert().to(dtype)
    data = batch("cls", 6, 10, seed=8)
    adapters = {n: a.to(dtype) for n, a in lowrank(find_targets(base, BERT_TARGETS), seed=9).items()}
    full, detached = (
        ColaServer(copy.deepcopy(base), BERT_TARGETS, mode, dtype=dtype).hidden_grads({0: data}, {0: adapters})
        for mode in ("unmerged", "detached")
    )
    assert full.loss[0] == detached.loss[0]  # same forward
    top = "classifier"
    assert rel(detached.pairs[0][top][1], full.pairs[0][top][1]) < tol(dtype, 1e-6)
    for n in adapters:
        if n != top:
            assert rel(detached.pairs[0][n][1], full.pairs[0][n][1]) > 1e-2, n


@DTYPES
def test_padding_rows_dropped_exactly(dtype) -> None:
    """Non-padding rows give the same GL gradients as the padded computation; G = 0 at padding;
    a client padded further by the server (other client has longer sequences) is unaffected."""
    base = llama().to(dtype)
    server = ColaServer(copy.deepcopy(base), LLAMA_TARGETS, "unmerged", dtype=dtype)
    short, long = batch("lm", 4, 8, seed=11), batch("lm", 3, 12, seed=12)
    adapters = {k: {n: a.to(dtype) for n, a in lowrank(server.targets, seed=13 + i).items()} for i, k in enumerate(["s", "l"])}

    alone = server.hidden_grads({"s": short}, {"s": adapters["s"]})
    both = server.hidden_grads({"s": short, "l": long}, adapters)
    inputs = {k: v for k, v in short.items() if k != "labels"}
    with Capture(server.targets, Router({"s": adapters["s"]}, ["s"] * 4)) as cap:
        logits = server.model(**inputs).logits
        padded = cap.pairs(client_losses(logits, short["labels"], [4])[0])

    pad = short["attention_mask"] == 0
    assert pad.sum() > 0
    for n, a in adapters["s"].items():
        x_full, G_full = padded[n]
        assert torch.equal(G_full[pad], torch.zeros_like(G_full[pad])), n
        rows = vjp_grads(a, *alone.pairs["s"][n])
        assert len(alone.pairs["s"][n][0]) == int((~pad).sum())
        full = vjp_grads(a, x_full.flatten(0, 1), G_full.flatten(0, 1))
        mixed = vjp_grads(a, *both.pairs["s"][n])
        for key in rows:
            assert rows[key].dtype == dtype
            assert rel(rows[key], full[key]) < tol(dtype, 1e-6), (n, key)
            assert rel(mixed[key], rows[key]) < tol(dtype, 1e-5), (n, key)


@DTYPES
def test_quadratic_form_float64_equals_vjp(dtype) -> None:
    """The GL objective's gradient at w_t (float64) == the VJP g.backward(G) (Prop. 1) to ~1e-10;
    `dtype` is the server's and the adapters' (the GLClient step comparison)."""
    base = bert()
    server = ColaServer(copy.deepcopy(base), BERT_TARGETS, "unmerged", dtype=dtype)
    torch.manual_seed(14)
    adapters = {n: MLP(*layer_dims(m), hidden=16) for n, m in server.targets.items()}
    adapters.update({n: a for n, a in lowrank(server.targets, seed=15).items() if "value" in n})
    adapters = {n: a.to(dtype) for n, a in adapters.items()}
    for a in adapters.values():
        for p in a.parameters():
            nn.init.normal_(p, std=0.1)
    res = server.hidden_grads({0: batch("cls", 6, 10, seed=16)}, {0: adapters})
    for n, (x, G) in res.pairs[0].items():
        a64 = copy.deepcopy(adapters[n]).double()
        vjp = vjp_grads(a64, x, G)
        quad = quadratic_grads(adapters[n], x, quadratic_target(adapters[n], x, G))
        for key in vjp:
            assert vjp[key].norm() > 0
            assert rel(quad[key], vjp[key]) < 1e-10, (n, key)

    # GLClient: one literal-fit step == one VJP step (SGD), and fit() moves further on the GL loss.
    # fp64: ~9e-11 measured, bounded by the literal form's cancellation eps64 * |g| / |G| (~6e6 here)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.5)  # noqa: E731
    vjp_client, fit_client = (GLClient(copy.deepcopy(adapters), sgd) for _ in range(2))
    vjp_client.step(res.pairs[0])
    fit_client.fit(res.pairs[0], steps=1)
    for n in adapters:
        for (key, p), q in zip(vjp_client.adapters[n].named_parameters(), fit_client.adapters[n].parameters()):
            delta = p.detach() - dict(adapters[n].named_parameters())[key].detach()
            if delta.norm() > 0:
                assert rel(q.detach() - dict(adapters[n].named_parameters())[key].detach(), delta) < tol(dtype, 1e-4), (n, key)


@DTYPES
def test_interval_and_checkpoint(dtype) -> None:
    """I = 2 accumulates the mean gradient then steps once; AdamW state survives state_dict()."""
    torch.manual_seed(17)
    x1, G1, x2, G2 = (torch.randn(*s).to(dtype) for s in [(5, 8), (5, 6), (7, 8), (7, 6)])
    make = lambda: {"m": Linear(8, 6).to(dtype)}  # noqa: E731
    sgd = lambda ps: torch.optim.SGD(ps, lr=1.0)  # noqa: E731
    client = GLClient(make(), sgd, interval=2)
    assert not client.step({"m": (x1, G1)})
    assert client.step({"m": (x2, G2)})
    expected = -(G1.T @ x1 + G2.T @ x2) / 2
    assert client.adapters["m"].weight.dtype == dtype
    assert rel(client.adapters["m"].weight.detach(), expected) < tol(dtype, 1e-6)

    a, b = GLClient(make()), GLClient(make())
    a.step({"m": (x1, G1)})
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.step({"m": (x2, G2)})
    b.step({"m": (x2, G2)})
    assert torch.equal(a.adapters["m"].weight, b.adapters["m"].weight)
    assert b.optimizer.state_dict()["state"][0]["step"] == 2


def test_errors_name_the_options() -> None:
    with pytest.raises(ValueError, match="low-rank"):
        make_adapter("lora", 4, 4)
    with pytest.raises(ValueError, match="query"):
        find_targets(bert(), ["no_such_layer"])
    with pytest.raises(ValueError, match="merged"):
        ColaServer(bert(), BERT_TARGETS, "fused")  # type: ignore[arg-type]
