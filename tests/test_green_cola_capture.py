"""Green-ColA captures only the selected layers: their pairs (x_m, G_m) equal those of a full capture
of every adapted layer, in merged and unmerged mode, and the backward stops at the deepest one."""

import pytest
import torch

from fedcola.cola.server import ColaServer
from tests.test_cola_equivalence import BERT_TARGETS, F64_TOL, batch, bert, llama, lowrank, LLAMA_TARGETS


@pytest.mark.parametrize("make, targets, kind", [(bert, BERT_TARGETS, "cls"), (llama, LLAMA_TARGETS, "lm")], ids=["bert", "llama"])
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_selected_pairs_equal_a_full_capture(make, targets, kind, mode):
    server = ColaServer(make(), targets, mode=mode, dtype=torch.float64)
    adapters = {c: {n: a.double() for n, a in lowrank(server.targets, seed=c).items()} for c in (0, 1)}
    batches = {c: batch(kind, 4, 10, seed=c) for c in (0, 1)}
    layers = list(server.targets)
    selected = [layers[0], layers[-1]] if len(layers) > 2 else layers[-1:]  # the lowest and the top adapted layer
    full = server.hidden_grads(batches, adapters)
    part = server.hidden_grads(batches, adapters, layers=selected[1:])  # top layer only: the backward stops there
    deep = server.hidden_grads(batches, adapters, layers=selected)
    assert part.backward_flops < full.backward_flops
    for got, names in ((part, selected[1:]), (deep, selected)):
        for c in (0, 1):
            assert sorted(got.pairs[c]) == sorted(names)
            for layer in names:
                (x, G), (x_full, G_full) = got.pairs[c][layer], full.pairs[c][layer]
                assert torch.equal(x, x_full), layer
                assert torch.allclose(G, G_full, rtol=0, atol=F64_TOL * G_full.abs().max().item()), layer
