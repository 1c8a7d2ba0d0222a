"""Scoring one predictor's mean changes on the test conditions of a split, for every metric family
a report shows (`pertscale.eval.metrics.METRIC_FAMILIES`).

- gears      on predicted expression ctrl + delta against the true mean, with the condition's
             top DE genes (the GEARS metrics, unchanged).
- systema    Pearson delta against the perturbed reference (the mean of the centroids of every
             perturbed condition of the covariate, not the control; Systema's
             `average_of_perturbation_centroids`), on all genes and the top DE genes; centroid
             accuracy of ctrl + delta among the true centroids of every test condition of the
             covariate.
- cell-eval  on predicted cells max(x_ctrl + delta, 0) (`pertscale.eval.de`) against the
             condition's real cells, as cell-eval's challenge profile scores a prediction:
             MAE of the pseudo-bulk expression, the discrimination score among every evaluated
             condition of the covariate (target genes left out), and the DE overlap at the true
             DE count. It needs the per-cell values (`EvalCells`, read once per report).

Candidates (for discrimination and centroid accuracy) are every evaluated condition (the
split's subgroups: val and test) of the same covariate, so a score does not depend on how the
evaluated set is cut into subgroups.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from pertscale.data.perturbation import PerturbationData, read_condition_cells
from pertscale.data.splits import Split
from pertscale.eval.de import SortedCells, shifted_cells
from pertscale.eval.metrics import (
    METRIC_FAMILIES,
    centroid_accuracy,
    de_overlap,
    discrimination_score,
    mae,
    pearson_delta,
    perturbation_metrics,
    scgen_metrics,
)

__all__ = ["EvalCells", "Scorer", "load_eval_cells", "metric_columns"]


def metric_columns(families: list[str]) -> list[str]:
    """The metric columns of the chosen families, in family then table order."""
    unknown = sorted(set(families) - set(METRIC_FAMILIES))
    if unknown:
        raise ValueError(f"metric families {unknown} are not among {list(METRIC_FAMILIES)}")
    # NOTE: a metric in two chosen families (r2_mean: gears and scgen) is one column
    return list(dict.fromkeys(m for f in METRIC_FAMILIES if f in families
                              for m in METRIC_FAMILIES[f]))


@dataclasses.dataclass
class EvalCells:
    """Per-cell log1p values of the evaluated conditions and of each covariate's controls."""

    controls: dict[str, SortedCells]  # covariate value ("" = none) -> its control cells
    conditions: dict[str, SortedCells]  # evaluated condition -> its cells

    @classmethod
    def from_matrices(cls, data: PerturbationData, matrices: dict[str, Any]) -> EvalCells:
        """From condition id -> [cells, genes] matrix (dense or sparse), controls included."""
        controls, conditions = {}, {}
        for cond, x in matrices.items():
            cells = SortedCells.from_matrix(x)
            if cells.sorted_NG.shape[1] != len(data.genes):
                raise ValueError(f"cells of {cond} have {cells.sorted_NG.shape[1]} genes; the "
                                 f"data have {len(data.genes)}")
            if bool(data.conditions.at[cond, "is_control"]):
                controls[str(data.conditions.at[cond, "covariate"])] = cells
            else:
                conditions[cond] = cells
        return cls(controls, conditions)


def load_eval_cells(src: Any, cfg: Any, data: PerturbationData, split: Split) -> EvalCells:
    """Read the cells of every evaluated condition (the split's subgroups) and of their controls
    from the open store `src`, with the PerturbationConfig `cfg` the data were computed with."""
    test = [c for conds in split.subgroups().values() for c in conds]
    wanted = sorted(set(test) | {data.control_of(c) for c in test})
    return EvalCells.from_matrices(data, read_condition_cells(src, cfg, data, wanted))


class Scorer:
    """Per-condition metrics of the chosen families for `data` and `split` (`cells` needed for
    the cell-eval family)."""

    def __init__(self, data: PerturbationData, split: Split, families: list[str],
                 cells: EvalCells | None = None) -> None:
        self.data, self.families = data, list(families)
        self.columns = metric_columns(self.families)
        if "cell-eval" in self.families and cells is None:
            raise ValueError("the cell-eval metrics need the evaluated conditions' cells "
                             "(load_eval_cells)")
        self.cells = cells
        test = list(dict.fromkeys(c for conds in split.subgroups().values() for c in conds))
        cov = data.conditions["covariate"].astype(str)
        self._candidates = {v: [c for c in test if cov[c] == v] for v in cov[test].unique()}
        perturbed = data.conditions.index[~data.conditions["is_control"]]
        self._reference = {v: data.mean_XG[[data.row(c) for c in perturbed if cov[c] == v]]
                           .mean(0) for v in self._candidates}
        self._centroids = {v: np.stack([data.mean(c) for c in conds])
                           for v, conds in self._candidates.items()}
        row = data.gene_rows()
        self._targets = {c: np.array(sorted({row[g] for g in data.perturbation(c).genes
                                             if g in row}), dtype=np.int64) for c in test}
        if cells is not None and "cell-eval" in self.families:
            missing = [c for c in test if c not in cells.conditions]
            if missing:
                raise ValueError(f"cells of evaluated condition(s) {missing[:5]} were not read")
            self._true_effects = {
                v: np.stack([cells.conditions[c].mean_G for c in conds])
                - cells.controls[v].mean_G for v, conds in self._candidates.items()}
            self._true_de = {c: cells.conditions[c].de_against(cells.controls[cov[c]])
                             for c in test}

    def _systema(self, cond: str, pred_G: np.ndarray) -> dict[str, float]:
        v = str(self.data.conditions.at[cond, "covariate"])
        ref, true = self._reference[v], self.data.mean(cond)
        return {"pearson_delta_pert": pearson_delta(pred_G, true, ref),
                "pearson_delta_pert_de": pearson_delta(pred_G, true, ref, self.data.de_idx[cond]),
                "centroid_accuracy": centroid_accuracy(
                    pred_G, self._centroids[v], self._candidates[v].index(cond))}

    def _cell_eval(self, cond: str, delta_G: np.ndarray) -> dict[str, float]:
        v = str(self.data.conditions.at[cond, "covariate"])
        ctrl = self.cells.controls[v]
        cells = shifted_cells(ctrl.sorted_NG, delta_G)
        pred = SortedCells(cells, cells.mean(0, dtype=np.float64))
        own = self._candidates[v].index(cond)
        return {"mae": mae(pred.mean_G, self.cells.conditions[cond].mean_G),
                "discrimination_score_l1": discrimination_score(
                    pred.mean_G - ctrl.mean_G, self._true_effects[v], own, self._targets[cond]),
                "overlap_at_n": de_overlap(pred.de_against(ctrl), self._true_de[cond])}

    def score(self, conditions: list[str], delta_CG: np.ndarray) -> pd.DataFrame:
        """One row per condition the prediction covers (a NaN row is not covered)."""
        rows = []
        for cond, delta_G in zip(conditions, np.asarray(delta_CG, dtype=np.float64)):
            if np.isnan(delta_G).any():
                continue
            ctrl_G = self.data.ctrl_mean(cond)
            pred_G = ctrl_G + delta_G
            row: dict[str, Any] = {"condition": cond}
            if "gears" in self.families:
                row.update(perturbation_metrics(pred_G, self.data.mean(cond), ctrl_G,
                                                self.data.de_idx[cond], self.data.de_nd_idx[cond]))
            if "cell-eval" in self.families:
                row.update(self._cell_eval(cond, delta_G))
            if "systema" in self.families:
                row.update(self._systema(cond, pred_G))
            if "scgen" in self.families:
                row.update(scgen_metrics(pred_G, self.data.mean(cond), self.data.de_idx[cond]))
            rows.append(row)
        return pd.DataFrame(rows, columns=["condition", *self.columns])
