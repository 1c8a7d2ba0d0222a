"""verify: a good store passes; a flipped byte or a missing shard is named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertscale.store import StoreError, StoreWriter, open_store
from pertscale.store.verify import verify_store


@pytest.fixture
def store_path(tmp_path):
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(1.0, (400, 30)).astype(np.float32))
    var = pd.DataFrame(index=[f"g{i}" for i in range(30)])
    obs = pd.DataFrame({"c": rng.choice(["a", "b"], 400)}, index=[f"c{i}" for i in range(400)])
    with StoreWriter(tmp_path / "s", var=var, raw_counts=True, chunk_values=64,
                     shard_values=1024) as w:
        w.append(X, obs)
    return tmp_path / "s"


def test_good_store_verifies(store_path):
    report = verify_store(store_path)
    assert report.ok, report.problems
    assert report.num_shards > 10


@pytest.mark.parametrize("key", ["X/data/c/3", "X/indices/c/0", "obs/c/c/0", "stats/sum/c/0"])
def test_flipped_byte_named(store_path, key):
    shard = store_path / key
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    report = verify_store(store_path)
    array = key.rsplit("/c/", 1)[0]
    assert report.problems == [f"array {array}: shard {key} is corrupt (sha256 mismatch)"]


def test_missing_shard_named(store_path):
    (store_path / "X/data/c/2").unlink()
    assert verify_store(store_path).problems == ["array X/data: shard X/data/c/2 is missing"]


def test_corruption_also_caught_by_chunk_crc_on_read(store_path):
    shard = store_path / "X/data/c/0"
    blob = bytearray(shard.read_bytes())
    blob[10] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(StoreError, match=r"store .*: reading cells \[0, 400\).*verify"):
        open_store(store_path).read_csr(0, 400)


def test_incomplete_store_fails_verify(store_path):
    meta = (store_path / "zarr.json").read_text().replace('"complete": true', '"complete": false')
    (store_path / "zarr.json").write_text(meta)
    report = verify_store(store_path)
    assert not report.ok and "incomplete" in report.problems[0]
