"""The DE test of the cell-eval metrics: Mann-Whitney U by merging sorted columns, its p-values,
Benjamini-Hochberg, fold changes and the ranking, against scipy and values by hand."""

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from pertscale.eval.de import (
    SortedCells,
    de_ranking,
    log2_fold_change,
    mann_whitney_pvalues,
    rank_sum_u,
    shifted_cells,
)


def test_u_and_ties_by_hand():
    a = np.array([[0.0], [1.0], [2.0]])
    b = np.array([[0.0], [0.0], [1.0], [3.0]])
    u, ties = rank_sum_u(a, b)
    # a=0 ties two b's (1), a=1 beats two and ties one (2.5), a=2 beats three (3)
    assert u[0] == 6.5
    # tie groups: value 0 (3 values) and 1 (2 values): (27 - 3) + (8 - 2)
    assert ties[0] == 30.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_u_and_pvalues_equal_scipy_asymptotic_with_ties_and_zeros(dtype):
    rng = np.random.default_rng(0)
    a = (np.round(rng.exponential(1.0, (40, 30)), 1) * (rng.random((40, 30)) > 0.5)).astype(dtype)
    b = (np.round(rng.exponential(1.3, (55, 30)), 1) * (rng.random((55, 30)) > 0.4)).astype(dtype)
    b[:, 0] = 0.0
    a[:, 0] = 0.0  # a gene where every value is tied: p = 1
    u, ties = rank_sum_u(np.sort(a, 0), np.sort(b, 0))
    p = mann_whitney_pvalues(u, ties, 40, 55)
    # NOTE: scipy's own arithmetic follows the input dtype; it gets the same values in float64
    ref = mannwhitneyu(a[:, 1:].astype(np.float64), b[:, 1:].astype(np.float64), axis=0, method="asymptotic",
                       use_continuity=True, alternative="two-sided")
    np.testing.assert_allclose(u[1:], ref.statistic, rtol=0, atol=1e-9)
    np.testing.assert_allclose(p[1:], ref.pvalue, rtol=1e-10, atol=1e-15)
    assert p[0] == 1.0


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="finite"):
        rank_sum_u(np.array([[np.nan]]), np.array([[0.0]]))


def test_fold_change_of_log1p_means():
    lfc = log2_fold_change(np.log1p([3.0, 0.0, 2.0, 0.0]), np.log1p([1.0, 0.0, 0.0, 4.0]))
    np.testing.assert_array_equal(lfc, [np.log2(3.0), 0.0, np.inf, -np.inf])


def test_ranking_keeps_fdr_significant_genes_by_absolute_fold_change():
    pvalues = np.array([0.001, 0.5, 0.002, 0.01, 0.04])
    # BH: sorted p 0.001, 0.002, 0.01, 0.04, 0.5 -> x5/rank: .005, .005, .0167, .05, .5
    # (monotone from the top); FDR < 0.05 keeps genes 0, 2, 3 (gene 4 sits at 0.05)
    lfc = np.array([1.0, 9.0, -np.inf, -2.0, 5.0])
    np.testing.assert_array_equal(de_ranking(lfc, pvalues), [2, 3, 0])


def test_shifted_cells_clip_at_zero_and_stay_sorted():
    ctrl = np.sort(np.array([[0.0, 1.0], [0.5, 2.0], [2.0, 2.5]]), axis=0)
    cells = shifted_cells(ctrl.copy(), np.array([-1.0, 0.5]))
    np.testing.assert_array_equal(cells, [[0.0, 1.5], [0.0, 2.5], [1.0, 3.0]])
    assert (np.diff(cells, axis=0) >= 0).all()


def test_de_against_finds_the_shifted_genes():
    rng = np.random.default_rng(3)
    ctrl = rng.gamma(2.0, 0.5, size=(300, 6))
    pert = rng.gamma(2.0, 0.5, size=(200, 6))
    pert[:, 1] += 2.0
    pert[:, 4] *= 0.2
    de = SortedCells.from_matrix(pert).de_against(SortedCells.from_matrix(ctrl))
    assert de.tolist() == [4, 1] or de.tolist() == [1, 4]
    assert set(de) == {1, 4}
