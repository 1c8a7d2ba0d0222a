"""Starting Ray: one place for every job that runs on the cluster (pretraining, GenePert CV)."""

from __future__ import annotations

from typing import Any

__all__ = ["start_ray"]


def start_ray(address: str | None, *, num_cpus: int | None, env_vars: dict[str, str] | None = None,
              log_to_driver: bool = True) -> None:
    """Connect to the running cluster at `address` ("auto", "HOST:6379", "ray://HOST:10001"), or
    start an embedded local cluster with `num_cpus` CPUs. A Ray session already open in this
    process (tests, notebooks, a pipeline's earlier step) is reused as is."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": log_to_driver}
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
