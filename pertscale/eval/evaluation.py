"""The evaluation pipeline both commands share: read the store's perturbation data, split it,
fit and run every predictor as a Ray task (the data put into the object store once), score,
plot, write the report and log it all to MLflow."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertscale.config import ConfigError
from pertscale.data.embeddings import GeneEmbeddings, load_embeddings
from pertscale.data.perturbation import PerturbationData, load_perturbation_data
from pertscale.data.splits import Split, build_split
from pertscale.eval.baselines import Predictor, build_baseline
from pertscale.eval.config import EmbeddingsConfig, EvalDataConfig, ReportConfig
from pertscale.eval.metrics import METRIC_FAMILIES
from pertscale.eval.plots import plot_de_deltas, plot_family_bars
from pertscale.eval.report import HEADERS, evaluate, markdown_table, summarise, write_report
from pertscale.eval.scoring import EvalCells, Scorer, load_eval_cells
from pertscale.paths import storage_root

__all__ = [
    "EvalResult",
    "build_baselines",
    "load_eval_data",
    "load_table",
    "make_report",
    "report_cells",
    "report_dir",
    "run_predictors",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalResult:
    """What a finished evaluation left behind."""

    report_path: Path
    summary: pd.DataFrame
    table: str
    run_id: str | None = None
    model_uri: str | None = None


def load_eval_data(cfg: EvalDataConfig, report: ReportConfig | None = None
                   ) -> tuple[PerturbationData, Split, EvalCells | None]:
    """Open the store, compute the pseudo-bulk data and the split, and read the evaluated
    conditions' cells when `report` shows the cell-eval metrics."""
    from pertscale.store import open_store

    if not cfg.store_uri:
        raise ConfigError("data.store_uri is empty: pass --data.store_uri=PATH_OR_URI")
    src = open_store(cfg.store_uri)
    data = load_perturbation_data(src, cfg.perturbation)
    split = build_split(data, cfg.split)
    cells = report_cells(report, src, cfg.perturbation, data, split) if report else None
    return data, split, cells


def report_cells(cfg: ReportConfig, src: Any, perturbation: Any, data: PerturbationData,
                 split: Split) -> EvalCells | None:
    """The evaluated conditions' cells when the report shows the cell-eval metrics (read from
    the open store `src` with the PerturbationConfig the data came from), else None."""
    if "cell-eval" not in cfg.metrics:
        return None
    start = time.perf_counter()
    cells = load_eval_cells(src, perturbation, data, split)
    log.info("read the cells of %d evaluated conditions and %d control groups in %.1f s",
             len(cells.conditions), len(cells.controls), time.perf_counter() - start)
    return cells


def load_table(cfg: EmbeddingsConfig, data: PerturbationData) -> GeneEmbeddings:
    """The embedding table (every row: a fitted model keeps it, to predict any of its genes);
    a perturbed gene of `data` without a row is an error listing them."""
    if not cfg.path:
        raise ConfigError("embeddings.path is empty: pass --embeddings.path=FILE")
    table = load_embeddings(cfg.path, allow_pickle=cfg.allow_pickle,
                            gene_column=cfg.gene_column or None)
    genes = sorted({g for p in data.perturbations.values() for g in p.genes})
    missing = table.missing(genes)
    if missing:
        raise ValueError(f"embedding table {cfg.path}: {len(missing)} perturbed gene(s) have no "
                         f"embedding: {missing}")
    return table


def build_baselines(cfg: ReportConfig, embeddings: GeneEmbeddings | None) -> list[Predictor]:
    return [build_baseline(name, linear=cfg.linear, embeddings=embeddings)
            for name in cfg.baselines]


def _fit_predict(predictor: Predictor, fit: bool, data: PerturbationData,
                 split: Split) -> dict[str, np.ndarray]:
    import threadpoolctl

    # NOTE: Ray tasks share the node's cores; one BLAS thread each keeps them from oversubscribing.
    with threadpoolctl.threadpool_limits(1):
        if fit:
            predictor.fit(data, split.train)
        return {g: predictor.predict_delta(data, conds)
                for g, conds in split.subgroups().items()}


def run_predictors(predictors: list[tuple[Predictor, bool]], data: PerturbationData,
                   split: Split) -> dict[str, dict[str, np.ndarray]]:
    """`(predictor, needs_fit)` pairs -> predictions[name][subgroup], one Ray task each
    (Ray must be initialised)."""
    import ray

    names = [p.name for p, _ in predictors]
    if len(set(names)) != len(names):
        raise ValueError(f"predictor names must be unique, got {names}")
    task = ray.remote(num_cpus=1)(_fit_predict)
    data_ref, split_ref = ray.put(data), ray.put(split)
    refs = [task.remote(p, fit, data_ref, split_ref) for p, fit in predictors]
    return dict(zip(names, ray.get(refs)))


def report_dir(cfg: ReportConfig, run_name: str) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return storage_root() / "reports" / f"{run_name}-{stamp}"


def make_report(cfg: ReportConfig, *, run_name: str, data: PerturbationData, split: Split,
                predictions: dict[str, dict[str, np.ndarray]], meta: dict[str, Any],
                cells: EvalCells | None = None, logger: Any = None) -> EvalResult:
    """Score the metric families of `cfg.metrics` (`cells` from `report_cells` for cell-eval),
    plot and write the report; log metrics and the report folder when `logger`."""
    from pertscale.eval.report import metrics_for_logging

    models = list(predictions)
    groups = list(split.subgroups())
    start = time.perf_counter()
    scorer = Scorer(data, split, cfg.metrics, cells)
    per_condition = evaluate(scorer, split, predictions)
    log.info("scored %d models on %d conditions (%s) in %.1f s", len(models),
             per_condition["condition"].nunique(), ", ".join(cfg.metrics),
             time.perf_counter() - start)
    summary = summarise(per_condition, models)
    out = report_dir(cfg, run_name)
    plots = []
    for group, conds in split.subgroups().items():
        chosen = sorted(conds)[: cfg.n_plot_perturbations]
        idx = [conds.index(c) for c in chosen]
        plots.append(plot_de_deltas(
            data, chosen, {m: predictions[m][group][idx] for m in models},
            out / "plots" / f"de_{group}.png", title=f"{group}: predicted vs true change"))
    for family in cfg.metrics:
        metrics = {m: HEADERS[m] for m in METRIC_FAMILIES[family]}
        plots.append(plot_family_bars(summary, metrics, out / "plots" / f"metrics_{family}.png",
                                      model_order=models, subgroup_order=groups,
                                      title=f"{family} metrics per model and baseline"))
    title = cfg.title or f"{run_name}: {data.source.get('uri', '')}"
    report = write_report(out, title=title, data=data, split=split, per_condition=per_condition,
                          summary=summary, meta=meta, plots=plots)
    if logger is not None:
        logger.log_metrics(metrics_for_logging(summary))
        logger.log_artifact(out, "report")
    return EvalResult(report_path=report, summary=summary, table=markdown_table(summary, groups),
                      run_id=getattr(logger, "run_id", None))
