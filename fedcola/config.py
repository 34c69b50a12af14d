"""Run configuration: one flat table of typed keys, shared by the CLI, ``flwr run`` and the apps.

A config file (``simulations/<name>.toml``) may nest tables (``[lora] r = 8``) or use dotted keys
(``"lora.r" = 8``); both flatten to ``lora.r``, the form Flower's run config uses. Every key has a
default below; an unknown key or a value of the wrong type is a ``ConfigError`` with one line that
says which key and what was expected.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

Scalar = int | float | str | bool

DEFAULTS: dict[str, Scalar] = {
    "method": "fedavg_lora",
    "model": "minilm",
    "task": "classification",
    "dataset": "rotten_tomatoes",
    "data.text-column": "text",
    "data.label-column": "label",
    "data.max-length": 64,
    "data.block-chars": 256,
    "partitioning": "iid",
    "num-clients": 4,
    "fraction-train": 1.0,
    "rounds": 3,
    "round-timeout": 3600.0,
    "allow-empty-rounds": False,  # a round in which no client reply was accepted warns instead of failing the run
    "max-examples": 1_000_000,  # cap on a client reply's num-examples (its weight in example-weighted means); above: skipped
    "fedavg.aggregation": "mean",  # FedAvg-LoRA's aggregate over the clients: mean (FedAvg), median or trimmed-mean (robust)
    "fedavg.trim": 0.2,  # trimmed-mean: the share cut from each tail
    "max-update-ratio": 10.0,  # FedAvg-LoRA / sync LTE / ColA: a reply whose update norm exceeds this x the other replies' median is skipped (0 = off)
    "seed": 0,
    "local-steps": 20,
    "batch-size": 16,
    "lr": 2e-3,
    "weight-decay": 0.0,
    "optimizer": "adamw",
    "lora.r": 8,
    "lora.alpha": 16,
    "lora.targets": "query,key,value,dense",
    "cola.mode": "merged",
    "cola.adapter": "low-rank",
    "cola.targets": "query,value,classifier",
    "cola.interval": 1,
    "cola.mlp-hidden": 128,
    "cola.wire-dtype": "fp16",
    "cola.upload-dtype": "fp16",  # merged mode: the dtype of the change a client's train reply carries (fp16, fp32, bf16)
    "cola.wire": "auto",
    "cola.share-inputs": True,
    "cola.weighting": "equal",
    "cola.green-rho": 1.0,
    "cola.green-every": 1,
    "cola.identity": "node",
    "lte.r": 8,
    "lte.alpha": 16.0,
    "lte.targets": "",
    "lte.non-lora": "frozen",
    "lte.reset": False,
    "lte.weighted": False,
    "lte.aggregation": "mean",  # sync LTE's merge over the clients' deltas: mean (the paper), median or trimmed-mean (robust)
    "lte.trim": 0.2,  # trimmed-mean: the share cut from each tail
    "lte.async": False,
    "lte.staleness-exponent": 0.5,
    "lte.max-staleness": 10,
    "lte.async-mix": 0.0,
    "lte.full-rank": False,
    "lte.slowdown": "",
    "lte.node-wait-s": 60.0,  # a sync round waits this long for num-clients nodes, then goes on with those connected
    "scratch.hidden": 64,
    "scratch.layers": 2,
    "scratch.heads": 4,
    "scratch.patch-size": 2,
    "eval.max-examples": 1000,
    "eval.client-fraction": 0.1,
    "eval.client-max-examples": 64,
    "eval.batch-size": 64,
    "client.num-cpus": 1,
    "client.num-gpus": 0.0,  # Ray's GPU share per virtual client in `fedcola run` (e.g. 0.25: four clients per GPU)
    "client.device": "cpu",  # where a client trains: auxiliary models (ColA), LTE / FedAvg-LoRA models; cpu, cuda, cuda:N or auto
    "server.device": "auto",  # the server's model: ColA's frozen base, LTE / FedAvg-LoRA evaluation, `fedcola green`; auto = cuda if present
    "server.dtype": "fp32",  # the ColA server's frozen base: fp32, bf16 or fp16 (merged mode stays exact: fedcola.cola.capture.MeanBranch)
    "server.offload-pairs": False,  # ColA: captured (x, G) to host memory as soon as they exist
    "server.recompute": False,  # ColA: recompute the frozen blocks' activations in the backward
    "client.state-dir": "",  # clients' state dir when their node config names none (`fedcola run`: <run dir>/client-state)
    "green.rho": 0.5,
    "green.steps": 100,
    "green.reselect-every": 50,
    "green.importance-batches": 1,
    "out-dir": "runs",
    "resume-dir": "",  # a run directory to continue after its last checkpointed round (its own config is used)
    "run-key": "",  # names the clients' state across resumes of one run (drawn at the run's start when empty)
    "resumed-after": "",  # set by a resume: the checkpointed round of each resume so far, e.g. "2,5" (clients roll back to the last)
}

METHODS = ("fedavg_lora", "cola", "lte")
AGGREGATIONS = ("mean", "median", "trimmed-mean")  # as fedcola.fl.robust (not imported here: it pulls in Flower)


class ConfigError(ValueError):
    """A malformed configuration, reported in one line."""


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _typed(key: str, value: Any) -> Scalar:
    """``value`` checked against the default's type (an int is accepted where a float is expected)."""
    want = type(DEFAULTS[key])
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not want:
        raise ConfigError(f"config key '{key}' expects {want.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_key(key: str) -> None:
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, DEFAULTS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{key}'{hint}; `fedcola keys` lists them all")


def names(config: dict, key: str) -> list[str]:
    """A comma-separated config value (e.g. ``lora.targets``) as a list, empty entries dropped."""
    return [t.strip() for t in config[key].split(",") if t.strip()]


def parse_value(text: str) -> Scalar:
    """A ``--set`` value in TOML syntax (``8``, ``1e-3``, ``true``, ``"x"``); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build(overrides: Mapping[str, Any]) -> dict[str, Scalar]:
    """Defaults updated by ``overrides``, every key and type validated."""
    config = dict(DEFAULTS)
    for key, value in flatten(overrides).items():
        _check_key(key)
        config[key] = _typed(key, value)
    if config["method"] not in METHODS:
        raise ConfigError(f"config key 'method': unknown method '{config['method']}', known: {', '.join(METHODS)}")
    choices = {"cola.mode": ("merged", "unmerged", "detached"), "cola.adapter": ("low-rank", "linear", "mlp"),
               "cola.wire-dtype": ("fp16", "fp32", "bf16", "int8"), "cola.wire": ("pairs", "grads", "auto"), "cola.upload-dtype": ("fp16", "fp32", "bf16"), "cola.weighting": ("equal", "examples"),
               "cola.identity": ("node", "claim"), "server.dtype": ("fp32", "bf16", "fp16"),
               "lte.non-lora": ("frozen", "replicated"),
               "fedavg.aggregation": AGGREGATIONS, "lte.aggregation": AGGREGATIONS}
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}, got {config[key]!r}")
    for key in ("num-clients", "rounds", "local-steps", "batch-size", "lora.r", "cola.interval", "cola.green-every", "green.steps",
                "green.reselect-every", "green.importance-batches", "max-examples", "data.max-length", "data.block-chars", "client.num-cpus",
                "eval.batch-size", "eval.max-examples", "eval.client-max-examples", "lte.r", "lora.alpha", "cola.mlp-hidden"):
        if config[key] < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {config[key]}")
    for key in ("lr", "weight-decay", "lte.alpha", "lte.staleness-exponent", "lte.async-mix", "lte.node-wait-s", "max-update-ratio", "client.num-gpus"):
        if not (math.isfinite(config[key]) and config[key] >= 0) or key in ("lr", "lte.alpha") and config[key] == 0:
            raise ConfigError(f"config key '{key}' must be a finite number {'> 0' if key in ('lr', 'lte.alpha') else '>= 0'}, got {config[key]}")
    if config["round-timeout"] <= 0:
        raise ConfigError(f"config key 'round-timeout' must be > 0 seconds, got {config['round-timeout']}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]*", config["run-key"]):
        raise ConfigError(f"config key 'run-key' must be letters, digits, '_', '.', '-', got {config['run-key']!r}")
    if not all(r.isdigit() for r in names(config, "resumed-after")):
        raise ConfigError(f"config key 'resumed-after' must list round numbers (e.g. \"2,5\"), got {config['resumed-after']!r}")
    for key in ("server.device", "client.device"):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", config[key]):
            raise ConfigError(f"config key '{key}' must be auto, cpu, cuda or cuda:N, got {config[key]!r}")
    if config["lte.async"] and config["lte.aggregation"] != "mean":
        raise ConfigError("config key 'lte.aggregation': async LTE merges one delta at a time (no median to take); use it with lte.async = false")
    if config["cola.wire-dtype"] == "int8" and config["cola.wire"] != "pairs":
        raise ConfigError("config key 'cola.wire-dtype': int8 is a format of the pairs; use it with cola.wire = 'pairs'")
    if config["cola.wire"] == "grads" and config["cola.adapter"] == "mlp":
        raise ConfigError("config key 'cola.wire': the server forms gradients of low-rank and linear auxiliary models only; use 'pairs' or 'auto' with mlp")
    for key in ("fedavg.trim", "lte.trim"):
        if not 0.0 <= config[key] < 0.5:
            raise ConfigError(f"config key '{key}' must be in [0, 0.5), got {config[key]}")
    for key in ("fraction-train", "green.rho", "cola.green-rho"):
        if not 0.0 < config[key] <= 1.0:
            raise ConfigError(f"config key '{key}' must be in (0, 1], got {config[key]}")
    return config


def load(path: str | Path, sets: list[str] = ()) -> dict[str, Scalar]:
    """Read a TOML config and apply ``key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    return build({**flatten(table), **parse_sets(sets)})


def parse_sets(sets: list[str]) -> dict[str, Scalar]:
    """``--set key=value`` items as {key: value}."""
    out = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        out[key.strip()] = parse_value(text.strip())
    return out


def from_run_config(run_config: Mapping[str, Any]) -> dict[str, Scalar]:
    """The config a ServerApp / ClientApp receives from Flower (``context.run_config``)."""
    return build({k: v for k, v in run_config.items()})
