"""A client's split tokenised once and kept on the node's disk.

A deployed SuperNode runs every message in a fresh ``flwr-clientapp`` process; with the split's token ids
in a safetensors file, that process draws its batches without importing ``datasets`` or ``transformers``
and without re-tokenising. Each row keeps the tokenizer's own ids for its text (``truncation`` to
``max_length``, no padding); :func:`collate` pads a batch to its longest row with the tokenizer's pad id
on its padding side, so the batches are those of ``fedcola.train.collate_fn`` (tested).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from fedcola.fl.ledger import atomic_write_bytes
from fedcola.models import cache_dir as fedcola_cache

FORMAT = "1"  # bump when the layout or the tokenisation changes: old files are then not read


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Rows of token ids (``ids[offsets[i]:offsets[i + 1]]``), their class labels (classification), the
    tokenizer's pad id and side, the task (``classification`` or ``causal-lm``) and the vocabulary size."""

    ids: torch.Tensor
    offsets: torch.Tensor
    labels: torch.Tensor | None
    pad_id: int
    left: bool
    task: str
    vocab_size: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | None]:
        row = self.ids[self.offsets[i]:self.offsets[i + 1]]
        return row, None if self.labels is None else int(self.labels[i])

    def select(self, indices) -> Tokens:
        """The rows at ``indices``, in that order (as ``datasets.Dataset.select``)."""
        indices = list(indices)
        rows = [self.ids[self.offsets[i]:self.offsets[i + 1]] for i in indices]
        offsets = torch.tensor([0] + [len(r) for r in rows], dtype=torch.long).cumsum(0)
        labels = None if self.labels is None else self.labels[indices]
        return dataclasses.replace(self, ids=torch.cat(rows) if rows else self.ids[:0], offsets=offsets, labels=labels)

    def collate(self, rows: list[tuple[torch.Tensor, int | None]]) -> dict[str, torch.Tensor]:
        """A padded batch: ``input_ids``, ``attention_mask`` and ``labels`` (class ids, or the ids with -100 on padding)."""
        width = max(len(r) for r, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, _) in enumerate(rows):
            at = slice(width - len(row), width) if self.left else slice(0, len(row))
            input_ids[i, at], mask[i, at] = row, 1
        labels = torch.tensor([y for _, y in rows]) if self.task == "classification" else input_ids.masked_fill(mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def tokenize(ds, tokenizer, task: str, max_length: int) -> Tokens:
    """Tokenise a split's ``text`` column (and keep its ``label`` for classification)."""
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)["input_ids"]
    lengths = torch.tensor([0] + [len(row) for row in enc], dtype=torch.long)
    ids = torch.tensor([t for row in enc for t in row], dtype=torch.long)
    labels = torch.tensor(list(ds["label"]), dtype=torch.long) if task == "classification" else None
    return Tokens(ids, lengths.cumsum(0), labels, int(tokenizer.pad_token_id), tokenizer.padding_side == "left", task, len(tokenizer))


def save_tokens(tokens: Tokens, path: Path) -> None:
    """Write ``tokens`` atomically (safetensors; pad id, side, task and vocabulary size in its metadata)."""
    tensors = {"ids": tokens.ids, "offsets": tokens.offsets} | ({} if tokens.labels is None else {"labels": tokens.labels})
    meta = {"format": FORMAT, "pad-id": str(tokens.pad_id), "left": str(int(tokens.left)), "task": tokens.task, "vocab-size": str(tokens.vocab_size)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def load_tokens(path: Path) -> Tokens | None:
    """The tokens in ``path``; None if there is no such file or it is not a readable file of this format."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                return None
            labels = f.get_tensor("labels") if "labels" in f.keys() else None
            return Tokens(f.get_tensor("ids"), f.get_tensor("offsets"), labels, int(meta["pad-id"]), meta["left"] == "1", meta["task"],
                          int(meta["vocab-size"]))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):  # absent, truncated by a crash, another format
        return None


def cache_dir(state_dir: str = "") -> Path:
    """Where a node keeps its tokenised splits: ``<state-dir>/tokens`` if it has a state dir, else
    fedcola's cache (``$FEDCOLA_CACHE/tokens``, ``~/.cache/fedcola/tokens``)."""
    return (Path(state_dir).expanduser() if state_dir else fedcola_cache()) / "tokens"
