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
- `r2_pearson`         squared Pearson correlation of pred with true across genes: the "R^2 of
                       mean expression" scGen reports (its reg_mean_plot: scipy linregress r^2),
                       on all genes (`r2_pearson_mean`) and on the top DE genes
                       (`r2_pearson_mean_de`; scGen uses the top 100 of stimulated vs control)

An undefined value (Pearson of a constant vector, R^2 of a constant target) is NaN, never a
made-up number: the no-change baseline has no Pearson delta.

`perturbation_metrics` computes the named set the reports use for one perturbation: on all
genes, on the top DE genes ("_de") and on GEARS' top non-dropout DE genes ("_de_nd").

The metrics the field now scores by (cell-eval's challenge profile, Systema), each defined in
its docstring:

- `mae`                    mean absolute error of the pseudo-bulk expression (cell-eval)
- `discrimination_score`   1 - rank / N of the true effect among all N test effects (cell-eval)
- `de_overlap`             shared top DE genes of prediction and truth at the true DE count
                           (cell-eval's overlap_at_N)
- `centroid_accuracy`      share of other true centroids farther than the own one (Systema)

`METRIC_FAMILIES` names the metrics of each family a report can show; `BEST_VALUE` says which
end of each metric is best (for the normalised scores).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "BEST_VALUE",
    "DEFAULT_FAMILIES",
    "METRIC_FAMILIES",
    "METRIC_NAMES",
    "centroid_accuracy",
    "de_overlap",
    "direction_accuracy",
    "discrimination_score",
    "mae",
    "mse",
    "pearson_delta",
    "perturbation_metrics",
    "r2_mean",
    "r2_pearson",
    "scgen_metrics",
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


def mae(pred: np.ndarray, true: np.ndarray, genes: np.ndarray | None = None) -> float:
    """Mean of |pred - true| over all genes or `genes`: cell-eval's `mae` (sklearn's
    mean_absolute_error of the predicted and true pseudo-bulk expression of a perturbation)."""
    pred, true = _as_vectors(genes, pred, true)
    return float(np.mean(np.abs(pred - true)))


def discrimination_score(pred_effect_G: np.ndarray, true_effects_PG: np.ndarray, own: int,
                         exclude: np.ndarray | None = None) -> float:
    """cell-eval's perturbation discrimination score (`discrimination_score_l1`, the Virtual Cell
    Challenge's PDS): rank the true effects (expression minus control) of all N candidate
    perturbations, row `own` being the predicted one's, by L1 distance to the predicted effect,
    over the genes not in `exclude` (the perturbation's target genes); with rank = the number
    of candidates strictly nearer than the own one (0 = nearest), the score is 1 - rank / N.
    1 is perfect; a prediction that tells nothing scores about 0.5."""
    true_effects_PG = np.asarray(true_effects_PG, dtype=np.float64)
    n, g = true_effects_PG.shape
    if not 0 <= own < n:
        raise ValueError(f"own row {own} is outside the {n} candidate perturbations")
    keep = np.ones(g, dtype=bool)
    if exclude is not None:
        keep[np.asarray(exclude, dtype=np.int64)] = False
    pred, = _as_vectors(np.flatnonzero(keep), pred_effect_G)
    dist_P = np.abs(true_effects_PG[:, keep] - pred[None, :]).sum(1)
    rank = int((dist_P < dist_P[own]).sum())
    return 1.0 - rank / n


def centroid_accuracy(pred_G: np.ndarray, true_centroids_PG: np.ndarray, own: int) -> float:
    """Systema's centroid accuracy (Vinas Torne et al., Nat. Biotechnol. 2025,
    `centroid_accuracy.py`): the share of the other P - 1 true centroids (pseudo-bulk
    expression of the candidate perturbations) that lie strictly farther, in Euclidean
    distance, from the predicted profile than the perturbation's own centroid (row `own`).
    1 = nearest to its own; NaN with a single candidate."""
    true_centroids_PG = np.asarray(true_centroids_PG, dtype=np.float64)
    n = true_centroids_PG.shape[0]
    if not 0 <= own < n:
        raise ValueError(f"own row {own} is outside the {n} candidate perturbations")
    if n < 2:
        return float("nan")
    pred, = _as_vectors(None, pred_G)
    dist_P = np.sqrt(((true_centroids_PG - pred[None, :]) ** 2).sum(1))
    return float((dist_P > dist_P[own]).sum() / (n - 1))


def de_overlap(pred_de: np.ndarray, true_de: np.ndarray) -> float:
    """cell-eval's `overlap_at_N`: with N the number of true DE genes and both lists ranked
    (DE by a Wilcoxon test at FDR 0.05, by |log2 fold change|; `pertscale.eval.de`), the share
    of the true list found among the first N predicted DE genes (all of them when fewer).
    NaN when the perturbation has no true DE gene (cell-eval writes 0 there)."""
    true_de, pred_de = np.asarray(true_de), np.asarray(pred_de)
    n = true_de.size
    if n == 0:
        return float("nan")
    return float(np.intersect1d(true_de, pred_de[:n]).size / n)


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


def r2_pearson(pred: np.ndarray, true: np.ndarray, genes: np.ndarray | None = None) -> float:
    """Squared Pearson correlation of pred with true across genes (NaN if either is constant)."""
    pred, true = _as_vectors(genes, pred, true)
    if pred.std() == 0 or true.std() == 0:
        return float("nan")
    return float(np.corrcoef(pred, true)[0, 1] ** 2)


def scgen_metrics(pred: np.ndarray, true: np.ndarray, de_idx: np.ndarray) -> dict[str, float]:
    """The scgen family for one perturbation: R^2 of means as scGen reports it (squared
    Pearson), on all genes and on the top DE genes."""
    return {"r2_pearson_mean": r2_pearson(pred, true),
            "r2_pearson_mean_de": r2_pearson(pred, true, de_idx)}


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

# The families a report can show (`report.metrics`), each with its metrics in table order.
METRIC_FAMILIES: dict[str, tuple[str, ...]] = {
    "gears": METRIC_NAMES,
    "cell-eval": ("mae", "discrimination_score_l1", "overlap_at_n"),
    "systema": ("pearson_delta_pert", "pearson_delta_pert_de", "centroid_accuracy"),
    "scgen": ("r2_pearson_mean", "r2_pearson_mean_de", "r2_mean"),
}
# The families a report shows unless its config says otherwise.
DEFAULT_FAMILIES: tuple[str, ...] = ("gears", "cell-eval", "systema")
# Best value of each metric: 0 (lower is better) or 1 (higher is better); R^2 and the Pearson
# family are bounded by 1 as well.
BEST_VALUE: dict[str, int] = {
    **{m: 0 for m in ("mse", "mse_de", "mse_de_nd", "mae")},
    **{m: 1 for m in ("pearson_delta", "pearson_delta_de", "pearson_delta_de_nd",
                      "direction_accuracy_de", "r2_mean", "discrimination_score_l1",
                      "overlap_at_n", "pearson_delta_pert", "pearson_delta_pert_de",
                      "centroid_accuracy", "r2_pearson_mean", "r2_pearson_mean_de")},
}


def perturbation_metrics(pred: np.ndarray, true: np.ndarray, ctrl: np.ndarray,
                         de_idx: np.ndarray, de_nd_idx: np.ndarray) -> dict[str, float]:
    """Every metric of `METRIC_NAMES` for one perturbation; `de_idx` are its top DE genes,
    `de_nd_idx` its top non-dropout DE genes."""
    return {name: fn(pred, true, ctrl, de_idx, de_nd_idx) for name, fn in _METRICS.items()}
