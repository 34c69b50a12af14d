import json

import pytest
from fedcola.fl import ledger as L


def _client(node):
    return {"node_id": node, "partition_id": node, "num_examples": 10, "loss": 0.5, "bytes_up": 100, "bytes_down": 200,
            "flops": 10**12, "peak_memory_bytes": 2**30, "wall_time_s": 1.5}


def test_round_trip(tmp_path):
    led = L.Ledger(tmp_path / "ledger.json", "fedavg_lora", {"lr": 0.1, "rounds": 2})
    for rnd in (1, 2):
        led.begin_round(rnd)
        led.client(rnd, _client(1))
        led.skipped(rnd, 2, "array 'x' has NaN or Inf values")
        led.server(rnd, loss=0.4, accuracy=0.8)
        led.end_round(rnd)
    led.finish("completed", accuracy=0.8)
    back = L.load(tmp_path / "ledger.json")
    assert back["config"] == {"lr": 0.1, "rounds": 2} and back["status"] == "completed"
    assert [r["round"] for r in back["rounds"]] == [1, 2]
    assert back["rounds"][1]["clients"][0] == _client(1)
    assert back["rounds"][0]["skipped"] == [{"node_id": 2, "reason": "array 'x' has NaN or Inf values"}]
    assert back["rounds"][0]["server"]["accuracy"] == 0.8 and back["rounds"][0]["wall_time_s"] >= 0


def test_every_round_is_on_disk_before_the_run_ends(tmp_path):
    led = L.Ledger(tmp_path / "ledger.json", "m", {})
    led.begin_round(1)
    led.end_round(1)
    assert json.loads((tmp_path / "ledger.json").read_text())["rounds"][0]["round"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(schema="x"), "not a fedcola ledger"),
    (lambda d: d.pop("rounds"), "lacks 'rounds'"),
    (lambda d: d["rounds"][0]["clients"][0].pop("flops"), "lacks flops"),
    (lambda d: d["rounds"][0].pop("skipped"), "lacks skipped"),
])
def test_schema_violations(tmp_path, mutate, msg):
    led = L.Ledger(tmp_path / "l.json", "m", {})
    led.client(1, _client(0))
    led.end_round(1)
    data = json.loads(json.dumps(led.data))
    mutate(data)
    with pytest.raises(L.LedgerError, match=msg):
        L.validate(data)
