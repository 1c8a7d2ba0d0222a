"""Starting Ray: one place for every job that runs on the cluster (pretraining, GenePert CV)."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"

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
        if "RAY_AUTH_MODE" not in os.environ:
            # NOTE: Ray enables token authentication for a new local cluster and warns about its
            # choice in every command; said once here, at info level, instead
            logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.ERROR)
            log.info("embedded Ray cluster: Ray's default token authentication "
                     "(RAY_AUTH_MODE=disabled opts out)")
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
