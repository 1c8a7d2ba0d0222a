"""`pertscale bench ingest`: ingest throughput, peak RSS and store size for a simulated .h5ad.

1. Writes a simulated raw-count .h5ad of the requested size with a streaming writer (anndata's
   backed sparse dataset `append`), so generating a 1,000,000-cell file needs no more memory
   than one block.
2. Runs `pertscale ingest` on it in a child process; peak RSS is the child's ru_maxrss.
3. Verifies the store and (unless --no-check) compares every stored value with the .h5ad,
   block by block.
Prints a table and writes JSON (bench_results/ingest_<n_cells>_<order>.json by default).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertscale.store.commands import dir_size
from pertscale.store.ingest import ORDERS, IngestConfig
from pertscale.store.reader import open_store
from pertscale.store.shuffle import source_positions
from pertscale.store.verify import verify_store

__all__ = ["main", "write_simulated_h5ad"]


def _simulated_block(rng: np.random.Generator, n: int, gene_p: np.ndarray, gene_mean: np.ndarray,
                     nnz_per_cell: float) -> sp.csr_matrix:
    """Sparse counts: per-cell nonzero count ~ Poisson, genes drawn by expression frequency."""
    g = len(gene_p)
    k = rng.poisson(nnz_per_cell, n)
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = rng.choice(g, size=rows.size, p=gene_p)
    keys = np.sort(rows * g + cols)
    keys = keys[np.r_[True, keys[1:] != keys[:-1]]]  # duplicates dropped
    rows, cols = keys // g, (keys % g).astype(np.int32)
    data = (1 + rng.poisson(gene_mean[cols])).astype(np.float32)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return sp.csr_matrix((data, cols, indptr), shape=(n, g))


def write_simulated_h5ad(path: Path, n_cells: int, n_genes: int, *, nnz_per_cell: float = 150.0,
                         block: int = 20000, seed: int = 0) -> None:
    """Stream a simulated raw-count AnnData to `path` block by block."""
    import anndata.io

    rng = np.random.default_rng(seed)
    gene_p = rng.gamma(0.3, 1.0, n_genes)
    gene_p /= gene_p.sum()
    gene_mean = rng.gamma(1.0, 1.5, n_genes)
    perts = np.array(["control"] + [f"GENE{i}" for i in range(50)])
    obs = pd.DataFrame({
        "perturbation": pd.Categorical(perts[rng.integers(0, len(perts), n_cells)]),
        "cell_type": pd.Categorical(np.array(["K562", "RPE1", "HepG2"])[
            rng.integers(0, 3, n_cells)]),
        "batch": pd.Categorical(np.array([f"lane{i}" for i in range(8)])[
            rng.integers(0, 8, n_cells)]),
    }, index=pd.Index([f"cell{i}" for i in range(n_cells)]))
    var = pd.DataFrame({"gene_symbol": [f"SYM{i}" for i in range(n_genes)]},
                       index=pd.Index([f"ENSG{i:011d}" for i in range(n_genes)]))
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        anndata.io.write_elem(f, "obs", obs)
        anndata.io.write_elem(f, "var", var)
        first = _simulated_block(rng, min(block, n_cells), gene_p, gene_mean, nnz_per_cell)
        anndata.io.write_elem(f, "X", first)
        ds = anndata.io.sparse_dataset(f["X"])
        for start in range(first.shape[0], n_cells, block):
            n = min(block, n_cells - start)
            ds.append(_simulated_block(rng, n, gene_p, gene_mean, nnz_per_cell))
        for key in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            anndata.io.write_elem(f, key, {})


def _check_round_trip(h5ad: Path, store_path: Path, block: int = 50000) -> bool:
    """Every stored cell equals its source row (a shuffled store's `source_row`)."""
    import anndata.io

    store = open_store(store_path)
    positions = source_positions(store)
    with h5py.File(h5ad, "r") as f:
        X = anndata.io.sparse_dataset(f["X"])
        if X.shape != (store.n_cells, store.n_genes):
            return False
        for start in range(0, store.n_cells, block):
            stop = min(start + block, store.n_cells)
            rows = positions[start:stop]
            order = np.argsort(rows)  # the backed matrix reads sorted rows
            if (store.read_csr(start, stop)[order] != X[rows[order]]).nnz:
                return False
    return True


_CHILD = """
import json, sys, time
from pertscale.memory import peak_rss_mb
from pertscale.store.commands import ingest_main
t0 = time.perf_counter()
rc = ingest_main(sys.argv[1:])
print("BENCH " + json.dumps({"ingest_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}))
sys.exit(rc)
"""


def _run_ingest(h5ad: Path, store: Path, args: argparse.Namespace) -> tuple[float, float, int]:
    """`pertscale ingest` in a child process; returns (seconds inside ingest, seconds of the
    whole child including interpreter start and imports, peak RSS bytes of the child)."""
    cmd = [sys.executable, "-c", _CHILD, str(h5ad), "--out", str(store), "--overwrite",
           "--quiet", "--block-rows", str(args.block_rows), "--order", args.order]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(proc.stdout.strip().splitlines()[0])
    line = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("BENCH "))[6:])
    # NOTE: the child's own VmHWM: ru_maxrss of children would include this process's RSS at
    # fork time (it is inherited across exec)
    return line["ingest_s"], wall, int(line["peak_rss_mb"] * 2**20)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pertscale bench ingest", description=__doc__.split("\n")[0])
    p.add_argument("--n-cells", type=int, default=200_000)
    p.add_argument("--n-genes", type=int, default=5000)
    p.add_argument("--nnz-per-cell", type=float, default=150.0)
    p.add_argument("--block-rows", type=int, default=16384, help="ingest block size")
    p.add_argument("--order", choices=ORDERS, default=IngestConfig.order,
                   help="ingest's cell order (shuffled: the two-pass shuffle)")
    p.add_argument("--work-dir", default="storage/bench",
                   help="where the .h5ad and the store are written")
    p.add_argument("--keep", action="store_true", help="keep the .h5ad and store afterwards")
    p.add_argument("--no-check", action="store_true", help="skip the value-by-value comparison")
    p.add_argument("--json", default=None, help="JSON output (default bench_results/ingest_N_ORDER.json)")
    args = p.parse_args(argv)
    if args.n_cells < 1 or args.n_genes < 1:
        raise ValueError("--n-cells and --n-genes must be >= 1")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    h5ad = work / f"sim_{args.n_cells}x{args.n_genes}.h5ad"
    store = work / f"sim_{args.n_cells}x{args.n_genes}.store"
    t0 = time.perf_counter()
    write_simulated_h5ad(h5ad, args.n_cells, args.n_genes, nnz_per_cell=args.nnz_per_cell)
    gen_s = time.perf_counter() - t0
    ingest_s, child_s, peak_rss = _run_ingest(h5ad, store, args)
    t0 = time.perf_counter()
    report = verify_store(store)
    verify_s = time.perf_counter() - t0
    opened = open_store(store)
    check = None if args.no_check else _check_round_trip(h5ad, store)
    row: dict[str, Any] = {
        "n_cells": opened.n_cells, "n_genes": opened.n_genes, "nnz": opened.nnz,
        "order": args.order,
        "h5ad_mib": h5ad.stat().st_size / 2**20, "store_mib": dir_size(store) / 2**20,
        "num_shards": report.num_shards, "generate_s": gen_s, "ingest_s": ingest_s, "ingest_process_s": child_s,
        "cells_per_s": opened.n_cells / ingest_s, "peak_rss_mib": peak_rss / 2**20,
        "verify_s": verify_s, "verify_ok": report.ok, "round_trip_equal": check,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    row["store_vs_h5ad"] = row["store_mib"] / row["h5ad_mib"]
    print(f"{'metric':<18} value")
    for key, value in row.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"{key:<18} {shown}")
    out = Path(args.json or f"bench_results/ingest_{args.n_cells}_{args.order}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print(f"wrote {out}")
    if not args.keep:
        h5ad.unlink()
        import shutil
        shutil.rmtree(store)
    return 0 if report.ok and check is not False else 1
