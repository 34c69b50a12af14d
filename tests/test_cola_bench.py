"""The ColA benchmark's one-measurement child (`--one`) on a tiny local BERT, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return helpers.write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), vocab_size=100, hidden_size=32, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64)  # no tokenizer: the benchmark's text is random ids


@pytest.mark.parametrize("method", ["cola-merged-lowrank", "peft-lora"])
def test_one_measurement(tiny_bert: Path, method: str) -> None:
    cfg = {"kind": "server", "section": "clients", "method": method, "clients": 2, "batch": 4, "model": str(tiny_bert),
           "seq": 16, "threads": 1, "text": "random", "repeats": 2}
    proc = subprocess.run([sys.executable, "-m", "simulations.cola_bench", "--one", json.dumps(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["config"] == cfg
    assert len(out["step_times_s"]) == 2 and all(t > 0 for t in out["step_times_s"])
    for key in ("step_time_s", "rss_baseline_bytes", "rss_peak_bytes", "maxrss_bytes", "state_bytes", "param_bytes", "torch_threads"):
        assert out[key] > 0, key
    assert out["server_mem_bytes"] == out["rss_peak_bytes"] - out["rss_baseline_bytes"] >= 0
    assert out["rss_peak_bytes"] >= out["rss_baseline_bytes"]
