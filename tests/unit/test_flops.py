"""MFU counts the model's matmul work: non-embedding parameters and attention, against a hand
count; the device peak follows the device's name and the training precision."""

from __future__ import annotations

import pytest
import torch

from pertscale.constants import CU_SEQLENS, GENE_IDS, PADDING_MASK
from pertscale.models.scgpt import ScGPTConfig, build_scgpt
from pertscale.training.flops import model_flops, non_embedding_params, peak_flops, sequence_work


def _hand_count_debug_scgpt() -> int:
    """scgpt's debug size (d 64, 2 layers, d_ff 128) counted by hand, gene table left out."""
    C, F = 64, 128
    linear = lambda i, o: i * o + o
    norm = 2 * C
    layer = linear(C, 3 * C) + linear(C, C) + linear(C, F) + linear(F, C) + 2 * norm
    value_encoder = linear(1, C) + linear(C, C) + norm
    expr_decoder = 2 * linear(C, C) + linear(C, 1)
    mvc_decoder = linear(C, C) + C * C  # gene2query, W without bias
    return norm + value_encoder + 2 * layer + expr_decoder + mvc_decoder  # gene_norm first


def test_non_embedding_parameters_match_a_hand_count_and_ignore_the_vocabulary():
    small = build_scgpt(ScGPTConfig(flavor="debug"), [str(i) for i in range(103)])
    large = build_scgpt(ScGPTConfig(flavor="debug"), [str(i) for i in range(20003)])
    assert non_embedding_params(small) == _hand_count_debug_scgpt() == 88129
    assert non_embedding_params(large) == non_embedding_params(small)
    # the gene table alone is 20003 x 64 weights: counting it would add 14x the real work
    assert sum(p.numel() for p in large.parameters()) - non_embedding_params(large) == 20003 * 64


def test_model_flops_formula_by_hand():
    lengths = [3, 7, 1]
    tokens, sum_sq = sum(lengths), sum(n * n for n in lengths)
    N, layers, d = 88129, 2, 64
    got = model_flops(N, tokens, n_layers=layers, d_model=d, sum_sq_len=sum_sq)
    # (6 N + 12 L d (sum len^2 / sum len)) x tokens, as the README states it
    assert got == pytest.approx((6 * N + 12 * layers * d * sum_sq / tokens) * tokens)
    assert got == 6 * 88129 * 11 + 12 * 2 * 64 * 59


def test_sequence_work_is_the_same_for_both_layouts():
    cu = torch.tensor([0, 3, 10, 11], dtype=torch.int32)
    packed = {GENE_IDS: torch.zeros(11, dtype=torch.long), CU_SEQLENS: cu}
    pad = torch.ones(3, 7, dtype=torch.bool)
    for i, n in enumerate([3, 7, 1]):
        pad[i, :n] = False
    padded = {GENE_IDS: torch.zeros(3, 7, dtype=torch.long), PADDING_MASK: pad}
    assert sequence_work(packed) == sequence_work(padded) == (11, 9 + 49 + 1)


@pytest.mark.parametrize("name, precision, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989e12),   # SXM
    ("NVIDIA H100 PCIe", "bf16", False, 756e12),
    ("NVIDIA H100 NVL", "fp16", False, 835e12),
    ("NVIDIA H200", "bf16", False, 989e12),
    ("NVIDIA H100 80GB HBM3", "fp32", False, 67e12),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.5e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312e12),
    ("NVIDIA L40S", "bf16", False, 362e12),
    ("NVIDIA L40", "bf16", False, 181e12),
    ("NVIDIA L4", "bf16", False, 121e12),
    ("NVIDIA A10", "bf16", False, 125e12),
    ("Tesla T4", "bf16", False, None),
])
def test_peak_follows_device_name_and_precision(name, precision, tf32, peak):
    assert peak_flops(name, precision, tf32=tf32) == peak


def test_peak_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="precision='int8' is not one of"):
        peak_flops("NVIDIA H100 PCIe", "int8")
