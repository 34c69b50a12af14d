"""Auxiliary models of ColA (Diao et al., arXiv 2404.13844) and target-layer lookup.

Every auxiliary model g(x; w) maps a layer input x (..., d_in) to an additive change of that
layer's output (..., d_out): the adapted layer computes h = f_m(x) + g(x; w) (the paper's adapted layer).
"Mergeable" auxiliary models are linear in x, so g(x; w) = dW x (+ db) and the server can fold
dW into the frozen weight W instead of running g (merged mode).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Adapter(nn.Module):
    """Base class of auxiliary models g(x; w). Subclasses set `mergeable`."""

    mergeable: bool = False

    def delta_weight(self) -> Tensor:
        """dW with g(x; w) = dW x + db, in nn.Linear orientation (d_out, d_in)."""
        raise TypeError(f"{type(self).__name__} is not mergeable (g is not linear in x)")

    def delta_bias(self) -> Tensor | None:
        """db with g(x; w) = dW x + db, or None when g has no bias."""
        return None


class LowRank(Adapter):
    """g(x) = s B A x, s = alpha / r: LoRA as a ColA auxiliary model ("low rank").

    Initialised exactly like peft's LoRA: A ~ kaiming_uniform_(a=sqrt(5)), B = 0, so
    g(x) = 0 at the start and a ColA low-rank step equals a LoRA step.
    """

    mergeable = True

    def __init__(self, d_in: int, d_out: int, r: int = 8, alpha: float = 8.0) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = alpha / r

    def forward(self, x: Tensor) -> Tensor:
        # same op order as peft: lora_B(lora_A(x)) * scaling
        return F.linear(F.linear(x, self.A), self.B) * self.scaling

    def delta_weight(self) -> Tensor:
        return (self.B @ self.A) * self.scaling


class Linear(Adapter):
    """g(x) = dW x (+ db): full-rank linear auxiliary model, zero-initialised.

    Its parameter gradient equals full fine-tuning's dL/dW of the adapted layer (Prop. 1 with
    g linear: dL/d(dW) = sum_rows G x^T = dL/dW).
    """

    mergeable = True

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def delta_weight(self) -> Tensor:
        return self.weight

    def delta_bias(self) -> Tensor | None:
        return self.bias


class MLP(Adapter):
    """g(x) = W2 relu(W1 x + b1) + b2 with W2, b2 = 0 at init: non-mergeable (unmerged mode only)."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


ADAPTERS: dict[str, type[Adapter]] = {"low-rank": LowRank, "linear": Linear, "mlp": MLP}


def make_adapter(kind: str, d_in: int, d_out: int, **opts) -> Adapter:
    """Build an auxiliary model by kind ("low-rank", "linear", "mlp"); opts go to its constructor."""
    if kind not in ADAPTERS:
        raise ValueError(f"unknown adapter kind {kind!r}; known kinds: {sorted(ADAPTERS)}")
    return ADAPTERS[kind](d_in, d_out, **opts)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2), imported here only: a ColA client, which adapts no model, never loads transformers."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_linear_layer(module: nn.Module) -> bool:
    """True for nn.Linear and transformers' Conv1D (GPT-2), the layers ColA can adapt."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an adaptable layer; Conv1D stores its weight as (d_in, d_out)."""
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return d_in, d_out
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(f"cannot adapt {type(module).__name__}: only nn.Linear and Conv1D")


def find_targets(model: nn.Module, patterns: str | Sequence[str]) -> dict[str, nn.Module]:
    """Adaptable layers (nn.Linear / Conv1D) whose dotted name matches one of `patterns`.

    A pattern matches a name when the name equals it or ends with "." + pattern (peft's suffix
    rule, so "query" finds every "...attention.self.query" and "classifier" the BERT head), or
    else when re.fullmatch(pattern, name) succeeds. Every pattern must match at least one layer.
    Returns {name: module} in model.named_modules() order (roughly bottom to top).
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    layers = {name: m for name, m in model.named_modules() if is_linear_layer(m)}

    def matches(pattern: str, name: str) -> bool:
        return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None

    unmatched = [p for p in patterns if not any(matches(p, n) for n in layers)]
    if unmatched or not patterns:
        sample = sorted({n.rsplit(".", 1)[-1] for n in layers})[:12]
        raise ValueError(
            f"target patterns {unmatched or patterns} match no nn.Linear/Conv1D layer; "
            f"available layer names end with e.g. {sample}"
        )
    return {n: m for n, m in layers.items() if any(matches(p, n) for p in patterns)}
