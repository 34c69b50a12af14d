"""ColA's Flower glue shared by client and server: auxiliary models from a config, their records.

Record layouts (DESIGN.md, "ColA round"):
  * adapter state: ArrayRecord ``"<layer>/<param>"`` -> fp32 tensor; a merged-mode train reply carries
    the change of that state in the upload dtype (``change_record``).
  * a client's batches: ArrayRecord ``"b<i>/input_ids"``, ``"b<i>/attention_mask"`` (int32),
    ``"b<i>/labels"`` (int64) for i < I, the adaptation interval.
  * hidden pairs: ArrayRecord ``"b<i>/<layer>/x"`` (rows, d_in), ``"b<i>/<layer>/G"`` (rows, d_out),
    non-padding rows only, in the run's wire dtype; with Green-ColA only for the selected layers,
    listed in the message's ``control["layers"]``; shared inputs and gradients instead of pairs:
    ``fedcola.cola.payload``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from fedcola.cola import adapters as ad
from fedcola.fl import wire
from fedcola.fl.checkpoint import atomic_save_file

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def adapter_state(adapters: dict[str, ad.Adapter]) -> dict[str, torch.Tensor]:
    """``"<layer>/<param>"`` -> fp32 host tensor (a view of the parameter where it already is one)."""
    return {f"{layer}/{name}": p.detach().float().cpu().contiguous() for layer, a in adapters.items() for name, p in a.state_dict().items()}


def adapter_record(adapters: dict[str, ad.Adapter]) -> ArrayRecord:
    return ArrayRecord(adapter_state(adapters))


def load_adapter_state(adapters: dict[str, ad.Adapter], state: Mapping[str, torch.Tensor]) -> None:
    for layer, a in adapters.items():
        a.load_state_dict({name: state[f"{layer}/{name}"] for name in a.state_dict()})


def load_adapter_record(adapters: dict[str, ad.Adapter], record: ArrayRecord) -> None:
    load_adapter_state(adapters, record.to_torch_state_dict())


def applied(w: dict[str, torch.Tensor], change: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """w + Delta per parameter (fp32, host memory): the one addition client and server both do."""
    return {k: v + change[k] for k, v in w.items()}


def change_record(adapters: dict[str, ad.Adapter], acked: dict[str, torch.Tensor], dtype: str) -> ArrayRecord:
    """A merged-mode train reply: Delta = w - w_acked packed in ``dtype``. The client's auxiliary models
    become w_acked + unpack(Delta) (``applied``), which is what the server holds once it takes the reply
    (``AdapterBook.update``): the two copies stay bit-identical, whatever ``dtype`` rounds away."""
    record = wire.pack({k: v - acked[k] for k, v in adapter_state(adapters).items()}, dtype)
    change = wire.unpack(record, dtype)
    if not all(torch.isfinite(v).all() for v in change.values()):
        raise ValueError(f"the change of this client's auxiliary models overflows the upload dtype {dtype}")
    load_adapter_state(adapters, applied(acked, change))
    return record


def save_adapters(path: Path, by_node: dict[int, dict[str, ad.Adapter]]) -> None:
    """Every client's auxiliary models in one safetensors file, keys ``"<node>/<layer>/<param>"``."""
    atomic_save_file({f"{node}/{k}": v for node, ads in by_node.items() for k, v in adapter_state(ads).items()}, path)


def batch_record(batches: list[dict[str, torch.Tensor]]) -> ArrayRecord:
    out = {}
    for i, b in enumerate(batches):
        out[f"b{i}/input_ids"] = b["input_ids"].to(torch.int32)
        out[f"b{i}/attention_mask"] = b["attention_mask"].to(torch.int32)
        out[f"b{i}/labels"] = b["labels"].to(torch.int64)
    return ArrayRecord(out)


def batch_count(record: ArrayRecord) -> int:
    return len(record.keys()) // len(BATCH_KEYS)


def check_batches(record: ArrayRecord, max_batches: int, batch_size: int, vocab_size: int, num_labels: int | None, max_length: int) -> str | None:
    """Why a client's batch record is unusable (count, keys, shapes, dtypes, token ids or labels out of range), or None."""
    count = batch_count(record)
    want = {f"b{i}/{k}" for i in range(count) for k in BATCH_KEYS}
    if not 0 < count <= max_batches or set(record.keys()) != want:
        return f"batch record keys differ from 1..{max_batches} batch(es) of {', '.join(BATCH_KEYS)}"
    for i in range(count):
        ids, mask, labels = (record[f"b{i}/{k}"] for k in BATCH_KEYS)
        if ids.dtype != "int32" or mask.dtype != "int32" or labels.dtype != "int64":
            return f"batch {i} has dtypes {ids.dtype}/{mask.dtype}/{labels.dtype}, expected int32/int32/int64"
        if len(ids.shape) != 2 or tuple(mask.shape) != tuple(ids.shape) or not 0 < ids.shape[0] <= batch_size or not 0 < ids.shape[1] <= max_length:
            return f"batch {i} has shape {tuple(ids.shape)} (mask {tuple(mask.shape)}), expected (1..{batch_size}, 1..{max_length})"
        ids_np, labels_np, mask_np = ids.numpy(), labels.numpy(), mask.numpy()
        if not ((mask_np == 0) | (mask_np == 1)).all() or not mask_np.any(axis=1).all():
            return f"batch {i} has an attention mask with values other than 0/1 or a row without a real token"
        if ids_np.min() < 0 or ids_np.max() >= vocab_size:
            return f"batch {i} has token ids outside [0, {vocab_size})"
        if num_labels is not None and (labels.shape != (ids.shape[0],) or labels_np.min() < 0 or labels_np.max() >= num_labels):
            return f"batch {i} has labels of shape {tuple(labels.shape)} or outside [0, {num_labels})"
        targets = labels_np[labels_np != -100]
        if num_labels is None and (labels.shape != ids.shape or (targets.size and (targets.min() < 0 or targets.max() >= vocab_size))):
            return f"batch {i} has next-token labels of shape {tuple(labels.shape)} or outside -100 / [0, {vocab_size})"
    return None


def unpack_batches(record: ArrayRecord) -> list[dict[str, torch.Tensor]]:
    state = record.to_torch_state_dict()
    return [{k: state[f"b{i}/{k}"].long() for k in BATCH_KEYS} for i in range(batch_count(record))]


def pairs_from_payload(tensors: dict[str, torch.Tensor], dims: dict[str, tuple[int, int]], interval: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Rebuild [{layer: (x, G)}] per batch, checking names, shapes and finiteness; ValueError on any mismatch."""
    want = {f"b{i}/{layer}/{p}" for i in range(interval) for layer in dims for p in ("x", "G")}
    if set(tensors) != want:
        unknown = sorted(set(tensors) - want)[:3]
        raise ValueError(f"hidden pairs do not match this client's layers (unknown {unknown}, missing {sorted(want - set(tensors))[:3]})")
    out = []
    for i in range(interval):
        pairs = {}
        for layer, (d_in, d_out) in dims.items():
            x, G = tensors[f"b{i}/{layer}/x"], tensors[f"b{i}/{layer}/G"]
            if x.dim() != 2 or G.dim() != 2 or x.shape[1] != d_in or G.shape[1] != d_out or x.shape[0] != G.shape[0]:
                raise ValueError(f"layer {layer}: x {tuple(x.shape)} / G {tuple(G.shape)} do not fit (rows, {d_in}) / (rows, {d_out})")
            if not (torch.isfinite(x).all() and torch.isfinite(G).all()):
                raise ValueError(f"layer {layer}: NaN or Inf in the hidden pairs")
            pairs[layer] = (x, G)
        out.append(pairs)
    return out
