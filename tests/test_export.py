"""`fedcola export`: the merged model loads with transformers, each low-rank adapter with peft, and both
compute exactly what the ColA server computed; a real run's export reproduces its final validation metric."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedcola import export, models, runtime, train
from fedcola.cola import records as cola_fl
from fedcola.cola.server import ColaServer
from fedcola.fl.ledger import Ledger, load as load_ledger
from tests.test_cola_flower import setup  # noqa: F401  (the tiny local model + CSV fixture)


def test_export_reproduces_server_logits(setup, tmp_path):  # noqa: F811
    config = setup | {"cola.targets": "query,value,classifier"}
    trained = {}
    for node in (3, 8):
        adapters = cola_fl.build_adapters(config, seed=node)
        for a in adapters.values():
            torch.nn.init.normal_(a.B, std=0.3)  # as if trained: B != 0
        trained[node] = adapters
    run = tmp_path / "run"
    run.mkdir()
    cola_fl.save_adapters(run / "final.safetensors", trained)
    ledger = Ledger(run / "ledger.json", "cola", config)
    ledger.finish("completed")
    written = export.export_run(run)
    assert sorted(p.name for p in written) == ["3", "8", "merged"]

    torch.manual_seed(config["seed"])
    server = ColaServer(models.load_model(config["model"], "classification", num_labels=2), cola_fl.targets_of(config))
    tok = models.load_tokenizer(config["model"])
    batch = dict(tok(["good film", "awful dull plot plot"], padding=True, return_tensors="pt"))

    merged = AutoModelForSequenceClassification.from_pretrained(run / "export" / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, server.predict(batch, trained), atol=1e-5)

    for node in (3, 8):
        base = AutoModelForSequenceClassification.from_pretrained(config["model"], num_labels=2)  # its own random head
        peft_model = PeftModel.from_pretrained(base, run / "export" / "peft" / str(node)).eval()
        with torch.no_grad():
            assert torch.allclose(peft_model(**batch).logits, server.predict(batch, {node: trained[node]}), atol=1e-5)
    assert json.loads((run / "export" / "peft" / "3" / "adapter_config.json").read_text())["r"] == config["lora.r"]


def test_export_refuses_unfinished_runs(setup, tmp_path):  # noqa: F811
    Ledger(tmp_path / "ledger.json", "cola", setup).save()
    try:
        export.export_run(tmp_path)
    except ValueError as err:
        assert "did not complete" in str(err)
    else:
        raise AssertionError("an unfinished run was exported")


def test_export_of_a_real_run_reproduces_its_final_validation_metric(tmp_path):
    """A real `fedcola run` (merged low-rank ColA, 2 clients), exported; the transformers folder alone
    gives the ledger's final server-side validation loss and accuracy."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedcola.cli", "run", "simulations/cola_minilm_rt.toml", "--run-dir", str(run), "--set", "num-clients=2",
         "--set", "rounds=1", "--set", "local-steps=3", "--set", "batch-size=8", "--set", "eval.max-examples=48",
         "--set", "eval.client-max-examples=8", "--set", "data.max-length=32"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = load_ledger(run / "ledger.json")
    final = result["rounds"][-1]["server"]
    export.export_run(run)
    model = AutoModelForSequenceClassification.from_pretrained(run / "export" / "merged")
    metrics = train.evaluate(model, runtime.validation_loader(result["config"]), "classification")
    assert metrics["accuracy"] == final["accuracy"]
    assert abs(metrics["loss"] - final["loss"]) < 1e-4
    assert final["loss"] != result["rounds"][0]["server"]["loss"]  # the run trained: the exported weights are not the base model
