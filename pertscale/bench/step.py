"""Single-process train-step benchmark: our scgpt (packed and padded) beside scGPT's own model.

Cells are synthetic CSR rows with a realistic number of expressed genes (lognormal around
`median_genes`, truncated to the vocabulary), tokenized once by our Tokenizer; the very same
tokens feed every contender. A step is forward + backward + Adam update. Throughput counts real
(non-pad) tokens, so padding work shows up as lost throughput.

The peer is bowang-lab's `scgpt.model.model.TransformerModel` (continuous value encoder, MVC
decoder, no flash_attn on a CPU), installed outside the project with
`pip install --no-deps --target /tmp/scgpt_peer scgpt==0.2.4`; only its three model files are
loaded (its package __init__ pulls scanpy and friends, which the model does not need).

Contenders are timed round-robin, one step each in turn, so a load change on a shared machine
hits all of them alike; the reported step time is the median. Process CPU time is reported
beside wall time: on a shared machine wall time also counts time spent waiting for a core.

On CUDA (`device=cuda`) models, optimizer states and every token batch live on the GPU before
the first step (copied from pinned memory), each step is timed between two
torch.cuda.synchronize() calls, and bf16 is the module converted to bf16 as DeepSpeed's bf16
mode does (`module.bfloat16()`), stepped by fused AdamW. Per row, `mfu` is the model FLOPs of
the timed steps (pertscale.training.flops: non-embedding parameters, real tokens and real
sequence lengths, so padding earns nothing) per second over the device's peak, and
`peak_mem_mb` the contender's own peak: its parameters, gradients, optimizer states and batch
plus the most its step allocated beyond them (every contender stays resident, so the device's
raw peak would count the others' weights too). On a CPU both are None.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pertscale.config import Config, ConfigError, check_choice, check_range, parse_overrides
from pertscale.constants import (
    GENE_IDS,
    INDICES,
    INDPTR,
    MASKED,
    PAD_VALUE,
    PADDING_MASK,
    TARGET_VALUES,
    VALUE_IDS,
    VALUES,
)
from pertscale.data.tokenizer import Tokenizer, TokenizerConfig
from pertscale.models.scgpt import ScGPTConfig, build_scgpt
from pertscale.training.flops import (
    mfu,
    model_flops,
    non_embedding_params,
    peak_flops,
    sequence_work,
)

__all__ = [
    "StepBenchConfig",
    "format_rows",
    "load_scgpt_peer",
    "main",
    "run_step_bench",
    "synthetic_csr_batch",
]

PEER_INSTALL = "pip install --no-deps --target {path} scgpt==0.2.4"
DEVICES = ("cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Each layout's contender names its attention backend: torch's varlen kernels for packed tokens
# (never flash-attn's, which "auto" prefers where installed), SDPA with a key mask for padded.
BACKENDS = {"packed": "varlen", "padded": "sdpa"}


@dataclasses.dataclass
class StepBenchConfig(Config):
    flavor: str = "small"           # our model flavor (the peer gets the same sizes)
    d_model: int = 0                # override the flavor's width (0 = flavor default)
    n_layers: int = 0               # override the flavor's depth (0 = flavor default)
    n_heads: int = 0                # override the flavor's heads (0 = flavor default)
    d_ff: int = 0                   # override the flavor's feed-forward width (0 = default)
    device: str = "cpu"             # cpu | cuda (models, optimizer states and tokens on the GPU)
    precision: str = "auto"         # auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16
    batch_size: int = 8             # cells per step
    max_seq_len: int = 3000         # tokens per cell incl. <cls>
    median_genes: float = 1500.0    # median expressed genes per cell (lognormal)
    sigma: float = 0.6              # lognormal sigma of expressed genes per cell
    n_genes: int = 20000            # genes in the vocabulary
    steps: int = 3                  # timed steps per contender
    warmup: int = 1                 # untimed steps per contender
    threads: int = 2                # torch intra-op threads
    dropout: float = 0.0            # same for both models
    peer_path: str = "/tmp/scgpt_peer"  # --target dir of the scgpt install ("" = skip the peer)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps", "threads", "n_genes"):
            check_range(name, getattr(self, name), 1)
        check_range("warmup", self.warmup, 0)
        check_range("max_seq_len", self.max_seq_len, 2)
        check_range("median_genes", self.median_genes, 1.0)
        check_range("sigma", self.sigma, 0.0)
        check_choice("device", self.device, DEVICES)
        check_choice("precision", self.precision, PRECISIONS)
        self.model_config()  # sizes: flavor, overrides >= 0, d_model divisible by n_heads
        self.resolved_precision()  # the packed contender is always timed

    def resolved_precision(self) -> str:
        """The precision the steps run in: `auto` is bf16 on cuda, fp32 on cpu."""
        return bench_precision(self.precision, gpu=self.device == "cuda",
                               gpu_field="device='cuda'")

    def model_config(self, layout: str = "packed") -> ScGPTConfig:
        """Our scgpt at the flavor's sizes with the non-zero overrides, with the attention
        backend of `layout`'s contender."""
        return ScGPTConfig(flavor=self.flavor, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, d_ff=self.d_ff, dropout=self.dropout,
                           attention=BACKENDS[layout])


def bench_precision(precision: str, *, gpu: bool, gpu_field: str) -> str:
    """`precision` of a benchmark of packed batches: "auto" is bf16 on GPUs, fp32 on CPUs; fp32
    on GPUs is refused (`gpu_field` names the setting that asked for GPUs)."""
    resolved = precision if precision != "auto" else ("bf16" if gpu else "fp32")
    if gpu and resolved == "fp32":
        # NOTE: varlen attention on CUDA runs flash kernels, which take bf16/fp16 only.
        raise ConfigError(f"precision='fp32' with {gpu_field} is refused: packed batches run "
                          "varlen attention, whose CUDA flash kernels take bf16/fp16; use "
                          "precision=bf16 (or auto)")
    return resolved


def synthetic_csr_batch(cfg: StepBenchConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A CSR batch of `batch_size` cells with lognormal numbers of expressed genes."""
    n_expr = np.clip(rng.lognormal(np.log(cfg.median_genes), cfg.sigma, cfg.batch_size)
                     .astype(np.int64), 1, cfg.n_genes)
    indices = [np.sort(rng.choice(cfg.n_genes, n, replace=False)) for n in n_expr]
    indptr = np.concatenate([[0], np.cumsum(n_expr)])
    values = (rng.negative_binomial(2, 0.4, indptr[-1]) + 1).astype(np.float32)
    return {INDPTR: indptr, INDICES: np.concatenate(indices).astype(np.int32), VALUES: values}


def load_scgpt_peer(peer_path: str | Path) -> type:
    """scGPT's TransformerModel class, loaded from its model files only."""
    model_dir = Path(peer_path) / "scgpt" / "model"
    if not (model_dir / "model.py").is_file():
        raise FileNotFoundError(f"scGPT peer not found under {model_dir}; install it with "
                                f"`{PEER_INSTALL.format(path=peer_path)}` or set peer_path=''")
    pkg_name = "_scgpt_peer_model"
    if f"{pkg_name}.model" not in sys.modules:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [str(model_dir)]
        sys.modules[pkg_name] = pkg
        for name in ("dsbn", "grad_reverse", "model"):
            spec = importlib.util.spec_from_file_location(f"{pkg_name}.{name}",
                                                          model_dir / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
    return sys.modules[f"{pkg_name}.model"].TransformerModel


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).masked_fill(~masked, 0.0).sum() / masked.sum().clamp(min=1)


def _peer_step_fn(peer_cls: type, cfg: StepBenchConfig, size, vocab_size: int,
                  dtype: torch.dtype) -> tuple:
    model = peer_cls(ntoken=vocab_size, d_model=size.d_model, nhead=size.n_heads,
                     d_hid=size.d_ff, nlayers=size.n_layers, vocab={"<pad>": 0},
                     dropout=cfg.dropout, pad_token="<pad>", pad_value=PAD_VALUE, do_mvc=True,
                     input_emb_style="continuous", cell_emb_style="cls",
                     use_fast_transformer=False)

    def loss_fn(batch: dict) -> torch.Tensor:
        out = model(batch[GENE_IDS], batch[VALUE_IDS].to(dtype),
                    src_key_padding_mask=batch[PADDING_MASK], MVC=True)
        target, masked = batch[TARGET_VALUES], batch[MASKED]
        return (_masked_mse(out["mlm_output"].float(), target, masked)
                + _masked_mse(out["mvc_output"].float(), target, masked))

    return model, loss_fn


@dataclasses.dataclass
class _Contender:
    name: str
    layout: str
    model: torch.nn.Module
    loss_fn: Callable[[dict], torch.Tensor]
    optim: torch.optim.Optimizer


def _contenders(cfg: StepBenchConfig, vocab_size: int, device: torch.device,
                dtype: torch.dtype) -> list[_Contender]:
    built = []
    for layout in ("packed", "padded"):
        torch.manual_seed(cfg.seed)
        model = build_scgpt(cfg.model_config(layout), range(vocab_size))
        built.append(("pertscale", layout, model, lambda b, m=model: m(b).loss))
    if cfg.peer_path:
        torch.manual_seed(cfg.seed)
        model, loss_fn = _peer_step_fn(load_scgpt_peer(cfg.peer_path), cfg,
                                       cfg.model_config().size(), vocab_size, dtype)
        built.append(("scgpt-0.2.4", "padded", model, loss_fn))
    out = []
    for name, layout, model, loss_fn in built:
        # bf16 as DeepSpeed's bf16 mode does it: every floating parameter and buffer converted.
        model.to(device=device, dtype=dtype)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        out.append(_Contender(name, layout, model, loss_fn, optim))
    return out


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device`, copied from pinned memory (MAX_SEQLEN stays an int)."""
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor)
            else v for k, v in batch.items()}


def _resident_bytes(c: _Contender, batch: dict[str, Any]) -> int:
    """Bytes a contender holds between steps: parameters, gradients, optimizer states, batch."""
    tensors = list(c.model.parameters())
    tensors += [p.grad for p in c.model.parameters() if p.grad is not None]
    tensors += [v for state in c.optim.state.values() for v in state.values()
                if isinstance(v, torch.Tensor) and v.device.type != "cpu"]
    tensors += [v for v in batch.values() if isinstance(v, torch.Tensor)]
    return sum(t.untyped_storage().nbytes() for t in tensors)


def run_step_bench(cfg: StepBenchConfig,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Time train steps of every contender on the same cells; one row per contender.
    `log`, when given, receives the chosen precision and one progress line per step."""
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device "
                         "(torch.cuda.is_available() is False); use device=cpu")
    precision = cfg.resolved_precision()
    if log is not None:
        how = " (auto: bf16 on cuda, fp32 on cpu)" if cfg.precision == "auto" else ""
        log(f"device {cfg.device}, precision {precision}{how}")
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    vocab_size = cfg.n_genes + 3
    tok = Tokenizer(TokenizerConfig(max_seq_len=cfg.max_seq_len), range(vocab_size))
    n_batches = cfg.warmup + cfg.steps
    csr = [synthetic_csr_batch(cfg, rng) for _ in range(n_batches)]
    tokens = {layout: [tok(b, layout=layout, generator=torch.Generator().manual_seed(i))
                       for i, b in enumerate(csr)] for layout in ("packed", "padded")}
    contenders = _contenders(cfg, vocab_size, device, DTYPES[precision])
    # NOTE: every batch is on the device before the first timed step: the copies are not timed.
    on_device = {layout: [_to_device(b, device) for b in batches]
                 for layout, batches in tokens.items()}
    if cuda:
        torch.cuda.synchronize(device)
    times: list[list[float]] = [[] for _ in contenders]
    cpu_times: list[list[float]] = [[] for _ in contenders]
    peak_bytes: list[int] = [0 for _ in contenders]
    for step in range(n_batches):
        for i, c in enumerate(contenders):
            batch = on_device[c.layout][step]
            if cuda:
                resident = _resident_bytes(c, batch)
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0, c0 = time.perf_counter(), time.process_time()
            c.optim.zero_grad(set_to_none=True)
            c.loss_fn(batch).backward()
            c.optim.step()
            if cuda:
                torch.cuda.synchronize(device)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            if step >= cfg.warmup:
                times[i].append(elapsed)
                cpu_times[i].append(cpu)
                if cuda:
                    peak_bytes[i] = max(peak_bytes[i], resident + torch.cuda.max_memory_allocated(
                        device) - before)
            if log is not None:
                log(f"step {step}{' (warmup)' if step < cfg.warmup else ''} {c.name}/{c.layout}: "
                    f"{elapsed:.2f} s wall, {cpu:.2f} s cpu")

    timed = range(cfg.warmup, n_batches)
    work = [sequence_work(tokens["packed"][s]) for s in timed]
    assert work == [sequence_work(tokens["padded"][s]) for s in timed], "layouts differ in cells"
    real_tokens = sum(w[0] for w in work)
    sum_sq_len = sum(w[1] for w in work)
    padded_tokens = sum(int(tokens["padded"][s][GENE_IDS].numel()) for s in timed)
    size = cfg.model_config().size()
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = (peak_flops(device_name, precision, tf32=torch.backends.cuda.matmul.allow_tf32)
            if cuda else None)
    rows = []
    for c, ts, cs, peak_b in zip(contenders, times, cpu_times, peak_bytes):
        step_s = statistics.median(ts)
        cpu_s = statistics.median(cs)
        per_step_real = real_tokens / cfg.steps
        flops = model_flops(non_embedding_params(c.model), real_tokens, n_layers=size.n_layers,
                            d_model=size.d_model, sum_sq_len=sum_sq_len)
        timed_s = step_s * cfg.steps  # the median step, as many times as steps were timed
        rows.append({
            "model": c.name, "layout": c.layout,
            "attention": BACKENDS[c.layout] if c.name == "pertscale" else "torch-mha",
            "device": cfg.device,
            "device_name": device_name, "precision": precision, "d_model": size.d_model,
            "n_layers": size.n_layers, "n_heads": size.n_heads, "d_ff": size.d_ff,
            "batch_size": cfg.batch_size, "max_seq_len": cfg.max_seq_len,
            "params_m": round(sum(p.numel() for p in c.model.parameters()) / 1e6, 2),
            "real_tokens_per_step": round(per_step_real, 1),
            "computed_tokens_per_step": round((real_tokens if c.layout == "packed"
                                               else padded_tokens) / cfg.steps, 1),
            "pad_fraction": round(0.0 if c.layout == "packed"
                                  else 1 - real_tokens / padded_tokens, 4),
            "step_s_median": round(step_s, 6),
            "step_s_all": [round(t, 6) for t in ts],
            "real_tokens_per_s": round(per_step_real / step_s, 1),
            "cells_per_s": round(cfg.batch_size / step_s, 3),
            "cpu_s_median": round(cpu_s, 6),
            "real_tokens_per_cpu_s": round(per_step_real / cpu_s, 1),
            "threads": cfg.threads,
            "model_flops_per_step": flops / cfg.steps,
            "model_tflop_per_s": round(flops / timed_s / 1e12, 6),
            "mfu": round(mfu(flops, timed_s, peak), 4) if peak else None,
            "peak_mem_mb": round(peak_b / 2**20, 1) if cuda else None,
        })
    ours_padded = next(r for r in rows if r["model"] == "pertscale" and r["layout"] == "padded")
    for r in rows:
        # Packing should win at least in proportion to the padding it removes.
        r["padded_over_real_tokens"] = round(padded_tokens / real_tokens, 3)
        r["speedup_vs_own_padded"] = round(
            r["real_tokens_per_s"] / ours_padded["real_tokens_per_s"], 3)
        r["cpu_speedup_vs_own_padded"] = round(
            r["real_tokens_per_cpu_s"] / ours_padded["real_tokens_per_cpu_s"], 3)
    peer = next((r for r in rows if r["model"] == "scgpt-0.2.4"), None)
    for r in rows:
        # NOTE: CPU seconds beside wall seconds: on a shared machine wall time includes waiting.
        r["speedup_vs_scgpt"] = (round(r["real_tokens_per_s"] / peer["real_tokens_per_s"], 3)
                                 if peer else None)
        r["cpu_speedup_vs_scgpt"] = (
            round(r["real_tokens_per_cpu_s"] / peer["real_tokens_per_cpu_s"], 3) if peer else None)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the benchmark rows."""
    cols = ["model", "layout", "attention", "device", "precision", "d_model", "n_layers", "batch_size",
            "pad_fraction", "step_s_median", "real_tokens_per_s", "cells_per_s",
            "speedup_vs_own_padded", "mfu", "peak_mem_mb", "speedup_vs_scgpt", "cpu_s_median",
            "real_tokens_per_cpu_s", "cpu_speedup_vs_scgpt", "cpu_speedup_vs_own_padded",
            "padded_over_real_tokens"]
    table = [cols] + [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table)


def main(argv: list[str]) -> int:
    """`python -m pertscale.bench.step [--field=value ...] [--json=PATH]`."""
    overrides = parse_overrides(argv)
    json_path = overrides.pop("json", "")
    cfg = StepBenchConfig.from_dict(overrides)
    rows = run_step_bench(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_rows(rows))
    if json_path:
        import json

        Path(json_path).write_text(json.dumps({"config": cfg.to_dict(), "rows": rows}, indent=2))
        print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
