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

`fit_genepert` chooses alpha by K-fold cross-validation grouped by perturbation (the
conditions of one perturbation in several cell types never sit on both sides of a fold); the
folds run through the `map_fn` it is given (one Ray task per fold in `pertscale fit`), each
scoring every alpha from one SVD (`ridge_path_predict`); the chosen alpha has the best mean
score (lowest MSE, or highest Pearson of the deltas), then one fit on every training condition.
When that best alpha is an edge of the grid the curve is still improving there: a warning says
so and, by default (`extend_grid`), alphas past that edge are scored until the best is inside
the grid (`max_grid_extensions` at most).

A registered GenePert carries its embedding table as a tensor: a pulled version predicts any
gene of that table without reading a file (so nothing in a pulled model can open one).

Architecture only: no ray, mlflow or file I/O here (see pertscale.data.embeddings and
pertscale.eval.cv).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.linalg
import torch

from pertscale.config import ConfigError, check_choice, check_range
from pertscale.models.spec import Exported, ModelConfig, ModelSpec

__all__ = [
    "CV_METRICS",
    "SPEC",
    "GenePert",
    "GenePertConfig",
    "GenePertModel",
    "cross_validate_alpha",
    "embed_perturbations",
    "fit_genepert",
    "l2_normalize",
    "ridge_path_predict",
]

log = logging.getLogger(__name__)
CV_METRICS = ("mse", "pearson_delta")
# map_fn(fn, shared_args, per_item_args) -> [fn(*shared_args, *item) for item in per_item_args]
MapFn = Callable[[Callable[..., Any], tuple, list[tuple]], list[Any]]


def serial_map(fn: Callable[..., Any], shared: tuple, items: list[tuple]) -> list[Any]:
    """The in-process `map_fn`."""
    return [fn(*shared, *item) for item in items]


@dataclasses.dataclass
class GenePertConfig(ModelConfig):
    """The `[model]` section of genepert: the ridge and its cross-validation."""

    name: str = "genepert"  # model name, a key of MODELS
    alphas: list[float] = dataclasses.field(
        default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0])  # ridge penalties tried by CV
    n_folds: int = 5  # cross-validation folds (grouped by perturbation)
    cv_metric: str = "mse"  # mse (lower is better) | pearson_delta (higher is better)
    fit_intercept: bool = True  # centre features and targets, as sklearn's Ridge
    seed: int = 0  # fold assignment seed
    extend_grid: bool = True  # when CV picks the edge of alphas, warn and try alphas beyond it
    max_grid_extensions: int = 4  # alphas added beyond an edge at most (each x or / the edge step)

    def __post_init__(self) -> None:
        self._check_name("genepert")
        if not self.alphas:
            raise ConfigError("alphas must list at least one penalty")
        for i, a in enumerate(self.alphas):
            check_range(f"alphas[{i}]", a, 0, lo_open=True)
        check_range("n_folds", self.n_folds, 2)
        check_choice("cv_metric", self.cv_metric, CV_METRICS)
        check_range("max_grid_extensions", self.max_grid_extensions, 0)
        if len(set(self.alphas)) != len(self.alphas):
            raise ConfigError(f"alphas {self.alphas} lists a penalty twice")

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


# --- cross-validation and the fitted model -------------------------------------------------------
def _fold_scores(x_PD: np.ndarray, y_PG: np.ndarray, alphas: list[float], fit_intercept: bool,
                 metric: str, train_idx: np.ndarray, val_idx: np.ndarray) -> np.ndarray:
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


def _edge_step(alphas: list[float], upper: bool) -> float:
    """The grid's own ratio at an edge (x10 for a single alpha or a ratio of 1)."""
    if len(alphas) < 2:
        return 10.0
    ratio = alphas[-1] / alphas[-2] if upper else alphas[1] / alphas[0]
    return ratio if ratio > 1.0 else 10.0


def cross_validate_alpha(x_PD: np.ndarray, y_PG: np.ndarray, groups: list[str],
                         cfg: GenePertConfig, map_fn: MapFn = serial_map
                         ) -> tuple[float, np.ndarray, list[float]]:
    """Best alpha, the score table [folds, alphas] and the alphas scored (sorted), one `map_fn`
    item per fold. When the best alpha is the smallest or largest tried (the curve still
    improving towards the edge), a warning says so and, with `extend_grid`, the grid grows past
    that edge by its own step, up to `max_grid_extensions` alphas, until the best is inside."""
    folds = _folds(groups, cfg.n_folds, cfg.seed)
    every = np.arange(len(groups))
    items = [(np.setdiff1d(every, val), val) for val in folds]
    shared = (np.asarray(x_PD), np.asarray(y_PG))

    def score(alphas: list[float]) -> np.ndarray:
        return np.stack(map_fn(_fold_scores, (*shared, alphas, cfg.fit_intercept,
                                              cfg.cv_metric), items))

    alphas = sorted(float(a) for a in cfg.alphas)
    scores_FA = score(alphas)
    added = 0
    while True:
        mean_A = scores_FA.mean(0)
        best = int(np.argmin(mean_A) if cfg.cv_metric == "mse" else np.nanargmax(mean_A))
        edge = "largest" if best == len(alphas) - 1 else "smallest" if best == 0 else ""
        if not edge:
            break
        if not cfg.extend_grid or added >= cfg.max_grid_extensions:
            log.warning("GenePert CV picked alpha=%g, the %s alpha tried (%s), with the score "
                        "still improving towards it; the best penalty may lie beyond: widen "
                        "model.alphas", alphas[best], edge, alphas)
            break
        upper = edge == "largest"
        new = alphas[best] * _edge_step(alphas, upper) ** (1 if upper else -1)
        log.warning("GenePert CV picked alpha=%g, the %s alpha tried; extending the grid to "
                    "alpha=%g", alphas[best], edge, new)
        new_FA = score([new])
        alphas = [*alphas, new] if upper else [new, *alphas]
        scores_FA = np.hstack([scores_FA, new_FA] if upper else [new_FA, scores_FA])
        added += 1
    log.info("GenePert CV (%s) per alpha %s: %s -> alpha=%s", cfg.cv_metric, alphas,
             np.round(mean_A, 5).tolist(), alphas[best])
    return alphas[best], scores_FA, alphas


class GenePertModel:
    """A fitted GenePert over readout `genes`: features from its embedding table (`table_genes`,
    `table_ND`), ridge weights from `ridge`. A `PerturbationPredictor`."""

    def __init__(self, genes: Sequence[str], table_genes: Sequence[str], table_ND: np.ndarray,
                 ridge: GenePert, *, cv_scores: np.ndarray | None = None,
                 table_source: str = "", table_sha256: str = "") -> None:
        self.genes = list(genes)
        self.table_genes = list(table_genes)
        self.table_ND = np.asarray(table_ND)
        self.ridge = ridge
        self.cv_scores = cv_scores
        self.alphas: list[float] = [ridge.alpha]
        self.table_source, self.table_sha256 = table_source, table_sha256
        self._row = {g: i for i, g in enumerate(self.table_genes)}

    def missing_genes(self, perturbations: Sequence[Any]) -> list[str]:
        return sorted({g for p in perturbations for g in p.genes if g not in self._row})

    def features(self, perturbations: Sequence[Any]) -> np.ndarray:
        treated = [p.name for p in perturbations if getattr(p, "treatments", ())]
        if treated:
            raise ValueError(f"GenePert embeds perturbed genes; {treated[:5]} include a treatment "
                             f"that is not a gene")
        return embed_perturbations([p.genes for p in perturbations], self.table_genes,
                                   self.table_ND, [p.signs for p in perturbations])

    def predict_delta(self, perturbations: Sequence[Any],
                      covariates: Sequence[str] | None = None) -> np.ndarray:
        return self.ridge.predict(self.features(perturbations))

    def summary(self) -> dict[str, Any]:
        """The chosen alpha and, after cross-validation, the mean score of every alpha."""
        out: dict[str, Any] = {"alpha": self.ridge.alpha}
        if self.cv_scores is not None:
            out["cv_mean"] = dict(zip(map(str, self.alphas),
                                      self.cv_scores.mean(0).round(6).tolist()))
        return out


def fit_genepert(cfg: GenePertConfig, data: Any, train: list[str], *, features: Any,
                 map_fn: MapFn = serial_map) -> GenePertModel:
    """Fit on the training conditions of `data` (PerturbationData) with the embedding table
    `features` (GeneEmbeddings); alpha by cross-validation when several are given."""
    perts = [data.perturbation(c) for c in train]
    model = GenePertModel(data.genes, features.genes, features.emb_ND, GenePert(cfg.alphas[0]),
                          table_source=features.source, table_sha256=features.sha256)
    x_PD = model.features(perts)
    y_PG = np.stack([data.delta(c) for c in train])
    alpha, scores, alphas = cfg.alphas[0], None, list(cfg.alphas)
    if len(cfg.alphas) > 1:
        groups = [data.conditions.at[c, "perturbation"] for c in train]
        alpha, scores, alphas = cross_validate_alpha(x_PD, y_PG, groups, cfg, map_fn)
    model.ridge = GenePert(alpha, fit_intercept=cfg.fit_intercept).fit(x_PD, y_PG)
    model.cv_scores, model.alphas = scores, alphas
    return model


def export_genepert(cfg: GenePertConfig, model: GenePertModel,
                    context: dict[str, Any]) -> Exported:
    """Ridge weights and the embedding table as tensors; readout genes as the vocabulary."""
    tensors = {"coef": torch.from_numpy(np.ascontiguousarray(model.ridge.coef_DG)),
               "intercept": torch.from_numpy(np.ascontiguousarray(model.ridge.intercept_G)),
               "embeddings": torch.from_numpy(np.ascontiguousarray(model.table_ND,
                                                                   dtype=np.float32))}
    config = {"model": "genepert", "model_config": cfg.to_dict(), "alpha": model.ridge.alpha,
              "embedding_genes": model.table_genes,
              "embeddings": {"source": model.table_source, "sha256": model.table_sha256}}
    return Exported(tensors=tensors, config=config, vocab=list(model.genes))


def load_genepert(exported: Exported) -> GenePertModel:
    cfg = GenePertConfig.from_dict(exported.config["model_config"], path="model")
    state = {k: exported.tensors[k].numpy() for k in ("coef", "intercept")}
    ridge = GenePert.from_state_dict(state, alpha=exported.config["alpha"],
                                     fit_intercept=cfg.fit_intercept)
    genes = exported.config["embedding_genes"]
    table = exported.tensors["embeddings"].numpy()
    if table.shape[0] != len(genes):
        raise ValueError(f"genepert export has {table.shape[0]} embedding rows for "
                         f"{len(genes)} embedding genes")
    emb = exported.config.get("embeddings", {})
    return GenePertModel(exported.vocab, genes, table, ridge,
                         table_source=emb.get("source", ""), table_sha256=emb.get("sha256", ""))


def genepert_gene_table(exported: Exported) -> tuple[list[str], np.ndarray]:
    """The embedding table the model was fitted on."""
    return list(exported.config["embedding_genes"]), exported.tensors["embeddings"].double().numpy()


SPEC = ModelSpec(
    name="genepert",
    debug_config="configs/genepert.toml",
    description="GenePert: closed-form ridge from perturbed-gene embeddings to mean changes",
    config_cls=GenePertConfig,
    task="pseudobulk",
    predicts="delta",
    fit=fit_genepert,
    export=export_genepert,
    load=load_genepert,
    gene_table=genepert_gene_table,
)
