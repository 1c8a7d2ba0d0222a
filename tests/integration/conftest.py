"""Fixtures of the integration tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

BUCKET = "pertscale-test"
SECRET = "pertscale-dummy-secret-0123456789"


@pytest.fixture(scope="module")
def ray_session():
    """An embedded 2-CPU Ray cluster for one test module, with the workers' environment."""
    import ray

    from pertscale.training.trainer import worker_env

    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": worker_env(use_gpu=False, torch_threads=1)})
    yield
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """free_port() -> a port nothing listens on at 127.0.0.1 (now)."""
    return _free_port


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def start_server():
    """start_server(args, url, what, env=None) -> the process of a server (moto, mlflow, a Ray
    head), once `url` answers HTTP (within 90 s); every one is stopped after the module."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str], url: str, what: str,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                return proc
            except urllib.error.HTTPError:  # an answer, if not a 200
                return proc
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{what} did not start on {url}") from None
                time.sleep(0.3)

    yield start
    for proc in reversed(procs):
        _stop(proc)


@pytest.fixture(scope="session")
def write_sim_store():
    """write_sim_store(path, **SimulatorConfig fields) -> URI of a simulated raw-count store."""

    def write(path, **fields) -> str:
        from pertscale.data.synthetic import SimulatorConfig, build_ground_truth, simulate_blocks
        from pertscale.store import StoreWriter

        cfg = SimulatorConfig(**{"n_genes": 120, "n_cells": 1200, "n_single_perturbations": 8,
                                 "n_double_perturbations": 2, "seed": 3, **fields})
        truth = build_ground_truth(cfg)
        with StoreWriter(str(path), var=truth.var(), raw_counts=True,
                         source={"file": "simulated", "sha256": "-"}) as w:
            for x, obs in simulate_blocks(cfg, 600, truth=truth):
                w.append(x, obs)
        return str(path)

    return write


@pytest.fixture(scope="module")
def s3_endpoint(start_server):
    """A real local S3-compatible server (moto) with one bucket: its endpoint, a boto3 client,
    the bucket, the dummy secret and the AWS_* environment that points pertscale at it."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    endpoint = f"http://127.0.0.1:{_free_port()}"
    start_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                  endpoint.rsplit(":", 1)[1]], endpoint, "moto server")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key=SECRET)
    client.create_bucket(Bucket=BUCKET)
    # what points pertscale (tensorstore, pyarrow) at the server, with dummy credentials
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET}
    return SimpleNamespace(endpoint=endpoint, client=client, bucket=BUCKET, secret=SECRET,
                           env=env)
