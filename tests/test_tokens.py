"""A client's split tokenised once and cached on the node (``fedcola.tokens``, ``runtime.client_data``):
the batches are the tokenizer's own (classification and causal LM, right and left padding), the file is
read back by a later process, a broken or stale file is never used, a full disk only costs the cache, and
a deployed ColA message with a warm cache imports neither ``datasets`` nor ``transformers``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcola import runtime, tokens, train
from fedcola.config import DEFAULTS
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
LM = dict(DEFAULTS) | {"method": "lte", "model": "gpt-tiny", "task": "causal-lm", "dataset": "hamlet", "data.max-length": 48,
                       "data.block-chars": 48, "batch-size": 8}


@pytest.fixture(autouse=True)
def fresh_caches():
    runtime._client_tokens.cache_clear()
    yield
    runtime._client_tokens.cache_clear()


def _config(config: dict, folder: Path) -> dict:
    return config | {runtime.DATA_PATH: "", runtime.STATE_DIR: str(folder)}


def _same_batches(config: dict, pid: int, n: int, split: str = "train", seeds=(0, 7)) -> None:
    data, cached = runtime.client_split(config, pid, n, split), runtime.client_data(config, pid, n, split)
    assert isinstance(cached, tokens.Tokens) and len(cached) == len(data)
    for seed in seeds:
        for mine, theirs in zip(runtime.loader(config, cached, shuffle=True, seed=seed), runtime.loader(config, data, shuffle=True, seed=seed)):
            assert mine.keys() == theirs.keys()
            for k in mine:
                assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
    prefix = range(min(len(data), 5))
    (mine,), (theirs,) = runtime.loader(config, cached.select(prefix), False, 0, 8), runtime.loader(config, data.select(prefix), False, 0, 8)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_cached_classification_batches_are_the_tokenizers(tiny_assets, tmp_path):
    config = _config(helpers.tiny_cola_config(tiny_assets), tmp_path)
    for pid in (0, 1):
        _same_batches(config, pid, 2)
    _same_batches(config, 1, 2, "validation")


def test_cached_causal_lm_batches_are_the_character_tokenizers(tmp_path):
    _same_batches(_config(LM, tmp_path), 0, 3)


def test_left_padding_is_the_tokenizers(tiny_assets):
    tok = runtime.tokenizer(helpers.tiny_cola_config(tiny_assets))
    texts = ["a short one", "a much longer text than the first one, with more words", "mid length text"]
    left = type(tok).from_pretrained(tiny_assets["model"], padding_side="left")
    cached = tokens.tokenize({"text": texts, "label": [0, 1, 0]}, left, "classification", 16)
    assert cached.left and cached.pad_id == tok.pad_token_id
    mine, theirs = cached.collate([cached[i] for i in range(3)]), train.collate_fn(left, "classification", 16)([{"text": t, "label": y} for t, y in zip(texts, [0, 1, 0])])
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert mine["attention_mask"][0, 0] == 0  # padded on the left


def test_a_later_process_reads_the_file_and_a_broken_or_stale_file_is_not_used(tiny_assets, tmp_path):
    config = _config(helpers.tiny_cola_config(tiny_assets), tmp_path)
    made = runtime.client_data(config, 0, 2)
    (path,) = (tmp_path / "tokens").glob("*.safetensors")
    read = tokens.load_tokens(path)
    assert torch.equal(read.ids, made.ids) and torch.equal(read.offsets, made.offsets) and torch.equal(read.labels, made.labels)
    assert (read.pad_id, read.left, read.task, read.vocab_size) == (made.pad_id, made.left, made.task, made.vocab_size)

    path.write_bytes(path.read_bytes()[:100])  # cut short, as by a crash
    runtime._client_tokens.cache_clear()
    again = runtime.client_data(config, 0, 2)
    assert torch.equal(again.ids, made.ids) and tokens.load_tokens(path) is not None  # recomputed and rewritten

    runtime.client_data(config | {"data.max-length": 8}, 0, 2)  # another tokenisation: another file
    runtime.client_data(config, 1, 2)  # another partition: another file
    assert len(list((tmp_path / "tokens").glob("*.safetensors"))) == 3


def test_an_unwritable_cache_costs_only_the_cache(tiny_assets, tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the folder should be")
    config = _config(helpers.tiny_cola_config(tiny_assets), blocker)
    cached = runtime.client_data(config, 0, 2)
    assert len(cached) == len(runtime.client_split(config, 0, 2))


def test_a_cola_message_with_a_warm_cache_imports_no_datasets_or_transformers(tiny_assets, tmp_path):
    config = _config(helpers.tiny_cola_config(tiny_assets), tmp_path)
    runtime.client_data(config, 0, 2), runtime.client_data(config, 0, 2, "validation")  # the first message's work
    script = f"""
import json, sys
from fedcola import client_app
client = client_app.cola_client(json.loads({json.dumps(json.dumps(config))}), 0, 2)
batches = client.data(3, 2)
list(client.validation)
print(json.dumps([len(batches), sorted(m for m in ("datasets", "transformers") if m in sys.modules)]))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [2, []]
