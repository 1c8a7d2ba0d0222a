"""Model architectures, chosen by name from `MODELS`; every model's forward returns LossOutput.

`build_model(ModelConfig(name="scgpt", flavor="debug"), vocab_size)` -> torch.nn.Module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from pertscale.config import Config, ConfigError, check_choice, check_range
from pertscale.models.attention import ATTENTION_BACKENDS, attention
from pertscale.models.output import LossOutput
from pertscale.models.scgpt import SCGPT_FLAVORS, ScGPT, ScGPTSize

__all__ = [
    "ATTENTION_BACKENDS",
    "MODELS",
    "SCGPT_FLAVORS",
    "LossOutput",
    "ModelConfig",
    "ScGPT",
    "attention",
    "build_model",
]

VALUE_ENCODERS = ("continuous", "category")


@dataclasses.dataclass
class ModelConfig(Config):
    name: str = "scgpt"                # model name, a key of MODELS
    flavor: str = "debug"              # size preset: debug (CPU, seconds) or small (scGPT's size)
    d_model: int = 0                   # override the flavor's width (0 = flavor default)
    n_layers: int = 0                  # override the flavor's depth (0 = flavor default)
    n_heads: int = 0                   # override the flavor's heads (0 = flavor default)
    d_ff: int = 0                      # override the flavor's feed-forward width (0 = default)
    attention: str = "auto"            # auto (varlen packed / sdpa padded) | reference|sdpa|varlen
    generative: bool = False           # scGPT generative mask: unknown genes see known + self
    dropout: float = 0.0               # dropout on embeddings and sublayer outputs (scGPT: 0.2)
    n_conditions: int = 0              # size of the condition embedding (0 = none)
    gepc_weight: float = 1.0           # weight of the GEPC/MVC loss next to the masked-value MSE
    value_encoder: str = "continuous"  # continuous (MLP on the bin) | category (bin embedding)
    n_bins: int = 51                   # value bins incl. bin 0 (must match the tokenizer)
    norm_first: bool = False           # pre-norm layers (scGPT: post-norm)

    def __post_init__(self) -> None:
        check_choice("name", self.name, MODELS)
        flavors = MODEL_FLAVORS[self.name]
        check_choice("flavor", self.flavor, flavors)
        check_choice("attention", self.attention, ["auto", *ATTENTION_BACKENDS])
        check_choice("value_encoder", self.value_encoder, VALUE_ENCODERS)
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "n_conditions"):
            check_range(name, getattr(self, name), 0)
        check_range("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        check_range("gepc_weight", self.gepc_weight, 0.0)
        check_range("n_bins", self.n_bins, 2)
        size = self.size()
        if size.d_model % size.n_heads:
            raise ConfigError(f"d_model={size.d_model} is not divisible by n_heads={size.n_heads}")

    def size(self) -> ScGPTSize:
        """The flavor's sizes with the non-zero overrides applied."""
        base = MODEL_FLAVORS[self.name][self.flavor]
        return ScGPTSize(**{f: getattr(self, f) or getattr(base, f)
                            for f in ("d_model", "n_layers", "n_heads", "d_ff")})


def build_scgpt(cfg: ModelConfig, vocab_size: int) -> ScGPT:
    return ScGPT(cfg.size(), vocab_size, attention_backend=cfg.attention,
                 generative=cfg.generative, dropout=cfg.dropout, n_conditions=cfg.n_conditions,
                 gepc_weight=cfg.gepc_weight, value_encoder=cfg.value_encoder, n_bins=cfg.n_bins,
                 norm_first=cfg.norm_first)


MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "scgpt": build_scgpt,
}

MODEL_FLAVORS: dict[str, dict[str, ScGPTSize]] = {
    "scgpt": SCGPT_FLAVORS,
}


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """Build the model named by `cfg.name` for a vocabulary of `vocab_size` tokens."""
    if cfg.name not in MODELS:
        raise ValueError(f"model {cfg.name!r} is not one of {sorted(MODELS)}")
    if vocab_size < 4:
        raise ValueError(f"vocab_size={vocab_size} must cover the 3 special tokens and >= 1 gene")
    return MODELS[cfg.name](cfg, vocab_size)
