"""Pathway activity discrepancy: per perturbation, how far each pathway's activity moves from
control, with an effect size and a test, ranked.

Streaming: `GroupMoments` accumulates per-group count, sum and sum of squares of the per-cell
activities batch by batch (float64), so a store of any size costs O(groups x pathways).
For each perturbed group g against its control c (the control of g's covariate, or all controls
pooled) and each pathway:
- diff = mean_g - mean_c;
- Cohen's d = diff / pooled sd, pooled sd = sqrt(((n_g - 1) var_g + (n_c - 1) var_c) /
  (n_g + n_c - 2)) (sample variances);
- Welch's t-test from the summary statistics (scipy's `ttest_ind_from_stats`, unequal
  variances), two-sided p, Benjamini-Hochberg q over the pathways of the group;
- rank 1 = the largest |d| within the group.

Legend: K groups, P pathways.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["GroupMoments", "discrepancy_table", "plot_discrepancy"]


class GroupMoments:
    """Running count, sum and sum of squares of [cells, P] values per group code."""

    def __init__(self, n_groups: int, n_features: int) -> None:
        self.n_K = np.zeros(n_groups, dtype=np.int64)
        self.sum_KP = np.zeros((n_groups, n_features), dtype=np.float64)
        self.sq_KP = np.zeros((n_groups, n_features), dtype=np.float64)

    def add(self, codes: np.ndarray, values: np.ndarray) -> None:
        """Add cells with group `codes` [n] (negative = no group) and `values` [n, P]."""
        keep = codes >= 0
        codes, values = codes[keep], np.asarray(values, dtype=np.float64)[keep]
        self.n_K += np.bincount(codes, minlength=len(self.n_K))
        np.add.at(self.sum_KP, codes, values)
        np.add.at(self.sq_KP, codes, values * values)

    def mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean [K, P], sample variance [K, P]); NaN where a group has < 1 / < 2 cells."""
        n = self.n_K[:, None].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = self.sum_KP / n
            var = (self.sq_KP - n * mean * mean) / (n - 1)
        return mean, np.maximum(var, 0.0)


def discrepancy_table(moments: GroupMoments, groups: pd.DataFrame, pathway_ids: Sequence[str],
                      pathway_names: Sequence[str], *, min_cells: int = 2) -> pd.DataFrame:
    """The ranked table of the module docstring. `groups` has one row per group code with
    columns `perturbation`, `covariate`, `is_control` and `control` (the code of its control
    group, -1 for controls); groups with fewer than `min_cells` cells are left out."""
    from scipy.stats import false_discovery_control, ttest_ind_from_stats

    mean, var = moments.mean_var()
    n = moments.n_K
    frames = []
    for k, row in groups.iterrows():
        c = int(row["control"])
        if row["is_control"] or c < 0 or n[k] < min_cells or n[c] < min_cells:
            continue
        diff = mean[k] - mean[c]
        pooled = np.sqrt(((n[k] - 1) * var[k] + (n[c] - 1) * var[c]) / (n[k] + n[c] - 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(pooled > 0, diff / pooled, 0.0)
            test = ttest_ind_from_stats(mean[k], np.sqrt(var[k]), n[k], mean[c], np.sqrt(var[c]),
                                        n[c], equal_var=False)
        t = np.nan_to_num(np.asarray(test.statistic, dtype=np.float64))
        p = np.where(np.isnan(test.pvalue), 1.0, test.pvalue)
        frame = pd.DataFrame({
            "perturbation": row["perturbation"], "covariate": row["covariate"],
            "pathway_id": list(pathway_ids), "pathway_name": list(pathway_names),
            "n_cells": int(n[k]), "n_control": int(n[c]), "mean": mean[k],
            "control_mean": mean[c], "diff": diff, "cohens_d": d, "t": t, "p": p,
            "q": false_discovery_control(p)})
        frame = frame.iloc[np.argsort(-np.abs(d), kind="stable")].reset_index(drop=True)
        frame.insert(2, "rank", np.arange(1, len(frame) + 1))
        frames.append(frame)
    if not frames:
        raise ValueError(f"no perturbed group has {min_cells} cells and a control with "
                         f"{min_cells} cells: nothing to compare")
    return pd.concat(frames, ignore_index=True)


def plot_discrepancy(table: pd.DataFrame, *, top: int = 5, max_groups: int = 12):
    """Heatmap of Cohen's d: the union of each group's `top` pathways (rows) by group (columns),
    for the `max_groups` groups with the largest |d|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = table["perturbation"].astype(str)
    if table["covariate"].astype(str).str.len().any():
        label = label + " | " + table["covariate"].astype(str)
    table = table.assign(group=label)
    strongest = (table.assign(abs_d=table["cohens_d"].abs()).groupby("group")["abs_d"].max()
                 .sort_values(ascending=False).index[:max_groups])
    shown = table[table["group"].isin(strongest)]
    rows = list(dict.fromkeys(shown[shown["rank"] <= top]["pathway_id"]))
    grid = (shown.pivot_table(index="pathway_id", columns="group", values="cohens_d")
            .reindex(index=rows, columns=list(strongest)))
    names = shown.drop_duplicates("pathway_id").set_index("pathway_id")["pathway_name"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(strongest), 1.5 + 0.3 * len(rows)))
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) if grid.size else 1.0
    im = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(len(rows)), [f"{r} {str(names.get(r, ''))[:40]}" for r in rows],
                  fontsize=7)
    ax.set_xticks(range(len(strongest)), list(strongest), rotation=60, ha="right", fontsize=7)
    fig.colorbar(im, ax=ax, label="Cohen's d vs control")
    ax.set_title("pathway activity discrepancy", fontsize=9)
    fig.tight_layout()
    return fig
