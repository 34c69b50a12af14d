"""`fedcola green CONFIG`: a short centralized run writes its measured FLOPs, wall time and task
metric; bad input (rho outside (0, 1], a budget too small for any tensor, a module type the FLOPs
profiler does not know) is one clear line on stderr with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import MobileBertConfig, MobileBertForSequenceClassification

from fedcola import models

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "simulations" / "green_minilm_rt.toml"
SMALL = ["--set", "batch-size=4", "--set", "data.max-length=16", "--set", "eval.max-examples=8", "--set", "eval.batch-size=8"]


def fedcola_green(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedcola.cli", "green", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedcola:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_short_run_reports_flops_wall_time_and_metric(tmp_path):
    proc = fedcola_green(str(CONFIG), "--run-dir", str(tmp_path), "--set", "green.steps=2", "--set", "green.reselect-every=1",
                         *SMALL)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "green.json").read_text())
    assert result["rho"] == 0.5 and result["metric"] == "accuracy" and len(result["steps"]) == 2
    assert [s["step"] for s in result["selections"]] == [0, 1]
    assert all(0 < s["achieved_rho"] <= 0.5 for s in result["selections"])
    assert result["total_flops"] == result["train_flops"] + result["selection_flops"] > 0
    assert result["loop_wall_time_s"] > 0 and 0 <= result["validation"]["accuracy"] <= 1
    assert "GreenTrainer" in proc.stdout and "green.json" in proc.stdout


@pytest.mark.parametrize("rho", ["0", "1.5", "-0.5"])
def test_rho_outside_unit_interval(rho):
    _one_line_error(fedcola_green(str(CONFIG), "--set", f"green.rho={rho}"), "config key 'green.rho' must be in (0, 1]")


def test_budget_too_small_names_smallest_feasible_rho(tmp_path):
    _one_line_error(fedcola_green(str(CONFIG), "--run-dir", str(tmp_path), "--set", "green.rho=0.05", *SMALL),
                    "smallest feasible rho is 0.")


def test_unknown_module_type_is_named(tmp_path):
    """MobileBERT's NoNorm (a trainable elementwise affine) has no FLOPs cost rule."""
    torch.manual_seed(0)
    cfg = MobileBertConfig(vocab_size=30522, hidden_size=32, embedding_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, intra_bottleneck_size=16, true_hidden_size=16, num_labels=2)
    MobileBertForSequenceClassification(cfg).save_pretrained(tmp_path / "model")
    models.load_tokenizer("minilm").save_pretrained(tmp_path / "model")
    proc = fedcola_green(str(CONFIG), "--run-dir", str(tmp_path / "run"), "--set", f"model='{tmp_path / 'model'}'", *SMALL)
    _one_line_error(proc, "FLOPs profiler does not know module type 'NoNorm'")
