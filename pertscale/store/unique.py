"""Cell ids unique across a store's blocks in bounded memory.

A writer hashes every block's cell ids to 64 bits. Equal ids have equal hashes, so the rows that
share a hash with another row are the only candidates for a duplicate; the writer confirms them
on the stored ids. Up to `memory_hashes` hashes are kept in memory (2 MiB by default: a store of
up to 262,144 cells is checked in memory). Past that, the hashes and their rows go to `PARTITIONS`
scratch files by their top bits, and each file is checked on its own at the end: memory is a
spill (~10 MiB while it sorts) or one partition (16 bytes x cells / 256: 3 MiB at 50M cells), not
8 bytes per cell.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

__all__ = ["IdHashes"]

PARTITIONS = 256
DEFAULT_MEMORY_HASHES = 2**18
_SHIFT = np.uint64(64 - 8)  # top 8 bits of a hash: its partition


class IdHashes:
    """64-bit id hashes of consecutive rows; `shared_rows()` gives the rows whose hash equals
    another row's. Scratch files (only past `memory_hashes`) live in `scratch_dir`, which this
    object creates and removes (`close`)."""

    def __init__(self, scratch_dir: Path, *, memory_hashes: int | None = None):
        self.dir = Path(scratch_dir)
        self.memory_hashes = memory_hashes or DEFAULT_MEMORY_HASHES
        self._hashes: list[np.ndarray] = []
        self._first_row = 0  # row of the first hash held in memory
        self._held = 0
        self._spilled = False

    def add(self, hashes: np.ndarray) -> None:
        """The hashes of the next rows, in row order."""
        self._hashes.append(np.asarray(hashes, np.uint64))
        self._held += len(hashes)
        if self._held >= self.memory_hashes:
            self._spill()

    def _spill(self) -> None:
        if not self._hashes:
            return
        hashes = np.concatenate(self._hashes)
        rows = np.arange(self._first_row, self._first_row + len(hashes), dtype=np.int64)
        part = (hashes >> _SHIFT).astype(np.uint8)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(PARTITIONS + 1))
        if not self._spilled:
            if self.dir.exists():
                raise FileExistsError(f"{self.dir} exists; it is the id check's scratch folder")
            self.dir.mkdir(parents=True)
            self._spilled = True
        for p in np.flatnonzero(np.diff(bounds)):
            sel = order[bounds[p]:bounds[p + 1]]
            with open(self.dir / f"part-{p:03d}", "ab") as f:
                f.write(np.stack([hashes[sel].view(np.int64), rows[sel]], axis=1).tobytes())
        self._first_row += len(hashes)
        self._hashes, self._held = [], 0

    def shared_rows(self) -> np.ndarray:
        """Sorted rows whose id hash equals another row's (candidates for a duplicate id)."""
        if not self._spilled:
            hashes = np.concatenate(self._hashes) if self._hashes else np.zeros(0, np.uint64)
            return _shared(hashes, np.arange(self._first_row, self._first_row + len(hashes)))
        self._spill()
        found = []
        for path in sorted(self.dir.iterdir()):
            pairs = np.fromfile(path, np.int64).reshape(-1, 2)
            found.append(_shared(pairs[:, 0], pairs[:, 1]))
        return np.unique(np.concatenate(found))

    def close(self) -> None:
        if self._spilled and self.dir.exists():
            shutil.rmtree(self.dir)
        self._hashes, self._held = [], 0


def _shared(hashes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    order = np.argsort(hashes, kind="stable")
    same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
    if same.size == 0:
        return np.zeros(0, np.int64)
    return np.unique(rows[np.concatenate([order[same], order[same + 1]])])
