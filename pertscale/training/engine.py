"""The DeepSpeed engine: its JSON generated from `EngineConfig` (one source of truth), built
with `deepspeed.initialize`, and the full fp32 weights gathered back from any ZeRO stage.

The generated JSON holds ZeRO stage 0-3, fp32/bf16/fp16, gradient accumulation, clipping,
AdamW (or Adam with L2 weight decay, as GEARS trains) and a warmup schedule (cosine:
`WarmupCosineLR`, linear: `WarmupDecayLR`, constant: `WarmupLR`), and optional CPU offload of
optimizer states (stage 1-3) and parameters (stage 3). The "step" schedule (multiply the rate
by `lr_decay_factor` every `lr_decay_every` steps, no warmup: GEARS halves it every epoch) has
no DeepSpeed type; it is torch's StepLR handed to `deepspeed.initialize`, whose checkpoints
save and restore its state like any scheduler's. Batch sizes are in cells: a packed micro-batch holds a varying number of tokens.

CPU runs use gloo with `DS_ACCELERATOR=cpu` (set in every worker's environment by the
trainer); GPU runs use nccl with `DS_ACCELERATOR=cuda`. `deepspeed` is imported inside the functions that need it so
that reading or validating a config never pays for (or requires) the DeepSpeed import.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import numpy as np
import torch

from pertscale.config import Config, ConfigError, check_choice, check_range

__all__ = [
    "LR_SCHEDULES",
    "EngineConfig",
    "build_ds_config",
    "build_engine",
    "build_lr_scheduler",
    "full_state_dict",
    "optimizer_kernel",
    "resolve_backend",
]

# lr_schedule name -> DeepSpeed scheduler type (deepspeed.runtime.lr_schedules).
LR_SCHEDULES: dict[str, str] = {
    "cosine": "WarmupCosineLR",
    "linear": "WarmupDecayLR",
    "constant": "WarmupLR",
    "step": "",  # torch.optim.lr_scheduler.StepLR, passed to deepspeed.initialize
}
OPTIMIZERS = ("adamw", "adam")
PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOADS = ("none", "cpu")
OPTIMIZER_IMPLS = ("auto", "torch", "deepspeed")
BACKENDS = ("auto", "gloo", "nccl")


@dataclasses.dataclass
class EngineConfig(Config):
    """DeepSpeed engine settings; `build_ds_config` turns them into DeepSpeed's JSON."""

    zero_stage: int = 2
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    precision: str = "fp32"
    """Training precision: fp32, bf16 (fp32 master weights) or fp16 (dynamic loss scaling)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    lr: float = 1e-3
    """Peak learning rate."""
    optimizer: str = "adamw"
    """adamw (decoupled weight decay) or adam (L2 weight decay added to the gradient, as
    torch.optim.Adam and GEARS)."""
    weight_decay: float = 0.01
    """Weight decay (decoupled for adamw, L2 for adam)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    lr_schedule: str = "cosine"
    """After linear warmup: cosine decay, linear decay or constant; or "step" (no warmup: the
    rate times lr_decay_factor every lr_decay_every steps) (see LR_SCHEDULES)."""
    lr_decay_every: int = 0
    """"step" schedule: optimizer steps between decays (0 in a fine-tune = one epoch)."""
    lr_decay_factor: float = 0.5
    """"step" schedule: the factor applied at each decay (GEARS: 0.5)."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0: below trainer.max_steps for pretraining (else an
    error); a fine-tune's steps follow from its epochs, and there it is capped below them."""
    min_lr_ratio: float = 0.01
    """Learning rate at the end of the decay, as a fraction of `lr`."""
    offload_optimizer: str = "none"
    """Optimizer states on the device ("none") or in CPU memory ("cpu"; ZeRO stage >= 1)."""
    offload_params: str = "none"
    """Parameters on the device ("none") or in CPU memory ("cpu"; ZeRO stage 3 only)."""
    optimizer_impl: str = "auto"
    """AdamW kernel: "torch" (torch.optim.AdamW; fused=True on GPUs), "deepspeed" (FusedAdam /
    DeepSpeedCPUAdam, JIT-compiled on first use: FusedAdam needs nvcc on GPU nodes) or "auto"
    (DeepSpeedCPUAdam with offload_optimizer='cpu', torch's otherwise). The choice is logged
    (`optimizer_kernel`)."""
    backend: str = "auto"
    """torch.distributed backend: "auto" = nccl with GPUs, gloo on CPUs."""
    fp16_initial_scale_power: int = 16
    """fp16 only: the dynamic loss scale starts at 2**this."""
    bucket_size: int = 50_000_000
    """Elements per gradient-reduce / all-gather / ZeRO-3 prefetch bucket: smaller saves memory
    (ZeRO-3 allocates a full bucket), larger overlaps communication better."""

    def __post_init__(self) -> None:
        check_choice("zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice("precision", self.precision, PRECISIONS)
        check_range("grad_accum_steps", self.grad_accum_steps, 1)
        check_range("grad_clip", self.grad_clip, 0.0)
        # NOTE: above 1 no optimizer here trains (Adam's steps are ~lr per weight)
        check_range("lr", self.lr, 0.0, 1.0, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2:
            raise ConfigError(f"betas={list(self.betas)!r} must hold two numbers (beta1, beta2)")
        for i, beta in enumerate(self.betas):
            check_range(f"betas[{i}]", beta, 0.0, 1.0, hi_open=True)
        self.betas = tuple(float(b) for b in self.betas)
        check_range("eps", self.eps, 0.0, lo_open=True)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_range("lr_decay_every", self.lr_decay_every, 0)
        check_range("lr_decay_factor", self.lr_decay_factor, 0.0, 1.0, lo_open=True)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_choice("offload_optimizer", self.offload_optimizer, OFFLOADS)
        check_choice("offload_params", self.offload_params, OFFLOADS)
        check_choice("optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        check_choice("backend", self.backend, BACKENDS)
        check_range("fp16_initial_scale_power", self.fp16_initial_scale_power, 0, 32)
        check_range("bucket_size", self.bucket_size, 1)
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ConfigError(
                "offload_optimizer='cpu' needs zero_stage >= 1 (ZeRO-Offload shards optimizer "
                f"states); got zero_stage={self.zero_stage}")
        if self.offload_params != "none" and self.zero_stage != 3:
            raise ConfigError(
                f"offload_params='cpu' needs zero_stage=3; got zero_stage={self.zero_stage}")
        if self.optimizer_impl == "torch" and self.offload_optimizer != "none":
            raise ConfigError(
                "optimizer_impl='torch' cannot run with offload_optimizer='cpu': DeepSpeed "
                "steps offloaded states with its own CPU Adam; use optimizer_impl='deepspeed' "
                "or 'auto'")


def resolve_backend(cfg: EngineConfig, use_gpu: bool) -> str:
    """The torch.distributed backend to use: nccl needs GPUs."""
    if cfg.backend == "auto":
        return "nccl" if use_gpu else "gloo"
    if cfg.backend == "nccl" and not use_gpu:
        raise ConfigError("engine.backend='nccl' needs GPUs (trainer.use_gpu=true); use gloo on CPUs")
    return cfg.backend


def _use_torch_adam(cfg: EngineConfig) -> bool:
    if cfg.optimizer_impl == "auto":
        # NOTE: DeepSpeed's FusedAdam is JIT-compiled on first use (nvcc on GPUs, a C++ op on
        # CPUs); torch's AdamW (fused on GPUs) is the same update with nothing to compile.
        # Offloaded states are stepped on the host by DeepSpeed's CPU Adam.
        return cfg.offload_optimizer == "none"
    return cfg.optimizer_impl == "torch"


def optimizer_kernel(cfg: EngineConfig, use_gpu: bool) -> str:
    """The optimizer implementation `build_ds_config` selects, in words (logged by the run)."""
    name = "AdamW" if cfg.optimizer == "adamw" else "Adam"
    if _use_torch_adam(cfg):
        return f"torch.optim.{name}" + ("(fused=True)" if use_gpu else "")
    if cfg.offload_optimizer != "none":
        return f"deepspeed DeepSpeedCPUAdam ({name.lower()} mode, offloaded states)"
    return f"deepspeed FusedAdam ({name.lower()} mode, JIT-compiled)"


def build_ds_config(cfg: EngineConfig, *, micro_batch_size: int, world_size: int,
                    total_steps: int, use_gpu: bool = False) -> dict[str, Any]:
    """DeepSpeed's JSON for a run of `total_steps` optimizer steps with `micro_batch_size` cells
    per micro-batch on each of `world_size` workers."""
    check_range("micro_batch_size", micro_batch_size, 1)
    check_range("world_size", world_size, 1)
    check_range("total_steps", total_steps, 1)
    # DeepSpeed rejects warmup_num_steps <= 0 and a warmup longer than the run.
    warmup = max(1, min(cfg.warmup_steps, total_steps - 1 if total_steps > 1 else 1))
    if cfg.lr_schedule == "cosine":
        scheduler = {"warmup_min_ratio": 0.0, "warmup_num_steps": warmup,
                     "total_num_steps": total_steps, "cos_min_ratio": cfg.min_lr_ratio,
                     "warmup_type": "linear"}
    elif cfg.lr_schedule == "linear":
        scheduler = {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": warmup,
                     "total_num_steps": total_steps, "warmup_type": "linear"}
    else:
        scheduler = {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": warmup,
                     "warmup_type": "linear"}
    optimizer_params: dict[str, Any] = {
        "lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay,
    }
    if cfg.optimizer == "adam":
        optimizer_params["adam_w_mode"] = False
    if _use_torch_adam(cfg):
        optimizer_params["torch_adam"] = True
        if use_gpu:
            optimizer_params["fused"] = True  # passed through to torch.optim.AdamW
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": micro_batch_size * cfg.grad_accum_steps * world_size,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {"type": "AdamW" if cfg.optimizer == "adamw" else "Adam",
                      "params": optimizer_params},
        "zero_optimization": {"stage": cfg.zero_stage, "reduce_bucket_size": cfg.bucket_size,
                              "allgather_bucket_size": cfg.bucket_size},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16",
                 "initial_scale_power": cfg.fp16_initial_scale_power},
        "steps_per_print": 10**9,  # the loop logs; keep DeepSpeed's own step prints quiet
        "wall_clock_breakdown": False,
    }
    if cfg.lr_schedule != "step":
        ds["scheduler"] = {"type": LR_SCHEDULES[cfg.lr_schedule], "params": scheduler}
    zero = ds["zero_optimization"]
    if cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": cfg.offload_optimizer, "pin_memory": use_gpu}
    if cfg.offload_params != "none":
        zero["offload_param"] = {"device": cfg.offload_params, "pin_memory": use_gpu}
    if cfg.zero_stage == 3:
        # NOTE: the final weights are gathered with safe_get_full_fp32_param, not from a 16-bit
        # consolidated copy at save time, so that every save stays cheap.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        zero["stage3_prefetch_bucket_size"] = cfg.bucket_size
    return ds


def model_init_context(ds_config: dict[str, Any]):
    """Context to build the model in: under ZeRO-3 `deepspeed.zero.Init`, so each parameter is
    partitioned as soon as its module is built and no rank ever holds the full model."""
    if ds_config["zero_optimization"]["stage"] != 3:
        return contextlib.nullcontext()
    import deepspeed

    # NOTE: zero.Init reads the world size from deepspeed.comm; attach it to the process group
    # Ray Train already set up (deepspeed.initialize would do so only later).
    deepspeed.init_distributed(dist_init_required=False)
    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def assign_parameters(model: torch.nn.Module, values: dict[str, Any] | None,
                      rows: dict[str, Any] | None = None) -> int:
    """Write full-shape `values` (parameter name -> array) into `model`'s parameters; where
    `rows[name]` (bool per row) is given, only those rows. Under ZeRO-3 each parameter is
    gathered, written and re-partitioned (`GatheredParameters`: a write to a partitioned
    weight would be lost). Every rank must call it. Returns the number of parameters written."""
    if not values:
        return 0
    params = dict(model.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise ValueError(f"initial values name parameters the model does not have: {unknown[:5]}")
    for name, value in values.items():
        p = params[name]
        ctx = contextlib.nullcontext()
        if hasattr(p, "ds_id"):
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=0)
        with ctx, torch.no_grad():
            value = torch.as_tensor(np.asarray(value), dtype=p.dtype)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"initial value of {name} has shape {tuple(value.shape)}, the "
                                 f"model's is {tuple(p.shape)}")
            mask = (rows or {}).get(name)
            if mask is None:
                p.copy_(value)
            else:
                mask = torch.as_tensor(np.asarray(mask, dtype=bool))
                p[mask] = value[mask]
    return len(values)


def build_lr_scheduler(cfg: EngineConfig):
    """The scheduler factory `deepspeed.initialize` takes for the "step" schedule (None for the
    others, which the DeepSpeed JSON names)."""
    if cfg.lr_schedule != "step":
        return None
    if cfg.lr_decay_every < 1:
        raise ConfigError("engine.lr_schedule = 'step' needs lr_decay_every >= 1 (optimizer "
                          "steps between decays; a fine-tune sets it to one epoch when 0)")
    every, factor = cfg.lr_decay_every, cfg.lr_decay_factor

    def make(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=factor)

    return make


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], lr_scheduler=None):
    """`deepspeed.initialize` on an already-initialised process group (Ray Train sets it up).
    Returns the engine; optimizer and scheduler live inside it (`lr_scheduler`: a factory
    from `build_lr_scheduler`, for a schedule the JSON cannot name)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lr_scheduler,
        dist_init_required=False,
    )
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full fp32 state dict (parameters and buffers) on CPU, whatever the ZeRO stage and
    precision: fp32 master weights where DeepSpeed keeps them, the module's own tensors
    otherwise. Collective under ZeRO-3: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:  # ZeRO-0 without a master copy: the parameter is the weight
            full = param.detach()
        out[name] = full.detach().float().cpu().clone()
    persistent = set(engine.module.state_dict().keys())
    for name, buf in engine.module.named_buffers():
        if name in persistent:
            out[name] = buf.detach().cpu().clone()
    return out
