"""Pretraining: DeepSpeed ZeRO engine, per-worker loop, Ray TorchTrainer wiring, checkpoints.

Heavy parts (deepspeed, ray) are imported inside the functions that use them.
"""

from pertscale.training.checkpoint import CheckpointError, Progress
from pertscale.training.config import PretrainJobConfig
from pertscale.training.engine import (
    LR_SCHEDULES,
    EngineConfig,
    build_ds_config,
    build_engine,
    full_state_dict,
    resolve_backend,
)
from pertscale.training.trainer import TrainerConfig, build_trainer, init_ray

__all__ = [
    "LR_SCHEDULES",
    "CheckpointError",
    "EngineConfig",
    "PretrainJobConfig",
    "Progress",
    "TrainerConfig",
    "build_ds_config",
    "build_engine",
    "build_trainer",
    "full_state_dict",
    "init_ray",
    "resolve_backend",
]
