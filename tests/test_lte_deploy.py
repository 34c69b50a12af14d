"""Synchronous LTE on Flower's Deployment Engine when a SuperNode disappears for good: a SuperLink and
3 SuperNodes as real processes on loopback (``fedcola.loopback``); one SuperNode is SIGKILLed after
the first round and never restarted. The run must not wait for it forever: the reply that never
comes is dropped when the round times out (``round-timeout``), and once the SuperLink has
declared the node offline each round waits ``lte.node-wait-s`` for it, then goes on with the two
nodes that are still connected (both logged and in the ledger)."""

import json
import time
from pathlib import Path

import pytest

from fedcola import loopback
from fedcola.fl import ledger
from tests.test_deploy import ROOT, _stopped, run_config
from tests.test_deploy import pytestmark as deploy_mark

pytestmark = [deploy_mark, pytest.mark.slow]  # ~60 s until the SuperLink declares a killed node offline (2 missed heartbeats)


@pytest.fixture()
def fed(tmp_path):
    fed = loopback.Loopback(tmp_path / "fed").start()
    try:
        for i in range(3):
            fed.add_node(f"node{i}", {"partition-id": i, "num-partitions": 3})
        yield fed
    finally:
        _stopped(fed)


def _rounds(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["rounds"]
    except (FileNotFoundError, ValueError):
        return []


def test_sync_lte_goes_on_with_the_nodes_that_answer_when_one_never_returns(fed, tiny_assets, tmp_path):
    out = tmp_path / "lte"
    run_id = fed.submit(ROOT, run_config(tiny_assets, "lte", out, 3, rounds=6, local_steps=2, **{"lte.node-wait-s": 2.0, "round-timeout": 60.0}))
    deadline = time.time() + 600
    while not (files := list(out.rglob("ledger.json"))) or len(_rounds(files[0])) < 2:  # round 0 (evaluation) and round 1 done
        assert time.time() < deadline and not fed.status(run_id).startswith(loopback.FINISHED), fed.log("superlink")[-3000:]
        time.sleep(0.5)
    fed.kill("node2")
    assert fed.wait(run_id) == "finished:completed", fed.log("superlink")[-3000:]
    result = ledger.load(files[0])
    assert result["status"] == "completed" and [r["round"] for r in result["rounds"]] == list(range(7))
    assert sorted(c["partition_id"] for c in result["rounds"][1]["clients"]) == [0, 1, 2]
    skipped = [s for r in result["rounds"][2:] for s in r.get("skipped", [])]
    assert skipped and all(s["reason"] == "no reply within the round timeout; dropped" or "unavailable" in s["reason"].lower() for s in skipped), skipped
    last = result["rounds"][-1]
    assert sorted(c["partition_id"] for c in last["clients"]) == [0, 1] and not last.get("skipped")  # the dead node is no longer sampled
    assert last["server"]["nodes_connected"] == 2  # logged: "2 of 3 nodes connected after 2 s; going on with them"
