"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_session():
    """An embedded 2-CPU Ray cluster for one test module, with the workers' environment."""
    import ray

    from pertscale.training.trainer import worker_env

    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": worker_env(use_gpu=False, torch_threads=1)})
    yield
    ray.shutdown()
