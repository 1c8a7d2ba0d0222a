"""`pertscale fit NAME` and `pertscale evaluate`: closed-form models and reports, by spec.

    pertscale fit genepert --config configs/genepert.toml [--address auto] [--alias NAME]
                           [--section.field=value ...]
    pertscale evaluate --config configs/evaluate.toml [--address auto]
                       [--metrics gears,cell-eval,systema] [--section.field=value ...]

`fit` reads the store's perturbation data, splits it, takes the gene features from the
embedding table (`embeddings.path`) or from the gene table of a registered model
(`init_from = "models:/..."`, the parent in the lineage tags), fits the model through its spec
(GenePert: alpha by cross-validation, one Ray task per fold), logs and registers it
(`pertscale-<model>`, lineage tags and an evaluation summary), and writes a report of it beside
the baselines. `evaluate` pulls registered perturbation models, asks each spec for a predictor,
and writes the same report (or the baselines alone: `models = []`, `baselines_only = true`).
Both start the embedded local Ray cluster unless `--address` / `ray.address` names one, and log
params, the metrics table, the report and its PNGs to MLflow.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from pertscale.config import ConfigError, load_config
from pertscale.data.embeddings import GeneEmbeddings
from pertscale.data.perturbation import PerturbationData
from pertscale.eval.config import EvaluateJobConfig, FitJobConfig
from pertscale.eval.cv import ensure_ray, ray_map
from pertscale.eval.evaluation import (
    EvalResult,
    build_baselines,
    load_eval_data,
    load_table,
    make_report,
    run_predictors,
)
from pertscale.eval.metrics import METRIC_FAMILIES
from pertscale.models import MODELS, get_spec
from pertscale.tracking.commands import add_alias_argument, with_aliases

__all__ = ["ModelPredictor", "eval_summary", "evaluate_main", "fit_main", "run_evaluate", "run_fit"]

FITTED = sorted(name for name, spec in MODELS.items() if not spec.trained)


def _start(job: Any, address: str | None):
    if address:
        job = job.replace(ray=job.ray.replace(address=address))
    ensure_ray(job.ray)
    return job


class ModelPredictor:
    """A model's predictor (`PerturbationPredictor`) behind the baseline protocol, its readout
    genes reordered to the evaluated store's genes; a perturbed gene it cannot represent, or a
    store gene it does not read out, is an error naming them."""

    def __init__(self, name: str, predictor: Any, data: PerturbationData, *, uri: str = "") -> None:
        self.name, self.predictor, self.uri = name, predictor, uri or name
        position = {g: i for i, g in enumerate(predictor.genes)}
        missing = [g for g in data.genes if g not in position]
        if missing:
            raise ValueError(f"{self.uri} predicts {len(predictor.genes)} genes; {len(missing)} "
                             f"genes of the store are not among them, e.g. {missing[:5]}")
        self.columns = np.array([position[g] for g in data.genes])

    def fit(self, data: PerturbationData, train: list[str]) -> ModelPredictor:
        return self

    def predict_delta(self, data: PerturbationData, conditions: list[str]) -> np.ndarray:
        perts = [data.perturbation(c) for c in conditions]
        missing = self.predictor.missing_genes(perts)
        if missing:
            raise ValueError(f"{self.uri} cannot represent perturbed gene(s) {missing}")
        covs = [str(data.conditions.at[c, "covariate"]) for c in conditions]
        return np.asarray(self.predictor.predict_delta(perts, covs))[:, self.columns]


def _features(job: FitJobConfig, data: PerturbationData) -> tuple[GeneEmbeddings, dict[str, str]]:
    """The gene feature table and its lineage tags: a file, or a registered model's genes."""
    if not job.init_from:
        table = load_table(job.embeddings, data)
        return table, {"embeddings_sha256": table.sha256, "features": table.source}
    from pertscale.tracking import pull_model

    parent = pull_model(job.init_from, tracking=job.tracking)
    spec = get_spec(parent.kind)
    if spec.gene_table is None:
        raise ValueError(f"init_from={job.init_from}: a {parent.kind} model has no gene table "
                         f"to take features from")
    genes, emb = spec.gene_table(parent.exported)
    source = f"{parent.name}/{parent.version} gene table"
    table = GeneEmbeddings(genes=list(genes), emb_ND=np.asarray(emb, dtype=np.float32),
                           source=source, sha256=parent.tags.get("manifest_sha256", ""))
    perturbed = sorted({g for p in data.perturbations.values() for g in p.genes})
    missing = table.missing(perturbed)
    if missing:
        raise ValueError(f"init_from={job.init_from}: {len(missing)} perturbed gene(s) are not "
                         f"in its gene table: {missing}")
    return table, {"init_from": job.init_from,
                   "init_from_version": f"models:/{parent.name}/{parent.version}",
                   "features": source}


def eval_summary(result: EvalResult, name: str) -> str:
    """A short JSON of the model's mean top-DE Pearson delta and MSE per test subgroup."""
    rows = result.summary[result.summary["model"] == name]
    return json.dumps({r.subgroup: {"pearson_delta_de": round(float(r.pearson_delta_de), 4),
                                    "mse_de": round(float(r.mse_de), 5)}
                       for r in rows.itertuples()}, sort_keys=True)


def run_fit(job: FitJobConfig, *, address: str | None = None) -> EvalResult:
    """Fit, register and report a closed-form model (see the module docstring)."""
    from pertscale.tracking import RunLogger, check_tracking_uri, log_model

    spec = get_spec(job.model.name)
    check_tracking_uri(job.tracking)
    job = _start(job, address)
    data, split, cells = load_eval_data(job.data, job.report)
    table, lineage = _features(job, data)
    fitted = spec.fit(job.model, data, split.train, features=table, map_fn=ray_map)
    predictors = [(ModelPredictor(spec.name, fitted, data), False)]
    predictors += [(b, True) for b in build_baselines(job.report, table)]
    with RunLogger(job.tracking, run_name=job.run_name,
                   tags={"job": f"fit {spec.name}", "store_fingerprint":
                         data.source["fingerprint"], "init_from": job.init_from}) as logger:
        logger.log_params(job.to_dict())
        summary = fitted.summary()
        logger.log_params({f"{spec.name}.{k}": v for k, v in summary.items() if k != "cv_mean"})
        for alpha, score in summary.get("cv_mean", {}).items():
            logger.log_metrics(
                {f"{spec.name}_cv/{job.model.cv_metric}_alpha_{float(alpha):g}": score})
        predictions = run_predictors(predictors, data, split)
        meta = {spec.name: summary, "features": f"{table.source} "
                f"(sha256 {table.sha256[:12]}, {table.dim} dims)"}
        result = make_report(job.report, run_name=job.run_name, data=data, split=split,
                             predictions=predictions, meta=meta, cells=cells, logger=logger)
        if job.tracking.register:
            exported = spec.export(job.model, fitted, {"job": job.to_dict()})
            result.model_uri = log_model(
                logger, exported,
                {"store_fingerprint": data.source["fingerprint"], "store_uri": data.source["uri"],
                 "split": split.name, "task": "fit",
                 "eval_summary": eval_summary(result, spec.name), **lineage},
                aliases=job.tracking.aliases)
    return result


def _report_name(uri: str, kind: str, version: str, n_models: int) -> str:
    from pertscale.tracking import parse_model_uri

    _, alias, _ = parse_model_uri(uri)
    if alias and alias != "latest":
        return f"{kind}@{alias}"
    return kind if n_models == 1 else f"{kind}-v{version}"


def run_evaluate(job: EvaluateJobConfig, *, address: str | None = None) -> EvalResult:
    """Evaluate registered models (or the baselines alone) (see the module docstring)."""
    from pertscale.tracking import RunLogger, pull_model

    data, split, cells = load_eval_data(job.data, job.report)
    models, gene_tables = [], []
    for uri in job.models:
        pulled = pull_model(uri, tracking=job.tracking)
        spec = get_spec(pulled.kind)
        if spec.predicts != "delta":
            perturbation_models = sorted(n for n, s in MODELS.items() if s.predicts == "delta")
            raise ValueError(f"{uri} is a {spec.name} model, which predicts {spec.predicts}s, "
                             f"not perturbation effects; evaluate takes {perturbation_models}")
        name = _report_name(uri, spec.name, pulled.version, len(job.models))
        models.append((ModelPredictor(name, pulled.predictor(), data, uri=uri), False))
        if spec.gene_table is not None:
            gene_tables.append((uri, spec.gene_table(pulled.exported)))
    table = load_table(job.embeddings, data) if job.embeddings.path else None
    if "linear" in job.report.baselines and job.report.linear.pert_embedding == "table" \
            and table is None:
        if not gene_tables:
            raise ConfigError("the linear baseline with pert_embedding = 'table' needs "
                              "embeddings.path (no evaluated model has a gene table)")
        uri, (genes, emb) = gene_tables[0]
        table = GeneEmbeddings(genes=list(genes), emb_ND=np.asarray(emb), source=f"{uri} genes")
    names = [p.name for p, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"models {job.models} give the report names {names} twice: evaluate "
                         f"each version once")
    predictors = models + [(b, True) for b in build_baselines(job.report, table)]
    job = _start(job, address)  # after the models and data are found: a typo costs no cluster
    with RunLogger(job.tracking, run_name=job.run_name,
                   tags={"job": "evaluate", "store_fingerprint": data.source["fingerprint"]}
                   ) as logger:
        logger.log_params(job.to_dict())
        predictions = run_predictors(predictors, data, split)
        what = ", ".join(job.models) if job.models else "baselines only"
        return make_report(job.report, run_name=job.run_name, data=data, split=split,
                           predictions=predictions, meta={"models": what}, cells=cells,
                           logger=logger)


def _parse(prog: str, argv: list[str], job: str, description: str):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=f'job config file (job = "{job}")')
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: ray.address, else an embedded cluster)")
    parser.add_argument("--metrics", default=None,
                        help=f"metric families, comma-separated: {','.join(METRIC_FAMILIES)} "
                             f"(default: report.metrics, all of them)")
    if job == "fit":
        add_alias_argument(parser)
    args, overrides = parser.parse_known_args(argv)
    if args.metrics is not None:
        families = [f.strip() for f in args.metrics.split(",") if f.strip()]
        overrides = [*overrides, f"--report.metrics={json.dumps(families)}"]
    return load_config(args.config, overrides, job=job), args


def _print(result: EvalResult) -> None:
    print(result.table)
    print(f"\nreport: {result.report_path}")
    if result.run_id:
        print(f"mlflow run: {result.run_id}")
    if result.model_uri:
        print(f"model: {result.model_uri}")


def fit_main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(f"usage: pertscale fit {{{','.join(FITTED)}}} --config FILE [--alias NAME] "
              f"[overrides]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    if name not in FITTED:
        raise ValueError(f"pertscale fit: unknown model {name!r}; fitted models: {FITTED}")
    job, args = _parse(f"pertscale fit {name}", rest, "fit",
                       f"Fit {name} ({get_spec(name).description}), register it and report it "
                       f"beside the baselines. Overrides: --section.field=value.")
    if job.model.name != name:
        raise ConfigError(f"{args.config} configures model {job.model.name!r}, not {name!r}")
    _print(run_fit(with_aliases(job, args.alias), address=args.address))
    return 0


def evaluate_main(argv: list[str]) -> int:
    job, args = _parse("pertscale evaluate", argv, "evaluate",
                       "Evaluate registered models beside the baselines on a store and split, "
                       "and write the report. Overrides: --section.field=value.")
    _print(run_evaluate(job, address=args.address))
    return 0
