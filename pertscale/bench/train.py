"""`pertscale bench train`: training throughput and memory.

    pertscale bench train --mode step [--field=value ...] [--out PATH]
        tokens/s, cells/s of train steps for padded vs packed batches of our scgpt (and of
        bowang-lab's scGPT when installed), on cells with a lognormal number of expressed genes,
        on a CPU or one GPU (--device=cuda: bf16 by default, with MFU and peak memory per row;
        see pertscale.bench.step; fields are StepBenchConfig's).
    pertscale bench train --mode zero [--field=value ...] [--out PATH]
        peak memory per rank for ZeRO stages 0-3 on 2 Ray workers (DeepSpeed engine, real
        optimizer steps) with a model big enough for the sharding to show (fields are
        ZeroBenchConfig's; --use_gpu=true runs bf16 unless precision says otherwise).

Each mode prints a table and writes JSON (default storage/bench/train_<mode>.json). Memory per
rank: `state_mb` = live CPU tensor storage after the steps (parameters, gradients, optimizer
states, DeepSpeed buffers: what ZeRO shards), `train_rss_mb` = the worker's peak resident set
above its level before the model was built, `cuda_peak_mb` = torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pertscale.config import Config, check_choice, check_range, parse_overrides
from pertscale.paths import storage_root

__all__ = ["ZeroBenchConfig", "main", "run_zero_bench"]

MODES = ("step", "zero")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclasses.dataclass
class ZeroBenchConfig(Config):
    """The ZeRO memory benchmark: one short DeepSpeed run per stage on `num_workers` workers."""

    stages: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3])
    """ZeRO stages to measure."""
    num_workers: int = 2
    """Ray Train workers (ranks) per run."""
    use_gpu: bool = False
    """Measure on GPUs (one per worker, nccl) instead of CPUs (gloo)."""
    d_model: int = 512
    """Model width (scgpt)."""
    n_layers: int = 8
    """Transformer layers."""
    d_ff: int = 2048
    """Feed-forward width."""
    n_genes: int = 20000
    """Genes in the vocabulary (the gene embedding is a large share of the parameters)."""
    batch_size: int = 4
    """Cells per micro-batch per worker."""
    median_genes: float = 300.0
    """Median expressed genes per cell (lognormal, sigma 0.6)."""
    max_seq_len: int = 512
    """Tokens per cell incl. <cls>."""
    steps: int = 3
    """Optimizer steps per stage."""
    precision: str = "auto"
    """auto (bf16 with use_gpu, fp32 without), fp32, bf16 or fp16 (as engine.precision)."""
    bucket_size: int = 5_000_000
    """engine.bucket_size: communication buckets sized to the model, not DeepSpeed's 5e8."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages is empty: list ZeRO stages among 0, 1, 2, 3")
        for s in self.stages:
            check_range("stages[]", s, 0, 3)
        for name in ("num_workers", "d_model", "n_layers", "d_ff", "n_genes", "batch_size",
                     "steps", "max_seq_len", "bucket_size"):
            check_range(name, getattr(self, name), 1)
        check_range("median_genes", self.median_genes, 1.0)
        check_choice("precision", self.precision, PRECISIONS)
        self.resolved_precision()

    def resolved_precision(self) -> str:
        """The engine's precision: `auto` is bf16 with use_gpu, fp32 without."""
        from pertscale.bench.step import bench_precision

        return bench_precision(self.precision, gpu=self.use_gpu, gpu_field="use_gpu=true")


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _live_tensor_mb() -> float:
    """Bytes of every live torch tensor storage in this process (parameters, gradients,
    optimizer states, DeepSpeed's flat buffers), each storage counted once."""
    import gc

    import torch

    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def _zero_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: build the model and engine at one ZeRO stage, take a few steps and
    report this rank's memory."""
    import numpy as np
    import psutil
    import ray.train
    import torch

    from pertscale.bench.step import StepBenchConfig, synthetic_csr_batch
    from pertscale.data.tokenizer import Tokenizer, TokenizerConfig
    from pertscale.models.scgpt import ScGPTConfig, build_scgpt
    from pertscale.training.engine import (
        EngineConfig,
        build_ds_config,
        build_engine,
        model_init_context,
    )

    cfg = ZeroBenchConfig.from_dict(config["bench"])
    stage = config["stage"]
    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else None
    rss_before = psutil.Process().memory_info().rss / 2**20
    ds_config = build_ds_config(
        EngineConfig(zero_stage=stage, precision=cfg.resolved_precision(), warmup_steps=1,
                     bucket_size=cfg.bucket_size),
        micro_batch_size=cfg.batch_size, world_size=world, total_steps=cfg.steps + 1,
        use_gpu=cfg.use_gpu)
    torch.manual_seed(0)
    with model_init_context(ds_config):  # ZeRO-3: partitioned while it is built
        model = build_scgpt(ScGPTConfig(d_model=cfg.d_model, n_layers=cfg.n_layers,
                                        d_ff=cfg.d_ff, n_heads=8), range(cfg.n_genes + 3))
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine = build_engine(model, ds_config)
    sb = StepBenchConfig(batch_size=cfg.batch_size, median_genes=cfg.median_genes,
                         n_genes=cfg.n_genes, max_seq_len=cfg.max_seq_len, seed=rank)
    tok = Tokenizer(TokenizerConfig(max_seq_len=cfg.max_seq_len), range(cfg.n_genes + 3))
    rng, gen = np.random.default_rng(rank), torch.Generator().manual_seed(rank)
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        tokens = tok(synthetic_csr_batch(sb, rng), layout="packed", generator=gen)
        if device is not None:
            tokens = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                      for k, v in tokens.items()}
        out = engine(tokens)
        engine.backward(out.loss)
        engine.step()
    step_s = (time.perf_counter() - t0) / cfg.steps
    local_params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                       for p in engine.module.parameters())
    row = {"stage": stage, "rank": rank, "params_m": round(n_params / 1e6, 2),
           "local_params_m": round(local_params / 1e6, 2),
           "state_mb": round(_live_tensor_mb(), 1),
           "peak_rss_mb": round(_rss_peak_mb(), 1),
           "train_rss_mb": round(_rss_peak_mb() - rss_before, 1), "step_s": round(step_s, 3)}
    if cfg.use_gpu:
        row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    rows = [None] * world
    torch.distributed.all_gather_object(rows, row)
    # NOTE: Ray Train keeps only metrics that come with a checkpoint; the rows travel as one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            (Path(tmp) / "rows.json").write_text(json.dumps(rows))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"stage": stage}, checkpoint=checkpoint)


def run_zero_bench(cfg: ZeroBenchConfig, *, address: str | None = None) -> list[dict[str, Any]]:
    """One Ray Train run per ZeRO stage; rows = (stage, rank) memory measurements."""
    from pertscale.training.trainer import TrainerConfig, build_trainer, init_ray

    tr = TrainerConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, max_failures=0,
                       ray_num_cpus=max(cfg.num_workers, 2))
    init_ray(tr, address)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pertscale-zero-bench-") as tmp:
        tr = dataclasses.replace(tr, storage_path=tmp)
        for stage in cfg.stages:
            trainer = build_trainer(_zero_worker, {"bench": cfg.to_dict(), "stage": stage}, tr,
                                    backend="nccl" if cfg.use_gpu else "gloo",
                                    run_name=f"zero{stage}")
            result = trainer.fit()
            if result.error is not None:
                raise result.error
            with result.checkpoint.as_directory() as out:
                rows.extend(json.loads((Path(out) / "rows.json").read_text()))
    return rows


def format_zero_rows(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in ("stage", "rank", "params_m", "local_params_m", "state_mb", "train_rss_mb",
                        "peak_rss_mb", "cuda_peak_mb", "step_s") if c in rows[0]]
    table = [cols] + [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table)


def main(argv: list[str]) -> int:
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    overrides = parse_overrides(argv)
    mode = overrides.pop("mode", "step")
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is not one of {list(MODES)}")
    out = Path(overrides.pop("out", "") or storage_root() / "bench" / f"train_{mode}.json")
    address = overrides.pop("address", None)
    if mode == "step":
        from pertscale.bench.step import StepBenchConfig, format_rows, run_step_bench

        cfg = StepBenchConfig.from_dict(overrides)
        rows = run_step_bench(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
        table = format_rows(rows)
    else:
        cfg = ZeroBenchConfig.from_dict(overrides)
        how = " (auto: bf16 with use_gpu, fp32 without)" if cfg.precision == "auto" else ""
        print(f"precision {cfg.resolved_precision()}{how}", file=sys.stderr, flush=True)
        rows = run_zero_bench(cfg, address=address)
        table = format_zero_rows(rows)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mode": mode, "config": cfg.to_dict(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0
