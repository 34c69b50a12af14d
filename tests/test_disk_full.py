"""A full disk: every atomic writer (ledger, checkpoints, client state) leaves the previous file as it
was and no temporary file, and raises the OSError (ENOSPC) naming its file; an export keeps an earlier
export; ``fedcola`` ends with exit status 1 and one line naming "No space left on device", never a
traceback, never "completed". The disk is filled by fault injection at ``fedcola.fl.ledger._write``
(every atomic file's one low-level write), so no root and no real small file system is needed."""

import errno
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from datasets.exceptions import DatasetGenerationError
from flwr.app import ArrayRecord, Context, RecordDict

from fedcola import cli, data, export, server_app, specs
from fedcola.cola import records as cola_records
from fedcola.fl import checkpoint, ledger, state
from fedcola.fl.screening import NoReplyAccepted
from tests.test_simulation import _leftovers

ROOT = Path(__file__).resolve().parents[1]
GOOD = ROOT / "simulations" / "fedavg_lora_minilm.toml"
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
# Flower's and Ray's own log records, not fedcola's report (the CLI's run_simulation call sets them up):
FLOWER_BANNER = re.compile(r"^.*WARNING.*DEPRECATED FEATURE: The `run_simulation` function.*?entirely in future versions of Flower\.\s*$",
                           re.MULTILINE | re.DOTALL)  # on every in-process simulation
RAY_TEARDOWN = re.compile(r"^\(ClientAppActor pid=\d+\) WARNING\s*:\s*Manually terminating ClientAppActor$")  # a stopped simulation's actors
COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, NO_SPACE)


class FullAfter:
    """``ledger._write`` on a disk with ``budget`` bytes left: what fits is written (a partial file), then ENOSPC."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, fd: int, chunk) -> int:
        if self.budget <= 0:
            raise _no_space()
        written = os.write(fd, chunk[: self.budget])
        self.budget -= written
        return written


class FillsUpAt:
    """``ledger._write`` on a disk that fills up during the ``nth`` write of a file named ``name`` (half
    of it is written, then ENOSPC) and stays full: every later write fails too."""

    def __init__(self, name: str, nth: int):
        self.name, self.nth, self.seen, self.full = name, nth, 0, False

    def __call__(self, fd: int, chunk) -> int:
        if self.full:
            raise _no_space()
        target = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if target.startswith(f".{self.name}.tmp") and os.lseek(fd, 0, os.SEEK_CUR) == 0:
            self.seen += 1
            if self.seen == self.nth:
                self.full = True
                return os.write(fd, chunk[: len(chunk) // 2])
        return os.write(fd, chunk)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _temporary(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name or ".old" in p.name]


def _one_failure_line(stderr: str, command: str = "run") -> str:
    lines = [line for line in COLOURS.sub("", FLOWER_BANNER.sub("", stderr)).splitlines() if line.strip() and not RAY_TEARDOWN.match(line.strip())]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"fedcola: {command} failed: {NO_SPACE}"), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


# --- the atomic writers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0, 100])
def test_ledger_on_a_full_disk_keeps_the_saved_ledger(tmp_path, monkeypatch, budget):
    path = tmp_path / "ledger.json"
    led = ledger.Ledger(path, "cola", {"rounds": 2})
    led.end_round(0)
    saved = path.read_bytes()
    monkeypatch.setattr(ledger, "_write", FullAfter(budget))
    with pytest.raises(OSError) as info:
        led.end_round(1)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path) and NO_SPACE in str(info.value)
    assert path.read_bytes() == saved and _files(tmp_path) == ["ledger.json"]
    with pytest.raises(OSError):
        led.finish("failed", error="disk full")  # still full
    assert path.read_bytes() == saved and _files(tmp_path) == ["ledger.json"]
    monkeypatch.setattr(ledger, "_write", os.write)  # space again: no round the ledger held in memory was lost
    led.finish("failed", error="disk full")
    back = ledger.load(path)
    assert back["status"] == "failed" and [r["round"] for r in back["rounds"]] == [0, 1]


@pytest.mark.parametrize("budget", [0, 64])
def test_checkpoint_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, budget):
    checkpoint.save(tmp_path, 1, {"w": torch.ones(3)}, {"version": 1})
    monkeypatch.setattr(ledger, "_write", FullAfter(budget))
    with pytest.raises(OSError, match=NO_SPACE) as info:
        checkpoint.save(tmp_path, 2, {"w": torch.zeros(1000)}, {"version": 2})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / checkpoint.FILE)
    back = checkpoint.load(tmp_path)
    assert back.round == 1 and back.state == {"version": 1} and torch.equal(back.tensors["w"], torch.ones(3))
    assert _files(tmp_path) == [checkpoint.FILE]


def test_client_state_on_a_full_disk_keeps_its_snapshots(tmp_path, monkeypatch):
    """The ClientApp saves ``context.state`` after every message: a write that fails fails the message
    (the server skips the reply), and the snapshots a resume needs are neither damaged nor pruned."""
    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for rnd in (1, 2):
        context.state["adapter"] = ArrayRecord({"A": torch.full((4, 4), float(rnd))})
        state.save(context, tmp_path, rnd)
    context.state["adapter"] = ArrayRecord({"A": torch.full((64, 64), 3.0)})
    monkeypatch.setattr(ledger, "_write", FullAfter(512))
    with pytest.raises(OSError, match=NO_SPACE) as info:
        state.save(context, tmp_path, 3)
    assert info.value.filename == str(tmp_path / "round-3.safetensors")
    assert _files(tmp_path) == ["round-1.safetensors", "round-2.safetensors"]
    kept = state.read(tmp_path / "round-2.safetensors")
    assert torch.equal(kept["adapter"].to_torch_state_dict()["A"], torch.full((4, 4), 2.0))


def test_full_datasets_cache_is_a_runtime_failure(tmp_path, monkeypatch, capsys):
    """datasets writes a CSV into its cache first: a full disk there is exit 1, not "cannot read dataset" (exit 2)."""
    csv = tmp_path / "reviews.csv"
    csv.write_text("\n".join(["text,label"] + [f"word{i} film,{i % 2}" for i in range(20)]))

    def from_csv(*args, **kwargs):
        try:
            raise _no_space()
        except OSError as err:
            raise DatasetGenerationError("An error occurred while generating the dataset") from err

    monkeypatch.setattr(data.Dataset, "from_csv", from_csv)
    with pytest.raises(OSError) as info:
        data.load_columns(str(csv))
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, data.UnknownDatasetError)
    assert cli.main(["run", str(GOOD), "--set", f'dataset="{csv}"', "--set", f'out-dir="{tmp_path}"']) == 1
    _one_failure_line(capsys.readouterr().err)


def test_a_clients_full_disk_is_named_in_the_one_line(monkeypatch, capsys):
    """In simulation a client's OSError reaches the server as the text of an error reply (Ray's traceback
    included): the round fails with NoReplyAccepted, and the one line leads with the OS error."""
    reason = ("round 2: no client reply was accepted (node 1311: client error: <class 'ray.exceptions.RayTaskError(ClientAppException)'>:"
              "<'\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1269, ip=192.0.2.2)\n  File \"fedcola/fl/state.py\", line 135, in save\n"
              "Exception ClientAppException occurred. Message: [Errno 28] No space left on device: '/runs/r/client-state/k/partition-0/round-2.safetensors'\n'>)")

    def run(args):
        raise NoReplyAccepted(reason)

    monkeypatch.setattr(cli, "run", run)
    assert cli.main(["run", str(GOOD)]) == 1
    line = _one_failure_line(capsys.readouterr().err)
    assert "NoReplyAccepted: round 2: no client reply was accepted" in line and "\x1b" not in line


# --- export ------------------------------------------------------------------------------------------------

def test_export_on_a_full_disk_keeps_the_earlier_export(cola_config, tmp_path, monkeypatch, capsys):
    config = cola_config | {"cola.mode": "merged"}
    run = tmp_path / "run"
    run.mkdir()
    cola_records.save_adapters(run / "final.safetensors", {n: specs.build_adapters(config, seed=n) for n in (0, 1)})
    ledger.Ledger(run / "ledger.json", "cola", config).finish("completed")
    assert [p.name for p in export.export_run(run)] == ["merged", "merged"]  # merged/ and peft/merged/
    earlier = {name: (run / "export" / name).read_bytes() for name in _files(run / "export")}

    class FullTokenizer:  # the model's files are in, then the disk is full
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{")
            raise OSError(errno.ENOSPC, NO_SPACE, str(Path(folder) / "tokenizer.json"))

    monkeypatch.setattr(export.models, "load_tokenizer", lambda name: FullTokenizer())
    assert cli.main(["export", str(run)]) == 1
    _one_failure_line(capsys.readouterr().err, "export")
    assert {name: (run / "export" / name).read_bytes() for name in _files(run / "export")} == earlier
    assert not _temporary(run)


# --- end to end --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="FillsUpAt finds a write's file through /proc/self/fd")
def test_run_on_a_disk_that_fills_up_exits_1_in_one_line(tiny_assets, tmp_path):
    """A real ``fedcola run`` (tiny ColA, 2 rounds; the ServerApp runs in the CLI's process) whose disk
    fills up while round 2's checkpoint is written: the ledger's final "failed" cannot be written either.
    Exit 1, one line, no traceback, no temporary file; the ledger (rounds 0-2, "running") and round 1's
    checkpoint stay readable, so the run can be resumed after round 1; no process is left running."""
    toml = tmp_path / "tiny.toml"
    toml.write_text(f'method = "cola"\nmodel = "{tiny_assets["model"]}"\ndataset = "{tiny_assets["data"]}"\n'
                    "num-clients = 2\nrounds = 2\nlocal-steps = 2\nbatch-size = 4\nlr = 1e-2\n"
                    "[data]\nmax-length = 16\n[cola]\ninterval = 2\n[eval]\nmax-examples = 16\nclient-max-examples = 8\n")
    run = tmp_path / "run"
    driver = ("import sys; from fedcola.fl import ledger; from tests.test_disk_full import FillsUpAt; "
              f"ledger._write = FillsUpAt({checkpoint.FILE!r}, 2); from fedcola.cli import main; sys.exit(main(sys.argv[1:]))")
    tag = uuid.uuid4().hex
    proc = subprocess.run([sys.executable, "-c", driver, "run", str(toml), "--run-dir", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ | {"FEDCOLA_TEST_TAG": tag})
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_failure_line(proc.stderr)
    assert str(run) in line and "Traceback" not in proc.stdout and "completed" not in proc.stdout
    assert not _temporary(run)
    saved = ledger.load(run / "ledger.json")
    assert saved["status"] == "running" and [r["round"] for r in saved["rounds"]] == [0, 1, 2]
    assert checkpoint.load(run).round == 1
    assert server_app.resumed_config(run)["resume-dir"] == str(run)
    assert not _leftovers(tag)
