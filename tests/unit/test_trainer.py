"""Worker environments: CPU workers run DeepSpeed's CPU accelerator, GPU workers never do."""

from __future__ import annotations

import logging

from pertscale.training.trainer import worker_env


def test_cpu_workers_get_the_cpu_accelerator(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert worker_env(use_gpu=False, torch_threads=3) == {"OMP_NUM_THREADS": "3",
                                                          "DS_ACCELERATOR": "cpu"}


def test_gpu_workers_do_not_inherit_the_makefiles_cpu_accelerator(monkeypatch, caplog):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what `make` and CPU shells export
    with caplog.at_level(logging.INFO, logger="pertscale.training.trainer"):
        env = worker_env(use_gpu=True, torch_threads=1)
    assert env["DS_ACCELERATOR"] == "cuda"
    assert "GPU workers get DS_ACCELERATOR=cuda" in caplog.text
    monkeypatch.delenv("DS_ACCELERATOR")
    assert worker_env(use_gpu=True, torch_threads=1)["DS_ACCELERATOR"] == "cuda"
    monkeypatch.setenv("DS_ACCELERATOR", "npu")  # another accelerator the user chose
    assert worker_env(use_gpu=True, torch_threads=1)["DS_ACCELERATOR"] == "npu"
