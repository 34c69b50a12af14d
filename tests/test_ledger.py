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


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_summary_table_fits_80_columns_with_whole_headers(tmp_path, task):
    """`fedcola run` / `show` print it: at 80 columns no header is cut, every value shows."""
    from rich.console import Console

    from fedcola import report

    led = L.Ledger(tmp_path / "ledger.json", "cola", {"task": task})
    led.begin_round(1)
    led.client(1, _client(1) | {"bytes_up": 157 * 2**20, "bytes_down": 999 * 2**20, "flops": 9999 * 10**9})
    led.server(1, loss=0.5086, accuracy=0.7598, perplexity=123.45)
    led.end_round(1)
    led.finish("completed")
    console = Console(width=80, record=True, file=open(tmp_path / "out.txt", "w"))
    console.print(report.summary_table(L.load(tmp_path / "ledger.json")))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    metric = "accuracy" if task == "classification" else "perplexity"
    for word in ("round", metric, "loss", "clients", "skipped", "MiB", "up", "down", "GFLOPs", "wall", "157.00", "999.00", "9999.0"):
        assert word in text, word
