"""Character-level tokenizer for language models trained from scratch (``gpt-tiny``; LTE, Huh et al.,
arXiv 2402.16828, trains its GPT from scratch).

Every character is one token; the vocabulary is ``[PAD]`` (id 0, the pad id ``gpt-tiny`` is built
with), ``[UNK]`` (id 1), then the sorted distinct characters of the training text, so the same text
always gives the same ids. It is a transformers ``PreTrainedTokenizerFast``, so
``fedcola.train.collate_fn`` batches with it like any pretrained tokenizer.
"""

from __future__ import annotations

import functools

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK = "[PAD]", "[UNK]"


def char_tokenizer(text: str, model_max_length: int = 1_000_000) -> PreTrainedTokenizerFast:
    """A deterministic one-token-per-character tokenizer over the characters of ``text``."""
    vocab = {PAD: 0, UNK: 1} | {c: i + 2 for i, c in enumerate(sorted(set(text)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, model_max_length=model_max_length)


@functools.lru_cache(maxsize=4)
def dataset_char_tokenizer(train_text: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """The character tokenizer of a training split's texts (cached per split)."""
    return char_tokenizer("".join(train_text))
