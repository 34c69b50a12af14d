"""Each example in examples/ is a user's own Flower app (own ServerApp and ClientApp, a model built in
code, in-memory data); run in Flower's simulation engine for 2 rounds, every client's update reaches
the server and changes the model."""

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from flwr.simulation import run_simulation
from safetensors.torch import load_file

from examples import task
from fedcola.lte.heads import base_weights
from fedcola.lte.spec import LTESpec

ROOT = Path(__file__).resolve().parents[1]
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


def _run(name: str, tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    monkeypatch.chdir(tmp_path)  # the examples write under runs/ of the working directory
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))  # Ray workers import examples.*
    server, client = (importlib.import_module(f"examples.{name}.{side}_app") for side in ("server", "client"))
    run_simulation(server_app=server.app, client_app=client.app, num_supernodes=2, backend_config=BACKEND)
    out = tmp_path / "runs" / f"example-{name.replace('_', '-')}"
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["status"] == "completed"
    trained = [r for r in ledger["rounds"] if any(c["loss"] is not None for c in r["clients"])]
    assert len(trained) >= 2, ledger["rounds"]
    for rnd in trained:
        assert rnd["skipped"] == [], rnd["skipped"]
        clients = {c["partition_id"] for c in rnd["clients"] if c["loss"] is not None}
        # async LTE merges replies as they arrive: a faster node may fill a round alone (both merge over the run: test_lte_examples)
        assert clients == {0, 1} or (name == "lte_async" and clients and clients <= {0, 1}), rnd["round"]
    return out, ledger


@pytest.mark.parametrize("name, changed", [("cola_merged", "B"), ("cola_unmerged", "fc2.weight")])
def test_cola_examples(name, changed, tmp_path, monkeypatch):
    out, _ = _run(name, tmp_path, monkeypatch)
    adapters = load_file(str(out / "adapters.safetensors"))
    for pid in (0, 1):  # each client's auxiliary models reached the server and moved from their zero init
        moved = [k for k, v in adapters.items() if k.startswith(f"{pid}/") and k.endswith(changed) and v.abs().sum() > 0]
        assert moved, sorted(adapters)[:4]


@pytest.mark.parametrize("name", ["lte_sync", "lte_async"])
def test_lte_examples(name, tmp_path, monkeypatch):
    out, ledger = _run(name, tmp_path, monkeypatch)
    W0 = base_weights(LTESpec().attach(task.language_model()))  # heads or not, W is the model's own weights
    W = load_file(str(out / "W.safetensors"))
    assert W.keys() == W0.keys() and all(not torch.equal(W[k], W0[k]) for k in W0)  # every head merged into W
    if name == "lte_async":
        merges = [m for r in ledger["rounds"] for m in r["server"].get("merges", [])]
        assert {m["partition_id"] for m in merges} == {0, 1} and len(merges) == 4


def test_fedavg_lora_example(tmp_path, monkeypatch):
    out, _ = _run("fedavg_lora", tmp_path, monkeypatch)
    lora = load_file(str(out / "lora.safetensors"))
    assert any(k.endswith("lora_B.default.weight") for k in lora)
    assert all(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("lora_B.default.weight"))  # B starts at zero
