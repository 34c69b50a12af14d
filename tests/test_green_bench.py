"""The GreenTrainer benchmark trains every tuned arm at the best peak lr of its stored grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.green_bench import BENCHES, DEFAULT_MODEL, RHO

DOCS = Path(__file__).resolve().parents[1] / "docs" / "green"


@pytest.mark.parametrize("model", sorted(BENCHES))
def test_benchmark_lrs_are_the_stored_grid_best(model: str) -> None:
    bench = BENCHES[model]
    stored = json.loads((DOCS / ("" if model == DEFAULT_MODEL else model) / "lr_grid.json").read_text())
    assert {r["model"] for r in stored["grid"]} == {model}
    for arm, lrs in bench.grid.items():
        assert {r["lr"] for r in stored["grid"] if r["arm"] == arm} == set(lrs), arm
        assert stored["best"][arm] == bench.lrs[arm], arm
    assert {a.name for a in bench.arms()} <= set(RHO)
