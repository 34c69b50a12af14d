"""Tests for fedcola.lte.heads: merge rule, LoRA-with-merge equivalence, wire format, async rule."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from fedcola.lte.heads import LTELinear, apply_merged_update, attach_heads, base_weights, head_delta, head_parameters, head_subspace_overlap, reset_heads, set_base_weights
from fedcola.lte.merge import InvalidDeltaError, StaleDeltaError, delta_nbytes, dense, merge, merge_async, staleness_weight, use_factors

R, ALPHA, VOCAB = 4, 8.0, 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def batches(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 8), generator=g) for _ in range(n)]


def client(base: nn.Module, seed: int, **kw) -> nn.Module:
    return attach_heads(copy.deepcopy(base), r=R, alpha=ALPHA, seed=seed, **kw)


def train(
    model: nn.Module, data: list[torch.Tensor], opt: torch.optim.Optimizer | None = None
) -> torch.optim.Optimizer:
    opt = opt or torch.optim.Adam(head_parameters(model), lr=1e-2)
    for ids in data:
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return opt


def lte_layers(model: nn.Module) -> dict[str, LTELinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LTELinear)}


def test_merge_zeroes_extra_term_and_model_equals_w_plus_mean_delta() -> None:
    base = tiny_llama()
    clients = [client(base, seed) for seed in (1, 2)]
    for i, c in enumerate(clients):
        train(c, batches(10 + i, 3))
    W = base_weights(clients[0])
    W_old = {k: v.clone() for k, v in W.items()}
    deltas = [head_delta(c) for c in clients]
    expected = {k: W_old[k] + (dense(deltas[0][k]) + dense(deltas[1][k])) / 2 for k in W}
    update = merge(W, deltas)
    for k in W:
        torch.testing.assert_close(W[k], expected[k], rtol=0, atol=1e-6)
        assert not torch.equal(W[k], W_old[k])

    # reference: the plain model with W_old + mean delta loaded into its nn.Linear weights
    reference = copy.deepcopy(base)
    for k, w in expected.items():
        reference.get_submodule(k.removesuffix(".W")).weight.data.copy_(w)
    ids = batches(99, 1)[0]
    for c in clients:
        apply_merged_update(c, update)
        for name, layer in lte_layers(c).items():
            assert torch.equal(layer.W, W[f"{name}.W"])  # client and server hold the same weights
            xin = torch.randn(5, layer.in_features)
            assert torch.equal(layer.extra(xin), torch.zeros(5, layer.out_features))
        torch.testing.assert_close(c(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-5)
    # the two clients now compute the same function although their heads differ
    torch.testing.assert_close(clients[0](input_ids=ids).logits, clients[1](input_ids=ids).logits, rtol=0, atol=1e-6)


def test_partial_deltas_average_each_weight_over_the_clients_that_trained_it() -> None:
    """A client under a FLOPs budget trains some heads and sends only their deltas (an untrained
    head's delta is exactly zero): each weight is averaged over the clients that sent it, a weight
    nobody trained stays, and every client's snapshot still moves (extra term zero again)."""
    base = tiny_llama()
    clients = [client(base, seed) for seed in (1, 2, 3)]
    layers = sorted(lte_layers(clients[0]))
    trained = [{f"{layers[0]}.A", f"{layers[0]}.B", f"{layers[1]}.B"}, None, {f"{layers[2]}.A"}]  # None: all
    for i, (c, names) in enumerate(zip(clients, trained)):
        for name, p in c.named_parameters():
            p.requires_grad_(p.requires_grad and (names is None or name in names))
        train(c, batches(20 + i, 2))
    assert head_delta(clients[0]).keys() == set(base_weights(clients[0]))  # untrained heads: delta exactly 0
    assert all(not dense(d).any() for k, d in head_delta(clients[0]).items() if k not in (f"{layers[0]}.W", f"{layers[1]}.W"))
    deltas = [head_delta(c, names) for c, names in zip(clients, trained)]
    assert deltas[0].keys() == {f"{layers[0]}.W", f"{layers[1]}.W"} and deltas[2].keys() == {f"{layers[2]}.W"}
    W = base_weights(clients[0])
    W_old = {k: v.clone() for k, v in W.items()}
    weights = [3.0, 1.0, 2.0]
    update = merge(W, deltas, weights)
    for k in W:
        sent = [(w, dense(d[k])) for w, d in zip(weights, deltas) if k in d]
        expected = W_old[k] + sum(w * x for w, x in sent) / sum(w for w, _ in sent)
        torch.testing.assert_close(W[k], expected, rtol=0, atol=1e-6)
    assert update.keys() == set(W)  # the strong client trained every head
    del deltas[1]
    W2 = {k: v.clone() for k, v in W_old.items()}
    update = merge(W2, deltas)
    assert update.keys() == {f"{layers[i]}.W" for i in range(3)}
    assert all(torch.equal(W2[k], W_old[k]) for k in W2 if k not in update)  # nobody trained it: kept
    torch.testing.assert_close(W2[f"{layers[2]}.W"], W_old[f"{layers[2]}.W"] + dense(deltas[1][f"{layers[2]}.W"]))
    for c in clients:
        set_base_weights(c, W_old)
        apply_merged_update(c, update)
        for name, layer in lte_layers(c).items():
            assert torch.equal(layer.W, W2[f"{name}.W"])
            assert torch.equal(layer.extra(torch.randn(3, layer.in_features)), torch.zeros(3, layer.out_features))


def test_single_head_t1_equals_peft_lora_merged_every_step() -> None:
    base = tiny_llama()
    lte = client(base, seed=3)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    cfg = LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=names, lora_dropout=0.0,
        alpha_pattern={"q_proj": ALPHA ** 0.5, "k_proj": ALPHA ** 0.5},
    )
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    peft_inner = peft_model.base_model.model
    layers = lte_layers(lte)
    assert len(layers) == 2 * 7 + 1
    with torch.no_grad():
        for name, layer in layers.items():
            peft_layer = peft_inner.get_submodule(name)
            assert peft_layer.scaling["default"] == pytest.approx(layer.s)
            peft_layer.lora_A["default"].weight.copy_(layer.A)
            assert not peft_layer.lora_B["default"].weight.any()
    W0 = base_weights(lte)
    W = {k: v.clone() for k, v in W0.items()}
    opt_lte = torch.optim.Adam(head_parameters(lte), lr=1e-2)
    opt_peft = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    assert sum(p.numel() for p in head_parameters(lte)) == sum(p.numel() for p in opt_peft.param_groups[0]["params"])
    for ids in batches(7, 5):
        for model, opt in ((lte, opt_lte), (peft_model, opt_peft)):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        apply_merged_update(lte, merge(W, [head_delta(lte)]))  # N = 1, T = 1, no reset
        for name, layer in layers.items():
            merged = W0[f"{name}.W"] + peft_inner.get_submodule(name).get_delta_weight("default")
            torch.testing.assert_close(layer.W, merged, rtol=0, atol=2e-6)
            assert torch.equal(layer.W, W[f"{name}.W"])
        torch.testing.assert_close(lte(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert not torch.equal(W["lm_head.W"], W0["lm_head.W"])


def test_merged_update_is_mean_whatever_the_arrival_order() -> None:
    base = tiny_llama()
    clients = [client(base, seed) for seed in (1, 2, 3)]
    for i, c in enumerate(clients):
        train(c, batches(20 + i, 2))
    deltas = [head_delta(c) for c in clients]
    W0 = base_weights(clients[0])
    mean = {k: sum(dense(d[k]) for d in deltas) / 3 for k in W0}
    results = []
    for order in itertools.permutations(range(3)):
        W = {k: v.clone() for k, v in W0.items()}
        update = merge(W, [deltas[i] for i in order])
        for k in W:
            torch.testing.assert_close(dense(update[k]), mean[k], rtol=0, atol=1e-7)
            torch.testing.assert_close(W[k], W0[k] + mean[k], rtol=0, atol=1e-6)
        results.append(W)
    for W in results[1:]:
        for k in W:
            torch.testing.assert_close(W[k], results[0][k], rtol=0, atol=1e-6)
    # weights follow their delta, not their position
    W_a, W_b = ({k: v.clone() for k, v in W0.items()} for _ in range(2))
    merge(W_a, deltas, weights=[1.0, 2.0, 5.0])
    merge(W_b, deltas[::-1], weights=[5.0, 2.0, 1.0])
    for k in W0:
        torch.testing.assert_close(W_a[k], W_b[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(
            W_a[k], W0[k] + sum(w * dense(d[k]) for w, d in zip((1, 2, 5), deltas)) / 8, rtol=0, atol=1e-6
        )


def _two_clients_one_at_a_time(use_async: bool) -> dict[str, torch.Tensor]:
    base = tiny_llama()
    c1, c2 = client(base, 1), client(base, 2)
    W = base_weights(c1)
    train(c1, batches(30, 2))
    if use_async:
        merge_async(W, head_delta(c1), staleness=0, a=0.5, max_staleness=2)
        set_base_weights(c1, W)
        set_base_weights(c2, W)
    else:
        update = merge(W, [head_delta(c1)])
        apply_merged_update(c1, update)
        apply_merged_update(c2, update)
    train(c2, batches(31, 2))
    if use_async:
        merge_async(W, head_delta(c2), staleness=0, a=0.5, max_staleness=2)
    else:
        merge(W, [head_delta(c2)])
    return W


def test_async_zero_staleness_one_client_at_a_time_equals_sequential_merging() -> None:
    W_async, W_seq = _two_clients_one_at_a_time(True), _two_clients_one_at_a_time(False)
    W0 = base_weights(client(tiny_llama(), 0))
    for k in W_seq:
        torch.testing.assert_close(W_async[k], W_seq[k], rtol=0, atol=1e-7)
        assert not torch.equal(W_seq[k], W0[k])


def test_factors_travel_and_byte_count() -> None:
    assert use_factors(2 * R, 32, 32) and use_factors(R, 64, 32)
    assert not use_factors(R, 3, 64) and not use_factors(16, 16, 16)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 3))
    clients = [attach_heads(copy.deepcopy(net), r=R, alpha=ALPHA, seed=s) for s in (1, 2)]
    x, y = torch.randn(16, 32), torch.randn(16, 3)
    for c in clients:
        opt = torch.optim.SGD(head_parameters(c), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(c(x), y).backward()
            opt.step()
    delta = head_delta(clients[0])
    U, V = delta["0.W"]  # first round: B~ = 0, so rank r
    assert U.shape == (64, R) and V.shape == (R, 32)
    assert isinstance(delta["2.W"], torch.Tensor) and delta["2.W"].shape == (3, 64)  # 4 * (64 + 3) > 64 * 3
    assert delta_nbytes(delta) == 4 * (R * (32 + 64) + 3 * 64)
    W = base_weights(clients[0])
    update = merge(W, [head_delta(c) for c in clients])
    assert update["0.W"][0].shape == (64, 2 * R) and update["0.W"][1].shape == (2 * R, 32)
    assert isinstance(update["2.W"], torch.Tensor)
    for c in clients:
        apply_merged_update(c, update)
    train_step = torch.optim.SGD(head_parameters(clients[0]), lr=0.1)
    nn.functional.mse_loss(clients[0](x), y).backward()
    train_step.step()
    U, V = head_delta(clients[0])["0.W"]  # later rounds: s (B A - B~ A~) has rank 2r
    assert U.shape == (64, 2 * R) and V.shape == (2 * R, 32)
    assert delta_nbytes(head_delta(clients[0])) == 4 * (2 * R * (32 + 64) + 3 * 64)
    layer = clients[0][0]
    torch.testing.assert_close(U @ V, layer.s * (layer.B @ layer.A - layer.B_snap @ layer.A_snap), rtol=0, atol=1e-7)


def _two_head_run(seed: int) -> list[dict]:
    base = tiny_llama()
    out = []
    for n in range(2):
        c = client(base, seed + n)
        train(c, batches(seed + 100 + n, 3))
        out.append(head_delta(c))
    return out


def test_two_heads_reproducible_from_seed_bitwise() -> None:
    run_a, run_b, run_c = _two_head_run(5), _two_head_run(5), _two_head_run(6)
    flat = lambda run: [t for d in run for v in d.values() for t in (v if isinstance(v, tuple) else (v,))]
    assert all(torch.equal(a, b) for a, b in zip(flat(run_a), flat(run_b), strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(flat(run_a), flat(run_c), strict=True))


def test_orthogonal_init_gives_distinct_head_subspaces() -> None:
    base = tiny_llama()
    h1, h2, h1_again = client(base, 1), client(base, 2), client(base, 1)
    for (name, l1), l2, l1b in zip(lte_layers(h1).items(), lte_layers(h2).values(), lte_layers(h1_again).values()):
        d_in = l1.in_features
        torch.testing.assert_close(l1.A @ l1.A.T, (d_in / R) * torch.eye(R), rtol=0, atol=1e-4)
        assert not l1.B.any() and torch.equal(l1.A, l1b.A)
        cosines = head_subspace_overlap(l1.A, l2.A)
        assert cosines.max() < 0.99, name
        assert head_subspace_overlap(l1.A, l1b.A).min() > 1 - 1e-5
    q, v = h1.model.layers[0].self_attn.q_proj, h1.model.layers[0].self_attn.v_proj
    assert head_subspace_overlap(q.A, h1.model.layers[0].self_attn.o_proj.A).max() < 0.99  # layers differ too
    assert q.s == pytest.approx(ALPHA ** 0.5 / R) and v.s == pytest.approx(ALPHA / R)


def test_staleness_rule_and_rejected_deltas() -> None:
    assert staleness_weight(0, 0.5) == 1.0 and staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert staleness_weight(1, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        staleness_weight(-1)
    base = tiny_llama()
    c = client(base, 1)
    train(c, batches(40, 1))
    delta = head_delta(c)
    W = base_weights(c)
    W0 = {k: v.clone() for k, v in W.items()}
    with pytest.raises(StaleDeltaError):
        merge_async(W, delta, staleness=4, max_staleness=3)
    assert all(torch.equal(W[k], W0[k]) for k in W)
    merge_async(W, delta, staleness=3, a=0.5, max_staleness=3, mix=0.5)
    for k in W:
        torch.testing.assert_close(W[k], W0[k] + 0.25 * dense(delta[k]), rtol=0, atol=1e-7)

    key = "model.layers.0.self_attn.q_proj.W"
    U, V = delta[key]
    bad_cases = {
        "nan": {**delta, key: (U.clone().index_fill_(1, torch.tensor([0]), float("nan")), V)},
        "inf": {**delta, key: dense(delta[key]).clone().fill_(float("inf"))},
        "shape": {**delta, key: (U[:-1], V)},
        "inner": {**delta, key: (U, V[:-1])},
        "dense shape": {**delta, key: torch.zeros(3, 3)},
        "rank": {**delta, key: (torch.zeros(U.shape[0], 2 * R + 1), torch.zeros(2 * R + 1, V.shape[1]))},
        "empty": {},
        "unknown": {**delta, "nope.W": torch.zeros(1)},
    }
    W1 = {k: v.clone() for k, v in W.items()}
    for what, bad in bad_cases.items():
        with pytest.raises(InvalidDeltaError):
            merge(W, [delta, bad], r=R)
        assert all(torch.equal(W[k], W1[k]) for k in W), what  # nothing merged
    with pytest.raises(ValueError):
        merge(W, [delta, delta], weights=[1.0])


def test_reset_heads_restarts_head_and_optimizer() -> None:
    c = client(tiny_llama(), 1)
    opt = train(c, batches(50, 2))
    W = base_weights(c)
    apply_merged_update(c, merge(W, [head_delta(c)]))
    A_before = c.lm_head.A.clone()
    reset_heads(c, seed=77, reset_optimizer=opt)
    assert not torch.equal(c.lm_head.A, A_before) and not c.lm_head.B.any()
    assert c.lm_head.A not in opt.state and c.lm_head.B not in opt.state
    x = torch.randn(3, 32)
    assert torch.equal(c.lm_head.extra(x), torch.zeros(3, VOCAB))
    train(c, batches(51, 1), opt)
    U, V = head_delta(c)["lm_head.W"]
    assert U.shape[1] == R  # snapshot B~ = 0 after a reset


def test_non_lora_policies() -> None:
    base = tiny_llama()
    frozen = client(base, 1)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    assert set(base_weights(frozen)) == {f"{n}.W" for n in lte_layers(frozen)}

    clients = [client(base, s, non_lora="replicated") for s in (1, 2)]
    assert "model.norm.weight" in base_weights(clients[0]) and "model.embed_tokens.weight" in base_weights(clients[0])
    for i, c in enumerate(clients):
        train(c, batches(60 + i, 2))
    norms = [c.model.norm.weight.detach().clone() for c in clients]
    assert not torch.equal(norms[0], norms[1])
    W = base_weights(clients[0])
    update = merge(W, [head_delta(c) for c in clients])
    torch.testing.assert_close(W["model.norm.weight"], (norms[0] + norms[1]) / 2, rtol=0, atol=1e-6)
    for c in clients:
        apply_merged_update(c, update)
        assert torch.equal(c.model.norm.weight, W["model.norm.weight"])
        assert not head_delta(c)["model.norm.weight"].any()
    with pytest.raises(ValueError, match="tied"):
        attach_heads(tiny_llama(tie=True), r=R, alpha=ALPHA, seed=0)
    with pytest.raises(ValueError):
        attach_heads(tiny_llama(), non_lora="averaged")  # type: ignore[arg-type]
