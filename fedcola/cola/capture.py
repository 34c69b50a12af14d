"""Server-side capture of (x_m, G_m) for every adapted layer m in ONE forward + backward.

ColA (arXiv 2404.13844): the server holds the frozen base model and
computes only the gradients of hidden representations G_m = dL/dh_m, where h_m is the output
of adapted layer m; it never computes a parameter gradient.

How the backward stays minimal: every base parameter has requires_grad=False, so the output of
the lowest adapted layer does not require grad; the forward hook replaces it with a leaf that
does. Everything above it is then in the graph, everything below it is not, and backward stops
at that leaf by itself. G_m is read with torch.autograd.grad(loss, [h_m ...]), which equals
what a tensor hook on h_m would see.

Three forwards (see `fedcola.cola.server` for when each is used):
  * merged:   no Router; the adapted weights W + mean_k dW_k are already in the layer's weights.
  * unmerged: a `Router` adds g_{k(i)}(x_i) for each sample i through its owner k(i)'s adapter
              (the paper's Router idea); adapter parameters are treated as constants, but x keeps
              its path through g, so G below the adapter is exact backprop.
  * detached: the Router feeds the adapters x.detach(). Source: the authors' code,
              github.com/diaoenmao/ColA-Collaborative-Adaptation-with-Gradient-Learning,
              src/module/peft/tuners/cola.py (commit b629911), `Linear.forward` computes the
              auxiliary output under torch.no_grad() and `detach_()`s it before adding it. The
              gradient reaching lower layers then omits every path through auxiliary models
              (it is W^T G, not (W + dg/dx)^T G); G at the top adapted layer is unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Collection, Hashable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from fedcola.cola.adapters import Linear


class Router:
    """Per-sample routing in unmerged mode: sample i goes through its owner's adapter.

    `adapters[cid][layer]` is client cid's auxiliary model at `layer`; `owners[i]` is the client
    id of sample i of the concatenated batch. Adapter parameters are used detached (frozen on
    the server) without modifying the caller's modules, in their own dtype.
    """

    def __init__(
        self,
        adapters: Mapping[Hashable, Mapping[str, nn.Module]],
        owners: Sequence[Hashable],
        detach: bool = False,
    ) -> None:
        self.adapters = adapters
        self.detach = detach
        self.groups = {cid: [i for i, o in enumerate(owners) if o == cid] for cid in dict.fromkeys(owners)}

    def __call__(self, layer: str, x: Tensor, out: Tensor) -> Tensor:
        """out + g_{k(i)}(x_i) for every sample i (x.detach() inside g in detached mode)."""
        x_in = x.detach() if self.detach else x
        delta = torch.zeros_like(out)
        for cid, rows in self.groups.items():
            adapter, idx = self.adapters[cid][layer], torch.tensor(rows, device=out.device)
            params = {n: p.detach() for n, p in adapter.named_parameters()}
            xk = x_in.index_select(0, idx).to(next(iter(params.values())).dtype)
            delta = delta.index_copy(0, idx, functional_call(adapter, params, (xk,)).to(out.dtype))
        return out + delta


class MeanBranch:
    """Merged mode under a low-precision base (bf16 / fp16): the clients' mean auxiliary model acts as
    a side branch in fp32, h_m = W_m x + sum_k a_k g_k(x) (for low-rank models a rank-K*r branch), the
    sum rounded once to the layer's dtype, instead of folding sum_k a_k dW_k into bf16 weights, where a
    delta below W's rounding step would vanish. Adapter parameters are constants (as in `Router`)."""

    def __init__(self, adapters: Mapping[Hashable, Mapping[str, nn.Module]], coefficients: Mapping[Hashable, float]) -> None:
        self.adapters, self.coefficients = adapters, coefficients

    def __call__(self, layer: str, x: Tensor, out: Tensor) -> Tensor:
        """out + sum_k a_k g_k(x), computed in (at least) fp32."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        branch = sum(a * _apply(self.adapters[c][layer], x.to(dtype)) for c, a in self.coefficients.items())
        return (out.to(dtype) + branch).to(out.dtype)


def _apply(adapter: nn.Module, x: Tensor) -> Tensor:
    """g(x) with the adapter's parameters as constants. Held in host memory (the merged linear mean of a
    server on an accelerator): a dense linear one is streamed to x's device in the forward and again in
    the backward (`_Streamed`), never kept there; a small one (low-rank, MLP) is copied."""
    params = {n: p.detach() for n, p in adapter.named_parameters()}
    if all(p.device == x.device for p in params.values()):
        return functional_call(adapter, params, (x,))
    if isinstance(adapter, Linear):
        return _Streamed.apply(x, params["weight"], params.get("bias"))
    return functional_call(adapter, {n: p.to(x.device, non_blocking=True) for n, p in params.items()}, (x,))


class _Streamed(torch.autograd.Function):
    """y = x W^T (+ b) with W in host memory: uploaded for the forward and again for the backward
    (dy/dx needs W; nothing of W is saved on the device in between)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.weight = weight
        w = weight.to(x.device, x.dtype, non_blocking=True)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.device, x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad @ ctx.weight.to(grad.device, grad.dtype, non_blocking=True), None, None


def blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of transformer blocks: its ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters()), default=None)


@contextlib.contextmanager
def recomputed(model: nn.Module) -> Iterator[None]:
    """Activation recomputation of the frozen blocks (non-reentrant ``torch.utils.checkpoint`` around
    each block's forward): a block keeps only its input for the backward and recomputes the rest."""
    stack = blocks(model)
    if stack is None:
        raise ValueError("recompute needs a model with a stack of blocks (an nn.ModuleList)")
    for block in stack:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in stack:
            del block.forward


class Capture:
    """Context manager: forward hooks on `targets` record each layer's input x_m and output h_m.

    Use: `with Capture(targets, router) as cap: loss = ...; pairs = cap.pairs(loss)`.
    `record` (default: every target) limits which layers are recorded (Green-ColA's selection):
    the Router still runs at every target, but only recorded outputs can become the leaf where
    backward stops, so it stops at the deepest recorded layer. With `offload`, each x_m is copied to
    host memory (pinned, non-blocking on CUDA) as soon as it exists and each G_m as soon as backward
    computes it, so the pairs do not stay on the accelerator until the backward ends (the frozen
    layers' backward never reads them). A forward hook that runs again while the backward recomputes
    a block (`recomputed`) only re-applies the router.
    """

    def __init__(self, targets: Mapping[str, nn.Module], router: Router | MeanBranch | None = None, record: Collection[str] | None = None,
                 offload: bool = False) -> None:
        self.targets = targets
        self.router = router
        self.offload = offload
        self._recording = True
        self.record = set(targets) if record is None else set(record)
        unknown = self.record - set(targets)
        if unknown:
            raise ValueError(f"layers to record are not adapted layers: {sorted(unknown)}")
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, layer: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            x = args[0]
            if self.router is not None:
                out = self.router(layer, x, out)
            if layer not in self.record:
                return out
            if not out.requires_grad:  # lowest adapted layer(s): make h_m a leaf, backward stops here
                out = out.detach().requires_grad_(True)
            if not self._recording:  # a block recomputed in the backward: the same graph, nothing recorded
                return out
            if layer in self.outputs:
                raise RuntimeError(f"adapted layer {layer} ran twice in one forward; not supported")
            self.inputs[layer] = self._keep(x.detach())
            self.outputs[layer] = out
            return out

        return hook

    def __enter__(self) -> Capture:
        if not torch.is_grad_enabled():
            raise RuntimeError("Capture needs autograd enabled (do not wrap it in torch.no_grad())")
        self.inputs, self.outputs, self._recording = {}, {}, True
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.targets.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def pairs(self, loss: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """{layer: (x_m, G_m = dloss/dh_m)} at full (batch, ...) shape; G_m = 0 if h_m is unused."""
        missing = [n for n in self.targets if n in self.record and n not in self.outputs]
        if missing:
            raise RuntimeError(f"adapted layers never ran in the forward: {missing}")
        grads: dict[str, Tensor] = {}

        def keep(name: str):
            def hook(g: Tensor) -> None:
                grads[name] = self._keep(g)
            return hook

        handles = [out.register_hook(keep(name)) for name, out in self.outputs.items()]
        self._recording = False
        try:  # nothing but the leaves h_m (the lowest adapted layers) accumulates a .grad: base parameters are frozen
            loss.backward()
        finally:
            for h in handles:
                h.remove()
            for out in self.outputs.values():
                out.grad = None
        if self.offload and loss.device.type == "cuda":
            torch.cuda.current_stream(loss.device).synchronize()  # the non-blocking copies have landed
        return {n: (self.inputs[n], grads[n] if n in grads else torch.zeros(out.shape, dtype=out.dtype, device=self.inputs[n].device))
                for n, out in self.outputs.items()}

    def _keep(self, t: Tensor) -> Tensor:
        """``t`` itself, or (``offload``) a host copy of it: pinned and non-blocking from CUDA."""
        if not self.offload or t.device.type == "cpu":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda" and torch.cuda.is_available())
        return host.copy_(t, non_blocking=True)


def token_rows(x: Tensor, G: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Keep only non-padding token rows: (n, L, d) -> (n_tokens, d); (n, d) is returned as is.

    Exact: with a masked attention no real token attends to a padded one, and padded positions
    carry no loss (labels = -100 / pooling at real tokens), so G = 0 at padded rows and they add
    nothing to sum_rows G^T dg/dw. This is checked here: a non-zero G at a padded row raises.
    """
    if x.dim() == 2 or attention_mask is None:
        return x.reshape(-1, x.shape[-1]), G.reshape(-1, G.shape[-1])
    keep = attention_mask.bool()
    if x.shape[:2] != keep.shape:
        raise ValueError(f"layer input {tuple(x.shape)} does not match attention mask {tuple(keep.shape)}")
    if bool(keep.all()):  # no padding: views, not copies of every pair
        return x.reshape(-1, x.shape[-1]), G.reshape(-1, G.shape[-1])
    dropped = G[~keep]
    if dropped.numel() and dropped.abs().max() != 0:
        raise RuntimeError("non-zero hidden gradient at padding positions: is the attention masked?")
    return x[keep], G[keep]
