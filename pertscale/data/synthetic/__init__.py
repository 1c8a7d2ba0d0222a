"""Perturb-seq simulator (DESIGN section 9): negative-binomial counts with library-size
variation, gene programs, a sparse signed regulatory DAG through which single and double
activations / inhibitions propagate (with interactions), several cell types and batches, a
GO-like annotation set and gene embeddings that carry real signal, and the exact ground truth.

    cfg = SimulatorConfig(n_cells=20_000, seed=1)
    data = simulate(cfg)                       # in memory: data.adata, data.truth, data.go ...
    write_dataset(cfg, "sim/")                 # files (see pertscale.data.synthetic.dataset)
    for x_csr, obs in simulate_blocks(cfg, 65536): ...   # bounded memory, any n_cells
"""

from pertscale.data.synthetic.annotations import (
    GoAnnotations,
    build_gene_embeddings,
    build_go_annotations,
)
from pertscale.data.synthetic.cells import (
    CHUNK_CELLS,
    CellDesign,
    build_design,
    program_activity,
    simulate_blocks,
)
from pertscale.data.synthetic.config import SimulatorConfig
from pertscale.data.synthetic.dataset import (
    FILES,
    SimulatedData,
    load_truth,
    simulate,
    write_dataset,
    write_h5ad_blocks,
)
from pertscale.data.synthetic.truth import CONTROL, GroundTruth, build_ground_truth, propagate

__all__ = [
    "CHUNK_CELLS",
    "CONTROL",
    "FILES",
    "CellDesign",
    "GoAnnotations",
    "GroundTruth",
    "SimulatedData",
    "SimulatorConfig",
    "build_design",
    "build_gene_embeddings",
    "build_go_annotations",
    "build_ground_truth",
    "load_truth",
    "program_activity",
    "propagate",
    "simulate",
    "simulate_blocks",
    "write_dataset",
    "write_h5ad_blocks",
]
