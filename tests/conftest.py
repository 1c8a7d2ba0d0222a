"""Shared fixtures: repository paths, the shared real-data folder, an isolated storage root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip cleanly where CUDA is absent (this machine, CI)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the repository; skip where a user's machine lacks it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def storage_dir(tmp_path, monkeypatch) -> Path:
    """An isolated embedded-default storage root (stores, MLflow sqlite, checkpoints)."""
    root = tmp_path / "storage"
    root.mkdir()
    monkeypatch.setenv("PERTSCALE_STORAGE", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root
