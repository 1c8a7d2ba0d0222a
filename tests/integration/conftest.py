"""Fixtures of the integration tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real local S3-compatible server (moto) with one bucket: its endpoint, a boto3 client,
    the bucket, the dummy secret and the AWS_* environment that points pertscale at it."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}")
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key=SECRET)
        client.create_bucket(Bucket=BUCKET)
        # what points pertscale (tensorstore, pyarrow) at the server, with dummy credentials
        env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET}
        yield SimpleNamespace(endpoint=endpoint, client=client, bucket=BUCKET, secret=SECRET,
                              env=env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
