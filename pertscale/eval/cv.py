"""Ray for fitting and evaluation: where tasks run (`RayConfig`, `ensure_ray`) and the parallel
map a fitted model's spec is handed (`ray_map`): the shared arguments are put into the object
store once, and each item runs as one Ray task (e.g. one GenePert cross-validation fold)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pertscale.cluster import start_ray
from pertscale.config import Config, check_range

__all__ = ["RayConfig", "ensure_ray", "ray_map"]


@dataclasses.dataclass
class RayConfig(Config):
    """Where Ray tasks run."""

    address: str = ""  # a running cluster ("auto", "ray://host:10001"); "" = embedded local cluster
    num_cpus: int = 2  # CPUs of the embedded local cluster

    def __post_init__(self) -> None:
        check_range("num_cpus", self.num_cpus, 1)


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to `cfg.address`, or start the embedded local cluster; reuse a running session."""
    start_ray(cfg.address, num_cpus=cfg.num_cpus, log_to_driver=False)


def ray_map(fn: Callable[..., Any], shared: tuple, items: list[tuple]) -> list[Any]:
    """[fn(*shared, *item) for item in items], one Ray task per item (Ray must be initialised);
    `shared` goes into the object store once."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    refs = [ray.put(arg) for arg in shared]
    return ray.get([task.remote(*refs, *item) for item in items])
