"""What a ``train.cola`` message carries for one client (ColA, arXiv 2404.13844, Prop. 1).

Per adapted layer m, either
  * the pairs (x_m, G_m) of each of the interval's I batches (``b<i>/<m>/x``, ``b<i>/<m>/G``); the client
    takes dL/dw = sum_rows G^T dg(x; w)/dw itself (any auxiliary model). A layer whose x equals an earlier
    layer's in the same batch (BERT's query / key / value, Llama's q / k / v and gate / up read the same
    hidden states) sends no x of its own: ``shared["b<i>/<m>"]`` names that earlier layer; or
  * the gradient itself (``g/<m>/<param>``): the mean over the interval's batches of the same VJP, formed
    by the server with its copy of the client's auxiliary model. For low-rank g = s B A x it is
    dA = s (G B)^T x, dB = s G^T (x A^T): r (d_in + d_out) numbers against I T (d_in + d_out) for the
    pairs; for linear g = dW x (+ db) it is G^T x (+ sum_rows G), which does not depend on w.
    ``fingerprint`` (sha256 of the fp32 parameters the server used, low-rank) lets the client check
    that they are its own.

``wire`` per run: ``pairs`` (the paper's; the only exact one for MLP auxiliary models), ``grads``
(low-rank and linear) or ``auto`` (per layer the smaller of the two). The client's update is the same
either way: the same gradient, the same optimizer step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.flop_counter import mm_flop

from fedcola.cola import records
from fedcola.cola.adapters import Adapter, Linear, LowRank

WIRE_MODES = ("pairs", "grads", "auto")
Pairs = dict[str, tuple[Tensor, Tensor]]
Grads = dict[str, dict[str, Tensor]]


@dataclass
class Encoded:
    """One client's payload: tensors (to pack in the wire dtype), the shared inputs, the layers sent as
    gradients, the fingerprint of the parameters they were formed with, and the server FLOPs they cost."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    grads: list[str] = field(default_factory=list)
    fingerprint: str = ""
    flops: int = 0


def fingerprint(adapters: Mapping[str, Adapter], layers: Sequence[str]) -> str:
    """sha256 of the fp32 parameters of ``layers`` (names as in ``records.adapter_record``, sorted)."""
    digest = hashlib.sha256()
    named = {f"{m}/{name}": p for m in layers for name, p in adapters[m].named_parameters()}
    for key in sorted(named):
        digest.update(key.encode())
        digest.update(named[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def fingerprinted(adapters: Mapping[str, Adapter], layers) -> list[str]:
    """The layers of ``layers`` whose gradient depends on the parameters it was formed with (not linear)."""
    return [m for m in layers if not isinstance(adapters[m], Linear)]


def choose(per_batch: Sequence[Pairs], adapters: Mapping[str, Adapter] | None, mode: str) -> list[str]:
    """The layers whose gradient travels instead of their pairs: none for ``pairs``, without the client's
    auxiliary models or for an MLP; all for ``grads``; for ``auto`` those whose gradient is smaller."""
    if mode not in WIRE_MODES:
        raise ValueError(f"unknown ColA wire mode {mode!r}: use one of {', '.join(WIRE_MODES)}")
    if mode == "pairs" or adapters is None or not per_batch:
        return []
    out = []
    for m in per_batch[0]:
        if not isinstance(adapters[m], (LowRank, Linear)):
            continue
        grad_numel = sum(p.numel() for p in adapters[m].parameters())
        pair_numel = sum(x.numel() + G.numel() for x, G in (pairs[m] for pairs in per_batch))
        if mode == "grads" or grad_numel < pair_numel:
            out.append(m)
    return out


def gradient(adapter: Adapter, x: Tensor, G: Tensor) -> tuple[dict[str, Tensor], int]:
    """dL/dw = sum_rows G^T dg(x; w)/dw (Prop. 1) in closed form, on the adapter's device and in its dtype,
    and its FLOPs (torch's matmul formula, ``flop_counter.mm_flop``): low-rank g = s B A x: dA = s (G B)^T x,
    dB = s G^T (x A^T); linear g = dW x + db: dW = G^T x, db = sum_rows G."""
    like = next(adapter.parameters())
    x, G = x.to(like.device, like.dtype), G.to(like.device, like.dtype)
    with torch.no_grad():
        if isinstance(adapter, LowRank):
            GB, xA = G @ adapter.B, x @ adapter.A.T
            products = [(G, adapter.B), (GB.T, x), (x, adapter.A.T), (G.T, xA)]
            grads = {"A": adapter.scaling * GB.T @ x, "B": adapter.scaling * G.T @ xA}
        elif isinstance(adapter, Linear):
            products = [(G.T, x)]
            grads = {"weight": G.T @ x} | ({} if adapter.bias is None else {"bias": G.sum(0)})
        else:
            raise TypeError(f"no closed-form gradient for {type(adapter).__name__} auxiliary models: their pairs travel")
    return grads, sum(mm_flop(a.shape, b.shape) for a, b in products)


def mean_grads(per_batch: Sequence[Pairs], adapters: Mapping[str, Adapter], layers: Sequence[str]) -> tuple[Grads, int]:
    """Per layer the mean over the interval's I batches of dL/dw (``gradient`` of all their rows at once,
    / I): what the client's ``GLClient.step`` accumulates from the pairs, up to rounding; and the FLOPs."""
    out: Grads = {}
    flops = 0
    for m in layers:
        x, G = (torch.cat(t) for t in zip(*(pairs[m] for pairs in per_batch)))
        grads, cost = gradient(adapters[m], x, G)
        out[m], flops = {name: g / len(per_batch) for name, g in grads.items()}, flops + cost
    return out, flops


def encode(per_batch: Sequence[Pairs], adapters: Mapping[str, Adapter] | None, mode: str, own: bool = True, share: bool = True) -> Encoded:
    """One client's payload (``per_batch``: its pairs of each batch of the interval; ``adapters``: the
    server's copy of its auxiliary models, ``own`` False when they are not its own parameters, e.g. the
    parameter mean of merged linear models, whose gradient does not depend on them; ``share`` False
    sends every layer's input, also a shared one: only to measure what sharing saves)."""
    enc = Encoded(grads=choose(per_batch, adapters, mode))
    if enc.grads:
        grads, enc.flops = mean_grads(per_batch, adapters, enc.grads)
        enc.tensors |= {f"g/{m}/{name}": g for m, named in grads.items() for name, g in named.items()}
        low_rank = fingerprinted(adapters, enc.grads) if own else []
        enc.fingerprint = fingerprint(adapters, low_rank) if low_rank else ""
    for i, pairs in enumerate(per_batch):
        sent: list[tuple[str, Tensor]] = []
        for m, (x, G) in pairs.items():
            if m in enc.grads:
                continue
            enc.tensors[f"b{i}/{m}/G"] = G
            source = next((s for s, xs in sent if xs.shape == x.shape and torch.equal(xs, x)), None) if share else None
            if source is None:
                enc.tensors[f"b{i}/{m}/x"] = x
                sent.append((m, x))
            else:
                enc.shared[f"b{i}/{m}"] = source
    return enc


def decode(tensors: Mapping[str, Tensor], shared: Mapping[str, str], adapters: Mapping[str, Adapter], dims: Mapping[str, tuple[int, int]],
           interval: int) -> tuple[list[Pairs], Grads]:
    """The pairs of each batch (shared inputs mapped back to every layer) and the gradients of the layers
    ``dims`` that the payload carries, checked against this client's auxiliary models: names, shapes,
    finiteness, each layer once either way; ValueError on any mismatch."""
    grads: Grads = {}
    for m in dims:
        named = {k[len(f"g/{m}/"):]: t for k, t in tensors.items() if k.startswith(f"g/{m}/")}
        if not named:
            continue
        params = dict(adapters[m].named_parameters())
        if set(named) != set(params) or any(named[n].shape != params[n].shape for n in params):
            raise ValueError(f"layer {m}: gradients {sorted(named)} do not fit its auxiliary model's parameters")
        if not all(torch.isfinite(t).all() for t in named.values()):
            raise ValueError(f"layer {m}: NaN or Inf in the gradients")
        grads[m] = named
    pair_dims = {m: d for m, d in dims.items() if m not in grads}
    slots = {f"b{i}/{m}" for i in range(interval) for m in pair_dims}  # a batch's layer sent as pairs
    want = {f"g/{m}/{n}" for m in grads for n in grads[m]} | {f"{slot}/G" for slot in slots} | {f"{slot}/x" for slot in slots - set(shared)}
    if set(tensors) != want or not set(shared) <= slots:
        unknown = sorted((set(tensors) - want) | (set(shared) - slots))[:3]
        raise ValueError(f"payload does not match this client's layers (unknown {unknown}, missing {sorted(want - set(tensors))[:3]})")
    resolved = dict(tensors)
    for key, source in shared.items():
        i, m = key.split("/", 1)
        x = tensors.get(f"{i}/{source}/x")
        if source not in pair_dims or x is None or pair_dims[source][0] != pair_dims[m][0] or x.shape[0] != tensors[f"{key}/G"].shape[0]:
            raise ValueError(f"layer {m}: its shared input '{source}' is not an input sent in batch {i}")
        resolved[f"{key}/x"] = x
    return records.pairs_from_payload({k: t for k, t in resolved.items() if not k.startswith("g/")}, pair_dims, interval), grads
