"""Pathway (gene set) selection from GO for the pathway-attention VAE: the pathway tokens and
the genes each one attends to.

Sources: a GMT file (set id, description, genes...), or a direct gene/term annotation table
whose annotations are propagated to every ancestor term through the DAG's `relations` edges
(a gene annotated to a term belongs to the sets of all its ancestors). Either file may be .gz.

Rules, applied in this order, each logged with the number of sets it removed:
1. size: keep sets with fewer than `max_genes` genes, counted over the source's genes (before
   intersecting with the data);
2. redundancy: drop a set when more than `max_shared_fraction` of ITS genes lie in one already
   kept set. Sets are visited greedily by size descending, then by id: a larger set covers the
   genes of the sets it makes redundant, so every dropped set has most of its genes inside a
   kept set at least as large (the pathway vocabulary loses the fewest genes), a larger set is
   more likely to keep `min_genes_present` genes on a small gene panel (rule 3), and the id tie
   break makes the result independent of the file's order. A consequence: a set lying inside a
   kept one (a descendant of a kept term, for propagated sets) is always dropped here;
3. presence: keep sets with at least `min_genes_present` genes among the data's genes;
4. specificity: drop sets that are ancestors (transitively, through `relations` edges) of
   another selected set. Without `dag_edges` (a GMT alone) this rule is skipped, with a warning.

Legend: S gene sets, G genes of the source, T terms of the DAG, E entries of a sparse mask.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertscale.config import Config, ConfigError, check_choice, check_range
from pertscale.data.priors import ONTOLOGIES, read_go_terms

__all__ = ["PathwaySelection", "PathwaySelectionConfig", "read_gmt", "select_pathways"]

log = logging.getLogger(__name__)

RELATIONS = ("is_a", "part_of", "regulates", "positively_regulates", "negatively_regulates")
RELATION_COLUMNS = ("relationship", "relation")


@dataclasses.dataclass
class PathwaySelectionConfig(Config):
    """Where the gene sets come from and the thresholds of the four selection rules."""

    gmt: str = ""  # GMT(.gz): set id, description, genes...; or use go_table
    go_table: str = ""  # direct annotations TSV(.gz): symbol/gene_symbol, go_id[, ontology]
    dag_edges: str = ""  # TSV(.gz): child, parent, relationship/relation; needed with go_table
    go_terms: str = ""  # TSV(.gz) with go_id, name: term names (else the GMT description)
    ontologies: list[str] = dataclasses.field(default_factory=lambda: ["BP"])  # go_table rows kept
    relations: list[str] = dataclasses.field(
        default_factory=lambda: ["is_a", "part_of"])  # DAG edges followed (propagation, ancestry)
    max_genes: int = 30  # keep sets with fewer genes than this (source genes)
    max_shared_fraction: float = 0.5  # drop a set sharing more than this of its genes with a kept one
    min_genes_present: int = 5  # keep sets with at least this many genes in the data

    def __post_init__(self) -> None:
        if self.gmt and self.go_table:
            raise ConfigError(f"set one of gmt and go_table, not both; got gmt={self.gmt!r}, "
                              f"go_table={self.go_table!r}")
        if self.go_table and not self.dag_edges:
            raise ConfigError(f"go_table={self.go_table!r} needs dag_edges (child, parent, "
                              f"relationship) to propagate annotations to ancestor terms")
        for name, values, choices in (("ontologies", self.ontologies, ONTOLOGIES),
                                      ("relations", self.relations, RELATIONS)):
            if not values:
                raise ConfigError(f"{name} must list at least one of {list(choices)}")
            for i, value in enumerate(values):
                check_choice(f"{name}[{i}]", value, choices)
        check_range("max_genes", self.max_genes, 2)
        check_range("max_shared_fraction", self.max_shared_fraction, 0, 1)
        check_range("min_genes_present", self.min_genes_present, 1)
        if self.min_genes_present >= self.max_genes:
            raise ConfigError(f"min_genes_present={self.min_genes_present} must be below "
                              f"max_genes={self.max_genes}, or no set can pass both rules")


@dataclasses.dataclass
class PathwaySelection:
    """The selected pathways (the model's pathway tokens, in this order, sorted by id), their
    member genes among the data's genes, and how many sets each rule removed."""

    term_ids: list[str]
    names: list[str]  # "" where no source names the term
    genes: list[list[str]]  # member gene symbols present in the data, sorted
    report: list[tuple[str, int, int]]  # (rule, sets removed, sets remaining), in rule order

    def __post_init__(self) -> None:
        self.term_ids = [str(t) for t in self.term_ids]
        self.names = [str(n) for n in self.names]
        self.genes = [[str(g) for g in members] for members in self.genes]
        self.report = [(str(rule), int(removed), int(left)) for rule, removed, left in self.report]
        if not len(self.term_ids) == len(self.names) == len(self.genes):
            raise ValueError(f"{len(self.term_ids)} term_ids, {len(self.names)} names and "
                             f"{len(self.genes)} gene lists: they must be equally long")
        if len(set(self.term_ids)) != len(self.term_ids):
            raise ValueError("term_ids lists a pathway more than once")

    @property
    def num_pathways(self) -> int:
        return len(self.term_ids)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: saved with the model, it defines the pathway tokens."""
        return {"term_ids": list(self.term_ids), "names": list(self.names),
                "genes": [list(g) for g in self.genes],
                "report": [list(entry) for entry in self.report]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PathwaySelection:
        keys = [f.name for f in dataclasses.fields(cls)]
        if sorted(data) != sorted(keys):
            raise ValueError(f"a pathway selection needs keys {keys}; got {sorted(data)}")
        return cls(**{k: data[k] for k in keys})

    def members(self, gene_symbols: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """CSR rows of the pathway x gene mask over `gene_symbols`: pathway p's genes are
        `indices[indptr[p]:indptr[p + 1]]` (ascending positions in `gene_symbols`). Genes absent
        from `gene_symbols` are skipped, so a pathway may get an empty row on another panel."""
        index = pd.Index([str(g) for g in gene_symbols])
        if not index.is_unique:
            dups = sorted(set(index[index.duplicated()]))
            raise ValueError(f"gene_symbols lists {dups[:20]} more than once")
        sizes = np.array([len(g) for g in self.genes], dtype=np.int64)
        row_E = np.repeat(np.arange(self.num_pathways), sizes)
        col_E = index.get_indexer([g for members in self.genes for g in members]).astype(np.int64)
        found = col_E >= 0
        row_E, col_E = row_E[found], col_E[found]
        order = np.lexsort((col_E, row_E))
        indptr = np.zeros(self.num_pathways + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_E, minlength=self.num_pathways), out=indptr[1:])
        return indptr, col_E[order]


def _check_file(path: str, what: str) -> Path:
    if not Path(path).is_file():
        raise ValueError(f"{what} file {path} does not exist")
    return Path(path)


def _read_tsv(path: str, what: str, needed: Iterable[str]) -> pd.DataFrame:
    df = pd.read_csv(_check_file(path, what), sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what} file {path} lacks column(s) {missing}; it has {list(df.columns)}")
    return df


def read_gmt(path: str) -> dict[str, tuple[str, list[str]]]:
    """Set id -> (description, sorted unique gene symbols) from a GMT(.gz) file; blank lines are
    skipped, a line without an id or genes and a repeated id are errors naming the line."""
    p = _check_file(path, "gmt")
    out: dict[str, tuple[str, list[str]]] = {}
    line_of: dict[str, int] = {}
    with (gzip.open(p, "rt", encoding="utf-8") if p.suffix == ".gz"
          else p.open(encoding="utf-8")) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            set_id = fields[0].strip()
            genes = sorted({g.strip() for g in fields[2:]} - {""})
            if not set_id or not genes:
                raise ValueError(f"gmt file {path} line {lineno}: expected 'id<TAB>description"
                                 f"<TAB>gene...' with at least one gene; got {line[:100]!r}")
            if set_id in out:
                raise ValueError(f"gmt file {path} line {lineno}: set {set_id!r} already "
                                 f"defined on line {line_of[set_id]}")
            out[set_id] = (fields[1].strip(), genes)
            line_of[set_id] = lineno
    if not out:
        raise ValueError(f"gmt file {path} holds no gene set")
    return out


def _read_ancestors(path: str, relations: list[str], ids: np.ndarray,
                    source: str) -> tuple[np.ndarray, sp.csr_matrix]:
    """Sorted terms T (the DAG's and `ids`) and the [T, T] matrix with 1 at (t, a) when a is a
    strict ancestor of t through edges of `relations`."""
    df = _read_tsv(path, "dag_edges", ("child", "parent"))
    column = next((c for c in RELATION_COLUMNS if c in df.columns), None)
    if column is None:
        raise ValueError(f"dag_edges file {path} needs a relation column named one of "
                         f"{list(RELATION_COLUMNS)}; it has {list(df.columns)}")
    # NOTE: spellings differ between sources ("isa", "part of", "is_a"): compare letters only.
    canonical = df[column].str.lower().str.replace(r"[^a-z]", "", regex=True)
    keep = canonical.isin([r.replace("_", "") for r in relations]).to_numpy()
    if not keep.any():
        raise ValueError(f"dag_edges file {path} has no edge of relations {relations}; its "
                         f"{column} column holds {sorted(df[column].unique())[:20]}")
    child, parent = df["child"].to_numpy(str)[keep], df["parent"].to_numpy(str)[keep]
    if not np.isin(ids, np.concatenate([child, parent])).any():
        raise ValueError(f"none of the {len(ids)} term ids of {source} (e.g. {ids[0]!r}) is a "
                         f"term of dag_edges file {path}")
    terms = np.unique(np.concatenate([child, parent, ids]))
    anc_TT = sp.csr_matrix((np.ones(len(child), np.int32), (np.searchsorted(terms, child),
                                                            np.searchsorted(terms, parent))),
                           (len(terms), len(terms)))
    anc_TT.data[:] = 1  # a pair linked by two relations was summed to 2
    while True:  # square until no path is added (paths of length up to 2^k after k steps)
        grown = (anc_TT + anc_TT @ anc_TT).tocsr()
        grown.data[:] = 1
        if grown.nnz == anc_TT.nnz:
            break
        anc_TT = grown
    cyclic = np.flatnonzero(anc_TT.diagonal())
    if len(cyclic):
        raise ValueError(f"dag_edges file {path} has a cycle through {terms[cyclic[:5]].tolist()}")
    return terms, anc_TT


def _incidence(members: list[list[str]], columns: np.ndarray | None = None):
    """[S, C] 0/1 csr matrix of lists of unique members over the sorted `columns` (default:
    the members' sorted union), and the columns."""
    flat = np.array([g for m in members for g in m], dtype=str)
    columns = np.unique(flat) if columns is None else columns
    rows = np.repeat(np.arange(len(members)), [len(m) for m in members])
    return sp.csr_matrix((np.ones(len(flat), np.int32), (rows, np.searchsorted(columns, flat))),
                         (len(members), len(columns))), columns


def _load_sets(cfg: PathwaySelectionConfig):
    """(ids [S], descriptions [S], member_SG, genes [G], terms [T] or None, strict ancestors
    [T, T] or None) from the configured source."""
    if cfg.gmt:
        sets = read_gmt(cfg.gmt)
        ids = np.array(list(sets), dtype=str)
        member_SG, genes = _incidence([members for _, members in sets.values()])
        descriptions = [description for description, _ in sets.values()]
        if not cfg.dag_edges:
            return ids, descriptions, member_SG, genes, None, None
        return (ids, descriptions, member_SG, genes,
                *_read_ancestors(cfg.dag_edges, cfg.relations, ids, f"gmt file {cfg.gmt}"))
    term_sets = read_go_terms(cfg.go_table, cfg.ontologies)  # gene symbol -> direct GO ids
    genes = np.array(sorted(term_sets), dtype=str)
    annotated = np.unique(np.array([t for ts in term_sets.values() for t in ts], dtype=str))
    terms, anc_TT = _read_ancestors(cfg.dag_edges, cfg.relations, annotated,
                                    f"go_table file {cfg.go_table}")
    direct_GT, _ = _incidence([sorted(term_sets[g]) for g in genes], terms)
    propagated_TG = (direct_GT @ (anc_TT + sp.identity(len(terms), np.int32, "csr"))).T.tocsr()
    propagated_TG.data[:] = 1
    nonempty = np.flatnonzero(propagated_TG.getnnz(axis=1))
    log.info("pathways: %d annotated genes propagated to %d terms of %s", len(genes),
             len(nonempty), cfg.go_table)
    return terms[nonempty], [""] * len(nonempty), propagated_TG[nonempty], genes, terms, anc_TT


def _non_redundant(member_SG: sp.csr_matrix, ids: np.ndarray, fraction: float) -> np.ndarray:
    """Keep mask of the greedy redundancy rule (visit order: size descending, then id)."""
    size_S = member_SG.getnnz(axis=1)
    order = np.lexsort((ids, -size_S))
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    shared = (member_SG @ member_SG.T).tocoo()  # only pairs of sets sharing a gene
    # set i can only be dropped by a set j visited before it sharing > fraction of i's genes
    hit = (rank[shared.col] < rank[shared.row]) & (shared.data > fraction * size_S[shared.row])
    blockers = sp.csr_matrix((np.ones(int(hit.sum()), np.int8), (rank[shared.row[hit]],
                                                                  rank[shared.col[hit]])),
                             (len(ids), len(ids)))
    keep_ranked = np.zeros(len(ids), bool)
    for i in range(len(ids)):
        keep_ranked[i] = not keep_ranked[blockers.indices[blockers.indptr[i]:
                                                          blockers.indptr[i + 1]]].any()
    return keep_ranked[rank]


def _read_term_names(path: str) -> dict[str, str]:
    df = _read_tsv(path, "go_terms", ("go_id", "name"))
    column = "name"
    if ("ontology" in df.columns and df["name"].isin(ONTOLOGIES).all()
            and not df["ontology"].isin(ONTOLOGIES).any()):
        # NOTE: ../shared/data/go/go_terms.tsv.gz has its name and ontology headers swapped.
        log.warning("go_terms file %s: the name column holds ontology codes and the ontology "
                    "column holds names (headers swapped); reading names from 'ontology'", path)
        column = "ontology"
    return dict(zip(df["go_id"], df[column]))


def select_pathways(cfg: PathwaySelectionConfig,
                    data_gene_symbols: Iterable[str]) -> PathwaySelection:
    """Pathways selected from the configured gene sets by the four rules of the module
    docstring, their members restricted to `data_gene_symbols`."""
    if not (cfg.gmt or cfg.go_table):
        raise ValueError("PathwaySelectionConfig names no source: set gmt, or go_table and "
                         "dag_edges")
    data = np.unique(np.array([str(g) for g in data_gene_symbols], dtype=str))
    if not len(data):
        raise ValueError("data_gene_symbols is empty: rule 3 needs the data's gene symbols")
    ids, descriptions, member_SG, genes, terms, anc_TT = _load_sets(cfg)
    term_names = _read_term_names(cfg.go_terms) if cfg.go_terms else {}
    names = np.array(descriptions, dtype=object)
    present_G = np.isin(genes, data)
    log.info("pathways: %d gene sets over %d genes, %d of them in the data", len(ids),
             len(genes), int(present_G.sum()))
    report: list[tuple[str, int, int]] = []

    def apply(rule: str, keep: np.ndarray) -> None:
        nonlocal ids, names, member_SG
        removed, left = int((~keep).sum()), int(keep.sum())
        report.append((rule, removed, left))
        log.info("pathways: rule %d (%s) removed %d sets, %d remain", len(report), rule,
                 removed, left)
        if not left:
            raise ValueError(f"no pathway left: rule {len(report)} ({rule}) removed the last "
                             f"{removed} sets; report so far {report}")
        ids, names, member_SG = ids[keep], names[keep], member_SG[keep]

    apply(f"fewer than {cfg.max_genes} genes", member_SG.getnnz(axis=1) < cfg.max_genes)
    apply(f"shares at most {cfg.max_shared_fraction:g} of its genes with a kept set",
          _non_redundant(member_SG, ids, cfg.max_shared_fraction))
    apply(f"at least {cfg.min_genes_present} genes in the data",
          member_SG @ present_G.astype(np.int32) >= cfg.min_genes_present)
    rule = "not an ancestor of another selected set"
    if anc_TT is None:
        log.warning("pathways: no dag_edges given, so rule 4 (%s) is skipped", rule)
        apply(f"{rule} (skipped: no dag_edges)", np.ones(len(ids), bool))
    else:
        pos = np.searchsorted(terms, ids)
        apply(rule, anc_TT[pos][:, pos].getnnz(axis=0) == 0)

    names = np.array([term_names.get(t, n) for t, n in zip(ids, names)], dtype=object)
    order = np.argsort(ids, kind="stable")
    member_SG = member_SG.tocsr()
    members = [genes[member_SG.indices[member_SG.indptr[s]:member_SG.indptr[s + 1]]]
               for s in order]
    return PathwaySelection(ids[order].tolist(), names[order].tolist(),
                            [sorted(m[np.isin(m, data)].tolist()) for m in members], report)
