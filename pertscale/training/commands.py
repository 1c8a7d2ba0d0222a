"""`pertscale pretrain`: the driver of a pretraining run.

    pertscale pretrain --config configs/scgpt_debug.toml [--address ray://host:10001 | auto]
                       [--no-progress] [--section.field=value ...]

The driver checks the config and the store, opens the MLflow run (MLFLOW_TRACKING_URI, when
set, overrides the embedded sqlite default), starts or joins the Ray cluster, runs the
TorchTrainer with a progress bar, and logs and registers the final weights (safetensors with
the config and gene vocabulary). Model registration happens here, on the driver, never in a
worker. An unreachable tracking server costs a warning; training goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path, PurePosixPath
from typing import Any

from pertscale.config import load_config
from pertscale.paths import storage_root
from pertscale.tracking.commands import add_alias_argument, with_aliases
from pertscale.training.checkpoint import META_FILE, MODEL_DIR, read_meta
from pertscale.training.config import PretrainJobConfig
from pertscale.training.engine import resolve_backend
from pertscale.training.trainer import (
    ProgressBoard,
    build_trainer,
    fit_with_progress,
    init_ray,
    new_run_name,
    run_storage_uri,
)

__all__ = ["Launched", "PretrainResult", "absolute_uri", "launch_training",
           "parse_training_command", "pretrain_main", "run_pretrain"]


@dataclasses.dataclass
class PretrainResult:
    """What a finished run left behind."""

    run_name: str
    checkpoint_dir: str
    """The final checkpoint (engine states, loader/RNG states, model/ with the weights), where
    run storage holds it: a local path or an s3:// / gs:// URI."""
    metrics: dict[str, Any]
    """Rank 0's last reported metrics (step, cells, cells_digest, ...)."""
    mlflow_run_id: str | None
    model_uri: str | None
    """models:/pertscale-<model>/<version>, or None when tracking was off or unreachable."""
    model_dir: Path
    """A local copy of the final weights (model/ of the checkpoint, or the folder itself)."""


def _resolve_store(job: PretrainJobConfig) -> tuple[PretrainJobConfig, Any]:
    """Open the store on the driver (a bad URI fails here, naming it) and make a local path
    absolute, since workers do not share the driver's working directory."""
    from pertscale.store import open_store

    uri = job.data.store_uri
    if not uri:
        raise ValueError("data.store_uri is empty: pass --data.store_uri=PATH_OR_URI")
    uri = absolute_uri(uri)
    store = open_store(uri)
    need = job.data.batch_size * job.trainer.num_workers
    if store.n_cells < need:
        raise ValueError(f"store {uri} has {store.n_cells} cells, fewer than one micro-batch on "
                         f"every worker (data.batch_size={job.data.batch_size} x "
                         f"trainer.num_workers={job.trainer.num_workers} = {need})")
    data = dataclasses.replace(job.data, store_uri=uri)
    return dataclasses.replace(job, data=data), store


@dataclasses.dataclass
class Launched:
    """A finished training launch: where its final checkpoint is and its open MLflow run."""

    run_name: str
    checkpoint: str
    """The final checkpoint in run storage: a local path or an s3:// / gs:// URI."""
    local_dir: Path
    """A local folder with the final checkpoint's meta.json and model/ (the checkpoint itself
    when run storage is local)."""
    metrics: dict[str, Any]
    logger: Any
    """The driver's RunLogger (None when tracking is off); the caller ends it."""
    run_id: str | None


def absolute_uri(uri: str) -> str:
    """A local store path made absolute (workers do not share the driver's directory)."""
    return uri if "://" in uri else str(Path(uri).resolve())


def verify_before_training(uri: str, level: str) -> None:
    """A store that fails its check is not trained on (its reads would fail mid-run, or a
    changed obs table would give other labels than the fingerprint says)."""
    from pertscale.store import StoreError
    from pertscale.store.verify import verify_store

    report = verify_store(uri, level)
    if not report.ok:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise StoreError(f"store {uri} fails its {level} check: {report.problems[0]}{more}; "
                         f"run `pertscale verify {uri}` (trainer.verify_store=off skips the "
                         "check)")


def launch_training(job: Any, *, kind: str, tags: dict[str, str], address: str | None,
                    show_progress: bool, context: dict[str, Any] | None = None) -> Launched:
    """Run `train_loop_per_worker` for `job` (a JOB_KINDS[kind] config) on the Ray cluster at
    `address` (or an embedded one) with the driver's MLflow run and progress bar; returns the
    final checkpoint. A failed run ends its MLflow run as FAILED and raises."""
    import ray

    from pertscale.tracking import RunLogger, resolve_tracking_uri
    from pertscale.training.loop import train_loop_per_worker

    tr = job.trainer
    backend = resolve_backend(job.engine, tr.use_gpu)
    run_name = tr.run_name or new_run_name(job.model.name)
    if tr.verify_store != "off":
        verify_before_training(job.data.store_uri, tr.verify_store)
    init_ray(tr, address)

    logger = None
    run: dict[str, Any] = {"run_id": None, "tracking_uri": None}
    if job.tracking.enabled:
        tracking_uri = resolve_tracking_uri(job.tracking)
        logger = RunLogger(dataclasses.replace(job.tracking, uri=tracking_uri),
                           run_name=run_name, tags={"job": kind, **tags})
        run.update(run_id=logger.run_id if logger.active else None, tracking_uri=tracking_uri)

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    run["progress_board"] = board
    loop_config = {"job": job.to_dict(), "kind": kind, "run": run, "context": context}
    trainer = build_trainer(train_loop_per_worker, loop_config, tr, backend=backend,
                            run_name=run_name)
    try:
        result = fit_with_progress(trainer, board, tr.max_steps, show=show_progress)
    except BaseException:
        if logger is not None:
            logger.end("FAILED")
        raise
    finally:
        ray.kill(board)
    if result.error is not None:
        if logger is not None:
            logger.end("FAILED")
        raise result.error
    try:
        uri, local = fetch_final_checkpoint(result.checkpoint, run_name)
    except BaseException:
        if logger is not None:
            logger.end("FAILED")
        raise
    return Launched(run_name=run_name, checkpoint=uri, local_dir=local,
                    metrics=dict(result.metrics or {}), logger=logger, run_id=run["run_id"])


def fetch_final_checkpoint(checkpoint: Any, run_name: str) -> tuple[str, Path]:
    """(where the run's final checkpoint is, a local folder with its meta.json and model/).

    The checkpoint is read through Ray's Checkpoint (its filesystem and path), never as a local
    path: in run storage on an object store (trainer.storage_path=s3://...) only meta.json and
    model/ are downloaded, into <storage root>/checkpoints/<run>/<checkpoint>; the engine and
    optimizer states (most of a checkpoint, several times the weights) stay where they are."""
    import shutil

    import pyarrow.fs as pafs

    fs, path = checkpoint.filesystem, checkpoint.path
    uri = run_storage_uri(fs, path)
    if isinstance(fs, pafs.LocalFileSystem):
        local = Path(path)
    else:
        local = storage_root() / "checkpoints" / run_name / PurePosixPath(path).name
        partial = local.with_name(local.name + ".partial")
        for ours in (partial, local):  # an earlier (interrupted) download of this checkpoint
            if ours.exists():
                shutil.rmtree(ours)
        partial.mkdir(parents=True)
        here = pafs.LocalFileSystem()

        def fetch(name: str) -> None:
            dest = partial / name
            dest.parent.mkdir(parents=True, exist_ok=True)  # pyarrow makes no local folder
            pafs.copy_files(f"{path}/{name}", str(dest), source_filesystem=fs,
                            destination_filesystem=here)

        try:
            fetch(META_FILE)
            if read_meta(partial).get("final"):
                selector = pafs.FileSelector(f"{path}/{MODEL_DIR}", recursive=True)
                for info in fs.get_file_info(selector):
                    if info.type == pafs.FileType.File:
                        fetch(info.path[len(path) + 1:])
        except OSError as e:
            raise OSError(f"run {run_name}: reading its final checkpoint {uri} failed: "
                               f"{e}") from None
        partial.rename(local)
    if not read_meta(local).get("final"):
        raise RuntimeError(f"run {run_name} ended without its final checkpoint ({uri})")
    return uri, local


def run_pretrain(job: PretrainJobConfig, *, address: str | None = None,
                 show_progress: bool = True) -> PretrainResult:
    """Pretrain `job` on the Ray cluster at `address` (or an embedded one) and register the
    final weights; see the module docstring."""
    from pertscale.models import get_spec
    from pertscale.tracking import check_tracking_uri, log_model
    from pertscale.tracking.registry import load_model_dir

    check_tracking_uri(job.tracking, address)  # before the store and the cluster
    job, store = _resolve_store(job)
    spec = get_spec(job.model.name)
    context, prepared = None, {}
    if spec.prepare is not None:  # e.g. pathway_vae's pathway selection, once, on the driver
        context = dict(spec.prepare(job, store))
        prepared = context.pop("report", {})
    launched = launch_training(job, kind="pretrain", address=address,
                               show_progress=show_progress, context=context,
                               tags={"store_fingerprint": store.fingerprint,
                                     "store_uri": job.data.store_uri})
    model_dir, logger = launched.local_dir / MODEL_DIR, launched.logger
    model_uri = None
    if logger is not None:
        if prepared:
            logger.log_params({f"prepared.{k}": v for k, v in prepared.items()})
        model_uri = log_model(logger, load_model_dir(model_dir),
                              tags={"store_fingerprint": store.fingerprint,
                                    "store_uri": job.data.store_uri, "task": "pretrain",
                                    "ray_run": launched.run_name,
                                    "checkpoint": launched.checkpoint},
                              aliases=job.tracking.aliases, register=job.tracking.register)
        logger.end("FINISHED")
    return PretrainResult(run_name=launched.run_name, checkpoint_dir=launched.checkpoint,
                          metrics=launched.metrics, mlflow_run_id=launched.run_id,
                          model_uri=model_uri, model_dir=model_dir)


def parse_training_command(kind: str, description: str, argv: list[str]):
    """(job config, parsed args) of `pertscale KIND --config FILE [--address] [--no-progress]
    [--alias NAME] [--section.field=value ...]`, the shape of every training command."""
    parser = argparse.ArgumentParser(prog=f"pertscale {kind}", description=description)
    parser.add_argument("--config", required=True, help=f'job config file (job = "{kind}")')
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (auto, ray://host:10001, host:6379); "
                             "default: start an embedded local cluster")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_alias_argument(parser)
    args, overrides = parser.parse_known_args(argv)
    return with_aliases(load_config(args.config, overrides, job=kind), args.alias), args


def pretrain_main(argv: list[str]) -> int:
    job, args = parse_training_command(
        "pretrain", "Pretrain a model with DeepSpeed ZeRO on Ray Train; any other "
        "--section.field=value argument overrides the config file.", argv)
    assert isinstance(job, PretrainJobConfig)
    result = run_pretrain(job, address=args.address, show_progress=not args.no_progress)
    print(json.dumps({"run_name": result.run_name, "checkpoint": result.checkpoint_dir,
                      "step": result.metrics.get("step"), "cells": result.metrics.get("cells"),
                      "mlflow_run_id": result.mlflow_run_id, "model_uri": result.model_uri},
                     indent=2))
    return 0
