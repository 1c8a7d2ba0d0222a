"""The stage of a multi-step job (the quickstart pipeline) shown in every step's progress bar:
one display for the whole pipeline, each step keeping its own bar."""

from __future__ import annotations

import time

__all__ = ["bar_label", "elapsed", "set_stage"]

_stage: tuple[str, float] | None = None


def set_stage(name: str, started: float | None) -> None:
    """Name the running stage ("quickstart 5/14 pretrain") and when the whole job started
    (time.perf_counter()); an empty name ends it."""
    global _stage
    _stage = (name, started) if name and started is not None else None


def elapsed(started: float) -> str:
    seconds = int(time.perf_counter() - started)
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def bar_label(default: str = "") -> str:
    """A progress bar's description: the stage and the job's elapsed time while one runs."""
    if _stage is None:
        return default
    name, started = _stage
    return f"[{name} | {elapsed(started)}]"
