"""A SuperNode's client state on disk, so that a restarted SuperNode resumes where it was.

Everything a client keeps between messages lives in ``context.state`` (ColA adapters + optimizer,
LTE weights, heads, snapshot + optimizer, ...). The ClientApp saves that RecordDict after each
handled message to ``<state-dir>/run-<run id>.safetensors`` (written to a temporary file, then
``os.replace``: a crash leaves the previous file intact) and loads it back when a restarted SuperNode
receives its first message of the run. One file holds the arrays as safetensors tensors
``<record>/<key>`` and the config / metric records as JSON in the file's metadata.

``context.state[NODE]`` counts the messages handled, the last server round and the restores.
"""

from __future__ import annotations

import json
import os
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import log
from safetensors import safe_open
from safetensors.torch import save_file

NODE = "fedcola.node"
META_KEY = "fedcola.state"


def state_path(state_dir: str | Path, run_id: int) -> Path:
    return Path(state_dir).expanduser() / f"run-{run_id}.safetensors"


def write(records: RecordDict, path: Path) -> None:
    """Save ``records`` to ``path`` atomically."""
    tensors, index = {}, {"arrays": {}, "configs": {}, "metrics": {}}
    for name, record in records.array_records.items():
        arrays = record.to_torch_state_dict()
        index["arrays"][name] = list(arrays)
        tensors |= {f"{name}/{key}": t.contiguous() for key, t in arrays.items()}
    index["configs"] = {name: dict(r) for name, r in records.config_records.items()}
    index["metrics"] = {name: dict(r) for name, r in records.metric_records.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(index)})
    os.replace(tmp, path)


def read(path: Path) -> RecordDict:
    """The RecordDict saved by :func:`write`."""
    with safe_open(str(path), framework="pt") as f:
        index = json.loads(f.metadata()[META_KEY])
        records = RecordDict({name: ArrayRecord({k: f.get_tensor(f"{name}/{k}") for k in keys}) for name, keys in index["arrays"].items()})
    for name, values in index["configs"].items():
        records[name] = ConfigRecord(values)
    for name, values in index["metrics"].items():
        records[name] = MetricRecord(values)
    return records


def restore(context: Context, state_dir: str) -> bool:
    """On a restarted SuperNode's first message of a run: load its saved state into ``context.state``."""
    path = state_path(state_dir, context.run_id)
    if NODE in context.state.config_records or not path.exists():
        return False
    try:
        saved = read(path)
    except Exception as err:  # a damaged file must not pass for state: every message fails with the reason
        raise ValueError(f"client state file {path} is unreadable ({type(err).__name__}: {err}); delete it to start this client afresh") from None
    for name, record in saved.items():
        context.state[name] = record
    node = dict(context.state.config_records[NODE])
    context.state[NODE] = ConfigRecord(node | {"restores": int(node["restores"]) + 1})
    log(INFO, "restored client state of run %d from %s (%d messages handled, server round %d)",
        context.run_id, path, node["messages"], node["server-round"])
    return True


def save(context: Context, state_dir: str, server_round: int) -> None:
    """After a handled message: count it and write ``context.state`` to the state dir."""
    node = dict(context.state.config_records.get(NODE, {"messages": 0, "restores": 0}))
    context.state[NODE] = ConfigRecord(node | {"messages": int(node["messages"]) + 1, "server-round": server_round})
    write(context.state, state_path(state_dir, context.run_id))
