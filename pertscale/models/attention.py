"""Attention backends chosen by name: identical math, different kernels.

Legend: B cells, L padded length, T packed tokens (sum of lengths), N sequences in a packed
batch, H heads, D head dim.

Layouts: padded q/k/v are [B, L, H, D] with `padding_mask` [B, L] (True = pad); packed q/k/v are
[T, H, D] with `cu_seqlens` [N+1] (int32) and `max_seqlen`.

Mask modes: full attention (`known=None`), or scGPT's generative mask (`known` [B, L] | [T],
True where a gene's value is given): known queries attend to the known keys of their cell,
unknown queries attend to the known keys and to themselves.

Backends (`ATTENTION_BACKENDS`):
- `reference`: explicit softmax(QK^T)V with a dense mask, per sequence when packed; for tests.
- `sdpa`: torch scaled_dot_product_attention on the padded layout (key padding mask; the
  generative mode adds a [B, 1, L, L] boolean mask, which the padded layout costs anyway).
- `varlen`: packed layout, no padding and no T x T mask. Full attention runs flash_attn's
  `flash_attn_varlen_func` when installed on CUDA, else torch's FlashAttention-2 varlen kernel
  on CUDA, else (CPU) torch's flash kernel once per sequence. The generative mode attends over
  the gathered known keys with the same kernels and merges the self term exactly through the
  returned log-sum-exp; its backward reuses the kernel's backward with the merged output and
  log-sum-exp (as ring attention does), plus the closed-form gradient of the self term. On CUDA
  that mode uses torch's vendored FlashAttention-2 kernels (stable forward/backward entry points
  that accept a given output and log-sum-exp) whether or not flash_attn is installed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_BACKENDS", "attention", "reference_attention", "sdpa_attention",
           "varlen_attention"]


def _allowed_BLL(padding_mask_BL: torch.Tensor | None, known_BL: torch.Tensor | None,
                 B: int, L: int, device: torch.device) -> torch.Tensor:
    """Dense boolean [B, L(query), L(key)] mask: True where a query may attend to a key."""
    allowed_BLL = torch.ones(B, L, L, dtype=torch.bool, device=device)
    if padding_mask_BL is not None:
        allowed_BLL &= ~padding_mask_BL[:, None, :]
    if known_BL is not None:
        allowed_BLL &= known_BL[:, None, :]
        allowed_BLL |= torch.eye(L, dtype=torch.bool, device=device)
    elif padding_mask_BL is not None:
        # NOTE: an all-pad row (empty cell) would softmax over nothing; let pads see themselves.
        allowed_BLL |= torch.eye(L, dtype=torch.bool, device=device) & padding_mask_BL[:, :, None]
    return allowed_BLL


def _dense_math(q_BLHD, k_BLHD, v_BLHD, padding_mask_BL, known_BL, scale):
    B, L = q_BLHD.shape[:2]
    allowed_BLL = _allowed_BLL(padding_mask_BL, known_BL, B, L, q_BLHD.device)
    s_BHLL = torch.einsum("bihd,bjhd->bhij", q_BLHD, k_BLHD) * scale
    s_BHLL = s_BHLL.masked_fill(~allowed_BLL[:, None], float("-inf"))
    p_BHLL = torch.softmax(s_BHLL, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p_BHLL, v_BLHD)


def reference_attention(q, k, v, *, scale, padding_mask=None, cu_seqlens=None, max_seqlen=None,
                        known=None):
    """Explicit math on either layout (packed: one dense problem per sequence)."""
    if cu_seqlens is None:
        return _dense_math(q, k, v, padding_mask, known, scale)
    outs = []
    for s, e in _pairs(cu_seqlens):
        kn = None if known is None else known[s:e][None]
        outs.append(_dense_math(q[s:e][None], k[s:e][None], v[s:e][None], None, kn, scale)[0])
    return torch.cat(outs, dim=0)


def sdpa_attention(q, k, v, *, scale, padding_mask=None, cu_seqlens=None, max_seqlen=None,
                   known=None):
    """torch SDPA on the padded layout."""
    if cu_seqlens is not None:
        raise ValueError("attention backend 'sdpa' takes the padded layout (padding_mask); "
                         "use 'varlen' for packed batches")
    B, L = q.shape[:2]
    if known is not None:
        mask = _allowed_BLL(padding_mask, known, B, L, q.device)[:, None]      # [B, 1, L, L]
    elif padding_mask is not None:
        mask = _allowed_BLL(padding_mask, None, B, L, q.device)[:, None] \
            if bool(padding_mask.all(dim=1).any()) else ~padding_mask[:, None, None, :]
    else:
        mask = None
    out_BHLD = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out_BHLD.transpose(1, 2)


# --- varlen kernels: (o [T, H, D], lse [T, H] fp32) forward and a backward taking o and lse ---

def _cpu_varlen_forward(q, k, v, cu_q, cu_k, scale):
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=_acc_dtype(q), device=q.device)
    for (sq, eq), (sk, ek) in zip(_pairs(cu_q), _pairs(cu_k)):
        if eq == sq:
            continue
        if ek == sk:  # queries with no key: o = 0, lse = -inf (merged exactly later)
            o[sq:eq] = 0.0
            lse[sq:eq] = float("-inf")
            continue
        o_b, lse_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _bhld(q[sq:eq]), _bhld(k[sk:ek]), _bhld(v[sk:ek]), 0.0, False, scale=scale)
        o[sq:eq] = o_b[0].transpose(0, 1)
        lse[sq:eq] = lse_b[0].transpose(0, 1)
    return o, lse


def _cpu_varlen_backward(do, q, k, v, o, lse, cu_q, cu_k, scale):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for (sq, eq), (sk, ek) in zip(_pairs(cu_q), _pairs(cu_k)):
        if eq == sq or ek == sk:
            dq[sq:eq], dk[sk:ek], dv[sk:ek] = 0.0, 0.0, 0.0
            continue
        dq_b, dk_b, dv_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhld(do[sq:eq]), _bhld(q[sq:eq]), _bhld(k[sk:ek]), _bhld(v[sk:ek]),
            _bhld(o[sq:eq]), lse[sq:eq].t().contiguous()[None], 0.0, False, scale=scale)
        dq[sq:eq] = dq_b[0].transpose(0, 1)
        dk[sk:ek] = dk_b[0].transpose(0, 1)
        dv[sk:ek] = dv_b[0].transpose(0, 1)
    return dq, dk, dv


def _cuda_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    o, lse_HT, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False, scale=scale)
    return o, lse_HT.t()


def _cuda_varlen_backward(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, scale):
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout is 0
    unused = torch.empty(0, device=q.device)
    return torch.ops.aten._flash_attention_backward(
        do.contiguous(), q, k, v, o, lse.t().contiguous(), cu_q, cu_k, max_q, max_k, 0.0, False,
        rng_state, unused, scale=scale)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Softmax statistics dtype: fp32 for half types, the input's own otherwise."""
    return torch.promote_types(x.dtype, torch.float32)


def _pairs(cu: torch.Tensor) -> list[tuple[int, int]]:
    return list(itertools.pairwise(cu.tolist()))


def _bhld(x_LHD: torch.Tensor) -> torch.Tensor:
    return x_LHD.transpose(0, 1).unsqueeze(0)


class _KnownPlusSelfAttention(torch.autograd.Function):
    """Generative-mask attention on packed tokens without a dense mask.

    Every query attends over the known keys of its sequence (one varlen kernel call on the
    gathered known keys); unknown queries then merge their own key exactly:
    lse = logaddexp(lse_known, s_self), out = e^(lse_known - lse) o_known + e^(s_self - lse) v_self.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, known_T, scale):
        known_idx = known_T.nonzero().squeeze(1)
        seq_T = _sequence_index(cu_seqlens, q.shape[0])
        counts_N = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.int64, device=q.device)
        counts_N.index_add_(0, seq_T[known_idx], torch.ones_like(known_idx))
        cu_k = torch.zeros_like(cu_seqlens)
        cu_k[1:] = counts_N.cumsum(0).to(cu_seqlens.dtype)
        max_k = int(counts_N.max()) if counts_N.numel() else 0
        k_known, v_known = k[known_idx].contiguous(), v[known_idx].contiguous()
        if q.is_cuda:
            o_known, lse_known = _cuda_varlen_forward(q, k_known, v_known, cu_seqlens, cu_k,
                                                      max_seqlen, max_k, scale)
        else:
            o_known, lse_known = _cpu_varlen_forward(q, k_known, v_known, cu_seqlens, cu_k, scale)
        acc = _acc_dtype(q)
        lse_known = lse_known.to(acc)
        unknown_T1 = (~known_T)[:, None]
        s_self = (q.to(acc) * k.to(acc)).sum(-1) * scale                          # [T, H]
        lse = torch.where(unknown_T1, torch.logaddexp(lse_known, s_self), lse_known)
        w_self = torch.where(unknown_T1, torch.exp(s_self - lse), torch.zeros_like(lse))
        w_known = torch.exp(lse_known - lse)
        out = (w_known[..., None] * o_known.to(acc) + w_self[..., None] * v.to(acc)).to(q.dtype)
        ctx.save_for_backward(q, k, v, k_known, v_known, out, lse, w_self, known_idx,
                              cu_seqlens, cu_k)
        ctx.max_q, ctx.max_k, ctx.scale = max_seqlen, max_k, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, k_known, v_known, out, lse, w_self, known_idx, cu_q, cu_k = ctx.saved_tensors
        scale = ctx.scale
        # NOTE: the kernel's backward with the *merged* output and lse yields the exact gradient
        # of the known-key block of the joint softmax (D = rowsum(dout * out) is the joint one).
        if q.is_cuda:
            dq, dk_known, dv_known = _cuda_varlen_backward(
                dout, q, k_known, v_known, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, scale)
        else:
            dq, dk_known, dv_known = _cpu_varlen_backward(
                dout, q, k_known, v_known, out, lse, cu_q, cu_k, scale)
        acc = w_self.dtype
        dout_f = dout.to(acc)
        d_row = (dout_f * out.to(acc)).sum(-1)                                   # [T, H]
        ds_self = w_self * ((dout_f * v.to(acc)).sum(-1) - d_row)                # [T, H]
        dq = dq.to(acc) + scale * ds_self[..., None] * k.to(acc)
        dk = scale * ds_self[..., None] * q.to(acc)
        dk.index_add_(0, known_idx, dk_known.to(acc))
        dv = w_self[..., None] * dout_f
        dv.index_add_(0, known_idx, dv_known.to(acc))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _sequence_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] index of the sequence each packed token belongs to."""
    lengths_N = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths_N.numel(), device=cu_seqlens.device),
                                   lengths_N, output_size=total)


def _full_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    if q.is_cuda:
        try:
            from flash_attn import flash_attn_varlen_func  # optional, CUDA only
        except ImportError:
            flash_attn_varlen_func = None
        if flash_attn_varlen_func is not None:
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                          dropout_p=0.0, softmax_scale=scale)
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)
    return _CpuVarlenAttention.apply(q, k, v, cu_seqlens, scale)


class _CpuVarlenAttention(torch.autograd.Function):
    """Full attention on packed tokens on a CPU: torch's flash kernel once per sequence.

    NOTE: a custom Function, not autograd through per-sequence slices: slicing q/k/v per
    sequence would make backward allocate and add a full-size zero gradient for every slice.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, scale):
        out, lse = _cpu_varlen_forward(q, k, v, cu_seqlens, cu_seqlens, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _cpu_varlen_backward(dout, q, k, v, out, lse, cu_seqlens, cu_seqlens,
                                          ctx.scale)
        return dq, dk, dv, None, None


def varlen_attention(q, k, v, *, scale, padding_mask=None, cu_seqlens=None, max_seqlen=None,
                     known=None):
    """Packed-layout attention (see the module docstring for the kernels used)."""
    if cu_seqlens is None:
        raise ValueError("attention backend 'varlen' takes the packed layout (cu_seqlens); "
                         "use 'sdpa' for padded batches")
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend 'varlen' on CUDA runs flash kernels, which take "
                         f"bf16/fp16, got {q.dtype}; train in bf16 or use 'sdpa' (padded)")
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if known is None:
        return _full_varlen(q, k, v, cu_seqlens, max_seqlen, scale)
    return _KnownPlusSelfAttention.apply(q, k, v, cu_seqlens, max_seqlen, known, scale)


ATTENTION_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
    "varlen": varlen_attention,
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str,
              padding_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
              max_seqlen: int | None = None, known: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Multi-head attention with the backend named `backend`; returns the layout of `q`.

    Give exactly one layout: padded (q [B, L, H, D], optional `padding_mask` [B, L]) or packed
    (q [T, H, D], `cu_seqlens` [N+1], `max_seqlen`). `known` selects the generative mask.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {sorted(ATTENTION_BACKENDS)}")
    if cu_seqlens is not None and padding_mask is not None:
        raise ValueError("give either padding_mask (padded layout) or cu_seqlens (packed), not both")
    expected_dim = 3 if cu_seqlens is not None else 4
    if q.dim() != expected_dim:
        layout = "packed [T, H, D]" if cu_seqlens is not None else "padded [B, L, H, D]"
        raise ValueError(f"attention expects {layout} q, got shape {tuple(q.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return ATTENTION_BACKENDS[backend](q, k, v, scale=scale, padding_mask=padding_mask,
                                       cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, known=known)
