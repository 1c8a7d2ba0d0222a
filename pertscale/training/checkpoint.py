"""Training checkpoints: what one rank writes and reads back to resume exactly.

A checkpoint is one directory; every rank writes its own files into a local directory and Ray
Train merges the ranks' files into one directory in its storage (local path or s3://):

    engine/latest, engine/state/...   DeepSpeed `save_checkpoint` (every rank's ZeRO shards)
    loader_rank{r}.json               the rank's loader position after the last consumed batch
    rng_rank{r}.pt                    python, numpy, torch RNG and the rank's own CUDA device's
    progress_rank{r}.json             step, cells/tokens consumed, digest of the consumed cell ids,
                                      best validation score and its step (validated tasks)
    best_weights.safetensors          rank 0, validated tasks: full weights of the best step
    model/                            rank 0, final checkpoint only: full fp32 weights
                                      (safetensors), config, gene vocabulary, manifest
    meta.json                         rank 0: step, world size, ZeRO stage, final flag, and the
                                      step this attempt resumed from (null: started fresh)

They are written in that order (engine state, loader, RNG, step) and the directory is reported
only when complete, so a checkpoint Ray registers is always whole. `meta.json` says what a
checkpoint is; resuming with a different world size or ZeRO stage is refused, because both
the ZeRO shards and the loader's per-rank plan depend on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "BEST_FILE",
    "ENGINE_DIR",
    "ENGINE_TAG",
    "META_FILE",
    "MODEL_DIR",
    "CheckpointError",
    "Progress",
    "capture_rng",
    "load_rank_state",
    "local_checkpoint",
    "read_meta",
    "restore_rng",
    "save_rank_state",
    "write_meta",
]

ENGINE_DIR = "engine"
ENGINE_TAG = "state"
MODEL_DIR = "model"
META_FILE = "meta.json"
BEST_FILE = "best_weights.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot resume this job; the message names the file and the mismatch."""


@dataclasses.dataclass
class Progress:
    """How far one rank has come: optimizer steps, micro-batches, cells and tokens consumed, and
    a chained sha256 over the consumed cell indices (equal digests = the same cells, in order)."""

    step: int = 0
    micro_step: int = 0
    cells: int = 0
    tokens: int = 0
    cells_digest: str = ""
    best_score: float | None = None
    """Validated tasks: the best validation score so far (lower is better) ..."""
    best_step: int = -1
    """... and the optimizer step it was reached at (its weights: BEST_FILE, rank 0) ..."""
    stale_epochs: int = 0
    """... and the epochs since, in a row, that did not improve on it (early stopping)."""

    def record_score(self, score: float) -> bool:
        """An epoch's validation score at the current step: True when it is the best so far
        (strictly lower); counts the epochs in a row that were not."""
        improved = self.best_score is None or score < self.best_score
        if improved:
            self.best_score, self.best_step, self.stale_epochs = score, self.step, 0
        else:
            self.stale_epochs += 1
        return improved

    def consume(self, cell_index: np.ndarray, num_tokens: int) -> None:
        h = hashlib.sha256(self.cells_digest.encode())
        h.update(np.ascontiguousarray(cell_index, dtype=np.int64).tobytes())
        self.cells_digest = h.hexdigest()
        self.cells += len(cell_index)
        self.tokens += int(num_tokens)
        self.micro_step += 1


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every random state the step draws from: python, numpy, torch CPU (dropout, sampling) and
    the CUDA generator of this worker's own device (never another rank's GPU). The inputs'
    draws (masking, gene sampling) come from per-batch generators and need no state."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Put back what `capture_rng` took; a CUDA state is restored on this worker's device. A run
    saved on GPUs and resumed on CPUs (or the reverse) cannot replay its dropout exactly."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if ("cuda" in state) != (device.type == "cuda"):
        log.warning("checkpoint RNG state was saved %s a CUDA generator and is restored on %s: "
                    "dropout after the resume differs from the uninterrupted run",
                    "with" if "cuda" in state else "without", device)
    elif "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _rng_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """The RNG state with numpy's key array as a tensor, so the file loads with
    torch.load(weights_only=True) (tensors, numbers, strings, tuples only)."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                               int(pos), int(has_gauss), float(cached))}


def _rng_from_tensors(state: dict[str, Any]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state["numpy"]
    return {**state, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)}


def save_rank_state(ckpt_dir: Path, rank: int, *, engine, loader_state: dict[str, Any],
                    rng_state: dict[str, Any], progress: Progress) -> None:
    """Write this rank's part, in order: engine state (collective: every rank calls it), loader
    state, RNG states, progress."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(ckpt_dir / ENGINE_DIR), tag=ENGINE_TAG,
                           client_state={"step": progress.step})
    (ckpt_dir / f"loader_rank{rank}.json").write_text(json.dumps(loader_state))
    torch.save(_rng_tensors(rng_state), ckpt_dir / f"rng_rank{rank}.pt")
    (ckpt_dir / f"progress_rank{rank}.json").write_text(
        json.dumps(dataclasses.asdict(progress)))


def load_rank_state(ckpt_dir: Path, rank: int, *, engine) -> tuple[dict, dict, Progress]:
    """Restore the engine (collective) and return (loader state, RNG state, progress) of `rank`."""
    files = [ckpt_dir / f"{kind}_rank{rank}.{ext}"
             for kind, ext in (("loader", "json"), ("rng", "pt"), ("progress", "json"))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt_dir} lacks {missing} for rank {rank}")
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir / ENGINE_DIR), tag=ENGINE_TAG)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no engine state under {ckpt_dir / ENGINE_DIR}")
    loader_state = json.loads(files[0].read_text())
    rng_state = _rng_from_tensors(torch.load(files[1], weights_only=True))
    progress = Progress(**json.loads(files[2].read_text()))
    if client_state.get("step") != progress.step:
        raise CheckpointError(
            f"checkpoint {ckpt_dir}: engine step {client_state.get('step')} != "
            f"progress step {progress.step} of rank {rank}")
    return loader_state, rng_state, progress


@contextlib.contextmanager
def local_checkpoint(checkpoint, rank: int) -> Iterator[Path]:
    """A Ray checkpoint as a local folder for one rank to read, removed afterwards.

    A checkpoint on the local filesystem is read in place. One in remote run storage (s3://...)
    is downloaded into a folder of this rank's own, never Ray's `as_directory()`: that folder is
    shared by every process on a node, and one rank's cleanup can remove it while another rank
    waits for it ("Checkpoint directory ... does not exist, even though it should have been
    created by another process")."""
    import pyarrow.fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"pertscale-restore-rank{rank}-"))
    try:
        checkpoint.to_directory(str(tmp))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_meta(ckpt_dir: Path, meta: dict[str, Any]) -> None:
    (ckpt_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(ckpt_dir: Path, *, world_size: int | None = None,
              zero_stage: int | None = None) -> dict[str, Any]:
    """The checkpoint's meta.json, checked against the resuming job's world size / ZeRO stage."""
    path = ckpt_dir / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no {META_FILE}: not a complete pertscale checkpoint")
    meta = json.loads(path.read_text())
    for key, want in (("world_size", world_size), ("zero_stage", zero_stage)):
        if want is not None and meta.get(key) != want:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} was written with {key}={meta.get(key)}; this job has "
                f"{key}={want}. Resume with the same {key}, or start a new run name")
    return meta
