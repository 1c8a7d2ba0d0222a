"""GEARS gene-graph priors: a co-expression graph over the store's genes and a GO graph over the
perturbable genes, built streaming from a cell store and cached by content hash.

Co-expression (GEARS `get_coexpression_network_from_train`, self edges excluded): the Pearson
correlation between genes over the selected cells (`rows_mask`, e.g. the training controls) on
log1p-normalised values (raw counts are scaled per cell to `target_sum` first). The store is read
in row blocks, skipping blocks with no selected cell, and only the gene sums and X^T X are kept,
so memory is [genes, genes] float64, never [cells, genes]. |r| is used, NaN (constant genes) is 0;
each gene i keeps its `top_k` genes j by |r| (ties by gene index) with |r| > threshold, as edges
j -> i weighted |r|.

GO graph (GEARS' GO similarity graph, self edges excluded): the Jaccard index of the GO term
sets of two perturbable genes, from a sparse gene x term incidence matrix; each gene i keeps its
`top_k` genes j by Jaccard (ties by gene index) with Jaccard > threshold, as edges j -> i.

Edges follow torch_geometric's source_to_target flow: `edge_index[0]` is the source j,
`edge_index[1]` the target i that aggregates it; edges are sorted by target, then by weight.

Cache: `<cache_dir>/<sha256>.npz`, the key hashing the store fingerprint and gene ids, the
`rows_mask` bytes, the GO table's sha256 (its content, not its path), the perturbable genes and every config field that
changes the result (not `cache_dir` or `block_cells`); written atomically (temp file + rename).

Legend: G genes of the store, P perturbable genes, T GO terms, B cells in a read block,
R rows of a score block, N its columns, K neighbours kept per row, E edges.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertscale.checksums import file_sha256
from pertscale.config import Config, ConfigError, check_choice, check_range
from pertscale.data.perturbation import PerturbationConfig, _read_blocks, normalise_counts
from pertscale.paths import storage_root

__all__ = [
    "GearsPriors",
    "GeneGraph",
    "PriorsConfig",
    "build_gears_priors",
    "coexpression_graph",
    "gears_context",
    "go_graph",
    "read_go_terms",
]

log = logging.getLogger(__name__)

ONTOLOGIES = ("BP", "MF", "CC")
SYMBOL_COLUMNS = ("symbol", "gene_symbol")
CACHE_VERSION = 1  # bump when the graphs a given input produces change
DENSE_CHUNK_VALUES = 2**23  # float64 values of a dense block chunk (64 MiB)
TOP_K_ROWS = 2048  # rows of a score matrix ranked at once (bounds the sort's temporaries)


@dataclasses.dataclass
class PriorsConfig(Config):
    """Where GO annotations come from and how sparse the two prior graphs are."""

    go_path: str = ""  # gene/term TSV(.gz) with a symbol/gene_symbol and a go_id column
    go_ontologies: list[str] = dataclasses.field(default_factory=lambda: list(ONTOLOGIES))  # kept when the table has an ontology column
    coexpress_top_k: int = 20  # co-expression neighbours per gene (self excluded)
    coexpress_threshold: float = 0.4  # keep co-expression edges with |r| > this
    go_top_k: int = 20  # GO neighbours per perturbable gene (self excluded)
    go_threshold: float = 0.1  # keep GO edges with Jaccard > this
    allow_missing_go: bool = False  # a perturbable gene without GO terms: error (False) or no edges, reported (True)
    cache_dir: str = ""  # "" = <storage root>/cache/priors
    block_cells: int = 16384  # cells per read block
    target_sum: float = 1e4  # per-cell total after normalising raw counts

    def __post_init__(self) -> None:
        if not self.go_ontologies:
            raise ConfigError(f"go_ontologies must list at least one of {list(ONTOLOGIES)}")
        for i, ont in enumerate(self.go_ontologies):
            check_choice(f"go_ontologies[{i}]", ont, ONTOLOGIES)
        for name in ("coexpress_threshold", "go_threshold", "target_sum"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"{name}={value!r} must be a finite number")
        check_range("coexpress_top_k", self.coexpress_top_k, 1)
        check_range("go_top_k", self.go_top_k, 1)
        check_range("coexpress_threshold", self.coexpress_threshold, 0, 1, hi_open=True)
        check_range("go_threshold", self.go_threshold, 0, 1, hi_open=True)
        check_range("block_cells", self.block_cells, 1)
        check_range("target_sum", self.target_sum, 0, lo_open=True)


@dataclasses.dataclass
class GeneGraph:
    """A directed weighted graph over named nodes; edge e goes edge_index[0, e] -> edge_index[1, e]."""

    nodes: list[str]
    edge_index: np.ndarray  # int64 [2, E]: row 0 source j, row 1 target i
    edge_weight: np.ndarray  # float32 [E]

    def __post_init__(self) -> None:
        self.nodes = [str(n) for n in self.nodes]
        self.edge_index = np.asarray(self.edge_index, dtype=np.int64).reshape(2, -1)
        self.edge_weight = np.asarray(self.edge_weight, dtype=np.float32).reshape(-1)
        if self.edge_weight.shape[0] != self.edge_index.shape[1]:
            raise ValueError(f"{self.edge_index.shape[1]} edges but {self.edge_weight.shape[0]} "
                             f"weights")
        if self.num_edges and not (0 <= self.edge_index.min() <= self.edge_index.max()
                                   < len(self.nodes)):
            raise ValueError(f"edge_index refers to nodes outside [0, {len(self.nodes)})")

    @property
    def num_edges(self) -> int:
        return int(self.edge_weight.shape[0])


@dataclasses.dataclass
class GearsPriors:
    """The two GEARS prior graphs, with the cache key they were stored under."""

    coexpress: GeneGraph  # nodes = the store's gene ids, in store order
    go: GeneGraph  # nodes = the perturbable genes, in the order given
    no_go_terms: list[str]  # perturbable genes without any GO term (allow_missing_go only)
    sha256: str  # cache key
    cached: bool = False  # True when read from the cache

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (strings as unicode arrays): for npz, safetensors or Ray."""
        out: dict[str, np.ndarray] = {}
        for name, graph in (("coexpress", self.coexpress), ("go", self.go)):
            out[f"{name}_nodes"] = np.array(graph.nodes, dtype=str)
            out[f"{name}_edge_index"] = graph.edge_index
            out[f"{name}_edge_weight"] = graph.edge_weight
        out["no_go_terms"] = np.array(self.no_go_terms, dtype=str)
        out["sha256"] = np.array(self.sha256, dtype=str)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> GearsPriors:
        keys = [f"{g}_{k}" for g in ("coexpress", "go") for k in ("nodes", "edge_index",
                                                                  "edge_weight")]
        missing = [k for k in [*keys, "no_go_terms", "sha256"] if k not in arrays]
        if missing:
            raise ValueError(f"prior arrays lack {missing}; they have {sorted(arrays)}")
        graphs = {g: GeneGraph(np.asarray(arrays[f"{g}_nodes"]).tolist(),
                               arrays[f"{g}_edge_index"], arrays[f"{g}_edge_weight"])
                  for g in ("coexpress", "go")}
        return cls(graphs["coexpress"], graphs["go"], np.asarray(arrays["no_go_terms"]).tolist(),
                   str(np.asarray(arrays["sha256"])))


def read_go_terms(path: str, ontologies: Iterable[str] = ONTOLOGIES) -> dict[str, set[str]]:
    """Gene symbol -> set of GO ids from a TSV(.gz) table, keeping `ontologies` when the table
    has an ontology column."""
    if not Path(path).is_file():
        raise ValueError(f"GO table {path} does not exist")
    df = pd.read_csv(path, sep="\t", dtype=str)
    symbol = next((c for c in SYMBOL_COLUMNS if c in df.columns), None)
    if symbol is None or "go_id" not in df.columns:
        raise ValueError(f"GO table {path} needs a go_id column and one of {list(SYMBOL_COLUMNS)};"
                         f" it has {list(df.columns)}")
    if "ontology" in df.columns:
        df = df[df["ontology"].isin(list(ontologies))]
    df = df.dropna(subset=[symbol, "go_id"])
    if df.empty:
        raise ValueError(f"GO table {path} has no annotations of ontologies {list(ontologies)}")
    return {str(g): set(terms) for g, terms in df.groupby(symbol)["go_id"]}


def _top_k_edges(score_RN: np.ndarray, offset: int, top_k: int, threshold: float):
    """Edges j -> i for rows i = offset + r of a score block: the `top_k` largest scores of
    each row other than i itself (ties by column index), kept when score > threshold."""
    score_RN = score_RN.copy()
    rows = np.arange(score_RN.shape[0])
    score_RN[rows, offset + rows] = -np.inf  # NOTE: self edges are excluded, unlike GEARS
    k = min(top_k, score_RN.shape[1] - 1)
    if k < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    # candidates: scores at least each row's k-th largest (all ties kept) and above threshold;
    # a full sort of the few candidates then breaks ties by column index.
    kth_R = -np.partition(-score_RN, k - 1, axis=1)[:, k - 1]
    r, j = np.nonzero((score_RN >= kth_R[:, None]) & (score_RN > threshold))
    w = score_RN[r, j]
    order = np.lexsort((j, -w, r))  # by row, then weight descending, then column
    r, j, w = r[order], j[order], w[order]
    keep = np.arange(len(r)) - np.searchsorted(r, r) < k  # rank within the row
    return j[keep], offset + r[keep], w[keep]


def _graph_from_blocks(nodes: list[str], parts: list[tuple]) -> GeneGraph:
    if not parts:
        return GeneGraph(nodes, np.zeros((2, 0), np.int64), np.zeros(0, np.float32))
    src, dst, w = (np.concatenate(p) for p in zip(*parts))
    return GeneGraph(nodes, np.stack([src, dst]), w)


def _check_mask(src: Any, rows_mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(rows_mask)
    if mask.dtype != bool or mask.shape != (src.n_cells,):
        raise ValueError(f"rows_mask must be a bool array of shape ({src.n_cells},) for store "
                         f"{src.uri}; got {mask.dtype} {mask.shape}")
    return mask


def coexpression_graph(src: Any, rows_mask: np.ndarray, *, top_k: int, threshold: float,
                       target_sum: float = 1e4, block_cells: int = 16384) -> GeneGraph:
    """|Pearson r| graph between the store's genes over the rows where `rows_mask` is True."""
    mask = _check_mask(src, rows_mask)
    n = int(mask.sum())
    if n < 2:
        raise ValueError(f"co-expression needs at least 2 selected cells of store {src.uri}; "
                         f"rows_mask selects {n}")
    genes = [str(g) for g in src.var.index]
    n_genes = len(genes)
    sum_G = np.zeros(n_genes)
    xtx_GG = np.zeros((n_genes, n_genes))
    codes = np.where(mask, 0, -1)
    chunk = max(1, DENSE_CHUNK_VALUES // max(n_genes, 1))
    # only block_cells and max_in_flight of this config are read
    for start, x in _read_blocks(src, codes, PerturbationConfig(block_cells=block_cells)):
        picked = np.flatnonzero(mask[start:start + x.shape[0]])
        x_BG = sp.csr_matrix(x[picked], dtype=np.float64)
        if src.raw_counts:
            x_BG = normalise_counts(x_BG, target_sum, start + picked)
        sum_G += np.asarray(x_BG.sum(axis=0)).ravel()
        # NOTE: dense BLAS on bounded row chunks beats scipy's sparse x.T @ x several-fold at
        # single-cell densities (~10% of highly variable genes), and keeps memory bounded.
        for lo in range(0, x_BG.shape[0], chunk):
            dense = x_BG[lo:lo + chunk].toarray()
            xtx_GG += dense.T @ dense
    mean_G = sum_G / n
    cov_GG = (xtx_GG - n * np.outer(mean_G, mean_G)) / (n - 1)
    var_G = np.diag(cov_GG).copy()
    # NOTE: X^T X - n m m^T leaves rounding noise for a constant gene; treat a variance that
    # small relative to the gene's second moment as zero (np.corrcoef gives NaN there -> 0).
    constant = var_G <= 1e-10 * np.maximum(np.diag(xtx_GG) / n, np.finfo(float).tiny)
    std_G = np.sqrt(np.where(constant, 1.0, var_G))
    r_GG = np.abs(cov_GG / np.outer(std_G, std_G))
    r_GG[constant, :] = 0.0
    r_GG[:, constant] = 0.0
    np.clip(r_GG, 0.0, 1.0, out=r_GG)
    parts = [_top_k_edges(r_GG[lo:lo + TOP_K_ROWS], lo, top_k, threshold)
             for lo in range(0, n_genes, TOP_K_ROWS)]
    return _graph_from_blocks(genes, parts)


def go_graph(genes: list[str], term_sets: dict[str, set[str]], *, top_k: int,
             threshold: float) -> GeneGraph:
    """Jaccard graph between `genes` from their GO term sets (a gene absent from `term_sets`
    has no terms, so no edges)."""
    terms = sorted({t for g in genes for t in term_sets.get(g, ())})
    term_pos = {t: i for i, t in enumerate(terms)}
    gene_idx = [i for i, g in enumerate(genes) for _ in term_sets.get(g, ())]
    term_idx = [term_pos[t] for g in genes for t in term_sets.get(g, ())]
    a_PT = sp.csr_matrix((np.ones(len(gene_idx)), (np.array(gene_idx, dtype=np.int64),
                                                    np.array(term_idx, dtype=np.int64))),
                         shape=(len(genes), len(terms)))
    size_P = np.asarray(a_PT.sum(axis=1)).ravel()
    parts = []
    for lo in range(0, len(genes), TOP_K_ROWS):
        inter = (a_PT[lo:lo + TOP_K_ROWS] @ a_PT.T).tocoo()  # only genes sharing a term
        inter.data = inter.data / (size_P[lo + inter.row] + size_P[inter.col] - inter.data)
        parts.append(_top_k_edges(inter.toarray(), lo, top_k, threshold))
    return _graph_from_blocks(list(genes), parts)


def _cache_key(src: Any, cfg: PriorsConfig, mask: np.ndarray, pert_genes: list[str]) -> str:
    # NOTE: the GO table enters by content (its sha256), not by path: a moved file still hits.
    fields = {k: v for k, v in cfg.to_dict().items()
              if k not in ("cache_dir", "block_cells", "go_path")}
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "fingerprint": str(src.fingerprint),
                         "go_sha256": file_sha256(cfg.go_path), "pert_genes": pert_genes,
                         "genes": [str(g) for g in src.var.index], "config": fields},
                        sort_keys=True).encode())
    h.update(np.packbits(mask).tobytes() + str(mask.shape[0]).encode())
    return h.hexdigest()


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def build_gears_priors(src: Any, cfg: PriorsConfig, *, rows_mask: np.ndarray,
                       pert_genes: list[str]) -> GearsPriors:
    """Both GEARS prior graphs for an open store, read from the cache when present."""
    if not cfg.go_path:
        raise ValueError("PriorsConfig.go_path is empty; set it to a gene/GO term TSV table")
    if not Path(cfg.go_path).is_file():
        raise ValueError(f"PriorsConfig.go_path: GO table {cfg.go_path} does not exist")
    pert_genes = [str(g) for g in pert_genes]
    if not pert_genes:
        raise ValueError("pert_genes is empty: the GO graph needs the perturbable genes")
    dups = sorted(g for g, n in collections.Counter(pert_genes).items() if n > 1)
    if dups:
        raise ValueError(f"pert_genes lists {dups[:20]} more than once")
    mask = _check_mask(src, rows_mask)
    key = _cache_key(src, cfg, mask, pert_genes)
    path = Path(cfg.cache_dir or storage_root() / "cache" / "priors") / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                priors = GearsPriors.from_arrays(dict(z))
        except (OSError, ValueError) as e:
            raise ValueError(f"cached priors {path} cannot be read ({e}); delete it") from None
        priors.cached = True
        log.info("GEARS priors from cache %s: co-expression %d edges, GO %d edges", path,
                 priors.coexpress.num_edges, priors.go.num_edges)
        return priors

    term_sets = read_go_terms(cfg.go_path, cfg.go_ontologies)
    missing = [g for g in pert_genes if not term_sets.get(g)]
    if missing and not cfg.allow_missing_go:
        raise ValueError(f"{len(missing)} perturbable gene(s) have no GO terms in {cfg.go_path} "
                         f"(ontologies {cfg.go_ontologies}): {missing[:20]}; set "
                         f"allow_missing_go=true to give them no GO edges")
    if missing:
        log.warning("%d perturbable gene(s) have no GO terms in %s and get no GO edges: %s",
                    len(missing), cfg.go_path, missing[:20])
    coexpress = coexpression_graph(src, mask, top_k=cfg.coexpress_top_k,
                                   threshold=cfg.coexpress_threshold, target_sum=cfg.target_sum,
                                   block_cells=cfg.block_cells)
    go = go_graph(pert_genes, term_sets, top_k=cfg.go_top_k, threshold=cfg.go_threshold)
    priors = GearsPriors(coexpress, go, missing, key)
    _save_npz(path, priors.to_arrays())
    log.info("GEARS priors built and cached at %s: co-expression %d edges, GO %d edges", path,
             coexpress.num_edges, go.num_edges)
    return priors


def gears_context(job: Any, task: Any) -> dict[str, Any]:
    """GEARS' own context entries for a fine-tune (its spec's `prepare`): the perturbation table
    (every gene perturbed anywhere in the data, then the other readout genes that have GO
    terms, so those can be predicted too) and both graphs, co-expression from the training
    cells whose condition is control or a single perturbation (as GEARS). `report` says where
    the graphs came from."""
    cfg: PriorsConfig = job.priors
    if not cfg.go_path:
        raise ValueError("priors.go_path is empty: pass --priors.go_path=FILE (a gene/GO term "
                         "TSV such as the simulator's go_annotations.tsv)")
    codes, table = task.cell_conditions()
    train = set(task.split.train)
    keep = [i for i, c in enumerate(table.index)
            if table.at[c, "is_control"]
            or (c in train and len(task.data.perturbation(c).genes) == 1)]
    rows_mask = np.isin(codes, keep)
    perturbed = task.perturbed_genes
    term_sets = read_go_terms(cfg.go_path, cfg.go_ontologies)
    known = set(perturbed)
    readout = sorted({s for s in task.data.symbols if s not in known and term_sets.get(s)})
    pert_genes = perturbed + readout
    priors = build_gears_priors(task.src, cfg, rows_mask=rows_mask, pert_genes=pert_genes)
    return {"pert_genes": pert_genes,
            "graphs": {"coexpress_edges": priors.coexpress.edge_index,
                       "coexpress_weight": priors.coexpress.edge_weight,
                       "go_edges": priors.go.edge_index, "go_weight": priors.go.edge_weight},
            "report": {"priors_sha256": priors.sha256, "priors_cached": priors.cached,
                       "coexpress_edges": priors.coexpress.num_edges,
                       "go_edges": priors.go.num_edges, "perturbable_genes": len(pert_genes),
                       "coexpress_cells": int(rows_mask.sum()),
                       "no_go_terms": list(priors.no_go_terms)}}
