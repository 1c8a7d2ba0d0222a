"""HVGs and size factors from stored statistics equal scanpy's on the same data."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from pertscale.store import StoreWriter, open_store
from pertscale.store.ingest import IngestConfig, ingest
from pertscale.store.stats import highly_variable_genes, size_factors


def simulated_counts(n=600, g=250, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.gamma(0.5, 2.0, g)
    lib = rng.lognormal(0.0, 0.5, n)
    lam = np.outer(lib, mu) * rng.gamma(2.0, 0.5, (n, g))  # overdispersed (NB-like)
    return sp.csr_matrix(rng.poisson(lam).astype(np.float32))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    X = simulated_counts()
    path = tmp_path_factory.mktemp("stats") / "s"
    var = pd.DataFrame(index=[f"g{i}" for i in range(X.shape[1])])
    with StoreWriter(path, var=var, raw_counts=True, chunk_values=256, shard_values=2048) as w:
        for a in range(0, X.shape[0], 128):
            w.append(X[a:a + 128])
    return open_store(path), ad.AnnData(X, var=var)


def scanpy_seurat(adata, **kw):
    a = adata.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return sc.pp.highly_variable_genes(a, flavor="seurat", inplace=False, **kw)


@pytest.mark.parametrize("kw", [{"n_top_genes": 40}, {}])
def test_seurat_equals_scanpy(sim, kw):
    store, adata = sim
    ref = scanpy_seurat(adata, **kw)
    ours = highly_variable_genes(store, "seurat", **kw)
    assert ours["highly_variable"].sum() > 0
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(), ref["highly_variable"])
    np.testing.assert_allclose(ours["means"], ref["means"], rtol=1e-5)
    np.testing.assert_allclose(ours["dispersions_norm"], ref["dispersions_norm"], rtol=1e-4,
                               atol=1e-5)


def test_seurat_v3_equals_scanpy(sim):
    store, adata = sim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=40,
                                          inplace=False)
    ours = highly_variable_genes(store, "seurat_v3", n_top_genes=40, block_cells=77)
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(), ref["highly_variable"])
    np.testing.assert_allclose(ours["variances_norm"], ref["variances_norm"], rtol=1e-8)


def test_size_factors(sim):
    store, adata = sim
    n_counts = np.asarray(adata.X.sum(1)).ravel()
    sf = size_factors(store, 1e4)
    np.testing.assert_allclose(sf.to_numpy(), n_counts / 1e4)
    np.testing.assert_allclose(size_factors(store).median(), 1.0)


def test_bad_flavor_and_normalised_v3(sim, tmp_path):
    store, _ = sim
    with pytest.raises(ValueError, match=r"flavor='cellranger' is not one of \['seurat', 'seurat_v3'\]"):
        highly_variable_genes(store, "cellranger")
    var = pd.DataFrame(index=["a", "b", "c"])
    with StoreWriter(tmp_path / "n", var=var, raw_counts=False) as w:
        w.append(sp.csr_matrix(np.array([[0.5, 0, 1.0], [0, 2.0, 0.1]], np.float32)))
    with pytest.raises(ValueError, match="normalised values.*seurat_v3"):
        highly_variable_genes(open_store(tmp_path / "n"), "seurat_v3")


def test_kang_hvgs_equal_scanpy(shared_data, tmp_path):
    path = shared_data / "kang" / "kang2018_muscat_example_sce.h5ad"
    ingest([path], tmp_path / "kang", IngestConfig())
    store = open_store(tmp_path / "kang")
    adata = ad.read_h5ad(path)
    ref = scanpy_seurat(adata, n_top_genes=200)
    ours = highly_variable_genes(store, "seurat", n_top_genes=200)
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(), ref["highly_variable"])
    ref3 = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=200, inplace=False)
    ours3 = highly_variable_genes(store, "seurat_v3", n_top_genes=200)
    np.testing.assert_array_equal(ours3["highly_variable"].to_numpy(), ref3["highly_variable"])


def test_perturbseq_log_values_seurat_equals_scanpy(shared_data, tmp_path):
    """A store of log1p-normalised values: seurat on the stored values, as scanpy on X."""
    path = shared_data / "perturbseq" / "norman2019_mcfaline2023_devel.h5ad"
    ingest([path], tmp_path / "p", IngestConfig(values="normalised"))
    adata = ad.read_h5ad(path)
    adata.X = adata.X.astype(np.float32)
    adata.uns.pop("log1p", None)
    ref = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=100, inplace=False)
    ours = highly_variable_genes(open_store(tmp_path / "p"), "seurat", n_top_genes=100)
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(), ref["highly_variable"])
