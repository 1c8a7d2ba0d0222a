"""The loader reads a store from a real local S3-compatible server (moto) with identical batches.

The test starts moto's server on 127.0.0.1, uploads a store written locally, points the store
reader at it through the AWS_* environment (dummy credentials, set for this test only) and
compares every batch of 2 ranks with the batches read from the local copy.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertscale.constants import CELL_INDEX, INDICES, INDPTR, OBS, VALUES
from pertscale.data.loader import CellLoader

pytestmark = pytest.mark.integration


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


def upload(client, bucket: str, root: Path, prefix: str) -> int:
    n = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")
            n += 1
    return n


def test_s3_store_gives_identical_batches(tmp_path, s3_endpoint, monkeypatch):
    local = write_store(tmp_path / "cells.zarr")
    assert upload(s3_endpoint.client, s3_endpoint.bucket, local, "stores/cells.zarr") > 5
    for name, value in s3_endpoint.env.items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{s3_endpoint.bucket}/stores/cells.zarr"
    secret = s3_endpoint.secret

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
            assert secret not in text


def test_missing_s3_store_names_the_uri(s3_endpoint, monkeypatch):
    for name, value in s3_endpoint.env.items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{s3_endpoint.bucket}/stores/absent.zarr"
    with pytest.raises(ValueError, match="absent.zarr") as err:
        CellLoader(uri, batch_size=8)
    assert s3_endpoint.secret not in str(err.value)
