"""`SimulatorConfig`: every knob of the Perturb-seq simulator (the `simulate` job's config).

Sizes are chosen so the defaults simulate in a few seconds (1,000 genes, 20,000 cells) and
the quickstart pipeline can train on them; `n_cells` can grow to millions (cells are drawn
block by block in bounded memory). Counts derived from the config (program genes, regulators,
activations) are deterministic, so every impossible combination is rejected here, before any
random draw.
"""

from __future__ import annotations

import dataclasses
import math

from pertscale.config import Config, ConfigError, check_choice, check_range

__all__ = ["RESPONSES", "SimulatorConfig"]

RESPONSES = ("graph", "programs")


@dataclasses.dataclass
class SimulatorConfig(Config):
    """Sizes, biology and noise of a simulated Perturb-seq screen (= configs/simulate.toml)."""

    # --- sizes ---
    n_genes: int = 1000  # genes measured (var rows)
    n_cells: int = 20000  # cells in total, controls included
    n_cell_types: int = 3  # cell types with their own baseline and partly different responses
    n_batches: int = 2  # technical batches (gene-wise and library-size shifts)
    n_programs: int = 20  # co-regulated gene programs
    n_single_perturbations: int = 100  # distinct single-gene perturbations
    n_double_perturbations: int = 50  # two-gene perturbations, built from the perturbed singles
    control_fraction: float = 0.1  # fraction of cells that are non-targeting controls ("ctrl")
    # --- gene programs and the regulatory graph ---
    program_gene_fraction: float = 0.7  # fraction of genes in a program (rest: background)
    regulator_fraction: float = 0.3  # fraction of program genes with outgoing regulatory edges
    out_degree: float = 6.0  # mean number of targets of a regulator
    module_size: int = 12  # target module shared by the regulators of one program
    n_target_programs: int = 2  # downstream programs each program regulates (plus itself)
    edge_weight: float = 0.6  # mean |weight| of a regulatory edge (log-fold per log-fold)
    sign_flip_fraction: float = 0.1  # edges whose sign disagrees with their program-level sign
    n_hops: int = 3  # propagation depth through the DAG
    hop_decay: float = 0.6  # factor applied per hop beyond the first
    max_lfc: float = 4.0  # effects saturate smoothly at +-max_lfc (natural log)
    cell_type_edge_dropout: float = 0.2  # per cell type, fraction of edges that are inactive
    # --- perturbations ---
    activation_fraction: float = 0.5  # perturbed genes that are activated (rest: inhibited)
    activation_lfc: float = 2.0  # on-target log-fold change of an activation (CRISPRa)
    inhibition_lfc: float = 2.5  # on-target log-fold decrease of an inhibition (CRISPRi knockdown)
    interaction_fraction: float = 0.3  # doubles with a non-additive interaction term
    common_response: float = 0.3  # perturbation-generic (stress) response on program 0
    response: str = "graph"  # graph: effects spread through the regulatory graph, partly
                             # different per cell type (edge dropout); programs: a perturbation
                             # shifts program activities (its own program by +-program_shift, the
                             # programs its edges reach by sign x hop_decay x program_shift): the
                             # cells move along the axes of co-variation their controls show, by
                             # the same log-fold changes in every cell type
    program_shift: float = 3.0  # activity shift of a perturbed gene's program (response=programs)
    # --- expression and counts ---
    library_size_median: float = 1000.0  # median UMIs per cell
    library_size_sd: float = 0.4  # sd of log library size (lognormal)
    expression_sd: float = 2.0  # sd of gene baseline log-expression
    dispersion_median: float = 0.3  # median negative-binomial dispersion (var = mu + disp * mu^2)
    program_activity_sd: float = 0.4  # sd of per-cell program activities (co-expression)
    cell_type_shift_sd: float = 0.8  # sd of cell-type program shifts in the baseline
    cell_type_gene_sd: float = 0.2  # sd of cell-type gene-wise shifts in the baseline
    batch_effect_sd: float = 0.1  # sd of gene-wise batch shifts (natural log)
    # --- annotations and embeddings ---
    go_annotation_rate: float = 0.8  # probability a program gene is annotated to its program's term
    go_noise_terms: float = 1.0  # mean number of program-unrelated terms annotated per gene
    embedding_dim: int = 64  # gene-embedding width
    embedding_noise: float = 0.5  # noise sd relative to the unit-variance signal in embeddings
    seed: int = 0  # one seed determines every random draw

    def __post_init__(self) -> None:
        check_range("n_genes", self.n_genes, 20)
        check_range("n_cells", self.n_cells, 1)
        check_range("n_cell_types", self.n_cell_types, 1, 1000)
        check_range("n_batches", self.n_batches, 1, 1000)
        check_range("n_programs", self.n_programs, 1)
        check_range("n_single_perturbations", self.n_single_perturbations, 1)
        check_range("n_double_perturbations", self.n_double_perturbations, 0)
        check_range("control_fraction", self.control_fraction, 0, 1, lo_open=True, hi_open=True)
        check_range("program_gene_fraction", self.program_gene_fraction, 0, 1, lo_open=True)
        check_range("regulator_fraction", self.regulator_fraction, 0, 1, lo_open=True)
        check_range("out_degree", self.out_degree, 1)
        check_range("module_size", self.module_size, 1)
        check_range("n_target_programs", self.n_target_programs, 0)
        check_range("edge_weight", self.edge_weight, 0)
        check_range("sign_flip_fraction", self.sign_flip_fraction, 0, 1)
        check_range("n_hops", self.n_hops, 0, 20)
        check_range("hop_decay", self.hop_decay, 0, 1)
        check_range("max_lfc", self.max_lfc, 0, lo_open=True)
        check_range("cell_type_edge_dropout", self.cell_type_edge_dropout, 0, 1, hi_open=True)
        check_range("activation_fraction", self.activation_fraction, 0, 1)
        check_range("activation_lfc", self.activation_lfc, 0)
        check_range("inhibition_lfc", self.inhibition_lfc, 0)
        check_range("interaction_fraction", self.interaction_fraction, 0, 1)
        check_range("common_response", self.common_response, 0)
        check_choice("response", self.response, RESPONSES)
        check_range("program_shift", self.program_shift, 0)
        check_range("library_size_median", self.library_size_median, 0, lo_open=True)
        check_range("library_size_sd", self.library_size_sd, 0, 3)
        check_range("expression_sd", self.expression_sd, 0, 5)
        check_range("dispersion_median", self.dispersion_median, 0, 100, lo_open=True)
        check_range("program_activity_sd", self.program_activity_sd, 0, 3)
        check_range("cell_type_shift_sd", self.cell_type_shift_sd, 0, 5)
        check_range("cell_type_gene_sd", self.cell_type_gene_sd, 0, 5)
        check_range("batch_effect_sd", self.batch_effect_sd, 0, 3)
        check_range("go_annotation_rate", self.go_annotation_rate, 0, 1)
        check_range("go_noise_terms", self.go_noise_terms, 0, 100)
        check_range("embedding_dim", self.embedding_dim, 1)
        check_range("embedding_noise", self.embedding_noise, 0)
        check_range("seed", self.seed, 0, 2**63 - 1)
        self._check_counts()

    # --- derived counts (deterministic, shared with the simulator) ---
    @property
    def num_program_genes(self) -> int:
        return max(self.n_programs, round(self.n_genes * self.program_gene_fraction))

    @property
    def num_regulators(self) -> int:
        return max(1, round(self.num_program_genes * self.regulator_fraction))

    @property
    def num_activated(self) -> int:
        """Perturbed genes that are activated; the remaining singles are inhibited."""
        return round(self.n_single_perturbations * self.activation_fraction)

    @property
    def num_conditions(self) -> int:
        """Control + singles + doubles."""
        return 1 + self.n_single_perturbations + self.n_double_perturbations

    @property
    def num_control_cells(self) -> int:
        return max(1, round(self.n_cells * self.control_fraction))

    def _check_counts(self) -> None:
        if self.num_program_genes > self.n_genes:
            raise ConfigError(
                f"n_programs={self.n_programs} needs at least one gene per program, "
                f"but n_genes={self.n_genes}")
        if self.n_single_perturbations > self.num_regulators:
            raise ConfigError(
                f"n_single_perturbations={self.n_single_perturbations} exceeds the "
                f"{self.num_regulators} regulator genes (n_genes * program_gene_fraction * "
                f"regulator_fraction); raise n_genes or regulator_fraction")
        n_act = self.num_activated
        n_inh = self.n_single_perturbations - n_act
        max_doubles = math.comb(n_act, 2) + math.comb(n_inh, 2)
        if self.n_double_perturbations > max_doubles:
            raise ConfigError(
                f"n_double_perturbations={self.n_double_perturbations} exceeds the {max_doubles} "
                f"same-sign pairs of the {self.n_single_perturbations} single perturbations")
        n_perturbed_cells = self.n_cells - self.num_control_cells
        n_perturbations = self.n_single_perturbations + self.n_double_perturbations
        if n_perturbed_cells < n_perturbations:
            raise ConfigError(
                f"n_cells={self.n_cells} leaves {n_perturbed_cells} perturbed cells for "
                f"{n_perturbations} perturbations; every perturbation needs at least one cell")
