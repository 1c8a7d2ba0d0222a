"""The one loss-output type every model returns."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["LossOutput"]


@dataclasses.dataclass
class LossOutput:
    """`loss` is what the engine backpropagates; `metrics` are detached scalars to log
    (the loop calls `.item()` on rank 0 only); `outputs` carries predictions for evaluation."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
