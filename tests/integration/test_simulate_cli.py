"""`pertscale simulate` end to end: files, a cell store, config files, overrides and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pertscale.cli import main as cli
from pertscale.data.synthetic import SimulatorConfig, simulate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--n_genes=200", "--n-cells", "1500", "--n_programs=8", "--n_single_perturbations=30",
         "--n_double_perturbations=10", "--quiet"]
SMALL_CFG = SimulatorConfig(n_genes=200, n_cells=1500, n_programs=8, n_single_perturbations=30,
                            n_double_perturbations=10)


def test_simulate_writes_the_dataset_through_the_installed_entry_point(tmp_path):
    out = tmp_path / "sim"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "pertscale", "simulate", "--config",
         str(ROOT / "configs" / "simulate.toml"), "--out", str(out), *SMALL, "--seed=3"],
        check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["n_cells"] == 1500 and summary["seed"] == 3
    # the rate is the cells over the reported time (rounded to 10 ms)
    assert abs(1500 / summary["cells_per_s"] - summary["seconds"]) <= 0.006
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == SMALL_CFG.replace(seed=3).to_dict()
    assert set(manifest["files"]) == {"cells.h5ad", "go_annotations.tsv", "go_terms.tsv",
                                      "go_dag_edges.tsv", "gene_sets.gmt",
                                      "gene_embeddings.npz", "truth.npz"}


def test_simulate_streams_cells_into_a_store(tmp_path):
    from pertscale.store import open_store

    store_uri = str(tmp_path / "store")
    assert cli(["simulate", "--store", store_uri, "--out", str(tmp_path / "side"),
                "--block-size", "500", *SMALL]) == 0
    store = open_store(store_uri)
    expected = simulate(SMALL_CFG)
    assert (store.n_cells, store.n_genes, store.raw_counts) == (1500, 200, True)
    assert (store.read_csr(0, 1500) != expected.adata.X).nnz == 0
    assert list(store.var.index) == list(expected.adata.var.index)
    assert list(store.var["gene_symbol"]) == list(expected.adata.var["gene_symbol"])
    for column in ("perturbation", "condition", "perturbation_type", "cell_type", "batch"):
        np.testing.assert_array_equal(store.obs[column].astype(str).to_numpy(),
                                      expected.adata.obs[column].astype(str).to_numpy())
    assert store.attrs["simulation"]["n_genes"] == 200
    side = json.loads((tmp_path / "side" / "manifest.json").read_text())
    assert side["store"]["uri"] == store_uri and "cells.h5ad" not in side["files"]
    # the store is an AnnData zarr store: a scanpy user opens it as it is
    import warnings

    import anndata
    import scanpy as sc

    adata = anndata.read_zarr(store_uri)
    assert adata.shape == (1500, 200) and list(adata.obs.columns) == store.obs_column_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-misc's loess notes
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=50)
    assert int(adata.var["highly_variable"].sum()) == 50


def test_simulate_errors_name_the_problem(tmp_path, capsys):
    assert cli(["simulate", "--out", str(tmp_path / "x"), "--n_gene=10"]) == 2
    assert "valid keys" in capsys.readouterr().err
    assert cli(["simulate", "--out", str(tmp_path / "x"), "--control_fraction=1.5"]) == 2
    assert "control_fraction" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    assert cli(["simulate", "--out", str(busy), *SMALL]) == 1
    assert "not empty" in capsys.readouterr().err
    assert cli(["simulate", "--out", str(busy), "--overwrite", *SMALL]) == 1
    assert "not written by pertscale simulate" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "user data"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli(["simulate", "--out", str(afile), *SMALL]) == 1
    err = capsys.readouterr().err
    assert "is not a directory" in err and "--overwrite" not in err
    with pytest.raises(SystemExit):
        cli(["simulate", *SMALL])  # neither --out nor --store
