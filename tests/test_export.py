"""`fedcola export`: the merged model loads with transformers and as one peft adapter (merged mode), each
client's personal low-rank adapter with peft (unmerged / detached), and all compute exactly what the ColA
server computed; adapter_config.json is valid; a real run's export reproduces its final validation metric."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification

from fedcola import export, models, runtime, specs, train
from fedcola.cola import records as cola_fl
from fedcola.cola.adapters import LowRank
from fedcola.cola.server import ColaServer
from fedcola.fedavg_lora import client as fedavg_lora
from fedcola.fl.ledger import Ledger, load as load_ledger


def _trained(config):
    """Two clients' auxiliary models (partition ids 3 and 8), B random: as if trained."""
    trained = {}
    for node in (3, 8):
        adapters = specs.build_adapters(config, seed=node)
        for a in adapters.values():
            torch.nn.init.normal_(a.B if isinstance(a, LowRank) else a.weight, std=0.3)
        trained[node] = adapters
    return trained


def _finished_run(tmp_path, config, trained):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    cola_fl.save_adapters(run / "final.safetensors", trained)
    ledger = Ledger(run / "ledger.json", "cola", config)
    ledger.finish("completed")
    return run


def _batch(config):
    tok = models.load_tokenizer(config["model"])
    return dict(tok(["good film", "awful dull plot plot"], padding=True, return_tensors="pt"))


def _written(run, written):
    return sorted(p.relative_to(run / "export").as_posix() for p in written)


def _assert_valid_adapter_config(folder, config):
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    saved = adapter_config["modules_to_save"] or []
    assert len(saved) == len(set(saved)), saved
    assert adapter_config["base_model_name_or_path"] == config["model"]
    return adapter_config


def test_export_reproduces_server_logits(cola_config, tmp_path):
    """Merged mode: merged/ (transformers) and peft/merged/ (one rank-K*r LoRA adapter) both compute the
    server's W + mean_k dW_k; the clients' own adapters are not exported (nobody evaluated them alone)."""
    config = cola_config | {"cola.targets": "query,value,classifier", "cola.mode": "merged"}
    trained = _trained(config)
    run = _finished_run(tmp_path, config, trained)
    written = export.export_run(run)
    assert _written(run, written) == ["merged", "peft/merged"]

    torch.manual_seed(config["seed"])
    server = ColaServer(models.load_model(config["model"], "classification", num_labels=2), specs.cola_targets(config))
    batch = _batch(config)
    expected = server.predict(batch, trained)

    merged = AutoModelForSequenceClassification.from_pretrained(run / "export" / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-5)

    base = AutoModelForSequenceClassification.from_pretrained(config["model"], num_labels=2)  # its own random head
    peft_model = PeftModel.from_pretrained(base, run / "export" / "peft" / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, expected, rtol=0, atol=1e-6)
    adapter_config = _assert_valid_adapter_config(run / "export" / "peft" / "merged", config)
    assert adapter_config["r"] == 2 * config["lora.r"] and adapter_config["lora_alpha"] == config["lora.alpha"]
    layer = "bert.encoder.layer.0.attention.self.query"
    lora = dict(peft_model.named_parameters())
    for i, node in enumerate((3, 8)):  # every client's factors stored unchanged
        r = config["lora.r"]
        assert torch.equal(lora[f"base_model.model.{layer}.lora_A.default.weight"][i * r:(i + 1) * r], trained[node][layer].A)
        assert torch.equal(lora[f"base_model.model.{layer}.lora_B.default.weight"][:, i * r:(i + 1) * r], trained[node][layer].B)


@pytest.mark.parametrize("mode", ["unmerged", "detached"])
def test_unmerged_export_writes_each_clients_personal_adapter(cola_config, tmp_path, mode):
    """Unmerged / detached: peft/partition-<id>/ per client, each computing that client's personal model."""
    config = cola_config | {"cola.targets": "query,value,classifier", "cola.mode": mode}
    trained = _trained(config)
    run = _finished_run(tmp_path, config, trained)
    written = export.export_run(run)
    assert _written(run, written) == ["peft/partition-3", "peft/partition-8"]

    torch.manual_seed(config["seed"])
    server = ColaServer(models.load_model(config["model"], "classification", num_labels=2), specs.cola_targets(config), mode=mode)
    batch = _batch(config)
    for node in (3, 8):
        base = AutoModelForSequenceClassification.from_pretrained(config["model"], num_labels=2)  # its own random head
        peft_model = PeftModel.from_pretrained(base, run / "export" / "peft" / f"partition-{node}").eval()
        with torch.no_grad():
            assert torch.allclose(peft_model(**batch).logits, server.predict(batch, {node: trained[node]}), atol=1e-5)
        _assert_valid_adapter_config(run / "export" / "peft" / f"partition-{node}", config)
    assert json.loads((run / "export" / "peft" / "partition-3" / "adapter_config.json").read_text())["r"] == config["lora.r"]


def test_unmerged_linear_exports_personal_models_and_mlp_says_it_cannot(cola_config, tmp_path):
    config = cola_config | {"cola.targets": "query,value,classifier", "cola.mode": "unmerged", "cola.adapter": "linear"}
    trained = _trained(config)
    run = _finished_run(tmp_path, config, trained)
    written = export.export_run(run)
    assert _written(run, written) == ["personal/partition-3", "personal/partition-8"]
    torch.manual_seed(config["seed"])
    server = ColaServer(models.load_model(config["model"], "classification", num_labels=2), specs.cola_targets(config), mode="unmerged")
    batch = _batch(config)
    for node in (3, 8):
        model = AutoModelForSequenceClassification.from_pretrained(run / "export" / "personal" / f"partition-{node}").eval()
        with torch.no_grad():
            assert torch.allclose(model(**batch).logits, server.predict(batch, {node: trained[node]}), atol=1e-5)

    config = config | {"cola.adapter": "mlp"}
    run = _finished_run(tmp_path / "mlp", config, {3: specs.build_adapters(config, seed=3)})
    with pytest.raises(ValueError, match="not linear in x") as err:
        export.export_run(run)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_head_only_low_rank_has_no_peft_form_and_exports_transformers_folders(cola_config, tmp_path, mode):
    """peft holds no adapter without a LoRA layer: a ColA run that adapted only the task head exports
    transformers folders (merged/, or each client's personal/partition-<id>/)."""
    config = cola_config | {"cola.targets": "classifier", "cola.mode": mode}
    trained = _trained(config)
    run = _finished_run(tmp_path, config, trained)
    written = export.export_run(run)
    groups = {"merged": trained} if mode == "merged" else {f"personal/partition-{n}": {n: trained[n]} for n in trained}
    assert _written(run, written) == sorted(groups)
    torch.manual_seed(config["seed"])
    server = ColaServer(models.load_model(config["model"], "classification", num_labels=2), specs.cola_targets(config), mode=mode)
    batch = _batch(config)
    for folder, adapters in groups.items():
        model = AutoModelForSequenceClassification.from_pretrained(run / "export" / folder).eval()
        with torch.no_grad():
            assert torch.allclose(model(**batch).logits, server.predict(batch, adapters), atol=1e-5)


def test_fedavg_lora_export_has_a_valid_adapter_config(cola_config, tmp_path):
    config = cola_config | {"method": "fedavg_lora"}
    model = specs.fedavg_model(config)
    state = fedavg_lora.trainable_state(model)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "final.safetensors"))
    Ledger(tmp_path / "ledger.json", "fedavg_lora", config).finish("completed")
    assert export.export_run(tmp_path) == [tmp_path / "export" / "peft" / "global"]
    _assert_valid_adapter_config(tmp_path / "export" / "peft" / "global", config)


def test_export_refuses_unfinished_runs(cola_config, tmp_path):
    Ledger(tmp_path / "ledger.json", "cola", cola_config).save()
    try:
        export.export_run(tmp_path)
    except ValueError as err:
        assert "did not complete" in str(err)
    else:
        raise AssertionError("an unfinished run was exported")


def test_export_of_a_real_run_reproduces_its_final_validation_metric(tmp_path):
    """A real `fedcola run` (merged low-rank ColA, 2 clients), exported; the transformers folder alone, and
    the merged peft adapter on the run's base model, give the ledger's final server-side validation loss and accuracy."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedcola.cli", "run", "simulations/cola_minilm_rt.toml", "--run-dir", str(run), "--set", "num-clients=2",
         "--set", "rounds=1", "--set", "local-steps=3", "--set", "batch-size=8", "--set", "eval.max-examples=48",
         "--set", "eval.client-max-examples=8", "--set", "data.max-length=32"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = load_ledger(run / "ledger.json")
    final = result["rounds"][-1]["server"]
    config = result["config"]
    export.export_run(run)
    model = AutoModelForSequenceClassification.from_pretrained(run / "export" / "merged")
    metrics = train.evaluate(model, runtime.validation_loader(config), "classification")
    assert metrics["accuracy"] == final["accuracy"]
    assert abs(metrics["loss"] - final["loss"]) < 1e-4
    assert final["loss"] != result["rounds"][0]["server"]["loss"]  # the run trained: the exported weights are not the base model

    # the merged model as ONE peft adapter (rank K*r) on the freshly built base model
    adapter_config = _assert_valid_adapter_config(run / "export" / "peft" / "merged", config)
    assert adapter_config["base_model_name_or_path"] == "minilm"
    assert adapter_config["r"] == 2 * config["lora.r"]
    peft_model = PeftModel.from_pretrained(runtime.base_model(config), run / "export" / "peft" / "merged")
    metrics = train.evaluate(peft_model, runtime.validation_loader(config), "classification")
    assert metrics["accuracy"] == final["accuracy"]
    assert abs(metrics["loss"] - final["loss"]) < 1e-4
