"""Fitting GenePert on the Ray cluster: the ridge penalty by K-fold cross-validation whose folds
run as parallel Ray tasks, then one final fit on every training condition.

Folds are grouped by perturbation, so the conditions of one perturbation in several cell types
never sit on both sides of a fold. Features and targets are put into the object store once
(`ray.put`); each fold task receives the references and its row indices, computes validation
predictions for every alpha from one SVD (`ridge_path_predict`) and returns one score per
alpha. The chosen alpha has the best mean score over folds (lowest MSE, or highest Pearson of
the deltas).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from pertscale.cluster import start_ray
from pertscale.config import Config, ConfigError, check_choice, check_range
from pertscale.data.embeddings import GeneEmbeddings
from pertscale.data.perturbation import PerturbationData
from pertscale.models.genepert import GenePert, embed_perturbations, ridge_path_predict

__all__ = [
    "CV_METRICS",
    "GenePertConfig",
    "GenePertPredictor",
    "RayConfig",
    "cross_validate_alpha",
    "ensure_ray",
]

log = logging.getLogger(__name__)
CV_METRICS = ("mse", "pearson_delta")


@dataclasses.dataclass
class GenePertConfig(Config):
    """GenePert's ridge and its cross-validation."""

    alphas: list[float] = dataclasses.field(
        default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0])  # ridge penalties tried by CV
    n_folds: int = 5  # cross-validation folds (grouped by perturbation)
    cv_metric: str = "mse"  # mse (lower is better) | pearson_delta (higher is better)
    fit_intercept: bool = True  # centre features and targets, as sklearn's Ridge
    seed: int = 0  # fold assignment seed

    def __post_init__(self) -> None:
        if not self.alphas:
            raise ConfigError("alphas must list at least one penalty")
        for i, a in enumerate(self.alphas):
            check_range(f"alphas[{i}]", a, 0, lo_open=True)
        check_range("n_folds", self.n_folds, 2)
        check_choice("cv_metric", self.cv_metric, CV_METRICS)


@dataclasses.dataclass
class RayConfig(Config):
    """Where Ray tasks run."""

    address: str = ""  # a running cluster ("auto", "ray://host:10001"); "" = embedded local cluster
    num_cpus: int = 2  # CPUs of the embedded local cluster

    def __post_init__(self) -> None:
        check_range("num_cpus", self.num_cpus, 1)


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to `cfg.address`, or start the embedded local cluster; reuse a running session."""
    start_ray(cfg.address, num_cpus=cfg.num_cpus, log_to_driver=False)


def _fold_scores(x_PD: np.ndarray, y_PG: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                 alphas: list[float], fit_intercept: bool, metric: str) -> np.ndarray:
    """Score [A] of every alpha on one fold."""
    pred_AQG = ridge_path_predict(x_PD[train_idx], y_PG[train_idx], x_PD[val_idx], alphas,
                                  fit_intercept=fit_intercept)
    true_QG = y_PG[val_idx]
    if metric == "mse":
        return ((pred_AQG - true_QG) ** 2).mean(axis=(1, 2))
    p = pred_AQG - pred_AQG.mean(-1, keepdims=True)
    t = true_QG - true_QG.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r_AQ = (p * t).sum(-1) / np.sqrt((p * p).sum(-1) * (t * t).sum(-1))
    return np.nanmean(r_AQ, axis=1)


def _folds(groups: list[str], n_folds: int, seed: int) -> list[np.ndarray]:
    names = np.array(sorted(set(groups)))
    if len(names) < n_folds:
        raise ValueError(f"{n_folds}-fold cross-validation needs at least {n_folds} training "
                         f"perturbations; there are {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of = {names[i]: k % n_folds for k, i in enumerate(order)}
    assigned = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(assigned == k) for k in range(n_folds)]


def cross_validate_alpha(x_PD: np.ndarray, y_PG: np.ndarray, groups: list[str],
                         cfg: GenePertConfig) -> tuple[float, np.ndarray]:
    """Best alpha and the score table [folds, alphas]; folds run as Ray tasks (Ray must be
    initialised, see `ensure_ray`)."""
    import ray

    folds = _folds(groups, cfg.n_folds, cfg.seed)
    task = ray.remote(num_cpus=1)(_fold_scores)
    x_ref, y_ref = ray.put(np.asarray(x_PD)), ray.put(np.asarray(y_PG))
    every = np.arange(len(groups))
    refs = [task.remote(x_ref, y_ref, np.setdiff1d(every, val), val, list(cfg.alphas),
                        cfg.fit_intercept, cfg.cv_metric) for val in folds]
    scores_FA = np.stack(ray.get(refs))
    mean_A = scores_FA.mean(0)
    best = int(np.argmin(mean_A) if cfg.cv_metric == "mse" else np.nanargmax(mean_A))
    log.info("GenePert CV (%s) per alpha %s: %s -> alpha=%s", cfg.cv_metric, cfg.alphas,
             np.round(mean_A, 5).tolist(), cfg.alphas[best])
    return float(cfg.alphas[best]), scores_FA


class GenePertPredictor:
    """GenePert behind the baseline protocol: features from an embedding table, alpha by Ray CV
    (or the single alpha given), targets = training deltas."""

    name = "genepert"

    def __init__(self, cfg: GenePertConfig, embeddings: GeneEmbeddings,
                 model: GenePert | None = None) -> None:
        self.cfg = cfg
        self.embeddings = embeddings
        self.model = model
        self.cv_scores: np.ndarray | None = None

    def features(self, data: PerturbationData, conditions: list[str]) -> np.ndarray:
        perts = [data.perturbation(c) for c in conditions]
        return embed_perturbations([p.genes for p in perts], self.embeddings.genes,
                                   self.embeddings.emb_ND, [p.signs for p in perts])

    def fit(self, data: PerturbationData, train: list[str]) -> GenePertPredictor:
        x_PD = self.features(data, train)
        y_PG = np.stack([data.delta(c) for c in train])
        alpha = self.cfg.alphas[0]
        if len(self.cfg.alphas) > 1:
            groups = [data.conditions.at[c, "perturbation"] for c in train]
            alpha, self.cv_scores = cross_validate_alpha(x_PD, y_PG, groups, self.cfg)
        self.model = GenePert(alpha, fit_intercept=self.cfg.fit_intercept).fit(x_PD, y_PG)
        return self

    def predict_delta(self, data: PerturbationData, conditions: list[str]) -> np.ndarray:
        if self.model is None:
            raise ValueError("GenePertPredictor.predict_delta called before fit")
        return self.model.predict(self.features(data, conditions))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": self.model.alpha if self.model else None}
        if self.cv_scores is not None:
            out["cv_mean"] = dict(zip(map(str, self.cfg.alphas),
                                      self.cv_scores.mean(0).round(6).tolist()))
        return out
