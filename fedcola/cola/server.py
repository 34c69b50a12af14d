"""The ColA server: one frozen base model, hidden-representation gradients for K clients.

ColA, arXiv 2404.13844, server side. Per adaptation interval the server runs ONE
forward + backward over the concatenated batches of all clients and returns to each client its
own rows of (x_m, G_m) for every adapted layer m; clients then do gradient learning (`fedcola.cola.gl`).

Loss convention: L = sum_k L_k, L_k = mean loss over client k's own samples (tokens for a causal
LM). Samples do not interact in the forward, so client k's rows of G = dL/dh are exactly the
gradient of L_k alone: no 1/K factor, and unequal batch sizes weigh nothing differently.

Modes:
  * merged:   W_m' = W_m + sum_k a_k dW_k (a_k = 1/K, or proportional to given weights), the paper
              code's averaging. W_m is the untouched fp32 master weight: W_m' is a fresh tensor
              swapped in for this forward only (torch.func.functional_call), so nothing is ever
              merged/unmerged twice into the same tensor and tied weights (lm_head) are safe.
              Client k's GL gradient is then d/dw_k of L_k(W' + dW_k(w_k) - dW_k(w_k^t)): each
              client descends its own loss in the shared averaged model.
  * unmerged: each sample goes through its owner's auxiliary model (Router); any adapter works.
  * detached: unmerged, with auxiliary models fed x.detach() (see `fedcola.cola.capture`).
Merged and unmerged give the same G for one client with a mergeable adapter. With K > 1 they
differ: merged evaluates every client's rows in the averaged model W + mean_k dW_k, unmerged in
client k's personal model W + dW_k. Under a low-precision base (bf16 / fp16) merged mode never folds
the mean into the weights: it acts as an fp32 side branch (`MeanBranch`), exact as in fp32.

A lean server (options): `offload_pairs` moves each captured x_m and G_m to host memory as soon as
it exists (the frozen layers' backward never reads them), `recompute` checkpoints the frozen blocks.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from fedcola.cola.adapters import Adapter, Linear, find_targets
from fedcola.train import FlopCount  # (its module registers FlopCounterMode's CPU attention formulas)
from fedcola.cola.capture import Capture, MeanBranch, Router, recomputed, token_rows

Mode = Literal["merged", "unmerged", "detached"]
MODES: tuple[str, ...] = ("merged", "unmerged", "detached")
IGNORE_INDEX = -100


@dataclass
class HiddenGrads:
    """Server output of one interval: per client, {layer: (x rows, G rows)}, loss L_k, logits."""

    pairs: dict[Hashable, dict[str, tuple[Tensor, Tensor]]]
    loss: dict[Hashable, float]
    logits: dict[Hashable, Tensor]
    forward_flops: int = 0  # counted by FlopCounterMode: forward + loss (the merge W + mean dW not included)
    backward_flops: int = 0  # counted by FlopCounterMode: the hidden-gradient backward


def client_losses(logits: Tensor, labels: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """[L_k]: mean cross-entropy over each client's samples (classification, logits (n, C)) or
    over its non-ignored next-token targets (causal LM, logits (n, L, V), labels (n, L))."""
    if logits.dim() == 3:  # causal LM: position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    per = F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape(labels.shape[0], -1)
    counts = (labels != IGNORE_INDEX).reshape(labels.shape[0], -1)
    return [s.sum() / c.sum() for s, c in zip(per.split(list(sizes)), counts.split(list(sizes)))]


def concat_batches(batches: Mapping[Hashable, Mapping[str, Tensor]], pad_token_id: int) -> dict[str, Tensor]:
    """Concatenate client batches along dim 0, right-padding token dims to the longest one
    (input_ids with pad_token_id, labels with -100, masks and other ids with 0)."""
    keys = next(iter(batches.values())).keys()
    out = {}
    for key in keys:
        parts = [b[key] for b in batches.values()]
        if parts[0].dim() == 2:
            length = max(p.shape[1] for p in parts)
            value = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            parts = [F.pad(p, (0, length - p.shape[1]), value=value) for p in parts]
        out[key] = torch.cat(parts)
    return out


class ColaServer:
    """Frozen base model with ColA attached at the layers matching `target_modules`; the model stays on
    its device and in its dtype (`dtype` casts it, e.g. float64 for exact tests). Client batches are moved
    to the model's device; the pairs come back on it, or in host memory with `offload_pairs`.
    `recompute` recomputes each frozen block's activations in the backward (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        target_modules: str | Sequence[str],
        mode: Mode = "merged",
        dtype: torch.dtype | None = None,
        offload_pairs: bool = False,
        recompute: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown ColA mode {mode!r}; known modes: {list(MODES)}")
        self.model = (model if dtype is None else model.to(dtype)).requires_grad_(False)  # in place: the caller's model is frozen
        self.device = next(self.model.parameters()).device
        self.targets = find_targets(self.model, target_modules)
        self.mode = mode
        self.pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        self.offload_pairs, self.recompute = offload_pairs, recompute
        self.low_precision = next(self.model.parameters()).dtype in (torch.bfloat16, torch.float16)
        self._takes_cache = "use_cache" in inspect.signature(self.model.forward).parameters

    @staticmethod
    def coefficients(cids: Sequence[Hashable], weights: Mapping[Hashable, float] | None = None) -> dict[Hashable, float]:
        """a_k of the merged mean: 1/K, or ``weights`` normalised."""
        raw = [1.0] * len(cids) if weights is None else [float(weights[c]) for c in cids]
        return {c: w / sum(raw) for c, w in zip(cids, raw)}

    def _merged(self, adapters: Mapping[Hashable, Mapping[str, Adapter]], weights: Mapping[Hashable, float] | None = None
                ) -> tuple[MeanBranch | None, dict[str, Tensor]]:
        """Merged mode's forward: (router, weight overrides): W + mean dW swapped in, or the mean as an
        fp32 side branch under a low-precision base, and with ``recompute`` (a block recomputed in the
        backward runs outside ``functional_call``'s swap, but under the hooks)."""
        if self.low_precision or self.recompute:
            return MeanBranch(adapters, self.coefficients(list(adapters), weights)), {}
        return None, self.merged_weights(adapters, weights)

    def merged_weights(
        self, adapters: Mapping[Hashable, Mapping[str, Adapter]], weights: Mapping[Hashable, float] | None = None
    ) -> dict[str, Tensor]:
        """{"<layer>.weight"/".bias": W_m + sum_k a_k dW_k}, a_k = 1/K or weights normalised."""
        cids = list(adapters)
        if not cids:
            return {}
        a = list(self.coefficients(cids, weights).values())
        merged = {}
        for layer, module in self.targets.items():
            dW = sum(ak * adapters[c][layer].delta_weight().detach() for ak, c in zip(a, cids)).to(module.weight.device, module.weight.dtype)
            merged[f"{layer}.weight"] = module.weight + (dW.T if isinstance(module, Conv1D) else dW)
            biases = [adapters[c][layer].delta_bias() for c in cids]
            if any(b is not None for b in biases):
                if module.bias is None:
                    raise ValueError(f"{layer} has no bias to merge an adapter bias into; use unmerged mode")
                db = sum(ak * b.detach() for ak, b in zip(a, biases) if b is not None).to(module.bias.device, module.bias.dtype)
                merged[f"{layer}.bias"] = module.bias + db
        return merged

    def hidden_grads(
        self,
        batches: Mapping[Hashable, Mapping[str, Tensor]],
        adapters: Mapping[Hashable, Mapping[str, Adapter]],
        weights: Mapping[Hashable, float] | None = None,
        layers: Collection[str] | None = None,
    ) -> HiddenGrads:
        """One forward + backward over all clients' batches (each with "labels" and model inputs).

        `adapters[cid][layer]` are the clients' auxiliary models as the server knows them (merged:
        every client whose delta is in the shared model; unmerged/detached: every batch's owner).
        `weights` only affects the merged mean. `layers` (default: all) are the adapted layers whose
        pairs are wanted (Green-ColA's selection): every auxiliary model still acts in the forward,
        but backward stops at the deepest of `layers`. Returns each client's non-padding rows.
        """
        cids = list(batches)
        if self.mode != "merged" and not set(cids) <= set(adapters):
            missing = set(cids) - set(adapters)
            raise ValueError(f"{self.mode} mode needs an adapter for every batch owner; missing {missing}")
        for cid, ads in adapters.items():
            missing = [n for n in self.targets if n not in ads]
            if missing:
                raise ValueError(f"client {cid!r} has no adapter for layers {missing}")
        sizes = [len(batches[c]["labels"]) for c in cids]
        batch = {k: v.to(self.device) for k, v in concat_batches(batches, self.pad_token_id).items()}
        labels = batch.pop("labels")
        if self._takes_cache:  # no KV cache: nothing reads it, and a recomputed block would extend it twice
            batch["use_cache"] = False
        owners = [c for c, n in zip(cids, sizes) for _ in range(n)]
        if self.mode == "merged":
            router, overrides = self._merged(adapters, weights) if adapters else (None, {})
        else:
            router, overrides = Router(adapters, owners, detach=self.mode == "detached"), {}

        with Capture(self.targets, router, record=layers, offload=self.offload_pairs) as cap, \
                recomputed(self.model) if self.recompute else contextlib.nullcontext():
            with FlopCount() as forward:
                logits = functional_call(self.model, overrides, args=(), kwargs=batch, tie_weights=False).logits
                losses = client_losses(logits, labels, sizes)
            with FlopCount() as backward:
                full = cap.pairs(torch.stack(losses).sum())

        mask = batch.get("attention_mask")
        if mask is not None and full:
            mask = mask.to(next(iter(full.values()))[0].device)
        tokens = [int(m.sum()) for m in mask.split(sizes)] if mask is not None else None
        pairs: dict[Hashable, dict[str, tuple[Tensor, Tensor]]] = {cid: {} for cid in cids}
        for layer, (x, G) in full.items():  # the batch's token rows once per layer, then each client's share of them
            rows = sizes if x.dim() == 2 else tokens or [n * x.shape[1] for n in sizes]
            for cid, xi, Gi in zip(cids, *(t.split(rows) for t in token_rows(x, G, mask))):
                pairs[cid][layer] = (xi, Gi)
        return HiddenGrads(
            pairs=pairs,
            loss={c: float(l.detach()) for c, l in zip(cids, losses)},
            logits=dict(zip(cids, logits.detach().split(sizes))),
            forward_flops=int(forward.get_total_flops()),
            backward_flops=int(backward.get_total_flops()),
        )

    def predictor(self, adapters: Mapping[Hashable, Mapping[str, Adapter]]) -> Callable[[Mapping[str, Tensor]], Tensor]:
        """batch -> logits of W + mean_k dW_k over `adapters` (merged once, for every batch), or, for
        one client with non-mergeable auxiliary models, of its personal model W + g_k (Router)."""
        if all(a.mergeable for ads in adapters.values() for a in ads.values()):
            with torch.no_grad():
                branch, merged = self._merged(adapters)
            if branch is not None:
                run = functools.partial(self._routed, branch, None)
            else:
                run = lambda inputs: functional_call(self.model, merged, args=(), kwargs=inputs, tie_weights=False).logits  # noqa: E731
        elif len(adapters) != 1:
            raise ValueError("non-mergeable auxiliary models are evaluated one client at a time")
        else:
            run = functools.partial(self._routed, None, adapters)

        @torch.no_grad()
        def predict(batch: Mapping[str, Tensor]) -> Tensor:
            return run({k: v.to(self.device) for k, v in batch.items() if k != "labels"})

        return predict

    def predict(self, batch: Mapping[str, Tensor], adapters: Mapping[Hashable, Mapping[str, Adapter]]) -> Tensor:
        """Logits of one batch (see `predictor`)."""
        return self.predictor(adapters)(batch)

    def _routed(self, router: MeanBranch | None, adapters: Mapping[Hashable, Mapping[str, Adapter]] | None, inputs: Mapping[str, Tensor]) -> Tensor:
        """Logits with ``router`` (or a Router of one client's ``adapters``) added at every adapted layer."""
        if router is None:
            router = Router(adapters, [next(iter(adapters))] * len(next(iter(inputs.values()))))
        handles = [m.register_forward_hook(lambda mod, args, out, layer=layer: router(layer, args[0], out)) for layer, m in self.targets.items()]
        try:
            return self.model(**inputs).logits
        finally:
            for h in handles:
                h.remove()


class ParameterMean:
    """Merged mode for auxiliary models linear in their parameters (``linear``: dW(w) = w), so that
    sum_k a_k dW(w_k) = dW(sum_k a_k w_k): the server keeps S = sum_k n_k w_k (float64) and N = sum_k n_k
    instead of K dense adapters (memory flat in K), and `adapters` = one adapter set holding S / N.
    Clients send the change of w_k since the version the server holds (``spec.sends_changes``).
    a_k = n_k / N, n_k fixed when client k joins. Both live in host memory (dense d_out x d_in per
    layer: on an accelerator the mean is streamed layer by layer, ``capture.MeanBranch``)."""

    def __init__(self, template: Mapping[str, Adapter]) -> None:
        if not all(isinstance(a, Linear) for a in template.values()):
            raise TypeError("ParameterMean needs auxiliary models linear in their parameters (the linear kind)")
        self.adapters = {layer: a.cpu() for layer, a in template.items()}
        self.sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in self._state().items()}
        self.n: dict[Hashable, float] = {}

    def _state(self) -> dict[str, Tensor]:
        return {f"{layer}/{name}": p for layer, a in self.adapters.items() for name, p in a.state_dict().items()}

    def add(self, cid: Hashable, w: Mapping[str, Tensor], n: float = 1.0) -> None:
        """Client `cid` joins the mean with parameters `w` ({"<layer>/<param>": tensor}) and weight n."""
        if cid in self.n:
            raise ValueError(f"client {cid!r} is already in the mean")
        self.n[cid] = float(n)
        try:
            self.move(cid, w)
        except ValueError:
            del self.n[cid]
            raise

    def move(self, cid: Hashable, change: Mapping[str, Tensor]) -> None:
        """S += n_k (w_k' - w_k): client `cid`'s parameters changed by `change`; a change that would take
        S / N beyond fp32 raises, S unchanged."""
        new = {key: self.sum[key] + value.to(self.sum[key]) * self.n[cid] for key, value in change.items()}
        total = sum(self.n.values())
        if not all(torch.isfinite((v / total).float()).all() for v in new.values()):
            raise ValueError("the change makes the parameter mean non-finite")
        self.sum.update(new)
        self._refresh()

    def restore(self, sums: Mapping[str, Tensor], n: Mapping[Hashable, float]) -> None:
        """Set S and the clients' n_k (a checkpoint's), and the adapters to S / N."""
        self.sum = {k: sums[k].to(torch.float64).clone() for k in self.sum}
        self.n = dict(n)
        self._refresh()

    def _refresh(self) -> None:
        total = sum(self.n.values())
        with torch.no_grad():
            for key, p in self._state().items():
                p.copy_(self.sum[key] / total)
