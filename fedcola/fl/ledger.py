"""The cost ledger: one JSON results file per run (DESIGN.md, "The cost ledger"; schema in docs/ledger.md).

Per round: the server's evaluation (loss, task metric), its FLOPs, peak memory and wall time, and per
client: loss, task metric, examples, bytes up / down, FLOPs, peak memory, wall time; replies that were
skipped, with the reason. The file is rewritten atomically after every round, so a crash or a full disk
never leaves a half-written ledger and no finished round is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

SCHEMA = "fedcola.ledger/1"
CLIENT_FIELDS = ("node_id", "partition_id", "num_examples", "loss", "bytes_up", "bytes_down", "flops", "peak_memory_bytes", "wall_time_s")
ROUND_FIELDS = ("round", "wall_time_s", "server", "clients", "skipped")


class LedgerError(ValueError):
    """A results file that does not follow the schema."""


def _write(fd: int, data: memoryview) -> int:
    """The one low-level write of every atomic file (``os.write``); tests put a full disk here."""
    return os.write(fd, data)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` through a temporary file ``.<name>.tmp<pid>`` beside it, fsync and an
    atomic rename (``os.replace``): a crash at any moment leaves the previous file or the complete new
    one. A failure (a full disk: ENOSPC) removes the temporary file, leaves the previous file as it was
    and raises an OSError of the same errno naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[_write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.errno is not None and err.filename != str(path):
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from err  # the file the user knows
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode("utf-8"))


class Ledger:
    """Accumulates the rounds of one run and keeps ``path`` up to date."""

    def __init__(self, path: str | Path, method: str, config: dict[str, Any]):
        self.path = Path(path)
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            "method": method,
            "config": dict(config),
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "finished": None,
            "rounds": [],
            "summary": {},
        }
        self._round: dict[str, Any] | None = None
        self._t0 = 0.0

    @classmethod
    def reopen(cls, path: str | Path, last_round: int, config: dict[str, Any]) -> Ledger:
        """A resumed run's ledger: the saved rounds up to ``last_round`` (its checkpoint's), running again."""
        saved = load(path)
        ledger = cls(path, saved["method"], config)
        ledger.data.update(started=saved["started"], rounds=[r for r in saved["rounds"] if r["round"] <= last_round],
                           resumed=[*saved.get("resumed", []), {"after_round": last_round, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}])
        return ledger

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.data["rounds"]

    def begin_round(self, server_round: int) -> None:
        """Open ``server_round``; an open round of another number is closed first (``end_round``)."""
        if self._round is not None and self._round["round"] != server_round:
            self.end_round(self._round["round"])
        self._round = {"round": server_round, "wall_time_s": 0.0, "server": {}, "clients": [], "skipped": []}
        self._t0 = time.perf_counter()

    def _current(self, server_round: int) -> dict[str, Any]:
        if self._round is None or self._round["round"] != server_round:
            self.begin_round(server_round)
        return self._round

    def client(self, server_round: int, record: dict[str, Any]) -> None:
        self._current(server_round)["clients"].append(record)

    def skipped(self, server_round: int, node_id: int, reason: str) -> None:
        self._current(server_round)["skipped"].append({"node_id": node_id, "reason": reason})

    def server(self, server_round: int, **values: Any) -> None:
        self._current(server_round)["server"].update(values)

    def end_round(self, server_round: int) -> None:
        rnd = self._current(server_round)
        rnd["wall_time_s"] = time.perf_counter() - self._t0
        self.rounds.append(rnd)
        self._round = None
        self.save()

    def finish(self, status: str, **summary: Any) -> None:
        """End the run with ``status``; an open round is closed first (a failed round keeps its skip reasons)."""
        if self._round is not None:
            self.end_round(self._round["round"])
        self.data["status"] = status
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.data["summary"].update(summary)
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1))


def validate(data: dict[str, Any]) -> dict[str, Any]:
    """Check a loaded ledger against the schema; returns it unchanged or raises ``LedgerError``."""
    if data.get("schema") != SCHEMA:
        raise LedgerError(f"not a fedcola ledger (schema {data.get('schema')!r}, expected {SCHEMA!r})")
    for key in ("method", "config", "status", "rounds", "summary"):
        if key not in data:
            raise LedgerError(f"ledger lacks '{key}'")
    for rnd in data["rounds"]:
        missing = [f for f in ROUND_FIELDS if f not in rnd]
        if missing:
            raise LedgerError(f"round {rnd.get('round')} lacks {', '.join(missing)}")
        for client in rnd["clients"]:
            missing = [f for f in CLIENT_FIELDS if f not in client]
            if missing:
                raise LedgerError(f"round {rnd['round']}: a client record lacks {', '.join(missing)}")
    return data


def load(path: str | Path) -> dict[str, Any]:
    return validate(json.loads(Path(path).read_text()))
