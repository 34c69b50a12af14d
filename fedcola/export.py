"""Export a finished run for use without fedcola: transformers folders and peft LoRA adapters.

``fedcola export RUN_DIR [--out DIR]`` reads ``ledger.json`` (the run's config) and ``final.safetensors``
(ColA: keys ``"<partition id>/<layer>/<param>"``, read by ``fedcola.specs.load_adapters``) and
writes under ``DIR`` (default ``RUN_DIR/export``) what the run evaluated:

* ColA, ``cola.mode = "merged"`` (the server evaluated one shared model, W + mean_k dW_k, unweighted
  as ``ColaServer.merged_weights`` / ``predictor`` compute it):
    - ``merged/``: that model as a transformers folder (with its tokenizer);
    - low-rank auxiliary models (unless only the task head was adapted: peft holds no adapter without
      a LoRA layer): ``peft/merged/``, the same model as ONE peft LoRA adapter on the run's
      base model. The mean of K rank-r products is a rank-K*r LoRA: A' = [A_1; ...; A_K] (the A_k
      stacked along the rank dim), B' = [B_1 ... B_K] (the B_k side by side), r' = K*r and
      lora_alpha unchanged, so s' = alpha / (K r) = s / K and s' B' A' = (1/K) sum_k s B_k A_k
      exactly; every client's trained factors are stored unchanged. (For many clients, K*r can
      exceed the layer's width: the adapter is then larger than dW itself, but still exact.)
  The clients' individual adapters are not exported in merged mode: nobody evaluated them alone.
* ColA, ``cola.mode = "unmerged"`` / ``"detached"`` (each client evaluated its personal model
  W + g_k; detached only changes gradients, not the forward): one folder per client, named by its
  partition id (the adapter id under which ``final.safetensors`` keys it):
    - low-rank: ``peft/partition-<id>/``, the client's LoRA adapter (same r, alpha, A, B);
    - linear (or low-rank on the task head alone): ``personal/partition-<id>/``, W + dW_k as a
      transformers folder (with its tokenizer);
    - mlp: a one-line error (g_k is not linear in x: neither transformers nor peft can hold it).
* FedAvg-LoRA: ``peft/global/`` is the averaged peft adapter.

Every peft folder loads with ``PeftModel.from_pretrained(base, folder)`` where ``base`` is the run's
model for its task (any head: the task head travels in the adapter). The task head of a classifier
was initialised by the run (seeded), so it is a ``modules_to_save`` module holding W_head (+ the
client's dW_head, or the clients' mean dW_head in ``peft/merged``, when the head was adapted; every
adapted layer inside a head module is folded into that copy). ``adapter_config.json`` records the
base model as the user gave it (``config["model"]``: an embedded name such as ``minilm``, a local
path or a hub id), not a path inside the exporting environment, and lists each ``modules_to_save``
entry once (peft appends its classification head names to the ones it is given).

Each folder is written beside its place and moved in when complete (``write_folder``): a failed export
(a full disk) leaves no partial or temporary folder and keeps an earlier export of that folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedcola import models, runtime, specs
from fedcola.cola.adapters import Adapter, LowRank
from fedcola.cola.server import ColaServer
from fedcola.fedavg_lora import client as fedavg_lora
from fedcola.fl.ledger import load as load_ledger

HEADS = ("classifier", "score")


def write_folder(out: Path, save: Callable[[Path], object]) -> Path:
    """``save(folder)`` into a temporary folder ``.<name>.tmp<pid>`` beside ``out``, then moved into place
    (an earlier export of ``out`` is replaced only then): a failure (a full disk) leaves no partial folder
    and no temporary folder, keeps an earlier export of ``out`` as it was, and raises."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.with_name(f".{out.name}.{tag}{os.getpid()}") for tag in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
        if out.exists():
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def client_folder(key: Hashable) -> str:
    """The folder name of one client's export: ``partition-<id>``."""
    return f"partition-{key}"


def _in_head(layer: str, heads: Sequence[str]) -> bool:
    return any(layer == h or layer.startswith(f"{h}.") for h in heads)


def _tidy_adapter_config(peft_model, config: dict) -> None:
    """What ``adapter_config.json`` will say: the base model as the user named it, each module to save once."""
    for peft_config in peft_model.peft_config.values():
        peft_config.base_model_name_or_path = config["model"]
        if peft_config.modules_to_save:
            peft_config.modules_to_save = list(dict.fromkeys(peft_config.modules_to_save))


def export_peft_adapter(config: dict, adapter_sets: Mapping[Hashable, Mapping[str, Adapter]], out: Path) -> Path:
    """Low-rank auxiliary models as one peft LoRA folder on the run's base model: one client's
    (its personal model W + s B_k A_k) or K clients' (the merged model W + (1/K) sum_k s B_k A_k,
    as a rank-K*r LoRA; see the module docstring)."""
    from peft import LoraConfig, get_peft_model

    groups = list(adapter_sets.values())
    if not groups:
        raise ValueError("no auxiliary models to export")
    if not all(isinstance(a, LowRank) for ads in groups for a in ads.values()):
        raise ValueError("only low-rank auxiliary models have a peft LoRA form")
    r, k = config["lora.r"], len(groups)
    base = runtime.base_model(config)
    server = ColaServer(base, specs.cola_targets(config), mode="merged")
    heads = [h for h in HEADS if getattr(base, h, None) is not None]
    with torch.no_grad():
        merged = server.merged_weights(adapter_sets)  # W_head + mean_k dW_head for adapted heads
    head_weights = {(h, p): merged.get(f"{h}.{p}", value.detach()) for h in heads for p, value in getattr(base, h).named_parameters()}
    lora_layers = [layer for layer in server.targets if not _in_head(layer, heads)]
    task_type = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(config["task"])
    lora = LoraConfig(r=k * r, lora_alpha=config["lora.alpha"], lora_dropout=0.0, target_modules=lora_layers,
                      modules_to_save=heads or None, task_type=task_type)
    peft_model = get_peft_model(base, lora)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for layer in lora_layers:
            params[f"base_model.model.{layer}.lora_A.default.weight"].copy_(torch.cat([ads[layer].A for ads in groups], dim=0))
            params[f"base_model.model.{layer}.lora_B.default.weight"].copy_(torch.cat([ads[layer].B for ads in groups], dim=1))
        for (head, param), value in head_weights.items():
            params[f"base_model.model.{head}.modules_to_save.default.{param}"].copy_(value)
    _tidy_adapter_config(peft_model, config)
    # no embedding is adapted: no look-up of the base model
    return write_folder(out, lambda folder: peft_model.save_pretrained(folder, save_embedding_layers=False))


def export_transformers(config: dict, adapter_sets: Mapping[Hashable, Mapping[str, Adapter]], out: Path) -> Path:
    """W + mean_k dW_k over ``adapter_sets`` (one client: its personal model W + dW_k) as a transformers folder."""
    base = runtime.base_model(config)
    server = ColaServer(base, specs.cola_targets(config), mode="merged")
    with torch.no_grad():
        for name, value in server.merged_weights(adapter_sets).items():
            base.get_parameter(name).copy_(value)

    def save(folder: Path) -> None:
        base.save_pretrained(folder)
        if config["task"] != "image-classification":
            models.load_tokenizer(config["model"]).save_pretrained(folder)

    return write_folder(out, save)


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's exportable artefacts under ``out_dir`` (default ``<run_dir>/export``); returns the folders written."""
    run_dir = Path(run_dir)
    ledger = load_ledger(run_dir / "ledger.json")
    if ledger["status"] != "completed":
        raise ValueError(f"run {run_dir} did not complete (status {ledger['status']}); nothing to export")
    config, out = ledger["config"], Path(out_dir or run_dir / "export")
    if config["method"] == "fedavg_lora":
        model = specs.fedavg_model(config)
        fedavg_lora.load_trainable(model, load_file(str(run_dir / "final.safetensors")))
        _tidy_adapter_config(model, config)
        return [write_folder(out / "peft" / "global", lambda folder: model.save_pretrained(folder, save_embedding_layers=False))]
    if config["method"] != "cola":
        raise ValueError(f"fedcola export writes ColA and FedAvg-LoRA runs; this run's method is {config['method']!r}")
    per_client = specs.load_adapters(run_dir / "final.safetensors", config)
    kind, mode = config["cola.adapter"], config.get("cola.mode", "merged")
    # peft needs a LoRA layer: an adapter of the task head alone is only a modules_to_save copy
    lora = kind == "low-rank" and any(not _in_head(layer, HEADS) for ads in per_client.values() for layer in ads)
    if mode == "merged":
        written = [export_transformers(config, per_client, out / "merged")]
        if lora:
            written.append(export_peft_adapter(config, per_client, out / "peft" / "merged"))
        return written
    if lora:
        return [export_peft_adapter(config, {key: ads}, out / "peft" / client_folder(key)) for key, ads in per_client.items()]
    if kind in ("low-rank", "linear"):
        return [export_transformers(config, {key: ads}, out / "personal" / client_folder(key)) for key, ads in per_client.items()]
    raise ValueError(f"cola.adapter '{kind}' auxiliary models are not linear in x, so neither transformers nor peft can hold "
                     f"the clients' personal models; nothing exported (their weights are in {run_dir / 'final.safetensors'})")
