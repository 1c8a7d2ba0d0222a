"""The report: per-condition scores, means per subgroup and model, normalised scores, one markdown
table per metric family, plots."""

import numpy as np
import pytest
from test_scoring import make_cell_data  # tests/unit is on sys.path (rootdir-less prepend import)

from pertscale.eval.baselines import build_baseline
from pertscale.eval.metrics import METRIC_FAMILIES, pearson_delta
from pertscale.eval.plots import plot_de_deltas, plot_family_bars
from pertscale.eval.report import (
    HEADERS,
    evaluate,
    markdown_table,
    metrics_for_logging,
    normalise,
    summarise,
    write_report,
)
from pertscale.eval.scoring import Scorer

FAMILIES = list(METRIC_FAMILIES)
MODELS = ("no_change", "train_mean", "additive", "matching_mean")


@pytest.fixture(scope="module")
def setup():
    data, split, cells = make_cell_data()
    preds = {}
    for name in MODELS:
        model = build_baseline(name).fit(data, split.train)
        preds[name] = {g: model.predict_delta(data, c) for g, c in split.subgroups().items()}
    scorer = Scorer(data, split, FAMILIES, cells)
    return data, split, preds, evaluate(scorer, split, preds)


def test_summary_means_and_coverage(setup):
    data, split, preds, per = setup
    summary = summarise(per, list(preds))
    # additive covers only the combination of two seen genes
    assert set(summary[summary["model"] == "additive"]["subgroup"]) == {"combo_seen2"}
    row = summary[(summary["model"] == "train_mean") & (summary["subgroup"] == "combo_seen2")]
    mean = np.mean([data.delta(c) for c in split.train], axis=0)
    ctrl = data.ctrl_mean("a/G0+G1")
    assert row["pearson_delta"].item() == pytest.approx(
        pearson_delta(ctrl + mean, data.mean("a/G0+G1"), ctrl))
    assert row["n"].item() == 1
    unseen = per[(per["model"] == "matching_mean") & (per["subgroup"] == "unseen_single")]
    assert summary[(summary["model"] == "matching_mean")
                   & (summary["subgroup"] == "unseen_single")]["mae"].item() == pytest.approx(
        unseen["mae"].mean())
    assert np.isnan(summary[summary["model"] == "no_change"]["pearson_delta"]).all()


def test_scores_normalised_against_train_mean_as_cell_eval(setup):
    *_, per = setup
    summary = summarise(per, list(MODELS))
    base = summary[summary["model"] == "train_mean"].set_index("subgroup")
    for r in summary.itertuples():
        b = base.loc[r.subgroup]
        assert r.norm_mae == pytest.approx(1 - r.mae / b["mae"])
        with np.errstate(divide="ignore", invalid="ignore"):  # a perfect base leaves NaN / inf
            expected = ((r.discrimination_score_l1 - b["discrimination_score_l1"])
                        / (1 - b["discrimination_score_l1"]))
        assert r.norm_discrimination_score_l1 == pytest.approx(expected, nan_ok=True)
        parts = [r.norm_mae, r.norm_discrimination_score_l1, r.norm_overlap_at_n]
        assert r.vcc_score == pytest.approx(np.mean([max(0.0, 0.0 if not np.isfinite(p) else p)
                                                     for p in parts]))
    train = summary[summary["model"] == "train_mean"]
    assert (train["norm_mae"] == 0).all()
    # no train_mean row: nothing to normalise against
    assert "norm_mae" not in normalise(summary[summary["model"] != "train_mean"]
                                       .drop(columns=[c for c in summary if c.startswith("norm_")]
                                             + ["vcc_score"])).columns


def test_one_table_per_family_and_logged_metrics(setup):
    _, split, preds, per = setup
    summary = summarise(per, list(preds))
    table = markdown_table(summary, list(split.subgroups()))
    for family in FAMILIES:
        assert f"### {family} metrics" in table
    assert "| subgroup | model | n | MAE | discrimination (L1) | DE overlap at N |" in table
    assert "| subgroup | model | n | Pearson delta vs perturbed |" in table
    assert "VCC score" in table
    assert "| combo_seen2 | additive | 1 |" in table
    assert "| unseen_single | no_change | 3 | n/a |" in table
    only = summarise(per[["subgroup", "model", "condition", *METRIC_FAMILIES["gears"]]],
                     list(preds))
    gears_only = markdown_table(only, list(split.subgroups()))
    assert "### gears metrics" in gears_only and "cell-eval" not in gears_only
    logged = metrics_for_logging(summary)
    assert "combo_seen2/additive/mse_de" in logged
    assert "unseen_single/additive/norm_mae" not in logged  # additive covers no unseen single
    assert "unseen_single/matching_mean/norm_discrimination_score_l1" in logged
    assert "unseen_single/no_change/pearson_delta" not in logged  # NaN is not logged


def test_written_report_has_split_json_and_per_condition_csv(setup, tmp_path):
    import json

    import pandas as pd

    data, split, preds, per = setup
    summary = summarise(per, list(preds))
    report = write_report(tmp_path, title="t", data=data, split=split, per_condition=per,
                          summary=summary, meta={}, plots=[])
    assert report.read_text().count("###") == len(FAMILIES) + 1  # + the normalised scores
    assert json.loads((tmp_path / "split.json").read_text())["test"] == split.test
    written = pd.read_csv(tmp_path / "per_condition.csv")
    assert {"mae", "overlap_at_n", "centroid_accuracy", "mse_de"} <= set(written.columns)
    assert len(written) == len(per)


def test_plots_are_pngs_with_labelled_axes(setup, tmp_path):
    import matplotlib.image

    data, split, preds, per = setup
    conds = split.test["combo_seen2"]
    path = plot_de_deltas(data, conds, {m: p["combo_seen2"] for m, p in preds.items()},
                          tmp_path / "de.png")
    summary = summarise(per, list(preds))
    family = {m: HEADERS[m] for m in METRIC_FAMILIES["cell-eval"]}
    bars = plot_family_bars(summary, family, tmp_path / "bars.png", model_order=list(preds),
                            subgroup_order=list(split.subgroups()))
    for p in (path, bars):
        assert matplotlib.image.imread(p).ndim == 3
    with pytest.raises(ValueError, match=r"metrics \['auc'\]"):
        plot_family_bars(summary, {"auc": "AUC"}, tmp_path / "x.png", model_order=[],
                         subgroup_order=[])
