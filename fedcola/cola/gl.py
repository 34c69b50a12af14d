"""Gradient learning (GL) on the client: ColA, arXiv 2404.13844, Proposition 1.

Given the server's pairs (x_m, G_m = dL/dh_m) for an adapted layer m, the GL objective is

    l(w) = 0.5 * sum_rows || g(x; w) - stopgrad(g(x; w_t) - G) ||^2            (GL objective)

and Proposition 1 states dl/dw at w = w_t equals sum_rows G^T dg(x; w)/dw = dL/dw: one optimizer
step on l is one step of ordinary backprop on the auxiliary model, with any optimizer.

Numerics (see DESIGN.md): written literally, the fp32 subtraction g(x; w_t) - (g(x; w_t) - G)
cancels badly when |G| << |g| (3-9% gradient error measured on BERT). So a GL step is computed
as the vector-Jacobian product g(x; w).backward(G) (`vjp_grads`), which is exactly dL/dw; the
quadratic form is kept (`quadratic_grads`, float64) for several fitting steps on the same pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

Pairs = Mapping[str, tuple[Tensor, Tensor]]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def vjp_grads(adapter: nn.Module, x: Tensor, G: Tensor) -> dict[str, Tensor]:
    """dL/dw = sum_rows G^T dg(x; w)/dw (Prop. 1) as one VJP, on the adapter's device and in its dtype
    (at its parameters' values, also when they are frozen: the server's copy of a client's model)."""
    like = next(adapter.parameters())
    params = {n: p.detach().requires_grad_(True) for n, p in adapter.named_parameters()}
    out = functional_call(adapter, params, (x.to(like.device, like.dtype),))
    return dict(zip(params, torch.autograd.grad(out, list(params.values()), G.to(like.device, like.dtype))))


def quadratic_target(adapter: nn.Module, x: Tensor, G: Tensor) -> Tensor:
    """The GL regression target g(x; w_t) - G of the GL objective, in float64."""
    params = {n: p.detach().double() for n, p in adapter.named_parameters()}
    with torch.no_grad():
        return functional_call(adapter, params, (x.double(),)) - G.double()


def quadratic_grads(adapter: nn.Module, x: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Gradient of 0.5 * sum_rows ||g(x; w) - target||^2 (GL objective) at the current w, in float64."""
    params = {n: p.detach().double().requires_grad_(True) for n, p in adapter.named_parameters()}
    loss = 0.5 * (functional_call(adapter, params, (x.double(),)) - target).pow(2).sum()
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


class GLClient:
    """A client's auxiliary models {layer: g_m} and their optimizer (state stays on the client).

    `step` accumulates VJP gradients over an adaptation interval of I batches (averaged, i.e. the
    gradient of the mean loss over the I batches) and takes one optimizer step at the end. Layers
    absent from an interval's pairs get no gradient, so the optimizer leaves them and their state
    alone (torch optimizers skip parameters whose .grad is None). `importance` holds, per layer
    updated by the last optimizer step, GreenTrainer's I_m = -sum(g_m * dw_m) (arXiv 2309.13192,
    Sec. 4.2) of that very step: nothing is undone, so neither weights nor optimizer state are disturbed.
    """

    def __init__(
        self,
        adapters: Mapping[str, nn.Module],
        optimizer: OptimizerFactory | None = None,
        interval: int = 1,
    ) -> None:
        if interval < 1:
            raise ValueError(f"adaptation interval must be >= 1, got {interval}")
        self.adapters = dict(adapters)
        self.interval = interval
        make = optimizer or (lambda ps: torch.optim.AdamW(ps, lr=1e-3))
        self.optimizer = make([p for a in self.adapters.values() for p in a.parameters()])
        self.pending = 0
        self.importance: dict[str, float] = {}

    def _set_grads(self, layer: str, grads: Mapping[str, Tensor]) -> None:
        for name, p in self.adapters[layer].named_parameters():
            g = grads[name].to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g

    def _optimizer_step(self) -> None:
        """One optimizer step; records I_m = -sum(g_m * dw_m) for every layer that had a gradient."""
        before = {layer: [(p, p.grad.detach().clone(), p.detach().clone()) for p in a.parameters() if p.grad is not None]
                  for layer, a in self.adapters.items()}
        self.optimizer.step()
        self.importance = {layer: -sum(float((g.double() * (p.detach().double() - w0.double())).sum()) for p, g, w0 in held)
                           for layer, held in before.items() if held}
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, pairs: Pairs, mean_grads: Mapping[str, Mapping[str, Tensor]] | None = None) -> bool:
        """One GL step per layer as a VJP (Prop. 1); returns True when the optimizer stepped. At the
        interval's last batch, ``mean_grads`` {layer: {param: dL/dw}} are the interval's mean gradients of
        layers without pairs, formed by the server (``fedcola.cola.payload``)."""
        for layer, (x, G) in pairs.items():
            self._set_grads(layer, vjp_grads(self.adapters[layer], x, G))
        self.pending += 1
        if self.pending < self.interval:
            if mean_grads:
                raise ValueError("mean gradients arrive with the interval's last batch")
            return False
        if self.interval > 1:
            for a in self.adapters.values():
                for p in a.parameters():
                    if p.grad is not None:
                        p.grad.div_(self.interval)
        for layer, grads in (mean_grads or {}).items():
            self._set_grads(layer, grads)
        self._optimizer_step()
        self.pending = 0
        return True

    def fit(self, pairs: Pairs, steps: int) -> None:
        """`steps` optimizer steps on the literal GL objective with fixed targets, float64 grads."""
        if self.pending:
            raise RuntimeError("fit() in the middle of an adaptation interval")
        targets = {layer: quadratic_target(self.adapters[layer], x, G) for layer, (x, G) in pairs.items()}
        for _ in range(steps):
            for layer, (x, _) in pairs.items():
                self._set_grads(layer, quadratic_grads(self.adapters[layer], x, targets[layer]))
            self._optimizer_step()

    def state_dict(self) -> dict[str, Any]:
        """Adapters + optimizer state, for checkpointing between adaptation intervals."""
        if self.pending:
            raise RuntimeError("state_dict() in the middle of an adaptation interval")
        return {
            "adapters": {n: a.state_dict() for n, a in self.adapters.items()},
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for n, a in self.adapters.items():
            a.load_state_dict(state["adapters"][n])
        self.optimizer.load_state_dict(state["optimizer"])
