"""`pertscale finetune`: the driver of a fine-tune on the paired task.

    pertscale finetune --config configs/gears.toml [--address auto] [--alias NAME]
                       [--no-progress] [--section.field=value ...]

The driver opens the store, reads its pseudo-bulk perturbation data and the split, asks the
model's spec to prepare its context (GEARS: the perturbation table and the gene graphs, cached
by content hash), initialises gene embeddings from a registered model when `init_from` is set
(where gene symbols match; the count is reported and tagged), sets trainer.max_steps from
`epochs` (and the "step" schedule's period to one epoch), and trains on the Ray cluster with the
same engine, checkpoints, exact resume and MLflow logging as pretraining. The final export holds
the best epoch's weights (validation top-DE MSE). It then reports the model beside the baselines
on every test subgroup, in the same MLflow run, and registers it as `pertscale-<model>` with
lineage tags and the evaluation summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from pertscale.config import ConfigError
from pertscale.training.checkpoint import MODEL_DIR
from pertscale.training.commands import absolute_uri, launch_training, parse_training_command
from pertscale.training.config import FinetuneJobConfig

__all__ = ["FinetuneResult", "finetune_main", "run_finetune"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FinetuneResult:
    """What a finished fine-tune left behind."""

    run_name: str
    checkpoint_dir: str
    model_uri: str | None
    report_path: Path
    table: str
    summary: Any
    mlflow_run_id: str | None
    training: dict[str, Any]
    """The export's training facts: final_step, and for validated models best_step,
    best_<score> (best_val_mse_de, best_val_elbo), epochs_run and stopped_early."""
    init: dict[str, str]
    """Lineage of the gene-embedding initialisation (empty without init_from)."""


def _init_from(job: FinetuneJobConfig, data: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Context entries with the initial weights the model's spec takes from `init_from`, and
    the lineage tags (parent, its version, what was taken)."""
    if not job.init_from:
        return {}, {}
    from pertscale.models import get_spec
    from pertscale.tracking import pull_model

    spec = get_spec(job.model.name)
    if spec.init_from is None:
        raise ConfigError(f"init_from={job.init_from}: a {spec.name} model cannot be "
                          f"initialised from a registered model")
    parent = pull_model(job.init_from, tracking=job.tracking)
    try:
        values, rows, report = spec.init_from(job.model, get_spec(parent.kind),
                                              parent.exported, data)
    except ValueError as e:
        raise ValueError(f"init_from={job.init_from}: {e}") from None
    log.info("init_from %s: %s", job.init_from, ", ".join(f"{k} {v}" for k, v in report.items()))
    # NOTE: the parent's kind, config and vocabulary too: a model whose structure follows its
    # parent's (scgen's pathway_vae encoder) builds it from them on every rank
    parent_facts = {"kind": parent.kind, "config": parent.exported.config,
                    "vocab": list(parent.exported.vocab)}
    return ({"init_state": values, "init_rows": rows, "init_parent": parent_facts},
            {"init_from": job.init_from,
             "init_from_version": f"models:/{parent.name}/{parent.version}", **report})


def _plan(job: FinetuneJobConfig, task: Any, conditions: list[str],
          n_holdout: int = 0) -> FinetuneJobConfig:
    """trainer.max_steps from epochs over the cells of the loader's `conditions` (less the
    `n_holdout` held-out ones), and the step schedule's period of one epoch."""
    n_train = int(task.data.conditions.loc[list(conditions), "n_cells"].sum()) - n_holdout
    world, bs = job.trainer.num_workers, job.data.batch_size
    steps_per_epoch = n_train // world // bs // job.engine.grad_accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"store {job.data.store_uri}: {n_train} training perturbed cells are "
                         f"too few for one step of data.batch_size={bs} x trainer.num_workers="
                         f"{world} x engine.grad_accum_steps={job.engine.grad_accum_steps}")
    engine, max_steps = job.engine, job.epochs * steps_per_epoch
    if engine.lr_schedule != "step" and engine.warmup_steps >= max_steps:
        raise ConfigError(f"engine.warmup_steps={engine.warmup_steps} is not below the run's "
                          f"{max_steps} optimizer steps (epochs={job.epochs} x {steps_per_epoch} "
                          f"per epoch): the learning rate would never reach engine.lr; lower "
                          f"engine.warmup_steps or raise epochs")
    if engine.lr_schedule == "step" and engine.lr_decay_every == 0:
        engine = engine.replace(lr_decay_every=steps_per_epoch)
    return job.replace(trainer=job.trainer.replace(max_steps=max_steps), engine=engine)


def run_finetune(job: FinetuneJobConfig, *, address: str | None = None,
                 show_progress: bool = True) -> FinetuneResult:
    """Fine-tune, evaluate and register (see the module docstring)."""
    from pertscale.data.paired import PairedTask, build_paired_context
    from pertscale.data.perturbation import load_perturbation_data
    from pertscale.data.splits import build_split
    from pertscale.eval.commands import ModelPredictor, eval_summary
    from pertscale.eval.evaluation import (
        build_baselines,
        make_report,
        report_cells,
        run_predictors,
    )
    from pertscale.models import get_spec
    from pertscale.store import open_store
    from pertscale.tracking import check_tracking_uri, log_model
    from pertscale.tracking.registry import load_model_dir

    check_tracking_uri(job.tracking, address)  # before the store, the priors and the cluster
    spec = get_spec(job.model.name)
    if not job.data.store_uri:
        raise ConfigError("data.store_uri is empty: pass --data.store_uri=PATH_OR_URI")
    job = job.replace(data=job.data.replace(store_uri=absolute_uri(job.data.store_uri)))
    src = open_store(job.data.store_uri)
    data = load_perturbation_data(src, job.data.perturbation)
    split = build_split(data, job.data.split)
    task = PairedTask(src, data, split, job.data)
    extra = dict(spec.prepare(job, task))
    prepared = extra.pop("report", {})
    init, init_tags = _init_from(job, data)
    context = build_paired_context(task, extra.pop("pert_genes"), {**extra, **init})
    job = _plan(job, task, context.get("loader_conditions") or split.train,
                len(context.get("holdout_rows", ())))
    if job.patience and not (split.val or context.get("holdout_x") is not None):
        raise ConfigError(f"patience={job.patience}: a {spec.name} model on split "
                          f"{split.name} has no validation conditions or held-out cells to "
                          f"stop on")
    lineage = {"store_fingerprint": data.source["fingerprint"], "store_uri": data.source["uri"],
               "split": split.name, **init_tags}
    launched = launch_training(job, kind="finetune", context=context, address=address,
                               show_progress=show_progress, tags=lineage)
    logger = launched.logger
    try:
        exported = load_model_dir(launched.local_dir / MODEL_DIR)
        predictors = [(ModelPredictor(spec.name, spec.load(exported), data), False)]
        predictors += [(b, True) for b in build_baselines(job.report, None)]
        predictions = run_predictors(predictors, data, split)
        training = dict(exported.config.get("training") or {})
        meta = {spec.name: {**training, "epochs": job.epochs, **init_tags}, "prepared": prepared}
        if logger is not None:
            logger.log_params({f"prepared.{k}": v for k, v in prepared.items()})
        cells = report_cells(job.report, src, job.data.perturbation, data, split)
        report = make_report(job.report, run_name=launched.run_name, data=data, split=split,
                             predictions=predictions, meta=meta, cells=cells, logger=logger)
        model_uri = None
        if logger is not None:
            model_uri = log_model(
                logger, exported,
                {**lineage, "task": "finetune", "ray_run": launched.run_name,
                 "checkpoint": launched.checkpoint,
                 "eval_summary": eval_summary(report, spec.name)},
                aliases=job.tracking.aliases, register=job.tracking.register)
    except BaseException:
        if logger is not None:
            logger.end("FAILED")
        raise
    if logger is not None:
        logger.end("FINISHED")
    return FinetuneResult(run_name=launched.run_name,
                          checkpoint_dir=launched.checkpoint, model_uri=model_uri,
                          report_path=report.report_path, table=report.table,
                          summary=report.summary, mlflow_run_id=launched.run_id,
                          training=training, init=init_tags)


def finetune_main(argv: list[str]) -> int:
    job, args = parse_training_command(
        "finetune", "Fine-tune a perturbation model on perturbed cells paired with controls "
        "(DeepSpeed ZeRO on Ray Train), register it and report it beside the baselines; any "
        "other --section.field=value argument overrides the config.", argv)
    result = run_finetune(job, address=args.address, show_progress=not args.no_progress)
    print(result.table)
    print(f"\nreport: {result.report_path}")
    print(json.dumps({"run_name": result.run_name, "checkpoint": result.checkpoint_dir,
                      "training": result.training, "init": result.init,
                      "mlflow_run_id": result.mlflow_run_id, "model_uri": result.model_uri},
                     indent=2))
    return 0
