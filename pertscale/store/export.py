"""`pertscale export STORE --out FILE.h5ad`: cells of a store (a subset) as an .h5ad file, for
tools that need a file.

X is streamed in blocks of cells into growing HDF5 datasets (AnnData's csr_matrix encoding), so
memory holds one block whatever the store's size; obs and var of the selected cells are
written with anndata's own `write_elem`. The file is written as `FILE.h5ad.partial` and renamed
only when complete; an existing file is replaced only with `--overwrite`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertscale.store.format import StoreError
from pertscale.store.reader import open_store

__all__ = ["BLOCK_CELLS", "export_h5ad", "export_main", "select_cells", "select_genes"]

BLOCK_CELLS = 8192  # cells read and written at a time


def select_cells(store: Any, selection: str | None) -> np.ndarray:
    """Rows of the store named by `selection`: None (all), `START:STOP` (a row range) or
    `COLUMN=VALUE[,VALUE...]` (cells whose obs COLUMN is one of the values)."""
    if not selection:
        return np.arange(store.n_cells)
    if "=" in selection:
        column, _, values = selection.partition("=")
        wanted = [v for v in values.split(",") if v]
        col = store.read_obs([column], index=False)[column]
        known = set(map(str, col.cat.categories if hasattr(col, "cat") else col.unique()))
        unknown = [v for v in wanted if v not in known]
        if unknown:
            raise ValueError(f"--cells {selection}: obs column {column!r} has no value(s) "
                             f"{unknown} in store {store.uri}")
        return np.flatnonzero(col.astype(str).isin(wanted).to_numpy())
    start, sep, stop = selection.partition(":")
    try:
        lo = int(start) if start else 0
        hi = int(stop) if stop else store.n_cells
    except ValueError:
        sep = ""
    if not sep or not 0 <= lo <= hi <= store.n_cells:
        raise ValueError(f"--cells {selection!r}: expected START:STOP within [0, "
                         f"{store.n_cells}] or COLUMN=VALUE[,VALUE...]")
    return np.arange(lo, hi)


def select_genes(store: Any, genes: str | None) -> np.ndarray:
    """Gene indices named by `genes`: None (all), comma-separated ids or symbols, or @FILE with
    one per line; kept in the order given."""
    if not genes:
        return np.arange(store.n_genes)
    if genes.startswith("@"):
        names = [line.strip() for line in Path(genes[1:]).read_text().splitlines() if line.strip()]
    else:
        names = [g for g in genes.split(",") if g]
    var = store.var
    by_id = pd.Series(np.arange(len(var)), index=var.index)
    symbols = var["gene_symbol"] if "gene_symbol" in var.columns else pd.Series(dtype=object)
    by_symbol = pd.Series(np.arange(len(var)), index=symbols.to_numpy())
    by_symbol = by_symbol[~by_symbol.index.duplicated()]
    out, unknown = [], []
    for name in names:
        if name in by_id.index:
            out.append(int(by_id[name]))
        elif name in by_symbol.index:
            out.append(int(by_symbol[name]))
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"--genes: {len(unknown)} gene(s) not in store {store.uri} (neither "
                         f"id nor symbol): {unknown[:10]}")
    return np.asarray(out, dtype=np.int64)


def export_h5ad(uri: str, out: str | Path, *, cells: str | None = None,
                genes: str | None = None, overwrite: bool = False,
                block_cells: int = BLOCK_CELLS) -> tuple[int, int]:
    """Write the selected cells and genes of the store at `uri` to `out` (.h5ad); returns
    (cells, genes) written."""
    import anndata as ad
    import h5py

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent} (the folder of --out) does not exist")
    store = open_store(uri)
    rows = select_cells(store, cells)
    cols = select_genes(store, genes)
    obs = store.obs.iloc[rows]
    var = store.var.iloc[cols]
    partial = out.with_name(out.name + ".partial")
    try:
        with h5py.File(partial, "w") as f:
            f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
            ad.io.write_elem(f, "obs", obs)
            ad.io.write_elem(f, "var", var)
            ad.io.write_elem(f, "uns", {"pertscale_export": {
                "store": str(uri), "fingerprint": store.attrs["fingerprint"],
                "cells": cells or "all", "genes": genes or "all"}})
            _write_x(f, store, rows, cols, block_cells)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return len(rows), len(cols)


def _write_x(f: Any, store: Any, rows: np.ndarray, cols: np.ndarray, block_cells: int) -> None:
    """X as AnnData's csr_matrix, appended block by block to growing datasets."""
    x = f.create_group("X")
    x.attrs["encoding-type"], x.attrs["encoding-version"] = "csr_matrix", "0.1.0"
    x.attrs["shape"] = (len(rows), len(cols))
    chunk = (1 << 16,)
    data = x.create_dataset("data", (0,), maxshape=(None,), dtype=np.float32, chunks=chunk)
    indices = x.create_dataset("indices", (0,), maxshape=(None,), dtype=np.int32, chunks=chunk)
    indptr = x.create_dataset("indptr", (len(rows) + 1,), dtype=np.int64)
    all_genes = len(cols) == store.n_genes and np.array_equal(cols, np.arange(store.n_genes))
    nnz, done = 0, 0
    indptr[0] = 0
    # NOTE: grouped by windows of block_cells store rows, so a sparse selection never reads
    # more than one window at a time
    windows = np.flatnonzero(np.diff(rows // block_cells)) + 1
    for want in np.split(rows, windows) if len(rows) else []:
        block = store.read_csr(int(want[0]), int(want[-1]) + 1)[want - want[0]]
        if not all_genes:
            block = block[:, cols]
            block.sort_indices()
        n = block.nnz
        data.resize((nnz + n,))
        indices.resize((nnz + n,))
        data[nnz:nnz + n] = block.data.astype(np.float32, copy=False)
        indices[nnz:nnz + n] = block.indices.astype(np.int32, copy=False)
        indptr[done + 1:done + 1 + len(want)] = nnz + block.indptr[1:]
        nnz += n
        done += len(want)


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pertscale export", description=(
        "Write cells of a store (all, or a subset) as an .h5ad file, in bounded memory."))
    p.add_argument("store")
    p.add_argument("--out", required=True, help="the .h5ad file to write")
    p.add_argument("--cells", default=None,
                   help="START:STOP (rows of the store) or COLUMN=VALUE[,VALUE...] (obs)")
    p.add_argument("--genes", default=None,
                   help="comma-separated gene ids or symbols, or @FILE (one per line)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    if not args.out.endswith(".h5ad"):
        raise StoreError(f"--out {args.out}: expected a .h5ad file name")
    n_cells, n_genes = export_h5ad(args.store, args.out, cells=args.cells, genes=args.genes,
                                   overwrite=args.overwrite)
    print(f"wrote {args.out}: {n_cells} cells x {n_genes} genes")
    return 0
