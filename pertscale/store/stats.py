"""Size factors and highly variable genes from a store's per-gene statistics.

Results equal `scanpy.pp.highly_variable_genes` on the same data:

- flavor "seurat" (scanpy: normalize_total(target_sum=1e4) + log1p, then flavor="seurat"):
  scanpy undoes the log1p (expm1) and takes the mean and variance of the normalised counts. The
  writer accumulates per-gene sums and sums of squares of exactly those values during ingest
  (x / n_counts * 1e4 for raw counts; expm1(x) for a store of log-normalised values), so this
  needs no pass over the matrix. The target sum is fixed at 1e4 (scanpy's common choice);
  binning and normalised dispersions follow scanpy's seurat flavor.
- flavor "seurat_v3" (scanpy on raw counts): mean/variance from the ingest statistics, a loess
  fit of log10 variance on log10 mean (scikit-misc, as scanpy), then per-gene sums of counts
  clipped at mean + sqrt(n_cells) * regularised sd. The clip value depends on the fit, so this
  flavor makes one streaming pass over the store in row blocks (bounded memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from pertscale.store.format import N_COUNTS, StoreError

__all__ = ["FLAVORS", "clipped_sums", "highly_variable_genes", "size_factors"]


def size_factors(store: Any, target_sum: float | None = None) -> pd.Series:
    """Per-cell n_counts / target_sum (scanpy normalize_total's divisor); target_sum None =
    the median of the nonzero n_counts, as scanpy."""
    n_counts = np.asarray(store.obs[N_COUNTS], dtype=np.float64)
    if target_sum is None:
        nonzero = n_counts[n_counts > 0]
        if nonzero.size == 0:
            raise ValueError(f"store {store.uri}: every cell has zero counts")
        target_sum = float(np.median(nonzero))
    if not target_sum > 0:
        raise ValueError(f"target_sum={target_sum} must be > 0")
    return pd.Series(n_counts / target_sum, index=store.obs.index, name="size_factor")


def _mean_var(total: np.ndarray, total_sq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    mean = total / n
    var = total_sq / n - mean ** 2
    if n > 1:
        var *= n / (n - 1)  # unbiased, as scanpy
    return mean, np.maximum(var, 0.0)


def _hvg_seurat(store: Any, *, n_top_genes: int | None = None, n_bins: int = 20,
                min_mean: float = 0.0125, max_mean: float = 3.0, min_disp: float = 0.5,
                max_disp: float = np.inf) -> pd.DataFrame:
    stats = store.read_stats()
    n = store.n_cells
    mean, var = _mean_var(stats["seurat_sum"], stats["seurat_sum_sq"], n)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    dispersion = np.log(dispersion)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = grouped["dev"].isnull()  # a bin with one gene: its normalised dispersion is 1
    grouped.loc[single, "dev"] = grouped.loc[single, "avg"]
    grouped.loc[single, "avg"] = 0
    per_gene = grouped.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - per_gene["avg"]) / per_gene["dev"]
    norm = df["dispersions_norm"].to_numpy()
    if n_top_genes is not None:
        valid = np.sort(norm[~np.isnan(norm)])[::-1]
        k = min(n_top_genes, store.n_genes, valid.size)
        cut = valid[k - 1]
        df["highly_variable"] = np.nan_to_num(norm, nan=-np.inf) >= cut
    else:
        d = np.nan_to_num(norm)
        df["highly_variable"] = ((mean > min_mean) & (mean < max_mean)
                                 & (d > min_disp) & (d < max_disp))
    df.index = store.var.index
    return df.drop(columns="mean_bin")


def clipped_sums(store: Any, clip_val: np.ndarray, *, block_cells: int = 65536,
                 in_flight: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene sum and sum of squares of min(x, clip_val[gene]) over the stored nonzeros,
    in one streaming pass of row blocks (`in_flight` reads overlapped)."""
    g = store.n_genes
    total, total_sq = np.zeros(g), np.zeros(g)
    starts = list(range(0, store.n_cells, block_cells))
    pending = [store.read_csr_async(s, min(s + block_cells, store.n_cells))
               for s in starts[:in_flight]]
    nxt = in_flight
    while pending:
        csr = pending.pop(0).result()
        if nxt < len(starts):
            s = starts[nxt]
            pending.append(store.read_csr_async(s, min(s + block_cells, store.n_cells)))
            nxt += 1
        x = np.minimum(csr.data.astype(np.float64), clip_val[csr.indices])
        total += np.bincount(csr.indices, weights=x, minlength=g)
        total_sq += np.bincount(csr.indices, weights=x * x, minlength=g)
    return total, total_sq


def _hvg_seurat_v3(store: Any, *, n_top_genes: int | None = None, span: float = 0.3,
                   block_cells: int = 65536) -> pd.DataFrame:
    if not store.raw_counts:
        raise ValueError(f"store {store.uri} holds normalised values; flavor 'seurat_v3' needs "
                         "raw counts (use flavor 'seurat')")
    try:
        from skmisc.loess import loess
    except ImportError as e:
        raise ImportError("flavor 'seurat_v3' needs scikit-misc (pip install scikit-misc)") from e
    n_top_genes = 2000 if n_top_genes is None else n_top_genes
    stats = store.read_stats()
    n = store.n_cells
    mean, var = _mean_var(stats["sum"], stats["sum_sq"], n)
    not_const = var > 0
    estimated = np.zeros(store.n_genes)
    model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span, degree=2)
    model.fit()
    estimated[not_const] = model.outputs.fitted_values
    reg_std = np.sqrt(10 ** estimated)
    clip_val = reg_std * np.sqrt(n) + mean
    total, total_sq = clipped_sums(store, clip_val, block_cells=block_cells)
    norm_var = (n * mean ** 2 + total_sq - 2 * total * mean) / ((n - 1) * reg_std ** 2)
    rank = np.argsort(np.argsort(-norm_var)).astype(np.float32)
    rank[rank >= n_top_genes] = np.nan
    df = pd.DataFrame({"means": mean, "variances": var, "variances_norm": norm_var,
                       "highly_variable_rank": rank}, index=store.var.index)
    order = df.sort_values("highly_variable_rank", na_position="last").index
    df["highly_variable"] = False
    df.loc[order[:n_top_genes], "highly_variable"] = True
    return df


FLAVORS: dict[str, Callable[..., pd.DataFrame]] = {
    "seurat": _hvg_seurat,
    "seurat_v3": _hvg_seurat_v3,
}


def highly_variable_genes(store: Any, flavor: str = "seurat", **kwargs: Any) -> pd.DataFrame:
    """Per-gene HVG table (scanpy's columns for the flavor) computed from the store's
    statistics; see the module docstring for what each flavor reads."""
    if flavor not in FLAVORS:
        raise ValueError(f"flavor={flavor!r} is not one of {sorted(FLAVORS)}")
    if store.n_cells < 2:
        raise StoreError(f"store {store.uri} has {store.n_cells} cell(s); HVGs need at least 2")
    return FLAVORS[flavor](store, **kwargs)
