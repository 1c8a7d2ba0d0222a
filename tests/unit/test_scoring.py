"""Scoring: the three metric families on cell-level data, each against its definition written
out independently here."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertscale.data.perturbation import (
    PerturbationData,
    parse_perturbation,
    top_de_genes,
    welch_t_scores,
)
from pertscale.data.splits import Split
from pertscale.eval.metrics import pearson_delta
from pertscale.eval.scoring import EvalCells, Scorer, metric_columns

GENES = [f"G{i}" for i in range(10)]
LABELS = {"a": ["G0", "G1", "G2", "G3", "G0+G1"], "b": ["G0", "G4"]}


def make_cell_data(seed=0):
    """Cells of every condition (sparse, with ties at 0), the pseudo-bulk data computed from
    them, a split over both covariates and the test cells."""
    rng = np.random.default_rng(seed)
    rows, perts, cells = [], {}, {}
    for cov, labels in LABELS.items():
        base = rng.gamma(2.0, 0.6, size=len(GENES))
        for label in ["ctrl", *labels]:
            pert = parse_perturbation(label)
            perts[pert.name] = pert
            shift = np.zeros(len(GENES)) if pert.is_control else rng.normal(0, 0.8, len(GENES))
            n = 60 if pert.is_control else 30
            x = rng.poisson(np.maximum(base + shift, 0.05), size=(n, len(GENES)))
            cond = f"{cov}/{pert.name}"
            cells[cond] = sp.csr_matrix(np.log1p(x).astype(np.float32))
            rows.append({"condition": cond, "perturbation": pert.name, "covariate": cov,
                         "n_cells": n, "is_control": pert.is_control})
    table = pd.DataFrame(rows).set_index("condition")
    dense = {c: cells[c].toarray().astype(np.float64) for c in table.index}
    mean = np.stack([dense[c].mean(0) for c in table.index])
    var = np.stack([dense[c].var(0, ddof=1) for c in table.index])
    data = PerturbationData(genes=GENES, symbols=GENES, conditions=table, perturbations=perts,
                            mean_XG=mean, var_XG=var, de_idx={})
    for cond in data.perturbed:
        i, c = data.row(cond), data.row(data.control_of(cond))
        scores = welch_t_scores(mean[i], var[i], 30, mean[c], var[c], 60)
        data.de_idx[cond] = top_de_genes(scores, 4)
        data.de_nd_idx[cond] = top_de_genes(scores, 4)
    split = Split("s", train=["a/G0", "a/G1", "b/G0"], val=[],
                  test={"unseen_single": ["a/G2", "a/G3", "b/G4"], "combo_seen2": ["a/G0+G1"]})
    test = [c for conds in split.subgroups().values() for c in conds]
    wanted = test + ["a/ctrl", "b/ctrl"]
    return data, split, EvalCells.from_matrices(data, {c: cells[c] for c in wanted})


@pytest.fixture(scope="module")
def setup():
    return make_cell_data()


def test_metric_columns_follow_the_families():
    assert metric_columns(["systema"]) == ["pearson_delta_pert", "pearson_delta_pert_de",
                                           "centroid_accuracy"]
    with pytest.raises(ValueError, match="'auc'"):
        metric_columns(["auc"])


def test_cell_eval_family_needs_cells(setup):
    data, split, _ = setup
    with pytest.raises(ValueError, match="need the evaluated conditions' cells"):
        Scorer(data, split, ["cell-eval"])


def test_systema_metrics_use_the_perturbed_reference_and_same_covariate_candidates(setup):
    data, split, cells = setup
    scorer = Scorer(data, split, ["systema"], cells)
    delta = data.delta("a/G2") * 0.5 + 0.1
    row = scorer.score(["a/G2"], delta[None]).iloc[0]
    perturbed_a = ["a/G0", "a/G1", "a/G2", "a/G3", "a/G0+G1"]
    ref = np.mean([data.mean(c) for c in perturbed_a], axis=0)
    pred = data.ctrl_mean("a/G2") + delta
    assert row["pearson_delta_pert"] == pytest.approx(pearson_delta(pred, data.mean("a/G2"), ref))
    # candidates: the evaluated conditions of covariate a (b/G4 is another cell type)
    cands = ["a/G2", "a/G3", "a/G0+G1"]
    dist = [np.linalg.norm(pred - data.mean(c)) for c in cands]
    assert row["centroid_accuracy"] == pytest.approx(np.mean([d > dist[0] for d in dist[1:]]))


def test_cell_eval_metrics_on_shifted_clipped_control_cells(setup):
    data, split, cells = setup
    scorer = Scorer(data, split, ["cell-eval"], cells)
    delta = data.delta("a/G3")
    row = scorer.score(["a/G3"], delta[None]).iloc[0]
    ctrl = cells.controls["a"].sorted_NG.astype(np.float64)
    pred_mean = np.maximum(ctrl + delta.astype(np.float32), 0).mean(0)
    true_mean = cells.conditions["a/G3"].mean_G
    assert row["mae"] == pytest.approx(np.abs(pred_mean - true_mean).mean(), rel=1e-6)
    cands = ["a/G2", "a/G3", "a/G0+G1"]
    effects = np.stack([cells.conditions[c].mean_G for c in cands]) - ctrl.mean(0)
    keep = [i for i, g in enumerate(GENES) if g != "G3"]
    dist = np.abs(effects[:, keep] - (pred_mean - ctrl.mean(0))[keep]).sum(1)
    assert row["discrimination_score_l1"] == pytest.approx(1 - (dist < dist[1]).sum() / 3)
    assert 0.0 <= row["overlap_at_n"] <= 1.0 or np.isnan(row["overlap_at_n"])


def test_true_cells_as_prediction_overlap_themselves(setup):
    """A prediction equal to the true mean change recovers most true DE genes; the no-change
    prediction has no predicted DE gene at all."""
    data, split, cells = setup
    scorer = Scorer(data, split, ["cell-eval"], cells)
    conds = ["a/G2", "a/G3", "b/G4"]
    zero = scorer.score(conds, np.zeros((3, len(GENES))))
    assert (zero["overlap_at_n"].fillna(0) == 0).all()
    exact = scorer.score(conds, np.stack([data.delta(c) for c in conds]))
    assert exact["overlap_at_n"].mean() > 0.5
    assert (exact["mae"] < zero["mae"]).all()


def test_uncovered_rows_are_left_out(setup):
    data, split, cells = setup
    scorer = Scorer(data, split, ["gears", "systema", "cell-eval"], cells)
    delta = np.full((2, len(GENES)), np.nan)
    delta[1] = 0.1
    out = scorer.score(["a/G2", "a/G3"], delta)
    assert out["condition"].tolist() == ["a/G3"]
    assert list(out.columns) == ["condition", *scorer.columns]


def test_perturbed_reference_removes_the_shared_shift():
    """Every perturbation shares one large shift plus a small effect of its own: the train mean
    (the shift alone) looks excellent by control-referenced Pearson delta and scores about
    nothing against the perturbed reference, where a prediction of the own effects stays high."""
    from test_baselines import make_data

    data = make_data({"t": ["G0", "G1", "G2", "G3", "G4", "G5"]}, seed=4)
    rng = np.random.default_rng(4)
    ctrl = data.mean("t/ctrl")
    shared = rng.normal(0, 2.0, ctrl.size)
    for cond in data.perturbed:
        data.mean_XG[data.row(cond)] = ctrl + shared + rng.normal(0, 0.3, ctrl.size)
    split = Split("s", train=["t/G0", "t/G1", "t/G2"], val=[],
                  test={"unseen_single": ["t/G3", "t/G4", "t/G5"]})
    scorer = Scorer(data, split, ["gears", "systema"])
    test = split.test["unseen_single"]
    mean = np.mean([data.delta(c) for c in split.train], axis=0)
    base = scorer.score(test, np.tile(mean, (3, 1))).mean(numeric_only=True)
    own = scorer.score(test, np.stack([data.delta(c) for c in test])
                       + rng.normal(0, 0.05, (3, ctrl.size))).mean(numeric_only=True)
    assert base["pearson_delta"] > 0.9
    assert abs(base["pearson_delta_pert"]) < 0.5
    assert own["pearson_delta_pert"] > 0.9
    assert own["centroid_accuracy"] == 1.0
