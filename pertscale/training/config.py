"""The `pretrain` job config: the sections one pretraining run is built from.

    [data]       LoaderConfig     store (--data.store_uri=URI), cells per micro-batch, shuffling
    [tokenizer]  TokenizerConfig  bins, max_seq_len, mask ratio, packed/padded layout
    [model]      the model's own config (its spec's config_cls, chosen by `name`)
    [engine]     EngineConfig     DeepSpeed: ZeRO stage, precision, accumulation, clipping, LR
    [trainer]    TrainerConfig    Ray Train: steps, workers, checkpoints, failures, storage
    [tracking]   TrackingConfig   MLflow
"""

from __future__ import annotations

import dataclasses

from pertscale.config import Config, ConfigError
from pertscale.data.loader import LoaderConfig
from pertscale.data.tokenizer import TokenizerConfig
from pertscale.models import ModelConfig, ScGPTConfig, get_spec
from pertscale.tracking import TrackingConfig
from pertscale.training.engine import EngineConfig
from pertscale.training.trainer import TrainerConfig

__all__ = ["PretrainJobConfig"]


@dataclasses.dataclass
class PretrainJobConfig(Config):
    """Everything a `pertscale pretrain` run needs; workers rebuild it from its dict form."""

    data: LoaderConfig = dataclasses.field(default_factory=LoaderConfig)
    """Where cells come from and how each rank streams them."""
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    """How cells become token batches."""
    model: ModelConfig = dataclasses.field(default_factory=ScGPTConfig)
    """The model to train: `name` picks its spec and the section's fields."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """The DeepSpeed engine."""
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    """The Ray Train run."""
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    """MLflow tracking and registration."""

    def __post_init__(self) -> None:
        spec = get_spec(self.model.name)
        if not spec.trained:
            raise ConfigError(f"model.name={spec.name!r} is fitted in closed form, not trained on "
                              f"the engine: run `pertscale fit {spec.name}`")
        if spec.task != "cells":
            raise ConfigError(f"model.name={spec.name!r} trains on the {spec.task!r} task; "
                              f"`pertscale pretrain` trains models on cells")
        if getattr(self.model, "n_bins", self.tokenizer.n_bins) != self.tokenizer.n_bins:
            raise ConfigError(
                f"model.n_bins={self.model.n_bins} != tokenizer.n_bins={self.tokenizer.n_bins}: "
                "the model must embed exactly the bins the tokenizer emits")
        key = self.tokenizer.condition_key
        if key and key not in self.data.obs_columns:
            raise ConfigError(
                f"tokenizer.condition_key={key!r} must be one of data.obs_columns="
                f"{self.data.obs_columns} (the loader only carries those obs columns)")
        if key and getattr(self.model, "n_conditions", 0) == 0:
            raise ConfigError(
                f"tokenizer.condition_key={key!r} needs model.n_conditions > 0 "
                "(the number of condition categories)")
        if self.trainer.use_gpu is False and self.engine.backend == "nccl":
            raise ConfigError("engine.backend='nccl' needs trainer.use_gpu=true; CPUs use gloo")
