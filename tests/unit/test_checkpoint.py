"""The RNG state of a checkpoint: what a rank draws from, on its own device only."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pertscale.training.checkpoint import capture_rng, restore_rng


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
