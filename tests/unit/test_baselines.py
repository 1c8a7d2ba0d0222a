"""Baselines on a hand-made pseudo-bulk table: each predicts what its definition says."""

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from pertscale.data.embeddings import GeneEmbeddings
from pertscale.data.perturbation import PerturbationData, parse_perturbation
from pertscale.eval.baselines import BASELINES, LinearConfig, build_baseline

N_GENES = 12


def make_data(labels_by_cov: dict[str, list[str]], seed=0) -> PerturbationData:
    """Conditions COV/PERT with random means; 'ctrl' of every covariate included."""
    rng = np.random.default_rng(seed)
    rows, perts = [], {}
    for cov, labels in labels_by_cov.items():
        for label in ["ctrl", *labels]:
            pert = parse_perturbation(label)
            perts[pert.name] = pert
            rows.append({"condition": f"{cov}/{pert.name}", "perturbation": pert.name,
                         "covariate": cov, "n_cells": 50, "is_control": pert.is_control})
    table = pd.DataFrame(rows).set_index("condition")
    mean = rng.normal(1.0, 0.5, size=(len(table), N_GENES))
    genes = [f"G{i}" for i in range(N_GENES)]
    return PerturbationData(genes=genes, symbols=genes, conditions=table, perturbations=perts,
                            mean_XG=mean, var_XG=np.ones_like(mean),
                            de_idx={c: np.arange(5) for c in table.index[~table["is_control"]]},
                            de_nd_idx={c: np.arange(1, 6)
                                       for c in table.index[~table["is_control"]]})


@pytest.fixture
def data():
    return make_data({"t1": ["G0", "G1", "G2", "G0+G1", "G2+G3"],
                      "t2": ["G0", "G1", "G3"]})


TRAIN = ["t1/G0", "t1/G1", "t2/G0", "t2/G1", "t2/G3"]


def test_no_change_predicts_zero_delta(data):
    pred = build_baseline("no_change").fit(data, TRAIN).predict_delta(data, ["t1/G2"])
    np.testing.assert_array_equal(pred, np.zeros((1, N_GENES)))


def test_train_mean_is_mean_training_delta(data):
    pred = build_baseline("train_mean").fit(data, TRAIN).predict_delta(data, ["t1/G2", "t1/G0+G1"])
    expected = np.mean([data.delta(c) for c in TRAIN], axis=0)
    np.testing.assert_allclose(pred, [expected, expected])


def test_additive_sums_pooled_single_effects_and_covers_only_seen_genes(data):
    pred = build_baseline("additive").fit(data, TRAIN).predict_delta(
        data, ["t1/G0+G1", "t1/G2+G3", "t1/G2"])
    g0 = (data.delta("t1/G0") + data.delta("t2/G0")) / 2
    g1 = (data.delta("t1/G1") + data.delta("t2/G1")) / 2
    np.testing.assert_allclose(pred[0], g0 + g1)
    assert np.isnan(pred[1]).all() and np.isnan(pred[2]).all()  # G2 never seen as a single


def _reference_linear(y_GP, a_rows, b_new_rows, k, lam):
    """The paper's formulas written independently: sklearn PCA scores, explicit inverses."""
    a = PCA(n_components=k).fit_transform(y_GP)
    center = y_GP.mean(1, keepdims=True)
    b = a[a_rows].T
    kmat = (np.linalg.inv(a.T @ a + lam * np.eye(k)) @ a.T @ (y_GP - center) @ b.T
            @ np.linalg.inv(b @ b.T + lam * np.eye(k)))
    return (a @ kmat @ a[b_new_rows].T + center).T


def test_linear_matches_reference_formulas(data):
    cfg = LinearConfig(pca_dim=3, ridge=0.5)
    pred = build_baseline("linear", linear=cfg).fit(data, TRAIN).predict_delta(
        data, ["t1/G2", "t1/G0+G1"])
    y_GP = np.stack([data.delta(c) for c in TRAIN]).T
    rows = [0, 1, 0, 1, 3]  # genes of the training perturbations
    expected = _reference_linear(y_GP, rows, [2], 3, 0.5)
    np.testing.assert_allclose(pred[0], expected[0], atol=1e-10)
    # a combination's embedding is the sum of its genes' embeddings: predictions add up
    # around the centre, like the additive model
    single = build_baseline("linear", linear=cfg).fit(data, TRAIN)
    p0, p1 = single.predict_delta(data, ["t1/G0", "t1/G1"])
    np.testing.assert_allclose(pred[1] - single.center_G, (p0 - single.center_G)
                               + (p1 - single.center_G), atol=1e-10)


def test_linear_expression_needs_measured_genes():
    data = make_data({"t": ["G0", "G1", "KLF1"]})
    with pytest.raises(ValueError, match=r"\['KLF1'\] are not measured.*pert_embedding = 'table'"):
        build_baseline("linear").fit(data, ["t/G0", "t/G1", "t/KLF1"])


def test_linear_with_embedding_table():
    data = make_data({"t": ["G0", "G1", "KLF1", "MYC"]})
    table = GeneEmbeddings(genes=["G0", "G1", "KLF1", "MYC"],
                           emb_ND=np.random.default_rng(1).normal(size=(4, 6)))
    model = build_baseline("linear", linear=LinearConfig(pert_embedding="table"), embeddings=table)
    pred = model.fit(data, ["t/G0", "t/G1", "t/KLF1"]).predict_delta(data, ["t/MYC"])
    assert pred.shape == (1, N_GENES) and np.isfinite(pred).all()
    with pytest.raises(ValueError, match="needs an embedding table"):
        build_baseline("linear", linear=LinearConfig(pert_embedding="table"))


def test_unknown_baseline_lists_choices():
    with pytest.raises(ValueError, match=str(sorted(BASELINES)).replace("[", r"\[")):
        build_baseline("median")


def test_matching_mean_averages_the_seen_singles_else_the_train_mean(data):
    pred = build_baseline("matching_mean").fit(data, TRAIN).predict_delta(
        data, ["t1/G0+G1", "t1/G2+G3", "t1/G2"])
    g0 = (data.delta("t1/G0") + data.delta("t2/G0")) / 2
    g1 = (data.delta("t1/G1") + data.delta("t2/G1")) / 2
    np.testing.assert_allclose(pred[0], (g0 + g1) / 2)
    # G2+G3: only G3 has a training single (in t2)
    np.testing.assert_allclose(pred[1], data.delta("t2/G3"))
    # G2 was never seen: the mean delta of every training condition
    np.testing.assert_allclose(pred[2], np.mean([data.delta(c) for c in TRAIN], axis=0))
