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


@pytest.mark.parametrize("key", ["X/data/c/3", "X/indices/c/0", "obs/c/codes/c/0",
                                 "obs/c/categories/c/0", "obs/_index/c/0",
                                 "uns/pertscale_stats/sum/c/0"])
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


def test_the_metadata_level_finds_missing_and_resized_shards_without_reading_them(store_path):
    """What a training job checks by default: fast, it names a missing or truncated shard and
    an edited document; a flipped byte is left to the full check (and to the chunk crc32c)."""
    clean = verify_store(store_path, "metadata")
    assert clean.ok and clean.num_shards == verify_store(store_path).num_shards
    shard = store_path / "X/indices/c/1"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    assert verify_store(store_path, "metadata").ok
    assert not verify_store(store_path, "full").ok
    (store_path / "X/data/c/2").unlink()
    (store_path / "X/data/c/3").write_bytes(b"short")
    size = open_store_attrs(store_path)["manifest"]["X/data"][3]["size"]
    assert verify_store(store_path, "metadata").problems == [
        "array X/data: shard X/data/c/2 is missing",
        f"array X/data: shard X/data/c/3 has 5 bytes, expected {size}"]
    with pytest.raises(ValueError, match="verify level 'quick' is not one of"):
        verify_store(store_path, "quick")


def open_store_attrs(path):
    from pertscale.store.reader import read_store_attrs
    return read_store_attrs(str(path))


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


def test_deleted_shard_makes_reads_raise_naming_it(store_path):
    """A committed store has every chunk: a missing one is an error, never zeros."""
    (store_path / "X/data/c/2").unlink()
    store = open_store(store_path)
    with pytest.raises(StoreError, match=r"reading cells \[0, 400\).*X/data/c/2.*missing"):
        store.read_csr(0, 400)
    (store_path / "obs/_index/c/0").unlink()
    with pytest.raises(StoreError, match=r"cannot read array obs/_index: chunk obs/_index/c/0 "
                                         r"is missing"):
        _ = open_store(store_path).obs
    (store_path / "obs/c/codes/c/0").unlink()
    with pytest.raises(StoreError, match=r"cannot read array obs/c/codes"):
        _ = open_store(store_path).read_obs(["c"], index=False)


def test_a_flipped_byte_in_a_string_chunk_fails_its_read(store_path):
    """AnnData string arrays (ids, categories) carry crc32c like every other chunk."""
    chunk = store_path / "obs/c/categories/c/0"
    blob = bytearray(chunk.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    chunk.write_bytes(bytes(blob))
    with pytest.raises(StoreError, match=r"obs/c/categories/c/0: checksum mismatch"):
        _ = open_store(store_path).obs


def test_edited_obs_metadata_changes_fingerprint_and_fails_verify(store_path):
    """An edited document (here: a categorical made ordered, which changes what is read)
    changes the fingerprint and is named by verify."""
    before = open_store(store_path).fingerprint
    doc = store_path / "obs/c/zarr.json"
    text = doc.read_text()
    assert '"ordered": false' in text
    doc.write_text(text.replace('"ordered": false', '"ordered": true'))
    store = open_store(store_path)
    assert store.obs["c"].cat.ordered
    assert store.fingerprint != before
    assert verify_store(store_path).problems == [
        "metadata document obs/c/zarr.json was changed after the commit (sha256 mismatch)"]


def test_renamed_categories_fail_verify(store_path):
    """Categories are data in format v2 (AnnData's categorical: a string array): renaming
    them, even with valid chunk checksums, is a content change that verify names."""
    from pertscale.store.format import encode_string_chunk

    chunk = store_path / "obs/c/categories/c/0"
    chunk.write_bytes(encode_string_chunk(np.array(["z", "b"], object), 2, 1))
    assert set(open_store(store_path).obs["c"].cat.categories) == {"z", "b"}
    assert verify_store(store_path).problems == [
        "array obs/c/categories: shard obs/c/categories/c/0 is corrupt (sha256 mismatch)"]


def test_edited_root_attribute_fails_verify(store_path):
    doc = store_path / "zarr.json"
    text = doc.read_text()
    assert '"raw_counts": true' in text
    doc.write_text(text.replace('"raw_counts": true', '"raw_counts": false'))
    assert verify_store(store_path).problems == [
        "root attributes (zarr.json) were changed after the commit (fingerprint mismatch)"]


def test_fingerprint_is_content_not_provenance(tmp_path):
    """The same cells written twice (other source label, other folder) share a fingerprint."""
    X = sp.csr_matrix(np.eye(6, 4, dtype=np.float32))
    var = pd.DataFrame(index=[f"g{i}" for i in range(4)])
    obs = pd.DataFrame({"c": list("aabbcc")}, index=[f"c{i}" for i in range(6)])
    prints = []
    for name in ("one", "two"):
        with StoreWriter(tmp_path / name, var=var, raw_counts=True, source={"file": name}) as w:
            w.append(X, obs)
        prints.append(open_store(tmp_path / name).fingerprint)
        assert verify_store(tmp_path / name).ok
    assert prints[0] == prints[1]
