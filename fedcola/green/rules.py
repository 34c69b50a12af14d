"""GreenTrainer's per-module cost rules (Huang et al., ICLR 2024, arXiv 2309.13192, Sec. 4.1): for each
module type that owns trainable tensors, the forward and weight-gradient FLOPs of each of its
parameters and the FLOPs of its input gradient dx (``fedcola.green.flops`` attributes them). A
multiply-add counts 2 FLOPs, as torch.utils.flop_counter does.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

NORM_FWD = 5  # FLOPs per element to normalise (mean, centre, variance, rsqrt, scale)
NORM_BWD = 9  # FLOPs per element of dx through normalisation and affine scale

# rule(module, output) -> ({local param name: (fwd, dw)}, dx FLOPs of the op[, inner]). `inner` maps a
# local parameter to dy FLOPs inside the op that are needed iff it or anything deeper trains; a rule
# that returns it lists its parameters output -> input, and each gets its own place in the order.
CostRule = Callable[[nn.Module, Tensor], tuple]


def _dense(module: nn.Module, y: Tensor, d_in: int, d_out: int) -> tuple[dict[str, tuple[int, int]], int]:
    """y = x W + b over n = numel(y) / d_out rows."""
    n = y.numel() // d_out
    mm = 2 * n * d_in * d_out
    costs = {"weight": (mm, mm)}
    if getattr(module, "bias", None) is not None:
        costs["bias"] = (n * d_out, n * d_out)
    return costs, mm


def _linear(m: nn.Module, y: Tensor) -> tuple[dict[str, tuple[int, int]], int]:
    return _dense(m, y, m.in_features, m.out_features)


def _conv1d(m: nn.Module, y: Tensor) -> tuple[dict[str, tuple[int, int]], int]:
    """GPT-2's transformers.pytorch_utils.Conv1D: weight (nx, nf), a Linear with transposed weight."""
    return _dense(m, y, m.weight.shape[0], m.weight.shape[1])


def _conv2d(m: nn.Module, y: Tensor) -> tuple[dict[str, tuple[int, int]], int]:
    """Each output element is a dot product over (C_in / groups) * kh * kw inputs."""
    mm = 2 * y.numel() * m.weight[0].numel()
    costs = {"weight": (mm, mm)}
    if m.bias is not None:
        costs["bias"] = (y.numel(), y.numel())
    return costs, mm


def _embedding(m: nn.Module, y: Tensor) -> tuple[dict[str, tuple[int, int]], int]:
    """Forward is a gather (no arithmetic); dw is a scatter-add; integer ids have no dx."""
    return {"weight": (0, y.numel())}, 0


def _norm(m: nn.Module, y: Tensor) -> tuple[dict[str, tuple[int, int]], int]:
    """LayerNorm / RMSNorm: normalisation is charged to the weight's forward."""
    costs = {}
    if getattr(m, "weight", None) is not None:
        costs["weight"] = ((NORM_FWD + 1) * y.numel(), 2 * y.numel())
    if getattr(m, "bias", None) is not None:
        costs["bias"] = (y.numel(), y.numel())
    return costs, NORM_BWD * y.numel()


def _vit_embeddings(m: nn.Module, y: Tensor) -> tuple[dict[str, tuple[int, int]], int]:
    """ViT: cls_token is concatenated (dw sums it over the batch), position_embeddings added."""
    costs = {"cls_token": (0, y.shape[0] * y.shape[-1]), "position_embeddings": (y.numel(), y.numel())}
    if getattr(m, "mask_token", None) is not None:
        costs["mask_token"] = (0, 0)
    return costs, 0


def _lte_linear(m: nn.Module, y: Tensor) -> tuple[dict[str, tuple[int, int]], int, dict[str, int]]:
    """`fedcola.lte.heads.LTELinear`: y = x W^T + b + s (B (A x) - B~ (A~ x)), with W and the snapshot
    (A~, B~) buffers. Forward: the main matmul 2 n d_in d_out (charged to the buffer W, i.e. to
    fp_other) and the head and snapshot paths 2 n r (d_in + d_out) each. Backward: dB = (s dy)^T (A x)
    and dA = du^T x with du = s dy B (2 n r d_out, inner: needed iff A or anything deeper trains);
    dx = dy W + du A + the snapshot path's ((s dy) B~) A~."""
    n = y.numel() // m.out_features
    main, head_in, head_out = 2 * n * m.in_features * m.out_features, 2 * n * m.r * m.in_features, 2 * n * m.r * m.out_features
    costs = {"W": (main + head_in + head_out, 0)}
    if m.bias is not None:
        costs["bias"] = (n * m.out_features, n * m.out_features)
    costs |= {"B": (head_out, head_out), "A": (head_in, head_in)}
    return costs, main + head_in + head_out + head_in, {"A": head_out}


_RULES_BY_TYPE: dict[type, CostRule] = {
    nn.Linear: _linear, nn.Conv2d: _conv2d, nn.Embedding: _embedding, nn.LayerNorm: _norm,
    nn.RMSNorm: _norm,
}
_RULES_BY_NAME: dict[str, CostRule] = {"Conv1D": _conv1d, "ViTEmbeddings": _vit_embeddings, "LTELinear": _lte_linear}


def rule(module: nn.Module) -> CostRule | None:
    """The cost rule of a module's type (its class or a base class, else by class name), or None."""
    for cls in type(module).__mro__:
        if cls in _RULES_BY_TYPE:
            return _RULES_BY_TYPE[cls]
    name = type(module).__name__
    return _norm if name.endswith("RMSNorm") else _RULES_BY_NAME.get(name)
