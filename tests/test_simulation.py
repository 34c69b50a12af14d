"""End to end: `fedcola run` starts a Flower simulation, writes ledger + plot + weights, leaves no process."""

import json
import subprocess
import sys
from pathlib import Path

import psutil
from safetensors.torch import load_file

from fedcola import ledger

ROOT = Path(__file__).resolve().parents[1]


def _ray_processes():
    names = ("raylet", "gcs_server", "ray::", "dashboard")
    return [p for p in psutil.process_iter(["cmdline"]) if any(n in " ".join(p.info["cmdline"] or []) for n in names)]


def test_fedavg_lora_simulation_smoke(tmp_path):
    before = {p.pid for p in _ray_processes()}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedcola.cli", "run", "simulations/fedavg_lora_minilm.toml", "--run-dir", str(run_dir),
         "--set", "num-clients=2", "--set", "rounds=1", "--set", "local-steps=2", "--set", "batch-size=4",
         "--set", "eval.max-examples=32", "--set", "data.max-length=32"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = ledger.load(run_dir / "ledger.json")
    assert result["status"] == "completed" and result["config"]["num-clients"] == 2
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    clients = result["rounds"][1]["clients"]
    assert sorted(c["partition_id"] for c in clients) == [0, 1]
    assert all(c["flops"] > 0 and c["bytes_up"] > 0 and c["num_examples"] > 2000 for c in clients)
    assert 0.0 <= result["rounds"][1]["server"]["accuracy"] <= 1.0
    assert (run_dir / "curves.png").stat().st_size > 10_000
    weights = load_file(str(run_dir / "final.safetensors"))
    assert any("lora_A" in k for k in weights) and any("classifier" in k for k in weights)
    assert "fedavg_lora · completed" in proc.stdout
    leftover = [p for p in _ray_processes() if p.pid not in before]
    assert not leftover, f"processes left behind: {[' '.join(p.cmdline())[:80] for p in leftover]}"
    json.dumps(result)
