"""Replies that would corrupt the global model are skipped with a logged reason."""

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedcola.fl.ledger import Ledger
from fedcola.fl.wire import nbytes
from fedcola.fl.screening import screen

METRICS = {"num-examples": 10, "train-loss": 0.5, "flops": 100, "peak-memory-bytes": 1, "wall-time-s": 0.1, "partition-id": 0}

pytestmark = pytest.mark.usefixtures("task_identity")


def _reply(node, arrays=None, metrics=METRICS, error=None):
    msg = Message(RecordDict({}), dst_node_id=node, message_type="train")
    if error:
        return Message(Error(code=1, reason=error), reply_to=msg)
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content, reply_to=msg)


def test_bad_replies_skipped_good_kept(tmp_path):
    expected = ArrayRecord({"w": torch.zeros(2, 3)})
    replies = [
        _reply(1, {"w": torch.ones(2, 3)}),
        _reply(2, {"w": torch.ones(3, 2)}),
        _reply(3, {"w": torch.ones(2, 3, dtype=torch.float16)}),
        _reply(4, {"w": torch.tensor([[float("nan"), 0, 0], [0, 0, 0]])}),
        _reply(5, {"v": torch.ones(2, 3)}),
        _reply(6, {"w": torch.ones(2, 3)}, metrics={"num-examples": 1}),
        _reply(7, error="client crashed"),
        _reply(8),
    ]
    ledger = Ledger(tmp_path / "l.json", "m", {})
    kept = screen(1, replies, expected, ledger, bytes_down=24)
    assert [m.metadata.src_node_id for m in kept] == [1]
    reasons = {s["node_id"]: s["reason"] for s in ledger._round["skipped"]}
    assert "shape (3, 2)" in reasons[2] and "dtype" in reasons[3] and "NaN" in reasons[4]
    assert "names differ" in reasons[5] and "lack" in reasons[6] and "client crashed" in reasons[7] and "no 'arrays'" in reasons[8]
    sent = nbytes(ArrayRecord({"w": torch.ones(2, 3)}))
    assert sent > 24  # the float32 payload plus its .npy header
    assert ledger._round["clients"][0]["bytes_up"] == sent and ledger._round["clients"][0]["bytes_down"] == 24
