"""The config system: typed loading, overrides, and errors that name the key and the choices."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest

from pertscale.config import (
    Config,
    ConfigError,
    apply_overrides,
    check_range,
    config_from_dict,
    flatten_dict,
    load_config,
    parse_overrides,
)


@dataclasses.dataclass
class Inner(Config):
    lr: float = 1e-3
    """learning rate"""
    stage: int = 2
    """ZeRO stage"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """dtype"""

    def __post_init__(self):
        check_range("stage", self.stage, 0, 3)


@dataclasses.dataclass
class Outer(Config):
    name: str = "x"
    inner: Inner = dataclasses.field(default_factory=Inner)
    tags: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None


def test_nested_dicts_build_typed_configs_and_round_trip():
    cfg = config_from_dict(Outer, {"name": "a", "inner": {"lr": 1, "stage": 3}, "tags": ["t"]})
    assert isinstance(cfg.inner, Inner) and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert config_from_dict(Outer, cfg.to_dict()) == cfg


def test_unknown_key_lists_valid_keys_with_section_path():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\] in section \[inner\].*'lr'"):
        config_from_dict(Outer, {"inner": {"lrr": 0.1}})


@pytest.mark.parametrize("data, message", [
    ({"inner": {"stage": 5}}, r"stage=5 is outside \[0, 3\]"),
    ({"inner": {"precision": "fp8"}}, r"inner.precision='fp8' is not one of \['fp32', 'bf16'\]"),
    ({"inner": {"stage": "two"}}, r"inner.stage='two' must be an integer"),
    ({"inner": {"stage": True}}, r"must be an integer"),
    ({"tags": "t"}, r"tags='t' must be a list"),
    ({"inner": 3}, r"inner must be a table"),
    ({"inner": {"lr": float("nan")}}, r"inner.lr=nan is not a finite number"),
    ({"inner": {"lr": float("inf")}}, r"inner.lr=inf is not a finite number"),
])
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(Outer, data)


def test_range_check_refuses_non_finite_values():
    with pytest.raises(ConfigError, match=r"x=nan is not a finite number"):
        check_range("x", float("nan"), 0.0, 1.0)


def test_overrides_parse_toml_literals_and_set_nested_keys():
    over = parse_overrides(["--inner.lr=0.5", "--name", "run1", "--tags=['a','b']",
                            "--inner.precision=bf16"])
    assert over == {"inner.lr": 0.5, "name": "run1", "tags": ["a", "b"], "inner.precision": "bf16"}
    cfg = config_from_dict(Outer, apply_overrides({"inner": {"stage": 1}}, over))
    assert cfg.inner == Inner(lr=0.5, stage=1, precision="bf16") and cfg.tags == ["a", "b"]


def test_override_errors():
    with pytest.raises(ConfigError, match="must look like --section.field=value"):
        parse_overrides(["inner.lr=1"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--inner.lr"])
    with pytest.raises(ConfigError, match="name is a value, not a section"):
        apply_overrides({"name": "x"}, {"name.sub": 1})


def test_load_config_requires_a_known_job(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('job = "nope"\n')
    with pytest.raises(ConfigError, match=r"job='nope' is not one of"):
        load_config(path)
    path.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="no top-level `job` key"):
        load_config(path)
    path.write_text("x = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_flatten_dict():
    assert flatten_dict({"a": {"b": 1, "c": {"d": "x"}}, "e": 2}) == {"a.b": 1, "a.c.d": "x", "e": 2}
