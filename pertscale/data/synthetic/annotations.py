"""Prior knowledge that carries real signal: a GO-like annotation set and gene embeddings.

GO-like terms (ids "GO:9xxxxxx", never clashing with real GO ids):
- per program: a BP term ("program k process") with 1-3 child BP terms (branches), and an MF
  term annotated to its regulators; a program gene is annotated directly to its program term
  with probability `go_annotation_rate` and to one branch with probability 1/2;
- shared noise: 8 CC compartments (one per gene, 70% of genes) and unrelated BP processes
  (Poisson(`go_noise_terms`) per gene), all under one BP root.
So genes of one program share terms far more often than genes of different programs, as in
GEARS' GO graph. Gene sets (GMT) are BP terms with annotations propagated to ancestors, kept
at 5-500 genes like the real `go_bp_propagated_5_500.gmt`.

Gene embeddings are a random projection of each gene's program membership and of the program
profile of its true downstream effect (from the shared graph), plus Gaussian noise of sd
`embedding_noise` per unit-variance signal dimension: perturbations of genes with similar
embeddings have similar effects, as GenePert assumes of GenePT embeddings.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from pertscale.data.synthetic.config import SimulatorConfig
from pertscale.data.synthetic.truth import (
    STREAM_ANNOTATIONS,
    STREAM_EMBEDDINGS,
    GroundTruth,
    propagate,
    rng_for,
)

__all__ = ["GoAnnotations", "build_gene_embeddings", "build_go_annotations"]

N_COMPARTMENTS = 8
EVIDENCE = np.array(["IDA", "IMP", "IEA", "ISS", "TAS"])
MIN_SET_SIZE, MAX_SET_SIZE = 5, 500


@dataclasses.dataclass
class GoAnnotations:
    """GO-like tables in the layouts of ../shared/data/go (plain TSV, no compression)."""

    annotations: pd.DataFrame  # gene_symbol, go_id, evidence, ontology (direct annotations)
    terms: pd.DataFrame  # go_id, name, ontology
    dag: pd.DataFrame  # child, parent, relation ("is_a")
    gene_sets: dict[str, tuple[str, list[str]]]  # BP go_id -> (name, symbols), propagated

    def term_sets(self) -> dict[str, set[str]]:
        """gene_symbol -> set of directly annotated go_ids."""
        return self.annotations.groupby("gene_symbol")["go_id"].agg(set).to_dict()


class _Terms:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []
        self.edges: list[tuple[str, str, str]] = []

    def add(self, name: str, ontology: str, parent: str | None = None) -> str:
        go_id = f"GO:9{len(self.rows):06d}"
        self.rows.append((go_id, name, ontology))
        if parent is not None:
            self.edges.append((go_id, parent, "is_a"))
        return go_id


def build_go_annotations(cfg: SimulatorConfig, truth: GroundTruth) -> GoAnnotations:
    rng = rng_for(cfg, STREAM_ANNOTATIONS)
    terms = _Terms()
    bp_root = terms.add("biological process (simulated root)", "BP")
    mf_root = terms.add("molecular function (simulated root)", "MF")
    cc_root = terms.add("cellular component (simulated root)", "CC")
    ann: list[tuple[int, str]] = []  # (gene index, go_id)
    for k in range(cfg.n_programs):
        members = np.flatnonzero(truth.program == k)
        process = terms.add(f"program {k + 1} process", "BP", bp_root)
        branches = [terms.add(f"program {k + 1} process, branch {j + 1}", "BP", process)
                    for j in range(int(np.clip(len(members) // 10, 1, 3)))]
        activity = terms.add(f"program {k + 1} regulator activity", "MF", mf_root)
        for g in members:
            if rng.random() < cfg.go_annotation_rate:
                ann.append((g, process))
            if rng.random() < 0.5:
                ann.append((g, branches[rng.integers(len(branches))]))
            if truth.is_regulator[g] and rng.random() < cfg.go_annotation_rate:
                ann.append((g, activity))
    compartments = [terms.add(f"compartment {j + 1}", "CC", cc_root) for j in range(N_COMPARTMENTS)]
    noise = [terms.add(f"unrelated process {j + 1}", "BP", bp_root)
             for j in range(max(5, cfg.n_programs))]
    for g in range(truth.num_genes):
        if rng.random() < 0.7:
            ann.append((g, compartments[rng.integers(N_COMPARTMENTS)]))
        for j in rng.choice(len(noise), min(len(noise), rng.poisson(cfg.go_noise_terms)),
                            replace=False):
            ann.append((g, noise[j]))

    term_df = pd.DataFrame(terms.rows, columns=["go_id", "name", "ontology"])
    ontology = dict(zip(term_df.go_id, term_df.ontology))
    ann_df = pd.DataFrame(
        {"gene_symbol": [truth.gene_symbols[g] for g, _ in ann],
         "go_id": [t for _, t in ann],
         "evidence": EVIDENCE[rng.integers(len(EVIDENCE), size=len(ann))],
         "ontology": [ontology[t] for _, t in ann]})
    ann_df = ann_df.drop_duplicates(["gene_symbol", "go_id"]).sort_values(
        ["gene_symbol", "go_id"], ignore_index=True)
    dag_df = pd.DataFrame(terms.edges, columns=["child", "parent", "relation"])
    return GoAnnotations(ann_df, term_df, dag_df, _gene_sets(ann_df, term_df, dag_df))


def _gene_sets(ann: pd.DataFrame, terms: pd.DataFrame,
               dag: pd.DataFrame) -> dict[str, tuple[str, list[str]]]:
    parent = dict(zip(dag.child, dag.parent))  # every simulated term has at most one parent
    genes: dict[str, set[str]] = {}
    for symbol, go_id in zip(ann.gene_symbol, ann.go_id):
        while go_id is not None:  # propagate up to the root
            genes.setdefault(go_id, set()).add(symbol)
            go_id = parent.get(go_id)
    out = {}
    for go_id, name, ontology in terms.itertuples(index=False):
        members = genes.get(go_id, set())
        if ontology == "BP" and MIN_SET_SIZE <= len(members) <= MAX_SET_SIZE:
            out[go_id] = (name, sorted(members))
    return out


def build_gene_embeddings(cfg: SimulatorConfig, truth: GroundTruth) -> np.ndarray:
    """float32 [G, embedding_dim], rows in gene order (truth.gene_symbols)."""
    rng = rng_for(cfg, STREAM_EMBEDDINGS)
    G, K = truth.num_genes, cfg.n_programs
    membership_GK = np.zeros((G, K), np.float32)
    in_program = np.flatnonzero(truth.program >= 0)
    membership_GK[in_program, truth.program[in_program]] = 1.0
    # Downstream effect of activating each gene (shared graph), summarised per program.
    effect_GG = propagate(np.eye(G, dtype=np.float32), truth.graph(), cfg.n_hops, cfg.hop_decay)
    np.fill_diagonal(effect_GG, 0.0)
    profile_GK = effect_GG @ (membership_GK / np.maximum(membership_GK.sum(0), 1.0))
    features = np.concatenate([membership_GK, profile_GK], axis=1)
    features -= features.mean(0)
    features /= np.maximum(features.std(0), 1e-8)
    signal = features @ rng.normal(0.0, 1.0 / np.sqrt(features.shape[1]),
                                   (features.shape[1], cfg.embedding_dim))
    signal /= max(float(signal.std()), 1e-8)
    noise = rng.normal(0.0, cfg.embedding_noise, signal.shape)
    return (signal + noise).astype(np.float32)
