"""CUDA kernels against the fp32 reference: every backend in bf16, both mask modes, a cell
without known genes, forward and backward. Skipped without CUDA (tests/conftest.py).

Tolerance: the inputs are rounded to bf16 once; the reference runs on those very values in
fp32. A bf16 kernel keeps its softmax statistics in fp32 and rounds its output (and gradients)
to bf16 (8 bits of mantissa, relative step 2^-8 = 0.0039), so outputs and gradients must agree
within atol = rtol = 2e-2 (about 5 bf16 steps at unit scale)."""

from __future__ import annotations

import pytest
import torch

from pertscale.models.attention import _flash_attn_varlen, attention, plan_attention

pytestmark = pytest.mark.gpu
H, D = 8, 64
TOL = {"atol": 2e-2, "rtol": 2e-2}


def _batch(seed: int, lengths: list[int], no_known_cell: bool):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, generator=g).bfloat16().cuda() for _ in range(3))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    known = torch.rand(T, generator=g) < 0.6
    known[cu[:-1].long()] = True
    if no_known_cell:
        known[cu[1]:cu[2]] = False  # the second cell: no known gene at all
    return q, k, v, cu.cuda(), max(lengths), known.cuda()


def _padded(x_T, cu):
    lengths = (cu[1:] - cu[:-1]).tolist()
    out = x_T.new_zeros((len(lengths), max(lengths)) + tuple(x_T.shape[1:]))
    pad = torch.ones(len(lengths), max(lengths), dtype=torch.bool, device=x_T.device)
    for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        out[i, :n] = x_T[s:s + n]
        pad[i, :n] = False
    return out, pad


def _run(backend, q, k, v, cu, max_len, known, generative, dtype):
    q, k, v = (t.to(dtype).clone().requires_grad_(True) for t in (q, k, v))
    kn = known if generative else None
    if backend == "sdpa":
        (qp, pad), (kp, _), (vp, _) = _padded(q, cu), _padded(k, cu), _padded(v, cu)
        knp = None if kn is None else _padded(kn, cu)[0] & ~pad
        out = attention(qp, kp, vp, plan=plan_attention("sdpa", padding_mask=pad, known=knp))
        out = out[~pad]
    else:
        out = attention(q, k, v, plan=plan_attention(backend, cu_seqlens=cu, max_seqlen=max_len,
                                                     known=kn))
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    (out.float() * weights).sum().backward()
    return [t.float() for t in (out.detach(), q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("no_known_cell", [False, True], ids=["known", "cell-without-known"])
@pytest.mark.parametrize("generative", [False, True], ids=["full", "generative"])
@pytest.mark.parametrize("backend", ["sdpa", "varlen", "flash_attn"])
def test_backend_in_bf16_matches_the_fp32_reference(backend, generative, no_known_cell):
    if backend == "flash_attn" and _flash_attn_varlen()[0] is None:
        pytest.skip(f"flash-attn is not installed here ({_flash_attn_varlen()[1]})")
    if no_known_cell and not generative:
        pytest.skip("only the generative mask has known genes")
    batch = _batch(0, [130, 7, 513, 64, 1], no_known_cell)
    expected = _run("reference", *batch, generative, torch.float32)
    got = _run(backend, *batch, generative, torch.bfloat16)
    for name, e, g in zip(["out", "dq", "dk", "dv"], expected, got):
        assert torch.isfinite(g).all(), f"{backend} {name} has NaN/inf"
        torch.testing.assert_close(g, e, **TOL, msg=f"{backend} {name}")
    if generative and no_known_cell:  # the unknown genes of a cell with none known see themselves
        s, e = batch[3][1].item(), batch[3][2].item()
        torch.testing.assert_close(got[0][s:e], batch[2][s:e].float(), **TOL)


def test_auto_picks_one_backend_and_flash_is_refused_when_absent():
    from pertscale.models.attention import resolve_backend

    cuda = torch.device("cuda")
    expected = "flash_attn" if _flash_attn_varlen()[0] is not None else "varlen"
    assert resolve_backend("auto", layout="packed", device=cuda) == expected
    if _flash_attn_varlen()[0] is None:
        with pytest.raises(ValueError, match="flash-attn does not import"):
            resolve_backend("flash_attn", layout="packed", device=cuda)
