"""What every method needs from a run config: its splits, a client's partition or own data, loaders,
label count, and a SuperNode's node options."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
from logging import WARNING
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log

from fedcola import tokens, train

# ``data`` and ``models`` (datasets, transformers) are imported where they are used: a deployed client
# whose split is already tokenised on its disk (``client_data``) never imports them.

DATA_PATH = "node.data-path"  # the node's own data in a client handler's config (not a run config key)
STATE_DIR = "node.state-dir"  # the node's state dir in a client handler's config (not a run config key)


def dataset_splits(config: dict):
    from fedcola import data

    return data.load_splits(
        config["dataset"], seed=config["seed"], block_chars=config["data.block-chars"],
        text_column=config["data.text-column"], label_column=config["data.label-column"],
    )


def num_labels(config: dict) -> int | None:
    """The classes of the run's dataset (None for a language model: its dataset is not loaded)."""
    if config["task"] == "causal-lm":
        return None
    feature = dataset_splits(config)["train"].features.get("label")
    return feature.num_classes if feature is not None and hasattr(feature, "num_classes") else None


def tokenizer(config: dict):
    """Character-level for text models trained from scratch, the model's own tokenizer otherwise."""
    from fedcola import models
    from fedcola.char_tokenizer import dataset_char_tokenizer

    if config["task"] == "image-classification":
        return None
    if config["model"] in models.FROM_SCRATCH:
        return dataset_char_tokenizer(tuple(dataset_splits(config)["train"]["text"]))
    return models.load_tokenizer(config["model"])


def base_model(config: dict):
    """The run's pretrained model, its task head initialised from the run's seed (identical in every process)."""
    import torch

    from fedcola import models

    torch.manual_seed(config["seed"])
    return models.load_model(config["model"], config["task"], num_labels=num_labels(config))


def device(config: dict, role: str):
    """The run's ``server.device`` or ``client.device`` (``role``) on this machine (``auto``: CUDA if present)."""
    return train.resolve_device(config[f"{role}.device"])


def loader(config: dict, ds, shuffle: bool, seed: int, batch_size: int | None = None):
    """Batches of a split (a ``datasets.Dataset`` or ``tokens.Tokens``: the same batches), shuffled by ``seed``."""
    batch_size = batch_size or config["batch-size"]
    if isinstance(ds, tokens.Tokens):
        return train.make_loader(ds, None, config["task"], batch_size, config["data.max-length"], shuffle, seed, collate=ds.collate)
    return train.make_loader(ds, tokenizer(config), config["task"], batch_size, config["data.max-length"], shuffle, seed)


def local_data(config: dict, path: str):
    """A SuperNode's own examples (``data-path`` in its node config: CSV / JSONL / TXT file or class
    folder, read as ``fedcola.data`` reads local datasets), labels mapped by name onto the classes of
    the run's ``dataset`` (an integer label that is not a class name is taken as the class index)."""
    from datasets import ClassLabel

    from fedcola import data

    ds = data.load_columns(path, config["data.block-chars"], config["data.text-column"], config["data.label-column"])
    feature = dataset_splits(config)["train"].features.get("label")
    if not isinstance(feature, ClassLabel):
        return ds
    if "label" not in ds.column_names:
        raise ValueError(f"data-path '{path}' has no label column '{config['data.label-column']}' (columns: {', '.join(ds.column_names)})")
    own = ds.features["label"]
    values = [own.int2str(v) for v in ds["label"]] if isinstance(own, ClassLabel) else ds["label"]
    index = {name: i for i, name in enumerate(feature.names)}
    ids = []
    for v in values:
        if str(v) in index:
            ids.append(index[str(v)])
        elif isinstance(v, int) and 0 <= v < len(index):
            ids.append(v)
        else:
            raise ValueError(f"data-path '{path}': label {v!r} is not a class of dataset '{config['dataset']}' ({', '.join(feature.names)})")
    return ds.remove_columns("label").add_column("label", ids).cast_column("label", feature)


SPLIT_KEYS = ("dataset", "seed", "data.block-chars", "data.text-column", "data.label-column", "partitioning", "eval.client-fraction")


@functools.lru_cache(maxsize=256)  # one Ray actor may serve every virtual client of a run
def _client_splits(frozen: tuple, partition_id: int, num_partitions: int):
    from fedcola import data

    config = dict(frozen)
    if config[DATA_PATH]:
        part = local_data(config, config[DATA_PATH])
    else:
        part = data.load_partition(dataset_splits(config)["train"], config["partitioning"], partition_id, num_partitions, config["seed"])
    held_out = max(1, round(len(part) * config["eval.client-fraction"]))
    return part.train_test_split(test_size=held_out, seed=config["seed"])


def client_split(config: dict, partition_id: int, num_partitions: int, split: str = "train"):
    """A client's local ``train`` or ``validation`` split: its partition of the run's dataset, or the
    node's own data (``config[DATA_PATH]``, set by the ClientApp from the node config), of which
    ``eval.client-fraction`` (fixed seed) is held out for client-side evaluation."""
    frozen = tuple((k, config[k]) for k in SPLIT_KEYS) + ((DATA_PATH, config.get(DATA_PATH, "")),)
    splits = _client_splits(frozen, partition_id, num_partitions)
    return splits["train" if split == "train" else "test"]


TOKENS_KEYS = SPLIT_KEYS + ("model", "task", "data.max-length")


def client_data(config: dict, partition_id: int, num_partitions: int, split: str = "train"):
    """A client's split as :func:`client_split` gives it, tokenised once (``tokens.Tokens``) and kept in
    ``tokens.cache_dir`` of the node's state dir (``config[STATE_DIR]``) under a digest of everything it depends on (the config keys of the
    split and the tokenisation, the partition, the tokenizer libraries' versions, local files' size and
    mtime); image splits are returned as they are. A file that cannot be written (full disk, read-only
    folder) is logged and the tokens used from memory."""
    if config["task"] == "image-classification":
        return client_split(config, partition_id, num_partitions, split)
    frozen = tuple((k, config[k]) for k in TOKENS_KEYS) + ((DATA_PATH, config.get(DATA_PATH, "")),)
    return _client_tokens(frozen, partition_id, num_partitions, split, str(tokens.cache_dir(config.get(STATE_DIR, ""))))


@functools.lru_cache(maxsize=256)
def _client_tokens(frozen: tuple, partition_id: int, num_partitions: int, split: str, folder: str) -> tokens.Tokens:
    config = dict(frozen)
    path = Path(folder) / f"{_digest(config, partition_id, num_partitions, split)}.safetensors"
    cached = tokens.load_tokens(path)
    if cached is not None:
        return cached
    made = tokens.tokenize(client_split(config, partition_id, num_partitions, split), tokenizer(config), config["task"], config["data.max-length"])
    try:
        tokens.save_tokens(made, path)
    except OSError as e:
        log(WARNING, "tokenised split not cached (%s): tokenising again in the next process", e)
    return made


def _digest(config: dict, partition_id: int, num_partitions: int, split: str) -> str:
    def source(value):
        path = Path(str(value)).expanduser() if value else None
        if path is None or not path.exists():
            return value
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]

    versions = [importlib.metadata.version(p) for p in ("tokenizers", "transformers", "datasets", "flwr-datasets")]
    what = [tokens.FORMAT, sorted(config.items()), [source(config[k]) for k in ("dataset", "model", DATA_PATH)], partition_id, num_partitions,
            split, versions]
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:32]


def validation_loader(config: dict):
    """The server's held-out split (its first ``eval.max-examples`` examples), in a fixed order."""
    val = dataset_splits(config)["validation"]
    val = val.select(range(min(len(val), config["eval.max-examples"])))
    return loader(config, val, shuffle=False, seed=0, batch_size=config["eval.batch-size"])


def seeded_batches(config: dict, part, partition_id: int):
    """A client's data as the library's callable ``(k, count) -> batches``: ``part`` shuffled by (seed, k,
    partition) only and cycled (round k of fedcola's own LTE and FedAvg-LoRA clients)."""
    return lambda k, count: train.cycle(loader(config, part, shuffle=True, seed=round_seed(config, k, partition_id)))


def round_seed(config: dict, server_round: int, partition_id: int) -> int:
    """Shuffling seed of one client's round (``train.round_seed`` of the run's seed)."""
    return train.round_seed(config["seed"], server_round, partition_id)


@dataclasses.dataclass(frozen=True)
class NodeOptions:
    """What a SuperNode's ``node_config`` says: its client id (``partition-id``: the ColA adapter id,
    the seeds of its draws), its data (``num-partitions`` partitions of the run's dataset, or its own
    file / folder ``data-path``), where its state is kept (``state-dir``, optional), its straggler
    factor (``slowdown``) and its GreenTrainer FLOPs budget ``green-rho`` (fraction of full local
    training's FLOPs, default 1)."""

    partition_id: int
    num_partitions: int
    slowdown: float
    data_path: str = ""
    state_dir: str = ""
    green_rho: float = 1.0


def node_options(context: Context) -> NodeOptions:
    node = context.node_config
    data_path, state_dir = str(node.get("data-path", "")), str(node.get("state-dir", ""))
    if "partition-id" not in node or ("num-partitions" not in node and not data_path):
        raise ValueError("this SuperNode's node config needs partition-id and either num-partitions or data-path "
                         "(e.g. --node-config 'partition-id=0 num-partitions=2' or 'partition-id=0 data-path=\"/data/mine.csv\"')")
    if data_path and not Path(data_path).expanduser().exists():
        raise ValueError(f"node config data-path '{data_path}' does not exist on this machine")
    slowdown = float(node.get("slowdown", 1.0))
    if slowdown < 1.0:
        raise ValueError(f"node config slowdown must be >= 1, got {slowdown}")
    green_rho = float(node.get("green-rho", 1.0))
    if not 0.0 < green_rho <= 1.0:
        raise ValueError(f"node config green-rho must be in (0, 1], got {green_rho}")
    return NodeOptions(int(node["partition-id"]), int(node.get("num-partitions", 1)), slowdown, data_path, state_dir, green_rho)
