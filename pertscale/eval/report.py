"""Evaluation of fitted predictors on a split and the written report.

`evaluate` scores every predictor on every subgroup of a split with a `Scorer` (the metric
families of `pertscale.eval.scoring`), per condition; `summarise` takes the mean over the
conditions a predictor covers (n = how many; a baseline that does not cover a subgroup, e.g.
additive on unseen singles, has no row) and adds each metric normalised against the train-mean
baseline the way cell-eval scores against its baseline (`normalise`).

`write_report` writes into one folder:
    report.md           one table per metric family, every model beside every baseline per
                        subgroup, and cell-eval's normalised scores
    metrics.csv         the same numbers and the normalised ones, one row per (subgroup, model)
    per_condition.csv   every metric of every covered condition
    split.json          the split: training, validation and test conditions per subgroup
    summary.json        sizes, fitted hyper-parameters, left-out conditions
    plots/*.png         predicted vs true deltas on top DE genes; one figure per metric family
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertscale.data.perturbation import PerturbationData
from pertscale.data.splits import Split
from pertscale.eval.metrics import BEST_VALUE, METRIC_FAMILIES
from pertscale.eval.scoring import Scorer
from pertscale.paths import make_dir

__all__ = [
    "NORMALISE_BY",
    "evaluate",
    "markdown_table",
    "metrics_for_logging",
    "normalise",
    "score_conditions",
    "summarise",
    "write_report",
]

# The baseline every metric is normalised against (cell-eval's choice for its challenge).
NORMALISE_BY = "train_mean"
# Table headers of every metric, per family in table order.
HEADERS = {
    "pearson_delta": "Pearson delta",
    "pearson_delta_de": "Pearson delta DE",
    "mse_de": "MSE DE",
    "mse": "MSE",
    "direction_accuracy_de": "direction acc. DE",
    "r2_mean": "1-SSres/SStot of means",
    "r2_pearson_mean": "R2 of means (Pearson^2)",
    "r2_pearson_mean_de": "R2 of means DE (Pearson^2)",
    "pearson_delta_de_nd": "Pearson delta DE (non-dropout)",
    "mse_de_nd": "MSE DE (non-dropout)",
    "mae": "MAE",
    "discrimination_score_l1": "discrimination (L1)",
    "overlap_at_n": "DE overlap at N",
    "pearson_delta_pert": "Pearson delta vs perturbed",
    "pearson_delta_pert_de": "Pearson delta DE vs perturbed",
    "centroid_accuracy": "centroid accuracy",
}
# GEARS' non-dropout variants stay in the CSV files, out of the printed table.
TABLE_SKIP = {"pearson_delta_de_nd", "mse_de_nd"}
VCC_SCORE = "vcc_score"
# Metrics whose NaN comes from the truth alone (no true DE gene; a single candidate), the same
# for every model: their means skip those conditions.
TRUTH_UNDEFINED = {"overlap_at_n", "centroid_accuracy"}


def score_conditions(data: PerturbationData, conditions: list[str],
                     delta_CG: np.ndarray) -> pd.DataFrame:
    """The GEARS metrics per condition (rows with a NaN prediction are not covered and left
    out); needs no split."""
    scorer = Scorer(data, Split("conditions", [], [], {"all": list(conditions)}), ["gears"])
    return scorer.score(conditions, delta_CG)


def evaluate(scorer: Scorer, split: Split, predictions: dict[str, dict[str, np.ndarray]]
             ) -> pd.DataFrame:
    """Per-condition metrics for `predictions[model][subgroup] = delta [C, G]` (rows in the
    order of `split.subgroups()[subgroup]`)."""
    frames = []
    for model, by_group in predictions.items():
        for subgroup, delta_CG in by_group.items():
            frame = scorer.score(split.subgroups()[subgroup], delta_CG)
            if len(frame):
                frames.append(frame.assign(model=model, subgroup=subgroup))
    if not frames:
        raise ValueError("no predictor covers any evaluated condition")
    out = pd.concat(frames, ignore_index=True)
    return out[["subgroup", "model", "condition", *scorer.columns]]


def _metrics(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c in BEST_VALUE]


def normalise(summary: pd.DataFrame, base: str = NORMALISE_BY) -> pd.DataFrame:
    """`norm_<metric>` columns: each model's mean against the `base` baseline's mean in the same
    subgroup, as cell-eval's `score_agg_metrics` (lower-is-better: 1 - model / base;
    higher-is-better: (model - base) / (1 - base)); 0 = the baseline, 1 = perfect, below 0 =
    worse than the baseline (cell-eval clips at 0; these are not clipped). With the cell-eval
    family, `vcc_score` is cell-eval's average score of its three metrics (NaN as 0, each
    clipped at 0, then the mean). No columns when `base` is not in the summary."""
    rows = summary[summary["model"] == base].set_index("subgroup")
    if rows.empty:
        return summary
    out = summary.copy()
    for metric in _metrics(summary):
        ref = out["subgroup"].map(rows[metric])
        with np.errstate(divide="ignore", invalid="ignore"):
            if BEST_VALUE[metric] == 0:
                out[f"norm_{metric}"] = 1.0 - out[metric] / ref
            else:
                out[f"norm_{metric}"] = (out[metric] - ref) / (1.0 - ref)
    vcc = [f"norm_{m}" for m in METRIC_FAMILIES["cell-eval"]]
    if all(c in out.columns for c in vcc):
        out[VCC_SCORE] = out[vcc].fillna(0.0).clip(lower=0.0).mean(axis=1)
    return out


def summarise(per_condition: pd.DataFrame, model_order: list[str]) -> pd.DataFrame:
    """Mean of each metric over conditions per (subgroup, model), with n, and the normalised
    scores (`normalise`); a NaN metric (e.g. Pearson of the no-change prediction) stays NaN,
    except where the truth alone leaves it undefined (`TRUTH_UNDEFINED`, e.g. DE overlap of a
    condition without true DE genes): those conditions are left out of that mean."""
    metrics = _metrics(per_condition)
    grouped = per_condition.groupby(["subgroup", "model"], sort=False)
    summary = grouped[metrics].agg(
        {m: (lambda s: s.mean()) if m in TRUTH_UNDEFINED else (lambda s: s.mean(skipna=False))
         for m in metrics})
    summary.insert(0, "n", grouped.size())
    summary = summary.reset_index()
    summary["_order"] = summary["model"].map({m: i for i, m in enumerate(model_order)})
    summary = summary.sort_values(["subgroup", "_order"], kind="stable").drop(columns="_order")
    return normalise(summary.reset_index(drop=True))


def _fmt(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.4f}"


def _table(summary: pd.DataFrame, subgroup_order: list[str], columns: dict[str, str]) -> str:
    header = ["subgroup", "model", "n", *columns.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for subgroup in subgroup_order:
        for row in summary[summary["subgroup"] == subgroup].itertuples(index=False):
            r = row._asdict()
            cells = [subgroup, r["model"], str(r["n"]), *(_fmt(r[m]) for m in columns)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(summary: pd.DataFrame, subgroup_order: list[str]) -> str:
    """One markdown table per metric family in the summary (subgroup, model, n, then the
    family's metrics), and cell-eval's scores normalised against the train mean."""
    parts = []
    for family, metrics in METRIC_FAMILIES.items():
        if not all(m in summary.columns for m in metrics):
            continue  # a family not scored (r2_mean alone does not make the scgen family)
        shown = {m: HEADERS[m] for m in metrics if m not in TABLE_SKIP}
        if shown:
            parts += [f"### {family} metrics", "", _table(summary, subgroup_order, shown), ""]
    norm = {f"norm_{m}": HEADERS[m] for m in METRIC_FAMILIES["cell-eval"]}
    if VCC_SCORE in summary.columns:
        norm[VCC_SCORE] = "VCC score"
        parts += [f"### cell-eval scores against {NORMALISE_BY} (0 = {NORMALISE_BY}, 1 = perfect)",
                  "", _table(summary, subgroup_order, norm), ""]
    return "\n".join(parts).rstrip()


def metrics_for_logging(summary: pd.DataFrame) -> dict[str, float]:
    """`<subgroup>/<model>/<metric>` -> value for MLflow, normalised scores included (NaN
    values are left out)."""
    columns = [c for c in summary.columns if c not in ("subgroup", "model", "n")]
    out = {}
    for row in summary.itertuples(index=False):
        r = row._asdict()
        for m in columns:
            if not pd.isna(r[m]):
                out[f"{r['subgroup']}/{r['model']}/{m}"] = float(r[m])
    return out


def write_report(out_dir: str | Path, *, title: str, data: PerturbationData, split: Split,
                 per_condition: pd.DataFrame, summary: pd.DataFrame,
                 meta: dict[str, Any], plots: list[Path]) -> Path:
    """Write report.md, metrics.csv, per_condition.csv, split.json and summary.json into `out_dir`;
    returns the report.md path. `plots` are PNGs already written under out_dir/plots."""
    out = make_dir(out_dir, "report.out_dir")
    groups = list(split.subgroups())
    summary.to_csv(out / "metrics.csv", index=False)
    per_condition.to_csv(out / "per_condition.csv", index=False)
    (out / "split.json").write_text(json.dumps(split.to_dict(), indent=2) + "\n")
    sizes = {g: len(c) for g, c in split.subgroups().items()}
    info = {"title": title, "split": split.name, "n_train": len(split.train),
            "subgroup_sizes": sizes, "dropped_conditions": data.dropped,
            "source": data.source, **meta}
    (out / "summary.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    lines = [
        f"# {title}", "",
        (f"- data: `{data.source.get('uri', '')}` ({len(data.perturbed)} perturbed conditions, "
        f"{len(data.genes)} genes, {'raw counts, log1p-normalised' if data.source.get('raw_counts') else 'values as stored'})"),
        f"- split: {split.name}; {len(split.train)} training conditions; "
        + ", ".join(f"{g} {n}" for g, n in sizes.items()),
        ("- metrics: mean over conditions; delta = expression minus the condition's control mean; "
        "DE = the condition's top DE genes (t-test against control, ranked by |score|); "
        "MSE is the mean squared error (not its root); n/a = undefined "
        "(Pearson of a constant prediction)."),
    ]
    if "mae" in summary.columns:
        lines.append(
            "- cell-eval: on predicted cells max(control cell + delta, 0) against the real cells; "
            "discrimination among every evaluated condition of the covariate (target genes left "
            "out); DE overlap at N = shared Wilcoxon DE genes (FDR < 0.05, by |log2 fold change|) "
            "at the true DE count, n/a without true DE genes.")
    if "pearson_delta_pert" in summary.columns:
        lines.append(
            "- systema: deltas against the mean of the perturbed centroids of the covariate "
            "(not control); centroid accuracy = share of the other evaluated conditions' true "
            "centroids farther from the prediction than its own.")
    if data.dropped:
        lines.append(f"- left out (fewer cells than min_cells): {data.dropped}")
    for key, value in meta.items():
        lines.append(f"- {key}: {value}")
    lines += ["", markdown_table(summary, groups), ""]
    for path in plots:
        lines += [f"![{path.stem}](plots/{path.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
