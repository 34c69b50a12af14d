"""End to end: `fedcola run` starts a Flower simulation, writes ledger + plot + weights, leaves no process."""

import json
import os
import time
import uuid
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file
from fedcola.fl import ledger

ROOT = Path(__file__).resolve().parents[1]


def _tagged_processes(tag):
    """Processes that inherited this run's environment tag (Ray's raylet, GCS and workers do)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FEDCOLA_TEST_TAG") == tag:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def _leftovers(tag, grace_s=15.0):
    deadline = time.time() + grace_s
    while (left := _tagged_processes(tag)) and time.time() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.parametrize("config,weight_key,metric", [
    ("fedavg_lora_minilm.toml", "classifier", "accuracy"), ("cola_minilm_rt.toml", "classifier/A", "accuracy"),
    ("lte_gpt_hamlet.toml", "self_attn.q_proj.W", "perplexity"),
])
def test_simulation_smoke(tmp_path, config, weight_key, metric):
    tag = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedcola.cli", "run", f"simulations/{config}", "--run-dir", str(run_dir),
         "--set", "num-clients=2", "--set", "rounds=1", "--set", "local-steps=2", "--set", "batch-size=4",
         "--set", "eval.max-examples=32", "--set", "data.max-length=32"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ | {"FEDCOLA_TEST_TAG": tag},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = ledger.load(run_dir / "ledger.json")
    assert result["status"] == "completed" and result["config"]["num-clients"] == 2
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    clients = result["rounds"][1]["clients"]
    assert sorted(c["partition_id"] for c in clients) == [0, 1]
    assert all(c["flops"] > 0 and c["bytes_up"] > 0 and c["num_examples"] > 100 for c in clients)
    assert result["rounds"][1]["server"][metric] > 0
    assert (run_dir / "curves.png").stat().st_size > 10_000
    weights = load_file(str(run_dir / "final.safetensors"))
    assert any(weight_key in k for k in weights)
    assert f"{result['method']} · completed" in proc.stdout
    assert "DEPRECATED" not in proc.stdout + proc.stderr  # Flower's run_simulation deprecation is not the user's to act on
    leftover = _leftovers(tag)
    assert not leftover, f"processes left behind: {[' '.join(p.cmdline())[:80] for p in leftover]}"
    json.dumps(result)
