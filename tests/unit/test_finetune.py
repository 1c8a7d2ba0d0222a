"""The fine-tune driver's pure parts: gene-embedding initialisation from a registered model's
gene table, and the run length derived from epochs."""

from __future__ import annotations

import numpy as np
import pytest

from pertscale.models.gears import gene_init


def test_gene_init_matches_symbols_then_ids_and_projects_to_the_hidden_size():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(5, 6))
    init, mask, matched = gene_init(["A", "B", "ENSG3", "D", "E"], table,
                                    symbols=["B", "X", "C", "A"],
                                    genes=["ENSG2", "ENSG9", "ENSG3", "ENSG1"], hidden=3)
    assert matched == 3 and mask.tolist() == [True, False, True, True]
    assert init.shape == (4, 3) and not init[1].any()
    np.testing.assert_allclose(np.linalg.norm(init[mask], axis=1), 1.0, rtol=1e-6)
    # the projection is onto the table's top principal axes (centred), then unit rows
    centred = table - table.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expect = centred[1] @ vt[:3].T
    np.testing.assert_allclose(init[0], expect / np.linalg.norm(expect), rtol=1e-5)


def test_gene_init_keeps_an_equal_width_table_and_refuses_a_narrower_one():
    table = np.eye(3) * 2.0
    init, mask, matched = gene_init(["A", "B", "C"], table, ["C", "A"], ["g1", "g2"], hidden=3)
    assert matched == 2 and mask.all()
    np.testing.assert_allclose(init, [[0, 0, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="fewer than model.hidden=4"):
        gene_init(["A", "B", "C"], table, ["A"], ["g1"], hidden=4)


def test_progress_keeps_the_best_score_and_counts_epochs_without_improvement():
    from pertscale.training.checkpoint import Progress

    progress = Progress()
    for step, score in ((10, 3.0), (20, 2.0), (30, 2.0), (40, 2.5)):
        progress.step = step
        progress.record_score(score)
    # a tie is not an improvement: the earlier epoch stays the best
    assert (progress.best_score, progress.best_step, progress.stale_epochs) == (2.0, 20, 2)
    progress.step = 50
    assert progress.record_score(1.0) and progress.stale_epochs == 0
    assert progress.best_step == 50
