"""The user's own model and data, built in code and held in memory (what your app already has).

A tiny BERT classifier (for ColA and FedAvg-LoRA), a tiny Llama language model (LTE trains it from
scratch), and synthetic token data: a sentence is positive when it holds more "good" tokens (5) than
"bad" ones (6); the language-model text counts up modulo the vocabulary from a random start.
"""

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

VOCAB, LENGTH = 32, 12


def classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2))


def language_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=LENGTH))


def sentiment_batches(partition: int, split: str = "train", batches: int = 6, size: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * partition + (split == "validation"))
    ids = torch.randint(5, VOCAB, (batches, size, LENGTH), generator=g)
    labels = ((ids == 5).sum(-1) > (ids == 6).sum(-1)).long()
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]


def text_batches(partition: int, batches: int = 6, size: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2000 + partition)
    ids = (torch.randint(0, VOCAB, (batches, size, 1), generator=g) + torch.arange(LENGTH)) % VOCAB
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]
