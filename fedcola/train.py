"""Batches, local training steps and evaluation, shared by every method's clients and servers.

FLOPs are counted, not guessed: each step runs under ``torch.utils.flop_counter.FlopCounterMode``
(matmul, convolution and attention FLOPs of forward and backward; the CPU attention kernel's
formula is registered below). Memory is the process's peak
resident set size (``ru_maxrss``), which is what an edge machine's operator sees, and on CUDA the
allocator's peak (``accelerator_peak_bytes``).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import DataLoader
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from datasets import Dataset

# FlopCounterMode knows sdpa's CUDA kernels but not the CPU flash kernel that sdpa runs on this kind
# of machine, so attention would go uncounted: register torch's own sdpa formulas for it.
_aten = torch.ops.aten
if _aten._scaled_dot_product_flash_attention_for_cpu not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(flop_counter.sdpa_flop)
    flop_counter.register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)(flop_counter.sdpa_backward_flop)


class _GlobalOnly:
    """Stands in for FlopCounterMode's ModuleTracker: every FLOP goes to "Global", no module hooks."""

    parents = {"Global"}

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc) -> None:
        return None


class FlopCount(FlopCounterMode):
    """``FlopCounterMode`` (torch's formulas and dispatch, ``get_total_flops``) without its per-module
    attribution: the ModuleTracker's hooks on module outputs keep them alive, which defeats activation
    recomputation (measured: a recomputed ColA server step's peak 150 MiB with it, 90 MiB without)."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _GlobalOnly()


def peak_memory_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def accelerator_peak_bytes(device: torch.device | str) -> int | None:
    """Peak bytes the CUDA caching allocator handed out on ``device`` since the last call (then reset:
    one figure per round), ``torch.cuda.max_memory_allocated``; None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    peak = int(torch.cuda.max_memory_allocated(device))
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def accelerator_metrics(device: torch.device | str) -> dict[str, int]:
    """``{"accelerator-peak-bytes": peak}`` for a client's reply on CUDA (``accelerator_peak_bytes``), else ``{}``."""
    peak = accelerator_peak_bytes(device)
    return {} if peak is None else {"accelerator-peak-bytes": peak}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a clear error for a
    device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}': this machine has no CUDA device (torch {torch.__version__}); use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def collate_fn(tokenizer, task: str, max_length: int):
    """Turn a list of rows into model inputs; text is padded to the longest row (dynamic padding)."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        if task == "image-classification":
            return {
                "pixel_values": torch.tensor([r["pixel_values"] for r in rows], dtype=torch.float32),
                "labels": torch.tensor([r["label"] for r in rows]),
            }
        enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if task == "classification":
            batch["labels"] = torch.tensor([r["label"] for r in rows])
        else:  # causal LM: predict every non-padding token
            batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return batch

    return collate


def make_loader(ds: Dataset, tokenizer, task: str, batch_size: int, max_length: int, shuffle: bool, seed: int, collate=None) -> DataLoader:
    """Batches of ``ds`` (rows collated by ``collate``, else by ``collate_fn`` with ``tokenizer``), shuffled by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate or collate_fn(tokenizer, task, max_length))


def cycle(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


@dataclass
class StepStats:
    """What local training cost and achieved."""

    loss: float
    steps: int
    examples: int
    flops: int
    wall_time_s: float


OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "adam": torch.optim.Adam}


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer by name and its settings (a client's optimizer and its state never leave the client)."""

    name: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer '{self.name}': known are {', '.join(OPTIMIZERS)}")

    def build(self, params) -> torch.optim.Optimizer:
        return OPTIMIZERS[self.name](params, lr=self.lr, weight_decay=self.weight_decay)


def round_seed(seed: int, server_round: int, client_id: int) -> int:
    """Seed of one client's round (data order, dropout): distinct per (seed, round, client), reproducible."""
    return seed * 1_000_003 + server_round * 1_009 + client_id


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return OptimizerSpec(name, lr, weight_decay).build(params)


def optimizer_record(optimizer: torch.optim.Optimizer) -> ArrayRecord:
    """Optimizer state as an ArrayRecord ``"<param index>/<name>"`` (for ``context.state`` / checkpoints)."""
    return ArrayRecord({f"{i}/{k}": torch.as_tensor(v).detach().cpu().clone() for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()})


def load_optimizer_record(optimizer: torch.optim.Optimizer, record: ArrayRecord) -> None:
    """Inverse of ``optimizer_record``; hyper-parameters stay those the optimizer was built with."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in record.to_torch_state_dict().items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def on_device(batch: dict, model: nn.Module) -> dict:
    """A batch's tensors on the device of ``model``'s parameters (batches are built on the host)."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_steps(model: nn.Module, batches: Iterator[dict], steps: int, optimizer: torch.optim.Optimizer) -> StepStats:
    """``steps`` optimizer steps of ordinary backprop on the model's trainable parameters."""
    model.train()
    total_loss, examples, flops = 0.0, 0, 0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = on_device(next(batches), model)
        with FlopCounterMode(display=False) as counter:
            loss = model(**batch).loss
            loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()}: lower the learning rate")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total_loss += loss.item()
        examples += len(batch["labels"])
        flops += counter.get_total_flops()
    return StepStats(total_loss / steps, steps, examples, flops, time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: str) -> dict[str, float]:
    """Mean loss and the task metric: accuracy (classification) or perplexity (causal LM)."""
    model.eval()
    return evaluate_logits(lambda batch: model(**on_device(batch, model)).logits, loader, task)


@torch.no_grad()
def evaluate_logits(logits_fn, loader: DataLoader, task: str) -> dict[str, float]:
    """``evaluate`` for any function batch -> logits (e.g. a ColA server's adapted forward)."""
    loss_sum, correct, count, tokens = 0.0, 0, 0, 0
    for batch in loader:
        logits = logits_fn(batch)
        targets = batch["labels"].to(logits.device)
        count += len(targets)
        if task == "causal-lm":
            labels = targets[:, 1:]
            loss_sum += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"))
            tokens += int((labels != -100).sum())
        else:
            loss_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
    if task == "causal-lm":
        loss = loss_sum / max(tokens, 1)
        return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "num-examples": count}
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), "num-examples": count}


def metric_name(task: str) -> str:
    return "perplexity" if task == "causal-lm" else "accuracy"
