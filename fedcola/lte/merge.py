"""LTE's server merge (Huh et al., arXiv 2402.16828) on deltas, model-free: a delta or merged update
maps a weight's key (``"<linear>.W"`` or a replicated parameter's name) to low-rank factors ``(U, V)``
with ``U @ V`` the update, or to a dense tensor when factors would not be smaller (:func:`use_factors`).

Sync: ``W_k <- W_k + 1/|S_k| sum_{n in S_k} delta_n,k`` (the paper's ``Delta = 1/N sum_n delta_n``,
per weight over the deltas that contain it: :func:`merge`; :func:`merge_robust` takes their
coordinate-wise median or trimmed mean instead). Async: each delta merged on arrival,
discounted by ``(1 + staleness) ** -a`` (:func:`merge_async`, FedAsync's polynomial rule).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedcola.fl.robust import robust_mean

Factors = tuple[Tensor, Tensor]
Delta = Factors | Tensor


class InvalidDeltaError(ValueError):
    """A client delta is malformed: unknown key, wrong shape or rank, or non-finite values."""


class StaleDeltaError(RuntimeError):
    """An asynchronous delta is older than the allowed staleness and was dropped."""


def use_factors(rank: int, d_out: int, d_in: int) -> bool:
    """True when rank-``rank`` factors (rank (d_in + d_out) numbers) are smaller than the dense matrix."""
    return rank * (d_in + d_out) < d_in * d_out


def compact(U: Tensor, V: Tensor) -> Delta:
    """``U @ V`` as the smaller of its factors ``(U, V)`` and the dense product."""
    return (U, V) if use_factors(U.shape[1], U.shape[0], V.shape[1]) else U @ V


def dense(delta: Delta) -> Tensor:
    """The dense matrix of a delta entry."""
    return delta[0] @ delta[1] if isinstance(delta, tuple) else delta


def delta_nbytes(delta: dict[str, Delta]) -> int:
    """Bytes on the wire for a delta or merged update (sum over the shipped tensors)."""
    return sum(
        sum(t.numel() * t.element_size() for t in (v if isinstance(v, tuple) else (v,)))
        for v in delta.values()
    )


def delta_norm(delta: dict[str, Delta]) -> float:
    """Frobenius norm of a delta, from its factors without the dense product: ||U V||^2 = sum((U^T U) * (V V^T))."""
    total = 0.0
    for entry in delta.values():
        if isinstance(entry, tuple):
            U, V = (t.double() for t in entry)
            total += float(((U.T @ U) * (V @ V.T)).sum())
        else:
            total += float(entry.double().pow(2).sum())
    return max(total, 0.0) ** 0.5


def _check_entry(key: str, entry: Delta, target: Tensor, max_rank: int | None) -> None:
    parts = entry if isinstance(entry, tuple) else (entry,)
    if isinstance(entry, tuple):
        if len(entry) != 2 or any(t.ndim != 2 for t in entry) or target.ndim != 2:
            raise InvalidDeltaError(f"{key}: factors must be two matrices for a matrix weight")
        U, V = entry
        if U.shape[0] != target.shape[0] or V.shape[1] != target.shape[1] or U.shape[1] != V.shape[0]:
            raise InvalidDeltaError(
                f"{key}: factor shapes {tuple(U.shape)} @ {tuple(V.shape)} do not give {tuple(target.shape)}"
            )
        if max_rank is not None and U.shape[1] > max_rank:
            raise InvalidDeltaError(f"{key}: factor rank {U.shape[1]} exceeds {max_rank}")
    elif entry.shape != target.shape:
        raise InvalidDeltaError(f"{key}: shape {tuple(entry.shape)} != {tuple(target.shape)}")
    if any(t.dtype != torch.float32 for t in parts):
        raise InvalidDeltaError(f"{key}: dtype {next(t.dtype for t in parts if t.dtype != torch.float32)}, expected float32")
    if not all(bool(torch.isfinite(t).all()) for t in parts):
        raise InvalidDeltaError(f"{key}: non-finite values")


def validate_delta(W: dict[str, Tensor], delta: dict[str, Delta], r: int | None = None) -> None:
    """Raise :class:`InvalidDeltaError` unless ``delta`` names a non-empty subset of ``W``'s keys (a
    client under a FLOPs budget sends only the weights it trained), with right shapes, finite values
    and (given the head rank ``r``) factor rank at most ``2 r``."""
    unknown = sorted(delta.keys() - W.keys())
    if unknown or not delta:
        raise InvalidDeltaError(f"delta names unknown weights {unknown[:3]}" if unknown else "delta names no weight")
    for key, entry in delta.items():
        _check_entry(key, entry, W[key], None if r is None else 2 * r)


@torch.no_grad()
def merge(
    W: dict[str, Tensor],
    deltas: Sequence[dict[str, Delta]],
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
    r: int | None = None,
) -> dict[str, Delta]:
    """Server merge, per weight ``k``: ``W_k <- W_k + scale * sum_{n in S_k} w_n delta_n,k / sum_{n in S_k} w_n``
    in fp32, where ``S_k`` are the deltas that contain ``k`` (``w_n = 1``: the paper's mean over
    heads). When every client sends every weight, ``S_k`` is all of them (the paper's
    ``1/N sum_n delta_n``). A client under a FLOPs budget (GreenTrainer's rho_k) sends only the weights
    it trained; an untrained head's delta is exactly zero and is not counted in the denominator, so
    weak clients do not shrink the others' updates (docs/green/clients.md). ``W`` is updated in
    place; the merged update is returned per weight some delta contains, as the concatenation of
    the weighted factors ``[w_1 U_1, ...] [V_1; ...]`` (dense if that is smaller) so clients can
    apply it. All deltas are validated before ``W`` is touched."""
    if not deltas:
        raise ValueError("merge needs at least one delta")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas) or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be {len(deltas)} non-negative numbers with a positive sum")
    for delta in deltas:
        validate_delta(W, delta, r)
    update: dict[str, Delta] = {}
    for key, target in W.items():
        present = [(w, d[key]) for w, d in zip(weights, deltas) if key in d]
        total = sum(w for w, _ in present)
        if total <= 0:
            continue
        entries = [(scale * w / total, e) for w, e in present]
        lowrank = [(c, e) for c, e in entries if isinstance(e, tuple)]
        full = [c * e.to(torch.float32) for c, e in entries if not isinstance(e, tuple)]
        if lowrank:
            U = torch.cat([c * e[0].to(torch.float32) for c, e in lowrank], dim=1)
            V = torch.cat([e[1].to(torch.float32) for _, e in lowrank], dim=0)
            entry = compact(U, V) if not full else U @ V + torch.stack(full).sum(0)
        else:
            entry = torch.stack(full).sum(0)
        target.add_(dense(entry))
        update[key] = entry
    return update


@torch.no_grad()
def merge_robust(W: dict[str, Tensor], deltas: Sequence[dict[str, Delta]], aggregation: str, trim: float = 0.2,
                 r: int | None = None) -> dict[str, Delta]:
    """Byzantine-robust sync merge: ``W_k <- W_k + agg_{n in S_k} dense(delta_n,k)`` with ``agg`` the
    coordinate-wise median or trimmed mean (``fedcola.fl.robust``, Flower's) instead of :func:`merge`'s
    mean; unweighted, in float64. The merged update is returned dense. All deltas are validated first."""
    if not deltas:
        raise ValueError("merge needs at least one delta")
    for delta in deltas:
        validate_delta(W, delta, r)
    update: dict[str, Delta] = {}
    for key, target in W.items():
        present = [dense(d[key]).double().cpu().numpy() for d in deltas if key in d]
        if present:
            update[key] = torch.from_numpy(robust_mean(present, aggregation, trim)).to(target.device, target.dtype)
            target.add_(update[key])
    return update


def staleness_weight(staleness: int, a: float = 0.5) -> float:
    """Polynomial staleness discount ``(1 + staleness) ** -a`` (FedAsync, Xie et al. 2019)."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return (1.0 + staleness) ** -a


def merge_async(
    W: dict[str, Tensor],
    delta: dict[str, Delta],
    staleness: int,
    a: float = 0.5,
    max_staleness: int = 10,
    mix: float = 1.0,
    r: int | None = None,
) -> dict[str, Delta]:
    """Merge one arriving delta at once: ``W <- W + mix * staleness_weight(staleness, a) * delta``.

    ``staleness`` = merges applied to ``W`` since the client's base was sent. Raises
    :class:`StaleDeltaError` (``W`` untouched) beyond ``max_staleness``. ``mix = 1`` with zero
    staleness is exactly a sequential one-client :func:`merge`; ``mix = 1/N`` keeps the step size
    of a synchronous round with N clients.
    """
    if staleness > max_staleness:
        raise StaleDeltaError(f"delta staleness {staleness} > max_staleness {max_staleness}; dropped")
    return merge(W, [delta], scale=mix * staleness_weight(staleness, a), r=r)
