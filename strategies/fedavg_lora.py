"""FedAvg of LoRA adapters with screened replies and a cost ledger."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcola.ledger import Ledger
from fedcola.wire import nbytes
from strategies.screening import screen


class FedAvgLoRA(FedAvg):
    """Flower's FedAvg over peft LoRA tensors; malformed replies are skipped, not fatal.

    Usable in any ServerApp: ``FedAvgLoRA(fraction_train=1.0, ledger=Ledger(...)).start(grid=grid,
    initial_arrays=ArrayRecord(lora_state), num_rounds=3, train_config=ConfigRecord(config))``.
    ``round_offset=k`` continues a run after its round k (``initial_arrays`` = the round-k weights).
    """

    def __init__(self, *args, ledger: Ledger | None = None, round_offset: int = 0, **kwargs):
        kwargs.setdefault("fraction_evaluate", 0.0)
        kwargs.setdefault("min_train_nodes", 1)
        kwargs.setdefault("min_available_nodes", 1)
        super().__init__(*args, **kwargs)
        self.ledger = ledger
        self.round_offset = round_offset  # a resumed run: Flower's round r is round r + offset of the run
        self._sent: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._sent = arrays
        if self.ledger is not None:
            self.ledger.begin_round(server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        kept = screen(server_round, replies, self._sent, self.ledger, nbytes(self._sent))
        if not kept:
            return None, None
        return super().aggregate_train(server_round, kept)
