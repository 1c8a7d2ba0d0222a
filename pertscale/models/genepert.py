"""GenePert: closed-form ridge regression from perturbed-gene embeddings to expression changes.

Shape legend: P perturbations, D embedding dimensions, G readout genes, N table genes, A alphas.

Features (`embed_perturbations`): each gene's embedding is L2-normalised; a perturbation of
several genes sums their normalised embeddings (times the sign of each perturbation, +1 for
activation / knock-out as given, -1 for inhibition when the data say so) and renormalises the
sum. A gene without an embedding is an error listing every missing gene, never a random vector.

Targets are pseudo-bulk deltas delta_p = mean(perturbed p) - mean(control), shape [P, G].

`GenePert` solves ridge in closed form with sklearn Ridge's conventions: with
`fit_intercept=True` features and targets are centred and the intercept is
mean(y) - mean(x) @ W; the penalty `alpha` applies to W only. The primal form
(X^T X + alpha I)^-1 X^T Y is used when P >= D, the dual form X^T (X X^T + alpha I)^-1 Y
when P < D (the usual case: tens to thousands of perturbations, 384-3072 dimensions).
`ridge_path_predict` gives validation predictions for many alphas from one SVD, which is
what each cross-validation fold computes.

Architecture only: no ray, mlflow or file I/O here (see pertscale.data.embeddings and
pertscale.eval.cv).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg

__all__ = ["GenePert", "embed_perturbations", "l2_normalize", "ridge_path_predict"]

SOLVERS = ("auto", "primal", "dual")


def l2_normalize(emb_ND: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
    """Rows scaled to unit L2 norm; a zero row is an error naming the gene when `names` is
    given (its direction is undefined)."""
    emb_ND = np.asarray(emb_ND, dtype=np.float64)
    norm_N = np.linalg.norm(emb_ND, axis=1)
    zero = np.flatnonzero(norm_N == 0)
    if zero.size:
        which = [names[i] for i in zero[:10]] if names is not None else zero[:10].tolist()
        raise ValueError(f"{zero.size} embedding row(s) have zero norm: {which}")
    return emb_ND / norm_N[:, None]


def embed_perturbations(perturbations: Sequence[Sequence[str]], genes: Sequence[str],
                        emb_ND: np.ndarray,
                        signs: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Features [P, D] for perturbations given as gene tuples, from a table of `genes`
    (length N) with embeddings `emb_ND`. `signs` (same nesting as `perturbations`, +1 / -1)
    default to +1."""
    emb_ND = np.asarray(emb_ND)
    if emb_ND.ndim != 2 or emb_ND.shape[0] != len(genes):
        raise ValueError(
            f"embedding table has shape {emb_ND.shape} for {len(genes)} genes; expected "
            f"[{len(genes)}, D]")
    row = {g: i for i, g in enumerate(genes)}
    missing = sorted({g for pert in perturbations for g in pert if g not in row})
    if missing:
        raise ValueError(
            f"{len(missing)} perturbed gene(s) have no embedding in the table: {missing}")
    if signs is not None and len(signs) != len(perturbations):
        raise ValueError(f"{len(signs)} sign tuples for {len(perturbations)} perturbations")
    used = sorted({row[g] for pert in perturbations for g in pert})
    unit = dict(zip(used, l2_normalize(emb_ND[used], [genes[i] for i in used])))
    out_PD = np.zeros((len(perturbations), emb_ND.shape[1]), dtype=np.float64)
    for p, pert in enumerate(perturbations):
        if len(pert) == 0:
            raise ValueError(f"perturbation {p} has no genes (a control has no features)")
        pert_signs = signs[p] if signs is not None else (1,) * len(pert)
        if len(pert_signs) != len(pert) or any(s not in (1, -1) for s in pert_signs):
            raise ValueError(f"perturbation {tuple(pert)} has signs {tuple(pert_signs)}; "
                             f"expected one of +1 / -1 per gene")
        for gene, sign in zip(pert, pert_signs):
            out_PD[p] += sign * unit[row[gene]]
    norm_P = np.linalg.norm(out_PD, axis=1)
    bad = np.flatnonzero(norm_P < 1e-12)
    if bad.size:
        raise ValueError(f"perturbation(s) {[tuple(perturbations[i]) for i in bad]} sum to a "
                         f"zero vector (an activation and inhibition of one gene cancel)")
    return out_PD / norm_P[:, None]


def _center(x_PD: np.ndarray, y_PG: np.ndarray, fit_intercept: bool):
    if fit_intercept:
        x_mean_D, y_mean_G = x_PD.mean(0), y_PG.mean(0)
    else:
        x_mean_D, y_mean_G = np.zeros(x_PD.shape[1]), np.zeros(y_PG.shape[1])
    return x_PD - x_mean_D, y_PG - y_mean_G, x_mean_D, y_mean_G


class GenePert:
    """Ridge regression from perturbation features [P, D] to targets [P, G]
    (sklearn-style `fit` / `predict`; `coef_DG`, `intercept_G` after fitting)."""

    def __init__(self, alpha: float = 1.0, *, fit_intercept: bool = True,
                 solver: str = "auto") -> None:
        if not alpha > 0:
            raise ValueError(f"alpha={alpha!r} must be > 0")
        if solver not in SOLVERS:
            raise ValueError(f"solver={solver!r} is not one of {list(SOLVERS)}")
        self.alpha = float(alpha)
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.coef_DG: np.ndarray | None = None
        self.intercept_G: np.ndarray | None = None

    def fit(self, features: np.ndarray, targets: np.ndarray) -> GenePert:
        x_PD = np.asarray(features, dtype=np.float64)
        y_PG = np.asarray(targets, dtype=np.float64)
        if x_PD.ndim != 2 or y_PG.ndim != 2 or x_PD.shape[0] != y_PG.shape[0]:
            raise ValueError(f"features {x_PD.shape} and targets {y_PG.shape} must be 2-d with "
                             f"one row per perturbation")
        if not (np.isfinite(x_PD).all() and np.isfinite(y_PG).all()):
            raise ValueError("features and targets must be finite (no NaN / inf)")
        xc_PD, yc_PG, x_mean_D, y_mean_G = _center(x_PD, y_PG, self.fit_intercept)
        n, d = xc_PD.shape
        solver = self.solver if self.solver != "auto" else ("dual" if n < d else "primal")
        if solver == "primal":
            gram_DD = xc_PD.T @ xc_PD
            gram_DD[np.diag_indices(d)] += self.alpha
            self.coef_DG = scipy.linalg.solve(gram_DD, xc_PD.T @ yc_PG, assume_a="pos")
        else:
            gram_PP = xc_PD @ xc_PD.T
            gram_PP[np.diag_indices(n)] += self.alpha
            self.coef_DG = xc_PD.T @ scipy.linalg.solve(gram_PP, yc_PG, assume_a="pos")
        self.intercept_G = y_mean_G - x_mean_D @ self.coef_DG
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self.coef_DG is None:
            raise ValueError("GenePert.predict called before fit")
        x_PD = np.asarray(features, dtype=np.float64)
        if x_PD.ndim != 2 or x_PD.shape[1] != self.coef_DG.shape[0]:
            raise ValueError(f"features have shape {x_PD.shape}; the model was fitted on "
                             f"{self.coef_DG.shape[0]} dimensions")
        return x_PD @ self.coef_DG + self.intercept_G

    def state_dict(self) -> dict[str, np.ndarray]:
        if self.coef_DG is None:
            raise ValueError("GenePert.state_dict called before fit")
        return {"coef": self.coef_DG, "intercept": self.intercept_G}

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray], *, alpha: float,
                        fit_intercept: bool = True) -> GenePert:
        model = cls(alpha, fit_intercept=fit_intercept)
        coef, intercept = np.asarray(state["coef"], np.float64), np.asarray(
            state["intercept"], np.float64)
        if coef.ndim != 2 or intercept.shape != (coef.shape[1],):
            raise ValueError(f"GenePert state has coef {coef.shape} and intercept "
                             f"{intercept.shape}; expected [D, G] and [G]")
        model.coef_DG, model.intercept_G = coef, intercept
        return model


def ridge_path_predict(x_train_PD: np.ndarray, y_train_PG: np.ndarray, x_val_QD: np.ndarray,
                       alphas: Sequence[float], *, fit_intercept: bool = True) -> np.ndarray:
    """Validation predictions [A, Q, G] of ridge fits for every alpha, from one thin SVD of the
    centred training features (W(alpha) = V diag(s / (s^2 + alpha)) U^T Y)."""
    x_train_PD = np.asarray(x_train_PD, np.float64)
    y_train_PG = np.asarray(y_train_PG, np.float64)
    xc_PD, yc_PG, x_mean_D, y_mean_G = _center(x_train_PD, y_train_PG, fit_intercept)
    u_PK, s_K, vt_KD = np.linalg.svd(xc_PD, full_matrices=False)
    uty_KG = u_PK.T @ yc_PG
    xv_QK = (np.asarray(x_val_QD, np.float64) - x_mean_D) @ vt_KD.T
    out = []
    for alpha in alphas:
        if not alpha > 0:
            raise ValueError(f"alpha={alpha!r} must be > 0")
        out.append(xv_QK @ ((s_K / (s_K ** 2 + alpha))[:, None] * uty_KG) + y_mean_G)
    return np.stack(out)
