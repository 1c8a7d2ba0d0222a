"""StoreWriter + open_store: round trip, metadata tables, validation, atomic commit."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertscale.store import CellStore, GeneVocab, StoreError, StoreWriter, open_store

TINY = {"chunk_values": 64, "shard_values": 256}  # many shards from little data


def make_counts(n_cells: int, n_genes: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    mu = rng.gamma(0.6, 2.0, n_genes)
    lib = rng.lognormal(0.0, 0.5, n_cells)
    return sp.csr_matrix(rng.poisson(np.outer(lib, mu)).astype(np.float32))


def make_obs(n_cells: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "perturbation": pd.Categorical(rng.choice(["ctrl", "KLF1", "CEBPA+KLF1"], n_cells),
                                       categories=["ctrl", "KLF1", "CEBPA+KLF1"]),
        "batch": rng.choice(["b1", "b2"], n_cells),  # plain strings -> categorical
        "dose": rng.random(n_cells),
        "guide_count": rng.integers(0, 5, n_cells),
        "is_control": rng.random(n_cells) < 0.3,
    }, index=[f"cell{i}" for i in range(n_cells)])


def make_var(n_genes: int) -> pd.DataFrame:
    return pd.DataFrame({"gene_symbol": [f"SYM{i}" for i in range(n_genes)],
                         "chrom": ["chr1", "chr2"] * (n_genes // 2) + ["chrX"] * (n_genes % 2)},
                        index=[f"ENSG{i:011d}" for i in range(n_genes)])


def write(path, X, obs=None, var=None, block=97, raw_counts=True, **kw):
    var = make_var(X.shape[1]) if var is None else var
    with StoreWriter(path, var=var, raw_counts=raw_counts, source={"file": "mem.h5ad"},
                     **{**TINY, **kw}) as w:
        for a in range(0, X.shape[0], block):
            w.append(X[a:a + block], None if obs is None else obs.iloc[a:a + block])
    return open_store(path)


def test_round_trip_values_obs_var(tmp_path):
    X, obs = make_counts(500, 40), make_obs(500)
    store = write(tmp_path / "s", X, obs)
    assert isinstance(store, CellStore)
    assert (store.n_cells, store.n_genes, store.nnz) == (500, 40, X.nnz)
    assert store.raw_counts and store.attrs["complete"]
    got = store.read_csr(0, 500)
    assert got.dtype == np.float32 and got.shape == (500, 40)
    assert (got != X).nnz == 0
    for a, b in [(0, 1), (13, 250), (499, 500), (200, 200)]:
        assert (store.read_csr(a, b) != X[a:b]).nnz == 0
    assert list(store.obs.index) == list(obs.index)
    assert store.obs["perturbation"].cat.categories.tolist() == ["ctrl", "KLF1", "CEBPA+KLF1"]
    assert (store.obs["perturbation"] == obs["perturbation"]).all()
    assert isinstance(store.obs["batch"].dtype, pd.CategoricalDtype)
    assert (store.obs["batch"].astype(str) == obs["batch"]).all()
    np.testing.assert_array_equal(store.obs["dose"], obs["dose"])
    np.testing.assert_array_equal(store.obs["guide_count"], obs["guide_count"])
    assert store.obs["is_control"].dtype == bool
    np.testing.assert_array_equal(store.obs["n_counts"], np.asarray(X.sum(1)).ravel())
    pd.testing.assert_frame_equal(store.var, make_var(40), check_index_type=False)
    np.testing.assert_array_equal(store.read_indptr(0, store.n_cells), X.indptr)
    np.testing.assert_array_equal(store.read_indptr(100, 150), X.indptr[100:151])
    assert len(store.attrs["manifest"]["X/data"]) == -(-X.nnz // 256)  # many shards


def test_gene_stats_and_vocab(tmp_path):
    X = make_counts(300, 30, seed=1)
    store = write(tmp_path / "s", X)
    st = store.gene_stats()
    np.testing.assert_allclose(st["sum"], np.asarray(X.sum(0)).ravel())
    np.testing.assert_allclose(st["sum_sq"], np.asarray(X.multiply(X).sum(0)).ravel())
    np.testing.assert_array_equal(st["nnz"], X.getnnz(0))
    assert store.vocab == GeneVocab(store.var.index)
    assert store.vocab.token_id(store.var.index[5]) == 5 + 3


def test_async_reads_overlap_and_match(tmp_path):
    X = make_counts(400, 25, seed=2)
    store = write(tmp_path / "s", X)
    futures = [store.read_csr_async(a, a + 37) for a in range(0, 360, 37)]
    for a, f in zip(range(0, 360, 37), futures):
        assert (f.result() != X[a:a + 37]).nnz == 0


def test_read_range_checked(tmp_path):
    store = write(tmp_path / "s", make_counts(50, 10))
    with pytest.raises(ValueError, match=r"\[40, 51\)"):
        store.read_csr(40, 51)
    with pytest.raises(ValueError):
        store.read_csr(5, 4)


def test_explicit_zeros_dropped_unsorted_indices_sorted(tmp_path):
    data = np.array([3.0, 0.0, 1.0, 2.0], np.float32)
    indices = np.array([4, 1, 0, 2])
    X = sp.csr_matrix((data, indices, np.array([0, 3, 4])), shape=(2, 6))
    store = write(tmp_path / "s", X)
    got = store.read_csr(0, 2)
    assert got.nnz == 3 and got.has_sorted_indices
    np.testing.assert_array_equal(got.toarray(), X.toarray())


def test_dense_blocks_and_normalised_values(tmp_path, caplog):
    rng = np.random.default_rng(3)
    dense = np.log1p(rng.poisson(1.0, (60, 12))).astype(np.float32)
    dense[:30] = np.round(dense[:30])  # a first block of integers says nothing yet
    with StoreWriter(tmp_path / "s", var=make_var(12), raw_counts=False, **TINY) as w:
        w.append(dense[:30])
        w.append(dense[30:])
    store = open_store(tmp_path / "s")
    assert not store.raw_counts
    np.testing.assert_array_equal(store.read_csr(0, 60).toarray(), dense)
    assert "look like raw counts" not in caplog.text


@pytest.mark.parametrize("bad,what", [(np.nan, "nan"), (-1.0, "-1.0"), (2.5, "2.5")])
def test_raw_count_validation_names_row_gene_value(tmp_path, bad, what):
    X = make_counts(20, 8).tolil()
    X[13, 6] = bad
    with pytest.raises(ValueError, match=rf"mem\.h5ad.*cell row 13, gene 'ENSG00000000006'.*{what}"):
        write(tmp_path / "s", X.tocsr(), block=10)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "s")


def test_nan_rejected_even_for_normalised(tmp_path):
    X = sp.csr_matrix(np.array([[0.5, np.nan]], np.float32))
    with pytest.raises(ValueError, match="finite"):
        write(tmp_path / "s", X, var=make_var(2), raw_counts=False)


def test_duplicate_gene_ids_rejected(tmp_path):
    var = pd.DataFrame(index=["A", "B", "A"])
    with pytest.raises(ValueError, match=r"duplicate gene ids.*'A'"):
        StoreWriter(tmp_path / "s", var=var, raw_counts=True)


def test_block_shape_and_obs_mismatch(tmp_path):
    with StoreWriter(tmp_path / "s", var=make_var(8), raw_counts=True, **TINY) as w:
        with pytest.raises(ValueError, match="8 genes"):
            w.append(make_counts(5, 9))
        with pytest.raises(ValueError, match="obs has 4 rows"):
            w.append(make_counts(5, 8), make_obs(4))
        w.append(make_counts(5, 8), make_obs(5))
        with pytest.raises(ValueError, match="obs columns"):
            w.append(make_counts(5, 8), make_obs(5).drop(columns="dose"))
        # the reordering path (shuffled ingest): checked once by validate, written as given
        csr, obs = w.validate(make_counts(6, 8, seed=1), make_obs(6, seed=1), first_row=100)
        w.append_validated(csr[::-1], obs.iloc[::-1].set_axis([f"v{i}" for i in range(6)]))
        with pytest.raises(ValueError, match="obs columns"):
            w.append_validated(csr, obs.drop(columns="dose"))
        with pytest.raises(ValueError, match=r"rows 100-101: raw counts.*cell row 100"):
            w.validate(sp.csr_matrix(np.full((1, 8), 0.5, np.float32)), None, first_row=100)
    store = open_store(tmp_path / "s")
    assert store.n_cells == 11
    assert (store.read_csr(5, 11) != make_counts(6, 8, seed=1)[::-1]).nnz == 0


def test_uncommitted_store_is_refused_and_rewritable(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError), StoreWriter(out, var=make_var(8), raw_counts=True,
                                                  **TINY) as w:
        w.append(make_counts(100, 8))
        raise RuntimeError("killed")
    with pytest.raises(StoreError, match="incomplete"):
        open_store(out)
    store = write(out, make_counts(30, 8))  # an incomplete store is restarted, not an error
    assert store.n_cells == 30


def test_existing_complete_store_needs_overwrite(tmp_path):
    out = tmp_path / "s"
    write(out, make_counts(30, 8))
    with pytest.raises(StoreError, match="already holds a complete store.*--overwrite"):
        StoreWriter(out, var=make_var(8), raw_counts=True)
    assert write(out, make_counts(40, 8), overwrite=True).n_cells == 40


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a pertscale store"):
        StoreWriter(tmp_path / "d", var=make_var(4), raw_counts=True)
    assert (tmp_path / "d" / "notes.txt").exists()


def test_empty_writer_does_not_commit(tmp_path):
    with pytest.raises(ValueError, match="no cells"), \
            StoreWriter(tmp_path / "s", var=make_var(4), raw_counts=True):
        pass
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "s")


def test_open_store_errors_name_uri(tmp_path):
    with pytest.raises(StoreError, match="no store at .*missing"):
        open_store(tmp_path / "missing")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.raises(StoreError, match="not a pertscale store"):
        open_store(tmp_path / "g")


def test_zarr_python_reads_the_store(tmp_path):
    """The format is plain zarr v3: other tools (zarr-python) read it too."""
    zarr = pytest.importorskip("zarr")
    X = make_counts(100, 10)
    write(tmp_path / "s", X)
    group = zarr.open_group(str(tmp_path / "s"), mode="r")
    np.testing.assert_array_equal(group["X/data"][:], X.data)
    assert group.attrs["n_cells"] == 100


def test_lz4_codec_round_trips_and_is_recorded(tmp_path):
    x = make_counts(300, 20)
    with StoreWriter(tmp_path / "s", var=make_var(20), raw_counts=True, codec="lz4", **TINY) as w:
        w.append(x, make_obs(300))
    store = open_store(tmp_path / "s")
    assert (store.read_csr(0, 300) != x).nnz == 0
    meta = json.loads((tmp_path / "s" / "X" / "data" / "zarr.json").read_text())
    assert '"cname": "lz4"' in json.dumps(meta)


def test_unknown_codec_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"codec='gzip' is not one of \['zstd', 'lz4'\]"):
        StoreWriter(tmp_path / "s", var=make_var(4), raw_counts=True, codec="gzip")
    assert not (tmp_path / "s").exists()


def test_failed_or_interrupted_overwrite_leaves_the_old_store(tmp_path):
    """The replacement is written beside the old store and swapped in only once committed:
    refused parameters, a bad block or Ctrl-C on the way leave the old store intact, readable
    and verified, with no staging folder left behind."""
    from pertscale.store.verify import verify_store

    out = tmp_path / "s"
    old = make_counts(30, 8)
    fingerprint = write(out, old).fingerprint
    with pytest.raises(ValueError):  # tensorstore: a shard that is not whole chunks
        StoreWriter(out, var=make_var(8), raw_counts=True, overwrite=True, chunk_values=64,
                    shard_values=100)
    bad = make_counts(20, 8).astype(np.float32)
    bad.data[0] = -1.0
    with pytest.raises(ValueError, match="negative"):
        write(out, sp.vstack([make_counts(20, 8), bad]).tocsr(), block=20, overwrite=True)
    with (pytest.raises(KeyboardInterrupt),
          StoreWriter(out, var=make_var(8), raw_counts=True, overwrite=True) as w):
        w.append(make_counts(10, 8))
        raise KeyboardInterrupt
    store = open_store(out)
    assert store.fingerprint == fingerprint and verify_store(out).ok
    np.testing.assert_array_equal(store.read_csr(0, 30).toarray(), old.toarray())
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    new = make_counts(40, 8, seed=1)
    np.testing.assert_array_equal(write(out, new, overwrite=True).read_csr(0, 40).toarray(),
                                  new.toarray())
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


@pytest.mark.parametrize("memory_hashes", [None, 7], ids=["in_memory", "spilled"])
def test_duplicate_cell_ids_are_refused_within_and_across_blocks(tmp_path, monkeypatch,
                                                                 memory_hashes):
    """The same refusals whether the id hashes stay in memory or go to scratch partitions
    (as past ~1M cells); the scratch folder never outlives the write."""
    if memory_hashes:
        monkeypatch.setattr("pertscale.store.unique.DEFAULT_MEMORY_HASHES", memory_hashes)
    X = make_counts(40, 8)
    obs = make_obs(40)
    within = obs.rename(index={"cell3": "cell1"})
    with pytest.raises(ValueError, match=r"cell id\(s\) \['cell1'\] appear more than once"):
        write(tmp_path / "a", X, within, block=40)
    across = obs.rename(index={"cell30": "cell2", "cell31": "cell5"})  # blocks of 20 cells
    with pytest.raises(ValueError, match=r"\['cell2', 'cell5'\] appear more than once \(2 ids "
                                         r"shared by 4 cells\)"):
        write(tmp_path / "b", X, across, block=20)
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "b")  # nothing was committed
    assert write(tmp_path / "c", X, obs, block=20).n_cells == 40
    assert not list(tmp_path.glob("*/.pertscale-ids"))


def test_empty_gene_ids_and_a_store_inside_a_store_are_refused(tmp_path):
    var = make_var(4)
    var.index = ["g1", "", "g3", "g4"]
    with pytest.raises(ValueError, match=r"1 gene id\(s\) in var are empty, e.g. at var row 1"):
        StoreWriter(tmp_path / "e", var=var, raw_counts=True)
    write(tmp_path / "s", make_counts(10, 8))
    with pytest.raises(StoreError, match=r"is inside the store .*/s; write the new store"):
        StoreWriter(tmp_path / "s" / "X" / "nested", var=make_var(8), raw_counts=True)
    assert open_store(tmp_path / "s").n_cells == 10 and not (tmp_path / "s/X/nested").exists()
