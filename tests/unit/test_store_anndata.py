"""Format v2: every pertscale store is also an AnnData zarr store (anndata, zarr-python and
scanpy read it as written), and v1 stores stay readable."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import zarr

from pertscale.store import open_store
from pertscale.store.ingest import IngestConfig, ingest
from pertscale.store.stats import highly_variable_genes

V1_STORE = Path(__file__).parents[1] / "data" / "store_v1"  # written by pertscale at b1f037a


def source_anndata(n=500, g=120, seed=3) -> ad.AnnData:
    """An .h5ad as users bring it: counts, categorical and string obs columns with a missing
    label, numbers, bools, nullable ints, non-ASCII names and a var table with symbols."""
    rng = np.random.default_rng(seed)
    mu = rng.gamma(0.5, 2.0, g)
    counts = rng.poisson(np.outer(rng.lognormal(0, 0.5, n), mu) * rng.gamma(2, 0.5, (n, g)))
    pert = rng.choice(["control", "KLF1", "CEBPA+SPI1", "ÉGR1"], n).astype(object)
    obs = pd.DataFrame({
        "perturbation": pd.Categorical(pert, categories=["control", "KLF1", "CEBPA+SPI1",
                                                         "ÉGR1"]),
        "cell_type": rng.choice(["K562", "RPE1"], n).astype(object),
        "dose": rng.normal(size=n),
        "guide_umis": pd.array(np.where(rng.random(n) < 0.1, None, rng.integers(1, 9, n)),
                               dtype="Int64"),
        "is_control": pert == "control",
        "grade": pd.Categorical(rng.choice(["lo", "hi"], n), categories=["lo", "hi"],
                                ordered=True),
    }, index=[f"AAAC-{i}" for i in range(n)])
    var = pd.DataFrame({"gene_symbol": [f"SYM{i}" for i in range(g)]},
                       index=[f"ENSG{i:011d}" for i in range(g)])
    return ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


@pytest.fixture(scope="module")
def v2_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("anndata")
    source = source_anndata()
    source.write_h5ad(folder / "in.h5ad")
    ingest([folder / "in.h5ad"], folder / "s.zarr",
           IngestConfig(block_rows=128, chunk_values=1024, shard_values=4096))
    return folder / "s.zarr"


def test_anndata_reads_what_pertscale_reads(v2_store):
    store = open_store(v2_store)
    assert store.format_version == 2
    adata = ad.read_zarr(v2_store)
    assert adata.shape == (store.n_cells, store.n_genes)
    ours = store.read_csr(0, store.n_cells)
    assert adata.X.dtype == np.float32 and sp.issparse(adata.X)
    assert (adata.X != ours).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, store.obs, check_index_type=False)
    pd.testing.assert_frame_equal(adata.var, store.var, check_index_type=False)
    assert list(adata.obs.index) == list(store.obs.index)
    assert adata.obs["grade"].cat.ordered
    assert list(adata.obs["perturbation"].cat.categories) == ["control", "KLF1", "CEBPA+SPI1",
                                                              "ÉGR1"]
    stats = store.read_stats()
    assert set(adata.uns["pertscale_stats"]) == set(stats)
    for name, values in stats.items():
        np.testing.assert_array_equal(adata.uns["pertscale_stats"][name], values)


def test_the_cells_are_the_source_cells(v2_store, tmp_path):
    """Shuffled on ingest: anndata's view, put back in source order, is the source file."""
    source = source_anndata()
    adata = ad.read_zarr(v2_store)
    order = np.argsort(adata.obs["source_row"].to_numpy())
    back = adata[order]
    assert list(back.obs.index) == list(source.obs.index)
    assert (back.X != source.X).nnz == 0
    for column in ("perturbation", "dose", "is_control", "grade"):
        pd.testing.assert_series_equal(back.obs[column], source.obs[column])
    # nullable ints come back as float64 with NaN where the label was missing
    np.testing.assert_array_equal(back.obs["guide_umis"].to_numpy(),
                                  source.obs["guide_umis"].to_numpy(float, na_value=np.nan))


def test_zarr_python_opens_every_node_without_a_warning(v2_store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root = zarr.open_group(v2_store, mode="r")
        nodes = dict(root.members(max_depth=None))
        for node in nodes.values():
            if isinstance(node, zarr.Array):
                node[...]
    assert {"X/data", "X/indices", "X/indptr", "obs/_index", "obs/perturbation/codes",
            "obs/perturbation/categories", "var/gene_symbol",
            "uns/pertscale_stats/sum"} <= set(nodes)
    assert root.attrs["encoding-type"] == "anndata"
    ids = nodes["obs/_index"][...]
    assert list(ids) == list(open_store(v2_store).obs.index)


def test_backed_sparse_rows_as_annbatch_reads_them(v2_store):
    """annbatch and anndata's backed mode read rows through anndata.io.sparse_dataset."""
    store = open_store(v2_store)
    x = ad.io.sparse_dataset(zarr.open_group(v2_store, mode="r")["X"])
    assert x.shape == (store.n_cells, store.n_genes)
    assert (x[37:211] != store.read_csr(37, 211)).nnz == 0


def test_read_lazy_where_anndata_has_it(v2_store):
    pytest.importorskip("xarray", reason="anndata.experimental.read_lazy needs xarray and dask "
                                         "(pertscale's dev extra installs them)")
    store = open_store(v2_store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata: read_lazy is experimental
        lazy = ad.experimental.read_lazy(v2_store)
        assert lazy.shape == (store.n_cells, store.n_genes)
        part = lazy[120:260].to_memory()
    assert (part.X != store.read_csr(120, 260)).nnz == 0
    ours = store.obs.iloc[120:260]
    assert list(part.obs.index) == list(ours.index)
    for column in ours.columns:  # read_lazy drops categories the rows do not use
        np.testing.assert_array_equal(part.obs[column].astype(str).to_numpy(),
                                      ours[column].astype(str).to_numpy())


def test_scanpy_highly_variable_genes_on_the_store_equal_ours(v2_store):
    adata = ad.read_zarr(v2_store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=30,
                                             inplace=False)
    ours = highly_variable_genes(open_store(v2_store), "seurat_v3", n_top_genes=30)
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(),
                                  theirs["highly_variable"].to_numpy())
    assert int(ours["highly_variable"].sum()) == 30


def test_a_v1_store_stays_readable():
    store = open_store(V1_STORE)
    assert store.format_version == 1 and store.n_cells == 300 and store.n_genes == 40
    obs = store.obs
    assert list(obs.columns) == ["perturbation", "dose", "replicate", "is_control", "plate",
                                 "n_counts"]
    assert set(obs["perturbation"].cat.categories) == {"control", "KLF1", "CEBPA+SPI1",
                                                       "é-gene"}
    x = store.read_csr(0, store.n_cells)
    np.testing.assert_allclose(np.asarray(x.sum(1)).ravel(), obs["n_counts"].to_numpy())
    np.testing.assert_allclose(store.read_stats()["sum"], np.asarray(x.sum(0)).ravel())
    assert list(store.var.columns) == ["gene_symbol", "chrom"]


def test_export_writes_the_selected_cells_and_genes_as_h5ad(v2_store, tmp_path):
    from pertscale.store.export import export_h5ad

    store = open_store(v2_store)
    out = tmp_path / "klf1.h5ad"
    genes = "SYM5,ENSG00000000002,SYM77"
    assert export_h5ad(v2_store, out, cells="perturbation=KLF1,ÉGR1", genes=genes,
                       block_cells=50) == (int(store.obs["perturbation"].isin(["KLF1", "ÉGR1"])
                                                .sum()), 3)
    adata = ad.read_h5ad(out)
    rows = np.flatnonzero(store.obs["perturbation"].isin(["KLF1", "ÉGR1"]).to_numpy())
    assert list(adata.var.index) == ["ENSG00000000005", "ENSG00000000002", "ENSG00000000077"]
    expected = store.read_csr(0, store.n_cells)[rows][:, [5, 2, 77]]
    assert sp.issparse(adata.X) and (adata.X != expected).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, store.obs.iloc[rows], check_index_type=False)
    assert adata.uns["pertscale_export"]["fingerprint"] == store.attrs["fingerprint"]

    whole = tmp_path / "all.h5ad"
    export_h5ad(v2_store, whole, cells="10:400", block_cells=64)
    back = ad.read_h5ad(whole)
    assert (back.X != store.read_csr(10, 400)).nnz == 0 and back.n_vars == store.n_genes
    with pytest.raises(FileExistsError, match="all.h5ad exists; pass --overwrite"):
        export_h5ad(v2_store, whole)
    with pytest.raises(ValueError, match=r"not in store .*\['NOPE'\]"):
        export_h5ad(v2_store, tmp_path / "x.h5ad", genes="SYM1,NOPE")
    with pytest.raises(ValueError, match="obs column 'perturbation' has no value"):
        export_h5ad(v2_store, tmp_path / "x.h5ad", cells="perturbation=MYC")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.h5ad", "klf1.h5ad"]


def test_export_and_migrate_commands(v2_store, tmp_path, capsys):
    from pertscale.cli import main

    out = tmp_path / "first.h5ad"
    assert main(["export", str(v2_store), "--out", str(out), "--cells", "0:7"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}: 7 cells x 120 genes"
    assert ad.read_h5ad(out).shape == (7, 120)
    assert main(["export", str(v2_store), "--out", str(tmp_path / "b.h5ad"), "--cells", "7:3"]) == 1
    assert "--cells '7:3': expected START:STOP within [0, 500]" in capsys.readouterr().err
    assert main(["migrate", str(v2_store)]) == 0
    assert capsys.readouterr().out.strip() == f"{v2_store}: already format v2"
