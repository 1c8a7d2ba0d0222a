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
- `varlen`: packed layout, no padding and no T x T mask, torch's own kernels: its
  FlashAttention-2 varlen kernel on CUDA, its flash kernel once per sequence on a CPU. The
  generative mode attends over the gathered known keys with the same kernels and merges the
  self term exactly through the returned log-sum-exp; its backward reuses the kernel's backward
  with the merged output and log-sum-exp (as ring attention does), plus the closed-form
  gradient of the self term.
- `flash_attn`: as `varlen`, with full attention in the flash-attn package's
  `flash_attn_varlen_func` (CUDA only; an error elsewhere or when the package is not
  importable). The generative mode uses torch's vendored FlashAttention-2 kernels either way
  (their forward and backward entry points accept a given output and log-sum-exp).

`resolve_backend` turns a requested name ("auto" included) into one of these once per run and
layout; `plan_attention` computes what every layer of a batch shares (the sdpa mask, the
generative mode's known-key index sets) once per batch, so no layer waits on the device for a
shape.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["ATTENTION_BACKENDS", "AttentionPlan", "BackendChoice", "attention", "plan_attention",
           "resolve_backend"]


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


@dataclasses.dataclass
class AttentionPlan:
    """What every attention layer of one batch shares, computed once per batch
    (`plan_attention`): the resolved backend, the layout, and the backend's index sets."""

    backend: str
    padding_mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    known: torch.Tensor | None = None
    sdpa_mask: torch.Tensor | None = None
    """sdpa: boolean mask, True = may attend ([B, 1, L, L] or [B, 1, 1, L]); None = no mask."""
    known_idx: torch.Tensor | None = None
    """varlen generative: [K] packed positions of the known tokens (the keys every query sees)."""
    cu_known: torch.Tensor | None = None
    """varlen generative: [N+1] offsets of each sequence's known keys in `known_idx`."""
    no_keys: torch.Tensor | None = None
    """varlen generative: [T] True for tokens of a sequence without any known key."""

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None


@functools.cache
def _flash_attn_varlen() -> tuple[Callable | None, str]:
    """(flash_attn_varlen_func, "") when the flash-attn package imports, else (None, why);
    tried once per process."""
    try:
        from flash_attn import flash_attn_varlen_func  # optional, CUDA only
    except ImportError as e:
        return None, str(e)
    return flash_attn_varlen_func, ""


def resolve_backend(requested: str, *, layout: str, device: torch.device) -> str:
    """The backend a run uses for `layout` ("packed" | "padded") on `device`: "auto" is
    flash_attn on CUDA when the package imports, else varlen (packed), or sdpa (padded). A named
    backend that cannot run here is an error, never replaced by another."""
    if requested not in ("auto", *ATTENTION_BACKENDS):
        raise ValueError(f"attention backend {requested!r} is not one of "
                         f"{['auto', *sorted(ATTENTION_BACKENDS)]}")
    if layout not in ("packed", "padded"):
        raise ValueError(f"layout={layout!r} is not one of ['packed', 'padded']")
    if requested == "auto":
        if layout == "padded":
            return "sdpa"
        return "flash_attn" if device.type == "cuda" and _flash_attn_varlen()[0] else "varlen"
    _check_layout(requested, packed=layout == "packed")
    if requested == "flash_attn":
        if device.type != "cuda":
            raise ValueError(f"attention backend 'flash_attn' runs on CUDA only (this is "
                             f"{device.type}); use 'varlen' (torch's kernels)")
        func, why = _flash_attn_varlen()
        if func is None:
            raise ValueError(f"attention backend 'flash_attn' was asked for but flash-attn does "
                             f"not import ({why}); install it (pip install 'pertscale[flash]') or "
                             f"use 'varlen' (torch's FlashAttention-2 varlen kernel)")
    return requested


def _check_layout(backend: str, *, packed: bool) -> None:
    if backend == "sdpa" and packed:
        raise ValueError("attention backend 'sdpa' takes the padded layout (padding_mask); "
                         "use 'varlen' for packed batches")
    if backend in ("varlen", "flash_attn") and not packed:
        raise ValueError(f"attention backend {backend!r} takes the packed layout (cu_seqlens); "
                         "use 'sdpa' for padded batches")


class BackendChoice:
    """A model's attention backend: the requested name, resolved once per (layout, device
    type) and logged when first resolved."""

    def __init__(self, requested: str, owner: str) -> None:
        self.requested, self.owner = requested, owner
        self._resolved: dict[tuple[str, str], str] = {}

    def __call__(self, layout: str, device: torch.device) -> str:
        key = (layout, device.type)
        if key not in self._resolved:
            backend = resolve_backend(self.requested, layout=layout, device=device)
            self._resolved[key] = backend
            log.info("%s attention: %s batches on %s run %s (requested %r)", self.owner, layout,
                     device.type, _describe(backend, device), self.requested)
        return self._resolved[key]


def _describe(backend: str, device: torch.device) -> str:
    if backend == "flash_attn":
        return "flash_attn varlen (flash-attn package)"
    if backend == "varlen":
        return ("torch varlen (FlashAttention-2)" if device.type == "cuda"
                else "torch flash kernel per sequence (CPU)")
    return {"sdpa": "sdpa (padded)", "reference": "reference (explicit softmax)"}[backend]


def plan_attention(backend: str, *, padding_mask: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                   known: torch.Tensor | None = None) -> AttentionPlan:
    """The per-batch plan of a resolved `backend` for one layout (module docstring)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {sorted(ATTENTION_BACKENDS)}")
    if cu_seqlens is not None and padding_mask is not None:
        raise ValueError("give either padding_mask (padded layout) or cu_seqlens (packed), not both")
    packed = cu_seqlens is not None
    _check_layout(backend, packed=packed)
    plan = AttentionPlan(backend, padding_mask=padding_mask, cu_seqlens=cu_seqlens,
                         known=known)
    if packed:
        # NOTE: computed here only when not given: a host-side int from the tokenizer avoids a sync
        plan.max_seqlen = (int(max_seqlen) if max_seqlen is not None
                           else int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
    if backend == "sdpa":
        plan.sdpa_mask = _sdpa_mask(padding_mask, known)
    elif backend in ("varlen", "flash_attn") and known is not None:
        known_idx = known.nonzero().squeeze(1)   # one device sync per batch, not per layer
        seq_T = _sequence_index(cu_seqlens, known.shape[0])
        counts_N = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.int64, device=known.device)
        counts_N.index_add_(0, seq_T[known_idx], torch.ones_like(known_idx))
        cu_known = torch.zeros_like(cu_seqlens)
        cu_known[1:] = counts_N.cumsum(0).to(cu_seqlens.dtype)
        plan.known_idx, plan.cu_known, plan.no_keys = known_idx, cu_known, (counts_N == 0)[seq_T]
    return plan


def _sdpa_mask(padding_mask_BL: torch.Tensor | None, known_BL: torch.Tensor | None
               ) -> torch.Tensor | None:
    if known_BL is not None:
        B, L = known_BL.shape
        return _allowed_BLL(padding_mask_BL, known_BL, B, L, known_BL.device)[:, None]
    if padding_mask_BL is None:
        return None
    B, L = padding_mask_BL.shape
    if bool(padding_mask_BL.all(dim=1).any()):  # an empty cell: its pads see themselves
        return _allowed_BLL(padding_mask_BL, None, B, L, padding_mask_BL.device)[:, None]
    return ~padding_mask_BL[:, None, None, :]


def reference_attention(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """Explicit math on either layout (packed: one dense problem per sequence)."""
    if not plan.packed:
        return _dense_math(q, k, v, plan.padding_mask, plan.known, scale)
    outs = []
    for s, e in _pairs(plan.cu_seqlens):
        kn = None if plan.known is None else plan.known[s:e][None]
        outs.append(_dense_math(q[s:e][None], k[s:e][None], v[s:e][None], None, kn, scale)[0])
    return torch.cat(outs, dim=0)


def sdpa_attention(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """torch SDPA on the padded layout."""
    out_BHLD = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.sdpa_mask,
        scale=scale)
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


def _merge_self(o_known, lse_known, no_keys_T, q, k, v, known_T, scale):
    """Merge each unknown query's own key into the attention over the known keys:
    lse = logaddexp(lse_known, s_self), out = e^(lse_known - lse) o_known + e^(s_self - lse) v.
    Returns (out in q's dtype, lse, w_self) in the accumulation dtype.

    NOTE: a query of a sequence without known keys has no keys in the kernel call; kernels
    disagree on what they write there (torch's CPU path -inf, FlashAttention-2 +inf, which
    would merge to NaN), so those rows are set to the empty softmax's -inf and o = 0 here."""
    acc = _acc_dtype(q)
    empty_T1 = no_keys_T[:, None]
    lse_known = torch.where(empty_T1, float("-inf"), lse_known.to(acc))
    o_known = torch.where(empty_T1[..., None], 0.0, o_known.to(acc))
    unknown_T1 = (~known_T)[:, None]
    s_self = (q.to(acc) * k.to(acc)).sum(-1) * scale                              # [T, H]
    lse = torch.where(unknown_T1, torch.logaddexp(lse_known, s_self), lse_known)
    w_self = torch.where(unknown_T1, torch.exp(s_self - lse), torch.zeros_like(lse))
    w_known = torch.where(empty_T1, 0.0, torch.exp(lse_known - lse))
    out = (w_known[..., None] * o_known + w_self[..., None] * v.to(acc)).to(q.dtype)
    return out, lse, w_self


class _KnownPlusSelfAttention(torch.autograd.Function):
    """Generative-mask attention on packed tokens without a dense mask.

    Every query attends over the known keys of its sequence (one varlen kernel call on the
    gathered known keys, index sets from the batch's plan); unknown queries then merge their
    own key exactly (`_merge_self`).
    """

    @staticmethod
    def forward(ctx, q, k, v, known_T, known_idx, cu_seqlens, cu_k, no_keys_T, max_seqlen,
                scale):
        # NOTE: max_seqlen bounds the known keys per sequence too; the kernels take an upper bound
        k_known, v_known = k[known_idx].contiguous(), v[known_idx].contiguous()
        if q.is_cuda:
            o_known, lse_known = _cuda_varlen_forward(q, k_known, v_known, cu_seqlens, cu_k,
                                                      max_seqlen, max_seqlen, scale)
        else:
            o_known, lse_known = _cpu_varlen_forward(q, k_known, v_known, cu_seqlens, cu_k, scale)
        out, lse, w_self = _merge_self(o_known, lse_known, no_keys_T, q, k, v, known_T, scale)
        ctx.save_for_backward(q, k, v, k_known, v_known, out, lse, w_self, known_idx,
                              cu_seqlens, cu_k, no_keys_T)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        (q, k, v, k_known, v_known, out, lse, w_self, known_idx, cu_q, cu_k,
         no_keys_T) = ctx.saved_tensors
        scale = ctx.scale
        # NOTE: the kernel's backward with the *merged* output and lse yields the exact gradient
        # of the known-key block of the joint softmax (D = rowsum(dout * out) is the joint one).
        if q.is_cuda:
            dq, dk_known, dv_known = _cuda_varlen_backward(
                dout, q, k_known, v_known, out, lse, cu_q, cu_k, ctx.max_seqlen, ctx.max_seqlen,
                scale)
        else:
            dq, dk_known, dv_known = _cpu_varlen_backward(
                dout, q, k_known, v_known, out, lse, cu_q, cu_k, scale)
        acc = w_self.dtype
        dout_f = dout.to(acc)
        d_row = (dout_f * out.to(acc)).sum(-1)                                   # [T, H]
        ds_self = w_self * ((dout_f * v.to(acc)).sum(-1) - d_row)                # [T, H]
        dq = torch.where(no_keys_T[:, None, None], 0.0, dq.to(acc))  # no keys: no kernel term
        dq = dq + scale * ds_self[..., None] * k.to(acc)
        dk = scale * ds_self[..., None] * q.to(acc)
        dk.index_add_(0, known_idx, dk_known.to(acc))
        dv = w_self[..., None] * dout_f
        dv.index_add_(0, known_idx, dv_known.to(acc))
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None,
                None, None)


def _sequence_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] index of the sequence each packed token belongs to."""
    lengths_N = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths_N.numel(), device=cu_seqlens.device),
                                   lengths_N, output_size=total)


def _full_varlen(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    cu, max_len = plan.cu_seqlens, plan.max_seqlen
    if not q.is_cuda:
        return _CpuVarlenAttention.apply(q, k, v, cu, scale)
    if plan.backend == "flash_attn":
        func = _flash_attn_varlen()[0]  # resolve_backend checked that it imports
        return func(q, k, v, cu, cu, max_len, max_len, dropout_p=0.0, softmax_scale=scale)
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale)


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


def varlen_attention(q, k, v, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """Packed-layout attention with torch's kernels or flash-attn's (module docstring)."""
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention backend {plan.backend!r} on CUDA runs flash kernels, which "
                         f"take bf16/fp16, got {q.dtype}; train in bf16 or use 'sdpa' (padded)")
    if plan.known is None:
        return _full_varlen(q, k, v, plan, scale)
    return _KnownPlusSelfAttention.apply(q, k, v, plan.known, plan.known_idx, plan.cu_seqlens,
                                         plan.cu_known, plan.no_keys, plan.max_seqlen, scale)


ATTENTION_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
    "varlen": varlen_attention,
    "flash_attn": varlen_attention,
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              plan: AttentionPlan | None = None, backend: str | None = None,
              padding_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
              max_seqlen: int | None = None, known: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Multi-head attention; returns the layout of `q`.

    Give the batch's `plan` (models: `plan_attention` once per batch), or a resolved `backend`
    and exactly one layout: padded (q [B, L, H, D], optional `padding_mask` [B, L]) or packed
    (q [T, H, D], `cu_seqlens` [N+1], `max_seqlen`); `known` selects the generative mask.
    """
    if plan is None:
        if backend is None:
            raise ValueError("attention needs a plan or a backend name")
        plan = plan_attention(backend, padding_mask=padding_mask, cu_seqlens=cu_seqlens,
                              max_seqlen=max_seqlen, known=known)
    expected_dim = 3 if plan.packed else 4
    if q.dim() != expected_dim:
        layout = "packed [T, H, D]" if plan.packed else "padded [B, L, H, D]"
        raise ValueError(f"attention expects {layout} q, got shape {tuple(q.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return ATTENTION_BACKENDS[plan.backend](q, k, v, plan, scale)
