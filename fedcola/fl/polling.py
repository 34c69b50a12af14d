"""Replies pulled at a short interval. Flower's deployment grid (``HttpGrid.send_and_receive``, flwr
1.41 / 1.42) sleeps a fixed 3 s between pulls, so every message exchange of a deployed round waits for
the next 3 s tick; ``PollingGrid`` wraps any Grid and pulls every ``interval`` seconds instead, with
Flower's semantics otherwise (push, pull until every reply is in or ``timeout`` has passed)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class PollingGrid(Grid):
    """``grid`` with ``send_and_receive`` polling every ``interval`` s (``push_messages`` / ``pull_messages``)."""

    def __init__(self, grid: Grid, interval: float = 0.05) -> None:
        self.grid, self.interval = grid, interval

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies every ``interval`` s until all are in or ``timeout`` s passed."""
        waiting = set(self.push_messages(messages))
        end = time.time() + (timeout or 0.0)
        replies: list[Message] = []
        while waiting:
            got = list(self.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (timeout is not None and time.time() >= end):
                break
            time.sleep(self.interval)
        return replies
