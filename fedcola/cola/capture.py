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

from collections.abc import Collection, Hashable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call


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


class Capture:
    """Context manager: forward hooks on `targets` record each layer's input x_m and output h_m.

    Use: `with Capture(targets, router) as cap: loss = ...; pairs = cap.pairs(loss)`.
    `record` (default: every target) limits which layers are recorded (Green-ColA's selection):
    the Router still runs at every target, but only recorded outputs can become the leaf where
    backward stops, so it stops at the deepest recorded layer.
    """

    def __init__(self, targets: Mapping[str, nn.Module], router: Router | None = None, record: Collection[str] | None = None) -> None:
        self.targets = targets
        self.router = router
        self.record = set(targets) if record is None else set(record)
        unknown = self.record - set(targets)
        if unknown:
            raise ValueError(f"layers to record are not adapted layers: {sorted(unknown)}")
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, layer: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            if layer in self.outputs:
                raise RuntimeError(f"adapted layer {layer} ran twice in one forward; not supported")
            x = args[0]
            if self.router is not None:
                out = self.router(layer, x, out)
            if layer not in self.record:
                return out
            if not out.requires_grad:  # lowest adapted layer(s): make h_m a leaf, backward stops here
                out = out.detach().requires_grad_(True)
            self.inputs[layer] = x.detach()
            self.outputs[layer] = out
            return out

        return hook

    def __enter__(self) -> Capture:
        if not torch.is_grad_enabled():
            raise RuntimeError("Capture needs autograd enabled (do not wrap it in torch.no_grad())")
        self.inputs, self.outputs = {}, {}
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
        names = list(self.outputs)
        grads = torch.autograd.grad(loss, [self.outputs[n] for n in names], allow_unused=True)
        return {
            n: (self.inputs[n], torch.zeros_like(self.outputs[n]) if g is None else g)
            for n, g in zip(names, grads)
        }


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
    dropped = G[~keep]
    if dropped.numel() and dropped.abs().max() != 0:
        raise RuntimeError("non-zero hidden gradient at padding positions: is the attention masked?")
    return x[keep], G[keep]
