"""A seeded random write order in bounded memory: the two-pass bucket shuffle of ingest.

Real Perturb-seq files are sorted (by guide, perturbation, donor, batch). The loader shuffles
blocks of consecutive stored cells, so a store written in the file's order gives batches made of
a few runs of one label each; a store written in a random order gives batches as mixed as a
uniformly random sample.

    with BucketShuffle(scratch_dir, n_cells=n, values=nnz, seed=0) as shuffle:
        for csr, obs in source_blocks:          # pass 1: the file in its order
            shuffle.add(csr, obs)
        for csr, obs in shuffle.blocks(16384):  # pass 2: the cells in a random order
            writer.append(csr, obs)

Pass 1 sends every cell to one of B buckets drawn uniformly at random (B sized so that a bucket
holds about `bucket_values` stored values) and appends it to that bucket's file in a scratch
folder beside the output. Pass 2 loads one bucket at a time, permutes its cells uniformly and
yields them in blocks. Ordering cells by (uniform bucket, uniform rank within the bucket) is
ordering them by i.i.d. random keys, so every order of the cells is equally likely. Memory: the
pass-1 write buffer (`buffer_values`) and one bucket in pass 2, whatever the file size. The
scratch folder is removed on exit, after success or failure.

`source_positions(store)` gives each stored cell's position in the source order (a collection's
source order: its files in order, each in its own order).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertscale.store.format import SOURCE_ROW, StoreError, local_path

__all__ = ["DEFAULT_BUCKET_VALUES", "BucketShuffle", "scratch_path", "source_positions",
           "write_shuffled"]

DEFAULT_BUCKET_VALUES = 2**24  # stored values per bucket: 128 MiB of values + indices in pass 2
# Values buffered in pass 1 before every bucket file is appended to: ~16k values (128 KiB) per
# bucket and append, within [4 Mi, 64 Mi] values (32-512 MiB; the top only from ~4,000 buckets,
# ~60 G values, e.g. 40M cells of 1,500 nonzeros).
BUFFER_VALUES_PER_BUCKET = 2**14
MIN_BUFFER_VALUES, MAX_BUFFER_VALUES = 2**22, 2**26
MARKER = "pertscale-shuffle.json"


def scratch_path(out: Path) -> Path:
    """The scratch folder of a shuffled write of the store at `out` (beside it)."""
    return out.parent / f".{out.name}.pertscale-shuffle"


class BucketShuffle:
    """Two-pass bucket shuffle of CSR rows with their obs rows; see the module docstring."""

    def __init__(self, scratch_dir: Path, *, n_cells: int, values: int, seed: int,
                 bucket_values: int = DEFAULT_BUCKET_VALUES):
        if n_cells < 1:
            raise ValueError(f"n_cells={n_cells}: nothing to shuffle")
        self.dir = Path(scratch_dir)
        self.n_cells = n_cells
        self.num_buckets = max(1, min(n_cells, math.ceil(values / bucket_values)))
        self._rng = np.random.default_rng(seed)
        self._buffer_values = int(np.clip(self.num_buckets * BUFFER_VALUES_PER_BUCKET,
                                          MIN_BUFFER_VALUES, MAX_BUFFER_VALUES))
        self._pending: list[list[tuple]] = [[] for _ in range(self.num_buckets)]
        self._bucket_cells = np.zeros(self.num_buckets, np.int64)
        self._bucket_nnz = np.zeros(self.num_buckets, np.int64)
        self._pending_values = 0
        self._added = 0
        self._n_genes: int | None = None
        self._begin()

    def _begin(self) -> None:
        """A fresh scratch folder; a leftover of an interrupted shuffle (ours) is removed."""
        if self.dir.exists():
            if not (self.dir / MARKER).is_file():
                raise StoreError(f"{self.dir} exists and was not written by pertscale; move it "
                                 "away (ingest uses it as scratch space for the shuffle)")
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        (self.dir / MARKER).write_text(json.dumps({"n_cells": self.n_cells,
                                                   "num_buckets": self.num_buckets}))

    def _bucket_file(self, b: int, part: str) -> Path:
        return self.dir / f"bucket-{b:06d}.{part}"

    def add(self, csr: sp.csr_matrix, obs: pd.DataFrame) -> None:
        """Pass 1: cells in source order (a CSR block and its obs rows)."""
        n = csr.shape[0]
        self._n_genes = csr.shape[1]
        if len(obs) != n:
            raise ValueError(f"obs has {len(obs)} rows for a block of {n} cells")
        bucket = self._rng.integers(0, self.num_buckets, n)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(self.num_buckets + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[b]:bounds[b + 1]]
            self._pending[b].append((csr[rows], obs.iloc[rows]))
        self._pending_values += csr.nnz + n
        self._added += n
        if self._pending_values >= self._buffer_values:
            self._flush()

    def _flush(self) -> None:
        """Append the buffered cells to their buckets: one frame per append in the bucket's
        cells file (cells and nonzeros, then row lengths, indices and values), obs rows as a
        stream of pickled frames."""
        for b, parts in enumerate(self._pending):
            if not parts:
                continue
            lengths = np.concatenate([np.diff(x.indptr) for x, _ in parts]).astype(np.int64)
            indices = np.concatenate([x.indices for x, _ in parts]).astype(np.int32, copy=False)
            values = np.concatenate([x.data for x, _ in parts]).astype(np.float32, copy=False)
            with open(self._bucket_file(b, "cells"), "ab") as f:
                f.write(np.array([len(lengths), len(indices)], np.int64).tobytes())
                f.writelines(array.tobytes() for array in (lengths, indices, values))
            # NOTE: pickle only for scratch files this object wrote and reads back itself
            with open(self._bucket_file(b, "obs"), "ab") as f:
                pickle.dump(pd.concat([o for _, o in parts]), f, protocol=pickle.HIGHEST_PROTOCOL)
            self._bucket_cells[b] += len(lengths)
            self._bucket_nnz[b] += len(indices)
            parts.clear()
        self._pending_values = 0

    def blocks(self, block_rows: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        """Pass 2: every added cell once, in the shuffled order, in blocks of `block_rows`."""
        if self._added != self.n_cells:
            raise RuntimeError(f"{self._added} cells were added, {self.n_cells} announced")
        self._flush()
        for b in np.flatnonzero(self._bucket_cells):
            csr, obs = self._load_bucket(int(b))
            perm = self._rng.permutation(csr.shape[0])
            for start in range(0, len(perm), block_rows):
                rows = perm[start:start + block_rows]
                yield csr[rows], obs.iloc[rows]
            del csr, obs  # before the next bucket is read: one bucket in memory at a time

    def _load_bucket(self, b: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
        """A bucket's cells read into arrays allocated once (its sizes are counted in pass 1)."""
        n, nnz = int(self._bucket_cells[b]), int(self._bucket_nnz[b])
        lengths = np.empty(n, np.int64)
        indices = np.empty(nnz, np.int32)
        values = np.empty(nnz, np.float32)
        row = pos = 0
        with open(self._bucket_file(b, "cells"), "rb") as f:
            while row < n:
                rows, k = np.frombuffer(f.read(16), np.int64)
                for array, a, z in ((lengths, row, row + rows), (indices, pos, pos + k),
                                    (values, pos, pos + k)):
                    f.readinto(memoryview(array[a:z]).cast("B"))
                row, pos = row + rows, pos + k
        frames = []
        with open(self._bucket_file(b, "obs"), "rb") as f:
            while True:
                try:
                    frames.append(pickle.load(f))
                except EOFError:
                    break
        for part in ("cells", "obs"):
            self._bucket_file(b, part).unlink()
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=indptr[1:])
        return (sp.csr_matrix((values, indices, indptr), shape=(n, self._n_genes)),
                pd.concat(frames))

    def close(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def source_positions(store) -> np.ndarray:
    """Each stored cell's position in the source order (int64 [n_cells]): the `source_row`
    column of a shuffled store, the stored position of a store in its file's order; for a
    collection, the member's first position plus the position within the member."""
    members = getattr(store, "members", None)
    if members is None:
        if SOURCE_ROW in store.obs_column_names:
            return store.read_obs([SOURCE_ROW], index=False)[SOURCE_ROW].to_numpy(np.int64)
        return np.arange(store.n_cells, dtype=np.int64)
    return np.concatenate([source_positions(m) + o for m, o in zip(members, store.cell_offsets)])


def write_shuffled(writer: Any, blocks: Iterable[tuple[int, Any, pd.DataFrame]], *, n_cells: int,
                   values: int, seed: int, block_rows: int,
                   bucket_values: int = DEFAULT_BUCKET_VALUES,
                   progress: Callable[[int, int], None] | None = None) -> None:
    """Append the cells of `blocks` ((first source row, matrix block, obs block) in source
    order) to a StoreWriter in a seeded random order, with their source rows in obs
    `source_row`. Pass 1 checks every block (errors name source rows) and buckets it; pass 2
    appends. Progress counts each pass as half of the cells. Scratch space: beside the store."""
    scratch = scratch_path(Path(local_path(writer.uri)))
    with BucketShuffle(scratch, n_cells=n_cells, values=values, seed=seed,
                       bucket_values=bucket_values) as shuffle:
        for start, block, obs_block in blocks:
            csr, obs_block = writer.validate(block, obs_block, first_row=start)
            n = csr.shape[0]
            shuffle.add(csr, obs_block.assign(**{SOURCE_ROW: np.arange(start, start + n)}))
            if progress is not None:
                progress((start + n) // 2, n_cells)
        for csr, obs_block in shuffle.blocks(block_rows):
            writer.append_validated(csr, obs_block)
            if progress is not None:
                progress((n_cells + writer.n_cells) // 2, n_cells)
