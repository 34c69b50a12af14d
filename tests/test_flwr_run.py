"""`flwr run .` on a local simulation federation runs the same ServerApp / ClientApp as `fedcola run`.

The federation comes from the shipped FLWR_HOME config (simulations/flwr-home/config.toml). `flwr run`
starts a detached local SuperLink that outlives the command: the test stops it by pid. The run's
status is read with `flwr list`, since `--stream` exits 0 even when the ServerApp fails.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import tomllib
from fedcola.fl import ledger
from fedcola.config import DEFAULTS

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_mirrors_defaults():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == DEFAULTS


def _superlinks(flwr_home: Path):
    found = []
    for p in psutil.process_iter():
        try:
            if "flower-superlink" in " ".join(p.cmdline()) and str(flwr_home) in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def test_flwr_run_local_simulation(tmp_path):
    home = tmp_path / "flwr-home"
    shutil.copytree(ROOT / "simulations" / "flwr-home", home)
    env = os.environ | {
        "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    out_dir = tmp_path / "runs"
    run_config = f"rounds=1 local-steps=2 batch-size=4 eval.max-examples=32 data.max-length=32 out-dir='{out_dir}'"
    try:
        proc = subprocess.run(["flwr", "run", ".", "local-sim", "--run-config", run_config, "--stream"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        listed = subprocess.run(["flwr", "list", "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        runs = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], runs
        assert not (ROOT / "pyproject.toml").read_text().count("[tool.flwr.federations]")
    finally:
        superlinks = _superlinks(home)
        for p in superlinks:
            p.kill()
        psutil.wait_procs(superlinks, timeout=30)  # SIGKILL is asynchronous: wait until they are gone
    runs_written = list(out_dir.iterdir())
    assert len(runs_written) == 1 and re.match(r"fedavg_lora-minilm-rotten_tomatoes-", runs_written[0].name)
    result = ledger.load(runs_written[0] / "ledger.json")
    assert result["status"] == "completed" and len(result["rounds"][1]["clients"]) == 4
    assert not _superlinks(home)
