"""Ray Train wiring: the embedded or remote Ray cluster, and a TorchTrainer that runs the
per-worker loop with ScalingConfig, FailureConfig and RunConfig(storage_path) from the config.

`init_ray(address)` connects to a running cluster when given an address and otherwise starts an
embedded local one with an explicit CPU count; either way every worker gets DS_ACCELERATOR
(cpu when no GPU is used) and OMP_NUM_THREADS through the job's runtime environment.

A run lives under `<storage_path>/<run_name>`. Launching again with the same storage path and
run name resumes it from its latest checkpoint (Ray Train restores the run's state); a worker
failure within a run restarts every worker from the latest checkpoint, up to `max_failures`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pertscale.cluster import start_ray
from pertscale.config import Config, ConfigError, check_choice, check_range
from pertscale.paths import storage_root
from pertscale.progress import bar_label

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")

__all__ = [
    "ProgressBoard",
    "TrainerConfig",
    "build_trainer",
    "check_resources",
    "fit_with_progress",
    "init_ray",
    "new_run_name",
    "run_storage",
    "run_storage_path",
    "run_storage_uri",
    "worker_env",
]

@dataclasses.dataclass
class TrainerConfig(Config):
    """The training run: length, workers, checkpoints, failures, logging."""

    max_steps: int = 1000
    """Optimizer steps to train (each = engine.grad_accum_steps micro-batches on every worker)."""
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """One GPU per worker (nccl) instead of CPUs (gloo, DS_ACCELERATOR=cpu)."""
    cpus_per_worker: int = 1
    """CPUs reserved per worker."""
    torch_threads: int = 1
    """torch intra-op threads per worker (keep workers x threads <= cores)."""
    seed: int = 0
    """Seed of the model initialisation and of every rank's masking / dropout streams."""
    checkpoint_every: int = 100
    """Optimizer steps between checkpoints (a final one is always written)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run's storage (the latest is never deleted)."""
    max_failures: int = 1
    """Worker-group restarts from the latest checkpoint before the run fails."""
    fail_at_step: int = -1
    """Failure injection for tests and drills: the last rank raises after this many optimizer
    steps, once per launch (Ray then restarts the workers from the latest checkpoint); -1 = off."""
    log_every: int = 10
    """Optimizer steps between metric logs (loss, lr, cells/s, tokens/s, MFU on GPUs)."""
    storage_path: str = ""
    """Ray Train storage for checkpoints: a local folder or s3://...; empty = <storage root>/runs."""
    run_name: str = ""
    """Run folder under storage_path; reuse a name to resume that run; empty = a fresh name."""
    ray_num_cpus: int = 0
    """CPUs of the embedded local Ray cluster (ignored with --address); 0 = all cores."""
    verify_store: str = "metadata"
    """Check of the store before training: metadata (documents, fingerprint, every shard file
    present; seconds), full (every shard hashed, as `pertscale verify`) or off."""

    def __post_init__(self) -> None:
        check_range("max_steps", self.max_steps, 1)
        check_range("num_workers", self.num_workers, 1)
        check_range("cpus_per_worker", self.cpus_per_worker, 0)
        check_range("torch_threads", self.torch_threads, 1)
        check_range("seed", self.seed, 0)
        check_range("checkpoint_every", self.checkpoint_every, 1)
        check_range("keep_checkpoints", self.keep_checkpoints, 1)
        check_range("max_failures", self.max_failures, -1)
        check_range("fail_at_step", self.fail_at_step, -1)
        if self.fail_at_step >= self.max_steps:
            raise ConfigError(f"fail_at_step={self.fail_at_step} must be below "
                             f"max_steps={self.max_steps} (or -1 = off)")
        check_range("log_every", self.log_every, 1)
        check_range("ray_num_cpus", self.ray_num_cpus, 0)
        check_choice("verify_store", self.verify_store, ("metadata", "full", "off"))
        if self.storage_path.startswith(REMOTE_SCHEMES):
            scheme, _, rest = self.storage_path.partition("://")
            if not rest.strip("/") or rest.startswith("/") or "?" in rest:
                raise ConfigError(f"trainer.storage_path={self.storage_path!r}: give "
                                  f"{scheme}://BUCKET/PREFIX (endpoint, region and credentials "
                                  "come from the environment)")


def worker_env(use_gpu: bool, torch_threads: int) -> dict[str, str]:
    """Environment every worker needs before it imports deepspeed: DS_ACCELERATOR=cpu on CPU
    workers; on GPU workers the driver's DS_ACCELERATOR unless it says cpu (the Makefile and
    CPU shells export that), else cuda. A value replaced here is logged."""
    env = {"OMP_NUM_THREADS": str(torch_threads)}
    driver = os.environ.get("DS_ACCELERATOR", "")
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    elif driver and driver != "cpu":
        env["DS_ACCELERATOR"] = driver  # e.g. another accelerator DeepSpeed supports
    else:
        env["DS_ACCELERATOR"] = "cuda"
        if driver == "cpu":
            log.info("trainer.use_gpu=true: GPU workers get DS_ACCELERATOR=cuda (this shell "
                     "exports DS_ACCELERATOR=cpu)")
    return env


def init_ray(cfg: TrainerConfig, address: str | None = None) -> None:
    """Connect to the cluster at `address`, or start an embedded local cluster. A Ray session
    already open in this process (tests, notebooks) is reused as is."""
    start_ray(address, num_cpus=cfg.ray_num_cpus or os.cpu_count(),
              env_vars=worker_env(cfg.use_gpu, cfg.torch_threads))
    check_resources(cfg, address)


def check_resources(cfg: TrainerConfig, address: str | None = None) -> None:
    """Refuse a run the connected cluster cannot place: Ray Train would wait for the workers'
    resources forever (e.g. trainer.use_gpu=true on a machine without GPUs)."""
    import ray

    per_worker = {"CPU": float(cfg.cpus_per_worker)}
    if cfg.use_gpu:
        per_worker["GPU"] = 1.0

    def placeable() -> tuple[list[dict[str, float]], int]:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        # NOTE: a worker's resources must fit on one node; the workers together on the cluster
        return nodes, sum(int(min(node.get(k, 0.0) // v for k, v in per_worker.items()))
                          for node in nodes)

    nodes, fits = placeable()
    if fits < cfg.num_workers and address:
        # a cluster being started (Slurm, an autoscaler) gets its nodes one by one
        from pertscale.cluster import RAY_TIMEOUT_ENV
        from pertscale.config import env_seconds

        limit = env_seconds(RAY_TIMEOUT_ENV, 30.0)
        log.info("waiting up to %g s for the cluster at %s to place %d workers (%d fit now)",
                 limit, address, cfg.num_workers, fits)
        deadline = time.monotonic() + limit
        while fits < cfg.num_workers and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes, fits = placeable()
    if fits >= cfg.num_workers:
        return
    total = {k: sum(node.get(k, 0.0) for node in nodes) for k in per_worker}
    where = f"the Ray cluster at {address}" if address else "the local Ray cluster"
    asked = " + ".join(f"{v:g} {k}" for k, v in per_worker.items())
    has = ", ".join(f"{v:g} {k}" for k, v in total.items())
    fix = "set trainer.use_gpu=false or " if cfg.use_gpu and not total.get("GPU") else ""
    raise ConfigError(
        f"trainer: {cfg.num_workers} workers of {asked} each cannot be placed on {where} "
        f"({len(nodes)} node(s), {has} in all; {fits} worker(s) fit); {fix}lower "
        f"trainer.num_workers / trainer.cpus_per_worker")


def run_storage_path(cfg: TrainerConfig) -> str:
    """Absolute storage path (workers run elsewhere: a relative path would not mean the same)."""
    if cfg.storage_path.startswith(REMOTE_SCHEMES):
        return cfg.storage_path
    path = Path(cfg.storage_path) if cfg.storage_path else storage_root() / "runs"
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def run_storage(cfg: TrainerConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) of RunConfig. An object store gets a pyarrow filesystem
    of our own whose every request has PERTSCALE_STORE_TIMEOUT_S (default 60 s) as its limit:
    the one Ray would make from the URI waits as long as the SDK's defaults say (minutes on an
    endpoint that does not answer). Credentials, endpoint (AWS_ENDPOINT_URL_S3) and region
    come from the environment, as for stores."""
    path = run_storage_path(cfg)
    if not path.startswith(REMOTE_SCHEMES):
        return path, None
    import pyarrow.fs as pafs

    from pertscale.store.format import store_timeout

    scheme, _, rest = path.partition("://")
    rest = rest.rstrip("/")
    limit = store_timeout()
    if scheme == "s3":
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not region and not endpoint:
            region = _bucket_region(rest.split("/", 1)[0], limit)
            log.info("trainer.storage_path=%s: bucket region %s (AWS_REGION unset)", path,
                     region)
        kwargs: dict[str, Any] = {}
        if endpoint:  # an S3-compatible server (MinIO, Ceph, moto); pyarrow reads no env for it
            from urllib.parse import urlparse

            parsed = urlparse(endpoint)
            kwargs = {"endpoint_override": parsed.netloc or parsed.path,
                      "scheme": parsed.scheme or "https"}
        fs = pafs.S3FileSystem(region=region, request_timeout=limit, connect_timeout=limit,
                               **kwargs)
    else:
        from datetime import timedelta

        fs = pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=limit))
    return rest, fs


def _bucket_region(bucket: str, limit: float) -> str:
    """The AWS region of `bucket`, asked of S3 within `limit` seconds (pyarrow sets none)."""
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as FutureTimeout

    import pyarrow.fs as pafs

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(pafs.resolve_s3_region, bucket).result(timeout=limit)
    except FutureTimeout:
        raise TimeoutError(f"s3://{bucket}: no answer to its region within {limit:g} s (set "
                           "AWS_REGION, or PERTSCALE_STORE_TIMEOUT_S for the limit)") from None
    finally:
        pool.shutdown(wait=False)


def run_storage_uri(filesystem: Any, path: str) -> str:
    """Where a Ray checkpoint (its filesystem and path) lives, as a URI a user can open."""
    import pyarrow.fs as pafs

    if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
        return path
    return f"{filesystem.type_name}://{path}"


def build_trainer(train_fn, loop_config: dict[str, Any], cfg: TrainerConfig, *, backend: str,
                  run_name: str):
    """The TorchTrainer for `train_fn(loop_config)` on `cfg.num_workers` workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    storage_path, storage_filesystem = run_storage(cfg)
    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )


class ProgressBoard:
    """A tiny Ray actor body owned by the driver, outliving worker restarts: rank 0 posts
    (step, metrics) and the driver polls them for its bar; it also holds the one ticket of
    `trainer.fail_at_step`, so an injected failure happens once per launch."""

    def __init__(self) -> None:
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.failure_ticket = True

    def claim_failure(self) -> bool:
        claimed, self.failure_ticket = self.failure_ticket, False
        return claimed

    def post(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        self.metrics = dict(metrics)

    def read(self) -> tuple[int, dict[str, float]]:
        return self.step, self.metrics


def fit_with_progress(trainer, board, total_steps: int, *, show: bool = True,
                      poll_s: float = 0.5):
    """Run `trainer.fit()` in a thread while a tqdm bar on the driver follows `board`."""
    import ray
    from tqdm import tqdm

    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the driver thread below
            outcome["error"] = e

    thread = threading.Thread(target=target, name="pertscale-fit", daemon=True)
    thread.start()
    with tqdm(total=total_steps, unit="step", disable=not show, dynamic_ncols=True,
              desc=bar_label()) as bar:
        while thread.is_alive():
            thread.join(poll_s)
            bar.set_description(bar_label(), refresh=False)
            try:
                step, metrics = ray.get(board.read.remote(), timeout=5)
            except Exception:  # noqa: BLE001, S112 - the bar is cosmetic; fit decides
                continue
            bar.n = min(step, total_steps)
            if metrics:
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()
                                 if k in ("loss", "cells_per_s", "tokens_per_s")}, refresh=False)
            bar.refresh()
        bar.n = min(ray.get(board.read.remote())[0], total_steps)
        bar.refresh()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def new_run_name(prefix: str = "pretrain") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
