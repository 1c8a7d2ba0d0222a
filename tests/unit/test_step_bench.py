"""Train-step benchmark: same cells for every contender, honest token accounting, the device and
precision a user asks for (refused at config time where the packed contender cannot run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pertscale.bench.step import (
    StepBenchConfig,
    format_rows,
    load_scgpt_peer,
    run_step_bench,
    synthetic_csr_batch,
)
from pertscale.bench.train import ZeroBenchConfig
from pertscale.cli import main as cli_main
from pertscale.config import ConfigError
from pertscale.constants import CU_SEQLENS, GENE_IDS
from pertscale.data.tokenizer import Tokenizer, TokenizerConfig
from pertscale.models.scgpt import build_scgpt
from pertscale.training.flops import model_flops

PEER = Path("/tmp/scgpt_peer")
TINY = {"flavor": "debug", "batch_size": 3, "max_seq_len": 64, "median_genes": 30,
        "sigma": 0.8, "n_genes": 300, "steps": 1, "warmup": 0, "threads": 2}


def _check_rows(rows):
    packed = next(r for r in rows if r["layout"] == "packed")
    padded = next(r for r in rows if r["layout"] == "padded" and r["model"] == "pertscale")
    assert packed["real_tokens_per_step"] == padded["real_tokens_per_step"]
    assert packed["computed_tokens_per_step"] == packed["real_tokens_per_step"]
    assert padded["computed_tokens_per_step"] >= padded["real_tokens_per_step"]
    expected_pad = 1 - padded["real_tokens_per_step"] / padded["computed_tokens_per_step"]
    assert padded["pad_fraction"] == pytest.approx(expected_pad, abs=1e-3)
    assert packed["padded_over_real_tokens"] == pytest.approx(
        padded["computed_tokens_per_step"] / packed["real_tokens_per_step"], rel=1e-3)
    assert padded["cpu_speedup_vs_own_padded"] == 1.0
    assert padded["speedup_vs_own_padded"] == 1.0
    assert packed["speedup_vs_own_padded"] == pytest.approx(
        packed["real_tokens_per_s"] / padded["real_tokens_per_s"], rel=1e-2)
    for r in rows:
        assert r["real_tokens_per_s"] == pytest.approx(
            r["real_tokens_per_step"] / r["step_s_median"], rel=1e-2)
        # achieved model FLOP/s is the step's model FLOPs over its median time
        assert r["model_tflop_per_s"] == pytest.approx(
            r["model_flops_per_step"] / r["step_s_median"] / 1e12, rel=1e-2, abs=1e-4)
    # padding is not useful work: both layouts of the same cells score the same model FLOPs
    assert packed["model_flops_per_step"] == padded["model_flops_per_step"]
    table = format_rows(rows)
    for col in ("real_tokens_per_s", "speedup_vs_own_padded", "mfu", "peak_mem_mb", "precision",
                "device", "attention"):
        assert col in table.splitlines()[0].split()


def test_step_bench_ours_only():
    rows = run_step_bench(StepBenchConfig(**TINY, peer_path=""))
    assert [(r["model"], r["layout"]) for r in rows] == [("pertscale", "packed"),
                                                         ("pertscale", "padded")]
    _check_rows(rows)


def test_cpu_rows_name_device_and_precision_and_have_no_mfu_or_device_memory():
    rows = run_step_bench(StepBenchConfig(**TINY, peer_path=""))
    assert [(r["layout"], r["attention"]) for r in rows] == [("packed", "varlen"),
                                                             ("padded", "sdpa")]
    for r in rows:
        assert (r["device"], r["device_name"], r["precision"]) == ("cpu", "cpu", "fp32")
        # no peak FLOP/s and no device allocator on a CPU: None, never a made-up number
        assert r["mfu"] is None and r["peak_mem_mb"] is None


def test_model_flops_count_real_tokens_and_lengths_without_the_embedding():
    cfg = StepBenchConfig(**{**TINY, "steps": 2, "warmup": 1}, peer_path="")
    rows = run_step_bench(cfg)
    # the very same cells, rebuilt from the seed the way the benchmark builds them
    rng = np.random.default_rng(cfg.seed)
    csr = [synthetic_csr_batch(cfg, rng) for _ in range(cfg.warmup + cfg.steps)]
    tok = Tokenizer(TokenizerConfig(max_seq_len=cfg.max_seq_len), range(cfg.n_genes + 3))
    timed = [tok(csr[i], layout="packed", generator=torch.Generator().manual_seed(i))
             for i in range(cfg.warmup, cfg.warmup + cfg.steps)]
    tokens = sum(int(b[GENE_IDS].numel()) for b in timed)
    lengths = [int(n) for b in timed for n in b[CU_SEQLENS].diff()]
    sum_sq = sum(n * n for n in lengths)
    assert sum(lengths) == tokens
    model = build_scgpt(cfg.model_config(), range(cfg.n_genes + 3))
    n_all = sum(p.numel() for p in model.parameters())
    n_non_embedding = n_all - model.gene_embedding.weight.numel()
    size = cfg.model_config().size()
    expected = model_flops(n_non_embedding, tokens, n_layers=size.n_layers,
                           d_model=size.d_model, sum_sq_len=sum_sq) / cfg.steps
    for r in rows:
        assert r["real_tokens_per_step"] == pytest.approx(tokens / cfg.steps)
        assert r["model_flops_per_step"] == pytest.approx(expected)


def test_each_layout_names_its_attention_backend():
    cfg = StepBenchConfig(**TINY, peer_path="")
    assert cfg.model_config("packed").attention == "varlen"
    assert cfg.model_config("padded").attention == "sdpa"


def test_size_overrides_reach_the_model_and_the_rows():
    cfg = StepBenchConfig(**TINY, peer_path="", d_model=32, n_layers=1, n_heads=2, d_ff=48)
    rows = run_step_bench(cfg)
    model = build_scgpt(cfg.model_config(), range(cfg.n_genes + 3))
    for r in rows:
        assert (r["d_model"], r["n_layers"], r["n_heads"], r["d_ff"]) == (32, 1, 2, 48)
        assert r["params_m"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def test_bf16_converts_the_module_and_keeps_the_accounting():
    rows = run_step_bench(StepBenchConfig(**TINY, peer_path="", precision="bf16"))
    assert {r["precision"] for r in rows} == {"bf16"}
    _check_rows(rows)


def test_precision_choice_is_said():
    lines = []
    run_step_bench(StepBenchConfig(**TINY, peer_path=""), log=lines.append)
    assert lines[0] == "device cpu, precision fp32 (auto: bf16 on cuda, fp32 on cpu)"


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_cpu():
    assert StepBenchConfig(device="cuda").resolved_precision() == "bf16"
    assert StepBenchConfig(device="cpu").resolved_precision() == "fp32"
    assert StepBenchConfig(device="cpu", precision="bf16").resolved_precision() == "bf16"


def test_fp32_on_cuda_is_refused_at_config_time_naming_the_alternative():
    with pytest.raises(ConfigError, match=r"precision='fp32' with device='cuda'.*"
                                          r"use precision=bf16"):
        StepBenchConfig(device="cuda", precision="fp32")


@pytest.mark.parametrize("field,value,allowed", [("device", "gpu", "'cpu', 'cuda'"),
                                                 ("precision", "fp16", "'auto', 'fp32', 'bf16'")])
def test_unknown_device_or_precision_lists_the_options(field, value, allowed):
    with pytest.raises(ConfigError, match=rf"{field}='{value}' is not one of \[{allowed}\]"):
        StepBenchConfig(**{field: value})


def test_heads_must_divide_the_width():
    with pytest.raises(ConfigError, match="d_model=100 is not divisible by n_heads=8"):
        StepBenchConfig(d_model=100)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_a_gpu_fails_with_one_clear_line():
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        run_step_bench(StepBenchConfig(**TINY, peer_path="", device="cuda"))


def test_cli_refuses_fp32_on_cuda_in_one_line(capsys, tmp_path):
    rc = cli_main(["bench", "train", "--mode=step", "--device=cuda", "--precision=fp32",
                   f"--out={tmp_path / 'x.json'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "precision='fp32' with device='cuda'" in err[0]
    assert not (tmp_path / "x.json").exists()


# `pertscale bench train --mode zero` shares the command: its precision follows use_gpu.
def test_zero_bench_auto_precision_follows_use_gpu():
    assert ZeroBenchConfig().resolved_precision() == "fp32"
    assert ZeroBenchConfig(use_gpu=True).resolved_precision() == "bf16"
    assert ZeroBenchConfig(use_gpu=True, precision="fp16").resolved_precision() == "fp16"


def test_zero_bench_refuses_fp32_on_gpus():
    with pytest.raises(ConfigError, match=r"precision='fp32' with use_gpu=true.*"
                                          r"use precision=bf16"):
        ZeroBenchConfig(use_gpu=True, precision="fp32")
    with pytest.raises(ConfigError, match=r"precision='fp8' is not one of"):
        ZeroBenchConfig(precision="fp8")


@pytest.mark.skipif(not (PEER / "scgpt" / "model" / "model.py").is_file(),
                    reason="scGPT peer not installed (pip install --no-deps --target "
                           "/tmp/scgpt_peer scgpt==0.2.4)")
def test_step_bench_with_scgpt_peer():
    rows = run_step_bench(StepBenchConfig(**TINY, peer_path=str(PEER)))
    peer = rows[-1]
    assert peer["model"] == "scgpt-0.2.4" and peer["speedup_vs_scgpt"] == 1.0
    _check_rows(rows)


def test_missing_peer_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        load_scgpt_peer(tmp_path)
