"""The per-worker training function that Ray Train runs on every rank, for every task.

`train_loop_per_worker(config)` receives everything through its config dict (no module
globals): the job config as a plain dict under "job" and its kind under "kind" ("pretrain" or
"finetune"), the driver's run facts under "run" (tracking URI and MLflow run id, the progress
board actor) and, for the paired task, the task context the driver computed once under
"context" (genes, perturbation table, priors, validation targets; for a cells model with a
`prepare`, e.g. pathway_vae's pathway selection, what it prepared). It builds, for its rank, the
task's loader (cells: the CellLoader; paired: the PairedLoader), then everything else from the
model's spec (`pertscale.models.MODELS[model.name]`): the input builder (`make_inputs`, e.g.
scgpt's tokenizer) and the module (`build`) inside the DeepSpeed engine; restores the latest
checkpoint when Ray hands one over, trains to `trainer.max_steps` optimizer steps and writes
the final weights as the spec exports them.

Validated tasks (paired, with validation conditions or held-out cells): at the end of every
epoch the module is scored, by the validation conditions' predicted mean change
(`PairedValidation`, top-DE MSE: GEARS' rule) or by its own loss on held-out cells of the
training conditions (`LossValidation`, scGen's); the best epoch is kept (its weights in rank 0's
checkpoint, its score in every rank's progress) and is what the final export holds, unless the
job's `export_weights = "last"` (scGen's way: the score decides when to stop, the last epoch is
exported). With the job's `patience` > 0, training ends early once that many epochs in a row did not improve on it
(every rank decides alike: the score is averaged over ranks).

Logging: the model's `LossOutput.metrics` are per-batch averages (logged as their window mean),
its `counts` per-batch totals (logged as window sums over all ranks); the loop never special-
cases a metric name.

Inputs are made off the training thread (`pertscale.training.inputs.InputStream`: tokenised in
a background thread with a generator per batch position, pinned on GPUs, copied with
non_blocking); a checkpoint saves the loader position of the last batch a step consumed.

Every rank draws the same number of batches per epoch (the loaders guarantee it), so the ZeRO
collectives never wait on a rank that ran dry. Only rank 0 talks to MLflow and the progress
board; metrics are reduced over all ranks first.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pertscale.constants import CELL_INDEX
from pertscale.memory import peak_rss_mb
from pertscale.training.checkpoint import (
    BEST_FILE,
    MODEL_DIR,
    Progress,
    capture_rng,
    load_rank_state,
    local_checkpoint,
    read_meta,
    restore_rng,
    save_rank_state,
    write_meta,
)
from pertscale.training.inputs import InputStream, Prepared

log = logging.getLogger(__name__)

__all__ = ["InjectedFailure", "device_peak_flops", "train_loop_per_worker"]


class InjectedFailure(RuntimeError):
    """Raised by `trainer.fail_at_step`: a worker failure on purpose."""


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of this worker's GPU at the training precision (pertscale.training.flops);
    None on CPUs and unknown devices, where no MFU is logged (said once)."""
    from pertscale.training.flops import peak_flops

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name, precision, tf32=torch.backends.cuda.matmul.allow_tf32)
    if peak is None:
        log.info("no MFU: the peak FLOP/s of %r is not in pertscale.training.flops.PEAK_FLOPS",
                 name)
    return peak


def _to_device(tokens: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in tokens.items()}


def _seed_rank(seed: int, rank: int, device: torch.device) -> None:
    """Per-rank streams for dropout (torch, this rank's own CUDA device), numpy and python; the
    inputs' draws come from per-batch generators (pertscale.training.inputs)."""
    stream = seed * 1_000_003 + rank + 1
    random.seed(stream)
    np.random.seed(stream % 2**32)
    torch.manual_seed(stream)  # NOTE: seeds every visible GPU too; this rank draws on its own


def _all_reduce_sum(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Sum each value over ranks; 0-d tensors stay on their device until this one transfer."""
    import torch.distributed as dist

    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _average_buffers(module: torch.nn.Module, world: int) -> None:
    """Average the running statistics of every BatchNorm layer over ranks, in place.

    Each rank's running statistics follow its own batches; validation and the export must see
    one model, the same on every rank. Only normalisation statistics are touched: other buffers
    (e.g. a graph's edge weights) are constants of the model."""
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and \
                layer.track_running_stats:
            for buf in (layer.running_mean, layer.running_var):
                dist.all_reduce(buf.data)
                buf.data.div_(world)


def _task(job: Any, spec: Any, config: dict[str, Any], rank: int, world: int):
    """(loader, context for build / make_inputs, validation or None) of this rank's task.
    The validation is built by `validation(make_inputs)`, once the inputs exist."""
    if spec.task == "cells":
        from pertscale.data.loader import build_loader

        loader = build_loader(job.data, rank=rank, world_size=world)
        tokens = loader.store.vocab.tokens
        prepared = config.get("context")  # the spec's prepare, run once on the driver
        return loader, tokens if prepared is None else {**prepared, "vocab": tokens}, None
    from pertscale.data.paired import LossValidation, PairedLoader, PairedValidation

    context = config["context"]
    # NOTE: a model may draw from more conditions than it is scored on (scgen: every control)
    conditions = context.get("loader_conditions") or context["train"]["conditions"]
    loader = PairedLoader(job.data, conditions, rank=rank, world_size=world,
                          holdout=context.get("holdout_rows"))
    if context.get("val"):
        return loader, context, lambda make_inputs: PairedValidation(context)
    if context.get("holdout_x") is not None:
        return loader, context, lambda make_inputs: LossValidation(context, make_inputs)
    return loader, context, None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train on this rank; see the module docstring for what `config` holds."""
    import ray.train

    from pertscale.models import get_spec
    from pertscale.training.config import JOB_KINDS
    from pertscale.training.engine import (
        assign_parameters,
        build_ds_config,
        build_engine,
        build_lr_scheduler,
        full_state_dict,
        model_init_context,
        optimizer_kernel,
    )
    from pertscale.training.flops import mfu, model_flops, non_embedding_params, sequence_work

    job = JOB_KINDS[config.get("kind", "pretrain")].from_dict(config["job"])
    run = config["run"]
    tr, eng = job.trainer, job.engine
    torch.set_num_threads(tr.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = (torch.device("cuda", torch.cuda.current_device()) if tr.use_gpu
              else torch.device("cpu"))

    spec = get_spec(job.model.name)
    loader, context, validate = _task(job, spec, config, rank, world)
    if loader.num_batches == 0:
        raise ValueError(f"store {job.data.store_uri} has too few {spec.task} cells for one "
                         f"batch of data.batch_size={job.data.batch_size} on each of {world} "
                         f"workers")
    make_inputs = spec.make_inputs(job, context)
    validate = validate(make_inputs) if validate is not None else None
    ds_config = build_ds_config(eng, micro_batch_size=job.data.batch_size, world_size=world,
                                total_steps=tr.max_steps, use_gpu=tr.use_gpu)
    torch.manual_seed(tr.seed)  # identical initial weights on every rank
    # Under ZeRO-3 the model is built inside deepspeed.zero.Init: each weight is partitioned
    # as soon as its module exists, so no rank ever holds the whole model.
    with model_init_context(ds_config):
        model = spec.build(job.model, context)
    if spec.task == "paired":  # init_from: a parent's weights, computed once on the driver
        assign_parameters(model, context.get("init_state"), context.get("init_rows"))
    engine = build_engine(model, ds_config, lr_scheduler=build_lr_scheduler(eng))
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                   for p in engine.module.parameters())
    _seed_rank(tr.seed, rank, device)
    progress = Progress()
    best_weights: dict[str, torch.Tensor] | None = None

    restored = ray.train.get_checkpoint()
    resumed_from = None
    if restored is not None:
        with local_checkpoint(restored, rank) as ckpt_dir:
            read_meta(Path(ckpt_dir), world_size=world, zero_stage=eng.zero_stage)
            loader_state, rng_state, progress = load_rank_state(Path(ckpt_dir), rank,
                                                                engine=engine)
            if rank == 0 and (Path(ckpt_dir) / BEST_FILE).is_file():
                from safetensors.torch import load_file

                best_weights = load_file(str(Path(ckpt_dir) / BEST_FILE))
        loader.load_state_dict(loader_state)
        resumed_from = progress.step
        restore_rng(rng_state, device)

    logger = rank_logger = None  # rank 0's (the run's metrics); this rank's own
    # NOTE: with a tracking server every rank also logs its node and throughput (a cluster's
    # ranks run on several nodes); a database file takes rank 0's writes only
    server = str(run.get("tracking_uri") or "").startswith(("http://", "https://"))
    if run.get("run_id") and (rank == 0 or server):
        import ray

        from pertscale.tracking import RunLogger, TrackingConfig

        rank_logger = RunLogger(TrackingConfig(uri=run["tracking_uri"],
                                               experiment=job.tracking.experiment),
                                run_id=run["run_id"])
        logger = rank_logger if rank == 0 else None
        if logger is not None and restored is None:
            logger.log_params({**job.to_dict(), "engine.ds_config": ds_config,
                               "engine.optimizer_kernel": optimizer_kernel(eng, tr.use_gpu),
                               "model.num_params": n_params, "trainer.world_size": world})
        if server:
            rank_logger.set_tags({f"rank{rank}.node_ip": ray.util.get_node_ip_address()})
    if rank == 0:
        log.info("optimizer: %s", optimizer_kernel(eng, tr.use_gpu))
    flops_peak = device_peak_flops(device, eng.precision)
    n_compute = non_embedding_params(engine.module)  # the MFU's N (module doc of flops)
    attn_layers, attn_width = job.model.attention_shape()

    def work(inputs: dict[str, Any]) -> tuple[int, int]:
        n_tok = spec.num_tokens(inputs) if spec.num_tokens else 0
        return n_tok, (sequence_work(inputs)[1] if n_tok and attn_layers else 0)

    stream = InputStream(loader, make_inputs, seed=tr.seed, rank=rank,
                         pin_memory=device.type == "cuda", work=work)
    position = loader.state_dict()  # of the last batch a step consumed
    epoch_now = loader.epoch
    board = run.get("progress_board")
    if tr.fail_at_step >= 0 and board is None:
        raise ValueError("trainer.fail_at_step needs the driver's progress board (which holds the "
                         "once-only failure ticket): launch with run_pretrain / pertscale pretrain")
    fail_here = tr.fail_at_step >= 0 and rank == world - 1

    def checkpoint(final: bool) -> None:
        # NOTE: DeepSpeed saves rank 0's module buffers only; averaged first, every rank resumes
        # with the buffers it would have had (and the uninterrupted run averages here too).
        _average_buffers(engine.module, world)
        with tempfile.TemporaryDirectory(prefix=f"pertscale-ckpt-r{rank}-") as tmp:
            out = Path(tmp)
            save_rank_state(out, rank, engine=engine, loader_state=position,
                            rng_state=capture_rng(device), progress=progress)
            if rank == 0 and best_weights is not None:
                from safetensors.torch import save_file

                save_file(best_weights, str(out / BEST_FILE))
            if final:
                weights = full_state_dict(engine)  # collective under ZeRO-3
                if rank == 0:
                    from pertscale.tracking import save_model_dir

                    var = loader.store.var
                    symbols = (var["gene_symbol"].astype(str).tolist()
                               if "gene_symbol" in var.columns else None)
                    training = {"final_step": progress.step}
                    if validate is not None:
                        training.update({"best_step": progress.best_step,
                                         f"best_{validate.score}": progress.best_score,
                                         "exported": job.export_weights})
                    if best_weights is not None and job.export_weights == "best":
                        weights = best_weights
                    if validate is not None:  # paired: the final step ends an epoch
                        training.update(epochs_run=epoch_now + 1, stopped_early=stopped)
                    save_model_dir(out / MODEL_DIR, spec.export(
                        job.model, weights,
                        {"job": job.to_dict(), "vocab": loader.store.vocab.tokens
                         if spec.task == "cells" else None, "gene_symbols": symbols,
                         "context": context,
                         "training": training}))
            if rank == 0:
                write_meta(out, {"step": progress.step, "world_size": world,
                                 "zero_stage": eng.zero_stage, "final": final,
                                 "cells": progress.cells, "num_params": n_params,
                                 "resumed_from": resumed_from})
            metrics = {"step": progress.step, "final": final, "cells": progress.cells,
                       "cells_digest": progress.cells_digest}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(out),
                             checkpoint_dir_name=f"checkpoint_{progress.step:08d}"
                             + ("_final" if final else ""))

    def end_of_epoch() -> bool:
        """Validate (every rank: under ZeRO-3 the forward is collective) and keep the best;
        True when training should stop early (`patience` epochs without improvement)."""
        nonlocal best_weights, epoch_t0
        train_s = time.perf_counter() - epoch_t0  # the epoch's batches, before validation
        _average_buffers(engine.module, world)
        scores = validate(engine.module, device)
        # NOTE: the decision below starts a collective, so every rank must take the same one:
        # the score is averaged over ranks (identical models give identical scores anyway).
        scores = dict(zip(scores, (v / world for v in _all_reduce_sum(list(scores.values()),
                                                                      device))))
        if progress.record_score(scores[validate.score]) and job.export_weights == "best":
            weights = full_state_dict(engine)  # collective under ZeRO-3
            if rank == 0:
                best_weights = weights
        stop = 0 < job.patience <= progress.stale_epochs
        if logger is not None:
            logger.log_metrics({**scores, f"best_{validate.score}": progress.best_score,
                                "epoch": float(epoch_now), "epoch_train_s": train_s,
                                "worker_peak_rss_mb": peak_rss_mb()},
                               step=progress.step)
            if stop:
                logger.set_tags({"stopped_early_after_epochs": str(epoch_now + 1)})
        epoch_t0 = time.perf_counter()
        return stop

    def fresh_window() -> dict[str, float]:
        return {"loss": 0.0, "micro": 0, "cells": 0, "tokens": 0, "sum_sq": 0,
                "t0": time.perf_counter()}

    window, metric_sums, count_sums = fresh_window(), {}, {}

    def train_step(item: Prepared) -> bool:
        """One micro-batch (and, at the end of an accumulation window, the optimizer step and
        its logging); True when training should stop early."""
        nonlocal window, metric_sums, count_sums, position, epoch_now
        batch = item.batch
        out = engine(_to_device(item.inputs, device))
        engine.backward(out.loss)
        engine.step()
        position, epoch_now = item.position, item.epoch
        progress.consume(batch[CELL_INDEX], item.tokens)
        epoch_done = validate is not None and item.at_epoch_end
        # NOTE: summed on the device in float64; read back once per log window, so a step
        # never waits for the GPU just to record its loss.
        window["loss"] = window["loss"] + out.loss.detach().double()
        window["micro"] += 1
        window["cells"] += len(batch[CELL_INDEX])
        window["tokens"] += item.tokens
        window["sum_sq"] += item.sum_sq_len
        for sums, terms in ((metric_sums, out.metrics), (count_sums, out.counts)):
            for name, value in terms.items():  # the model's own terms, e.g. mlm_mse
                sums[name] = sums.get(name, 0.0) + value.detach().double()
        if progress.micro_step % eng.grad_accum_steps != 0:
            # inside an accumulation window: DeepSpeed stepped no optimizer
            return epoch_done and end_of_epoch()
        progress.step += 1
        if progress.step % tr.log_every == 0 or progress.step == tr.max_steps:
            # the same names on every rank: one model
            names, counted = sorted(metric_sums), sorted(count_sums)
            loss_sum, micro, cells, n_tok, sum_sq, *term_sums = _all_reduce_sum(
                [window["loss"], window["micro"], window["cells"], window["tokens"],
                 window["sum_sq"], *(metric_sums[n] for n in names),
                 *(count_sums[n] for n in counted)], device)
            elapsed = max(time.perf_counter() - window["t0"], 1e-9)
            metrics = {"loss": loss_sum / max(micro, 1), "lr": float(engine.get_lr()[0]),
                       "cells_per_s": cells / elapsed, "tokens_per_s": n_tok / elapsed,
                       "epoch": float(epoch_now),
                       **{n: v / max(micro, 1) for n, v in zip(names, term_sums)},
                       **dict(zip(counted, term_sums[len(names):]))}
            if flops_peak and n_tok:
                flops = model_flops(n_compute, int(n_tok), n_layers=attn_layers,
                                    d_model=attn_width, sum_sq_len=int(sum_sq))
                metrics["mfu"] = mfu(flops, elapsed, flops_peak, world)  # all ranks' devices
            if rank_logger is not None:
                own = {f"rank{rank}.cells_per_s": window["cells"] / elapsed} if server else {}
                rank_logger.log_metrics({**(metrics if rank == 0 else {}), **own},
                                        step=progress.step)
            if rank == 0 and board is not None:
                board.post.remote(progress.step, metrics)
            window, metric_sums, count_sums = fresh_window(), {}, {}
        return epoch_done and end_of_epoch()

    epoch_t0 = time.perf_counter()
    engine.train()
    stopped = False
    while progress.step < tr.max_steps and not stopped:
        with contextlib.closing(stream.epoch_items()) as items:
            for item in items:
                if fail_here and progress.step == tr.fail_at_step and \
                        ray.get(board.claim_failure.remote()):
                    raise InjectedFailure(
                        f"trainer.fail_at_step={tr.fail_at_step}: rank {rank} fails on purpose")
                stopped = train_step(item)
                if stopped or progress.step >= tr.max_steps:
                    break
                if progress.step % tr.checkpoint_every == 0 and \
                        progress.micro_step % eng.grad_accum_steps == 0:
                    checkpoint(final=False)
    checkpoint(final=True)
