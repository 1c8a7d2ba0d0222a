"""The one loss-output type every model returns."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["LossOutput"]


@dataclasses.dataclass
class LossOutput:
    """`loss` is what the engine backpropagates; `metrics` are detached per-batch averages
    (logged as their mean over the log window), `counts` detached per-batch totals (logged as
    their sum over the window and over ranks); `outputs` carries predictions for evaluation."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    counts: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
