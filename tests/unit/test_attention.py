"""Every attention backend matches the explicit reference, forward and backward, both masks."""

from __future__ import annotations

import pytest
import torch

from pertscale.models.attention import (
    ATTENTION_BACKENDS,
    BackendChoice,
    _merge_self,
    attention,
    plan_attention,
    resolve_backend,
)

torch.set_num_threads(2)
H, D = 4, 16
CPU_BACKENDS = [b for b in ATTENTION_BACKENDS if b != "flash_attn"]  # flash_attn: CUDA only


def _packed_batch(seed: int, lengths: list[int], known_ratio: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, D, generator=g, dtype=torch.float64).float() for _ in range(3))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    known = torch.rand(T, generator=g) < known_ratio
    known[cu[:-1].long()] = True  # <cls> is always known
    return q, k, v, cu, max(lengths), known


def _to_padded(x_T, cu):
    lengths = (cu[1:] - cu[:-1]).tolist()
    L = max(lengths)
    out = x_T.new_zeros((len(lengths), L) + tuple(x_T.shape[1:]))
    pad = torch.ones(len(lengths), L, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        out[i, :n] = x_T[s:s + n]
        pad[i, :n] = False
    return out, pad


def _run(backend, q, k, v, cu, max_len, known, generative):
    """Output and input gradients in the packed layout, whatever layout the backend takes."""
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    kn = known if generative else None
    if backend == "sdpa":
        (qp, pad), (kp, _), (vp, _) = _to_padded(q, cu), _to_padded(k, cu), _to_padded(v, cu)
        knp = None if kn is None else _to_padded(kn, cu)[0] & ~pad
        out_p = attention(qp, kp, vp, backend=backend, padding_mask=pad, known=knp)
        out = out_p[~pad]
    else:
        out = attention(q, k, v, backend=backend, cu_seqlens=cu, max_seqlen=max_len, known=kn)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("generative", [False, True], ids=["full", "generative"])
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("seed", [0, 1])
def test_backend_matches_reference(backend, generative, seed):
    lengths = [7, 1, 33, 18] if seed == 0 else [50, 3, 2, 64, 9]
    batch = _packed_batch(seed, lengths)
    expected = _run("reference", *batch, generative)
    got = _run(backend, *batch, generative)
    for name, e, g in zip(["out", "dq", "dk", "dv"], expected, got):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=f"{backend} {name}")


def test_generative_mask_semantics():
    """An unknown query sees only known keys and itself: changing another unknown key's value
    leaves it unchanged, changing a known one does not."""
    q, k, v, cu, max_len, known = _packed_batch(3, [12])
    known[:] = torch.tensor([True, True, False, False, True, False, True, False, True, False,
                             False, True])
    out = attention(q, k, v, backend="varlen", cu_seqlens=cu, max_seqlen=max_len, known=known)
    v2 = v.clone()
    v2[3] += 10.0                               # another unknown token (not 2)
    out2 = attention(q, k, v2, backend="varlen", cu_seqlens=cu, max_seqlen=max_len, known=known)
    torch.testing.assert_close(out2[2], out[2])
    assert not torch.allclose(out2[3], out[3])  # itself
    v3 = v.clone()
    v3[4] += 10.0                               # a known token
    out3 = attention(q, k, v3, backend="varlen", cu_seqlens=cu, max_seqlen=max_len, known=known)
    assert not torch.allclose(out3[2], out[2])


def test_generative_sequence_without_known_keys():
    """A cell with no known gene: its unknown queries see only themselves (out = v), exactly
    and with the reference's gradients."""
    q, k, v, cu, max_len, known = _packed_batch(5, [6, 9])
    known[:6] = False
    expected = _run("reference", q, k, v, cu, max_len, known, True)
    got = _run("varlen", q, k, v, cu, max_len, known, True)
    torch.testing.assert_close(got[0][:6], v[:6])
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_packed_sequences_do_not_attend_across_cells():
    q, k, v, cu, max_len, _ = _packed_batch(4, [5, 6])
    out = attention(q, k, v, backend="varlen", cu_seqlens=cu, max_seqlen=max_len)
    v2 = v.clone()
    v2[5:] += 3.0
    out2 = attention(q, k, v2, backend="varlen", cu_seqlens=cu, max_seqlen=max_len)
    torch.testing.assert_close(out2[:5], out[:5])


def test_unknown_backend_lists_options():
    q = torch.zeros(1, 2, H, D)
    with pytest.raises(ValueError, match="flash_attn.*reference.*sdpa.*varlen"):
        attention(q, q, q, backend="flash3")


@pytest.mark.parametrize("backend,kwargs", [
    ("sdpa", {"cu_seqlens": torch.tensor([0, 2], dtype=torch.int32)}),
    ("varlen", {"padding_mask": torch.zeros(1, 2, dtype=torch.bool)}),
])
def test_backend_rejects_wrong_layout(backend, kwargs):
    shape = (2, H, D) if "cu_seqlens" in kwargs else (1, 2, H, D)
    q = torch.zeros(shape)
    with pytest.raises(ValueError, match="layout"):
        attention(q, q, q, backend=backend, **kwargs)


@pytest.mark.parametrize("generative", [False, True], ids=["full", "generative"])
def test_varlen_bf16_close_to_fp32(generative):
    """bf16 training (DeepSpeed on CPU) takes the same kernels; softmax statistics stay fp32."""
    batch = _packed_batch(6, [20, 5, 31])
    expected = _run("reference", *batch, generative)
    q, k, v, cu, max_len, known = batch
    got = _run("varlen", q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, max_len, known,
               generative)
    for e, g in zip(expected, got):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), e, atol=0.05, rtol=0.05)


def test_generative_merge_of_a_row_without_keys_ignores_the_kernels_lse():
    """FlashAttention-2 writes +inf as the log-sum-exp of a query with no keys, torch's CPU path
    -inf: both merge to the same finite output (out = v for an unknown query of a cell with no
    known gene), never NaN."""
    T = 5
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    known = torch.tensor([True, False, False, False, False])
    no_keys = torch.tensor([False, False, True, True, True])  # tokens 2-4: a cell of no known gene
    o_known = torch.randn(T, H, D, generator=g)
    lse_known = torch.randn(T, H, generator=g)
    merged = {}
    for fill in (float("inf"), float("-inf"), 3.0):
        lse = lse_known.clone()
        lse[2:] = fill
        o = o_known.clone()
        o[2:] = float("nan") if fill == 3.0 else 0.0  # what a kernel leaves there is not read
        merged[fill], lse_out, w_self = _merge_self(o, lse, no_keys, q, k, v, known, 0.25)
        assert torch.isfinite(merged[fill]).all() and torch.isfinite(lse_out).all()
        torch.testing.assert_close(merged[fill][2:], v[2:])
        torch.testing.assert_close(w_self[2:], torch.ones(3, H))
    torch.testing.assert_close(merged[float("inf")], merged[float("-inf")])
    torch.testing.assert_close(merged[3.0], merged[float("-inf")])


def test_resolve_backend_auto_and_refusals():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", layout="padded", device=cpu) == "sdpa"
    assert resolve_backend("auto", layout="packed", device=cpu) == "varlen"
    with pytest.raises(ValueError, match="'flash_attn' runs on CUDA only"):
        resolve_backend("flash_attn", layout="packed", device=cpu)
    with pytest.raises(ValueError, match="'sdpa' takes the padded layout"):
        resolve_backend("sdpa", layout="packed", device=cpu)
    with pytest.raises(ValueError, match="'varlen' takes the packed layout"):
        resolve_backend("varlen", layout="padded", device=cpu)


def test_backend_choice_resolves_once_and_logs(caplog):
    choice = BackendChoice("auto", "scgpt")
    with caplog.at_level("INFO", logger="pertscale.models.attention"):
        for _ in range(3):
            assert choice("packed", torch.device("cpu")) == "varlen"
        assert choice("padded", torch.device("cpu")) == "sdpa"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [("scgpt attention: packed batches on cpu run torch flash kernel per "
                      "sequence (CPU) (requested 'auto')"),
                     "scgpt attention: padded batches on cpu run sdpa (padded) (requested 'auto')"]


def test_generative_index_sets_are_computed_once_per_batch(monkeypatch):
    """The plan computes the known-key index sets (a device sync on CUDA) once; the layers
    sharing it never call nonzero() or max() again."""
    q, k, v, cu, max_len, known = _packed_batch(8, [9, 4, 12])
    plan = plan_attention("varlen", cu_seqlens=cu, max_seqlen=max_len, known=known)
    calls = []
    for name in ("nonzero", "max"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=original, _n=name, **kw: (calls.append(_n),
                                                                        _o(self, *a, **kw))[1])
    outs = [attention(q, k, v, plan=plan) for _ in range(4)]  # four layers
    monkeypatch.undo()
    assert calls == []
    expected = attention(q, k, v, backend="reference", cu_seqlens=cu, max_seqlen=max_len,
                         known=known)
    torch.testing.assert_close(outs[-1], expected, atol=1e-5, rtol=1e-5)
