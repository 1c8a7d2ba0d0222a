"""scGPT-style tokens from CSR cell batches: binning, <cls>, sampling, masking, packing.

Per cell (all vectorised over the batch, no per-cell Python loop):
1. keep the nonzero genes (optionally only `allowed_genes`, e.g. HVGs; with include_zeros every
   allowed gene, zeros included);
2. bin the nonzero values into n_bins-1 quantile bins of that cell's nonzero values, bins
   1..n_bins-1 (scGPT's `binning` with `_digitize(side="both")`: a value tied with several bin
   edges gets a uniformly drawn bin among them); zero stays bin 0;
3. if more than max_seq_len-1 genes remain, sample max_seq_len-1 of them uniformly (gene order
   kept); prepend <cls> (value PAD_VALUE, never masked);
4. hide int(n_genes * mask_ratio) values per cell: VALUE_IDS -> MASK_VALUE, MASKED True,
   TARGET_VALUES keeps the bins.
Gene index i (of the store / collection) is token id i + 3. Randomness comes from one
torch.Generator: the same generator state gives the same tokens (exact resume).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sized
from typing import Any

import numpy as np
import torch

from pertscale.config import Config, check_choice, check_range
from pertscale.constants import (
    CLS_ID,
    CONDITION_IDS,
    CU_SEQLENS,
    GENE_IDS,
    INDICES,
    INDPTR,
    MASK_VALUE,
    MASKED,
    MAX_SEQLEN,
    OBS,
    PAD_ID,
    PAD_VALUE,
    PADDING_MASK,
    SPECIAL_TOKENS,
    TARGET_VALUES,
    VALUE_IDS,
    VALUES,
)

__all__ = ["LAYOUTS", "Tokenizer", "TokenizerConfig", "bin_values"]

LAYOUTS = ("packed", "padded")
N_SPECIAL = len(SPECIAL_TOKENS)


@dataclasses.dataclass
class TokenizerConfig(Config):
    n_bins: int = 51            # value bins incl. bin 0 (zero); nonzeros go to 1..n_bins-1
    max_seq_len: int = 1200     # tokens per cell incl. <cls>; more genes are sampled down
    mask_ratio: float = 0.4     # fraction of each cell's gene values hidden for prediction
    layout: str = "packed"      # packed (cu_seqlens, no padding) | padded (padding_mask)
    include_zeros: bool = False # also tokenize allowed genes with zero expression (bin 0)
    condition_key: str = ""     # obs column copied to CONDITION_IDS ("" = none)
    seed: int = 0               # seed of the tokenizer's own generator (when none is passed)

    def __post_init__(self) -> None:
        check_range("n_bins", self.n_bins, 3)
        check_range("max_seq_len", self.max_seq_len, 2)
        check_range("mask_ratio", self.mask_ratio, 0.0, 1.0, hi_open=True)
        check_choice("layout", self.layout, LAYOUTS)


def _rank_within_rows(row_N: np.ndarray, key_N: np.ndarray, n_rows: int) -> np.ndarray:
    """Rank of each element among the elements of its row, ordered by `key` (0-based)."""
    by_key = np.argsort(key_N)
    order = by_key[np.argsort(row_N[by_key], kind="stable")]  # by row, then key
    counts = np.bincount(row_N, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(row_N), dtype=np.int64)
    rank[order] = np.arange(len(row_N)) - starts[row_N[order]]
    return rank


def bin_values(row_N: np.ndarray, values_N: np.ndarray, n_rows: int, n_bins: int,
               uniform_N: np.ndarray) -> np.ndarray:
    """Per-row quantile binning of nonzero values into 1..n_bins-1 (scGPT `binning`).

    scGPT: edges = np.quantile(row, linspace(0, 1, E)) with E = n_bins-1, then a bin drawn
    uniformly (`uniform_N` in [0, 1)) between np.digitize(x, edges, right=True) ("right") and
    np.digitize(x, edges) ("left"). Edge k sits at sorted position p_k = k (n-1) / (E-1) of the
    row's n values (linear interpolation), so for a value whose ties span sorted positions
    first..last: left = #{k : p_k <= last}, right = #{k : p_k < first}. That needs one sort
    and integer arithmetic, no edge values and no [N, E] comparison.
    """
    n_edges = n_bins - 1
    n = len(values_N)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((values_N, row_N))
    row_s, val_s = row_N[order], values_N[order]
    counts = np.bincount(row_N, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = np.arange(n)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (row_s[1:] != row_s[:-1]) | (val_s[1:] != val_s[:-1])
    last_of_group = np.ones(n, dtype=bool)
    last_of_group[:-1] = new_group[1:]
    first = np.maximum.accumulate(np.where(new_group, idx, 0)) - starts[row_s]
    last = np.minimum.accumulate(np.where(last_of_group, idx, n)[::-1])[::-1] - starts[row_s]
    n1 = counts[row_s] - 1                     # n - 1 per element's row
    d = np.maximum(n1, 1)
    left = np.where(n1 > 0, last * (n_edges - 1) // d + 1, n_edges)
    right = np.where(n1 > 0, (first * (n_edges - 1) + d - 1) // d, 0)
    digits = np.empty(n, dtype=np.int64)
    digits[order] = np.ceil(uniform_N[order] * (left - right) + right)
    return np.clip(digits, 1, n_edges)


class Tokenizer:
    """`tokenizer(csr_batch, layout=..., generator=...)` -> token batch of torch tensors.

    `vocab` is the store's GeneVocab (or anything with len() = 3 special tokens + genes);
    `allowed_genes` optionally restricts cells to these gene indices (e.g. HVGs).
    """

    def __init__(self, cfg: TokenizerConfig, vocab: Sized, *,
                 allowed_genes: np.ndarray | list[int] | None = None):
        self.cfg = cfg
        self.n_genes = len(vocab) - N_SPECIAL
        if self.n_genes < 1:
            raise ValueError(f"vocabulary of {len(vocab)} tokens has no genes after the "
                             f"{N_SPECIAL} special tokens")
        self.allowed_genes: np.ndarray | None = None
        self._allowed_lookup: np.ndarray | None = None
        if allowed_genes is not None:
            allowed = np.unique(np.asarray(allowed_genes, dtype=np.int64))
            bad = allowed[(allowed < 0) | (allowed >= self.n_genes)]
            if len(bad) or len(allowed) == 0:
                raise ValueError(f"allowed_genes must be gene indices in [0, {self.n_genes}); "
                                 f"got {'none' if len(allowed) == 0 else bad[:5].tolist()}")
            self.allowed_genes = allowed
            self._allowed_lookup = np.zeros(self.n_genes, dtype=bool)
            self._allowed_lookup[allowed] = True
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def _uniform(self, n: int, generator: torch.Generator) -> np.ndarray:
        return torch.rand(n, generator=generator, dtype=torch.float64).numpy()

    def _cells(self, batch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(row, gene index, value) of every token candidate, rows sorted, genes ascending."""
        for key in (INDPTR, INDICES, VALUES):
            if key not in batch:
                raise ValueError(f"CSR batch has no {key!r}; keys: {sorted(batch)}")
        indptr = np.asarray(batch[INDPTR], dtype=np.int64)
        indices = np.asarray(batch[INDICES], dtype=np.int64)
        values = np.asarray(batch[VALUES], dtype=np.float32)
        n_rows = len(indptr) - 1
        if n_rows < 1 or indptr[0] != 0 or indptr[-1] != len(indices) or len(values) != len(indices):
            raise ValueError(f"CSR batch is inconsistent: indptr[0]={indptr[:1].tolist()}, "
                             f"indptr[-1]={indptr[-1:].tolist()}, {len(indices)} indices, "
                             f"{len(values)} values")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_genes):
            raise ValueError(f"CSR batch has gene index {int(indices.max())} outside the "
                             f"vocabulary's {self.n_genes} genes")
        row = np.repeat(np.arange(n_rows), np.diff(indptr))
        keep = values != 0
        if self._allowed_lookup is not None:
            keep &= self._allowed_lookup[indices]
        row, indices, values = row[keep], indices[keep], values[keep]
        if self.cfg.include_zeros:
            genes = self.allowed_genes if self.allowed_genes is not None else np.arange(self.n_genes)
            dense = np.zeros((n_rows, self.n_genes), dtype=np.float32)
            dense[row, indices] = values
            sub = dense[:, genes]
            row = np.repeat(np.arange(n_rows), len(genes))
            indices = np.tile(genes, n_rows)
            values = sub.reshape(-1)
        else:
            same_row = row[1:] == row[:-1]
            if np.any(same_row & (indices[1:] <= indices[:-1])):  # not canonical CSR
                order = np.lexsort((indices, row))
                row, indices, values = row[order], indices[order], values[order]
        return row, indices, values, n_rows

    def __call__(self, batch: dict, *, layout: str | None = None,
                 generator: torch.Generator | None = None) -> dict[str, Any]:
        cfg = self.cfg
        layout = layout or cfg.layout
        check_choice("layout", layout, LAYOUTS)
        g = generator if generator is not None else self.generator
        row, genes, values, B = self._cells(batch)

        # 1. bins (zeros stay 0; binning sees only the cell's nonzero values)
        bins = np.zeros(len(values), dtype=np.int64)
        nz = values != 0
        u_bin = self._uniform(int(nz.sum()), g)
        bins[nz] = bin_values(row[nz], values[nz], B, cfg.n_bins, u_bin)

        # 2. sample down to max_seq_len - 1 genes (uniformly, order kept)
        cap = cfg.max_seq_len - 1
        counts = np.bincount(row, minlength=B)
        if counts.max(initial=0) > cap:
            rank = _rank_within_rows(row, self._uniform(len(row), g), B)
            keep = rank < cap
            row, genes, bins = row[keep], genes[keep], bins[keep]
            counts = np.bincount(row, minlength=B)

        # 3. masking: int(n * mask_ratio) random genes per cell
        n_mask = (counts * cfg.mask_ratio).astype(np.int64)
        mask_rank = _rank_within_rows(row, self._uniform(len(row), g), B)
        masked_genes = mask_rank < n_mask[row]

        # 4. lay out with <cls> first: token position = row start + 1 + rank in row
        lengths = counts + 1
        cu = np.zeros(B + 1, dtype=np.int64)
        cu[1:] = np.cumsum(lengths)
        T = int(cu[-1])
        gene_ids = np.full(T, CLS_ID, dtype=np.int64)
        targets = np.full(T, PAD_VALUE, dtype=np.int64)
        masked = np.zeros(T, dtype=bool)
        gene_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = cu[row] + 1 + (np.arange(len(row)) - gene_starts[row])
        gene_ids[pos] = genes + N_SPECIAL
        targets[pos] = bins
        masked[pos] = masked_genes
        value_ids = np.where(masked, MASK_VALUE, targets)

        out: dict[str, Any] = {}
        if layout == "packed":
            out[GENE_IDS] = torch.from_numpy(gene_ids)
            out[VALUE_IDS] = torch.from_numpy(value_ids)
            out[TARGET_VALUES] = torch.from_numpy(targets.astype(np.float32))
            out[MASKED] = torch.from_numpy(masked)
            out[CU_SEQLENS] = torch.from_numpy(cu.astype(np.int32))
            out[MAX_SEQLEN] = int(lengths.max())
        else:
            L = int(lengths.max())
            tok_row = np.repeat(np.arange(B), lengths)
            tok_col = np.arange(T) - cu[tok_row]

            def pad(x: np.ndarray, fill) -> torch.Tensor:
                dense = np.full((B, L), fill, dtype=x.dtype)
                dense[tok_row, tok_col] = x
                return torch.from_numpy(dense)

            out[GENE_IDS] = pad(gene_ids, PAD_ID)
            out[VALUE_IDS] = pad(value_ids, PAD_VALUE)
            out[TARGET_VALUES] = pad(targets.astype(np.float32), float(PAD_VALUE))
            out[MASKED] = pad(masked, False)
            out[PADDING_MASK] = pad(np.zeros(T, dtype=bool), True)
        if cfg.condition_key:
            obs = batch.get(OBS, {})
            if cfg.condition_key not in obs:
                raise ValueError(f"condition_key={cfg.condition_key!r} is not an obs column of "
                                 f"the batch; columns: {sorted(obs)}")
            out[CONDITION_IDS] = torch.as_tensor(np.asarray(obs[cfg.condition_key]),
                                                 dtype=torch.int64)
        return out
