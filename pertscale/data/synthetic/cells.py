"""Cells: which condition, cell type and batch each cell has, and its negative-binomial counts,
drawn block by block in bounded memory.

Cells are drawn in fixed chunks of `CHUNK_CELLS`, each from its own seeded stream, so the
data do not depend on the block size a caller asks for, and a block costs
O(block_size x n_genes) memory whatever `n_cells` is. The cell order is a random permutation
of the design: any block mixes conditions, cell types and batches (a pre-shuffled store).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertscale.data.synthetic.config import SimulatorConfig
from pertscale.data.synthetic.truth import (
    STREAM_CELLS,
    STREAM_DESIGN,
    GroundTruth,
    build_ground_truth,
    rng_for,
)

__all__ = ["CHUNK_CELLS", "CellDesign", "build_design", "program_activity", "sample_counts",
           "simulate_blocks"]

CHUNK_CELLS = 4096


@dataclasses.dataclass
class CellDesign:
    """Per-cell labels, in cell order (int codes into the GroundTruth name lists)."""

    condition: np.ndarray  # int32 [n_cells] index into truth.conditions
    cell_type: np.ndarray  # int16 [n_cells] index into truth.cell_types
    batch: np.ndarray  # int16 [n_cells] index into truth.batches

    @property
    def num_cells(self) -> int:
        return len(self.condition)


def build_design(cfg: SimulatorConfig, truth: GroundTruth) -> CellDesign:
    """Controls first, the rest split evenly over perturbations; then shuffled."""
    rng = rng_for(cfg, STREAM_DESIGN)
    n_pert = len(truth.conditions) - 1
    n_ctrl = cfg.num_control_cells
    per_pert = np.full(n_pert, (cfg.n_cells - n_ctrl) // n_pert)
    per_pert[rng.choice(n_pert, (cfg.n_cells - n_ctrl) % n_pert, replace=False)] += 1
    counts = np.concatenate([[n_ctrl], per_pert])
    condition = np.repeat(np.arange(n_pert + 1, dtype=np.int32), counts)
    condition = condition[rng.permutation(cfg.n_cells)]
    cell_type = rng.integers(cfg.n_cell_types, size=cfg.n_cells, dtype=np.int16)
    batch = rng.integers(cfg.n_batches, size=cfg.n_cells, dtype=np.int16)
    return CellDesign(condition=condition, cell_type=cell_type, batch=batch)


def _chunk_start(cfg: SimulatorConfig, design: CellDesign, chunk: int):
    """(rng after the chunk's per-cell draws, cell rows, library noise [n], program activity
    [n, K]): the first draws of a chunk's stream, shared by sample_counts and program_activity."""
    rng = rng_for(cfg, STREAM_CELLS, chunk)
    rows = slice(chunk * CHUNK_CELLS, min(design.num_cells, (chunk + 1) * CHUNK_CELLS))
    n = len(design.condition[rows])
    library_noise_N = rng.normal(0.0, cfg.library_size_sd, n).astype(np.float32)
    activity_NK = rng.normal(0.0, cfg.program_activity_sd, (n, cfg.n_programs)).astype(np.float32)
    return rng, rows, library_noise_N, activity_NK


def program_activity(cfg: SimulatorConfig, design: CellDesign) -> np.ndarray:
    """float32 [n_cells, n_programs]: each cell's latent program activities (the per-cell
    co-expression signal of each gene program), in cell order: the ground truth that a model's
    pathway activities can be compared with."""
    n_chunks = -(-design.num_cells // CHUNK_CELLS)
    return np.concatenate([_chunk_start(cfg, design, c)[3] for c in range(n_chunks)]
                          or [np.zeros((0, cfg.n_programs), np.float32)])


def sample_counts(cfg: SimulatorConfig, truth: GroundTruth, design: CellDesign,
                  chunk: int) -> sp.csr_matrix:
    """Raw counts (float32 CSR [cells, genes]) of the cells in chunk number `chunk`."""
    rng, rows, library_noise_N, activity_NK = _chunk_start(cfg, design, chunk)
    cond, ct, b = design.condition[rows], design.cell_type[rows], design.batch[rows]
    n = len(cond)
    log_library_N = (np.log(cfg.library_size_median) + library_noise_N
                     + np.log(truth.batch_library_factor[b]))
    in_program = truth.program >= 0
    # background genes have loading 0, so any program index works for them
    log_mu_NG = (truth.base_log[ct] + truth.batch_shift[b] + truth.lfc[cond, ct]
                 + activity_NK[:, np.where(in_program, truth.program, 0)] * truth.loading
                 + log_library_N[:, None])
    # Gamma-Poisson mixture = NB(mean mu, dispersion d): lambda ~ Gamma(1/d, scale=mu*d).
    disp_G = truth.dispersion
    lam_NG = rng.standard_gamma(np.broadcast_to(1.0 / disp_G, (n, len(disp_G))),
                                dtype=np.float32)
    lam_NG *= np.exp(log_mu_NG, out=log_mu_NG) * disp_G
    counts_NG = rng.poisson(lam_NG)
    return sp.csr_matrix(counts_NG, dtype=np.float32)


def _obs(truth: GroundTruth, design: CellDesign, start: int, x: sp.csr_matrix) -> pd.DataFrame:
    stop = start + x.shape[0]
    cond = design.condition[start:stop]
    width = len(str(max(design.num_cells - 1, 0)))
    kinds = np.array(["control", "activation", "inhibition"])
    gears = [truth.gears_condition(c) for c in range(len(truth.conditions))]
    sign = truth.condition_sign[cond]

    def cat(codes, categories):
        return pd.Categorical.from_codes(codes, categories=categories)

    return pd.DataFrame(
        {"perturbation": cat(cond, truth.conditions),
         "condition": cat(cond, gears),
         "perturbation_type": cat(np.where(sign == 0, 0, np.where(sign > 0, 1, 2)), kinds),
         "sign": sign,
         "cell_type": cat(design.cell_type[start:stop], truth.cell_types),
         "batch": cat(design.batch[start:stop], truth.batches),
         "n_counts": np.asarray(x.sum(axis=1)).ravel().astype(np.float32),
         "n_genes": np.diff(x.indptr).astype(np.int32)},
        index=pd.Index([f"cell_{i:0{width}d}" for i in range(start, stop)], name="cell_id"))


def simulate_blocks(cfg: SimulatorConfig, block_size: int = CHUNK_CELLS, *,
                    truth: GroundTruth | None = None, design: CellDesign | None = None,
                    num_threads: int = 1) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
    """Yield (raw counts float32 CSR [block, genes], obs) blocks covering all cells in order.

    The concatenated blocks are identical for every block_size and num_threads; obs
    categoricals carry the full category lists in every block, so blocks can be appended to
    one store. `num_threads` chunks are drawn concurrently (numpy's samplers release the GIL);
    memory grows with it, never with n_cells.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive integer")
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r} must be a positive integer")
    truth = build_ground_truth(cfg) if truth is None else truth
    design = build_design(cfg, truth) if design is None else design
    pending: list[sp.csr_matrix] = []
    n_pending = start = 0
    n_chunks = -(-design.num_cells // CHUNK_CELLS)
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        in_flight: deque[Future] = deque()
        for chunk in range(n_chunks):
            while len(in_flight) < num_threads and chunk + len(in_flight) < n_chunks:
                in_flight.append(pool.submit(sample_counts, cfg, truth, design,
                                             chunk + len(in_flight)))
            pending.append(in_flight.popleft().result())
            n_pending += pending[-1].shape[0]
            last = chunk == n_chunks - 1
            while n_pending >= block_size or (last and n_pending > 0):
                x = pending[0] if len(pending) == 1 else sp.vstack(pending, format="csr")
                take = min(block_size, n_pending)
                block = x[:take]
                block.sort_indices()
                yield block, _obs(truth, design, start, block)
                start += take
                rest = x[take:]
                pending, n_pending = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
