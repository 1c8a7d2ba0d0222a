"""GenePert: features from embeddings, closed-form ridge equal to sklearn's Ridge."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from pertscale.models.genepert import (
    GenePert,
    embed_perturbations,
    l2_normalize,
    ridge_path_predict,
)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(30, 12)), rng.normal(size=(30, 7)), rng.normal(size=(5, 12))


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("n_rows", [30, 8])  # primal (P >= D) and dual (P < D)
@pytest.mark.parametrize("solver", ["auto", "primal", "dual"])
def test_matches_sklearn_ridge(data, fit_intercept, n_rows, solver):
    x, y, x_new = data
    x, y = x[:n_rows], y[:n_rows]
    ours = GenePert(alpha=0.7, fit_intercept=fit_intercept, solver=solver).fit(x, y)
    ref = Ridge(alpha=0.7, fit_intercept=fit_intercept, solver="cholesky").fit(x, y)
    np.testing.assert_allclose(ours.predict(x_new), ref.predict(x_new), atol=1e-6)
    np.testing.assert_allclose(ours.coef_DG, ref.coef_.T, atol=1e-6)
    np.testing.assert_allclose(ours.intercept_G, ref.intercept_, atol=1e-6)


def test_ridge_path_equals_individual_fits(data):
    x, y, x_new = data
    alphas = [0.01, 1.0, 100.0]
    path = ridge_path_predict(x[:10], y[:10], x_new, alphas)
    for a, pred in zip(alphas, path):
        np.testing.assert_allclose(pred, GenePert(a).fit(x[:10], y[:10]).predict(x_new),
                                   atol=1e-8)


def test_state_dict_round_trip(data):
    x, y, x_new = data
    model = GenePert(2.0).fit(x, y)
    again = GenePert.from_state_dict(model.state_dict(), alpha=2.0)
    np.testing.assert_array_equal(again.predict(x_new), model.predict(x_new))


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        GenePert(alpha=0.0)
    with pytest.raises(ValueError, match="solver"):
        GenePert(solver="svd")
    with pytest.raises(ValueError, match="before fit"):
        GenePert().predict(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="one row per perturbation"):
        GenePert().fit(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="finite"):
        GenePert().fit(np.full((3, 2), np.nan), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="fitted on 2"):
        GenePert().fit(np.eye(3, 2), np.zeros((3, 1))).predict(np.zeros((1, 5)))


GENES = ["A", "B", "C"]
EMB = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])


def test_features_normalise_single_genes():
    feats = embed_perturbations([("A",), ("B",)], GENES, EMB)
    np.testing.assert_allclose(feats, [[1.0, 0.0], [0.0, 1.0]])


def test_combination_sums_normalised_embeddings_then_renormalises():
    # unit(A) + unit(B) = (1, 1) -> (1/sqrt2, 1/sqrt2), independent of raw norms 3 and 2
    feats = embed_perturbations([("A", "B")], GENES, EMB)
    np.testing.assert_allclose(feats, [[2 ** -0.5, 2 ** -0.5]])
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0)


def test_signs_flip_inhibited_genes():
    feats = embed_perturbations([("A", "B"), ("A",)], GENES, EMB, signs=[(1, -1), (-1,)])
    np.testing.assert_allclose(feats, [[2 ** -0.5, -(2 ** -0.5)], [-1.0, 0.0]])


def test_missing_genes_are_listed():
    with pytest.raises(ValueError, match=r"2 perturbed gene\(s\).*\['X', 'Y'\]"):
        embed_perturbations([("A", "Y"), ("X",)], GENES, EMB)


def test_degenerate_inputs_are_errors():
    with pytest.raises(ValueError, match="zero norm.*'Z'"):
        embed_perturbations([("Z",)], ["Z"], np.zeros((1, 2)))
    with pytest.raises(ValueError, match="cancel"):
        embed_perturbations([("A", "A")], GENES, EMB, signs=[(1, -1)])
    with pytest.raises(ValueError, match="no genes"):
        embed_perturbations([()], GENES, EMB)
    with pytest.raises(ValueError, match="shape"):
        embed_perturbations([("A",)], GENES, EMB[:2])


def test_l2_normalize_rows():
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(EMB), axis=1), 1.0)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A simulated screen in a real store, with the simulator's gene embeddings."""
    from pertscale.data.perturbation import PerturbationConfig, load_perturbation_data
    from pertscale.data.splits import simulation_split
    from pertscale.data.synthetic import SimulatorConfig, write_dataset

    out = tmp_path_factory.mktemp("sim")
    cfg = SimulatorConfig(n_genes=300, n_cells=6000, n_cell_types=1, n_batches=1,
                          n_single_perturbations=60, n_double_perturbations=10, seed=3)
    write_dataset(cfg, out / "files", store_uri=str(out / "store"))
    from pertscale.store import open_store

    pcfg = PerturbationConfig(sign_column="perturbation_type",
                              sign_values={"control": 1, "activation": 1, "inhibition": -1})
    data = load_perturbation_data(open_store(str(out / "store")), pcfg)
    return data, simulation_split(data, seed=1), out / "files" / "gene_embeddings.npz"


def test_learns_unseen_single_perturbations(simulated):
    """GenePert with the simulator's gene embeddings beats the train-mean baseline on single
    perturbations of genes never perturbed in training."""
    from pertscale.data.embeddings import load_embeddings
    from pertscale.eval.baselines import TrainMean
    from pertscale.eval.commands import ModelPredictor
    from pertscale.eval.report import score_conditions
    from pertscale.models.genepert import GenePertConfig, fit_genepert

    data, split, emb_path = simulated
    test = split.test["unseen_single"]
    assert len(test) >= 10
    table = load_embeddings(emb_path)
    genepert = ModelPredictor("genepert", fit_genepert(GenePertConfig(alphas=[1.0]), data,
                                                       split.train, features=table), data)
    ours = score_conditions(data, test, genepert.predict_delta(data, test)).mean(numeric_only=True)
    mean = TrainMean().fit(data, split.train)
    base = score_conditions(data, test, mean.predict_delta(data, test)).mean(numeric_only=True)
    assert ours["pearson_delta_de"] > base["pearson_delta_de"] + 0.1
    assert ours["mse_de"] < base["mse_de"]
    assert ours["pearson_delta"] > base["pearson_delta"]


@pytest.fixture
def cv_problem():
    """A ridge problem whose cross-validated best alpha is 10 on the grid 0.1 ... 1000."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12))
    y = x @ rng.normal(size=(12, 5)) * 0.3 + rng.normal(size=(40, 5))
    return x, y, [f"p{i}" for i in range(40)]


@pytest.mark.parametrize("grid", [[1e-3, 1e-2], [1e4, 1e5]])
def test_cv_at_the_edge_of_the_grid_warns_and_extends_it(cv_problem, grid, caplog):
    from pertscale.models.genepert import GenePertConfig, cross_validate_alpha

    x, y, groups = cv_problem
    alpha, _, _ = cross_validate_alpha(x, y, groups, GenePertConfig(alphas=[0.1, 1, 10, 100,
                                                                               1000]))
    assert alpha == 10.0
    with caplog.at_level("WARNING", logger="pertscale.models.genepert"):
        alpha, scores, alphas = cross_validate_alpha(x, y, groups, GenePertConfig(alphas=grid))
    assert alpha == pytest.approx(10.0)
    assert alphas[0] < alpha < alphas[-1]  # the best now lies inside the grid
    assert scores.shape == (5, len(alphas))
    assert "extending the grid" in caplog.text


def test_cv_edge_without_extension_warns_and_keeps_the_grid(cv_problem, caplog):
    from pertscale.models.genepert import GenePertConfig, cross_validate_alpha

    x, y, groups = cv_problem
    with caplog.at_level("WARNING", logger="pertscale.models.genepert"):
        alpha, _, alphas = cross_validate_alpha(
            x, y, groups, GenePertConfig(alphas=[1e-3, 1e-2], extend_grid=False))
    assert (alpha, alphas) == (1e-2, [1e-3, 1e-2])
    assert "the largest alpha tried" in caplog.text and "widen model.alphas" in caplog.text
