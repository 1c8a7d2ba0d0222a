"""Report figures (matplotlib, Agg backend, PNG):

- `plot_de_deltas`: for a few perturbations, the true and every model's predicted expression
  change on the perturbation's top DE genes (one panel per perturbation, genes on x).
- `plot_family_bars`: one panel per metric of a family, one bar per model and baseline,
  grouped by split subgroup.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pertscale.data.perturbation import PerturbationData

__all__ = ["plot_de_deltas", "plot_family_bars"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_de_deltas(data: PerturbationData, conditions: list[str],
                   predicted: dict[str, np.ndarray], path: str | Path, *, title: str = "") -> Path:
    """`predicted[model]` = delta [C, G] for `conditions` (NaN rows = not covered)."""
    plt = _pyplot()
    n = len(conditions)
    if n == 0:
        raise ValueError("plot_de_deltas needs at least one condition")
    fig, axes = plt.subplots(n, 1, figsize=(10, 3.2 * n), squeeze=False)
    markers = "osD^v<>ph*"
    for ax, (i, cond) in zip(axes[:, 0], enumerate(conditions)):
        de = data.de_idx[cond]
        x = np.arange(len(de))
        ax.axhline(0.0, color="0.7", lw=0.8)
        ax.bar(x, data.delta(cond)[de], color="0.85", edgecolor="0.4", label="true")
        for k, (model, delta_CG) in enumerate(predicted.items()):
            if not np.isnan(delta_CG[i]).any():
                # NOTE: fixed colour per model: the cycle would shift when a model skips a panel
                ax.plot(x, delta_CG[i][de], linestyle="none", marker=markers[k % len(markers)],
                        color=f"C{k % 10}", ms=5, label=model)
        ax.set_xticks(x)
        ax.set_xticklabels([data.symbols[g] for g in de], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{cond} (n={data.conditions.at[cond, 'n_cells']} cells)", fontsize=9)
        ax.set_ylabel("change vs control\n(mean log1p expr.)", fontsize=8)
        ax.set_xlabel(f"top {len(de)} DE genes", fontsize=8)
        ax.legend(fontsize=7, ncol=4, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def plot_family_bars(summary: pd.DataFrame, metrics: dict[str, str], path: str | Path, *,
                     model_order: list[str], subgroup_order: list[str], title: str = "") -> Path:
    """One panel per metric of `metrics` (column -> label): grouped bars with subgroups on x,
    one bar per model (missing = not covered, or undefined)."""
    missing = [m for m in metrics if m not in summary.columns]
    if missing:
        raise ValueError(f"metrics {missing} are not summary columns: {list(summary.columns)}")
    if not metrics:
        raise ValueError("plot_family_bars needs at least one metric")
    plt = _pyplot()
    width_in = max(6, 1.6 * len(subgroup_order) * len(model_order) / 3)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(width_in, 3.2 * len(metrics)),
                             squeeze=False)
    width = 0.8 / max(len(model_order), 1)
    x = np.arange(len(subgroup_order))
    for ax, (metric, label) in zip(axes[:, 0], metrics.items()):
        table = summary.set_index(["subgroup", "model"])[metric]
        for k, model in enumerate(model_order):
            values = [table.get((g, model), np.nan) for g in subgroup_order]
            ax.bar(x + (k - (len(model_order) - 1) / 2) * width, values, width, label=model,
                   color=f"C{k % 10}")
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(subgroup_order)
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{label} (mean over perturbations)", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=4, loc="best")
    axes[-1, 0].set_xlabel("split subgroup")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
