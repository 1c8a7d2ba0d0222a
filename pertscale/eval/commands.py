"""`pertscale fit genepert` and `pertscale evaluate`.

    pertscale fit genepert --config configs/genepert.toml [--address auto] [--section.field=value ...]
    pertscale evaluate --config configs/evaluate.toml [--address auto] [--section.field=value ...]

`fit genepert` reads the store's perturbation data, splits it, chooses GenePert's alpha by
cross-validation with one Ray task per fold, fits on the training conditions, logs and registers
the model (`pertscale-genepert`, weights as safetensors, the embedding table's path and sha256
in its config), and writes a report of GenePert beside the baselines. `evaluate` pulls
registered models, rebuilds them, and writes the same report for them. Both start the embedded
local Ray cluster unless `--address` / `ray.address` names one, and log params, the metrics
table, the report and its PNGs to MLflow.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from pertscale.config import load_config
from pertscale.data.embeddings import load_embeddings
from pertscale.data.perturbation import PerturbationData
from pertscale.eval.config import EvaluateJobConfig, GenePertJobConfig
from pertscale.eval.cv import GenePertConfig, GenePertPredictor, ensure_ray
from pertscale.eval.evaluation import (
    EvalResult,
    build_baselines,
    load_eval_data,
    load_table,
    make_report,
    run_predictors,
)
from pertscale.models.genepert import GenePert

__all__ = ["FIT_MODELS", "evaluate_main", "fit_main", "run_evaluate", "run_fit_genepert"]


def _start(job: Any, address: str | None):
    if address:
        job = job.replace(ray=job.ray.replace(address=address))
    ensure_ray(job.ray)
    return job


def run_fit_genepert(job: GenePertJobConfig, *, address: str | None = None) -> EvalResult:
    """Fit, register and report GenePert (see the module docstring)."""
    import torch

    from pertscale.tracking import RunLogger, log_model

    job = _start(job, address)
    data, split = load_eval_data(job.data)
    table = load_table(job.embeddings, data)
    genepert = GenePertPredictor(job.genepert, table).fit(data, split.train)
    predictors = [(genepert, False)] + [(b, True) for b in build_baselines(job.report, table)]
    with RunLogger(job.tracking, run_name=job.run_name,
                   tags={"job": "genepert", "store_fingerprint": data.source["fingerprint"]}
                   ) as logger:
        logger.log_params(job.to_dict())
        logger.log_params({"genepert.chosen_alpha": genepert.model.alpha})
        if genepert.cv_scores is not None:
            logger.log_metrics({
                f"genepert_cv/{job.genepert.cv_metric}_alpha_{a:g}": float(v)
                for a, v in zip(job.genepert.alphas, genepert.cv_scores.mean(0))})
        predictions = run_predictors(predictors, data, split)
        meta = {"genepert": genepert.summary(), "embeddings": f"{table.source} "
                f"(sha256 {table.sha256[:12]}, {table.dim} dims)"}
        result = make_report(job.report, run_name=job.run_name, data=data, split=split,
                             predictions=predictions, meta=meta, logger=logger)
        state = {k: torch.from_numpy(np.ascontiguousarray(v))
                 for k, v in genepert.model.state_dict().items()}
        config = {"model": "genepert", "alpha": genepert.model.alpha,
                  "fit_intercept": genepert.model.fit_intercept,
                  "embeddings": {**job.embeddings.to_dict(), "sha256": table.sha256,
                                 "path": str(Path(job.embeddings.path).resolve())},
                  "genepert": job.genepert.to_dict()}
        if job.tracking.register:
            result.model_uri = log_model(
                logger, "genepert", state, config, data.genes,
                {"store_fingerprint": data.source["fingerprint"], "split": split.name,
                 "embeddings_sha256": table.sha256})
    return result


class _RegisteredGenePert:
    """A pulled GenePert whose output genes are reordered to the evaluated store's genes."""

    def __init__(self, name: str, predictor: GenePertPredictor, columns: np.ndarray) -> None:
        self.name, self.predictor, self.columns = name, predictor, columns

    def fit(self, data: PerturbationData, train: list[str]) -> _RegisteredGenePert:
        return self

    def predict_delta(self, data: PerturbationData, conditions: list[str]) -> np.ndarray:
        return self.predictor.predict_delta(data, conditions)[:, self.columns]


def _load_genepert(pulled: Any, job: EvaluateJobConfig, data: PerturbationData,
                   name: str) -> _RegisteredGenePert:
    cfg = pulled.config
    emb_cfg = cfg["embeddings"]
    path = job.embeddings.path or emb_cfg["path"]
    table = load_embeddings(path, allow_pickle=job.embeddings.allow_pickle or
                            emb_cfg.get("allow_pickle", False),
                            gene_column=(job.embeddings.gene_column or emb_cfg.get("gene_column")
                                         or None))
    if table.sha256 != emb_cfg["sha256"]:
        raise ValueError(f"{pulled.uri} was fitted with an embedding table of sha256 "
                         f"{emb_cfg['sha256']}; {path} has sha256 {table.sha256}")
    state = {k: v.numpy() for k, v in pulled.state_dict.items()}
    model = GenePert.from_state_dict(state, alpha=cfg["alpha"], fit_intercept=cfg["fit_intercept"])
    position = {g: i for i, g in enumerate(pulled.vocab)}
    missing = [g for g in data.genes if g not in position]
    if missing:
        raise ValueError(f"{pulled.uri} predicts {len(pulled.vocab)} genes; {len(missing)} genes "
                         f"of the store are not among them, e.g. {missing[:5]}")
    predictor = GenePertPredictor(GenePertConfig.from_dict(cfg["genepert"]), table, model)
    return _RegisteredGenePert(name, predictor, np.array([position[g] for g in data.genes]))


# model name (config.json "model") -> loader of a pulled model as a predictor
FIT_MODELS = {"genepert": run_fit_genepert}
_LOADERS = {"genepert": _load_genepert}


def run_evaluate(job: EvaluateJobConfig, *, address: str | None = None) -> EvalResult:
    """Evaluate registered models beside the baselines (see the module docstring)."""
    from pertscale.tracking import RunLogger, pull_model

    if not job.models:
        raise ValueError("models is empty: list at least one models:/ URI to evaluate")
    job = _start(job, address)
    data, split = load_eval_data(job.data)
    models = []
    for uri in job.models:
        pulled = pull_model(uri, tracking=job.tracking)
        kind = pulled.config.get("model")
        if kind not in _LOADERS:
            raise ValueError(f"{uri} is a {kind!r} model; evaluate supports {sorted(_LOADERS)}")
        name = kind if len(job.models) == 1 else f"{kind}-v{pulled.version}"
        models.append((_LOADERS[kind](pulled, job, data, name), False))
    table = load_table(job.embeddings, data) if job.embeddings.path else None
    if "linear" in job.report.baselines and job.report.linear.pert_embedding == "table" \
            and table is None:
        table = models[0][0].predictor.embeddings
    predictors = models + [(b, True) for b in build_baselines(job.report, table)]
    with RunLogger(job.tracking, run_name=job.run_name,
                   tags={"job": "evaluate", "store_fingerprint": data.source["fingerprint"]}
                   ) as logger:
        logger.log_params(job.to_dict())
        predictions = run_predictors(predictors, data, split)
        return make_report(job.report, run_name=job.run_name, data=data, split=split,
                           predictions=predictions, meta={"models": ", ".join(job.models)},
                           logger=logger)


_DESCRIPTIONS = {
    "genepert": "Fit GenePert (alpha by cross-validation, one Ray task per fold), register it "
                "and report it beside the baselines. Overrides: --section.field=value.",
    "evaluate": "Evaluate registered models beside the baselines on a store and split, and "
                "write the report. Overrides: --section.field=value.",
}


def _parse(prog: str, argv: list[str], job: str):
    parser = argparse.ArgumentParser(prog=prog, description=_DESCRIPTIONS[job])
    parser.add_argument("--config", required=True, help=f'job config file (job = "{job}")')
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: ray.address, else an embedded cluster)")
    args, overrides = parser.parse_known_args(argv)
    return load_config(args.config, overrides, job=job), args.address


def _print(result: EvalResult) -> None:
    print(result.table)
    print(f"\nreport: {result.report_path}")
    if result.run_id:
        print(f"mlflow run: {result.run_id}")
    if result.model_uri:
        print(f"model: {result.model_uri}")


def fit_main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(f"usage: pertscale fit {{{','.join(FIT_MODELS)}}} --config FILE [overrides]")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    if name not in FIT_MODELS:
        raise ValueError(f"pertscale fit: unknown model {name!r}; choices: {sorted(FIT_MODELS)}")
    job, address = _parse(f"pertscale fit {name}", rest, name)
    _print(FIT_MODELS[name](job, address=address))
    return 0


def evaluate_main(argv: list[str]) -> int:
    job, address = _parse("pertscale evaluate", argv, "evaluate")
    _print(run_evaluate(job, address=address))
    return 0
