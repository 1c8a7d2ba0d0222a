"""Our cell-eval metrics equal cell-eval's own (PyPI cell-eval, run in its own venv) on the same
predictions of a simulated screen: MAE, the discrimination score, DE overlap at N, and the
scores normalised against the train-mean baseline."""

from pathlib import Path

import numpy as np
import pytest

from pertscale.bench.celleval import run_celleval_peer, write_celleval_inputs

REPO = Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / ".venv-celleval" / "bin" / "python"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not PEER_PYTHON.exists(),
                       reason="reference venv absent: make .venv-celleval/.installed"),
]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    from pertscale.data.perturbation import PerturbationConfig, load_perturbation_data
    from pertscale.data.splits import SplitConfig, build_split
    from pertscale.data.synthetic import SimulatorConfig, write_dataset
    from pertscale.eval.baselines import build_baseline
    from pertscale.eval.report import evaluate, summarise
    from pertscale.eval.scoring import Scorer, load_eval_cells
    from pertscale.store import open_store

    out = tmp_path_factory.mktemp("celleval")
    cfg = SimulatorConfig(n_genes=150, n_cells=3000, n_cell_types=1, n_batches=1,
                          n_single_perturbations=24, n_double_perturbations=8, seed=5)
    write_dataset(cfg, None, store_uri=str(out / "store"))
    src = open_store(str(out / "store"))
    pcfg = PerturbationConfig(sign_column="perturbation_type",
                              sign_values={"control": 1, "activation": 1, "inhibition": -1})
    data = load_perturbation_data(src, pcfg)
    split = build_split(data, SplitConfig())
    cells = load_eval_cells(src, pcfg, data, split)
    groups = split.subgroups()
    conditions = [c for conds in groups.values() for c in conds]
    rng = np.random.default_rng(0)
    predictions = {}
    for name in ("train_mean", "matching_mean"):
        model = build_baseline(name).fit(data, split.train)
        predictions[name] = model.predict_delta(data, conditions)
    truth = np.stack([data.delta(c) for c in conditions])
    predictions["noisy_truth"] = truth + rng.normal(0, 0.05, truth.shape)
    scorer = Scorer(data, split, ["cell-eval"], cells)
    one_group = type(split)("all", split.train, [], {"all": conditions})
    per = evaluate(scorer, one_group, {m: {"all": p} for m, p in predictions.items()})
    real, preds, labels = write_celleval_inputs(data, cells, conditions, predictions,
                                                out / "inputs")
    theirs = run_celleval_peer(PEER_PYTHON, real, preds, "train_mean", out / "celleval")
    theirs["label"] = dict(zip(conditions, labels))
    return data, per, summarise(per, list(predictions)), theirs


def _theirs(theirs, model, data, per):
    rows = {r["perturbation"]: r for r in theirs["results"][model]}
    ours = per[per["model"] == model]
    return ours, [rows[theirs["label"][c]] for c in ours["condition"]]


@pytest.mark.parametrize("model", ["train_mean", "matching_mean", "noisy_truth"])
def test_per_perturbation_metrics_equal_cell_eval(scored, model):
    data, per, _, theirs = scored
    ours, rows = _theirs(theirs, model, data, per)
    np.testing.assert_allclose(ours["mae"], [r["mae"] for r in rows], rtol=0, atol=1e-6)
    singles = [not data.perturbation(c).is_combo for c in ours["condition"]]
    # NOTE: cell-eval leaves out the var named like the label, so only a single's target gene;
    # we leave out every target gene of a combination too (see the closing note)
    np.testing.assert_allclose(ours["discrimination_score_l1"][singles],
                               [r["discrimination_score_l1"] for r, s in zip(rows, singles) if s],
                               rtol=0, atol=1e-6)
    has_de = ~np.isnan(ours["overlap_at_n"].to_numpy())
    assert has_de.mean() > 0.8
    np.testing.assert_allclose(ours["overlap_at_n"][has_de],
                               [r["overlap_at_N"] for r, d in zip(rows, has_de) if d],
                               rtol=0, atol=1e-6)
    # cell-eval writes 0 where the truth has no DE gene; we leave it undefined
    assert all(r["overlap_at_N"] == 0.0 for r, d in zip(rows, has_de) if not d)


def test_scores_against_the_train_mean_equal_cell_eval(scored):
    _, per, summary, theirs = scored
    if per["overlap_at_n"].isna().any():
        pytest.skip("a condition without true DE genes: cell-eval's mean counts it as 0")
    # (the discrimination scores of combinations differ by design, see above)
    for row in summary.itertuples():
        score = theirs["scores"][row.model]
        assert max(row.norm_mae, 0.0) == pytest.approx(score["mae"], abs=1e-6)
        assert max(row.norm_overlap_at_n, 0.0) == pytest.approx(score["overlap_at_N"], abs=1e-6)
    noisy = theirs["scores"]["noisy_truth"]
    assert noisy["avg_score"] > 0.3  # a near-perfect prediction scores well above the baseline
