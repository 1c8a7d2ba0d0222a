"""The loader reads a store from a real local S3-compatible server (moto) with identical batches.

The test starts moto's server on 127.0.0.1, uploads a store written locally, points the store
reader at it through the AWS_* environment (dummy credentials, set for this test only) and
compares every batch of 2 ranks with the batches read from the local copy.
"""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertscale.constants import CELL_INDEX, INDICES, INDPTR, OBS, VALUES
from pertscale.data.loader import CellLoader

pytestmark = pytest.mark.integration

BUCKET = "pertscale-test"
SECRET = "pertscale-dummy-secret-0123456789"
LOADER = {"batch_size": 32, "block_size": 16, "buffer_blocks": 4, "blocks_in_flight": 3,
          "seed": 7}


def write_store(path: Path, n_cells: int = 1003, n_genes: int = 40) -> Path:
    from pertscale.store import StoreWriter

    rng = np.random.default_rng(0)
    x = sp.random(n_cells, n_genes, density=0.2, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)
    obs = pd.DataFrame({"perturbation": pd.Categorical(rng.choice(["ctrl", "KLF1"], n_cells))},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame({"gene_symbol": [f"G{i}" for i in range(n_genes)]},
                       index=[f"ENSG{i:011d}" for i in range(n_genes)])
    # small shards: the server sees many objects, as a large store would
    with StoreWriter(str(path), var=var, raw_counts=True, chunk_values=512,
                     shard_values=4096) as w:
        for a in range(0, n_cells, 250):
            w.append(x[a:a + 250], obs.iloc[a:a + 250])
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
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
        yield endpoint, client
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def upload(client, root: Path, prefix: str) -> int:
    n = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(root).as_posix()}")
            n += 1
    return n


def test_s3_store_gives_identical_batches(tmp_path, s3_endpoint, monkeypatch):
    endpoint, client = s3_endpoint
    local = write_store(tmp_path / "cells.zarr")
    assert upload(client, local, "stores/cells.zarr") > 5
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    uri = f"s3://{BUCKET}/stores/cells.zarr"

    for rank in range(2):
        kw = {"rank": rank, "world_size": 2, "obs_columns": ["perturbation"], **LOADER}
        remote = CellLoader(uri, **kw)
        want = list(CellLoader(str(local), **kw))
        got = list(remote)
        assert len(got) == len(want) == remote.num_batches > 0
        for g, w in zip(got, want):
            for key in (CELL_INDEX, INDPTR, INDICES, VALUES):
                np.testing.assert_array_equal(g[key], w[key])
            np.testing.assert_array_equal(g[OBS]["perturbation"], w[OBS]["perturbation"])
        # credentials come from the environment only: never in the state, config or repr
        for text in (repr(remote), json.dumps(remote.state_dict()),
                     pickle.dumps(remote).decode("latin-1")):
            assert SECRET not in text


def test_missing_s3_store_names_the_uri(s3_endpoint, monkeypatch):
    endpoint, _ = s3_endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    uri = f"s3://{BUCKET}/stores/absent.zarr"
    with pytest.raises(ValueError, match="absent.zarr") as err:
        CellLoader(uri, batch_size=8)
    assert SECRET not in str(err.value)
