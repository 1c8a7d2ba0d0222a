"""Ingest of .h5ad files: sources (X, layer, raw; CSR, CSC, dense), real files, bad input,
reruns, SIGKILL midway."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertscale.store import StoreError, open_store, read_store_attrs
from pertscale.store.ingest import IngestConfig, ingest
from pertscale.store.shuffle import source_positions
from pertscale.store.verify import verify_store

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = {"chunk_values": 64, "shard_values": 512, "block_rows": 64}


def counts(n, g, seed=0):
    rng = np.random.default_rng(seed)
    return sp.csr_matrix(rng.poisson(rng.gamma(0.5, 2.0, g), (n, g)).astype(np.float32))


def write_h5ad(path, X, *, layers=None, raw=None, obs=None, var_names=None):
    n, g = X.shape
    obs = obs if obs is not None else pd.DataFrame(
        {"condition": pd.Categorical(np.where(np.arange(n) % 3 == 0, "ctrl", "stim")),
         "donor": [f"d{i % 4}" for i in range(n)]}, index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=var_names if var_names is not None else [f"G{i}" for i in range(g)])
    adata = ad.AnnData(X=X, obs=obs, var=var, layers=layers or {})
    if raw is not None:
        adata.raw = ad.AnnData(X=raw, obs=obs, var=var)
    adata.write_h5ad(path)
    return adata


def cfg(**kw):
    return IngestConfig(**{**TINY, **kw})


def in_source_order(store):
    """(X, obs) of a store put back in its source file's order through `source_positions`."""
    back = np.argsort(source_positions(store))
    return store.read_csr(0, store.n_cells)[back], store.obs.iloc[back]


def test_round_trip_csr(tmp_path):
    X = counts(300, 20)
    src = write_h5ad(tmp_path / "a.h5ad", X)
    attrs = ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg())
    store = open_store(tmp_path / "s")
    rows = store.obs["source_row"].to_numpy()
    assert sorted(rows) == list(range(300)) and (rows != np.arange(300)).any()
    assert (store.read_csr(0, 300) != X[rows]).nnz == 0  # cell i is the file's row rows[i]
    assert list(store.obs.index) == list(src.obs_names[rows])
    assert (store.obs["donor"].to_numpy() == src.obs["donor"].to_numpy()[rows]).all()
    assert attrs["source"]["file"] == "a.h5ad" and len(attrs["source"]["sha256"]) == 64
    assert attrs["source"]["order"] == "shuffled" and attrs["source"]["seed"] == 0
    assert list(store.obs.columns) == ["condition", "donor", "source_row", "n_counts"]
    assert verify_store(tmp_path / "s").ok
    ingest([tmp_path / "a.h5ad"], tmp_path / "o", cfg(order="source"))
    kept = open_store(tmp_path / "o")
    assert (kept.read_csr(0, 300) != X).nnz == 0
    assert list(kept.obs.columns) == ["condition", "donor", "n_counts"]
    assert read_store_attrs(str(tmp_path / "o"))["source"]["order"] == "source"


def test_shuffled_order_is_seeded_uniform_and_kept_by_reruns(tmp_path):
    """The order is a function of the seed (a rerun with the same seed is a no-op, another seed
    writes another store), independent of the bucket size, and every cell lands anywhere."""
    write_h5ad(tmp_path / "a.h5ad", counts(400, 8))
    first = ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg())
    assert ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg())["fingerprint"] == \
        first["fingerprint"]
    with pytest.raises(StoreError, match="already holds a complete store"):
        ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg(seed=1))
    ingest([tmp_path / "a.h5ad"], tmp_path / "t", cfg(seed=1))
    ingest([tmp_path / "a.h5ad"], tmp_path / "u", cfg(seed=1))
    rows = {k: open_store(tmp_path / k).obs["source_row"].to_numpy() for k in "stu"}
    assert (rows["t"] == rows["u"]).all() and (rows["s"] != rows["t"]).any()
    # many buckets (a few cells each) still give a uniform order: the first stored cell comes
    # from anywhere in the file, over seeds
    firsts = []
    for seed in range(40):
        out = tmp_path / f"b{seed}"
        ingest([tmp_path / "a.h5ad"], out, cfg(seed=seed, shuffle_bucket_values=40))
        firsts.append(open_store(out).obs["source_row"].iloc[0])
    assert np.mean(np.array(firsts) < 200) == pytest.approx(0.5, abs=0.25)
    assert not list(tmp_path.glob(".*pertscale-shuffle"))  # scratch space removed


def test_shuffle_scratch_of_another_program_is_refused(tmp_path):
    write_h5ad(tmp_path / "a.h5ad", counts(40, 5))
    scratch = tmp_path / ".s.pertscale-shuffle"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"pertscale-shuffle exists and was not written by "
                                         r"pertscale"):
        ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg())
    assert (scratch / "notes.txt").read_text() == "mine"


def test_source_row_column_in_the_file_is_named(tmp_path):
    obs = pd.DataFrame({"source_row": np.arange(20)}, index=[f"c{i}" for i in range(20)])
    write_h5ad(tmp_path / "a.h5ad", counts(20, 4), obs=obs)
    with pytest.raises(ValueError, match=r"a\.h5ad: obs already has a column 'source_row'.*"
                                         r"--order source"):
        ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg())
    ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg(order="source"))


@pytest.mark.parametrize("fmt", ["csc", "dense"])
def test_csc_and_dense_sources(tmp_path, fmt):
    X = counts(150, 12, seed=1)
    src = X.tocsc() if fmt == "csc" else X.toarray()
    write_h5ad(tmp_path / "a.h5ad", src)
    ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg())
    assert (in_source_order(open_store(tmp_path / "s"))[0] != X).nnz == 0


def test_counts_from_layer_and_raw(tmp_path):
    X = counts(100, 10, seed=2)
    logx = X.copy()
    logx.data = np.log1p(logx.data)
    write_h5ad(tmp_path / "a.h5ad", logx, layers={"counts": X}, raw=X)
    for source in ("layer:counts", "raw"):
        ingest([tmp_path / "a.h5ad"], tmp_path / source, cfg(counts_from=source))
        store = open_store(tmp_path / source)
        assert store.raw_counts and (in_source_order(store)[0] != X).nnz == 0
    with pytest.raises(ValueError, match=r"layer 'spliced' not found; layers: \['counts'\]"):
        ingest([tmp_path / "a.h5ad"], tmp_path / "x", cfg(counts_from="layer:spliced"))
    with pytest.raises(ValueError, match=r"a\.h5ad: rows 0-64: raw counts.*gene 'G\d+' has value"):
        ingest([tmp_path / "a.h5ad"], tmp_path / "y", cfg())  # X holds log values


def test_obs_columns_selected_and_missing_named(tmp_path):
    write_h5ad(tmp_path / "a.h5ad", counts(40, 5))
    ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg(obs_columns=["donor"]))
    assert list(open_store(tmp_path / "s").obs.columns) == ["donor", "source_row", "n_counts"]
    with pytest.raises(ValueError, match=r"\['guide'\] not found; available: \['condition', 'donor'\]"):
        ingest([tmp_path / "a.h5ad"], tmp_path / "t", cfg(obs_columns=["donor", "guide"]))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5ad"):
        ingest([tmp_path / "nope.h5ad"], tmp_path / "s", cfg())
    (tmp_path / "empty.h5ad").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.h5ad is empty"):
        ingest([tmp_path / "empty.h5ad"], tmp_path / "s", cfg())
    write_h5ad(tmp_path / "a.h5ad", counts(2000, 50))
    blob = (tmp_path / "a.h5ad").read_bytes()
    (tmp_path / "trunc.h5ad").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="trunc.h5ad"):
        ingest([tmp_path / "trunc.h5ad"], tmp_path / "t", cfg())
    with pytest.raises(StoreError):
        open_store(tmp_path / "t")


def test_duplicate_gene_ids(tmp_path):
    write_h5ad(tmp_path / "a.h5ad", counts(10, 3), var_names=["A", "B", "A"])
    with pytest.raises(ValueError, match=r"a\.h5ad: duplicate gene ids in var: \['A'\]"):
        ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg())


def test_rerun_is_idempotent_and_other_data_needs_overwrite(tmp_path):
    write_h5ad(tmp_path / "a.h5ad", counts(50, 6))
    write_h5ad(tmp_path / "b.h5ad", counts(60, 6, seed=9))
    first = ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg())
    assert ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg())["fingerprint"] == first["fingerprint"]
    with pytest.raises(StoreError, match="already holds a complete store"):
        ingest([tmp_path / "b.h5ad"], tmp_path / "s", cfg())
    assert ingest([tmp_path / "b.h5ad"], tmp_path / "s", cfg(overwrite=True))["n_cells"] == 60


def test_sigkill_midway_leaves_incomplete_store_and_rerun_restarts(tmp_path):
    X = counts(3000, 30, seed=4)
    write_h5ad(tmp_path / "a.h5ad", X)
    out = tmp_path / "s"
    script = textwrap.dedent(f"""
        import os, signal
        from pertscale.store.ingest import IngestConfig, ingest
        def kill(name, done, total):
            if done >= 2250:  # halfway through writing (the second half of a shuffled ingest)
                os.kill(os.getpid(), signal.SIGKILL)
        ingest([{str(tmp_path / 'a.h5ad')!r}], {str(out)!r},
               IngestConfig(chunk_values=256, shard_values=4096, block_rows=250), progress=kill)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=False)
    assert proc.returncode == -9
    assert any((out / "X" / "data" / "c").iterdir())  # it had written shards
    with pytest.raises(StoreError, match="incomplete"):
        open_store(out)
    assert not verify_store(out).ok
    ingest([tmp_path / "a.h5ad"], out, cfg())
    assert (in_source_order(open_store(out))[0] != X).nnz == 0
    assert not list(tmp_path.glob(".*pertscale-shuffle"))  # the killed run's scratch is gone


def test_kang_raw_counts(shared_data, tmp_path):
    path = shared_data / "kang" / "kang2018_muscat_example_sce.h5ad"
    ingest([path], tmp_path / "kang", IngestConfig(block_rows=500))
    store = open_store(tmp_path / "kang")
    src = ad.read_h5ad(path)
    assert store.raw_counts and store.n_cells == src.n_obs == 1556
    X, obs = in_source_order(store)
    assert (X != src.X).nnz == 0
    assert list(store.var.index) == list(src.var_names)
    for col in ("cluster_id", "group_id", "sample_id"):
        assert (obs[col].astype(str).to_numpy() == src.obs[col].astype(str).to_numpy()).all()


def test_perturbseq_normalised_values(shared_data, tmp_path):
    path = shared_data / "perturbseq" / "norman2019_mcfaline2023_devel.h5ad"
    with pytest.raises(ValueError, match="--values normalised"):
        ingest([path], tmp_path / "p", IngestConfig())
    ingest([path], tmp_path / "p", IngestConfig(values="normalised"))
    store = open_store(tmp_path / "p")
    src = ad.read_h5ad(path)
    assert not store.raw_counts and store.n_cells == 5961
    X, obs = in_source_order(store)
    np.testing.assert_array_equal(X.toarray(), src.X.astype(np.float32).toarray())
    assert (obs["perturbation"].astype(str).to_numpy()
            == src.obs["perturbation"].astype(str).to_numpy()).all()
    assert set(src.var.columns) <= set(store.var.columns)


def test_gene_id_column_and_source_n_counts(tmp_path):
    X = counts(30, 4)
    obs = pd.DataFrame({"n_counts": np.arange(30.0)}, index=[f"c{i}" for i in range(30)])
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(
        {"gene_ids": ["ENSG1", "ENSG2", "ENSG3", "ENSG4"]}, index=["A", "B", "C", "D"]))
    adata.write_h5ad(tmp_path / "a.h5ad")
    ingest([tmp_path / "a.h5ad"], tmp_path / "s", cfg(gene_id_column="gene_ids",
                                                       order="source"))
    store = open_store(tmp_path / "s")
    assert list(store.var.index) == ["ENSG1", "ENSG2", "ENSG3", "ENSG4"]
    assert list(store.var["gene_symbol"]) == ["A", "B", "C", "D"]
    np.testing.assert_array_equal(store.obs["n_counts_source"], np.arange(30.0))
    np.testing.assert_array_equal(store.obs["n_counts"], np.asarray(X.sum(1)).ravel())
    with pytest.raises(ValueError, match=r"var column 'ensembl' \(gene_id_column\) not found; "
                                         r"available: \['gene_ids'\]"):
        ingest([tmp_path / "a.h5ad"], tmp_path / "t", cfg(gene_id_column="ensembl"))


def test_obs_is_read_block_by_block_equal_to_anndata(tmp_path):
    """ObsBlocks slices each selected obs column on disk (arrays, strings, categoricals with
    missing values, nullable integers and booleans): the blocks put together equal anndata's
    obs, and only the selected columns are read."""
    import h5py

    from pertscale.store.ingest import ObsBlocks

    n = 11
    obs = pd.DataFrame({
        "cat": pd.Categorical(["a", "b", None] * 3 + ["a", "b"]),
        "s": [f"s{i}" for i in range(n)], "f": np.arange(n, dtype=float),
        "i": pd.array([1, None] * 5 + [3], dtype="Int64"), "b": [True, False] * 5 + [True],
        "nb": pd.array([True, None, False] * 3 + [True, None], dtype="boolean")},
        index=[f"c{i}" for i in range(n)])
    ad.AnnData(np.zeros((n, 2), np.float32), obs=obs).write_h5ad(tmp_path / "o.h5ad")
    with h5py.File(tmp_path / "o.h5ad") as f:
        blocks = ObsBlocks(f["obs"], None, tmp_path / "o.h5ad")
        got = pd.concat([blocks.block(a, min(a + 4, n)) for a in range(0, n, 4)])
        pd.testing.assert_frame_equal(got, ad.read_h5ad(tmp_path / "o.h5ad").obs,
                                      check_index_type=False)
        some = ObsBlocks(f["obs"], ["nb", "cat"], tmp_path / "o.h5ad")
        assert list(some.block(0, 3).columns) == ["nb", "cat"]
        with pytest.raises(ValueError, match=r"obs column\(s\) \['dose'\] not found"):
            ObsBlocks(f["obs"], ["dose"], tmp_path / "o.h5ad")
