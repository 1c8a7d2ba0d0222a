"""Expression inputs from CSR cell batches: a cell's expressed genes with their continuous values
(packed), and the whole cell as a reconstruction target. The inputs of the pathway VAE.

Per cell (vectorised over the batch):
1. the nonzero genes, with values log1p(x / total x target_sum) for a store of raw counts (total
   over the cell's genes) or as stored for a normalised store;
2. if more than max_seq_len - 1 genes are expressed, max_seq_len - 1 of them drawn uniformly
   (gene order kept), from one torch.Generator (the same state gives the same inputs: exact
   resume);
3. <cls> first (value 1): every sequence has a token, even a cell with no counts;
4. the reconstruction target over all G genes: raw counts (negative binomial decoder) or the
   log1p-normalised values (Gaussian decoder), the cell's library size, and for a collection
   whose members measure different genes, which genes the cell's member measures.

Legend: B cells, N nonzeros of the batch, T packed tokens, G genes, S member stores.
"""

from __future__ import annotations

import numpy as np
import torch

from pertscale.constants import (
    CELL_INDEX,
    CLS_ID,
    CU_SEQLENS,
    EXPRESSION,
    GENE_IDS,
    GENE_MEASURED,
    INDICES,
    INDPTR,
    LIBRARY_SIZE,
    MAX_SEQLEN,
    SPECIAL_TOKENS,
    VALUES,
    X_RECON,
)

__all__ = ["ExpressionInputs", "measured_genes"]

N_SPECIAL = len(SPECIAL_TOKENS)


def measured_genes(store) -> tuple[np.ndarray, np.ndarray] | None:
    """(cell offsets [S+1], measured bool [S, G]) of a collection whose members measure
    different genes; None for a single store or members that all measure every gene."""
    maps = getattr(store, "gene_maps", None)
    if maps is None:
        return None
    measured_SG = np.zeros((len(maps), store.n_genes), dtype=bool)
    for s, genes in enumerate(maps):
        measured_SG[s, genes] = True
    if measured_SG.all():
        return None
    return np.asarray(store.cell_offsets, dtype=np.int64), measured_SG


class ExpressionInputs:
    """callable(loader batch, generator) -> the input dict of the module docstring."""

    def __init__(self, n_genes: int, *, raw_counts: bool, target: str, max_seq_len: int,
                 target_sum: float = 1e4,
                 measured: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        if target not in ("counts", "log1p"):
            raise ValueError(f"target={target!r} is not one of ['counts', 'log1p']")
        if target == "counts" and not raw_counts:
            raise ValueError("a raw-count (negative binomial) target needs a store of raw "
                             "counts; this store holds normalised values")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len} must be >= 2 (<cls> and one gene)")
        self.n_genes = n_genes
        self.raw_counts = raw_counts
        self.target = target
        self.max_seq_len = max_seq_len
        self.target_sum = float(target_sum)
        self.measured = measured

    def _normalised(self, indptr: np.ndarray, values: np.ndarray, totals_B: np.ndarray
                    ) -> np.ndarray:
        if not self.raw_counts:
            return values.astype(np.float32, copy=False)
        per_nnz = np.repeat(self.target_sum / np.maximum(totals_B, 1e-12), np.diff(indptr))
        return np.log1p(values * per_nnz).astype(np.float32)

    def _sampled(self, rows_N: np.ndarray, indptr: np.ndarray, generator: torch.Generator
                 ) -> np.ndarray:
        """bool [N]: the nonzeros kept, at most max_seq_len - 1 per cell, uniformly drawn."""
        limit = self.max_seq_len - 1
        if not len(rows_N) or np.diff(indptr).max() <= limit:
            return np.ones(len(rows_N), dtype=bool)
        keys = torch.rand(len(rows_N), generator=generator, dtype=torch.float64).numpy()
        order = np.lexsort((keys, rows_N))
        rank = np.empty(len(rows_N), dtype=np.int64)
        rank[order] = np.arange(len(rows_N)) - indptr[rows_N[order]]
        return rank < limit

    def __call__(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        indptr = np.asarray(batch[INDPTR], dtype=np.int64)
        genes_N = np.asarray(batch[INDICES], dtype=np.int64)
        values_N = np.asarray(batch[VALUES], dtype=np.float32)
        B = len(indptr) - 1
        rows_N = np.repeat(np.arange(B), np.diff(indptr))
        totals_B = np.bincount(rows_N, weights=values_N, minlength=B)
        norm_N = self._normalised(indptr, values_N, totals_B)

        x_BG = np.zeros((B, self.n_genes), dtype=np.float32)
        x_BG[rows_N, genes_N] = values_N if self.target == "counts" else norm_N

        keep = self._sampled(rows_N, indptr, generator)
        lengths_B = np.bincount(rows_N[keep], minlength=B) + 1  # + <cls>
        cu = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(lengths_B, out=cu[1:])
        cls_pos = cu[:-1]
        gene_ids_T = np.full(cu[-1], CLS_ID, dtype=np.int64)
        expr_T = np.ones(cu[-1], dtype=np.float32)
        # kept nonzeros go after their cell's <cls>, in their order
        slot = np.ones(cu[-1], dtype=bool)
        slot[cls_pos] = False
        gene_ids_T[slot] = genes_N[keep] + N_SPECIAL
        expr_T[slot] = norm_N[keep]

        out = {GENE_IDS: torch.from_numpy(gene_ids_T), EXPRESSION: torch.from_numpy(expr_T),
               CU_SEQLENS: torch.from_numpy(cu.astype(np.int32)),
               MAX_SEQLEN: int(lengths_B.max()) if B else 0,
               X_RECON: torch.from_numpy(x_BG),
               LIBRARY_SIZE: torch.from_numpy(totals_B.astype(np.float32))}
        if self.measured is not None:
            offsets, measured_SG = self.measured
            member_B = np.searchsorted(offsets, np.asarray(batch[CELL_INDEX]), side="right") - 1
            out[GENE_MEASURED] = torch.from_numpy(measured_SG[member_B])
        return out
