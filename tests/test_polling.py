"""`fedcola.fl.polling.PollingGrid`: Flower's send_and_receive semantics (every reply, or those in by the
timeout), pulling every `interval` seconds instead of the deployment grid's fixed 3 s."""

import pytest
from flwr.app import Message, RecordDict

from fedcola.fl import polling

pytestmark = pytest.mark.usefixtures("task_identity")


class _SlowGrid:
    """Replies to message i become available at pull number `ready[i]`."""

    def __init__(self, ready):
        self.ready, self.pulls = ready, 0

    def push_messages(self, messages):
        self.messages = list(messages)
        return [f"m{i}" for i in range(len(self.messages))]

    def pull_messages(self, ids):
        self.pulls += 1
        out = []
        for i, msg in enumerate(self.messages):
            if f"m{i}" in ids and self.ready[i] <= self.pulls:
                reply = Message(RecordDict({}), reply_to=msg)
                reply.metadata.__dict__["_reply_to_message_id"] = f"m{i}"
                out.append(reply)
        return out


def _messages(n):
    return [Message(RecordDict({}), dst_node_id=i + 1, message_type="train") for i in range(n)]


def test_all_replies_pulled_at_the_short_interval(monkeypatch):
    clock, sleeps = [0.0], []
    monkeypatch.setattr(polling.time, "time", lambda: clock[0])
    monkeypatch.setattr(polling.time, "sleep", lambda s: (sleeps.append(s), clock.__setitem__(0, clock[0] + s)))
    fake = _SlowGrid([1, 3, 5])
    replies = polling.PollingGrid(fake, interval=0.05).send_and_receive(_messages(3), timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert fake.pulls == 5 and sleeps == [0.05] * 4  # Flower's HttpGrid: 4 x 3 s


def test_timeout_returns_the_replies_in_by_then(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(polling.time, "time", lambda: clock[0])
    monkeypatch.setattr(polling.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    fake = _SlowGrid([1, 10**6])
    replies = polling.PollingGrid(fake, interval=0.5).send_and_receive(_messages(2), timeout=2.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"] and fake.pulls == 5
