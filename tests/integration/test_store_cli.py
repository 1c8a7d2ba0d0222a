"""`pertscale ingest | stats | verify | info` and `pertscale bench ingest` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def pertscale(*args, cwd=REPO_ROOT):
    """The real entry point in a fresh interpreter (slow to start: used once per flow)."""
    return subprocess.run([sys.executable, "-m", "pertscale", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def cli(capsys):
    """`pertscale.cli.main` in this process: exit code, stdout, stderr."""
    from pertscale.cli import main

    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return run


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    rng = np.random.default_rng(0)
    n, g = 1200, 120
    lam = np.outer(rng.lognormal(0, 0.5, n), rng.gamma(0.5, 2.0, g)) * rng.gamma(2.0, 0.5, (n, g))
    X = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    obs = pd.DataFrame({"perturbation": rng.choice(["ctrl", "A", "B"], n)},
                       index=[f"c{i}" for i in range(n)])
    path = tmp_path_factory.mktemp("cli") / "cells.h5ad"
    ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(g)])).write_h5ad(path)
    return path


def test_ingest_verify_info_stats(h5ad, tmp_path, cli):
    store = tmp_path / "store"
    run = pertscale("ingest", h5ad, "--out", store, "--chunk-values", "256",
                    "--shard-values", "4096", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "1200 cells x 120 genes" in run.stdout

    run = cli("verify", store)
    assert run.returncode == 0 and run.stdout.startswith("ok:"), run.stderr

    run = cli("info", store, "--json")
    attrs = json.loads(run.stdout)
    assert attrs["n_cells"] == 1200 and attrs["complete"] is True

    run = cli("stats", store, "--flavor", "seurat", "--n-top-genes", "20",
                    "--out", tmp_path / "stats")
    assert run.returncode == 0, run.stderr
    ours = pd.read_csv(tmp_path / "stats" / "hvg.csv", index_col=0)
    adata = ad.read_h5ad(h5ad)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    ref = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=20, inplace=False)
    assert list(ours.index[ours["highly_variable"]]) == list(adata.var_names[ref["highly_variable"]])
    sf = pd.read_csv(tmp_path / "stats" / "size_factors.csv", index_col=0)
    assert len(sf) == 1200 and np.isclose(sf["size_factor"].median(), 1.0)

    # a flipped byte: exit 1, naming array and shard file
    shard = store / "X" / "data" / "c" / "1"
    blob = bytearray(shard.read_bytes())
    blob[-100] ^= 0x10
    shard.write_bytes(bytes(blob))
    run = cli("verify", store)
    assert run.returncode == 1
    assert "array X/data: shard X/data/c/1 is corrupt" in run.stderr

    (store / "X" / "indices" / "c" / "0").unlink()
    run = cli("verify", store)
    assert run.returncode == 1 and "shard X/indices/c/0 is missing" in run.stderr


def test_cli_errors_are_clear(h5ad, tmp_path, cli):
    run = cli("ingest", h5ad, "--out", tmp_path / "s", "--obs-columns", "perturbation,guide")
    assert run.returncode == 1
    assert "['guide'] not found; available: ['perturbation']" in run.stderr
    run = cli("ingest", h5ad, "--out", tmp_path / "s", "--quiet")
    assert run.returncode == 0
    other = tmp_path / "other.h5ad"
    ad.AnnData(sp.csr_matrix(np.ones((3, 2), np.float32))).write_h5ad(other)
    run = cli("ingest", other, "--out", tmp_path / "s", "--quiet")
    assert run.returncode == 1 and "--overwrite" in run.stderr
    run = cli("verify", tmp_path / "nothing")
    assert run.returncode == 1 and "no store at" in run.stderr
    run = cli("stats", tmp_path / "nothing")
    assert run.returncode == 1 and "no store at" in run.stderr


@pytest.mark.slow
def test_bench_ingest_small(tmp_path):
    out = tmp_path / "bench.json"
    run = pertscale("bench", "ingest", "--n-cells", "3000", "--n-genes", "500",
                    "--work-dir", tmp_path / "work", "--json", out)
    assert run.returncode == 0, run.stderr
    row = json.loads(out.read_text())
    assert row["n_cells"] == 3000 and row["verify_ok"] and row["round_trip_equal"]
    assert row["cells_per_s"] == pytest.approx(3000 / row["ingest_s"])
    assert row["ingest_s"] < row["ingest_process_s"]  # the ingest inside its process's time
    # the child's own peak: an interpreter with numpy/scipy/tensorstore (> 100 MiB) plus at most
    # the writer's shard buffers (4 x 64 MiB) and one block, far below a whole-file load
    assert 100 < row["peak_rss_mib"] < 1024
    assert "cells_per_s" in run.stdout
