"""A client's own data given as a one-shot iterable (a generator, a DataLoader) is read once and kept:
its example count and every round's or interval's batches come from the same items."""

import torch
from torch import nn

from fedcola.cola.client import ColaClient
from fedcola.fedavg_lora.client import FedAvgLoRAClient
from fedcola.fl.batches import interval_batches, round_batches
from fedcola.lte.client import LTEClient


def _generator(n=3):
    return ({"input_ids": torch.full((2, 4), i), "labels": torch.tensor([i, i])} for i in range(n))


def test_generator_data_is_read_once_by_every_client():
    for client in (ColaClient(0, _generator()), LTEClient(nn.Linear(2, 2), _generator(), client_id=0),
                   FedAvgLoRAClient(nn.Linear(2, 2), _generator(), client_id=0)):
        assert client.num_examples == 6
        firsts = [int(b["labels"][0]) for b in interval_batches(client.data, 1, 2)]
        assert firsts == [2, 0]  # items 2 and 3 (mod 3): the data was kept, not exhausted by the count
        it = round_batches(client.data, 1, 2)
        assert [int(next(it)["labels"][0]) for _ in range(4)] == [2, 0, 1, 2]
