"""The simulated biology and its ground truth: genes, programs, the signed regulatory DAG,
cell types, batches, the perturbation design and the exact log-fold change of every
perturbation in every cell type.

Generative model (natural log throughout; G genes, K programs, T cell types, C conditions):
- every program gene g has one program k(g) and a loading w_g; background genes have none;
- the regulatory graph is a DAG over genes ordered by (program, index): program k has a target
  module of `module_size` genes drawn from itself and `n_target_programs` later programs, with
  fixed signs (program-level, a few flipped); each regulator of k targets ~`out_degree` genes
  of that module, so genes of one program act alike when perturbed;
- cell type t has its own baseline log-proportions (program shifts + gene noise) and keeps a
  random subset of the edges with its own gains (partly different responses);
- a perturbation sets an on-target log-fold (+activation_lfc / -inhibition_lfc) that spreads
  for `n_hops` hops through the graph, decaying by `hop_decay` per hop beyond the first; a
  double adds both, and an interacting pair rescales (synergy / suppression) or adds a new
  program effect (neomorphic); every perturbation also gets a generic response on program 0;
  effects saturate smoothly at +-max_lfc. With `response = "programs"` the downstream effects
  are shifts of program activities instead (`_program_shifts`), the same in every cell type:
  the cells move along the programs' axes of co-variation, which their controls show, and the
  responses differ between types only where counts compress them (a low baseline in log1p).

`lfc[c, t]` is exact for the expected counts: cells of condition c and type t have expected
counts `ctrl_mean[t] * exp(lfc[c, t])` (batch, library size and program activity are
multiplicative and shared with the controls).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertscale.data.synthetic.config import SimulatorConfig

__all__ = ["CONTROL", "GroundTruth", "build_ground_truth", "propagate", "rng_for"]

CONTROL = "ctrl"
INTERACTIONS = ("synergy", "suppression", "neomorphic")
# Independent random streams: changing the embedding size never changes the counts.
STREAM_WORLD, STREAM_DESIGN, STREAM_CELLS, STREAM_ANNOTATIONS, STREAM_EMBEDDINGS = range(5)


def rng_for(cfg: SimulatorConfig, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, stream, *extra]))


@dataclasses.dataclass
class GroundTruth:
    """Everything the simulator knows; arrays are indexed by gene / cell type / condition."""

    gene_ids: np.ndarray  # str [G] "ENSGSIM00000001"...
    gene_symbols: np.ndarray  # str [G] "G0001"...
    program: np.ndarray  # int32 [G] program of each gene, -1 for background genes
    loading: np.ndarray  # float32 [G] program loading (0 for background genes)
    is_regulator: np.ndarray  # bool [G] gene has outgoing edges in the design
    edge_src: np.ndarray  # int32 [E] regulator gene index
    edge_dst: np.ndarray  # int32 [E] target gene index
    edge_weight: np.ndarray  # float32 [E] signed weight shared by all cell types
    edge_weight_by_type: np.ndarray  # float32 [T, E] per cell type (0 = inactive there)
    base_log: np.ndarray  # float32 [T, G] control log-proportions per cell type
    dispersion: np.ndarray  # float32 [G] NB dispersion (var = mu + disp * mu^2)
    batch_shift: np.ndarray  # float32 [B, G] gene-wise batch log-shift
    batch_library_factor: np.ndarray  # float32 [B] library-size factor of each batch
    cell_types: list[str]  # [T]
    batches: list[str]  # [B]
    conditions: list[str]  # [C] perturbation names: "ctrl", "G0012", "G0012+G0450"
    condition_genes: list[tuple[int, ...]]  # [C] perturbed gene indices
    condition_sign: np.ndarray  # int8 [C] +1 activation, -1 inhibition, 0 control
    interaction: list[str]  # [C] "none" (ctrl/single), "additive", or an interaction kind
    lfc: np.ndarray  # float32 [C, T, G] exact log-fold change of expected counts vs control
    ctrl_mean: np.ndarray  # float32 [T, G] expected counts of a control cell (over batches)

    @property
    def num_genes(self) -> int:
        return len(self.gene_symbols)

    def condition_index(self, name: str) -> int:
        try:
            return self.conditions.index(name)
        except ValueError:
            raise ValueError(f"unknown perturbation {name!r}; e.g. {self.conditions[:5]}") from None

    def mean(self, condition: str, cell_type: str) -> np.ndarray:
        """Expected counts per cell [G] of `condition` in `cell_type`."""
        if cell_type not in self.cell_types:
            raise ValueError(f"unknown cell type {cell_type!r}; one of {self.cell_types}")
        t = self.cell_types.index(cell_type)
        return self.ctrl_mean[t] * np.exp(self.lfc[self.condition_index(condition), t])

    def gears_condition(self, c: int) -> str:
        """GEARS naming: "ctrl", "G0012+ctrl", "G0012+G0450"."""
        genes = [self.gene_symbols[g] for g in self.condition_genes[c]]
        return CONTROL if not genes else "+".join(genes + [CONTROL] * (2 - len(genes)))

    def var(self) -> pd.DataFrame:
        """The var table: Ensembl-style index, gene_symbol, program and regulator flag."""
        program = np.array([f"P{k + 1:02d}" if k >= 0 else "none" for k in self.program])
        return pd.DataFrame(
            {"gene_symbol": self.gene_symbols, "program": pd.Categorical(program),
             "is_regulator": self.is_regulator},
            index=pd.Index(self.gene_ids, name="gene_id"))

    def graph(self) -> sp.csr_matrix:
        """Signed adjacency [G, G] (row = regulator, column = target)."""
        return _adjacency(self.edge_src, self.edge_dst, self.edge_weight, self.num_genes)


def _adjacency(src: np.ndarray, dst: np.ndarray, weight: np.ndarray, n: int) -> sp.csr_matrix:
    return sp.csr_matrix((weight.astype(np.float32), (src, dst)), shape=(n, n))


def propagate(d0_CG: np.ndarray, adj_GG: sp.csr_matrix, n_hops: int, decay: float) -> np.ndarray:
    """Direct effects d0 [C, G] plus their spread through the DAG: d0 + sum_h decay^(h-1) d0 A^h."""
    total_CG = d0_CG.astype(np.float32, copy=True)
    hop_CG = total_CG
    adj_t = adj_GG.T.tocsr()
    for h in range(n_hops):
        hop_CG = np.asarray((adj_t @ hop_CG.T).T)
        total_CG += np.float32(decay**h) * hop_CG
    return total_CG


def _programs(cfg: SimulatorConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    G, K = cfg.n_genes, cfg.n_programs
    members = rng.permutation(G)[: cfg.num_program_genes]
    # NOTE: the first K members seed one gene per program, so no program is empty.
    assign = np.concatenate([np.arange(K), rng.integers(K, size=len(members) - K)])
    program = np.full(G, -1, dtype=np.int32)
    program[members] = assign
    loading = np.where(program >= 0, rng.uniform(0.5, 1.5, G), 0.0).astype(np.float32)
    return program, loading


def _edges(cfg: SimulatorConfig, program: np.ndarray, regulators: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each program has one target module (`module_size` genes from its own and its target
    programs, with fixed signs); each of its regulators picks `out_degree` targets from it, so
    regulators of one program share targets and act alike."""
    K = cfg.n_programs
    members = [np.flatnonzero(program == k) for k in range(K)]
    src, dst, weight = [], [], []
    for k in range(K):
        later = np.arange(k + 1, K)
        targets = rng.choice(later, min(cfg.n_target_programs, len(later)), replace=False)
        pool = np.concatenate([members[k]] + [members[j] for j in targets])
        pool_sign = np.concatenate([np.full(len(members[j]), rng.choice([-1.0, 1.0]))
                                    for j in [k, *targets]])
        pick = rng.choice(len(pool), min(cfg.module_size, len(pool)), replace=False)
        flip = np.where(rng.random(len(pick)) < cfg.sign_flip_fraction, -1.0, 1.0)
        module, module_sign = pool[pick], pool_sign[pick] * flip
        for g in regulators[program[regulators] == k]:
            # within a program the DAG follows gene index; later programs are always downstream
            ok = (program[module] != k) | (module > g)
            cand, cand_sign = module[ok], module_sign[ok]
            if len(cand) == 0:
                continue
            d = min(len(cand), 1 + rng.poisson(cfg.out_degree - 1))
            pick = rng.choice(len(cand), d, replace=False)
            src.append(np.full(d, g))
            dst.append(cand[pick])
            weight.append(cand_sign[pick] * cfg.edge_weight * rng.uniform(0.5, 1.5, d))
    if not src:
        return (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))
    return (np.concatenate(src).astype(np.int32), np.concatenate(dst).astype(np.int32),
            np.concatenate(weight).astype(np.float32))


def _design(cfg: SimulatorConfig, regulators: np.ndarray, rng: np.random.Generator):
    """Perturbed genes, their signs and the same-sign pairs of the doubles."""
    genes = np.sort(rng.choice(regulators, cfg.n_single_perturbations, replace=False))
    sign = np.full(len(genes), -1, dtype=np.int8)
    sign[rng.permutation(len(genes))[: cfg.num_activated]] = 1
    pairs = []
    for s in (1, -1):
        idx = np.flatnonzero(sign == s)
        i, j = np.triu_indices(len(idx), k=1)
        pairs.append(np.stack([idx[i], idx[j]], axis=1))
    pairs = np.concatenate(pairs)
    chosen = pairs[np.sort(rng.choice(len(pairs), cfg.n_double_perturbations, replace=False))]
    cond_genes = [()] + [(int(g),) for g in genes] + [(int(genes[a]), int(genes[b]))
                                                       for a, b in chosen]
    cond_sign = np.concatenate([[0], sign, sign[chosen[:, 0]]]).astype(np.int8)
    return cond_genes, cond_sign


def _program_shifts(cfg: SimulatorConfig, cond_genes, cond_sign, program: np.ndarray,
                    graph: sp.csr_matrix) -> np.ndarray:
    """[C, K] program-activity shifts of `response = "programs"`: a perturbed gene moves its own
    program by sign x program_shift and each other program its edges reach by sign x (the sign
    of its summed edge weight there) x hop_decay x program_shift; a double adds its genes'."""
    shift_CK = np.zeros((len(cond_genes), cfg.n_programs), np.float32)
    for c, genes in enumerate(cond_genes):
        for g in genes:
            row = graph.getrow(g)
            reach = np.zeros(cfg.n_programs)
            np.add.at(reach, program[row.indices], row.data)
            step = np.sign(reach) * cfg.hop_decay
            step[program[g]] = 1.0
            shift_CK[c] += cond_sign[c] * cfg.program_shift * step
    return shift_CK


def _effects(cfg: SimulatorConfig, cond_genes, cond_sign, program, loading, adj_by_type,
             graph: sp.csr_matrix, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    C, G, T = len(cond_genes), cfg.n_genes, cfg.n_cell_types
    d0_CG = np.zeros((C, G), np.float32)
    for c, genes in enumerate(cond_genes):
        for g in genes:
            d0_CG[c, g] = cfg.activation_lfc if cond_sign[c] > 0 else -cfg.inhibition_lfc
    interaction = ["none"] * (1 + cfg.n_single_perturbations) + [
        str(rng.choice(INTERACTIONS)) if rng.random() < cfg.interaction_fraction else "additive"
        for _ in range(cfg.n_double_perturbations)]
    scale = np.ones(C, np.float32)
    extra_CG = np.zeros((C, G), np.float32)
    for c, kind in enumerate(interaction):
        if kind == "synergy":
            scale[c] = rng.uniform(1.5, 2.0)
        elif kind == "suppression":
            scale[c] = rng.uniform(0.2, 0.5)
        elif kind == "neomorphic":
            k = rng.integers(cfg.n_programs)
            extra_CG[c] = cond_sign[c] * rng.uniform(0.5, 1.0) * loading * (program == k)
    extra_CG[1:] += cfg.common_response * loading * (program == 0)
    lfc = np.zeros((C, T, G), np.float32)
    if cfg.response == "programs":
        shift_CK = _program_shifts(cfg, cond_genes, cond_sign, program, graph)
        downstream_CG = np.where(program >= 0, shift_CK[:, np.maximum(program, 0)], 0.0) * loading
    for t in range(T):
        if cfg.response == "graph":
            downstream_CG = propagate(d0_CG, adj_by_type[t], cfg.n_hops, cfg.hop_decay) - d0_CG
        total_CG = d0_CG + scale[:, None] * downstream_CG + extra_CG
        lfc[:, t] = cfg.max_lfc * np.tanh(total_CG / cfg.max_lfc)
    lfc[0] = 0.0
    return lfc, interaction


def build_ground_truth(cfg: SimulatorConfig) -> GroundTruth:
    """Draw the simulated biology for `cfg` (deterministic in cfg.seed)."""
    rng = rng_for(cfg, STREAM_WORLD)
    G, T, B = cfg.n_genes, cfg.n_cell_types, cfg.n_batches
    width = max(4, len(str(G)))
    symbols = np.array([f"G{i + 1:0{width}d}" for i in range(G)])
    gene_ids = np.array([f"ENSGSIM{i + 1:08d}" for i in range(G)])
    program, loading = _programs(cfg, rng)
    regulators = np.sort(rng.choice(np.flatnonzero(program >= 0), cfg.num_regulators,
                                    replace=False))
    src, dst, weight = _edges(cfg, program, regulators, rng)
    keep_TE = rng.random((T, len(src))) >= cfg.cell_type_edge_dropout
    gain_TE = np.exp(rng.normal(0.0, 0.2, (T, len(src))))
    weight_TE = (weight[None] * keep_TE * gain_TE).astype(np.float32)
    adj_by_type = [_adjacency(src, dst, weight_TE[t], G) for t in range(T)]

    shift_TK = rng.normal(0.0, cfg.cell_type_shift_sd, (T, cfg.n_programs))
    base_TG = (rng.normal(0.0, cfg.expression_sd, G)[None]
               + np.where(program >= 0, shift_TK[:, program] * loading, 0.0)
               + rng.normal(0.0, cfg.cell_type_gene_sd, (T, G)))
    base_TG -= np.logaddexp.reduce(base_TG, axis=1, keepdims=True)  # log-proportions
    dispersion = (cfg.dispersion_median * np.exp(rng.normal(0.0, 0.5, G))).astype(np.float32)
    batch_shift = rng.normal(0.0, cfg.batch_effect_sd, (B, G)).astype(np.float32)
    batch_lib = np.exp(rng.normal(0.0, 2 * cfg.batch_effect_sd, B)).astype(np.float32)

    cond_genes, cond_sign = _design(cfg, regulators, rng)
    lfc, interaction = _effects(cfg, cond_genes, cond_sign, program, loading, adj_by_type,
                                _adjacency(src, dst, weight, G), rng)
    names = [CONTROL] + ["+".join(symbols[list(g)]) for g in cond_genes[1:]]

    # Expected control counts: E[library] * proportion * E[exp(program activity)] * batch mean.
    mean_library = cfg.library_size_median * np.exp(cfg.library_size_sd**2 / 2)
    activity = np.exp(0.5 * (loading * cfg.program_activity_sd) ** 2)
    batch_mean = (batch_lib[:, None] * np.exp(batch_shift)).mean(axis=0)
    ctrl_mean = mean_library * np.exp(base_TG) * activity * batch_mean
    is_regulator = np.zeros(G, bool)
    is_regulator[np.unique(src)] = True
    return GroundTruth(
        gene_ids=gene_ids, gene_symbols=symbols, program=program, loading=loading,
        is_regulator=is_regulator, edge_src=src, edge_dst=dst, edge_weight=weight,
        edge_weight_by_type=weight_TE, base_log=base_TG.astype(np.float32),
        dispersion=dispersion, batch_shift=batch_shift, batch_library_factor=batch_lib,
        cell_types=[f"cell_type_{t + 1}" for t in range(T)],
        batches=[f"batch_{b + 1}" for b in range(B)],
        conditions=names, condition_genes=cond_genes, condition_sign=cond_sign,
        interaction=interaction, lfc=lfc, ctrl_mean=ctrl_mean.astype(np.float32))
