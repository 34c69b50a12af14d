"""Green-ColA: GreenTrainer's FLOPs-budgeted selection (arXiv 2309.13192, Sec. 4) on the ColA server
(arXiv 2404.13844): which adapted layers the server updates, hence how deep its backward runs.

Cost (`layer_profile`). The ColA server's base model is frozen: it computes no parameter gradient
(t_dw = 0), only the activation-gradient backward from the loss down to the deepest adapted layer
whose pairs (x_m, G_m) it must send. Selecting layer m therefore costs the dy segments from the
output down to m: with layers ordered output -> input, T_bp(m) = sum_i [max_{j>=i} m_j] t_dy_i,
the t_dy being `fedcola.green.flops.profile_tensors`'s profile of the server's model with only the adapted
layers' weights marked trainable (t_dy_i = the backward work between adapted layer i and the next
one above it). The existing DP (`fedcola.green.select.select`) then picks a depth cutoff plus the layers
above it worth their importance.

Budget. T_bp(m) <= rho T_bp(all): rho is the fraction of plain ColA's server backward. The paper
budgets forward + backward, rho (T_fp + T_bp(all)); on the ColA server T_bp(all) ~ T_fp (no dw), and
the forward is the same whatever is selected (every auxiliary model acts in it), so the paper's rho
= 0.5 would leave no backward at all. The layer profile therefore carries t_fp = 0 and `select`'s
budget rho (0 + T_bp(all)) - 0 is exactly this one.

Importance (`aggregate_importance`). Client k reports, per layer it trained, I_mk = -sum(g_m * dw_m)
of the GL step it took (`fedcola.cola.gl.GLClient.importance`: nothing is undone). The server averages
with the merge weights a_k (1/K, or the example counts: `cola.weighting`), the merged model's change
being sum_k a_k dW_k, and divides by max_m |I_m| as the reference code does.

Schedule (`LayerSelector`). Every E rounds (`cola.green-every`), the round's first interval is a
probe: every layer travels and trains (a real step, as in plain ColA) and every client reports the
importance of every layer; the selection made from those reports holds until the next probe.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log
from torch import nn

from fedcola.green.flops import FlopsProfile, apply_selection, profile_tensors
from fedcola.green.select import select


def layer_profile(model: nn.Module, targets: Mapping[str, nn.Module], inputs: Mapping[str, Any]) -> FlopsProfile:
    """The server's backward cost per adapted layer (names = layer names, output -> input): t_dy from
    one dry run of `model(**inputs)` at the run's batch shape; t_fp = t_dw = 0 (module docstring)."""
    owner = {id(m.weight): layer for layer, m in targets.items()}
    for name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if id(p) in owner and name != owner[id(p)]:
                raise ValueError(f"Green-ColA cannot profile adapted layer {owner[id(p)]!r}: its weight is tied to {name}.{local}")
    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    try:
        apply_selection(model, {n for n, p in params.items() if id(p) in owner})
        profile = profile_tensors(model, inputs)
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
    zeros = np.zeros(len(profile.names), dtype=np.int64)
    return FlopsProfile(names=tuple(owner[id(params[n])] for n in profile.names), t_fp=zeros, t_dw=zeros, t_dy=profile.t_dy, fp_other=0)


def aggregate_importance(layers: Sequence[str], reports: Mapping[Hashable, Mapping[str, float]], weights: Mapping[Hashable, float]) -> np.ndarray:
    """I_m = sum_k a_k I_mk / max_m |sum_k a_k I_mk| over the clients that reported every layer,
    a_k = weights[k] / sum of those weights (module docstring); in the order of `layers`."""
    full = [k for k, r in reports.items() if all(layer in r for layer in layers)]
    if not full:
        raise ValueError("no client reported the importance of every adapted layer")
    total = sum(float(weights[k]) for k in full)
    mean = np.array([sum(float(weights[k]) * reports[k][layer] for k in full) / total for layer in layers])
    scale = np.abs(mean).max()
    return mean / scale if scale > 0 else mean


class LayerSelector:
    """Which adapted layers travel and train in each ColA interval (module docstring, "Schedule").

    `layers(round, step)` is every layer in a probe interval (and before the first selection), else
    the selection; `update(reports, weights)` re-selects from a probe's reports. An empty selection
    (no layer with positive importance) keeps the previous one."""

    def __init__(self, profile: FlopsProfile, rho: float, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"Green-ColA re-selection period must be >= 1 round, got {every}")
        select(profile, np.ones(len(profile.names)), rho)  # ValueError for rho outside (0, 1] or too small for any layer
        self.profile, self.rho, self.every = profile, rho, every
        self.mask: np.ndarray | None = None
        self.importance: np.ndarray | None = None
        self.reports: dict[Hashable, dict[str, float]] = {}  # client -> {layer: importance} of this interval
        self.probe_count = 0  # probe intervals this round

    def probes(self, server_round: int, step: int) -> bool:
        """The first interval of rounds 1, 1 + E, 1 + 2E, ... runs every layer and collects importance."""
        return step == 0 and (server_round - 1) % self.every == 0

    @property
    def selected(self) -> tuple[str, ...]:
        return self.profile.names if self.mask is None else self.profile.selected_names(self.mask)

    def layers(self, server_round: int, step: int) -> tuple[str, ...]:
        return self.profile.names if self.probes(server_round, step) else self.selected

    def update(self, reports: Mapping[Hashable, Mapping[str, float]], weights: Mapping[Hashable, float]) -> bool:
        """Re-select from the probe's reports; False (selection kept) when the DP selects nothing."""
        self.importance = aggregate_importance(self.profile.names, reports, weights)
        mask = select(self.profile, self.importance, self.rho)
        if not mask.any():
            return False
        self.mask = mask
        return True

    @property
    def backward_fraction(self) -> float:
        """T_bp(selection) / T_bp(all) at the profiled batch shape."""
        return 1.0 if self.mask is None else self.profile.backward_flops(self.mask) / self.profile.full_backward_flops

    def begin_interval(self, server_round: int, step: int, order: Sequence[str]) -> tuple[str, ...]:
        """The layers whose pairs this interval computes and sends (every layer in a probe), in ``order``."""
        self.reports = {}
        current = self.layers(server_round, step)
        return tuple(layer for layer in order if layer in current)

    def end_interval(self, server_round: int, step: int, weight: Callable[[Hashable], float]) -> None:
        """After a probe interval, re-select from the clients' reports, averaged with the merge weights ``weight(client)``."""
        if self.probes(server_round, step):
            self.probe_count += 1
            self.reselect(server_round, self.reports, {k: weight(k) for k in self.reports})

    def reselect(self, server_round: int, reports: Mapping[Hashable, Mapping[str, float]], weights: Mapping[Hashable, float]) -> None:
        """After a probe interval: re-select from the clients' importance reports (logged; kept when none is usable)."""
        try:
            if not self.update(reports, weights):
                log(WARNING, "round %d: Green-ColA selected no layer (no positive importance); selection kept", server_round)
        except ValueError as err:  # no usable report
            log(WARNING, "round %d: Green-ColA selection kept: %s", server_round, err)
        log(INFO, "round %d: Green-ColA selects %d of %d layers (%.3f of the server backward)",
            server_round, len(self.selected), len(self.profile.names), self.backward_fraction)

    def record(self, order: Sequence[str]) -> dict:
        """The round's ledger entry (selected layers in ``order``, backward fraction, probe intervals, importance per layer); a new round starts."""
        probes, self.probe_count = self.probe_count, 0
        return {"selected": [layer for layer in order if layer in self.selected], "backward_fraction": self.backward_fraction,
                "probe_intervals": probes, "importance": None if self.importance is None else dict(zip(self.profile.names, self.importance.tolist()))}

    def state(self) -> dict | None:
        """The selection for a checkpoint (None before the first)."""
        return None if self.mask is None else {"mask": self.mask.tolist(), "importance": self.importance.tolist()}

    def restore(self, state: Mapping[str, Any]) -> None:
        """A checkpoint's selection (``{"mask": [...], "importance": [...]}``)."""
        self.mask = np.array(state["mask"], dtype=bool)
        self.importance = np.array(state["importance"])


@dataclass(frozen=True)
class GreenColA:
    """Green-ColA's settings: the server backward's budget ``rho`` (fraction of plain ColA's; 1 = off)
    and the re-selection period ``every`` (rounds)."""

    rho: float = 1.0
    every: int = 1

    def selector(self, server: Any, rows: int, length: int, vocab_size: int, seed: int) -> LayerSelector:
        """The selector, profiled on ``server``'s model at a (rows x length) batch of fixed-seed token ids."""
        ids = torch.randint(0, vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed)).to(server.device)
        profile = layer_profile(server.model, server.targets, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        return LayerSelector(profile, self.rho, self.every)
