"""One GPU, the real engine: 20 bf16 steps of scgpt's small flavor through DeepSpeed (ZeRO-2,
torch's fused AdamW), inputs pinned and copied without blocking. Skipped without CUDA."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import torch

from pertscale.bench.step import StepBenchConfig, synthetic_csr_batch
from pertscale.data.tokenizer import Tokenizer, TokenizerConfig
from pertscale.models.scgpt import ScGPTConfig, build_scgpt
from pertscale.training.engine import EngineConfig, build_ds_config, build_engine
from pertscale.training.flops import mfu, model_flops, non_embedding_params, sequence_work
from pertscale.training.inputs import InputStream
from pertscale.training.loop import _to_device, device_peak_flops

pytestmark = pytest.mark.gpu
N_GENES = 20000


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank nccl group, as Ray Train sets up for a single GPU worker."""
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        pytest.skip(f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} in this shell (`make test` "
                    "exports cpu); bench/gpu_check.sh runs these tests with cuda")
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp = pytest.MonkeyPatch()
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        mp.setenv(key, value)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    yield torch.device("cuda", 0)
    dist.destroy_process_group()
    mp.undo()


class _Batches:
    """Four synthetic CSR batches of ~1500 expressed genes, as a loader hands them out."""

    def __init__(self, n: int = 4, cells: int = 8) -> None:
        cfg = StepBenchConfig(batch_size=cells, n_genes=N_GENES, median_genes=1500.0)
        rng = np.random.default_rng(0)
        self.batches = [synthetic_csr_batch(cfg, rng) for _ in range(n)]
        self.num_batches, self._emitted, self.epoch = n, 0, 0

    def state_dict(self):
        return {"epoch": self.epoch, "batches_emitted": self._emitted}

    def __iter__(self):
        if self._emitted >= self.num_batches:
            self.epoch, self._emitted = self.epoch + 1, 0
        while self._emitted < self.num_batches:
            self._emitted += 1
            yield self.batches[self._emitted - 1]


def test_small_flavor_bf16_pretrain_loss_falls_and_mfu_is_measured(one_rank):
    device = one_rank
    model_cfg = ScGPTConfig(flavor="small")
    torch.manual_seed(0)
    model = build_scgpt(model_cfg, range(N_GENES + 3))
    ds = build_ds_config(EngineConfig(zero_stage=2, precision="bf16", lr=1e-4, warmup_steps=2),
                         micro_batch_size=8, world_size=1, total_steps=20, use_gpu=True)
    assert ds["optimizer"]["params"]["fused"] is True  # no nvcc needed
    engine = build_engine(model, ds)
    tok = Tokenizer(TokenizerConfig(max_seq_len=1201), range(N_GENES + 3))
    stream = InputStream(_Batches(), lambda b, generator: tok(b, generator=generator), seed=0,
                         rank=0, pin_memory=True, work=sequence_work)
    peak = device_peak_flops(device, "bf16")
    n_compute = non_embedding_params(engine.module)
    layers, width = model_cfg.attention_shape()
    losses, flops = [], 0.0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while len(losses) < 20:
        for item in stream.epoch_items():
            assert all(v.is_pinned() for v in item.inputs.values() if torch.is_tensor(v))
            out = engine(_to_device(item.inputs, device))
            engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss))
            flops += model_flops(n_compute, item.tokens, n_layers=layers, d_model=width,
                                 sum_sq_len=item.sum_sq_len)
            if len(losses) == 20:
                break
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    if peak is None:
        pytest.skip(f"{torch.cuda.get_device_name()} has no peak in PEAK_FLOPS: no MFU")
    value = mfu(flops, elapsed, peak)
    print(f"20 steps: {elapsed:.2f} s, MFU {value:.3f} (with the per-step loss read-back)")
    assert 0.0 < value < 1.0  # a physical fraction of the device's peak
