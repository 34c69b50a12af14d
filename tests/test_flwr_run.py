"""`flwr run .` on a local simulation federation runs the same ServerApp / ClientApp as `fedcola run`:
README's lines, as written.

The federation comes from the shipped FLWR_HOME config (simulations/flwr-home/config.toml). `flwr run`
starts a detached local SuperLink that outlives the command: README's `kill` stops it. The run's
status is read with `flwr list`, since `--stream` exits 0 even when the ServerApp fails.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest
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


def _readme_lines() -> list[str]:
    """README's `flwr run` block: copy the FLWR_HOME, run, list, stop (the bash lines, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("cp -r simulations/flwr-home"):]
    block = block[:block.index("```")]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_flwr_run_lines_as_written():
    """README's `flwr run .` lines, typed as written from the repository root (its FLWR_HOME
    /tmp/my-flwr-home, its .venv on PATH): the run finishes `finished:completed`, its ledger is there,
    and the documented `kill` stops the SuperLink that `flwr run` left behind."""
    copy, run, listing, stop = _readme_lines()
    home = Path("/tmp/my-flwr-home")
    if home.exists():
        pytest.skip(f"{home} exists: README's lines would not start from a fresh FLWR_HOME")
    if not (ROOT / ".venv" / "bin" / "flwr").exists():
        pytest.skip("README's lines use the repository's .venv (make setup)")
    out_dir = Path(re.search(r"out-dir='([^']+)'", run).group(1))
    before = set(out_dir.iterdir()) if out_dir.exists() else set()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")} | {"FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    bash = lambda line, timeout: subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)  # noqa: E731
    try:
        assert bash(copy, 60).returncode == 0
        proc = bash(run, 900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        listed = bash(listing, 120)
        runs = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], runs
        assert _superlinks(home)
        assert bash(stop, 60).returncode == 0
        psutil.wait_procs(_superlinks(home), timeout=30)
        assert not _superlinks(home)
    finally:
        leftover = _superlinks(home)
        for p in leftover:
            p.kill()
        psutil.wait_procs(leftover, timeout=30)
        shutil.rmtree(home, ignore_errors=True)
    (written,) = set(out_dir.iterdir()) - before
    assert re.match(r"cola-minilm-rotten_tomatoes-", written.name)
    result = ledger.load(written / "ledger.json")
    assert result["status"] == "completed" and len(result["rounds"][1]["clients"]) == 4
    assert not (ROOT / "pyproject.toml").read_text().count("[tool.flwr.federations]")
    shutil.rmtree(written)
