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

from pertscale.config import Config, check_range, parse_overrides
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

__all__ = [
    "StepBenchConfig",
    "format_rows",
    "load_scgpt_peer",
    "main",
    "run_step_bench",
    "synthetic_csr_batch",
]

PEER_INSTALL = "pip install --no-deps --target {path} scgpt==0.2.4"


@dataclasses.dataclass
class StepBenchConfig(Config):
    flavor: str = "small"           # our model flavor (the peer gets the same sizes)
    n_layers: int = 0               # override the flavor's depth (0 = flavor default)
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


def _peer_step_fn(peer_cls: type, cfg: StepBenchConfig, size, vocab_size: int) -> tuple:
    model = peer_cls(ntoken=vocab_size, d_model=size.d_model, nhead=size.n_heads,
                     d_hid=size.d_ff, nlayers=size.n_layers, vocab={"<pad>": 0},
                     dropout=cfg.dropout, pad_token="<pad>", pad_value=PAD_VALUE, do_mvc=True,
                     input_emb_style="continuous", cell_emb_style="cls",
                     use_fast_transformer=False)

    def loss_fn(batch: dict) -> torch.Tensor:
        out = model(batch[GENE_IDS], batch[VALUE_IDS].float(),
                    src_key_padding_mask=batch[PADDING_MASK], MVC=True)
        target, masked = batch[TARGET_VALUES], batch[MASKED]
        return (_masked_mse(out["mlm_output"], target, masked)
                + _masked_mse(out["mvc_output"], target, masked))

    return model, loss_fn


def _contenders(cfg: StepBenchConfig, vocab_size: int) -> list[tuple[str, str, Any, Callable]]:
    model_cfg = ScGPTConfig(flavor=cfg.flavor, n_layers=cfg.n_layers, dropout=cfg.dropout)
    out = []
    for layout in ("packed", "padded"):
        torch.manual_seed(cfg.seed)
        model = build_scgpt(model_cfg, range(vocab_size))
        out.append(("pertscale", layout, model, lambda b, m=model: m(b).loss))
    if cfg.peer_path:
        torch.manual_seed(cfg.seed)
        model, loss_fn = _peer_step_fn(load_scgpt_peer(cfg.peer_path), cfg, model_cfg.size(),
                                       vocab_size)
        out.append(("scgpt-0.2.4", "padded", model, loss_fn))
    return out


def run_step_bench(cfg: StepBenchConfig,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Time train steps of every contender on the same cells; one row per contender.
    `log`, when given, receives one progress line per step."""
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    vocab_size = cfg.n_genes + 3
    tok = Tokenizer(TokenizerConfig(max_seq_len=cfg.max_seq_len), range(vocab_size))
    n_batches = cfg.warmup + cfg.steps
    csr = [synthetic_csr_batch(cfg, rng) for _ in range(n_batches)]
    tokens = {layout: [tok(b, layout=layout, generator=torch.Generator().manual_seed(i))
                       for i, b in enumerate(csr)] for layout in ("packed", "padded")}
    contenders = _contenders(cfg, vocab_size)
    optims = [torch.optim.Adam(m.parameters(), lr=1e-4) for _, _, m, _ in contenders]
    times: list[list[float]] = [[] for _ in contenders]
    cpu_times: list[list[float]] = [[] for _ in contenders]
    for step in range(n_batches):
        for i, (_, layout, model, loss_fn) in enumerate(contenders):
            batch = tokens[layout][step]
            t0, c0 = time.perf_counter(), time.process_time()
            optims[i].zero_grad(set_to_none=True)
            loss_fn(batch).backward()
            optims[i].step()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            if step >= cfg.warmup:
                times[i].append(elapsed)
                cpu_times[i].append(cpu)
            if log is not None:
                name, layout = contenders[i][:2]
                log(f"step {step}{' (warmup)' if step < cfg.warmup else ''} {name}/{layout}: "
                    f"{elapsed:.2f} s wall, {cpu:.2f} s cpu")

    timed = range(cfg.warmup, n_batches)
    real_tokens = sum(int(tokens["packed"][s][GENE_IDS].numel()) for s in timed)
    padded_tokens = sum(int(tokens["padded"][s][GENE_IDS].numel()) for s in timed)
    size = ScGPTConfig(flavor=cfg.flavor, n_layers=cfg.n_layers).size()
    rows = []
    for (name, layout, model, _), ts, cs in zip(contenders, times, cpu_times):
        step_s = statistics.median(ts)
        cpu_s = statistics.median(cs)
        per_step_real = real_tokens / cfg.steps
        rows.append({
            "model": name, "layout": layout, "d_model": size.d_model,
            "n_layers": size.n_layers, "n_heads": size.n_heads, "d_ff": size.d_ff,
            "batch_size": cfg.batch_size, "max_seq_len": cfg.max_seq_len,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "real_tokens_per_step": round(per_step_real, 1),
            "computed_tokens_per_step": round((real_tokens if layout == "packed"
                                               else padded_tokens) / cfg.steps, 1),
            "pad_fraction": round(0.0 if layout == "packed"
                                  else 1 - real_tokens / padded_tokens, 4),
            "step_s_median": round(step_s, 4),
            "step_s_all": [round(t, 4) for t in ts],
            "real_tokens_per_s": round(per_step_real / step_s, 1),
            "cells_per_s": round(cfg.batch_size / step_s, 3),
            "cpu_s_median": round(cpu_s, 4),
            "real_tokens_per_cpu_s": round(per_step_real / cpu_s, 1),
            "threads": cfg.threads,
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
    cols = ["model", "layout", "d_model", "n_layers", "batch_size", "pad_fraction",
            "step_s_median", "real_tokens_per_s", "cells_per_s", "speedup_vs_scgpt",
            "cpu_s_median", "real_tokens_per_cpu_s", "cpu_speedup_vs_scgpt",
            "speedup_vs_own_padded", "cpu_speedup_vs_own_padded", "padded_over_real_tokens"]
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
