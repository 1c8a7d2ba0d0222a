"""CellLoader: distributed, block-shuffled, resumable minibatches of CSR rows from a cell store.

Each rank reads its share of the epoch (planned by `BlockSampler`) as contiguous blocks through
the store's `read_csr_async` (tensorstore futures; `blocks_in_flight` reads overlap), gathers a
shuffle buffer of `buffer_blocks` blocks and copies its rows once, in a seeded permutation, into
one CSR buffer; batches are consecutive slices (views) of it. A background thread does the
reading and the shuffle, `prefetch_batches` ahead of the consumer, so reading overlaps with
compute. Memory is bounded by the configuration, whatever the store's size: the blocks of one
buffer + `blocks_in_flight` blocks + the shuffled buffers that queued or held batches still view
(a batch kept by the consumer keeps its buffer alive; copy it to keep it long).

Batches follow the loader contract in `pertscale.constants`:
    CELL_INDEX int64 [B], INDPTR int64 [B+1], INDICES int32 [N], VALUES float32 [N],
    OBS {column: ndarray [B]} (int64 codes for categoricals, -1 = missing; numbers as stored).

Resume: `state_dict()` is (epoch, batches_emitted) plus the plan parameters; a loader given that
state by `load_state_dict()` yields exactly the batches an uninterrupted loader would have
yielded next. Iterating a loader yields the rest of its current epoch, then moves to the next.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertscale.config import Config, check_choice, check_range
from pertscale.constants import CELL_INDEX, INDICES, INDPTR, OBS, VALUES
from pertscale.data.sampler import REMAINDER_POLICIES, BlockSampler

__all__ = ["CellLoader", "LoaderConfig", "build_loader"]

_STATE_KEYS = ("rank", "world_size", "seed", "batch_size", "block_size", "buffer_cells",
               "remainder", "n_cells")


@dataclass
class LoaderConfig(Config):
    """How a rank streams CSR minibatches from a cell store."""

    store_uri: str = ""
    """Store or collection to read: local path, s3://bucket/prefix or gs://bucket/prefix."""
    batch_size: int = 1024
    """Cells per batch (per rank)."""
    block_size: int = 256
    """Contiguous cells read as one range; the unit of the epoch's random block order."""
    buffer_blocks: int = 32
    """Blocks whose rows are shuffled together; a batch draws from up to this many blocks."""
    blocks_in_flight: int = 16
    """Block reads kept in flight at once (tensorstore futures)."""
    prefetch_batches: int = 4
    """Assembled batches queued ahead of the consumer."""
    seed: int = 0
    """Seed of the block order and of the within-buffer shuffles."""
    obs_columns: list[str] = field(default_factory=list)
    """obs columns carried in every batch (categoricals as integer codes)."""
    remainder: str = "drop_last"
    """Cells that do not fill equal per-rank shares: drop_last (full batches) or keep_partial."""

    def __post_init__(self) -> None:
        check_range("batch_size", self.batch_size, 1)
        check_range("block_size", self.block_size, 1)
        check_range("buffer_blocks", self.buffer_blocks, 1)
        check_range("blocks_in_flight", self.blocks_in_flight, 1)
        check_range("prefetch_batches", self.prefetch_batches, 1)
        check_range("seed", self.seed, 0)
        check_choice("remainder", self.remainder, REMAINDER_POLICIES)
        if len(set(self.obs_columns)) != len(self.obs_columns):
            raise ValueError(f"obs_columns={self.obs_columns} lists a column twice")


def build_loader(cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                 epoch: int = 0) -> CellLoader:
    """The loader for one rank, from its config section."""
    if not cfg.store_uri:
        raise ValueError("loader.store_uri is empty: name the store or collection to read")
    return CellLoader(cfg.store_uri, batch_size=cfg.batch_size, rank=rank,
                      world_size=world_size, seed=cfg.seed, epoch=epoch,
                      block_size=cfg.block_size, buffer_blocks=cfg.buffer_blocks,
                      blocks_in_flight=cfg.blocks_in_flight,
                      prefetch_batches=cfg.prefetch_batches, obs_columns=cfg.obs_columns,
                      remainder=cfg.remainder)


def _obs_arrays(obs: pd.DataFrame, columns: list[str], uri: str) -> dict[str, np.ndarray]:
    """obs columns as flat arrays: categoricals become their integer codes (-1 = missing) in
    pandas' compact dtype (int8/16/32: memory per rank scales with the store's cells), numbers
    stay numbers."""
    out = {}
    for name in columns:
        col = obs[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            out[name] = col.cat.codes.to_numpy()
        elif pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
            out[name] = col.to_numpy()
        else:
            raise ValueError(f"obs column {name!r} of store {uri} has dtype {col.dtype}; "
                             "a loader carries categoricals (as codes) or numbers")
    return out


def _widen(values: np.ndarray) -> np.ndarray:
    """Integer columns (categorical codes) as int64, what embedding lookups take."""
    return values.astype(np.int64) if values.dtype.kind in "iu" else values


@dataclass
class _Rows:
    """CSR rows with their global cell index; indptr starts at 0."""

    indptr: np.ndarray  # int64 [n+1]
    indices: np.ndarray  # int32 [nnz]
    values: np.ndarray  # float32 [nnz]
    cell_index: np.ndarray  # int64 [n]

    @property
    def num_rows(self) -> int:
        return len(self.cell_index)

    def rows(self, start: int, stop: int) -> _Rows:
        """Rows [start, stop): views of this buffer's arrays (no copy of the nonzeros)."""
        lo, hi = self.indptr[start], self.indptr[stop]
        return _Rows(self.indptr[start:stop + 1] - lo, self.indices[lo:hi],
                     self.values[lo:hi], self.cell_index[start:stop])

    @staticmethod
    def concat(pieces: list[_Rows]) -> _Rows:
        offsets = np.cumsum([0] + [p.indptr[-1] for p in pieces[:-1]])
        indptr = np.concatenate([pieces[0].indptr[:1]]
                                + [p.indptr[1:] + o for p, o in zip(pieces, offsets)])
        return _Rows(indptr, np.concatenate([p.indices for p in pieces]),
                     np.concatenate([p.values for p in pieces]),
                     np.concatenate([p.cell_index for p in pieces]))


class _BufferPool:
    """The shuffle copy's output arrays (indices, values), reused once nothing views them.

    A buffer of 8,192 cells x 1,450 nonzeros is ~95 MB: glibc maps every allocation that
    large afresh and the kernel zero-fills its pages on first touch, so allocating one per
    shuffle buffer made the copy 2-15x slower (and the loader ~2x) on 2 cores, with the decode
    threads competing for the same cores. A pooled pair is free when the pool holds its only
    references: no batch, queued or kept by the consumer, views it (`sys.getrefcount`)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        # NOTE: what an unviewed pair counts, measured the way `take` counts (the interpreter
        # decides how many references the call itself adds)
        idle = [(np.empty(1, np.int32), np.empty(1, np.float32))]
        self._idle = self._refs(idle[0])

    @staticmethod
    def _refs(pair: tuple[np.ndarray, np.ndarray]) -> int:
        return max(sys.getrefcount(pair[0]), sys.getrefcount(pair[1]))

    def take(self, nnz: int) -> tuple[np.ndarray, np.ndarray]:
        """int32 indices and float32 values arrays of length `nnz` (views of a pooled pair)."""
        for i, pair in enumerate(self._pairs):
            if self._refs(pair) <= self._idle:
                if len(pair[0]) >= nnz:
                    return pair[0][:nnz], pair[1][:nnz]
                del self._pairs[i]  # free but too small: replaced by a larger one below
                break
        # NOTE: 25% headroom, so that buffers of slightly different sizes reuse one pair
        capacity = int(nnz * 1.25) + 1
        pair = (np.empty(capacity, np.int32), np.empty(capacity, np.float32))
        if len(self._pairs) < self.size:
            self._pairs.append(pair)
        return pair[0][:nnz], pair[1][:nnz]


def _shuffled(blocks: list[sp.csr_matrix], order: np.ndarray, cell_index: np.ndarray,
              pool: _BufferPool) -> _Rows:
    """The rows `order` (indices into the blocks laid end to end) gathered into one CSR buffer.

    One copy of the nonzeros, straight from the blocks, into arrays of `pool`; batches are
    then views of the result.
    NOTE: a loop of numpy slices + one concatenate per array beats scipy's vstack + fancy
    row indexing (two copies) and a numba row loop on 2 cores (see pertscale bench loader)."""
    sizes = np.array([b.shape[0] for b in blocks])
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    block_of = np.repeat(np.arange(len(blocks)), sizes)[order]
    local = order - first[block_of]
    lengths = np.concatenate([np.diff(b.indptr) for b in blocks])[order]
    indptr = np.zeros(len(order) + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    ptrs = [b.indptr.tolist() for b in blocks]
    indices = [b.indices for b in blocks]
    values = [b.data for b in blocks]
    idx_parts, val_parts = [], []
    for j, r in zip(block_of.tolist(), local.tolist()):
        a, e = ptrs[j][r], ptrs[j][r + 1]
        idx_parts.append(indices[j][a:e])
        val_parts.append(values[j][a:e])
    if not idx_parts:
        return _Rows(indptr, np.zeros(0, np.int32), np.zeros(0, np.float32), cell_index)
    out_indices, out_values = pool.take(int(indptr[-1]))
    np.concatenate(idx_parts, out=out_indices, casting="same_kind")
    np.concatenate(val_parts, out=out_values, casting="same_kind")
    return _Rows(indptr, out_indices, out_values, cell_index)


class _Stop(Exception):
    """The consumer went away; the producer thread ends quietly."""


class CellLoader:
    """Iterable of CSR minibatch dicts for one rank (see module doc); `len()` = batches per epoch."""

    def __init__(self, store_uri: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, block_size: int = 256, buffer_blocks: int = 32,
                 blocks_in_flight: int = 16, prefetch_batches: int = 4,
                 obs_columns: list[str] | tuple[str, ...] = (),
                 remainder: str = "drop_last") -> None:
        from pertscale.store import open_store  # data -> store; imported here to keep import light

        LoaderConfig(store_uri=str(store_uri), batch_size=batch_size, block_size=block_size,
                     buffer_blocks=buffer_blocks, blocks_in_flight=blocks_in_flight,
                     prefetch_batches=prefetch_batches, seed=seed,
                     obs_columns=list(obs_columns), remainder=remainder)  # validates
        self._args = {"batch_size": batch_size, "rank": rank, "world_size": world_size,
                      "seed": seed, "block_size": block_size, "buffer_blocks": buffer_blocks,
                      "blocks_in_flight": blocks_in_flight,
                      "prefetch_batches": prefetch_batches, "obs_columns": tuple(obs_columns),
                      "remainder": remainder}
        self.store_uri = str(store_uri)
        self.store = open_store(self.store_uri)
        self.sampler = BlockSampler(self.store.n_cells, batch_size=batch_size,
                                    block_size=block_size,
                                    buffer_cells=block_size * buffer_blocks, rank=rank,
                                    world_size=world_size, seed=seed, remainder=remainder)
        self.blocks_in_flight = blocks_in_flight
        self.prefetch_batches = prefetch_batches
        self.obs_columns = list(obs_columns)
        # NOTE: only the asked-for columns are read and decoded (no cell ids, no other column)
        names = self.store.obs_column_names
        missing = [c for c in self.obs_columns if c not in names]
        if missing:
            raise ValueError(f"obs column(s) {missing} not in store {self.store_uri}; it has "
                             f"{names}")
        self._obs = _obs_arrays(self.store.read_obs(self.obs_columns, index=False),
                                self.obs_columns, self.store_uri)
        self._epoch = int(epoch)
        self._batches_emitted = 0
        self._active: tuple[threading.Thread, threading.Event] | None = None

    # --- plan -------------------------------------------------------------------------------
    @property
    def num_batches(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.sampler.num_batches

    @property
    def num_dropped(self) -> int:
        """Cells of the store left out of each epoch by the remainder policy (all ranks)."""
        return self.sampler.num_dropped

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        return self.num_batches

    def __repr__(self) -> str:
        return f"CellLoader({self.store_uri!r}, epoch={self._epoch}, {self.sampler!r})"

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch at the next iteration."""
        self._close_active()
        self._epoch, self._batches_emitted = int(epoch), 0

    # --- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position in the sample stream (batches handed to the consumer) and the plan's keys."""
        s = self.sampler
        return {"epoch": self._epoch, "batches_emitted": self._batches_emitted,
                "rank": s.rank, "world_size": s.world_size, "seed": s.seed,
                "batch_size": s.batch_size, "block_size": s.block_size,
                "buffer_cells": s.buffer_cells, "remainder": s.remainder, "n_cells": s.n_cells}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuses a state whose plan differs (the stream would differ)."""
        missing = [k for k in ("epoch", "batches_emitted", *_STATE_KEYS) if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}")
        mine = self.state_dict()
        diff = {k: (state[k], mine[k]) for k in _STATE_KEYS if state[k] != mine[k]}
        if diff:
            detail = ", ".join(f"{k}: state {a!r} != loader {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"loader state does not match this loader ({detail}); "
                             "the resumed stream would differ from the interrupted one")
        self.sampler.locate(int(state["batches_emitted"]))  # range check
        self._close_active()
        self._epoch = int(state["epoch"])
        self._batches_emitted = int(state["batches_emitted"])

    # --- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._close_active()
        if self._batches_emitted >= self.num_batches:
            self._epoch, self._batches_emitted = self._epoch + 1, 0
        epoch, start = self._epoch, self._batches_emitted
        out: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(epoch, start, out, stop),
                                  name=f"CellLoader-rank{self.sampler.rank}", daemon=True)
        thread.start()
        self._active = (thread, stop)
        return self._consume(epoch, out, thread, stop)

    def _consume(self, epoch: int, out: queue.Queue, thread: threading.Thread,
                 stop: threading.Event) -> Iterator[dict[str, Any]]:
        try:
            while self._batches_emitted < self.num_batches:
                item = self._get(out, stop)
                if isinstance(item, BaseException):
                    raise item
                self._batches_emitted += 1
                yield item
            self._epoch, self._batches_emitted = epoch + 1, 0
        finally:
            stop.set()
            if self._active is not None and self._active[0] is thread:
                self._active = None
            thread.join()

    @staticmethod
    def _get(out: queue.Queue, stop: threading.Event) -> Any:
        while True:
            if stop.is_set():
                raise RuntimeError("this iterator of the CellLoader was closed by a newer "
                                   "iteration, set_epoch() or load_state_dict()")
            try:
                return out.get(timeout=0.1)
            except queue.Empty:
                continue

    def _close_active(self) -> None:
        if self._active is not None:
            thread, stop = self._active
            stop.set()
            thread.join()
            self._active = None

    def _put(self, out: queue.Queue, item: Any, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return
            except queue.Full:
                continue
        raise _Stop

    def _produce(self, epoch: int, start_batch: int, out: queue.Queue,
                 stop: threading.Event) -> None:
        try:
            for batch in self._batches(epoch, start_batch, stop):
                self._put(out, batch, stop)
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            try:
                self._put(out, e, stop)
            except _Stop:
                pass

    def _batches(self, epoch: int, start_batch: int, stop: threading.Event):
        """Assembled batches of the epoch from batch `start_batch` on."""
        s = self.sampler
        first_buffer, skip = s.locate(start_batch)
        remaining = s.num_batches - start_batch
        plans: deque = deque()
        inflight: deque = deque()

        def requests():
            for plan in s.buffers(epoch, first_buffer):
                plans.append(plan)
                for a, b in plan.ranges:
                    yield int(a), int(b)

        reqs = requests()

        def top_up() -> None:
            while len(inflight) < self.blocks_in_flight:
                r = next(reqs, None)
                if r is None:
                    return
                inflight.append(self.store.read_csr_async(*r))

        pool = _BufferPool()
        pending: list[_Rows] = []  # pieces of the next batch (a batch may span two buffers)
        pending_rows = 0
        top_up()
        while plans and remaining > 0:
            plan = plans.popleft()
            blocks = []
            for _ in range(len(plan.ranges)):
                if stop.is_set():
                    raise _Stop
                blocks.append(inflight.popleft().result())
                top_up()
            buffer = _shuffled(blocks, plan.order[skip:], plan.cell_index()[skip:], pool)
            skip = 0
            pos = 0
            while pos < buffer.num_rows and remaining > 0:
                take = min(s.batch_size - pending_rows, buffer.num_rows - pos)
                pending.append(buffer.rows(pos, pos + take))
                pending_rows += take
                pos += take
                if pending_rows == s.batch_size:
                    yield self._assemble(pending)
                    remaining -= 1
                    pending, pending_rows = [], 0
        if pending and remaining > 0:  # keep_partial: the short last batch
            yield self._assemble(pending)

    def _assemble(self, pieces: list[_Rows]) -> dict[str, Any]:
        rows = pieces[0] if len(pieces) == 1 else _Rows.concat(pieces)
        return {
            CELL_INDEX: rows.cell_index,
            INDPTR: rows.indptr,
            INDICES: rows.indices,
            VALUES: rows.values,
            OBS: {name: _widen(col[rows.cell_index]) for name, col in self._obs.items()},
        }

    # --- pickling (Ray workers) ---------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"store_uri": self.store_uri, "args": self._args, "state": self.state_dict()}

    def __setstate__(self, data: dict[str, Any]) -> None:
        args = dict(data["args"])
        self.__init__(data["store_uri"], epoch=data["state"]["epoch"], **args)
        self.load_state_dict(data["state"])
