"""The report: per-condition scores, means per subgroup and model, the markdown table, plots."""

import numpy as np
import pytest
from test_baselines import make_data  # tests/unit is on sys.path (rootdir-less prepend import)

from pertscale.data.splits import Split
from pertscale.eval.baselines import build_baseline
from pertscale.eval.metrics import pearson_delta
from pertscale.eval.plots import plot_de_deltas, plot_metric_bars
from pertscale.eval.report import evaluate, markdown_table, metrics_for_logging, summarise


@pytest.fixture
def setup():
    data = make_data({"t": ["G0", "G1", "G2", "G0+G1", "G2+G3"]})
    split = Split("s", train=["t/G0", "t/G1"], val=[],
                  test={"unseen_single": ["t/G2"], "combo_seen2": ["t/G0+G1"],
                        "combo_seen1": ["t/G2+G3"]})
    preds = {}
    for name in ("no_change", "train_mean", "additive"):
        model = build_baseline(name).fit(data, split.train)
        preds[name] = {g: model.predict_delta(data, c) for g, c in split.subgroups().items()}
    return data, split, preds


def test_summary_means_and_coverage(setup):
    data, split, preds = setup
    per = evaluate(data, split, preds)
    summary = summarise(per, list(preds))
    # additive covers only the combination of two seen genes
    assert set(summary[summary["model"] == "additive"]["subgroup"]) == {"combo_seen2"}
    row = summary[(summary["model"] == "train_mean") & (summary["subgroup"] == "combo_seen2")]
    mean = (data.delta("t/G0") + data.delta("t/G1")) / 2
    ctrl = data.ctrl_mean("t/G0+G1")
    assert row["pearson_delta"].item() == pytest.approx(
        pearson_delta(ctrl + mean, data.mean("t/G0+G1"), ctrl))
    assert row["n"].item() == 1
    assert np.isnan(summary[summary["model"] == "no_change"]["pearson_delta"]).all()


def test_markdown_table_and_logged_metrics(setup):
    data, split, preds = setup
    summary = summarise(evaluate(data, split, preds), list(preds))
    table = markdown_table(summary, list(split.subgroups()))
    lines = table.splitlines()
    assert lines[0].startswith("| subgroup | model | n | Pearson delta |")
    assert "| combo_seen2 | additive | 1 |" in table and "| unseen_single | no_change | 1 | n/a |" in table
    assert len(lines) == 2 + 3 + 1 + 3  # header, rule, three subgroups x models that cover them
    logged = metrics_for_logging(summary)
    assert "combo_seen2/additive/mse_de" in logged
    assert "unseen_single/no_change/pearson_delta" not in logged  # NaN is not logged


def test_plots_are_pngs_with_labelled_axes(setup, tmp_path):
    import matplotlib.image

    data, split, preds = setup
    conds = split.test["combo_seen2"]
    path = plot_de_deltas(data, conds, {m: p["combo_seen2"] for m, p in preds.items()},
                          tmp_path / "de.png")
    summary = summarise(evaluate(data, split, preds), list(preds))
    bars = plot_metric_bars(summary, "mse_de", tmp_path / "bars.png", model_order=list(preds),
                            subgroup_order=list(split.subgroups()))
    for p in (path, bars):
        assert matplotlib.image.imread(p).ndim == 3
    with pytest.raises(ValueError, match="metric 'auc'"):
        plot_metric_bars(summary, "auc", tmp_path / "x.png", model_order=[], subgroup_order=[])
