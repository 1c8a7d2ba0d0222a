"""Evaluation of fitted predictors on a split and the written report.

`evaluate` scores every predictor on every subgroup of a split: per condition, the metrics of
`pertscale.eval.metrics` on predicted expression ctrl + delta against the true mean, with the
condition's top DE genes; then the mean over the conditions a predictor covers (n = how many;
a baseline that does not cover a subgroup, e.g. additive on unseen singles, has no row).

`write_report` writes into one folder:
    report.md           the table of every model beside every baseline per subgroup
    metrics.csv         the same numbers, one row per (subgroup, model)
    per_condition.csv   every metric of every covered condition
    summary.json        split, sizes, fitted hyper-parameters, left-out conditions
    plots/*.png         predicted vs true deltas on top DE genes; metric bars (plots.py)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertscale.data.perturbation import PerturbationData
from pertscale.data.splits import Split
from pertscale.eval.metrics import METRIC_NAMES, perturbation_metrics

__all__ = [
    "evaluate",
    "markdown_table",
    "metrics_for_logging",
    "score_conditions",
    "summarise",
    "write_report",
]

# Columns of the markdown table, in order, with the header each gets.
TABLE_METRICS = {
    "pearson_delta": "Pearson delta",
    "pearson_delta_de": "Pearson delta DE",
    "mse_de": "MSE DE",
    "mse": "MSE",
    "direction_accuracy_de": "direction acc. DE",
    "r2_mean": "R2 mean",
}


def score_conditions(data: PerturbationData, conditions: list[str],
                     delta_CG: np.ndarray) -> pd.DataFrame:
    """Metrics per condition (rows with a NaN prediction are not covered and left out)."""
    rows = []
    for cond, delta_G in zip(conditions, delta_CG):
        if np.isnan(delta_G).any():
            continue
        ctrl_G = data.ctrl_mean(cond)
        rows.append({"condition": cond, **perturbation_metrics(
            ctrl_G + delta_G, data.mean(cond), ctrl_G, data.de_idx[cond],
            data.de_nd_idx[cond])})
    return pd.DataFrame(rows, columns=["condition", *METRIC_NAMES])


def evaluate(data: PerturbationData, split: Split, predictions: dict[str, dict[str, np.ndarray]]
             ) -> pd.DataFrame:
    """Per-condition metrics for `predictions[model][subgroup] = delta [C, G]` (rows in the
    order of `split.subgroups()[subgroup]`)."""
    frames = []
    for model, by_group in predictions.items():
        for subgroup, delta_CG in by_group.items():
            frame = score_conditions(data, split.subgroups()[subgroup], delta_CG)
            if len(frame):
                frames.append(frame.assign(model=model, subgroup=subgroup))
    if not frames:
        raise ValueError("no predictor covers any evaluated condition")
    out = pd.concat(frames, ignore_index=True)
    return out[["subgroup", "model", "condition", *METRIC_NAMES]]


def summarise(per_condition: pd.DataFrame, model_order: list[str]) -> pd.DataFrame:
    """Mean of each metric over conditions per (subgroup, model), with n; a NaN metric (e.g.
    Pearson of the no-change prediction) stays NaN."""
    grouped = per_condition.groupby(["subgroup", "model"], sort=False)
    summary = grouped[list(METRIC_NAMES)].agg(lambda s: s.mean(skipna=False))
    summary.insert(0, "n", grouped.size())
    summary = summary.reset_index()
    summary["_order"] = summary["model"].map({m: i for i, m in enumerate(model_order)})
    return summary.sort_values(["subgroup", "_order"], kind="stable").drop(columns="_order")


def _fmt(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.4f}"


def markdown_table(summary: pd.DataFrame, subgroup_order: list[str]) -> str:
    """One markdown table: subgroup, model, n, then the TABLE_METRICS columns."""
    header = ["subgroup", "model", "n", *TABLE_METRICS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for subgroup in subgroup_order:
        for row in summary[summary["subgroup"] == subgroup].itertuples(index=False):
            r = row._asdict()
            cells = [subgroup, r["model"], str(r["n"]), *(_fmt(r[m]) for m in TABLE_METRICS)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_for_logging(summary: pd.DataFrame) -> dict[str, float]:
    """`<subgroup>/<model>/<metric>` -> value for MLflow (NaN values are left out)."""
    out = {}
    for row in summary.itertuples(index=False):
        r = row._asdict()
        for m in METRIC_NAMES:
            if not pd.isna(r[m]):
                out[f"{r['subgroup']}/{r['model']}/{m}"] = float(r[m])
    return out


def write_report(out_dir: str | Path, *, title: str, data: PerturbationData, split: Split,
                 per_condition: pd.DataFrame, summary: pd.DataFrame,
                 meta: dict[str, Any], plots: list[Path]) -> Path:
    """Write report.md, metrics.csv, per_condition.csv and summary.json into `out_dir`;
    returns the report.md path. `plots` are PNGs already written under out_dir/plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = list(split.subgroups())
    summary.to_csv(out / "metrics.csv", index=False)
    per_condition.to_csv(out / "per_condition.csv", index=False)
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
