"""Data: block sampler and distributed, resumable cell loader and its batch mixing, tokenizer,
perturbation datasets and splits, gene-embedding tables, pathway selection, and the Perturb-seq
simulator."""

from pertscale.data.embeddings import GeneEmbeddings, load_embeddings
from pertscale.data.loader import CellLoader, LoaderConfig, build_loader
from pertscale.data.mixing import batch_mixing, expected_distinct
from pertscale.data.pathways import PathwaySelection, PathwaySelectionConfig, select_pathways
from pertscale.data.perturbation import (
    Perturbation,
    PerturbationConfig,
    PerturbationData,
    load_perturbation_data,
    parse_perturbation,
)
from pertscale.data.sampler import REMAINDER_POLICIES, BlockSampler, BufferPlan
from pertscale.data.splits import Split, SplitConfig, build_split
from pertscale.data.synthetic import (
    GroundTruth,
    SimulatedData,
    SimulatorConfig,
    load_truth,
    simulate,
    simulate_blocks,
    write_dataset,
)
from pertscale.data.tokenizer import Tokenizer, TokenizerConfig

__all__ = [
    "REMAINDER_POLICIES",
    "BlockSampler",
    "BufferPlan",
    "CellLoader",
    "GeneEmbeddings",
    "GroundTruth",
    "LoaderConfig",
    "PathwaySelection",
    "PathwaySelectionConfig",
    "Perturbation",
    "PerturbationConfig",
    "PerturbationData",
    "SimulatedData",
    "SimulatorConfig",
    "Split",
    "SplitConfig",
    "Tokenizer",
    "TokenizerConfig",
    "batch_mixing",
    "build_loader",
    "build_split",
    "expected_distinct",
    "load_embeddings",
    "load_perturbation_data",
    "load_truth",
    "parse_perturbation",
    "select_pathways",
    "simulate",
    "simulate_blocks",
    "write_dataset",
]
