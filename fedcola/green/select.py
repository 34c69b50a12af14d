"""GreenTrainer: adaptive backpropagation under a FLOPs budget (Huang et al., ICLR 2024,
arXiv 2309.13192, Sec. 4; reference code github.com/pittisl/GreenTrainer).

Pick the 0/1 selection m over trainable tensors (ordered output -> input, see `fedcola.green.flops`) that
    maximises  sum_k m_k I_k   subject to   T_fp + T_bp(m) <= rho (T_fp + T_bp(all))      (objective, Sec. 4)
where I_k estimates how much training tensor k lowers the loss (Sec. 4.2) and T_bp(m) is the
profiled backward cost (Sec. 4.1). Selection is redone every few epochs (`GreenSelector`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import itertools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fedcola.green.flops import FlopsProfile, apply_selection, profile_tensors
from fedcola.train import StepStats, train_steps, on_device

__all__ = ["BudgetSelection", "GreenSelector", "apply_selection", "counted", "dp_select", "fresh_optimizer", "select",
           "select_under_budget", "smallest_feasible_rho", "tensor_importance", "train_under_budget"]

DEFAULT_UNITS = 20_000  # T_bp(all) / T_q when no resolution is given; rounding wastes < N units
MAX_TABLE = 1 << 30  # bytes of the DP's back-pointer table


def fresh_optimizer(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """An optimizer of `optimizer`'s type and per-group hyper-parameters (current lr included) over
    `params` only, with empty state: its first step is the step a tensor takes when it starts training."""
    ids = {id(p) for p in params}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [p for p in g["params"] if id(p) in ids]}
              for g in optimizer.param_groups]
    return type(optimizer)([g for g in groups if g["params"]])


def tensor_importance(model: nn.Module, names: Sequence[str], closures: Sequence[Callable[[], Tensor]],
                      optimizer: torch.optim.Optimizer) -> np.ndarray:
    """I_k = -sum_i g_i dw_i over tensor k's entries (Sec. 4.2): the first-order Taylor estimate of
    the training loss reduction from training tensor k, with dw the update of ONE optimizer step.

    Each closure runs a forward on one batch and returns its loss; g is the gradient of their mean,
    taken at the current weights w0 where the Taylor expansion is centred (the reference code
    takes it after the step, at w1). One batch is what the reference uses; more batches lower the
    variance of the same estimate.

    dw is the first step of a fresh optimizer of `optimizer`'s type and hyper-parameters
    (`fresh_optimizer`), for every tensor alike. This is what the reference's first selection
    does (its optimizer has no state yet). At later selections the reference steps its live
    optimizer, so a tensor trained since the last selection moves along its momentum while an
    untrained one takes a first step; with AdamW the latter is lr sign(g) (I_k = lr ||g_k||_1 > 0)
    and the former is anti-aligned with g whenever training oscillates. Measured on MiniLM at
    step 50 of 150: 17 of the 26 trained tensors, the new classifier head among them, got
    I_k < 0 (on 1 batch and on 8) and were frozen (docs/green/README.md). `optimizer` itself is
    never stepped: its state is untouched. The weights, the .grad fields and the requires_grad
    flags are restored exactly.
    The result is divided by max_k |I_k|, so it lies in [-1, 1] (as in the reference). A positive
    scale does not change which selection the DP picks.
    Tensors with I_k <= 0 are expected to raise the loss and are never selected (`dp_select`).
    """
    if not closures:
        raise ValueError("tensor importance needs at least one batch")
    params = dict(model.named_parameters())
    saved = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    chosen = [params[n] for n in names]
    apply_selection(model, set(names))
    for p in params.values():
        p.grad = None
    try:
        for closure in closures:
            (closure() / len(closures)).backward()
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in chosen]
        w0 = [p.detach().clone() for p in chosen]
        fresh_optimizer(optimizer, chosen).step()
        with torch.no_grad():
            importance = np.array([-(g.double() * (p.double() - w)).sum().item()
                                   for g, p, w in zip(grads, chosen, w0)])
            for p, w in zip(chosen, w0):
                p.copy_(w)
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
    scale = np.abs(importance).max()
    return importance / scale if scale > 0 else importance


def dp_select(importance: np.ndarray, t_dw: np.ndarray, t_dy: np.ndarray, budget: float,
              resolution: float = 1.0) -> np.ndarray:
    """Exact 0/1 maximiser of sum m_k I_k s.t. sum m_k t_dw_k + sum_k [max_{j>=k} m_j] t_dy_k <= budget
    (Sec. 4.3), all arrays ordered output -> input.

    The max term depends only on the deepest selected tensor d: it costs D(d) = sum_{k<=d} t_dy_k.
    For each d the rest is a 0/1 knapsack over tensors 0..d-1 with capacity budget - D(d) - t_dw_d.
    One pass output -> input grows the knapsack table one tensor at a time and reads it for every d.
    Costs are discretised to units of `resolution` (T_q): costs rounded up, budget rounded down.
    So the result always respects the real budget, and it is optimal whenever the costs are
    multiples of T_q (integer costs with T_q = 1). Time O(N C) and memory N (C + 1) bytes, where
    C = budget / T_q; more than MAX_TABLE bytes is a ValueError asking for a coarser T_q. Tensors with I_k <= 0 are never selected: they add cost and lower the
    objective. Returns a bool mask; it is all False when no tensor fits or none has I_k > 0.
    """
    importance = np.asarray(importance, dtype=np.float64)
    n = importance.shape[0]
    dw = np.ceil(np.asarray(t_dw, dtype=np.float64) / resolution).astype(np.int64)
    reach = np.cumsum(np.ceil(np.asarray(t_dy, dtype=np.float64) / resolution).astype(np.int64))
    cap = int(np.floor(budget / resolution)) if budget >= 0 else -1
    mask = np.zeros(n, dtype=bool)
    if cap < 0:
        return mask
    if n * (cap + 1) > MAX_TABLE:
        raise ValueError(f"budget / resolution = {cap} units for {n} tensors exceeds the DP table limit "
                         f"({MAX_TABLE} bytes); use a coarser resolution (T_q)")
    best = np.zeros(cap + 1)  # best[c]: max importance of tensors seen so far with dw cost <= c
    took = np.zeros((n, cap + 1), dtype=bool)
    best_value, deepest, deepest_room = 0.0, -1, 0
    for k in range(n):
        if importance[k] <= 0:
            continue
        room = cap - reach[k] - dw[k]
        if room >= 0 and importance[k] + best[room] > best_value:
            best_value, deepest, deepest_room = importance[k] + best[room], k, room
        if dw[k] <= cap:
            with_k = best[: cap + 1 - dw[k]] + importance[k]
            took[k, dw[k]:] = with_k > best[dw[k]:]
            best[dw[k]:] = np.maximum(best[dw[k]:], with_k)
    if deepest >= 0:
        mask[deepest] = True
        c = deepest_room
        for k in range(deepest - 1, -1, -1):
            if took[k, c]:
                mask[k] = True
                c -= dw[k]
    return mask


def smallest_feasible_rho(profile: FlopsProfile) -> float:
    """The least rho at which one tensor fits: min_k (T_fp + t_dw_k + sum_{j<=k} t_dy_j) / T_full."""
    single = profile.t_dw + np.cumsum(profile.t_dy)
    full = profile.forward_flops + profile.full_backward_flops
    return float((profile.forward_flops + single.min()) / full)


def select(profile: FlopsProfile, importance: np.ndarray, rho: float,
           resolution: float | None = None) -> np.ndarray:
    """Solve the selection objective for FLOPs ratio rho in (0, 1]: backward budget rho (T_fp + T_bp(all)) - T_fp.

    `resolution` (T_q, FLOPs per budget unit) defaults to T_bp(all) / 20000. Raises ValueError for
    rho outside (0, 1], or when rho is below `smallest_feasible_rho` (the message gives it)."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    rho_min = smallest_feasible_rho(profile)
    if rho < rho_min:
        raise ValueError(f"rho={rho:g} leaves no backward budget for any tensor; "
                         f"smallest feasible rho is {rho_min:.6g}")
    budget = rho * (profile.forward_flops + profile.full_backward_flops) - profile.forward_flops
    t_q = resolution if resolution is not None else max(profile.full_backward_flops / DEFAULT_UNITS, 1.0)
    return dp_select(importance, profile.t_dw, profile.t_dy, budget, t_q)


class GreenSelector:
    """Re-selects the trained tensors every `interval` epochs or rounds, as GreenTrainer does
    (Sec. 4: importance is re-evaluated periodically, since it changes during training).

    Call `update(step, model, closures, optimizer)` at the start of every epoch/round. At steps
    0, interval, 2 interval, ... it recomputes importance on the closures' batches (`tensor_importance`),
    solves the selection objective and applies the selection to `model`. It returns the selected
    parameter names.
    """

    def __init__(self, profile: FlopsProfile, rho: float, interval: int = 1, resolution: float | None = None) -> None:
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho must be in (0, 1], got {rho}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.profile, self.rho, self.interval, self.resolution = profile, rho, interval, resolution
        self.importance: np.ndarray | None = None
        self.mask: np.ndarray | None = None

    @property
    def selected(self) -> tuple[str, ...]:
        """Names of the currently selected tensors (empty before the first selection)."""
        return () if self.mask is None else self.profile.selected_names(self.mask)

    @property
    def achieved_rho(self) -> float | None:
        """(T_fp + T_bp(m)) / (T_fp + T_bp(all)) of the current selection."""
        return None if self.mask is None else self.profile.rho_of(self.mask)

    def update(self, step: int, model: nn.Module, closures: Sequence[Callable[[], Tensor]],
               optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
        """Re-select if `step` is a multiple of `interval` (or nothing is selected yet)."""
        if self.mask is None or step % self.interval == 0:
            self.importance = tensor_importance(model, self.profile.names, closures, optimizer)
            self.mask = select(self.profile, self.importance, self.rho, self.resolution)
            apply_selection(model, set(self.selected))
        return self.selected


def counted(fn: Callable[[], Any]) -> tuple[Any, int, float]:
    """Run `fn` under FlopCounterMode with math attention (whose matmuls it counts); return
    (result, FLOPs, seconds)."""
    t0 = time.perf_counter()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops(), time.perf_counter() - t0


@dataclass(frozen=True)
class BudgetSelection:
    """One client's selection under its budget: the trained tensors, the profile's achieved rho
    (T_fp + T_bp(m)) / (T_fp + T_bp(all)), and the measured cost of profiling + importance."""

    names: tuple[str, ...]
    achieved_rho: float
    flops: int
    wall_time_s: float


def select_under_budget(model: nn.Module, batches: Sequence[Mapping[str, Any]], optimizer: torch.optim.Optimizer,
                        rho: float) -> BudgetSelection:
    """GreenTrainer for one edge client with budget rho_k (Sec. 4 on the client's own data): profile
    the model's trainable tensors on `batches[0]` (Sec. 4.1), importance from the mean gradient over
    `batches` (Sec. 4.2; `optimizer` is not stepped), the DP under rho (Sec. 4.3), and the selection
    applied to `model` (requires_grad False for every other tensor, so autograd skips their work).

    The caller then trains with its usual loop and restores its candidates' flags afterwards with
    `apply_selection(model, candidates)`. Used by FedAvg-LoRA clients (`fedcola.fedavg_lora.client`); any
    client that trains the requires_grad tensors of a model whose modules `fedcola.green.flops` knows can
    call it the same way (an unknown module type is a ValueError naming it). Raises ValueError for
    rho outside (0, 1], below the smallest feasible rho, or when no tensor has positive importance.
    """
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")

    def solve() -> tuple[FlopsProfile, np.ndarray]:
        profile = profile_tensors(model, batches[0])
        importance = tensor_importance(model, profile.names, [lambda b=b: model(**on_device(b, model)).loss for b in batches], optimizer)
        return profile, select(profile, importance, rho)

    (profile, mask), flops, seconds = counted(solve)
    if not mask.any():
        raise ValueError(f"no tensor selected at rho={rho:g}: every importance is <= 0 (is the learning rate 0?)")
    names = profile.selected_names(mask)
    apply_selection(model, set(names))
    return BudgetSelection(names, profile.rho_of(mask), flops, seconds)


def train_under_budget(model: nn.Module, batches: Iterator[Mapping[str, Any]], steps: int,
                       optimizer: torch.optim.Optimizer, rho: float) -> tuple[StepStats, BudgetSelection | None]:
    """An edge client's local training (`fedcola.train.train_steps`) under its FLOPs budget rho_k
    (node config `green-rho`): at rho < 1, `select_under_budget` on the first batch (which is then
    trained on too), `steps` steps on the selected tensors only, and every candidate (requires_grad
    at call time) made trainable again afterwards, even on error, since clients reuse one cached model.
    The stats' FLOPs and wall time include the selection's. Returns (stats, selection or None)."""
    candidates = {n for n, p in model.named_parameters() if p.requires_grad}
    selection = None
    try:
        if rho < 1.0:
            first = next(batches)
            selection = select_under_budget(model, [first], optimizer, rho)
            batches = itertools.chain([first], batches)
        stats = train_steps(model, batches, steps, optimizer)
    finally:
        apply_selection(model, candidates)
    if selection is not None:
        stats.flops += selection.flops
        stats.wall_time_s += selection.wall_time_s
    return stats, selection
