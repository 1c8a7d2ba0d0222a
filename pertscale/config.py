"""Job configs: typed dataclass trees loaded from TOML files with `--section.field=value` overrides.

Each configurable component keeps its config dataclass next to it (a subclass of `Config`);
a job config composes them as sections. A config file names its job kind with a top-level
`job = "..."` key; `JOBS` maps that name to the job config class (an explicit table, imported
lazily so a lower layer never imports a higher one).

Rules enforced here for every config:
- an unknown key is an error listing the valid keys (with the dotted path of the section);
- a value of the wrong type is an error naming the field, the value and the expected type;
- `__post_init__` of each dataclass validates ranges/choices via `check_choice` / `check_range`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

__all__ = [
    "JOBS",
    "Config",
    "ConfigError",
    "apply_overrides",
    "check_choice",
    "check_range",
    "config_from_dict",
    "flatten_dict",
    "load_config",
    "parse_overrides",
]

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config file, override or value that cannot be used; the message names the field."""


def check_choice(field: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{field}={value!r} is not one of {choices}")


def env_seconds(name: str, default: float) -> float:
    """A time limit in seconds from the environment variable `name` (default when unset)."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}={raw!r} must be a number of seconds > 0")
    return value


def check_range(field: str, value: float, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False, hi_open: bool = False) -> None:
    """`value` within the bounds (open or closed; None = unbounded); NaN and +-inf are refused
    (every comparison with NaN is False, so NaN would pass any range)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{field}={value!r} is not a finite number")
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(f"{field}={value!r} is outside {lb}{lo}, {hi}{rb}")


@dataclasses.dataclass
class Config:
    """Base for every config dataclass: plain values only, validated on construction."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, path: str = "") -> typing.Self:
        return config_from_dict(cls, data, path=path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> typing.Self:
        return config_from_dict(type(self), {**self.to_dict(), **changes})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, field)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{field}={value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        check_choice(field, value, get_args(tp))
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field}={value!r} must be a list")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field}={value!r} must be a table")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field} must be a table of {tp.__name__} fields, got {value!r}")
        # NOTE: a section whose class depends on its content (the [model] section: its `name`
        # picks the model's config class) says so with a `variant(table) -> class` classmethod.
        variant = getattr(tp, "variant", None)
        return config_from_dict(variant(value) if variant else tp, value, path=field)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field}={value!r} must be a number")
        if not math.isfinite(value):  # NaN passes every comparison, so every range check
            raise ConfigError(f"{field}={value!r} is not a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{field}={value!r} must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{field}={value!r} must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field}={value!r} must be a string")
        return value
    return value


def config_from_dict(cls: type[C], data: dict[str, Any], *, path: str = "") -> C:
    """Build the dataclass `cls` from a plain dict, recursing into nested config sections."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section [{path}]" if path else cls.__name__
        raise ConfigError(
            f"unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        dotted = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(value, hints[name], dotted)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if path and not str(e).startswith(path):
            raise ConfigError(f"{path}.{e}") from None
        raise
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


# --- job table ----------------------------------------------------------------------------------
# job name -> "module:Class". Imported lazily: config.py sits above every layer.
JOBS: dict[str, str] = {
    "quickstart": "pertscale.pipeline:QuickstartConfig",
    "simulate": "pertscale.data.synthetic:SimulatorConfig",
    "pretrain": "pertscale.training.config:PretrainJobConfig",
    "finetune": "pertscale.training.config:FinetuneJobConfig",
    "fit": "pertscale.eval.config:FitJobConfig",
    "evaluate": "pertscale.eval.config:EvaluateJobConfig",
}


def job_class(job: str) -> type[Config]:
    if job not in JOBS:
        raise ConfigError(f"job={job!r} is not one of {sorted(JOBS)}")
    module, name = JOBS[job].split(":")
    return getattr(importlib.import_module(module), name)


def parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal (numbers, booleans, lists, quoted strings);
    anything that is not valid TOML is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: typing.Sequence[str]) -> dict[str, Any]:
    """`["--data.batch_size=64", "--model.flavor", "debug"]` -> {"data.batch_size": 64, ...}."""
    out: dict[str, Any] = {}
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r} must look like --section.field=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            value = args[i + 1]
            i += 1
        if not key:
            raise ConfigError(f"override {arg!r} has no key")
        out[key] = parse_value(value)
        i += 1
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (copying the tables it touches). Unknown keys are left
    for `config_from_dict` to reject, so the error lists the valid keys of that section."""
    data = dict(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {part} is a value, not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def load_config_dict(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def load_config(path: str | Path, overrides: typing.Sequence[str] | dict[str, Any] = (),
                *, job: str | None = None) -> Config:
    """Load a job config file, apply overrides and validate. `job`, when given, must match
    the file's own `job` key."""
    data = load_config_dict(path)
    if isinstance(overrides, dict):
        over = overrides
    else:
        over = parse_overrides(overrides)
    data = apply_overrides(data, over)
    file_job = data.pop("job", None)
    if file_job is None:
        raise ConfigError(f"config file {path} has no top-level `job` key; one of {sorted(JOBS)}")
    if job is not None and file_job != job:
        raise ConfigError(f"config file {path} is for job {file_job!r}, not {job!r}")
    try:
        return config_from_dict(job_class(file_job), data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def flatten_dict(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; for logging configs as flat parameters."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_dict(value, f"{name}."))
        else:
            out[name] = value
    return out
