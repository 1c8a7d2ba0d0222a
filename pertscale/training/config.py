"""The `pretrain` and `finetune` job configs: the sections one training run is built from.

pretrain (task "cells"):
    [data]       LoaderConfig     store (--data.store_uri=URI), cells per micro-batch, shuffling
    [tokenizer]  TokenizerConfig  bins, max_seq_len, mask ratio, packed/padded layout
    [model]      the model's own config (its spec's config_cls, chosen by `name`)
    [engine]     EngineConfig     DeepSpeed: ZeRO stage, precision, accumulation, clipping, LR
    [trainer]    TrainerConfig    Ray Train: steps, workers, checkpoints, failures, storage
    [tracking]   TrackingConfig   MLflow
finetune (task "paired"): `epochs` (trainer.max_steps follows from it), `init_from`, and
    [data]       PairedDataConfig store, perturbations, split, perturbed cells per batch
    [priors]     PriorsConfig     GEARS' co-expression and GO graphs
    [model] [engine] [trainer] [tracking] as above, [report] ReportConfig (the evaluation)
"""

from __future__ import annotations

import dataclasses

from pertscale.config import Config, ConfigError, check_choice
from pertscale.data.loader import LoaderConfig
from pertscale.data.paired import PairedDataConfig
from pertscale.data.priors import PriorsConfig
from pertscale.data.tokenizer import TokenizerConfig
from pertscale.eval.config import ReportConfig
from pertscale.models import ModelConfig, ScGPTConfig, get_spec
from pertscale.models.gears import GEARSConfig
from pertscale.tracking import TrackingConfig
from pertscale.training.engine import EngineConfig
from pertscale.training.trainer import TrainerConfig

__all__ = ["JOB_KINDS", "FinetuneJobConfig", "PretrainJobConfig"]


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
        if self.engine.lr_schedule != "step" and self.engine.warmup_steps >= self.trainer.max_steps:
            raise ConfigError(
                f"engine.warmup_steps={self.engine.warmup_steps} is not below trainer.max_steps="
                f"{self.trainer.max_steps}: the learning rate would never reach engine.lr; "
                "lower engine.warmup_steps")
        if self.engine.lr_schedule == "step" and self.engine.lr_decay_every < 1:
            raise ConfigError("engine.lr_schedule = 'step' needs engine.lr_decay_every >= 1 "
                              "(optimizer steps between decays)")
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
        _check_engine(self)


def _check_engine(job: PretrainJobConfig | FinetuneJobConfig) -> None:
    attention = getattr(job.model, "attention", None)
    layout = job.tokenizer.layout if isinstance(job, PretrainJobConfig) else "packed"
    if job.trainer.use_gpu and job.engine.precision == "fp32" and job.model.flash_kernels(layout):
        raise ConfigError(
            f"engine.precision='fp32' with model.attention={attention!r} on GPUs: {layout} "
            "batches run flash varlen kernels, which take bf16/fp16; set engine.precision = "
            "'bf16' (or, for scgpt, tokenizer.layout = 'padded' with model.attention = 'sdpa')")
    if not job.trainer.use_gpu and attention == "flash_attn":
        raise ConfigError("model.attention='flash_attn' runs on CUDA only (trainer.use_gpu = "
                          "true); use 'varlen' (torch's kernels) on CPUs")
    if job.trainer.use_gpu is False and job.engine.backend == "nccl":
        raise ConfigError("engine.backend='nccl' needs trainer.use_gpu=true; CPUs use gloo")
    if job.trainer.use_gpu is False and job.engine.precision != "fp32":
        raise ConfigError(f"engine.precision={job.engine.precision!r} needs trainer.use_gpu=true; "
                          "on CPUs the engine trains in fp32 (no fp16 kernels; bf16 matmuls "
                          "without AVX512-BF16 are emulated, slower than fp32)")


@dataclasses.dataclass
class FinetuneJobConfig(Config):
    """Everything a `pertscale finetune` run needs: a model of the paired task trained on
    perturbed cells paired with controls, registered, and evaluated beside the baselines."""

    init_from: str = ""
    """models:/NAME@ALIAS of a registered model whose gene embeddings initialise this one's
    where genes match ("" = random)."""
    epochs: int = 20
    """Passes over the training perturbed cells (trainer.max_steps is set from it)."""
    patience: int = 0
    """Stop early after this many epochs in a row without a better validation score (0 = run
    every epoch; models validated on conditions or on held-out cells only)."""
    export_weights: str = "best"
    """Validated models: export the best epoch's weights ("best", GEARS) or the last epoch's
    ("last": scGen, which stops on its validation ELBO but keeps training to the stop)."""
    data: PairedDataConfig = dataclasses.field(default_factory=PairedDataConfig)
    """The store, its perturbations, the split and the paired batches."""
    priors: PriorsConfig = dataclasses.field(default_factory=PriorsConfig)
    """Gene graphs (GEARS): co-expression from training cells, GO from a gene/term table."""
    model: ModelConfig = dataclasses.field(default_factory=GEARSConfig)
    """The model to fine-tune: `name` picks its spec and the section's fields."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    """The DeepSpeed engine."""
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    """The Ray Train run (max_steps is derived from epochs)."""
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
    """The evaluation of the fine-tuned model beside the baselines."""
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    """MLflow tracking and registration."""

    def __post_init__(self) -> None:
        spec = get_spec(self.model.name)
        if spec.task != "paired":
            raise ConfigError(f"model.name={spec.name!r} is not fine-tuned on paired cells "
                              f"(its task is {spec.task!r})")
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs} must be >= 1")
        if self.patience < 0:
            raise ConfigError(f"patience={self.patience} must be >= 0 (0 = off)")
        check_choice("export_weights", self.export_weights, ("best", "last"))
        if self.init_from and not self.init_from.startswith("models:/"):
            raise ConfigError(f"init_from={self.init_from!r} must be a registry URI "
                              f"models:/NAME@ALIAS or models:/NAME/VERSION")
        _check_engine(self)


# job kind (the "job" key of a config file) -> its config class, for the worker loop.
JOB_KINDS: dict[str, type[Config]] = {"pretrain": PretrainJobConfig,
                                      "finetune": FinetuneJobConfig}
