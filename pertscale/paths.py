"""Where pertscale keeps things on disk by default (the embedded default root)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_tracking_uri", "make_dir", "storage_root"]


def storage_root() -> Path:
    """Root for stores, the MLflow database and artifacts, checkpoints and run outputs:
    env PERTSCALE_STORAGE if set, else ./storage (the repository's storage/ when run from it)."""
    return Path(os.environ.get("PERTSCALE_STORAGE", "storage")).resolve()


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a real server on a cluster), else the embedded SQLite
    database under the storage root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = storage_root() / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def make_dir(path: str | Path, what: str = "output") -> Path:
    """The folder `path`, made with its parents; a file in its place is refused by name (not
    '[Errno 17] File exists')."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{what} {path} exists and is not a directory; choose a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path
