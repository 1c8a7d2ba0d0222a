"""Differential expression of a perturbation against its control, as cell-eval's DE metrics
compute it (cell-eval 0.8.2 through pdex 0.3.0), on per-cell log1p-normalised values.

Shape legend: N cells of one group, M control cells, G genes.

- Test: two-sided Mann-Whitney U per gene (the asymptotic normal approximation with the
  continuity correction and the tie-corrected variance, as scipy's
  `mannwhitneyu(method="asymptotic")`; p = 1 where every value is tied). U is counted by
  merging the two groups' sorted columns, so a control matrix is sorted once per covariate and
  reused for every perturbation and every model.
- Multiple testing: Benjamini-Hochberg over all genes of the perturbation
  (`scipy.stats.false_discovery_control`); DE genes are those with FDR < 0.05.
- Fold change: log2(expm1(mean_g) / expm1(mean_ctrl)) of the log1p means (pdex's geometric
  pseudo-bulk, no pseudocount): a gene absent from one group has +/-inf, absent from both 0.
- Ranking: DE genes by |log2 fold change|, largest first (infinite first), ties in gene order.

Predicted cells of a model that predicts a mean change (every predictor here) are the control
cells shifted by it and clipped at zero, max(x_ctrl + delta, 0): the AnnData a user would hand
cell-eval, which refuses negative values.
"""

from __future__ import annotations

import dataclasses

import numba
import numpy as np
from scipy.special import ndtr
from scipy.stats import false_discovery_control

__all__ = [
    "FDR_THRESHOLD",
    "SortedCells",
    "de_ranking",
    "log2_fold_change",
    "mann_whitney_pvalues",
    "rank_sum_u",
    "shifted_cells",
]

FDR_THRESHOLD = 0.05


@numba.njit(cache=True, nogil=True)
def _merge_u(a_NG: np.ndarray, b_MG: np.ndarray, u_G: np.ndarray, ties_G: np.ndarray) -> None:
    n, g_count = a_NG.shape
    m = b_MG.shape[0]
    for g in range(g_count):
        i = 0
        j = 0
        u = 0.0
        ties = 0.0
        while i < n or j < m:
            if j >= m or (i < n and a_NG[i, g] < b_MG[j, g]):
                value = a_NG[i, g]
            else:
                value = b_MG[j, g]
            ca = 0
            while i < n and a_NG[i, g] == value:
                ca += 1
                i += 1
            b_before = j
            while j < m and b_MG[j, g] == value:
                j += 1
            cb = j - b_before
            # every a in this tie group beats the b values before it and ties with cb of them
            u += ca * (b_before + 0.5 * cb)
            t = ca + cb
            ties += t * t * t - t
        u_G[g] = u
        ties_G[g] = ties


def rank_sum_u(a_sorted_NG: np.ndarray, b_sorted_MG: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mann-Whitney U of group a against group b per gene, and the tie term sum(t^3 - t) over
    the tie groups of the pooled values; both inputs sorted along axis 0 (cells)."""
    dtype = np.result_type(a_sorted_NG, b_sorted_MG)
    a = np.ascontiguousarray(a_sorted_NG, dtype=dtype)
    b = np.ascontiguousarray(b_sorted_MG, dtype=dtype)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cell matrices must be [cells, genes] over the same genes, got "
                         f"{a.shape} and {b.shape}")
    # NOTE: a NaN would never match itself in the merge; values must be finite
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("cell values must be finite (no NaN / inf) for a Mann-Whitney test")
    u_G, ties_G = np.empty(a.shape[1]), np.empty(a.shape[1])
    _merge_u(a, b, u_G, ties_G)
    return u_G, ties_G


def mann_whitney_pvalues(u_G: np.ndarray, ties_G: np.ndarray, n1: int, n2: int) -> np.ndarray:
    """Two-sided asymptotic p-values with the continuity correction (scipy's formula)."""
    if n1 < 1 or n2 < 1:
        raise ValueError(f"a Mann-Whitney test needs cells in both groups, got {n1} and {n2}")
    n = n1 + n2
    u = np.maximum(u_G, n1 * n2 - u_G)
    s_sq = n1 * n2 / 12.0 * ((n + 1.0) - ties_G / (n * (n - 1.0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u - n1 * n2 / 2.0 - 0.5) / np.sqrt(s_sq)
    p = np.clip(2.0 * ndtr(-z), 0.0, 1.0)
    return np.where(s_sq > 0.0, p, 1.0)


def log2_fold_change(mean_G: np.ndarray, ctrl_mean_G: np.ndarray) -> np.ndarray:
    """log2(expm1(mean) / expm1(ctrl_mean)) of log1p means; 0/0 is 0, x/0 is +/-inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(np.expm1(np.asarray(mean_G, np.float64))
                      / np.expm1(np.asarray(ctrl_mean_G, np.float64)))
    lfc[np.isnan(lfc)] = 0.0
    return lfc


def de_ranking(lfc_G: np.ndarray, pvalues_G: np.ndarray,
               fdr_threshold: float = FDR_THRESHOLD) -> np.ndarray:
    """Indices of the DE genes (Benjamini-Hochberg FDR < threshold), by |lfc| largest first,
    ties in gene order."""
    fdr = false_discovery_control(np.asarray(pvalues_G, np.float64))
    significant = np.flatnonzero(fdr < fdr_threshold)
    # NOTE: cell-eval ranks |lfc| as float32; the cast keeps its order of near-equal changes
    magnitude = np.abs(lfc_G[significant]).astype(np.float32)
    return significant[np.argsort(-magnitude, kind="stable")]


def shifted_cells(ctrl_sorted_MG: np.ndarray, delta_G: np.ndarray) -> np.ndarray:
    """Predicted cells max(x_ctrl + delta, 0), still sorted per gene (a monotone map)."""
    shifted = ctrl_sorted_MG + np.asarray(delta_G, ctrl_sorted_MG.dtype)[None, :]
    return np.maximum(shifted, 0, out=shifted)


@dataclasses.dataclass
class SortedCells:
    """One group's cells [N, G] (log1p values, float32 or float64 as read) with every gene's
    column sorted, and its mean (float64)."""

    sorted_NG: np.ndarray
    mean_G: np.ndarray

    @classmethod
    def from_matrix(cls, x_NG) -> SortedCells:
        dense = np.asarray(x_NG.toarray() if hasattr(x_NG, "toarray") else x_NG)
        if dense.ndim != 2 or dense.shape[0] < 1:
            raise ValueError(f"a cell group needs a [cells, genes] matrix with cells, got "
                             f"{dense.shape}")
        if dense.dtype not in (np.float32, np.float64):
            dense = dense.astype(np.float64)
        return cls(np.sort(dense, axis=0), dense.mean(0, dtype=np.float64))

    @property
    def n(self) -> int:
        return self.sorted_NG.shape[0]

    def de_against(self, ctrl: SortedCells) -> np.ndarray:
        """This group's DE genes against `ctrl`, ranked (see `de_ranking`)."""
        u_G, ties_G = rank_sum_u(self.sorted_NG, ctrl.sorted_NG)
        pvalues = mann_whitney_pvalues(u_G, ties_G, self.n, ctrl.n)
        return de_ranking(log2_fold_change(self.mean_G, ctrl.mean_G), pvalues)
