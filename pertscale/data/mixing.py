"""How mixed a loader's batches are, measured against the cells' source order.

A loader that shuffles blocks of consecutive stored cells makes batches as mixed as the store's
order allows: on a store written in a sorted file's order, a batch of 1,024 cells in 256-cell
blocks holds 4 runs of one label each. So randomness is counted on the source order (the
file's rows; `pertscale.store.shuffle.source_positions`), not on store positions:

- source blocks per batch: distinct `source_position // block_size` among a batch's cells;
- labels per batch: distinct values of a label column (e.g. the perturbation), beside the number
  a uniformly random batch of the same size would hold (`expected_distinct`), and their ratio.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.special import gammaln

__all__ = ["batch_mixing", "expected_distinct"]


def expected_distinct(counts: np.ndarray, batch_size: int) -> float:
    """Expected number of distinct categories in `batch_size` cells drawn uniformly without
    replacement from a population with `counts[k]` cells of category k:
    sum_k 1 - C(N - n_k, b) / C(N, b)."""
    counts = np.asarray(counts, np.float64)
    counts = counts[counts > 0]
    n, b = counts.sum(), float(batch_size)
    if not 0 < b <= n:
        raise ValueError(f"batch_size={batch_size} must be in [1, {int(n)}] (the cells counted)")
    rest = n - counts
    log_none = np.full(len(counts), -np.inf)  # log P(no cell of category k in the batch)
    ok = rest >= b
    log_none[ok] = (gammaln(rest[ok] + 1) - gammaln(rest[ok] - b + 1)
                    - gammaln(n + 1) + gammaln(n - b + 1))
    return float(np.sum(1.0 - np.exp(log_none)))


def batch_mixing(batches: Iterable[np.ndarray], *, block_size: int,
                 labels: np.ndarray | None = None) -> dict[str, float]:
    """Mixing of batches given as arrays of source positions (0..N-1 over the N cells of the
    source order). `labels[p]` is the label of the cell at source position p. Full batches
    only (a short last batch would lower the means)."""
    batches = [np.asarray(b, np.int64) for b in batches]
    if not batches:
        raise ValueError("no batches to measure")
    size = max(len(b) for b in batches)
    full = [b for b in batches if len(b) == size]
    out = {"batches": float(len(full)), "batch_size": float(size),
           "source_blocks_per_batch": float(np.mean([len(np.unique(b // block_size))
                                                     for b in full]))}
    if labels is not None:
        codes, _ = _codes(labels)
        counts = np.bincount(codes)
        expected = expected_distinct(counts, size)
        mean = float(np.mean([len(np.unique(codes[b])) for b in full]))
        out.update(labels_per_batch=mean, labels_expected=expected,
                   labels_ratio=mean / expected, num_labels=float(np.count_nonzero(counts)))
    return out


def _codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniques, codes = np.unique(np.asarray(labels).astype(str), return_inverse=True)
    return codes.astype(np.int64), uniques
