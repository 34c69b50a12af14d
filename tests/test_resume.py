"""Server resume: a run killed after round k and resumed from its checkpoint ends with the weights of
an uninterrupted run (same seed), and its ledger holds every round exactly once."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedcola import checkpoint, ledger
from fedcola.cli import main as cli_main
from tests.test_simulation import _leftovers, _tagged_processes

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "num-clients=2", "--set", "rounds=3", "--set", "local-steps=2", "--set", "batch-size=4",
        "--set", "eval.max-examples=32", "--set", "data.max-length=32"]


def _fedcola(args, tag, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "fedcola.cli", "run", *args], cwd=ROOT, env=os.environ | {"FEDCOLA_TEST_TAG": tag},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def _checkpoint_round(run_dir: Path) -> int:
    try:
        return checkpoint.load(run_dir, tensors=False).round
    except (FileNotFoundError, ValueError):  # not written yet
        return 0


def test_killed_fedavg_lora_run_resumes_to_the_uninterrupted_weights(tmp_path):
    tag = uuid.uuid4().hex
    full, cut = tmp_path / "full", tmp_path / "cut"
    reference = _fedcola(["simulations/fedavg_lora_minilm.toml", "--run-dir", str(full), *TINY], tag)
    out, _ = reference.communicate(timeout=900)
    assert reference.returncode == 0, out[-3000:]

    victim = _fedcola(["simulations/fedavg_lora_minilm.toml", "--run-dir", str(cut), *TINY], tag)
    deadline = time.time() + 900
    while _checkpoint_round(cut) < 1 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert victim.poll() is None, "the run ended before it could be killed"
    os.killpg(victim.pid, signal.SIGKILL)  # the ServerApp dies with its simulation, mid-run
    for p in _tagged_processes(tag):
        p.kill()
    victim.wait()
    killed_after = _checkpoint_round(cut)
    assert 1 <= killed_after < 3 and ledger.load(cut / "ledger.json")["status"] == "running"

    resumed = _fedcola(["--resume", str(cut)], tag)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    result = ledger.load(cut / "ledger.json")
    assert result["status"] == "completed" and [r["round"] for r in result["rounds"]] == [0, 1, 2, 3]
    assert result["resumed"][0]["after_round"] == killed_after
    a, b = load_file(str(full / "final.safetensors")), load_file(str(cut / "final.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
    assert not _leftovers(tag)


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    assert cli_main(["run", "--resume", str(tmp_path)]) == 2
    assert "ledger.json" in capsys.readouterr().err
    run = tmp_path / "run"
    lg = ledger.Ledger(run / "ledger.json", "fedavg_lora", {"method": "fedavg_lora"})
    lg.save()
    assert cli_main(["run", "--resume", str(run), "--set", "lr=0.1"]) == 2
    assert "only rounds may be set" in capsys.readouterr().err
    assert cli_main(["run", "--resume", str(run)]) == 2
    assert "finished no round" in capsys.readouterr().err
    checkpoint.save(run, 1, {"w": torch.zeros(2)})
    (run / checkpoint.FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable"):
        checkpoint.load(run)
