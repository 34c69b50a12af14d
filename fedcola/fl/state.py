"""A client's state on disk: a restarted SuperNode resumes where it was, a resumed run where round k ended.

Everything a client keeps between messages lives in ``context.state`` (ColA adapters + optimizer,
LTE weights, heads, snapshot + optimizer, ...). The ClientApp saves that RecordDict after each
handled message of server round r to ``<state-dir>/<run key>/partition-<id>/round-<r>.safetensors``
(``checkpoint.atomic_save_file``: a crash or a full disk leaves the previous file intact and no
temporary file; a write that fails fails the message with the OSError, and older snapshots are
pruned only after the new one is on disk). The
file of round r therefore ends as the client's state at the end of round r. The run key is the run
config's ``run-key`` (drawn once when a run starts, kept by its resumes), or ``run-<Flower run id>``.

One file holds the arrays as safetensors tensors ``<record>/<key>`` and the config / metric records
as JSON in the file's metadata. ``context.state[NODE]`` counts the messages handled and the
restores, and records the last server round, the Flower run that wrote it and the client's first round.

Restore, on the first message of a process that holds no state:

- the newest snapshot was written in this Flower run: a restarted SuperNode; it continues from it;
- else the run is a resume after round k (a new Flower run; ``resumed-after`` lists the rounds of
  every resume so far): the client deletes the snapshots of rounds its writing run never
  checkpointed (after k, or, written by a run that was itself resumed after k' < k, after k') and
  loads the newest left. A client with none left starts afresh only if it had no state at the end of
  round k (its first round came later, as in the uninterrupted run); otherwise the missing snapshot is
  a one-line error.

Pruning: while handling round r the server has checkpointed round r - 1, so a resume can only ask for
round >= r - 1: the newest snapshot before r is kept, older ones are deleted.
"""

from __future__ import annotations

import json
import re
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import log
from safetensors import safe_open

from fedcola.fl.checkpoint import atomic_save_file

NODE = "fedcola.node"
META_KEY = "fedcola.fl.state"
SNAPSHOT = re.compile(r"round-(\d+)\.safetensors")


def client_dir(state_dir: str | Path, run_key: str, partition_id: int) -> Path:
    """Where one client's snapshots of one run live."""
    return Path(state_dir).expanduser() / run_key / f"partition-{partition_id}"


def snapshots(folder: Path) -> dict[int, Path]:
    """The client's snapshots by server round."""
    found = (SNAPSHOT.fullmatch(p.name) for p in folder.glob("round-*.safetensors")) if folder.is_dir() else ()
    return {int(m.group(1)): folder / m.group(0) for m in found if m}


def write(records: RecordDict, path: Path) -> None:
    """Save ``records`` to ``path`` atomically."""
    tensors, index = {}, {"arrays": {}, "configs": {}, "metrics": {}}
    for name, record in records.array_records.items():
        arrays = record.to_torch_state_dict()
        index["arrays"][name] = list(arrays)
        tensors |= {f"{name}/{key}": t for key, t in arrays.items()}
    index["configs"] = {name: dict(r) for name, r in records.config_records.items()}
    index["metrics"] = {name: dict(r) for name, r in records.metric_records.items()}
    atomic_save_file(tensors, path, {META_KEY: json.dumps(index)})


def read(path: Path, arrays: bool = True) -> RecordDict:
    """The RecordDict saved by :func:`write` (``arrays=False``: its config and metric records only); a
    damaged file is a one-line ValueError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            index = json.loads(f.metadata()[META_KEY])
            records = RecordDict({name: ArrayRecord({k: f.get_tensor(f"{name}/{k}") for k in keys})
                                  for name, keys in index["arrays"].items() if arrays})
    except Exception as err:  # a damaged file must not pass for state: every message fails with the reason
        raise ValueError(f"client state file {path} is unreadable ({type(err).__name__}: {err}); delete it to start this client afresh") from None
    for name, values in index["configs"].items():
        records[name] = ConfigRecord(values)
    for name, values in index["metrics"].items():
        records[name] = MetricRecord(values)
    return records


def restore(context: Context, folder: Path, resumes: list[int] = ()) -> bool:
    """On a process's first message of a run: load the client's saved state into ``context.state``
    (module docstring); False when there is none to load (a new client). ``resumes``: the rounds after
    which the run was resumed so far (the config's ``resumed-after``)."""
    if NODE in context.state.config_records:
        return False
    saved = snapshots(folder)
    if not saved:
        if resumes:  # not silent: right only for a client that had not trained before the resumed round
            log(WARNING, "run resumed after round %d: no saved client state in %s, the client starts afresh", resumes[-1], folder)
        return False
    path = saved[max(saved)]
    records = read(path)
    if records.config_records[NODE]["run-id"] != str(context.run_id):  # a new Flower run with this run key: a resume
        if not resumes:
            raise ValueError(f"{folder} holds state of another run with this run-key, and this run is not its resume")
        if not _roll_back(saved, list(resumes), folder):
            return False
        path = saved[max(saved)]
        records = read(path)
    for name, record in records.items():
        context.state[name] = record
    node = dict(context.state.config_records[NODE])
    context.state[NODE] = ConfigRecord(node | {"restores": int(node["restores"]) + 1})
    log(INFO, "restored client state of run %d from %s (%d messages handled, server round %d)",
        context.run_id, path, node["messages"], node["server-round"])
    return True


def _roll_back(saved: dict[int, Path], resumes: list[int], folder: Path) -> bool:
    """Delete the snapshots no resume may load; True if one is left. A snapshot written by the run of
    generation g (g earlier resumes) is valid up to the round after which it was resumed, resumes[g]:
    its later rounds were never checkpointed. With none left, the client starts afresh only if it had
    no state at that round (its first round came later); else its snapshot is missing: an error."""
    nodes = {r: read(p, arrays=False).config_records[NODE] for r, p in saved.items()}
    until = {r: resumes[int(n["generation"])] if int(n["generation"]) < len(resumes) else r for r, n in nodes.items()}
    for r in [r for r in saved if r > until[r]]:
        saved.pop(r).unlink()
    if not saved and any(int(n["first-round"]) <= until[r] for r, n in nodes.items()):
        raise ValueError(f"client state snapshot of round <= {resumes[-1]} is missing in {folder}: this client cannot continue the resumed run")
    return bool(saved)


def save(context: Context, folder: Path, server_round: int, generation: int = 0) -> None:
    """After a handled message: count it, write ``context.state`` as the round's snapshot (written by
    the run of ``generation`` = the number of resumes before it), prune."""
    node = dict(context.state.config_records.get(NODE, {"messages": 0, "restores": 0, "first-round": server_round}))
    context.state[NODE] = ConfigRecord(node | {"messages": int(node["messages"]) + 1, "server-round": server_round,
                                               "run-id": str(context.run_id), "generation": generation})
    write(context.state, folder / f"round-{server_round}.safetensors")
    older = sorted(r for r in snapshots(folder) if r < server_round)
    for r in older[:-1]:
        (folder / f"round-{r}.safetensors").unlink(missing_ok=True)
