"""Per-tensor FLOPs profile for GreenTrainer (Huang et al., ICLR 2024, arXiv 2309.13192, Sec. 4.1
"Tensor FLOPs profiling").

For every trainable tensor k, ordered output -> input, the profile holds
  * t_fp[k]  forward FLOPs of the op that owns k,
  * t_dw[k]  FLOPs of k's weight gradient,
  * t_dy[k]  FLOPs of activation-gradient work that becomes necessary as soon as k or any
             tensor deeper than k (nearer the input) trains.
The backward cost of a selection m in {0,1}^N is then exact (the paper's constraint
T_fp + m . t_dw + sigma(m) . t_dy <= rho T_full):
    T_bp(m) = sum_i m_i t_dw_i + sum_i [max_{j>=i} m_j] t_dy_i.
DESIGN.md writes the max over j<=i: the same condition ("dy must reach the deepest selected
tensor") indexed input -> output, as the reference's np.maximum.accumulate over named_parameters.

Attribution of dy (what keeps T_bp exact). Autograd computes an op's input gradient dx iff that
input requires grad, i.e. iff one of its ancestors (trainable tensors upstream of it in the autograd
graph of the dry run) trains. In a sequential network with residuals, the ancestors are the
shallowest ancestor a and everything deeper. That is a suffix of the output -> input order, so the
dx cost is stored as t_dy of a. a is the next tensor down, not the op's own weight, whose gradient
does not need dx. Ops without a trainable tensor follow the same rule, one operand at a time:
attention's QK^T and P.V (dQ goes to q's ancestor, dV to v's, dP to the shallower of q's and k's),
frozen modules, and the LM head when it is tied to the input embedding. A tied tensor sits at its
first (deepest) use, so training it pulls dy through the whole model, as autograd does.
Where it is not exact: when the ancestors are not a suffix. Only parallel siblings that are not
ancestors of each other cause this, e.g. the k projection, executed after q but not upstream of it.
Llama/BERT/ViT attention then charges dV when the deepest selected tensor is k, and dV + dK when
it is q. So T_bp is an upper bound there, off by at most two attention matmuls of that one block.
Every other selection is exact, including gated MLPs (gate/up) and GPT-2's fused c_attn.

Conventions. A multiply-add counts 2 FLOPs (torch.utils.flop_counter's convention). Attention
follows its math form (QK^T, P.V forward; dP, dV, dQ, dK backward), so fused kernels that
recompute QK^T in backward do one matmul more. Elementwise work counts only where a trainable
tensor owns it (bias add and reduction, norm affine, embedding scatter-add), at about one FLOP per
element and primitive. FlopCounterMode counts none of this elementwise work; it is <2% at hidden
size 64. Other elementwise ops (activations, softmax, residual adds) are not counted.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from fedcola.green.rules import rule
from fedcola.train import on_device

def _first_tensor(args: tuple, kwargs: Mapping[str, Any]) -> Tensor | None:
    return next((a for a in itertools.chain(args, kwargs.values()) if isinstance(a, Tensor)), None)


class _Ancestry:
    """Which trainable tensors an activation depends on, read from the autograd graph of the dry run.

    `of(x)` is the first-use time of the shallowest trainable tensor upstream of x (-1 if none). The
    grad of x is computed iff one of x's ancestors trains, and x's ancestors are that tensor plus
    everything deeper, except parallel siblings (module docstring)."""

    def __init__(self, first_use: Mapping[int, int]) -> None:
        self.first_use, self.memo = first_use, {}

    def of(self, x: Tensor | None) -> int:
        if x is None or not x.requires_grad:
            return -1
        if x.grad_fn is None:
            return self.first_use.get(id(x), -1)
        stack = [x.grad_fn]
        while stack:  # iterative post-order: graphs of deep models exceed the recursion limit
            node = stack[-1]
            if node in self.memo:
                stack.pop()
                continue
            children = [c for c, _ in node.next_functions if c is not None]
            pending = [c for c in children if c not in self.memo]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            own = self.first_use.get(id(node.variable), -1) if hasattr(node, "variable") else -1
            self.memo[node] = max([own, *(self.memo[c] for c in children)])
        return self.memo[x.grad_fn]


class _ActivationMatmuls(TorchFunctionMode):
    """Records matmuls between activations (no nn.Parameter operand): attention's QK^T and P.V,
    rotary tables. Forward FLOPs go to `fp_other`; the gradient of each operand is a dy chunk
    (ancestor time, FLOPs), e.g. dQ = dS K needs q's ancestors, dV = P^T dO needs v's."""

    _MATMULS = {torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm}

    def __init__(self, ancestry: _Ancestry, chunks: list[tuple[int, int]], fp_other: list[int]) -> None:
        super().__init__()
        self.ancestry, self.chunks, self.fp_other = ancestry, chunks, fp_other

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        anc = self.ancestry.of
        if func in self._MATMULS and not any(isinstance(a, nn.Parameter) for a in args[:2]):
            a, b = args[:2]
            mm = 2 * out.numel() * a.shape[-1]
            self.fp_other.append(mm)
            self.chunks += [(anc(a), mm), (anc(b), mm)]
        elif func is F.scaled_dot_product_attention:
            q, k, v = args[:3] if len(args) >= 3 else (kwargs["query"], kwargs["key"], kwargs["value"])
            rows = q.numel() // q.shape[-1] * k.shape[-2]  # B * H * L * S
            s_mm, o_mm = 2 * rows * q.shape[-1], 2 * rows * v.shape[-1]
            self.fp_other.append(s_mm + o_mm)
            # dP = dO V^T (needed for q or k), dV = P^T dO, dQ = dS K, dK = dS^T Q
            self.chunks += [(max(anc(q), anc(k)), o_mm), (anc(v), o_mm), (anc(q), s_mm), (anc(k), s_mm)]
        return out


@dataclass(frozen=True)
class FlopsProfile:
    """FLOPs of one training step per trainable tensor, ordered output -> input (module docstring).

    `fp_other` is the forward FLOPs of ops that own no trainable tensor (attention matmuls, frozen
    modules); the forward total is t_fp.sum() + fp_other."""

    names: tuple[str, ...]
    t_fp: np.ndarray
    t_dw: np.ndarray
    t_dy: np.ndarray
    fp_other: int

    @property
    def forward_flops(self) -> int:
        """T_fp: FLOPs of the forward pass."""
        return int(self.t_fp.sum()) + self.fp_other

    @property
    def full_backward_flops(self) -> int:
        """T_bp(all): backward FLOPs of full fine-tuning."""
        return int(self.t_dw.sum() + self.t_dy.sum())

    def backward_flops(self, selection: np.ndarray | Collection[int]) -> int:
        """T_bp(m) = sum_i m_i t_dw_i + sum_i [max_{j>=i} m_j] t_dy_i (0/1 mask, output -> input)."""
        m = np.asarray(selection, dtype=np.int64)
        if m.shape != self.t_dw.shape:
            raise ValueError(f"selection has shape {m.shape}, expected {self.t_dw.shape}")
        reach = np.maximum.accumulate(m[::-1])[::-1]
        return int(m @ self.t_dw + reach @ self.t_dy)

    def rho_of(self, selection: np.ndarray | Collection[int]) -> float:
        """(T_fp + T_bp(m)) / (T_fp + T_bp(all)): the fraction of full fine-tuning's FLOPs."""
        return (self.forward_flops + self.backward_flops(selection)) / (self.forward_flops + self.full_backward_flops)

    def selected_names(self, selection: np.ndarray | Collection[int]) -> tuple[str, ...]:
        """Parameter names of the tensors a 0/1 mask selects."""
        return tuple(n for n, s in zip(self.names, selection, strict=True) if s)


def profile_tensors(model: nn.Module, inputs: Mapping[str, Any]) -> FlopsProfile:
    """Profile every parameter with requires_grad=True, from one dry-run forward of `model(**inputs)`.

    Costs scale with the batch's size and sequence length, so pass a batch of the training shape.
    Parameters not used by the forward are left out. A trainable parameter owned by a module type
    without a cost rule raises ValueError naming that type.
    """
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    ruled = [m for m in model.modules() if rule(m) is not None and any(True for _ in m.parameters(recurse=False))]
    covered = {id(p) for m in ruled for p in m.parameters(recurse=False)}
    for mod_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if id(p) in names and id(p) not in covered:
                raise ValueError(
                    f"FLOPs profiler does not know module type {type(module).__name__!r} "
                    f"(module {mod_name!r}, trainable parameter {local!r}); add a cost rule in fedcola.green.flops")

    clock = itertools.count()
    first_use: dict[int, int] = {}  # id(param) -> time of its first (deepest) use
    own_fp: dict[int, int] = {}
    own_dw: dict[int, int] = {}
    chunks: list[tuple[int, int]] = []  # (first-use time of the shallowest ancestor, dy FLOPs)
    fp_other: list[int] = []
    ancestry = _Ancestry(first_use)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = _first_tensor(args, kwargs)
        y = output if isinstance(output, Tensor) else _first_tensor(tuple(output), {})
        costs, dx, *inner = rule(module)(module, y)
        inner = inner[0] if inner else {}
        ticks = {local: next(clock) for local in reversed(costs)} if inner else dict.fromkeys(costs, next(clock))
        for local, (fp, dw) in costs.items():
            p = getattr(module, local)
            if id(p) in names:
                first_use.setdefault(id(p), ticks[local])
                own_fp[id(p)] = own_fp.get(id(p), 0) + fp
                own_dw[id(p)] = own_dw.get(id(p), 0) + dw
            else:
                fp_other.append(fp)
        chunks.append((ancestry.of(x), dx))
        for local, dy in inner.items():  # paid iff `local` trains, else iff the op's input needs its grad
            p = getattr(module, local)
            chunks.append((first_use[id(p)] if id(p) in names else ancestry.of(x), dy))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in ruled]
    try:
        with torch.enable_grad(), _ActivationMatmuls(ancestry, chunks, fp_other):
            model(**on_device(inputs, model))
    finally:
        for h in handles:
            h.remove()

    order = sorted(first_use, key=lambda i: -first_use[i])  # output -> input; ties keep module order
    times_ascending = [first_use[i] for i in reversed(order)]
    t_dy = np.zeros(len(order), dtype=np.int64)
    for ancestor_time, dy in chunks:
        if ancestor_time >= 0:  # counted iff the shallowest ancestor or anything deeper trains
            t_dy[len(order) - bisect.bisect_right(times_ascending, ancestor_time)] += dy
    return FlopsProfile(
        names=tuple(names[i] for i in order),
        t_fp=np.array([own_fp[i] for i in order], dtype=np.int64),
        t_dw=np.array([own_dw[i] for i in order], dtype=np.int64),
        t_dy=t_dy,
        fp_other=sum(fp_other),
    )


def apply_selection(model: nn.Module, selected: Collection[str]) -> None:
    """Train exactly the named parameters: requires_grad=True for them, False for all others, so
    autograd skips dw of frozen tensors and dy below the deepest selected one."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in selected)


def measure_step_flops(model: nn.Module, inputs: Mapping[str, Any], selected: Collection[str],
                       loss_fn: Callable[[Any], Tensor] | None = None) -> tuple[int, int]:
    """Count (forward, backward) FLOPs of one training step with FlopCounterMode when only
    `selected` parameters train. Attention runs on the math SDPA backend, whose matmuls
    FlopCounterMode counts (it has no formula for the CPU flash kernel). `loss_fn(outputs)` defaults
    to `outputs.loss`. The model's requires_grad flags and .grad are restored afterwards."""
    params = dict(model.named_parameters())
    saved = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    apply_selection(model, selected)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            with FlopCounterMode(display=False) as fwd:
                out = model(**on_device(inputs, model))
                loss = out.loss if loss_fn is None else loss_fn(out)
            with FlopCounterMode(display=False) as bwd:
                if loss.requires_grad:
                    loss.backward()
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
    return fwd.get_total_flops(), bwd.get_total_flops()
