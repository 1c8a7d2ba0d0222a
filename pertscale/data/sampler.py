"""Block sampler: which cells each rank reads in an epoch, in which order (pure index math, no I/O).

An epoch is planned in four steps, all deterministic in (seed, epoch):

1. The store's cells are cut into blocks of `block_size` contiguous cells (the last may be short);
   contiguous blocks are what makes reading fast (one range read per block).
2. The blocks are put in a seeded random order, the same on every rank, and laid end to end
   into one flat sequence of `n_cells` positions.
3. Rank r takes the positions [r * cells_per_rank, (r + 1) * cells_per_rank): ranks are disjoint and
   every rank gets the same number of cells, hence the same number of batches (unequal ranks would
   hang the collectives of a ZeRO step).
4. A rank's positions are grouped into shuffle buffers of `buffer_cells` consecutive positions;
   buffer k's rows are emitted in a permutation seeded by (seed, epoch, rank, k). A rank's
   stream is the concatenation of its permuted buffers; batch b is stream[b*B : (b+1)*B].

Remainder policy (cells that cannot be dealt in equal shares are announced by `num_dropped`;
they are the tail of the epoch's random block order, so a different set is left out every epoch):

- "drop_last": every batch is full; each rank has floor(n_cells / world_size / batch_size) batches.
  Fewer than world_size * batch_size cells are left out of an epoch.
- "keep_partial": each rank has n_cells // world_size cells and the last batch of every rank is
  short by the same amount. Fewer than world_size cells are left out.

No cell appears twice in an epoch, under either policy.

Because buffer k depends only on (seed, epoch, rank, k), a loader resumed at batch b recomputes
the buffer holding stream position b*B and skips its first rows without re-reading earlier buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["REMAINDER_POLICIES", "BlockSampler", "BufferPlan"]

REMAINDER_POLICIES = ("drop_last", "keep_partial")


@dataclass(frozen=True)
class BufferPlan:
    """One shuffle buffer of a rank's epoch: the store ranges to read and the emission order."""

    index: int
    """Buffer number within the rank's epoch."""
    ranges: np.ndarray
    """int64 [n_ranges, 2]: store cell ranges [start, stop), in reading order (each <= block)."""
    order: np.ndarray
    """int64 [n_rows]: row r of the emitted stream is row order[r] of the concatenated ranges."""

    @property
    def num_rows(self) -> int:
        return int(self.order.shape[0])

    def cell_index(self) -> np.ndarray:
        """Global cell index of each emitted row, in emission order."""
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.ranges])
        return rows[self.order]


def _cut(starts: np.ndarray, stops: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Ranges covering flat positions [lo, hi) of the sequence of ranges laid end to end."""
    ends = np.cumsum(stops - starts)  # flat end position of each range
    first = int(np.searchsorted(ends, lo, side="right"))
    last = int(np.searchsorted(ends, hi, side="left"))  # range holding position hi - 1
    sel_starts = starts[first:last + 1].copy()
    sel_stops = stops[first:last + 1].copy()
    begins = ends[first:last + 1] - (stops[first:last + 1] - starts[first:last + 1])
    sel_starts[0] += lo - begins[0]
    sel_stops[-1] -= ends[last] - hi
    return np.stack([sel_starts, sel_stops], axis=1)


class BlockSampler:
    """Plans one rank's share of every epoch over a store of `n_cells` cells (see module doc)."""

    def __init__(self, n_cells: int, *, batch_size: int, block_size: int, buffer_cells: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0,
                 remainder: str = "drop_last") -> None:
        for name, value in (("batch_size", batch_size), ("block_size", block_size),
                            ("buffer_cells", buffer_cells), ("world_size", world_size)):
            if int(value) < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if remainder not in REMAINDER_POLICIES:
            raise ValueError(f"remainder={remainder!r} is not one of {list(REMAINDER_POLICIES)}")
        self.n_cells = int(n_cells)
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.buffer_cells = int(buffer_cells)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.remainder = remainder

        share = self.n_cells // self.world_size
        if remainder == "drop_last":
            self.num_batches = share // self.batch_size
            self.cells_per_rank = self.num_batches * self.batch_size
        else:
            self.cells_per_rank = share
            self.num_batches = math.ceil(share / self.batch_size)
        if self.num_batches == 0:
            raise ValueError(
                f"a store of {self.n_cells} cells gives no batch to each of {self.world_size} "
                f"rank(s) with batch_size={self.batch_size} and remainder={remainder!r}")
        self.num_dropped = self.n_cells - self.world_size * self.cells_per_rank
        self.num_blocks = math.ceil(self.n_cells / self.block_size)
        self.num_buffers = math.ceil(self.cells_per_rank / self.buffer_cells)

    def __repr__(self) -> str:
        return (f"BlockSampler(n_cells={self.n_cells}, rank={self.rank}/{self.world_size}, "
                f"batches={self.num_batches}x{self.batch_size}, block_size={self.block_size}, "
                f"buffer_cells={self.buffer_cells}, dropped={self.num_dropped})")

    def block_order(self, epoch: int) -> np.ndarray:
        """The epoch's block permutation, identical on every rank."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        return rng.permutation(self.num_blocks).astype(np.int64)

    def rank_ranges(self, epoch: int) -> np.ndarray:
        """int64 [n, 2]: this rank's store ranges for the epoch, in order (before shuffling)."""
        starts = self.block_order(epoch) * self.block_size
        stops = np.minimum(starts + self.block_size, self.n_cells)
        lo = self.rank * self.cells_per_rank
        return _cut(starts, stops, lo, lo + self.cells_per_rank)

    def buffer(self, epoch: int, index: int, ranges: np.ndarray | None = None) -> BufferPlan:
        """Plan of buffer `index` of the epoch (`ranges` = `rank_ranges(epoch)`, if at hand)."""
        if not 0 <= index < self.num_buffers:
            raise IndexError(f"buffer {index} outside [0, {self.num_buffers})")
        if ranges is None:
            ranges = self.rank_ranges(epoch)
        lo = index * self.buffer_cells
        hi = min(lo + self.buffer_cells, self.cells_per_rank)
        sub = _cut(ranges[:, 0], ranges[:, 1], lo, hi)
        rng = np.random.default_rng([self.seed, int(epoch), self.rank, index])
        return BufferPlan(index=index, ranges=sub, order=rng.permutation(hi - lo).astype(np.int64))

    def buffers(self, epoch: int, start: int = 0):
        """Yield the epoch's buffer plans from buffer `start` on."""
        ranges = self.rank_ranges(epoch)
        for k in range(start, self.num_buffers):
            yield self.buffer(epoch, k, ranges)

    def locate(self, batches_emitted: int) -> tuple[int, int]:
        """(buffer index, rows of it already emitted) at the start of batch `batches_emitted`."""
        if not 0 <= batches_emitted <= self.num_batches:
            raise ValueError(
                f"batches_emitted={batches_emitted} outside [0, {self.num_batches}]")
        position = batches_emitted * self.batch_size
        return divmod(position, self.buffer_cells)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """int64 [cells_per_rank]: global cell index of the rank's stream, in emission order."""
        return np.concatenate([plan.cell_index() for plan in self.buffers(epoch)])

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        """The rank's batches of the epoch as arrays of global cell indices (for tests and tools)."""
        stream = self.epoch_indices(epoch)
        return [stream[b * self.batch_size:(b + 1) * self.batch_size]
                for b in range(self.num_batches)]
