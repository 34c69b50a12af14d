"""Tensors <-> Flower records, and the checks every reply passes before it touches server state."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord


def nbytes(record: ArrayRecord) -> int:
    """Serialised bytes of an ArrayRecord's arrays (.npy payload with its headers, as Flower sends them)."""
    return int(sum(len(array.data) for array in record.values()))


def to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: t.detach().contiguous() for name, t in tensors.items()})


def to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def check_arrays(received: ArrayRecord, expected: ArrayRecord) -> str | None:
    """Why ``received`` cannot stand in for ``expected`` (names, shapes, dtypes, finite values), or None."""
    missing = set(expected.keys()) - set(received.keys())
    extra = set(received.keys()) - set(expected.keys())
    if missing or extra:
        parts = [f"missing {sorted(missing)[:3]}" if missing else "", f"unknown {sorted(extra)[:3]}" if extra else ""]
        return "array names differ: " + "; ".join(p for p in parts if p)
    for name, want in expected.items():
        got = received[name]
        if tuple(got.shape) != tuple(want.shape):
            return f"array '{name}' has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if got.dtype != want.dtype:
            return f"array '{name}' has dtype {got.dtype}, expected {want.dtype}"
        values = got.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"array '{name}' has NaN or Inf values"
    return None


WIRE_DTYPES = ("fp16", "fp32", "bf16", "int8")
SCALE = "#scale"  # int8: the per-row scale of tensor <name> travels as <name>#scale (fp32)


def quantize(t: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows with a per-row fp32 scale max|row| / 127, stochastically rounded: q = floor(t / scale + u),
    u ~ U[0, 1), so E[q * scale] = t (an unbiased approximation)."""
    t = t.detach().to(device="cpu", dtype=torch.float32).reshape(t.shape[0], -1)
    scale = t.abs().amax(dim=1) / 127.0
    u = torch.rand(t.shape, generator=generator)
    q = torch.floor(t / torch.where(scale > 0, scale, 1.0)[:, None] + u).clamp_(-127, 127)
    return q.to(torch.int8), scale


def pack(tensors: dict[str, torch.Tensor], wire_dtype: str, generator: torch.Generator | None = None) -> ArrayRecord:
    """Float tensors in the wire dtype; bf16 travels as an int16 view (Flower's Array has no bfloat16);
    int8 (2-D tensors) as ``quantize``'s rows and scales (``generator``: its rounding draws)."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype '{wire_dtype}': use one of {', '.join(WIRE_DTYPES)}")
    out = {}
    for name, t in tensors.items():
        if wire_dtype == "int8":
            out[name], out[name + SCALE] = quantize(t, generator)
            continue
        cast = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[wire_dtype]
        t = t.detach().to(device="cpu", dtype=cast).contiguous()  # the wire is host memory
        out[name] = t.view(torch.int16) if cast is torch.bfloat16 else t
    return ArrayRecord(out)


def unpack(record: ArrayRecord, wire_dtype: str) -> dict[str, torch.Tensor]:
    """Inverse of ``pack``, returned in float32; a tensor not in the wire dtype (int8: without its finite,
    non-negative per-row scale) raises ValueError."""
    want = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.int16, "int8": torch.int8}[wire_dtype]
    tensors = record.to_torch_state_dict()
    out = {}
    for name, t in tensors.items():
        if wire_dtype == "int8" and name.endswith(SCALE):
            if name[:-len(SCALE)] not in tensors:
                raise ValueError(f"scale '{name}' has no tensor")
            continue
        if t.dtype != want:
            raise ValueError(f"tensor '{name}' arrived as {t.dtype}, expected {wire_dtype}")
        if wire_dtype == "int8":
            scale = tensors.get(name + SCALE)
            if scale is None or t.dim() != 2 or scale.dtype != torch.float32 or tuple(scale.shape) != (t.shape[0],) \
                    or not (torch.isfinite(scale).all() and (scale >= 0).all()):
                raise ValueError(f"tensor '{name}' arrived without a finite, non-negative fp32 scale per row")
            out[name] = t.float() * scale[:, None]
        else:
            out[name] = (t.view(torch.bfloat16) if wire_dtype == "bf16" else t).float()
    return out


def check_packed(received: ArrayRecord, expected: ArrayRecord, wire_dtype: str) -> str | None:
    """Why ``received`` cannot stand in for ``expected`` (tensors packed in ``wire_dtype`` by ``pack``):
    names, shapes, the wire dtype, and finite values once unpacked (bf16 travels as int16)."""
    problem = check_arrays(received, expected)
    if problem is None:
        bad = [name for name, t in unpack(received, wire_dtype).items() if not torch.isfinite(t).all()]
        problem = f"array '{bad[0]}' has NaN or Inf values" if bad else None
    return problem
