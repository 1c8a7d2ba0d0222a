"""Evaluation: metrics on pseudo-bulk deltas, baselines, GenePert fitting on Ray, reports."""

from pertscale.eval.baselines import BASELINES, LinearConfig, build_baseline
from pertscale.eval.cv import (
    GenePertConfig,
    GenePertPredictor,
    RayConfig,
    cross_validate_alpha,
    ensure_ray,
)
from pertscale.eval.metrics import (
    METRIC_NAMES,
    direction_accuracy,
    mse,
    pearson_delta,
    perturbation_metrics,
    r2_mean,
)

__all__ = [
    "BASELINES",
    "METRIC_NAMES",
    "GenePertConfig",
    "GenePertPredictor",
    "LinearConfig",
    "RayConfig",
    "build_baseline",
    "cross_validate_alpha",
    "direction_accuracy",
    "ensure_ray",
    "mse",
    "pearson_delta",
    "perturbation_metrics",
    "r2_mean",
]
