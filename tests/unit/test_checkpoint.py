"""The RNG state of a checkpoint: what a rank draws from, on its own device only; a remote
checkpoint as each rank's own local folder."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pertscale.training.checkpoint import capture_rng, local_checkpoint, restore_rng


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_restore_replays_the_draws_of_every_stream():
    state = capture_rng(torch.device("cpu"))
    first = _draws()
    restore_rng(state, torch.device("cpu"))
    assert _draws() == first


def test_a_cpu_worker_never_touches_cuda(monkeypatch):
    """A CPU rank's state holds no CUDA generator, and capturing or restoring it never asks
    CUDA (which would initialise every visible GPU from every rank)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a CPU worker called into torch.cuda")

    for name in ("get_rng_state", "get_rng_state_all", "set_rng_state", "set_rng_state_all",
                 "is_available"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    state = capture_rng(torch.device("cpu"))
    assert set(state) == {"python", "numpy", "torch"}
    restore_rng(state, torch.device("cpu"))


@pytest.mark.gpu
def test_a_gpu_worker_saves_and_restores_its_own_device_only():
    device = torch.device("cuda", torch.cuda.current_device())
    state = capture_rng(device)
    torch.testing.assert_close(state["cuda"], torch.cuda.get_rng_state(device))
    first = torch.rand(5, device=device)
    restore_rng(state, device)
    torch.testing.assert_close(torch.rand(5, device=device), first)


def test_ranks_on_one_node_each_read_a_remote_checkpoint_in_their_own_folder(tmp_path):
    """Ray's as_directory() shares one download folder per node, and one rank's cleanup could
    remove it under another (CI failure of the S3 run-storage test). Each rank gets its own
    copy, whatever the other does, and nothing is left behind."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    remote = tmp_path / "bucket"
    (remote / "ckpt" / "engine").mkdir(parents=True)
    (remote / "ckpt" / "meta.json").write_text('{"step": 3}')
    (remote / "ckpt" / "engine" / "state.pt").write_bytes(b"x" * 1000)
    # a filesystem that is not LocalFileSystem, as S3 is not
    fs = pafs.SubTreeFileSystem(str(remote), pafs.LocalFileSystem())
    ckpt = Checkpoint("ckpt", filesystem=fs)
    seen: dict[int, tuple[Path, str, int]] = {}
    both_in = threading.Barrier(2)

    def read(rank: int) -> None:
        with local_checkpoint(ckpt, rank) as folder:
            both_in.wait(timeout=30)  # both ranks hold their folders at once
            seen[rank] = (folder, (folder / "meta.json").read_text(),
                          (folder / "engine" / "state.pt").stat().st_size)

    threads = [threading.Thread(target=read, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[0][1:] == seen[1][1:] == ('{"step": 3}', 1000)
    assert seen[0][0] != seen[1][0]
    assert not seen[0][0].exists() and not seen[1][0].exists()
    with local_checkpoint(Checkpoint.from_directory(str(remote / "ckpt")), 0) as folder:
        assert folder == remote / "ckpt"  # a local checkpoint is read in place, never removed
    assert (remote / "ckpt" / "meta.json").is_file()
