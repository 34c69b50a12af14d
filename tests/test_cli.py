"""The CLI's bad-input paths: one clear line on stderr, exit status 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcola import cli
from fedcola import config as cfg
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
GOOD = ROOT / "simulations" / "fedavg_lora_minilm.toml"


def fedcola(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "fedcola.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedcola: error:") and needle in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("args,needle", [
    (["run", "simulations/missing.toml"], "config file not found"),
    (["run", str(GOOD), "--set", "lerning-rate=0.1"], "unknown config key 'lerning-rate'"),
    (["run", str(GOOD), "--set", "lr=fast"], "config key 'lr' expects float, got str"),
    (["run", str(GOOD), "--set", "rounds=2.5"], "config key 'rounds' expects int"),
    (["run", str(GOOD), "--set", "rounds"], "--set expects key=value"),
    (["run", str(GOOD), "--set", "method=fedsgd"], "unknown method 'fedsgd'"),
    (["run", str(GOOD), "--set", "num-clients=0"], "'num-clients' must be >= 1"),
    (["run", str(GOOD), "--set", 'model="gpt-5"'], "unknown model 'gpt-5'"),
    (["run", str(GOOD), "--set", "dataset=imagenet"], "unknown dataset 'imagenet'"),
    (["run", str(GOOD), "--set", 'model="./no/such/model"'], "unknown model './no/such/model'"),  # a path, not looked up on the hub
    (["run", str(GOOD), "--set", 'dataset="./no/such.csv"'], "unknown dataset './no/such.csv'"),
    (["run", str(GOOD), "--set", 'partitioning="zipf"'], "unknown partitioning 'zipf'"),
    (["run", str(GOOD), "--set", "lr=nan"], "'lr' must be a finite number > 0"),
    (["run", str(GOOD), "--set", "lr=-0.1"], "'lr' must be a finite number > 0"),
    (["run", str(GOOD), "--set", "data.max-length=0"], "'data.max-length' must be >= 1"),
    (["run", str(GOOD), "--set", "client.num-cpus=0"], "'client.num-cpus' must be >= 1"),
    (["run", str(GOOD), "--set", "eval.batch-size=0"], "'eval.batch-size' must be >= 1"),
    (["run", str(GOOD), "--set", "lte.r=0"], "'lte.r' must be >= 1"),
    (["run", str(GOOD), "--set", "max-examples=0"], "'max-examples' must be >= 1"),
    (["run", str(GOOD), "--set", 'server.device="tpu"'], "'server.device' must be auto, cpu, cuda or cuda:N"),
    (["run", str(GOOD), "--set", 'client.device="cuda:7"'], "device 'cuda:7'"),  # a device this machine does not have
    (["run", str(GOOD), "--set", 'server.dtype="int8"'], "'server.dtype' must be one of fp32, bf16, fp16"),
    (["run", str(GOOD), "--set", 'cola.upload-dtype="int8"'], "'cola.upload-dtype' must be one of fp16, fp32, bf16"),
    (["run", str(GOOD), "--set", "data.max-length=513"], "data.max-length=513 is longer than model 'minilm' can read (max_position_embeddings=512)"),
])
def test_bad_config_is_one_clear_line(args, needle):
    _one_line_error(fedcola(*args), needle)


def test_invalid_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    _one_line_error(fedcola("run", str(bad)), "not valid TOML")


def test_nested_unknown_key_is_named_with_its_table(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora]\nrank = 8\n")
    _one_line_error(fedcola("run", str(bad)), "unknown config key 'lora.rank'")


def test_help_and_keys():
    out = fedcola("--help")
    assert out.returncode == 0 and "run" in out.stdout and "keys" in out.stdout
    run_help = fedcola("run", "--help")
    assert "--set" in run_help.stdout and "--run-dir" in run_help.stdout
    keys = fedcola("keys")
    assert keys.returncode == 0 and "lora.r" in keys.stdout and "num-clients" in keys.stdout


def _bad_files(root):
    (root / "empty.csv").write_text("")
    (root / "latin1.csv").write_bytes(b"text,label\n\xff\xfe caf\xe9,1\n" * 20)
    (root / "nolabel.csv").write_text("\n".join(["text,score"] + [f"word{i} film,{i % 2}" for i in range(40)]))
    (root / "oneclass.csv").write_text("\n".join(["text,label"] + [f"word{i} film,good" for i in range(40)]))
    return root


@pytest.mark.parametrize("file, needle", [
    ("empty.csv", "cannot read dataset"), ("latin1.csv", "cannot read dataset"),
    ("nolabel.csv", "has no label column 'label'"), ("oneclass.csv", "has one class (good)"),
])
def test_bad_data_files_are_one_clear_line(tmp_path, file, needle):
    path = _bad_files(tmp_path) / file
    _one_line_error(fedcola("run", str(GOOD), "--set", f'dataset="{path}"', "--set", "num-clients=2", "--set", f'out-dir="{tmp_path}"'), needle)


def test_unwritable_out_dir_is_one_clear_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    target = locked / "runs" if os.geteuid() != 0 else Path("/proc/fedcola-runs")  # root writes anywhere but /proc
    _one_line_error(fedcola("run", str(GOOD), "--set", f'out-dir="{target}"'), "is not writable")


def test_max_length_beyond_the_models_positions_is_one_clear_line(tiny_assets, tmp_path):
    """Texts longer than the model's position embeddings would fail inside the run (an index / size error in
    the embedding); preflight names both numbers instead. Up to the limit, preflight passes."""
    model = helpers.write_tiny_bert(tmp_path / "bert-8", words=helpers.WORDS, max_position_embeddings=8)
    data, out = tiny_assets["data"], tmp_path / "runs"
    proc = fedcola("run", str(GOOD), "--set", f'model="{model}"', "--set", f'dataset="{data}"', "--set", "num-clients=2",
                   "--set", f'out-dir="{out}"', "--set", "data.max-length=9")
    _one_line_error(proc, f"data.max-length=9 is longer than model '{model}' can read (max_position_embeddings=8); set data.max-length <= 8")
    cli.preflight(cfg.build({"model": str(model), "dataset": str(data), "num-clients": 2, "out-dir": str(out), "data.max-length": 8}))


def test_a_folder_without_a_model_is_one_clear_line(tmp_path):
    _one_line_error(fedcola("run", str(GOOD), "--set", f'model="{tmp_path}"', "--set", f'out-dir="{tmp_path}"'), f"cannot load model '{tmp_path}'")
