"""Metrics against values computed by hand."""

import numpy as np
import pytest

from pertscale.eval.metrics import (
    BEST_VALUE,
    METRIC_FAMILIES,
    METRIC_NAMES,
    centroid_accuracy,
    de_overlap,
    direction_accuracy,
    discrimination_score,
    mae,
    mse,
    pearson_delta,
    perturbation_metrics,
    r2_mean,
)

CTRL = np.array([1.0, 1.0, 1.0, 1.0])
TRUE = np.array([2.0, 0.0, 1.0, 3.0])   # delta  1, -1, 0, 2
PRED = np.array([1.5, 0.5, 2.0, 2.0])   # delta .5, -.5, 1, 1


def test_pearson_delta_by_hand():
    # deltas a=(.5,-.5,1,1) mean .5 -> (0,-1,.5,.5); b=(1,-1,0,2) mean .5 -> (.5,-1.5,-.5,1.5)
    # cov = 0 + 1.5 - .25 + .75 = 2.0; |a|^2 = 1.5; |b|^2 = .25+2.25+.25+2.25 = 5
    assert pearson_delta(PRED, TRUE, CTRL) == pytest.approx(2.0 / np.sqrt(1.5 * 5.0))


def test_pearson_delta_on_gene_subset():
    # genes 0, 1, 3: a=(.5,-.5,1) b=(1,-1,2); centred a=(1/3-... ) computed explicitly
    a = np.array([0.5, -0.5, 1.0]) - 1 / 3
    b = np.array([1.0, -1.0, 2.0]) - 2 / 3
    expected = (a @ b) / np.sqrt((a @ a) * (b @ b))
    assert pearson_delta(PRED, TRUE, CTRL, genes=np.array([0, 1, 3])) == pytest.approx(expected)


def test_pearson_delta_differs_from_pearson_of_means():
    # shifting ctrl changes the deltas' correlation, not a Pearson of raw means
    ctrl = np.array([0.0, 2.0, 1.0, 1.0])
    assert pearson_delta(PRED, TRUE, ctrl) != pytest.approx(pearson_delta(PRED, TRUE, CTRL))


def test_pearson_delta_of_no_change_is_nan():
    assert np.isnan(pearson_delta(CTRL, TRUE, CTRL))


def test_mse_is_mean_square_not_root():
    # errors .5, -.5, 1, -1 -> squares .25 .25 1 1 -> mean .625
    assert mse(PRED, TRUE) == pytest.approx(0.625)
    assert mse(PRED, TRUE, genes=[2, 3]) == pytest.approx(1.0)


def test_direction_accuracy_by_hand():
    # signs pred (+,-,+,+) vs true (+,-,0,+): 3 of 4 agree
    assert direction_accuracy(PRED, TRUE, CTRL) == pytest.approx(0.75)
    assert direction_accuracy(PRED, TRUE, CTRL, genes=[0, 1]) == 1.0
    mask = np.array([False, False, True, False])
    assert direction_accuracy(PRED, TRUE, CTRL, genes=mask) == 0.0


def test_r2_mean_by_hand():
    # true mean 1.5, SS_tot = .25+2.25+.25+2.25 = 5; SS_res = 2.5 -> R^2 = .5
    assert r2_mean(PRED, TRUE) == pytest.approx(0.5)
    assert r2_mean(TRUE, TRUE) == 1.0
    assert np.isnan(r2_mean(PRED, CTRL))


def test_perturbation_metrics_names_and_de_subsets():
    out = perturbation_metrics(PRED, TRUE, CTRL, np.array([0, 1]), np.array([2, 3]))
    assert tuple(out) == METRIC_NAMES
    assert out["mse_de"] == pytest.approx(0.25)
    assert out["pearson_delta_de"] == pytest.approx(1.0)
    assert out["mse"] == pytest.approx(0.625)
    # non-dropout DE genes 2, 3: errors 1 and 1; deltas (1, 1) vs (0, 2): Pearson undefined
    assert out["mse_de_nd"] == pytest.approx(1.0)
    assert np.isnan(out["pearson_delta_de_nd"])


@pytest.mark.parametrize("bad", [np.zeros(3), np.zeros((4, 1))])
def test_shape_mismatch_is_an_error(bad):
    with pytest.raises(ValueError, match="equal length"):
        mse(bad, TRUE)


def test_empty_or_out_of_range_genes_are_errors():
    with pytest.raises(ValueError, match="empty"):
        mse(PRED, TRUE, genes=np.array([], dtype=int))
    with pytest.raises(ValueError, match="out of range"):
        mse(PRED, TRUE, genes=[7])


def test_mae_is_mean_absolute_error_of_expression():
    # |1-1|, |2-3|, |0-2|, |4-3| -> (0 + 1 + 2 + 1) / 4
    assert mae([1.0, 2.0, 0.0, 4.0], [1.0, 3.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert mae([1.0, 2.0, 0.0, 4.0], [1.0, 3.0, 2.0, 3.0], genes=[2, 3]) == pytest.approx(1.5)


# three candidate perturbations' true effects over 3 genes (gene 2 is the target of row 0)
EFFECTS = np.array([[1.0, 0.0, -5.0],
                    [0.0, 1.0, 0.0],
                    [2.0, 2.0, 0.0]])


def test_discrimination_score_ranks_the_true_effect_by_l1_distance():
    # predicted (0.9, 0.1, 0): L1 to rows 0..2 over genes 0, 1 (target 2 left out): 0.2, 1.8, 3.0
    assert discrimination_score([0.9, 0.1, 0.0], EFFECTS, 0, exclude=[2]) == 1.0
    # with the target gene kept, row 0 is at 5.2 and two rows are nearer: 1 - 2/3
    assert discrimination_score([0.9, 0.1, 0.0], EFFECTS, 0) == pytest.approx(1 / 3)
    # predicted (0.6, 1.5, 0): L1 over genes 0, 1 to rows 0..2: 1.9, 1.1, 1.9
    assert discrimination_score([0.6, 1.5, 0.0], EFFECTS, 1, exclude=[2]) == 1.0
    # own row 2: row 1 is nearer, row 0 ties (a tie is not nearer): rank 1 of 3
    assert discrimination_score([0.6, 1.5, 0.0], EFFECTS, 2, exclude=[2]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="outside the 3 candidate"):
        discrimination_score([0.0, 0.0, 0.0], EFFECTS, 3)


def test_centroid_accuracy_is_share_of_other_centroids_farther_than_own():
    centroids = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # prediction (1.2, 0): distances 1.2, 0.8, 2.33, 3.36 -> own row 0 beats rows 2 and 3 of 3
    assert centroid_accuracy([1.2, 0.0], centroids, 0) == pytest.approx(2 / 3)
    assert centroid_accuracy([1.2, 0.0], centroids, 1) == 1.0
    assert centroid_accuracy([3.0, 3.0], centroids, 0) == 0.0
    assert np.isnan(centroid_accuracy([1.0, 1.0], centroids[:1], 0))


def test_de_overlap_at_the_true_de_count():
    true_de = np.array([4, 1, 7])
    # first 3 predicted DE genes are 1, 9, 4: two of the three true ones
    assert de_overlap(np.array([1, 9, 4, 7, 2]), true_de) == pytest.approx(2 / 3)
    # fewer predicted DE genes than true ones: all of them count
    assert de_overlap(np.array([7]), true_de) == pytest.approx(1 / 3)
    assert de_overlap(np.array([], dtype=int), true_de) == 0.0
    assert np.isnan(de_overlap(np.array([1, 2]), np.array([], dtype=int)))


def test_every_family_metric_has_a_best_value():
    for family, names in METRIC_FAMILIES.items():
        assert set(names) <= set(BEST_VALUE), family


def test_r2_pearson_is_scgens_squared_correlation_of_means():
    """scGen's R^2 of means is the squared Pearson r (scipy linregress), not 1 - SSres/SStot:
    a prediction off by a constant factor keeps R^2 = 1 but loses the coefficient of
    determination."""
    from scipy.stats import linregress

    from pertscale.eval.metrics import r2_mean, r2_pearson, scgen_metrics

    rng = np.random.default_rng(0)
    true = rng.gamma(2.0, 1.0, 200)
    pred = true + rng.normal(0, 0.5, 200)
    assert r2_pearson(pred, true) == pytest.approx(linregress(pred, true).rvalue ** 2, rel=1e-12)
    assert r2_pearson(2 * true + 1, true) == pytest.approx(1.0)
    assert r2_mean(2 * true + 1, true) < 0
    de = np.argsort(-true)[:100]
    out = scgen_metrics(pred, true, de)
    assert out["r2_pearson_mean_de"] == pytest.approx(
        linregress(pred[de], true[de]).rvalue ** 2, rel=1e-12)
    assert np.isnan(r2_pearson(np.ones(5), true[:5]))
