"""Every shipped simulations/*.toml loads through `fedcola.config.load`, the CLI's loader.

(pyproject's [tool.flwr.app.config] == DEFAULTS is asserted in tests/test_flwr_run.py.)
"""

import tomllib
from pathlib import Path

import pytest

from fedcola import config as cfg

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "simulations").glob("*.toml"))


def test_configs_are_shipped():
    """The glob below is not silently empty."""
    assert len(CONFIGS) >= 10, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path):
    """Loads with and without a --set override; the file's own values are kept."""
    config = cfg.load(path)
    assert set(config) == set(cfg.DEFAULTS)
    for key, value in cfg.flatten(tomllib.loads(path.read_text())).items():
        assert config[key] == value, key
    assert cfg.load(path, ["rounds=1", "seed=7"]) == config | {"rounds": 1, "seed": 7}
