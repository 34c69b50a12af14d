"""A client's own data as the library's clients take it: an iterable of batches (dicts of tensors:
``input_ids``, ``attention_mask``, ``labels``; or ``pixel_values``, ``labels``) or a callable
``(index, count) -> batches`` that draws them (for instance a DataLoader seeded by the index)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch

Batch = Mapping[str, torch.Tensor]
TrainData = Iterable[Batch] | Callable[[int, int], Iterable[Batch]]


def held(data: TrainData) -> TrainData:
    """``data`` as a client keeps it: a callable as is, an iterable read once into a list (a generator or a
    DataLoader is then read the same way by every interval, round and example count)."""
    return data if callable(data) or isinstance(data, Sequence) else list(data)


def _items(data: Iterable[Batch]) -> Sequence[Batch]:
    items = held(data)
    if not items:
        raise ValueError("this client has no training batches")
    return items


def interval_batches(data: TrainData, step: int, count: int) -> list[Batch]:
    """Exactly the ``count`` batches of step ``step``: ``data(step, count)``, or items ``step * count + i``
    of the cycled iterable; the same batches whichever message asks for them."""
    if callable(data):
        return list(data(step, count))
    items = _items(data)
    return [items[(step * count + i) % len(items)] for i in range(count)]


def round_batches(data: TrainData, rounds: int, count: int) -> Iterator[Batch]:
    """The batches of round ``rounds`` of ``count`` steps, as an iterator a trainer reads as far as it
    needs: ``data(rounds, count)``, or the cycled iterable from item ``rounds * count`` on."""
    if callable(data):
        return iter(data(rounds, count))
    items = _items(data)
    return itertools.islice(itertools.cycle(items), rounds * count % len(items), None)


def num_examples(data: TrainData, given: int | None) -> int:
    """The client's example count: ``given``, else the labels of its batches (a callable needs ``given``)."""
    if given is not None:
        return given
    if callable(data):
        raise TypeError("num_examples is needed when the training data is a callable")
    return sum(len(b["labels"]) for b in _items(data))
