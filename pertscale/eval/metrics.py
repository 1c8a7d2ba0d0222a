"""Perturbation metrics: plain functions on numpy vectors of mean expression per gene.

Every function takes one perturbation's vectors (`pred`, `true`, `ctrl`: mean expression over
the same genes, shape [G]) and an optional `genes` index array that restricts the computation
(e.g. the perturbation's top-20 DE genes, the GEARS convention). Each name says what it
computes:

- `pearson_delta`      Pearson correlation of (pred - ctrl) with (true - ctrl)
- `mse`                mean squared error of pred against true (not its root)
- `direction_accuracy` share of genes where sign(pred - ctrl) equals sign(true - ctrl)
- `r2_mean`            coefficient of determination 1 - SS_res / SS_tot of pred against true
                       across genes (sklearn's r2_score on the mean vectors; not a squared r)

An undefined value (Pearson of a constant vector, R^2 of a constant target) is NaN, never a
made-up number: the no-change baseline has no Pearson delta.

`perturbation_metrics` computes the named set the reports use for one perturbation: on all
genes, on the top DE genes ("_de") and on GEARS' top non-dropout DE genes ("_de_nd").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "METRIC_NAMES",
    "direction_accuracy",
    "mse",
    "pearson_delta",
    "perturbation_metrics",
    "r2_mean",
]


def _as_vectors(genes: np.ndarray | None, *arrays: np.ndarray) -> list[np.ndarray]:
    """Check that the arrays are 1-d of equal length and restrict them to `genes`."""
    out = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = out[0].shape
    for a in out:
        if a.ndim != 1 or a.shape != n:
            raise ValueError(
                f"metric inputs must be 1-d vectors of equal length, got shapes "
                f"{[x.shape for x in out]}")
    if genes is not None:
        idx = np.asarray(genes)
        if idx.dtype == bool:
            if idx.shape != n:
                raise ValueError(f"boolean gene mask has shape {idx.shape}, expected {n}")
        elif idx.size and (idx.min() < -n[0] or idx.max() >= n[0]):
            raise ValueError(f"gene indices out of range for {n[0]} genes")
        out = [a[idx] for a in out]
    if out[0].size == 0:
        raise ValueError("metric over an empty gene set")
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    if denom == 0.0:
        return float("nan")
    return float((a * b).sum() / denom)


def pearson_delta(pred: np.ndarray, true: np.ndarray, ctrl: np.ndarray,
                  genes: np.ndarray | None = None) -> float:
    """Pearson correlation of pred - ctrl with true - ctrl over all genes or `genes`."""
    pred, true, ctrl = _as_vectors(genes, pred, true, ctrl)
    return _pearson(pred - ctrl, true - ctrl)


def mse(pred: np.ndarray, true: np.ndarray, genes: np.ndarray | None = None) -> float:
    """Mean of (pred - true)^2 over all genes or `genes`."""
    pred, true = _as_vectors(genes, pred, true)
    return float(np.mean((pred - true) ** 2))


def direction_accuracy(pred: np.ndarray, true: np.ndarray, ctrl: np.ndarray,
                       genes: np.ndarray | None = None) -> float:
    """Share of genes whose predicted change sign(pred - ctrl) equals the true sign(true - ctrl)
    (a gene with no change in both counts as right, a change predicted where none is, wrong)."""
    pred, true, ctrl = _as_vectors(genes, pred, true, ctrl)
    return float(np.mean(np.sign(pred - ctrl) == np.sign(true - ctrl)))


def r2_mean(pred: np.ndarray, true: np.ndarray, genes: np.ndarray | None = None) -> float:
    """1 - sum((true - pred)^2) / sum((true - mean(true))^2) across genes."""
    pred, true = _as_vectors(genes, pred, true)
    ss_tot = float(np.sum((true - true.mean()) ** 2))
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((true - pred) ** 2)) / ss_tot


# name -> function of (pred, true, ctrl, de_idx, de_nd_idx); "_de" metrics use the top DE genes,
# "_de_nd" the top non-dropout DE genes.
_METRICS: dict[str, Callable[..., float]] = {
    "pearson_delta": lambda p, t, c, de, nd: pearson_delta(p, t, c),
    "pearson_delta_de": lambda p, t, c, de, nd: pearson_delta(p, t, c, de),
    "mse": lambda p, t, c, de, nd: mse(p, t),
    "mse_de": lambda p, t, c, de, nd: mse(p, t, de),
    "direction_accuracy_de": lambda p, t, c, de, nd: direction_accuracy(p, t, c, de),
    "r2_mean": lambda p, t, c, de, nd: r2_mean(p, t),
    "pearson_delta_de_nd": lambda p, t, c, de, nd: pearson_delta(p, t, c, nd),
    "mse_de_nd": lambda p, t, c, de, nd: mse(p, t, nd),
}
METRIC_NAMES: tuple[str, ...] = tuple(_METRICS)


def perturbation_metrics(pred: np.ndarray, true: np.ndarray, ctrl: np.ndarray,
                         de_idx: np.ndarray, de_nd_idx: np.ndarray) -> dict[str, float]:
    """Every metric of `METRIC_NAMES` for one perturbation; `de_idx` are its top DE genes,
    `de_nd_idx` its top non-dropout DE genes."""
    return {name: fn(pred, true, ctrl, de_idx, de_nd_idx) for name, fn in _METRICS.items()}
