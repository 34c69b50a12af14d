"""Server checkpoints: after every completed round, what the server needs to go on from the next one.

``<run_dir>/checkpoint.safetensors`` holds the strategy's tensors (global weights, adapters, ...); its
metadata holds the round number and the strategy's other state as JSON. It is written atomically
(``atomic_save_file``: temporary file, fsync, then ``os.replace``; a full disk keeps the previous
one) right after the ledger records the round, so a run resumed from it (``fedcola run --resume
RUN_DIR``, or run config ``resume-dir``) drops any ledger round past the checkpoint and neither loses
nor repeats a round.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save as serialize
from torch import Tensor

from fedcola.fl.ledger import atomic_write_bytes

FILE = "checkpoint.safetensors"
META = "fedcola.fl.checkpoint"


@dataclasses.dataclass
class Checkpoint:
    round: int
    tensors: dict[str, Tensor]
    state: dict[str, Any]


def atomic_save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written through a temporary file, fsync and an atomic rename
    (``ledger.atomic_write_bytes``): a crash at any moment leaves either the previous file or the
    complete new one; a full disk leaves the previous file and no temporary file, and raises the
    OSError (ENOSPC) naming ``path``. Serialised in memory first (one copy of the tensors), so every
    failure to write is an OSError with its errno. Owner-only permissions (client state is private)."""
    atomic_write_bytes(path, serialize({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata), mode=0o600)


def save(run_dir: Path, server_round: int, tensors: dict[str, Tensor], state: dict[str, Any] | None = None) -> None:
    atomic_save_file(tensors, Path(run_dir) / FILE, {META: json.dumps({"round": server_round, "state": state or {}})})


def load(run_dir: Path, tensors: bool = True) -> Checkpoint:
    """The run's last checkpoint (``tensors=False``: its round and state only); a clear error when
    there is none or it is damaged."""
    path = Path(run_dir) / FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no {FILE}: the run finished no round that could be resumed")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()[META])
            arrays = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as err:
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from None
    return Checkpoint(int(meta["round"]), arrays, meta["state"])
