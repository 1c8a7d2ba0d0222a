"""Evaluation: metrics on pseudo-bulk deltas, baselines, Ray for fitted models, reports."""

from pertscale.eval.baselines import BASELINES, LinearConfig, build_baseline
from pertscale.eval.cv import RayConfig, ensure_ray, ray_map
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
    "LinearConfig",
    "RayConfig",
    "build_baseline",
    "direction_accuracy",
    "ensure_ray",
    "mse",
    "pearson_delta",
    "perturbation_metrics",
    "r2_mean",
    "ray_map",
]
