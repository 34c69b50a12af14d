"""LTE — LoRA-the-Explorer (Huh et al., arXiv 2402.16828), pure PyTorch core.

Every targeted ``nn.Linear`` becomes an :class:`LTELinear` carrying the frozen fp32 main weight
``W`` and one client's LoRA head ``(A, B)``. A client computes (reset-less LTE, paper appendix;
reference code ``lte/ddp/ddp_lte.py``)

    y = W x + b + s (B A - B~ A~) x,        s = alpha / r,

where ``(A~, B~)`` is the head at the last merge, trains its head for T steps and ships the
low-rank delta ``delta_n = s (B_n A_n - B~_n A~_n)``. The server merges
``W <- W + 1/N sum_n delta_n`` (the paper's merge "Delta_lora = 1/N sum_n delta_lora_n") and every
client adds the same mean into its ``W`` and moves its snapshot, so the extra term is zero again.
A client under a GreenTrainer FLOPs budget sends only the weights it trained; each weight is then
averaged over the clients that sent it (:func:`merge`).

Defaults taken from the reference code (github.com/minyoungg/LTE):

- ``A`` orthogonal-initialised and multiplied by ``sqrt(d_in / r)``; ``B = 0``
  (``reset_lora_parameters`` in ``lte/ddp/linear.py``).
- ``r = 8``, ``alpha = 16`` (``LTEConfig.default`` in ``lte/config.py``); ``s = alpha / r``.
- q/k projections (module names containing ``in_proj``, ``q_proj`` or ``k_proj``) use
  ``alpha ** 0.5`` since their product enters the attention logits
  (``use_special_attention_scaling=True`` in ``lte/prepare.py``).
- Non-LoRA parameters are *frozen*: the reference freezes the Linear biases (``lora_bias=False``),
  refuses any other trainable parameter unless the user lists its module as a replica layer
  (``prepare_model_for_lte(strict=True, replica_layers=[])``) and recommends disabling norm affine
  parameters (README). ``non_lora="replicated"`` is the reference's opt-in ``MultiheadReplicaLayer``:
  trained locally and averaged at merge.

A delta or merged update maps a state-dict key (``"<linear>.W"`` or a replicated parameter's name)
to either low-rank factors ``(U, V)`` with ``U @ V`` the update, or a dense tensor when factors would
not be smaller (:func:`use_factors`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedcola.lte.merge import Delta, compact, dense

NonLoraPolicy = Literal["frozen", "replicated"]

QK_PATTERNS = ("in_proj", "q_proj", "k_proj")
SNAPSHOT_SUFFIX = "_lte_snap"


def init_head(A: Tensor, generator: torch.Generator) -> None:
    """Orthogonal ``A`` scaled by ``sqrt(d_in / r)``, as the reference's ``reset_lora_parameters``."""
    nn.init.orthogonal_(A, generator=generator)
    A.mul_(math.sqrt(A.shape[1] / A.shape[0]))


class LTELinear(nn.Module):
    """``y = W x + b + s (B A - B~ A~) x`` for one client's head (reset-less LTE)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.s = alpha / r
        self.register_buffer("W", base.weight.detach().to(torch.float32).clone())
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone())
        self.A = nn.Parameter(torch.empty(r, self.in_features))
        self.B = nn.Parameter(torch.zeros(self.out_features, r))
        self.register_buffer("A_snap", torch.empty(r, self.in_features))
        self.register_buffer("B_snap", torch.zeros(self.out_features, r))
        self.reset_head(generator)

    @torch.no_grad()
    def reset_head(self, generator: torch.Generator) -> None:
        """Fresh orthogonal ``A``, ``B = 0`` and snapshot ``(A~, B~) = (A, 0)``: extra term zero."""
        init_head(self.A, generator)
        self.B.zero_()
        self.A_snap.copy_(self.A)
        self.B_snap.zero_()

    def extra(self, x: Tensor) -> Tensor:
        """``s (B A - B~ A~) x``; the two paths are computed identically so it is exactly 0 after a merge."""
        return self.s * (F.linear(F.linear(x, self.A), self.B) - F.linear(F.linear(x, self.A_snap), self.B_snap))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.W, self.bias) + self.extra(x)

    @property
    def base(self) -> Tensor:
        """The tensor the server's ``W`` mirrors."""
        return self.W

    @torch.no_grad()
    def delta(self) -> Delta:
        """``delta_n = s (B A - B~ A~) = [s B, -s B~] [A; A~]`` (rank r while ``B~ = 0``)."""
        if not self.B_snap.any():
            return compact(self.s * self.B, self.A.clone())
        U = torch.cat([self.s * self.B, -self.s * self.B_snap], dim=1)
        return compact(U, torch.cat([self.A, self.A_snap], dim=0))

    @torch.no_grad()
    def resync(self) -> None:
        """Move the snapshot ``(A~, B~) <- (A, B)`` after ``W`` absorbed the merged update."""
        self.A_snap.copy_(self.A)
        self.B_snap.copy_(self.B)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, s={self.s:g}"


class _Replica:
    """A replicated non-LoRA parameter: trained locally, its change since the last merge averaged."""

    def __init__(self, param: nn.Parameter, snap: Tensor) -> None:
        self.param, self.base = param, snap

    @torch.no_grad()
    def delta(self) -> Tensor:
        return (self.param - self.base).to(torch.float32)

    @torch.no_grad()
    def resync(self) -> None:
        self.param.copy_(self.base)


def _mergeables(model: nn.Module) -> dict[str, LTELinear | _Replica]:
    """State-dict key -> mergeable entry: every ``LTELinear`` (key ``"<name>.W"``) and replicated parameter."""
    out: dict[str, LTELinear | _Replica] = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, LTELinear):
            out[f"{prefix}W"] = module
        for pname, param in module.named_parameters(recurse=False):
            snap = getattr(module, pname + SNAPSHOT_SUFFIX, None)
            if snap is not None:
                out[prefix + pname] = _Replica(param, snap)
    return out


def attach_heads(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    targets: Sequence[str] | None = None,
    non_lora: NonLoraPolicy = "frozen",
    qk_sqrt_alpha: bool = True,
) -> nn.Module:
    """Replace each targeted ``nn.Linear`` by an :class:`LTELinear` with a head seeded by ``seed``.

    ``targets``: regexes searched in module names (``None`` = every ``nn.Linear``). Give each
    client its own ``seed`` so heads explore distinct subspaces. Untargeted parameters follow
    ``non_lora`` ("frozen" or "replicated"). ``qk_sqrt_alpha`` uses ``alpha ** 0.5`` on q/k
    projections as the reference does. Modifies ``model`` in place and returns it.
    """
    if non_lora not in ("frozen", "replicated"):
        raise ValueError(f"non_lora must be 'frozen' or 'replicated', got {non_lora!r}")
    generator = torch.Generator().manual_seed(seed)
    names = [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (targets is None or any(re.search(t, n) for t in targets))
    ]
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for name in names:
        linear = model.get_submodule(name)
        if counts[id(linear.weight)] > 1:
            raise ValueError(f"{name}.weight is tied to another parameter; exclude it from targets")
        layer_alpha = alpha ** 0.5 if qk_sqrt_alpha and any(k in name for k in QK_PATTERNS) else alpha
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LTELinear(linear, r, layer_alpha, generator))
    seen: set[int] = set()
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if (isinstance(module, LTELinear) and pname in ("A", "B")) or id(param) in seen:
                continue
            seen.add(id(param))
            param.requires_grad_(non_lora == "replicated")
            if non_lora == "replicated":
                module.register_buffer(pname + SNAPSHOT_SUFFIX, param.detach().clone())
    return model


def heads_attached(model: nn.Module) -> bool:
    """True once :func:`attach_heads` ran on ``model`` (heads, or replicas with their snapshots)."""
    return any(isinstance(m, LTELinear) for m in model.modules()) or any(n.endswith(SNAPSHOT_SUFFIX) for n, _ in model.named_buffers())


def frozen_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Non-LoRA parameters that never change (``non_lora = "frozen"``): sent once per full sync."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def reset_heads(model: nn.Module, seed: int, reset_optimizer: torch.optim.Optimizer | None = None) -> None:
    """Reset variant (paper main text; the reference code and this module default to reset-less):
    new orthogonal ``A``, ``B = 0``, snapshot ``(A, 0)``.

    Call after :func:`apply_merged_update` (un-merged head progress is discarded). The state of
    ``reset_optimizer`` for the head parameters is cleared.
    """
    generator = torch.Generator().manual_seed(seed)
    for layer in (m for m in model.modules() if isinstance(m, LTELinear)):
        layer.reset_head(generator)
        if reset_optimizer is not None:
            reset_optimizer.state.pop(layer.A, None)
            reset_optimizer.state.pop(layer.B, None)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter of a client: the heads ``(A, B)`` plus replicated parameters."""
    return [p for p in model.parameters() if p.requires_grad]


def base_weights(model: nn.Module) -> dict[str, Tensor]:
    """fp32 copies of the mergeable main weights (``W`` of each head layer, replicated parameters)."""
    return {k: e.base.detach().to(torch.float32).clone() for k, e in _mergeables(model).items()}


def mergeable_key(model: nn.Module, parameter: str) -> str:
    """The mergeable weight a parameter's training changes: ``"<layer>.W"`` for a head's ``A`` or ``B``,
    the parameter's own name for a replicated one."""
    module_name, _, local = parameter.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if isinstance(module, LTELinear) and local in ("A", "B"):
        return f"{module_name}.W" if module_name else "W"
    return parameter


def head_delta(model: nn.Module, trained: Collection[str] | None = None) -> dict[str, Delta]:
    """Client reply ``delta_n``: ``s (B A - B~ A~)`` per layer as factors (dense only if smaller).
    ``trained`` (parameter names; None = all) restricts it to the weights those parameters change:
    the others' deltas are exactly zero and are not sent (:func:`merge`)."""
    keys = None if trained is None else {mergeable_key(model, n) for n in trained}
    return {k: e.delta() for k, e in _mergeables(model).items() if keys is None or k in keys}


@torch.no_grad()
def apply_merged_update(model: nn.Module, update: dict[str, Delta]) -> None:
    """Client side: ``W <- W + update`` on every entry the update has (a weight no client trained has
    none), then move every snapshot ``(A~, B~) <- (A, B)`` (replicated parameters are set to their
    merged value). Heads and optimizer state are kept."""
    entries = _mergeables(model)
    for key, entry in update.items():
        entries[key].base.add_(dense(entry).to(entries[key].base.device, entries[key].base.dtype))
    for target in entries.values():
        target.resync()


@torch.no_grad()
def set_base_weights(model: nn.Module, W: dict[str, Tensor]) -> None:
    """Client side (async): load the server's current ``W`` and move the snapshot, as after a merge."""
    for key, target in _mergeables(model).items():
        target.base.copy_(W[key])
        target.resync()


def effective_weights(model: nn.Module) -> dict[str, Tensor]:
    """``W + s (B A - B~ A~)`` per head layer: the weight the client's forward actually uses."""
    with torch.no_grad():
        return {
            k: e.W + dense(e.delta()) for k, e in _mergeables(model).items() if isinstance(e, LTELinear)
        }


def head_subspace_overlap(A1: Tensor, A2: Tensor) -> Tensor:
    """Cosines of the principal angles between the row spaces of two heads' ``A`` (1 = shared direction)."""
    Q1, Q2 = torch.linalg.qr(A1.T)[0], torch.linalg.qr(A2.T)[0]
    return torch.linalg.svdvals(Q1.T @ Q2)
