"""File checksums shared by every layer (store sources, simulator manifests, embedding tables,
registered models)."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_sha256"]


def file_sha256(path: str | Path, block: int = 1 << 24) -> str:
    """sha256 hex digest of a file, read in blocks (memory stays bounded for any size)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
