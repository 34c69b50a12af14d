"""What every method needs from a run config: its splits, a client's partition, loaders, label count."""

from __future__ import annotations

import dataclasses
import functools

from flwr.app import Context

from fedcola import data, models, train
from fedcola.char_tokenizer import dataset_char_tokenizer


def dataset_splits(config: dict):
    return data.load_splits(
        config["dataset"], seed=config["seed"], block_chars=config["data.block-chars"],
        text_column=config["data.text-column"], label_column=config["data.label-column"],
    )


def num_labels(config: dict) -> int | None:
    feature = dataset_splits(config)["train"].features.get("label")
    return feature.num_classes if feature is not None and hasattr(feature, "num_classes") else None


def tokenizer(config: dict):
    """Character-level for text models trained from scratch, the model's own tokenizer otherwise."""
    if config["task"] == "image-classification":
        return None
    if config["model"] in models.FROM_SCRATCH:
        return dataset_char_tokenizer(tuple(dataset_splits(config)["train"]["text"]))
    return models.load_tokenizer(config["model"])


def base_model(config: dict):
    """The run's pretrained model, its task head initialised from the run's seed (identical in every process)."""
    import torch

    torch.manual_seed(config["seed"])
    return models.load_model(config["model"], config["task"], num_labels=num_labels(config))


def loader(config: dict, ds, shuffle: bool, seed: int, batch_size: int | None = None):
    return train.make_loader(ds, tokenizer(config), config["task"], batch_size or config["batch-size"], config["data.max-length"], shuffle, seed)


@functools.lru_cache(maxsize=256)  # one Ray actor may serve every virtual client of a run
def _client_splits(frozen: tuple, partition_id: int, num_partitions: int):
    config = dict(frozen)
    part = data.load_partition(dataset_splits(config)["train"], config["partitioning"], partition_id, num_partitions, config["seed"])
    held_out = max(1, round(len(part) * config["eval.client-fraction"]))
    return part.train_test_split(test_size=held_out, seed=config["seed"])


def client_split(config: dict, partition_id: int, num_partitions: int, split: str = "train"):
    """A client's local ``train`` or ``validation`` split: its partition, of which ``eval.client-fraction``
    (fixed seed) is held out for client-side evaluation."""
    keys = ("dataset", "seed", "data.block-chars", "data.text-column", "data.label-column", "partitioning", "eval.client-fraction")
    splits = _client_splits(tuple((k, config[k]) for k in keys), partition_id, num_partitions)
    return splits["train" if split == "train" else "test"]


def validation_loader(config: dict):
    """The server's held-out split (its first ``eval.max-examples`` examples), in a fixed order."""
    val = dataset_splits(config)["validation"]
    val = val.select(range(min(len(val), config["eval.max-examples"])))
    return loader(config, val, shuffle=False, seed=0, batch_size=config["eval.batch-size"])


def round_seed(config: dict, server_round: int, partition_id: int) -> int:
    """Shuffling seed of one client's round: distinct per (seed, round, client), reproducible."""
    return config["seed"] * 1_000_003 + server_round * 1_009 + partition_id


@dataclasses.dataclass(frozen=True)
class NodeOptions:
    """What a SuperNode's ``node_config`` says: its partition, its straggler factor and its
    GreenTrainer FLOPs budget ``green-rho`` (fraction of full local training's FLOPs, default 1)."""

    partition_id: int
    num_partitions: int
    slowdown: float
    green_rho: float = 1.0


def node_options(context: Context) -> NodeOptions:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("this SuperNode's node config needs partition-id and num-partitions (e.g. --node-config 'partition-id=0 num-partitions=2')")
    slowdown = float(node.get("slowdown", 1.0))
    if slowdown < 1.0:
        raise ValueError(f"node config slowdown must be >= 1, got {slowdown}")
    green_rho = float(node.get("green-rho", 1.0))
    if not 0.0 < green_rho <= 1.0:
        raise ValueError(f"node config green-rho must be in (0, 1], got {green_rho}")
    return NodeOptions(int(node["partition-id"]), int(node["num-partitions"]), slowdown, green_rho)
