"""Every file in configs/ loads into its validated job config, and an override of an unknown key
in it is an error naming the valid keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from pertscale.config import ConfigError, load_config, load_config_dict

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def test_configs_dir_is_not_empty():
    assert CONFIGS, "configs/ holds no job config"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert type(cfg).__name__.endswith("Config")
    # the loaded config round-trips through its own dict form
    assert type(cfg).from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_rejects_an_unknown_override(path):
    data = load_config_dict(path)
    section = next((k for k, v in data.items() if isinstance(v, dict)), None)
    key = f"{section}.no_such_field" if section else "no_such_field"
    with pytest.raises(ConfigError, match="no_such_field.*valid keys"):
        load_config(path, [f"--{key}=1"])
