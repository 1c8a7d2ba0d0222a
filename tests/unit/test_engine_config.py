"""The DeepSpeed JSON is generated from EngineConfig alone, a bad engine setting fails with
the field's name, and DeepSpeed itself accepts the JSON for every ZeRO stage and precision."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from pertscale.config import ConfigError
from pertscale.training.engine import (
    LR_SCHEDULES,
    EngineConfig,
    build_ds_config,
    full_state_dict,
    optimizer_kernel,
    resolve_backend,
)


def _ds(**kw):
    return build_ds_config(EngineConfig(**kw), micro_batch_size=8, world_size=4, total_steps=500)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_json_carries_stage_precision_and_batch_arithmetic(stage, precision):
    ds = _ds(zero_stage=stage, precision=precision, grad_accum_steps=3)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4  # cells per optimizer step over all ranks
    assert ds["zero_optimization"]["reduce_bucket_size"] == EngineConfig().bucket_size


def test_optimizer_clipping_and_schedule_follow_the_config():
    ds = _ds(lr=3e-4, weight_decay=0.05, betas=(0.8, 0.95), grad_clip=0.5, warmup_steps=40,
             min_lr_ratio=0.1)
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"] | {} == {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-8,
                                             "weight_decay": 0.05, "torch_adam": True}
    assert ds["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "warmup_min_ratio": 0.0, "warmup_num_steps": 40, "total_num_steps": 500,
        "cos_min_ratio": 0.1, "warmup_type": "linear"}}
    assert _ds(lr_schedule="linear")["scheduler"]["type"] == LR_SCHEDULES["linear"]
    assert "total_num_steps" not in _ds(lr_schedule="constant")["scheduler"]["params"]


def test_warmup_is_capped_below_a_short_run():
    ds = build_ds_config(EngineConfig(warmup_steps=100), micro_batch_size=2, world_size=1,
                         total_steps=10)
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 9


def test_offload_blocks_and_optimizer_kernel():
    ds = _ds(zero_stage=3, offload_optimizer="cpu", offload_params="cpu")
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    # offloaded states are stepped by DeepSpeed's CPU Adam, not torch's
    assert "torch_adam" not in ds["optimizer"]["params"]
    assert optimizer_kernel(EngineConfig(zero_stage=2, offload_optimizer="cpu"), use_gpu=True) \
        == "deepspeed DeepSpeedCPUAdam (adamw mode, offloaded states)"
    # GPUs without offload: torch's fused AdamW (DeepSpeed's FusedAdam would need nvcc)
    gpu = build_ds_config(EngineConfig(), micro_batch_size=1, world_size=1, total_steps=5,
                          use_gpu=True)
    assert gpu["optimizer"]["params"]["torch_adam"] is True
    assert gpu["optimizer"]["params"]["fused"] is True
    assert optimizer_kernel(EngineConfig(), use_gpu=True) == "torch.optim.AdamW(fused=True)"
    assert "fused" not in _ds()["optimizer"]["params"]  # CPUs: torch's AdamW, not fused
    assert optimizer_kernel(EngineConfig(optimizer="adam"), use_gpu=False) == "torch.optim.Adam"
    explicit = build_ds_config(EngineConfig(optimizer_impl="deepspeed"), micro_batch_size=1,
                               world_size=1, total_steps=5, use_gpu=True)
    assert "torch_adam" not in explicit["optimizer"]["params"]
    assert optimizer_kernel(EngineConfig(optimizer_impl="deepspeed"), use_gpu=True) \
        == "deepspeed FusedAdam (adamw mode, JIT-compiled)"


@pytest.mark.parametrize("kw, match", [
    ({"zero_stage": 4}, "zero_stage=4 is not one of"),
    ({"precision": "fp8"}, "precision='fp8' is not one of"),
    ({"offload_optimizer": "cpu", "zero_stage": 0}, "offload_optimizer='cpu' needs zero_stage"),
    ({"offload_params": "cpu", "zero_stage": 2}, "offload_params='cpu' needs zero_stage=3"),
    ({"offload_optimizer": "nvme", "zero_stage": 2}, "offload_optimizer='nvme' is not one of"),
    ({"optimizer_impl": "torch", "offload_optimizer": "cpu"}, "optimizer_impl='torch' cannot"),
    ({"lr": 0.0}, "lr=0.0 is outside"),
    ({"betas": (0.9, 1.0)}, r"betas\[1\]=1.0 is outside"),
    ({"grad_accum_steps": 0}, "grad_accum_steps=0 is outside"),
    ({"lr_schedule": "stepwise"}, "lr_schedule='stepwise' is not one of"),
])
def test_bad_engine_settings_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kw)


def test_backend_follows_the_device():
    assert resolve_backend(EngineConfig(), use_gpu=False) == "gloo"
    assert resolve_backend(EngineConfig(), use_gpu=True) == "nccl"
    with pytest.raises(ConfigError, match="nccl.*needs GPUs"):
        resolve_backend(EngineConfig(backend="nccl"), use_gpu=False)


def test_pretrain_job_cross_checks():
    from pertscale.training.config import PretrainJobConfig

    with pytest.raises(ConfigError, match="model.n_bins=31 != tokenizer.n_bins=51"):
        PretrainJobConfig.from_dict({"model": {"n_bins": 31}})
    with pytest.raises(ConfigError, match="condition_key='batch' must be one of data.obs_columns"):
        PretrainJobConfig.from_dict({"tokenizer": {"condition_key": "batch"},
                                     "model": {"n_conditions": 2}})
    with pytest.raises(ConfigError, match="fail_at_step=20 must be below max_steps=20"):
        PretrainJobConfig.from_dict({"trainer": {"max_steps": 20, "fail_at_step": 20}})


@pytest.mark.parametrize("model, tokenizer", [
    ({"name": "scgpt"}, {}),                                       # auto on packed batches
    ({"name": "scgpt", "attention": "varlen"}, {"layout": "padded"}),
    ({"name": "scgpt", "attention": "flash_attn"}, {}),
    ({"name": "pathway_vae"}, {}),
])
def test_fp32_with_flash_kernels_on_gpus_is_refused_at_config_time(model, tokenizer):
    from pertscale.training.config import PretrainJobConfig

    job = {"model": model, "tokenizer": tokenizer, "trainer": {"use_gpu": True}}
    with pytest.raises(ConfigError, match="engine.precision='fp32' with model.attention=.*"
                                          "flash varlen kernels, which take bf16/fp16"):
        PretrainJobConfig.from_dict(job)
    PretrainJobConfig.from_dict({**job, "engine": {"precision": "bf16"}})  # the fix it names


def test_fp32_padded_sdpa_on_gpus_and_flash_attn_on_cpus():
    from pertscale.training.config import PretrainJobConfig

    PretrainJobConfig.from_dict({"model": {"attention": "sdpa"}, "tokenizer": {"layout": "padded"},
                                 "trainer": {"use_gpu": True}})  # no flash kernel: fp32 is fine
    with pytest.raises(ConfigError, match="model.attention='flash_attn' runs on CUDA only"):
        PretrainJobConfig.from_dict({"model": {"attention": "flash_attn"}})


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group, as Ray Train sets up for each worker."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp = pytest.MonkeyPatch()
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        mp.setenv(key, value)  # what Ray Train's torch backend sets in every worker
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()
    mp.undo()


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "bf16"), (2, "fp32"),
                                              (3, "fp32")])
def test_deepspeed_accepts_the_json_and_returns_full_weights(process_group, stage, precision):
    """A real engine from the generated JSON takes a step; full_state_dict gives every weight
    at full shape in fp32 whatever the stage."""
    from pertscale.training.engine import build_engine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = build_ds_config(EngineConfig(zero_stage=stage, precision=precision, lr=1e-2,
                                      warmup_steps=1, lr_schedule="constant"),
                         micro_batch_size=4, world_size=1, total_steps=3)
    engine = build_engine(model, ds)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(4, 6, dtype=dtype)
    for _ in range(3):
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    assert engine.global_steps == 3
    weights = full_state_dict(engine)
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in before.items()}
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(not torch.allclose(weights[k], before[k]) for k in before)  # it trained


@pytest.mark.parametrize("args, code, message", [
    ([], 1, "data.store_uri is empty"),
    (["--data.store_uri=/nonexistent/store"], 1, "/nonexistent/store"),
    (["--engine.zero_stag=3"], 2, r"zero_stag.*valid keys.*zero_stage"),
    (["--engine.zero_stage=5"], 2, "engine.zero_stage=5 is not one of"),
])
def test_pretrain_cli_reports_bad_input_before_starting_ray(args, code, message, capsys):
    import re

    from pertscale.cli import main

    config = str(Path(__file__).resolve().parents[2] / "configs" / "debug_cpu.toml")
    assert main(["pretrain", "--config", config, *args]) == code
    assert re.search(message, capsys.readouterr().err)


def test_step_schedule_is_adam_l2_and_needs_a_period():
    from pertscale.training.config import FinetuneJobConfig, PretrainJobConfig
    from pertscale.training.engine import build_lr_scheduler

    ds = _ds(lr_schedule="step", optimizer="adam", lr_decay_every=5)
    assert "scheduler" not in ds  # torch's StepLR, handed to deepspeed.initialize
    assert ds["optimizer"]["type"] == "Adam" and ds["optimizer"]["params"]["adam_w_mode"] is False
    with pytest.raises(ConfigError, match="lr_decay_every >= 1"):
        PretrainJobConfig.from_dict({"engine": {"lr_schedule": "step"}})
    FinetuneJobConfig.from_dict({"engine": {"lr_schedule": "step"}})  # set to one epoch later
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(EngineConfig(lr_schedule="step", lr_decay_every=2,
                                            lr_decay_factor=0.5))(opt)
    rates = []
    for _ in range(5):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == [1.0, 1.0, 0.5, 0.5, 0.25]
