"""Baselines every report puts beside the models. Each predicts the expression change (delta
against the condition's own control) of test conditions from the training conditions only.

    no_change    delta = 0: the control mean
    train_mean   the mean delta over all training conditions
    additive     the sum of the training effects of each gene as a single perturbation
                 (a single perturbation's training effect = its mean delta over training
                 conditions, pooled across covariate values); a condition with a gene that has
                 no training single is not covered (NaN row), e.g. every unseen single
    matching_mean
                 Systema's matching mean: the mean of the training single effects of the
                 condition's genes that have one (for a combination of two seen genes, the mean
                 of its singles' effects); a condition none of whose genes has a training
                 single (an unseen single, a combination of unseen genes) gets the mean delta
                 over all training conditions, as Systema's non-control mean
    linear       Ahlmann-Eltze et al. (2024): Y ~ A K B + b with Y the training deltas
                 [G, P], b their row means, A [G, d] the top-d principal-component scores of
                 the genes of Y, B [d, P] perturbation embeddings, K by ridge on both sides
                 (K = (A'A + l I)^-1 A' (Y - b) B' (B B' + l I)^-1). `pert_embedding`
                 "expression" takes a perturbation's embedding as the sum of A's rows of its
                 genes (the paper's choice; the genes must be measured), "table" uses the
                 GenePert features from a gene embedding table.

A predictor follows one protocol: `fit(data, train_conditions)` then
`predict_delta(data, conditions) -> [C, G]` with NaN rows for conditions it does not cover.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from pertscale.config import Config, check_choice, check_range
from pertscale.data.embeddings import GeneEmbeddings
from pertscale.data.perturbation import PerturbationData
from pertscale.models.genepert import embed_perturbations

__all__ = [
    "BASELINES",
    "Additive",
    "Linear",
    "LinearConfig",
    "MatchingMean",
    "NoChange",
    "Predictor",
    "TrainMean",
    "build_baseline",
]


class Predictor(Protocol):
    name: str

    def fit(self, data: PerturbationData, train: list[str]) -> Predictor: ...

    def predict_delta(self, data: PerturbationData, conditions: list[str]) -> np.ndarray: ...


def _train_deltas(data: PerturbationData, train: list[str]) -> np.ndarray:
    if not train:
        raise ValueError("no training conditions to fit on")
    return np.stack([data.delta(c) for c in train])


class NoChange:
    name = "no_change"

    def fit(self, data: PerturbationData, train: list[str]) -> NoChange:
        return self

    def predict_delta(self, data: PerturbationData, conditions: list[str]) -> np.ndarray:
        return np.zeros((len(conditions), len(data.genes)))


class TrainMean:
    name = "train_mean"

    def fit(self, data: PerturbationData, train: list[str]) -> TrainMean:
        self.delta_G = _train_deltas(data, train).mean(0)
        return self

    def predict_delta(self, data: PerturbationData, conditions: list[str]) -> np.ndarray:
        return np.tile(self.delta_G, (len(conditions), 1))


def _single_effects(data: PerturbationData, train: list[str]) -> dict[tuple[str, int], np.ndarray]:
    """(gene or treatment, sign) -> its mean delta as a single over the training conditions."""
    effects: dict[tuple[str, int], list[np.ndarray]] = {}
    for cond in train:
        pert = data.perturbation(cond)
        if not pert.is_combo:
            effects.setdefault(pert.parts[0], []).append(data.delta(cond))
    return {k: np.mean(v, axis=0) for k, v in effects.items()}


class Additive:
    name = "additive"

    def fit(self, data: PerturbationData, train: list[str]) -> Additive:
        self.single_G = _single_effects(data, train)
        return self

    def predict_delta(self, data: PerturbationData, conditions: list[str]) -> np.ndarray:
        out = np.full((len(conditions), len(data.genes)), np.nan)
        for i, cond in enumerate(conditions):
            pert = data.perturbation(cond)
            keys = pert.parts
            if all(k in self.single_G for k in keys):
                out[i] = np.sum([self.single_G[k] for k in keys], axis=0)
        return out


class MatchingMean:
    name = "matching_mean"

    def fit(self, data: PerturbationData, train: list[str]) -> MatchingMean:
        self.single_G = _single_effects(data, train)
        self.mean_G = _train_deltas(data, train).mean(0)
        return self

    def predict_delta(self, data: PerturbationData, conditions: list[str]) -> np.ndarray:
        out = np.empty((len(conditions), len(data.genes)))
        for i, cond in enumerate(conditions):
            matched = [self.single_G[k] for k in data.perturbation(cond).parts
                       if k in self.single_G]
            out[i] = np.mean(matched, axis=0) if matched else self.mean_G
        return out


@dataclasses.dataclass
class LinearConfig(Config):
    """Ahlmann-Eltze et al.'s linear baseline."""

    pca_dim: int = 10  # principal components of the gene embedding A (paper: 10)
    ridge: float = 0.1  # ridge penalty on both sides (paper: 0.1)
    pert_embedding: str = "expression"  # expression (rows of A; perturbed genes must be measured) | table (embedding file)

    def __post_init__(self) -> None:
        check_range("pca_dim", self.pca_dim, 1)
        check_range("ridge", self.ridge, 0, lo_open=True)
        check_choice("pert_embedding", self.pert_embedding, ("expression", "table"))


class Linear:
    name = "linear"

    def __init__(self, cfg: LinearConfig | None = None,
                 embeddings: GeneEmbeddings | None = None) -> None:
        self.cfg = cfg or LinearConfig()
        if self.cfg.pert_embedding == "table" and embeddings is None:
            raise ValueError("linear baseline with pert_embedding='table' needs an embedding "
                             "table (embeddings.path)")
        self.embeddings = embeddings

    def _pert_emb(self, data: PerturbationData, conditions: list[str]) -> np.ndarray:
        """B' [P, d]: one embedding per condition."""
        perts = [data.perturbation(c) for c in conditions]
        treated = sorted({t for p in perts for t in p.treatments})
        if treated:
            raise ValueError(f"linear baseline: treatment(s) {treated} are not genes, so they have "
                             f"no gene embedding; leave 'linear' out of report.baselines")
        if self.cfg.pert_embedding == "table":
            return embed_perturbations([p.genes for p in perts], self.embeddings.genes,
                                       self.embeddings.emb_ND, [p.signs for p in perts])
        row = data.gene_rows()
        missing = sorted({g for p in perts for g in p.genes if g not in row})
        if missing:
            raise ValueError(
                f"linear baseline (pert_embedding='expression'): perturbed gene(s) {missing} are "
                f"not measured, so they have no expression embedding; set "
                f"linear.pert_embedding = 'table' to use the gene embedding table")
        return np.stack([np.sum([s * self.a_GK[row[g]] for g, s in zip(p.genes, p.signs)],
                                axis=0) for p in perts])

    def fit(self, data: PerturbationData, train: list[str]) -> Linear:
        y_GP = _train_deltas(data, train).T
        self.center_G = y_GP.mean(1)
        yc_GP = y_GP - self.center_G[:, None]
        # prcomp(Y) with genes as rows: centre columns, scores = U S of the top components
        cols = y_GP - y_GP.mean(0)
        u, s, _ = np.linalg.svd(cols, full_matrices=False)
        k = min(self.cfg.pca_dim, s.size)
        self.a_GK = u[:, :k] * s[:k]
        b_DP = self._pert_emb(data, train).T
        lam = self.cfg.ridge
        ata = self.a_GK.T @ self.a_GK + lam * np.eye(k)
        bbt = b_DP @ b_DP.T + lam * np.eye(b_DP.shape[0])
        left = np.linalg.solve(ata, self.a_GK.T @ yc_GP @ b_DP.T)
        self.k_KD = np.linalg.solve(bbt, left.T).T  # bbt is symmetric: left @ bbt^-1
        return self

    def predict_delta(self, data: PerturbationData, conditions: list[str]) -> np.ndarray:
        b_DP = self._pert_emb(data, conditions).T
        return (self.a_GK @ self.k_KD @ b_DP).T + self.center_G


BASELINES: dict[str, type] = {
    "no_change": NoChange,
    "train_mean": TrainMean,
    "additive": Additive,
    "matching_mean": MatchingMean,
    "linear": Linear,
}


def build_baseline(name: str, *, linear: LinearConfig | None = None,
                   embeddings: GeneEmbeddings | None = None) -> Predictor:
    if name not in BASELINES:
        raise ValueError(f"baseline {name!r} is not one of {sorted(BASELINES)}")
    if name == "linear":
        return Linear(linear, embeddings)
    return BASELINES[name]()
