"""Perturbation data from a cell store: labels, control / perturbed cells, pseudo-bulk means and
the top differentially expressed genes of each perturbation against its control.

Labels. A perturbation label names one gene ("KLF1"), a combination joined by "+"
("KLF1+MAP2K6", GEARS' "KLF1+ctrl" is the single KLF1) or the control (any of
`control_labels`). A leading "-" marks an inhibited gene ("-TP53+MYC"); otherwise a gene's sign
comes from `sign_column` through `sign_values` (e.g. perturbation_type CRISPRa -> +1,
CRISPRi -> -1), else +1. Genes of a combination are sorted, so "B+A" and "A+B" are the same
perturbation. A treatment that is not a gene (a stimulus such as IFN-beta, a drug) is declared in
`treatments` (e.g. ["stim"]): it is kept apart from the genes and never looked up as one.

Conditions. A condition is one perturbation in one covariate value (cell type, when
`covariate_column` is set); every covariate value needs its own control cells. Cells can be
restricted first with `filter_column` / `filter_values` (e.g. dataset == norman19).

Pseudo-bulk means are on log1p-normalised values: raw counts (store attribute raw_counts) are
scaled per cell to `target_sum` over the store's genes and log1p-transformed; a store of
normalised values is used as it is. The store is read with `read_csr_async` in row blocks, a
few in flight, and summed per condition, so memory is [conditions, genes], never [cells, genes].

Top DE genes follow GEARS: scanpy's `rank_genes_groups(groupby=condition, reference=control,
method="t-test", rankby_abs=True)`, i.e. Welch t-scores from means and unbiased variances,
NaN scores set to 0, genes ranked by |score|. The non-dropout top DE genes (GEARS'
`top_non_dropout_de_20`) are the first of that ranking among genes with a nonzero mean in the
condition or a zero mean in both condition and control.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertscale.config import Config, ConfigError, check_range

__all__ = [
    "Perturbation",
    "PerturbationConfig",
    "PerturbationData",
    "accumulate_groups",
    "load_perturbation_data",
    "normalise_counts",
    "parse_perturbation",
    "read_condition_cells",
    "top_de_genes",
    "welch_t_scores",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PerturbationConfig(Config):
    """How perturbations, controls and conditions are read from a store's obs."""

    perturbation_column: str = "perturbation"  # obs column with perturbation labels
    control_labels: list[str] = dataclasses.field(default_factory=lambda: ["ctrl", "control"])  # labels of control cells
    covariate_column: str = ""  # obs column whose values each have their own control (e.g. cell_type); "" = none
    filter_column: str = ""  # obs column to restrict cells by; "" = all cells
    filter_values: list[str] = dataclasses.field(default_factory=list)  # keep cells whose filter_column is one of these
    sign_column: str = ""  # obs column giving each cell's perturbation direction; "" = all +1
    sign_values: dict[str, int] = dataclasses.field(default_factory=dict)  # sign_column value -> +1 / -1
    treatments: list[str] = dataclasses.field(default_factory=list)  # label parts that are treatments (e.g. a stimulus), not genes
    min_cells: int = 2  # conditions with fewer cells are left out (listed in the report)
    n_de_genes: int = 20  # top DE genes per condition (GEARS: 20)
    target_sum: float = 1e4  # per-cell total after normalising raw counts
    block_cells: int = 16384  # cells per read block
    max_in_flight: int = 4  # read blocks in flight at once

    def __post_init__(self) -> None:
        if not self.perturbation_column:
            raise ConfigError("perturbation_column must name an obs column")
        if not self.control_labels:
            raise ConfigError("control_labels must list at least one label")
        if bool(self.filter_column) != bool(self.filter_values):
            raise ConfigError("filter_column and filter_values must be given together")
        if self.sign_values and not self.sign_column:
            raise ConfigError("sign_values needs sign_column")
        overlap = sorted(set(self.treatments) & set(self.control_labels))
        if overlap:
            raise ConfigError(f"treatments {overlap} are also control_labels")
        for value, sign in self.sign_values.items():
            if sign not in (1, -1):
                raise ConfigError(f"sign_values.{value}={sign!r} must be 1 or -1")
        check_range("min_cells", self.min_cells, 2)
        check_range("n_de_genes", self.n_de_genes, 1)
        check_range("target_sum", self.target_sum, 0, lo_open=True)
        check_range("block_cells", self.block_cells, 1)
        check_range("max_in_flight", self.max_in_flight, 1)


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """A canonical perturbation: sorted genes with a sign each (+1 activation / knock-out as
    labelled, -1 inhibition) and sorted non-gene treatments. Neither = control."""

    genes: tuple[str, ...]
    signs: tuple[int, ...]
    treatments: tuple[str, ...] = ()

    @property
    def is_control(self) -> bool:
        return not self.genes and not self.treatments

    @property
    def is_combo(self) -> bool:
        return len(self.genes) + len(self.treatments) > 1

    @property
    def parts(self) -> tuple[tuple[str, int], ...]:
        """(gene, sign) for each gene, then (treatment, +1) for each treatment."""
        return (*zip(self.genes, self.signs), *((t, 1) for t in self.treatments))

    @property
    def name(self) -> str:
        if self.is_control:
            return "ctrl"
        return "+".join([("-" if s < 0 else "") + g for g, s in zip(self.genes, self.signs)]
                        + list(self.treatments))


def parse_perturbation(label: str, *, control_labels: Sequence[str] = ("ctrl", "control"),
                       sign: int = 1, treatments: Sequence[str] = ()) -> Perturbation:
    """Parse one label (see the module docstring); `sign` applies to genes without a "-";
    a part listed in `treatments` is a treatment, not a gene."""
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"perturbation label {label!r} is empty")
    text = label.strip()
    if text in control_labels:
        return Perturbation((), ())
    genes: dict[str, int] = {}
    treated: set[str] = set()
    for part in text.split("+"):
        part = part.strip()
        if part in control_labels:
            continue  # GEARS writes singles as "GENE+ctrl"
        if part in treatments:
            treated.add(part)
            continue
        gene_sign = sign
        if part.startswith("-"):
            part, gene_sign = part[1:].strip(), -sign
        if not part:
            raise ValueError(f"perturbation label {label!r} has an empty gene name")
        if part in genes:
            raise ValueError(f"perturbation label {label!r} names gene {part!r} twice")
        if part == "ctrl":
            raise ValueError(f"perturbation label {label!r}: 'ctrl' is reserved for controls; "
                             f"list it in control_labels (now {list(control_labels)})")
        genes[part] = gene_sign
    order = sorted(genes)
    return Perturbation(tuple(order), tuple(genes[g] for g in order), tuple(sorted(treated)))


@dataclasses.dataclass
class PerturbationData:
    """Pseudo-bulk means of every condition and control over the store's genes.

    `conditions` (one row per group, index = condition id "PERT" or "COVARIATE/PERT") has
    columns perturbation (canonical name), covariate, n_cells, is_control; `mean_XG` / `var_XG`
    hold each group's mean and unbiased variance; `de_idx` maps each perturbed condition to its
    top DE gene indices, `de_nd_idx` to its top non-dropout DE gene indices."""

    genes: list[str]
    symbols: list[str]
    conditions: pd.DataFrame
    perturbations: dict[str, Perturbation]
    mean_XG: np.ndarray
    var_XG: np.ndarray
    de_idx: dict[str, np.ndarray]
    de_nd_idx: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def perturbed(self) -> list[str]:
        """Ids of the perturbed (non-control) conditions."""
        return self.conditions.index[~self.conditions["is_control"]].tolist()

    def row(self, condition: str) -> int:
        return int(self.conditions.index.get_loc(condition))

    def control_of(self, condition: str) -> str:
        cov = self.conditions.at[condition, "covariate"]
        return _condition_id("ctrl", cov)

    def mean(self, condition: str) -> np.ndarray:
        return self.mean_XG[self.row(condition)]

    def ctrl_mean(self, condition: str) -> np.ndarray:
        return self.mean_XG[self.row(self.control_of(condition))]

    def delta(self, condition: str) -> np.ndarray:
        return self.mean(condition) - self.ctrl_mean(condition)

    def perturbation(self, condition: str) -> Perturbation:
        return self.perturbations[self.conditions.at[condition, "perturbation"]]

    def gene_rows(self) -> dict[str, int]:
        """Gene id or symbol -> its column (an id wins over another gene's equal symbol)."""
        row = {s: i for i, s in enumerate(self.symbols)}
        row.update({g: i for i, g in enumerate(self.genes)})
        return row


def _condition_id(pert: str, covariate: str) -> str:
    return f"{covariate}/{pert}" if covariate else pert


def normalise_counts(x: sp.csr_matrix, target_sum: float, rows: np.ndarray) -> sp.csr_matrix:
    """Each row of raw counts scaled to `target_sum` and log1p'd (x's dtype kept); a row with
    no counts is an error naming its store row (`rows[i]` is row i's store row)."""
    totals = np.asarray(x.sum(axis=1)).ravel()
    empty = np.flatnonzero(totals <= 0)
    if empty.size:
        raise ValueError(f"{empty.size} cell(s) have no counts and cannot be normalised, e.g. "
                         f"store rows {np.asarray(rows)[empty[:5]].tolist()}")
    x = sp.csr_matrix(sp.diags((target_sum / totals).astype(x.dtype)) @ x)
    x.data = np.log1p(x.data)
    return x


def accumulate_groups(blocks: Iterable[tuple[int, sp.csr_matrix]], codes: np.ndarray,
                      n_groups: int, *, log_normalise: bool, target_sum: float = 1e4):
    """Sum, sum of squares and count per group over CSR row blocks `(start_row, block)`;
    `codes[row]` is the group of each row (-1 = not used). Returns (sum_XG, sumsq_XG, n_X)."""
    sum_XG = sumsq_XG = None
    n_X = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.int64)
    for start, x in blocks:
        block_codes = codes[start:start + x.shape[0]]
        keep = np.flatnonzero(block_codes >= 0)
        if keep.size == 0:
            continue
        x = sp.csr_matrix(x[keep], dtype=np.float64)
        if log_normalise:
            x = normalise_counts(x, target_sum, start + keep)
        onehot = sp.csr_matrix((np.ones(keep.size), (block_codes[keep], np.arange(keep.size))),
                               shape=(n_groups, keep.size))
        part = np.asarray((onehot @ x).todense())
        part_sq = np.asarray((onehot @ x.multiply(x)).todense())
        if sum_XG is None:
            sum_XG, sumsq_XG = part, part_sq
        else:
            sum_XG += part
            sumsq_XG += part_sq
    if sum_XG is None:
        raise ValueError("no rows selected: every group is empty")
    return sum_XG, sumsq_XG, n_X


def welch_t_scores(mean1: np.ndarray, var1: np.ndarray, n1: int,
                   mean0: np.ndarray, var0: np.ndarray, n0: int) -> np.ndarray:
    """scanpy's t-test scores of group 1 against reference 0 (unequal variances, NaN -> 0):
    scipy's Welch t from summary statistics, as scanpy computes it."""
    from scipy.stats import ttest_ind_from_stats

    with np.errstate(divide="ignore", invalid="ignore"):
        scores = ttest_ind_from_stats(mean1, np.sqrt(var1), n1, mean0, np.sqrt(var0), n0,
                                      equal_var=False).statistic
    scores = np.asarray(scores, dtype=np.float64)
    scores[np.isnan(scores)] = 0.0
    return scores


def top_de_genes(scores: np.ndarray, n: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Indices of the `n` genes with the largest |score|, largest first (ties by gene order),
    among the genes where `keep` (bool [G]) is True when given."""
    order = np.argsort(-np.abs(scores), kind="stable")
    if keep is not None:
        order = order[keep[order]]
    return order[:n]


def _obs_column(obs: pd.DataFrame, column: str, uri: str) -> pd.Series:
    if column not in obs.columns:
        raise ValueError(f"store {uri} has no obs column {column!r}; columns: {list(obs.columns)}")
    values = obs[column]
    # NOTE: missing values stay missing (astype(str) would turn them into the label "nan")
    return values.astype(str).where(values.notna().to_numpy(), np.nan)


def _group_cells(obs: pd.DataFrame, cfg: PerturbationConfig, uri: str):
    """Per-cell group codes (-1 = unused) and the group table, from obs labels."""
    labels = _obs_column(obs, cfg.perturbation_column, uri)
    keep = np.ones(len(obs), dtype=bool)
    if cfg.filter_column:
        values = _obs_column(obs, cfg.filter_column, uri)
        keep &= values.isin(cfg.filter_values).to_numpy()
        if not keep.any():
            raise ValueError(f"store {uri}: no cell has {cfg.filter_column} in {cfg.filter_values}"
                             f"; values present: {sorted(values.unique())[:20]}")
    if cfg.sign_column:
        sign_col = _obs_column(obs, cfg.sign_column, uri)
        unknown = sorted(set(sign_col[keep].unique()) - set(cfg.sign_values))
        if unknown:
            raise ValueError(f"store {uri}: {cfg.sign_column} values {unknown} have no entry in "
                             f"sign_values {cfg.sign_values}")
        signs = sign_col.map(cfg.sign_values).fillna(1).astype(int)
    else:
        signs = pd.Series(1, index=obs.index)
    covs = (_obs_column(obs, cfg.covariate_column, uri) if cfg.covariate_column
            else pd.Series("", index=obs.index))
    for column, values in ((cfg.perturbation_column, labels),
                           (cfg.covariate_column, covs if cfg.covariate_column else None)):
        missing = np.flatnonzero(values.isna().to_numpy() & keep) if values is not None else []
        if len(missing):
            raise ValueError(f"store {uri}: {len(missing)} cell(s) have no {column} label "
                             f"(missing value), e.g. cell {str(obs.index[missing[0]])!r}; label "
                             f"them (a control label for controls) or leave them out with "
                             f"filter_column / filter_values")
    key = pd.DataFrame({"label": labels.to_numpy(), "sign": signs.to_numpy(),
                        "cov": covs.to_numpy()})[keep]
    perts: dict[str, Perturbation] = {}
    names = {}
    for label, sign in key[["label", "sign"]].drop_duplicates().itertuples(index=False):
        pert = parse_perturbation(label, control_labels=cfg.control_labels, sign=int(sign),
                                  treatments=cfg.treatments)
        perts[pert.name] = pert
        names[(label, sign)] = pert.name
    pert_names = [names[(lbl, s)] for lbl, s in zip(key["label"], key["sign"])]
    cond = pd.Series([_condition_id(p, c) for p, c in zip(pert_names, key["cov"])],
                     index=key.index)
    table = (pd.DataFrame({"condition": cond, "perturbation": pert_names, "covariate": key["cov"]})
             .groupby("condition", sort=True)
             .agg(perturbation=("perturbation", "first"), covariate=("covariate", "first"),
                  n_cells=("perturbation", "size")))
    table["is_control"] = table["perturbation"] == "ctrl"
    missing_ctrl = sorted(set(table["covariate"]) - set(table.loc[table["is_control"], "covariate"]))
    if missing_ctrl:
        what = f"{cfg.covariate_column} value(s) {missing_ctrl}" if cfg.covariate_column else "data"
        raise ValueError(f"store {uri}: no control cells (labels {cfg.control_labels}) for {what}")
    small = table[(table["n_cells"] < cfg.min_cells)]
    if (small["is_control"]).any():
        raise ValueError(f"store {uri}: control group(s) {small.index[small['is_control']].tolist()}"
                         f" have fewer than min_cells={cfg.min_cells} cells")
    dropped = small["n_cells"].to_dict()
    if dropped:
        log.warning("leaving out %d condition(s) with fewer than %d cells: %s", len(dropped),
                    cfg.min_cells, dropped)
    table = table.drop(index=list(dropped))
    position = pd.Series(np.arange(len(table)), index=table.index)
    codes = np.full(len(obs), -1, dtype=np.int64)
    codes[np.flatnonzero(keep)] = cond.map(position).fillna(-1).astype(np.int64).to_numpy()
    perts = {p: perts[p] for p in table["perturbation"].unique()}
    return codes, table, perts, {str(k): int(v) for k, v in dropped.items()}


def _read_blocks(src: Any, codes: np.ndarray, cfg: PerturbationConfig):
    """(start, csr) for every block holding a selected cell, `max_in_flight` reads overlapping."""
    starts = [s for s in range(0, src.n_cells, cfg.block_cells)
              if (codes[s:s + cfg.block_cells] >= 0).any()]
    pending: deque = deque()
    for start in starts:
        pending.append((start, src.read_csr_async(start, min(start + cfg.block_cells,
                                                             src.n_cells))))
        if len(pending) >= cfg.max_in_flight:
            first, future = pending.popleft()
            yield first, future.result()
    while pending:
        first, future = pending.popleft()
        yield first, future.result()


def load_perturbation_data(src: Any, cfg: PerturbationConfig) -> PerturbationData:
    """Pseudo-bulk means, variances and top DE genes of every condition of an open store
    (a `pertscale.store` CellStore or collection)."""
    codes, table, perts, dropped = _group_cells(src.obs, cfg, src.uri)
    sum_XG, sumsq_XG, n_X = accumulate_groups(
        _read_blocks(src, codes, cfg), codes, len(table), log_normalise=bool(src.raw_counts),
        target_sum=cfg.target_sum)
    mean_XG = sum_XG / n_X[:, None]
    var_XG = np.maximum(sumsq_XG - n_X[:, None] * mean_XG ** 2, 0.0) / (n_X[:, None] - 1)
    var = src.var
    symbols = (var["gene_symbol"].astype(str).tolist() if "gene_symbol" in var.columns
               else [str(g) for g in var.index])
    data = PerturbationData(
        genes=[str(g) for g in var.index], symbols=symbols, conditions=table,
        perturbations=perts, mean_XG=mean_XG, var_XG=var_XG, de_idx={}, dropped=dropped,
        source={"uri": src.uri, "fingerprint": getattr(src, "fingerprint", ""),
                "raw_counts": bool(src.raw_counts)})
    for cond in data.perturbed:
        i, c = data.row(cond), data.row(data.control_of(cond))
        scores = welch_t_scores(mean_XG[i], var_XG[i], int(n_X[i]),
                                mean_XG[c], var_XG[c], int(n_X[c]))
        data.de_idx[cond] = top_de_genes(scores, cfg.n_de_genes)
        non_dropout = (mean_XG[i] != 0) | (mean_XG[c] == 0)
        data.de_nd_idx[cond] = top_de_genes(scores, cfg.n_de_genes, non_dropout)
    return data


def read_condition_cells(src: Any, cfg: PerturbationConfig, data: PerturbationData,
                         conditions: Sequence[str]) -> dict[str, sp.csr_matrix]:
    """The cells of `conditions` (log1p-normalised as the pseudo-bulk means are) from the open
    store `src`, as one CSR matrix per condition in store order; `data` must have been computed
    from this store with `cfg`. Only the blocks holding such cells are read."""
    codes, table, _, _ = _group_cells(src.obs, cfg, src.uri)
    if list(table.index) != list(data.conditions.index):
        raise ValueError(f"store {src.uri} no longer gives the conditions the data were computed "
                         f"from (changed store or perturbation config)")
    unknown = [c for c in conditions if c not in table.index]
    if unknown:
        raise ValueError(f"conditions {unknown[:5]} are not in the data of {src.uri}")
    wanted = np.zeros(len(table), dtype=bool)
    wanted[[data.row(c) for c in conditions]] = True
    codes = np.where((codes >= 0) & wanted[np.maximum(codes, 0)], codes, -1)
    parts: dict[int, list[sp.csr_matrix]] = {}
    for start, x in _read_blocks(src, codes, cfg):
        block = codes[start:start + x.shape[0]]
        keep = np.flatnonzero(block >= 0)
        x = sp.csr_matrix(x[keep], dtype=np.float32)
        if src.raw_counts:
            x = normalise_counts(x, cfg.target_sum, start + keep)
        for code in np.unique(block[keep]):
            parts.setdefault(int(code), []).append(x[block[keep] == code])
    return {c: sp.vstack(parts[data.row(c)], format="csr") for c in conditions}
