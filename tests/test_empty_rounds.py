"""A round in which no client reply was accepted is a failure, not a success: the run ends with the
round's skip reasons (ledger status "failed"); with ``allow_empty_rounds`` it goes on, with a loud
warning and the round's ledger status ``no-reply-accepted``."""

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, RecordDict

from fedcola import config as cfg
from fedcola.fl.ledger import Ledger
from fedcola.fl.screening import NoReplyAccepted
from strategies import FedAvgLoRA
from tests import helpers

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")


class _NaNGrid(helpers.ColaLoopGrid):
    """Every client answers, but every train reply carries NaN auxiliary models."""

    def answer(self, msg):
        reply = super().answer(msg)
        if msg.metadata.message_type == "train.cola" and not reply.has_error():
            adapter = {k: torch.full_like(v, float("nan")) for k, v in reply.content.array_records["adapter"].to_torch_state_dict().items()}
            reply.content.array_records["adapter"] = ArrayRecord(adapter)
        return reply


def test_cola_round_without_an_accepted_reply_fails_with_the_reasons(cola_config, tmp_path):
    config = cfg.build({**cola_config, "local-steps": 2})
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy = helpers.cola_strategy(config, ledger)
    with pytest.raises(NoReplyAccepted, match="round 1: no client reply was accepted.*NaN"):
        strategy.start(grid=_NaNGrid([1, 2], config), num_rounds=2, timeout=10)
    ledger.finish("failed")  # as fedcola's ServerApp does: the open round is kept, with its reasons
    assert ledger.data["status"] == "failed" and [r["round"] for r in ledger.rounds] == [1]
    assert len(ledger.rounds[0]["skipped"]) == 4 and all("NaN" in s["reason"] for s in ledger.rounds[0]["skipped"])


def test_cola_may_continue_through_empty_rounds_when_allowed(cola_config, tmp_path, caplog):
    config = cfg.build({**cola_config, "local-steps": 1, "allow-empty-rounds": True})
    ledger = Ledger(tmp_path / "l.json", "cola", config)
    strategy = helpers.cola_strategy(config, ledger)
    result = strategy.start(grid=_NaNGrid([1, 2], config), num_rounds=2, timeout=10)
    ledger.finish("completed")
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert all(torch.equal(a.B, torch.zeros_like(a.B)) for ads in strategy.book.adapters.values() for a in ads.values())  # nothing taken
    assert [r["server"].get("status") for r in ledger.rounds] == ["no-reply-accepted", "no-reply-accepted"]
    assert "NO CLIENT REPLY WAS ACCEPTED" in caplog.text


def _error_reply(node: int) -> Message:
    return Message(Error(code=1, reason="client crashed"), reply_to=Message(RecordDict({}), dst_node_id=node, message_type="train"))


@pytest.mark.parametrize("allowed", [False, True])
def test_fedavg_lora_round_without_an_accepted_reply(allowed, tmp_path):
    ledger = Ledger(tmp_path / "l.json", "fedavg_lora", {})
    strategy = FedAvgLoRA(allow_empty_rounds=allowed, ledger=ledger)
    strategy._sent = ArrayRecord({"w": torch.zeros(2)})
    strategy.skips.begin_round(1)
    if not allowed:
        with pytest.raises(NoReplyAccepted, match="client crashed"):
            strategy.aggregate_train(1, [_error_reply(1), _error_reply(2)])
    else:
        assert strategy.aggregate_train(1, [_error_reply(1), _error_reply(2)]) == (None, None)
        assert ledger._round["server"]["status"] == "no-reply-accepted"


@pytest.mark.parametrize("allowed", [False, True])
def test_lte_round_without_an_accepted_reply(allowed, tmp_path):
    from tests.test_lte_flower import FAST

    ledger = Ledger(tmp_path / "l.json", "lte", FAST)
    strategy = helpers.lte_strategy(FAST, ledger, allow_empty_rounds=allowed)
    W = {k: v.clone() for k, v in strategy.W.items()}
    replies = [_error_reply(n) for n in (10, 11)]
    if not allowed:
        with pytest.raises(NoReplyAccepted, match="client crashed"):
            strategy.aggregate_train(1, replies)
    else:
        assert strategy.aggregate_train(1, replies) == (None, None)
    assert all(torch.equal(strategy.W[k], W[k]) for k in W) and strategy.version == 0
