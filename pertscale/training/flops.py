"""Model FLOPs utilisation (MFU): the model's useful FLOPs per second over the device's peak.

    FLOPs of a window = 6 x N x tokens + 12 x layers x d_model x sum(len^2)

N counts the non-embedding parameters (an embedding lookup is a gather, not a matmul: counting
the gene table as 6 FLOPs per weight per token overstates MFU by the vocabulary's share), and
the second term is self-attention's QK^T and AV (2 x 2 x len x d_model per token forward, x3
with backward) over the real (unpadded) length of each sequence. Written per token as the
issue writes it: (6 N + 12 L d (sum len^2 / sum len)) x tokens, summed over a window of
batches it is the formula above. Padding, masked-out attention entries and recomputation are
not useful work and are not counted, so padded and packed batches of the same cells score
the same model FLOPs and their MFU compares their speed.

The peak is the device's dense tensor-core rate for the training precision (bf16 and fp16
share it), chosen by the device name reported by CUDA; fp32 uses the TF32 tensor-core rate
when torch allows TF32 matmuls, else the plain FP32 rate. An unknown device has no peak, and
then no MFU is logged (said once in the worker's log)."""

from __future__ import annotations

import re
from typing import Any

import torch

from pertscale.constants import CU_SEQLENS, GENE_IDS, PADDING_MASK

__all__ = ["PEAK_FLOPS", "mfu", "model_flops", "non_embedding_params", "peak_flops",
           "sequence_work"]

# (device-name pattern, dense peak FLOP/s by precision); the first match wins, so the more
# specific names come first (an "H100 PCIe" must not match the SXM row). Sources: NVIDIA data
# sheets, dense (without 2:4 sparsity).
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"H100 PCIe", {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"H200 NVL", {"bf16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"H100|H200|GH200", {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12}),  # SXM
    (r"A100", {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    (r"L40S", {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"L40\b", {"bf16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"L4\b", {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    (r"A10\b", {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
)


def peak_flops(device_name: str, precision: str, *, tf32: bool = False) -> float | None:
    """Dense peak FLOP/s of the named device at `precision` (fp32, bf16, fp16); None when the
    device is not in PEAK_FLOPS. `tf32`: fp32 matmuls run on TF32 tensor cores."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r} is not one of ['bf16', 'fp16', 'fp32']")
    key = "bf16" if precision in ("bf16", "fp16") else ("tf32" if tf32 else "fp32")
    return next((peaks[key] for pattern, peaks in PEAK_FLOPS
                 if re.search(pattern, device_name)), None)


def non_embedding_params(module: torch.nn.Module) -> int:
    """Parameters outside nn.Embedding tables (full sizes, also when ZeRO-3 partitions them)."""
    embedding = {id(p) for m in module.modules() if isinstance(m, torch.nn.Embedding)
                 for p in m.parameters(recurse=False)}
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()
               if id(p) not in embedding)


def sequence_work(inputs: dict[str, Any]) -> tuple[int, int]:
    """(real tokens, sum over sequences of length^2) of a token batch in either layout
    (packed: `cu_seqlens`; padded: `padding_mask`). Read on the host, before the copy to the
    device, so it never waits for a GPU."""
    if CU_SEQLENS in inputs:
        lengths = (inputs[CU_SEQLENS][1:] - inputs[CU_SEQLENS][:-1]).long()
        return int(inputs[GENE_IDS].numel()), int((lengths * lengths).sum())
    lengths = (~inputs[PADDING_MASK]).sum(dim=1).long()
    return int(lengths.sum()), int((lengths * lengths).sum())


def model_flops(n_params: int, tokens: int, *, n_layers: int = 0, d_model: int = 0,
                sum_sq_len: int = 0) -> float:
    """Forward + backward model FLOPs of `tokens` tokens (module docstring): 6 N per token plus
    12 x layers x d_model x sum of squared sequence lengths for self-attention."""
    return 6.0 * n_params * tokens + 12.0 * n_layers * d_model * sum_sq_len


def mfu(flops: float, seconds: float, peak: float, devices: int = 1) -> float:
    """Model FLOPs utilisation: `flops` done in `seconds` over `devices` devices of `peak`."""
    return flops / max(seconds, 1e-12) / (peak * devices)
