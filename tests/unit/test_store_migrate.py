"""`pertscale migrate`: a v1 store becomes v2 in place, X's bytes reused, nothing lost on failure."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from pertscale.store import StoreError, open_store
from pertscale.store.collection import write_collection
from pertscale.store.migrate import migrate
from pertscale.store.verify import verify_store

V1_STORE = Path(__file__).parents[1] / "data" / "store_v1"  # written by pertscale at b1f037a


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def contents(store) -> dict:
    return {"obs": store.obs, "var": store.var, "x": store.read_csr(0, store.n_cells),
            "stats": store.read_stats()}


def assert_same_cells(a: dict, b: dict):
    pd.testing.assert_frame_equal(a["obs"], b["obs"])
    pd.testing.assert_frame_equal(a["var"], b["var"])
    assert (a["x"] != b["x"]).nnz == 0
    for name, values in a["stats"].items():
        np.testing.assert_array_equal(values, b["stats"][name])


def test_v1_to_v2_keeps_every_value_and_the_bytes_of_x(tmp_path):
    path = tmp_path / "s"
    shutil.copytree(V1_STORE, path)
    v1 = open_store(path)
    old = contents(v1)
    x_files = {e["key"]: sha(path / e["key"]) for a in ("X/indptr", "X/indices", "X/data")
               for e in v1.attrs["manifest"][a]}
    said = f"{path}: format v1 -> v2 (X linked, not recompressed; tables rewritten)"
    assert migrate(path) == [said]
    v2 = open_store(path)
    assert v2.format_version == 2
    assert_same_cells(old, contents(v2))
    assert {key: sha(path / key) for key in x_files} == x_files  # not recompressed
    assert verify_store(path).ok
    assert v2.attrs["source"]["migrated_from"] == {
        "format_version": 1, "fingerprint": v1.attrs["fingerprint"], "tool": "pertscale 0.1.0"}
    assert v2.fingerprint != v1.fingerprint
    adata = ad.read_zarr(path)
    pd.testing.assert_frame_equal(adata.obs, v2.obs, check_index_type=False)
    assert (adata.X != v2.read_csr(0, v2.n_cells)).nnz == 0
    assert migrate(path) == [f"{path}: already format v2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no staging folder left


def test_an_interrupted_migration_leaves_the_v1_store_as_it_was(tmp_path, monkeypatch):
    import pertscale.store.migrate as mod

    path = tmp_path / "s"
    shutil.copytree(V1_STORE, path)
    before = {p.relative_to(path): sha(p) for p in path.rglob("*") if p.is_file()}
    calls = []

    def interrupted(self, obs):
        calls.append(len(obs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, obs)

    original = mod._Migration._append_obs
    monkeypatch.setattr(mod, "OBS_BLOCK_ROWS", 128)
    monkeypatch.setattr(mod._Migration, "_append_obs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        migrate(path)
    assert {p.relative_to(path): sha(p) for p in path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert open_store(path).format_version == 1 and verify_store(path).ok


def test_a_collection_migrates_member_by_member(tmp_path):
    coll = tmp_path / "c"
    names = ["members/000-a", "members/001-b"]
    for name in names:
        shutil.copytree(V1_STORE, coll / name)
    write_collection(str(coll), names)
    before = open_store(coll)
    obs, x = before.obs, before.read_csr(0, before.n_cells)
    lines = migrate(coll)
    assert len(lines) == 2 and all("v1 -> v2" in line for line in lines)
    after = open_store(coll)
    assert [m.format_version for m in after.members] == [2, 2]
    pd.testing.assert_frame_equal(after.obs, obs)
    assert (after.read_csr(0, after.n_cells) != x).nnz == 0
    assert after.attrs["fingerprint"] != before.attrs["fingerprint"]


def test_remote_stores_are_refused_naming_the_uri():
    with pytest.raises(StoreError, match="s3://bucket/s: migrate rewrites local stores"):
        migrate("s3://bucket/s")
