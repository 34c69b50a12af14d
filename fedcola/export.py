"""Export a finished run for use without fedcola: transformers folders and peft LoRA adapters.

``fedcola export RUN_DIR`` reads ``ledger.json`` (the run's config) and ``final.safetensors``:

* ColA: ``merged/`` is the server's model W + mean_k dW_k as a transformers folder (with its
  tokenizer); for low-rank auxiliary models, ``peft/<node>/`` is client <node>'s personal adapter as a
  peft LoRA folder (``PeftModel.from_pretrained(base, folder)``, same r, alpha, A, B). The task head
  of a classifier was initialised by the run (seeded), so it travels in the adapter as a
  ``modules_to_save`` module holding W_head (+ the client's dW_head when the head was adapted).
* FedAvg-LoRA: ``peft/global/`` is the averaged peft adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from fedcola import models, runtime
from fedcola.cola import records as cola_fl
from fedcola.fedavg_lora import client as fedavg_lora
from fedcola.cola.adapters import LowRank
from fedcola.cola.server import ColaServer
from fedcola.fl.ledger import load as load_ledger

HEADS = ("classifier", "score")


def export_peft_adapter(config: dict, adapters: dict[str, LowRank], out: Path) -> Path:
    """One client's low-rank auxiliary models as a peft LoRA folder on the run's base model."""
    from peft import LoraConfig, get_peft_model

    base = runtime.base_model(config)
    heads = [h for h in HEADS if hasattr(base, h)]
    head_weights = {}
    for h in heads:
        head = getattr(base, h)
        head_weights[f"{h}.weight"] = head.weight + (adapters[h].delta_weight() if h in adapters else 0)
        if head.bias is not None:
            bias = adapters[h].delta_bias() if h in adapters else None
            head_weights[f"{h}.bias"] = head.bias + (bias if bias is not None else 0)
    lora_layers = [layer for layer in adapters if layer not in heads]
    task_type = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(config["task"])
    peft_model = get_peft_model(base, LoraConfig(r=config["lora.r"], lora_alpha=config["lora.alpha"], lora_dropout=0.0,
                                                 target_modules=lora_layers, modules_to_save=heads or None, task_type=task_type))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for layer in lora_layers:
            params[f"base_model.model.{layer}.lora_A.default.weight"].copy_(adapters[layer].A)
            params[f"base_model.model.{layer}.lora_B.default.weight"].copy_(adapters[layer].B)
        for name, value in head_weights.items():
            layer, param = name.rsplit(".", 1)
            params[f"base_model.model.{layer}.modules_to_save.default.{param}"].copy_(value)
    peft_model.save_pretrained(out)
    return out


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's exportable artefacts under ``out_dir`` (default ``<run_dir>/export``)."""
    run_dir = Path(run_dir)
    ledger = load_ledger(run_dir / "ledger.json")
    if ledger["status"] != "completed":
        raise ValueError(f"run {run_dir} did not complete (status {ledger['status']}); nothing to export")
    config, out = ledger["config"], Path(out_dir or run_dir / "export")
    written = []
    if config["method"] == "fedavg_lora":
        model = fedavg_lora.build_model(config)
        fedavg_lora.load_trainable(model, load_file(str(run_dir / "final.safetensors")))
        model.save_pretrained(out / "peft" / "global")
        return [out / "peft" / "global"]
    per_client = cola_fl.load_adapters(run_dir / "final.safetensors", config)
    base = runtime.base_model(config)
    server = ColaServer(base, cola_fl.targets_of(config), mode="merged")
    if all(a.mergeable for ads in per_client.values() for a in ads.values()):
        merged = server.merged_weights(per_client)
        with torch.no_grad():
            for name, value in merged.items():
                base.get_parameter(name).copy_(value)
        base.save_pretrained(out / "merged")
        if config["task"] != "image-classification":
            models.load_tokenizer(config["model"]).save_pretrained(out / "merged")
        written.append(out / "merged")
    if config["cola.adapter"] == "low-rank":
        written += [export_peft_adapter(config, ads, out / "peft" / str(node)) for node, ads in per_client.items()]
    return written
