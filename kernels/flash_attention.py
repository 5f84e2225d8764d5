"""Flash attention for BERT in Triton: forward and backward, padded or packed, with dropout.

Computes ``out = dropout(softmax(q kᵀ · scale + mask)) v`` without ever materialising the
(seq_q, seq_k) score matrix: the forward streams key blocks through an online softmax (running max
and sum in fp32) and saves one log-sum-exp per query row; the backward recomputes the probabilities
block by block from it.

Two layouts share the same kernels:
  * padded:  q (B, H, Sq, D), k/v (B, H, Sk, D), optional key_padding_mask (B, Sk) bool (True = real)
  * packed:  q/k/v (total, H, D) with cu_seqlens int32 (batch + 1,): sequence i is rows
             cu_seqlens[i]:cu_seqlens[i+1] and attends only within itself (the unpadded BERT path)

Supports:
  * fp16, bf16 and fp32 inputs (fp32 dots run with input_precision="ieee", so no tf32 rounding);
    statistics and accumulators are fp32, outputs are stored in the input dtype
  * any head_dim <= 128 (padded up to a power of two >= 16 inside the kernel and masked)
  * any sequence length >= 1 (no multiple-of-block assumption), seq_q != seq_k in the padded layout
  * causal masking, top-left aligned like F.scaled_dot_product_attention(is_causal=True)
  * dropout on the probabilities, from Philox4x32-10 keyed by a seed drawn from PyTorch's generator
    (torch.manual_seed makes it repeatable) plus the (batch, head) index. One Philox call gives 128
    bits = 16 bits for each of 8 consecutive keys of one query row (kernels/philox_dropout.py documents
    the exact mapping; tests/test_attention.py recomputes it in numpy), 8x fewer calls than one per element.
    The forward and both backward kernels regenerate the mask through one helper (_score_tile), as a
    pure function of (seed, row, key), whatever their block shapes
  * strided inputs and outputs: only the last dimension must be contiguous, so q/k/v may be views of
    one fused QKV projection (e.g. ``qkv.view(total, 3, H, D)[:, i]``) without a copy; the qkv-packed
    entries (attention_qkvpacked: qkv (B, S, 3, H, D) -> (B, S, H, D); varlen_attention_qkvpacked: qkv
    (T, 3, H, D) -> (T, H, D)) also write the output in the next matmul's layout and the gradient into
    one dqkv, saving the permute copy forward and the stack / reshape copy backward that q/k/v views
    cost through autograd
  * deterministic gradients, no atomics. Sequences that fit one key block (max(seq_q, seq_k) <= the
    fused kernel's BLOCK_N: 128 tokens for head_dim <= 64 in fp16/bf16, so BERT's pretraining length)
    take one launch: a program per (sequence, head) holds K and V, walks the query blocks once and
    writes each block's dQ as it goes (no other key block adds to it) — five matmuls per tile. Longer
    sequences take two launches: dQ from one program per query block looping over key blocks (it also
    writes delta = rowsum(dO·O)), then dK/dV from one program per key block looping over query blocks —
    seven matmuls per tile, since the dQ kernel recomputes S and dP
  * torch.compile: the custom ops fastbert::attention_fwd/_bwd and fastbert::varlen_attention_fwd/_bwd
    (with autograd and fake kernels) are what a compiled graph calls; eager calls take an
    autograd.Function over the same launchers, because the custom-op dispatch alone costs about as
    much as a short-sequence kernel

Not supported:
  * head_dim > 128 (ValueError); float64 runs the PyTorch reference instead
  * bf16 in Triton 3.6's own CPU interpreter, which multiplies bf16 bit patterns as integers:
    fastbert.kernels asks the interpreter once (_interpreter_probe) and raises TypeError. Compiled
    GPU kernels take bf16, and so does the test suite's interpreter (tests/interpreter_gpu_like.py)
  * attention bias / arbitrary (Sq, Sk) masks; only key padding and causal masks
  * seq_q * ceil(seq_k / 8) >= 2**31 with dropout (the Philox counter is an int32 per head; ValueError)
  * more than 65535 (sequences x heads) in one call: CUDA's grid y limit (ValueError; split the batch)
  * a sequence whose rows reach 2**31 elements from its start (seq x token stride, e.g. ~930k tokens of
    a BERT-base qkv view): offsets within a sequence are int32 (ValueError)

Caution:
  * a query row with no visible key (all its keys padded, or an empty causal prefix) gives zeros and
    zero gradients; its saved log-sum-exp is +inf so the backward's probabilities are exactly 0
  * the log-sum-exp is kept in base 2 (``m·log2(e) + log2(l)``): the kernels work with exp2
  * dropout_p is quantised to 16 bits: the kernels drop with probability round(p·65536)/65536
    (``effective_dropout_p``; within 2**-17 of p, e.g. 0.1 -> 0.100006) and scale kept values by
    1/(1 - that), so the output's expectation is exact; the reference path uses p itself
  * launch decisions are cached per (dtype, head_dim, layout, flags); FASTBERT_ATTENTION_CONFIG is
    read once (``set_config_override`` changes it at run time)
  * the custom ops check shapes but not the values of cu_seqlens (fastbert.kernels does, on the host);
    called directly with cu_seqlens[-1] < total, the rows past it are left uninitialised (no memset
    is spent on rows that fastbert.kernels never lets exist)
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _dispatch
from ._host import cdiv as _cdiv, next_pow2 as _next_pow2
from .philox_dropout import dropout_args, effective_dropout_p, keep_tile
from .reference import split_qkv

__all__ = ["attention", "varlen_attention", "attention_qkvpacked", "varlen_attention_qkvpacked",
           "fwd_config", "bwd_config", "effective_dropout_p",
           "set_config_override"]

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


def _interpreting() -> bool:
    """Whether Triton interprets these kernels: TRITON_INTERPRET as it was when they were defined
    (one flag for the whole package: _dispatch records it at import)."""
    return _dispatch.interpreting()


# ------------------------------------------------------------------------------------------ kernels

@triton.jit
def _sequence_bounds(CU_SEQLENS, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first row of this sequence in the token dimension, its query length, its key length)."""
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + b)
        end = tl.load(CU_SEQLENS + b + 1)
        return start, end - start, end - start
    else:
        return seqlen_q * 0, seqlen_q, seqlen_k


@triton.jit
def _key_end(KPM_ROW, seqlen_k, MASK_BLOCK: tl.constexpr):
    """1 + the index of the last real key in one key-padding-mask row (0 when it has none)."""
    end = seqlen_k * 0
    for start in range(0, seqlen_k, MASK_BLOCK):
        cols = start + tl.arange(0, MASK_BLOCK)
        real = tl.load(KPM_ROW + cols, mask=cols < seqlen_k, other=0)
        end = tl.maximum(end, tl.max(tl.where(real != 0, cols + 1, 0), 0))
    return end


@triton.jit
def _score_tile(a, b, rows, cols, col_start, row_ok, key_ok, qk_scale, seed, seqlen_k, drop_threshold,
                CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, TRANSPOSED: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """The block every kernel recomputes: scores in the exp2 domain with invisible pairs at -inf, and
    the dropout keep mask of the same tile.

    rows: query indices, cols: key indices = col_start + arange (col_start a multiple of 8); row_ok /
    key_ok: which of them take part (in range, real key). Not TRANSPOSED: a = q (M, D), b = kᵀ (D, N),
    tiles (M, N). TRANSPOSED (the dK/dV kernel): a = k (N, D), b = qᵀ (D, M), tiles (N, M).
    Without dropout the keep mask is a placeholder that must not be used.
    """
    s = tl.dot(a, b, input_precision=DOT_PRECISION) * qk_scale
    if TRANSPOSED:
        visible = key_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[:, None] <= rows[None, :])
    else:
        visible = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
    s = tl.where(visible, s, float("-inf"))
    keep = visible
    if HAS_DROPOUT:
        keep = keep_tile(seed, rows, col_start, seqlen_k, drop_threshold, cols.shape[0])
        if TRANSPOSED:
            keep = tl.trans(keep)
    return s, keep


@triton.jit
def _load_kv_block(K, V, KPM, b64, h64, start64, offs_n, offs_d, col_ok, d_ok, stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs, stride_mb, HAS_MASK: tl.constexpr):
    """The backward's key block of one (sequence, head): k, v (N, D) at key rows offs_n (0 outside the
    sequence) and key_ok (N,), the keys that are real (in the sequence and, padded, not masked)."""
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * stride_kb + h64 * stride_kh + start64 * stride_ks + offs_n[:, None] * stride_ks
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + h64 * stride_vh + start64 * stride_vs + offs_n[:, None] * stride_vs
                + offs_d[None, :], mask=kv_mask, other=0.0)
    key_ok = col_ok
    if HAS_MASK:
        key_real = tl.load(KPM + b64 * stride_mb + offs_n, mask=col_ok, other=0)
        key_ok = key_ok & (key_real != 0)
    return k, v, key_ok


@triton.jit
def _store_kv_grads(DK, DV, dk, dv, sm_scale, b64, h64, start64, offs_n, offs_d, col_ok, d_ok,
                    stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs):
    """dK = scale * dk and dV = dv (fp32 (N, D) accumulators) of a key block, stored in their dtypes."""
    kv_mask = col_ok[:, None] & d_ok[None, :]
    dk_base = DK + b64 * stride_dkb + h64 * stride_dkh + start64 * stride_dks
    dv_base = DV + b64 * stride_dvb + h64 * stride_dvh + start64 * stride_dvs
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _kv_tile_grads(k, v, q_t, do, lse, delta, rows, cols, col_start, row_ok, key_ok, qk_scale, seed, seqlen_k,
                   drop_threshold, keep_scale, CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """One (key block, query block) step of the backward from the keys' side, in (BLOCK_N, BLOCK_M)
    tiles: k, v (N, D), qᵀ (D, M), dO (M, D), the rows' lse and delta; cols = col_start + arange.
    Returns dV's increment (N, D) in fp32 and dSᵀ (N, M) in q's dtype (dK += dSᵀ q, and where one
    block holds every key, dQ = dS k)."""
    s_t, keep_t = _score_tile(k, q_t, rows, cols, col_start, row_ok, key_ok, qk_scale, seed, seqlen_k, drop_threshold,
                              CAUSAL, HAS_DROPOUT, True, DOT_PRECISION)
    p_t = tl.math.exp2(s_t - lse[None, :])  # 0 where invisible (s = -inf) or the row is empty (lse = +inf)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        pd_t = tl.where(keep_t, p_t * keep_scale, 0.0)
        dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
    else:
        pd_t = p_t
    dv_inc = tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    return dv_inc, ds_t.to(q_t.dtype)


@triton.jit
def _attn_fwd(
    Q, K, V,            # inputs; token rows at stride_*s, last dim contiguous
    O,                  # output, same layout rules as Q
    LSE,                # fp32 log2-sum-exp per query row: padded (B, H, Sq), packed (H, total)
    KPM,                # key padding mask as uint8 (B, Sk), 1 = real key; unused unless HAS_MASK
    CU_SEQLENS,         # int32 (B + 1,) packed-sequence offsets; unused unless IS_VARLEN
    SEED,               # int64 (1,) Philox seed drawn by the host; unused unless HAS_DROPOUT
    stride_qb, stride_qh, stride_qs,  # strides of Q in elements: batch (0 when packed), head, token
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,             # strides of LSE: batch (0 when packed), head; rows are contiguous
    stride_mb,                        # stride of KPM between batch rows
    n_heads,                          # H: program_id(1) enumerates batch * H
    seqlen_q, seqlen_k,               # padded: Sq, Sk; packed: max_seqlen for both (the grid size)
    qk_scale,                         # softmax_scale * log2(e): scores go straight to the exp2 domain
    drop_threshold,                   # dropout: drop when 16 random bits < this (round(p * 65536))
    keep_scale,                       # dropout: 1 / (1 - drop_threshold / 65536), the kept values' scale
    HEAD_DIM: tl.constexpr,           # real head_dim
    BLOCK_D: tl.constexpr,            # head_dim padded to a power of two >= 16 (tl.dot minimum)
    BLOCK_M: tl.constexpr,            # query rows per program
    BLOCK_N: tl.constexpr,            # keys per loop iteration
    MASK_BLOCK: tl.constexpr,         # mask entries read per step when looking for the last real key
    IS_VARLEN: tl.constexpr,          # packed layout (rows from CU_SEQLENS) instead of padded
    HAS_MASK: tl.constexpr,           # apply KPM
    CAUSAL: tl.constexpr,             # key j visible to query i only when j <= i
    HAS_DROPOUT: tl.constexpr,        # apply dropout with SEED
    DOT_PRECISION: tl.constexpr,      # "ieee" for fp32 inputs, else "tf32" (unused by fp16/bf16 dots)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    start, len_q, len_k = _sequence_bounds(CU_SEQLENS, b, seqlen_q, seqlen_k, IS_VARLEN)
    # The grid covers the longest sequence; programs past the end of a shorter one have no rows.
    if pid_m * BLOCK_M >= len_q:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < len_q
    # 64-bit base offsets: batch * stride can pass 2**31 elements on large inputs.
    start64 = start.to(tl.int64)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + start64 * stride_qs
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + start64 * stride_ks
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + start64 * stride_vs

    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    if HAS_MASK:
        # Keys past the last real one are all padding: stop the loop there (BERT pads on the right).
        len_k = _key_end(KPM + b.to(tl.int64) * stride_mb, len_k, MASK_BLOCK)
    seed = 0
    if HAS_DROPOUT:
        # One Philox key per (batch, head); the counter is the (row, group of 8 keys) inside it.
        seed = tl.load(SEED) + pid_bh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < len_k
        k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None],
                      other=0.0)
        key_ok = col_ok
        if HAS_MASK:
            key_real = tl.load(KPM + b.to(tl.int64) * stride_mb + cols, mask=col_ok, other=0)
            key_ok = key_ok & (key_real != 0)
        s, keep = _score_tile(q, k_t, offs_m, cols, start_n, row_ok, key_ok, qk_scale, seed, seqlen_k, drop_threshold,
                              CAUSAL, HAS_DROPOUT, False, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps exp2 at 0
        # rather than NaN (-inf - -inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # The normaliser l_i uses the undropped probabilities: dropout acts after the softmax.
            p = tl.where(keep, p, 0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    inv = 1.0 / l_safe
    if HAS_DROPOUT:
        inv = inv * keep_scale
    out = acc * inv[:, None]
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + start64 * stride_os
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    # +inf for a row without visible keys: the backward's exp2(s - lse) is then exactly 0.
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    l_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + start64
    tl.store(l_base + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO,        # forward inputs and the output gradient
    DK, DV,             # outputs; token rows at stride_dk*/stride_dv*, last dim contiguous
    LSE, DELTA,         # fp32 per query row: log2-sum-exp from the forward, rowsum(dO * O) from _attn_bwd_dq
    KPM, CU_SEQLENS, SEED,            # as in _attn_fwd
    stride_qb, stride_qh, stride_qs,  # strides (batch 0 when packed, head, token) of each tensor
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_lb, stride_lh,             # strides of LSE and DELTA
    stride_mb,                        # stride of KPM between batch rows
    n_heads, seqlen_q, seqlen_k,      # as in _attn_fwd
    qk_scale,                         # softmax_scale * log2(e)
    sm_scale,                         # softmax_scale (dK = scale * dSᵀ q)
    drop_threshold, keep_scale,       # as in _attn_fwd
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,            # query rows per loop iteration
    BLOCK_N: tl.constexpr,            # keys per program
    MASK_BLOCK: tl.constexpr,         # as in _attn_fwd
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    start, len_q, len_k = _sequence_bounds(CU_SEQLENS, b, seqlen_q, seqlen_k, IS_VARLEN)
    if pid_n * BLOCK_N >= len_k:
        return

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = offs_n < len_k
    start64 = start.to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + start64 * stride_qs
    do_base = DO + b64 * stride_dob + h64 * stride_doh + start64 * stride_dos
    l_base = LSE + b64 * stride_lb + h64 * stride_lh + start64
    delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + start64

    k, v, key_ok = _load_kv_block(K, V, KPM, b64, h64, start64, offs_n, offs_d, col_ok, d_ok, stride_kb, stride_kh,
                                  stride_ks, stride_vb, stride_vh, stride_vs, stride_mb, HAS_MASK)
    hi = len_q
    if HAS_MASK:
        # A block of padding keys only needs its zero gradients written: skip the loop.
        hi = tl.where(pid_n * BLOCK_N >= _key_end(KPM + b64 * stride_mb, len_k, MASK_BLOCK), 0, len_q)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED) + pid_bh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        # Queries above this key block's first key cannot see any of its keys.
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < len_q
        q_t = tl.load(q_base + rows[None, :] * stride_qs + offs_d[:, None], mask=row_ok[None, :] & d_ok[:, None],
                      other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0)
        lse = tl.load(l_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        dv_inc, ds_t = _kv_tile_grads(k, v, q_t, do, lse, delta, rows, offs_n, pid_n * BLOCK_N, row_ok, key_ok,
                                      qk_scale, seed, seqlen_k, drop_threshold, keep_scale, CAUSAL, HAS_DROPOUT,
                                      DOT_PRECISION)
        dv += dv_inc
        dk += tl.dot(ds_t, tl.trans(q_t), input_precision=DOT_PRECISION)

    _store_kv_grads(DK, DV, dk, dv, sm_scale, b64, h64, start64, offs_n, offs_d, col_ok, d_ok,
                    stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, O, DO,     # forward inputs, forward output and its gradient
    DQ,                 # output; token rows at stride_dq*, last dim contiguous
    LSE,                # fp32 log2-sum-exp per query row, from the forward
    DELTA,              # fp32 out: rowsum(dO * O) per query row (laid out like LSE), read by _attn_bwd_dkdv
    KPM, CU_SEQLENS, SEED,            # as in _attn_fwd
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_lb, stride_lh,
    stride_mb,
    n_heads, seqlen_q, seqlen_k,
    qk_scale,                         # softmax_scale * log2(e)
    sm_scale,                         # softmax_scale (dQ = scale * dS k)
    drop_threshold, keep_scale,       # as in _attn_fwd
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,            # query rows per program
    BLOCK_N: tl.constexpr,            # keys per loop iteration
    MASK_BLOCK: tl.constexpr,         # as in _attn_fwd
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    start, len_q, len_k = _sequence_bounds(CU_SEQLENS, b, seqlen_q, seqlen_k, IS_VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < len_q
    start64 = start.to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + start64 * stride_qs
    do_base = DO + b64 * stride_dob + h64 * stride_doh + start64 * stride_dos
    k_base = K + b64 * stride_kb + h64 * stride_kh + start64 * stride_ks
    v_base = V + b64 * stride_vb + h64 * stride_vh + start64 * stride_vs

    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + start64 + offs_m, mask=row_ok, other=float("inf"))
    # This program owns these query rows and already holds dO: computing delta here rather than in a
    # pre-pass saves a launch and a second read of dO; the dK/dV kernel runs after this one.
    o_base = O + b64 * stride_ob + h64 * stride_oh + start64 * stride_os
    o = tl.load(o_base + offs_m[:, None] * stride_os + offs_d[None, :], mask=qd_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + start64 + offs_m, delta, mask=row_ok)
    if HAS_MASK:
        len_k = _key_end(KPM + b64 * stride_mb, len_k, MASK_BLOCK)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED) + pid_bh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < len_k
        kv_mask = col_ok[None, :] & d_ok[:, None]
        k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=kv_mask, other=0.0)
        v_t = tl.load(v_base + cols[None, :] * stride_vs + offs_d[:, None], mask=kv_mask, other=0.0)
        key_ok = col_ok
        if HAS_MASK:
            key_real = tl.load(KPM + b64 * stride_mb + cols, mask=col_ok, other=0)
            key_ok = key_ok & (key_real != 0)
        s, keep = _score_tile(q, k_t, offs_m, cols, start_n, row_ok, key_ok, qk_scale, seed, seqlen_k, drop_threshold,
                              CAUSAL, HAS_DROPOUT, False, DOT_PRECISION)
        p = tl.math.exp2(s - lse[:, None])  # 0 where invisible (s = -inf) or the row is empty (lse = +inf)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh + start64 * stride_dqs
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _attn_bwd_fused(
    Q, K, V, O, DO,     # forward inputs, forward output and its gradient
    DQ, DK, DV,         # outputs; token rows at their own strides, last dim contiguous
    LSE,                # fp32 log2-sum-exp per query row, from the forward
    KPM, CU_SEQLENS, SEED,            # as in _attn_fwd
    stride_qb, stride_qh, stride_qs,  # strides (batch 0 when packed, head, token) of each tensor
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_lb, stride_lh,             # strides of LSE
    stride_mb,                        # stride of KPM between batch rows
    n_heads, seqlen_q, seqlen_k,      # as in _attn_fwd; the host guarantees seqlen_k <= BLOCK_N
    qk_scale,                         # softmax_scale * log2(e)
    sm_scale,                         # softmax_scale (dQ = scale * dS k, dK = scale * dSᵀ q)
    drop_threshold, keep_scale,       # as in _attn_fwd
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,            # query rows per loop iteration
    BLOCK_N: tl.constexpr,            # keys per program: every key of the sequence
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The whole backward of one (sequence, head) whose keys fit one block (BERT's 128 tokens): the
    program holds K and V, walks the query blocks once and finishes each block's dQ on the spot,
    since no other key block contributes to it. Five matmuls per tile instead of the split path's
    seven (the dQ kernel recomputes S and dP), one launch instead of two, delta = rowsum(dO * O) in
    registers, and still no atomics."""
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    start, len_q, len_k = _sequence_bounds(CU_SEQLENS, b, seqlen_q, seqlen_k, IS_VARLEN)

    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = offs_n < len_k
    start64 = start.to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = Q + b64 * stride_qb + h64 * stride_qh + start64 * stride_qs
    o_base = O + b64 * stride_ob + h64 * stride_oh + start64 * stride_os
    do_base = DO + b64 * stride_dob + h64 * stride_doh + start64 * stride_dos
    dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh + start64 * stride_dqs
    l_base = LSE + b64 * stride_lb + h64 * stride_lh + start64

    k, v, key_ok = _load_kv_block(K, V, KPM, b64, h64, start64, offs_n, offs_d, col_ok, d_ok, stride_kb, stride_kh,
                                  stride_ks, stride_vb, stride_vh, stride_vs, stride_mb, HAS_MASK)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED) + pid_bh

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Every query row gets its dQ written here, even one that sees no key (its gradient is then 0:
    # p = 0 there), so the loop never skips a block.
    for start_m in range(0, len_q, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < len_q
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q_t = tl.load(q_base + rows[None, :] * stride_qs + offs_d[:, None], mask=row_ok[None, :] & d_ok[:, None],
                      other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=qd_mask, other=0.0)
        o = tl.load(o_base + rows[:, None] * stride_os + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(l_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        dv_inc, ds_t = _kv_tile_grads(k, v, q_t, do, lse, delta, rows, offs_n, 0, row_ok, key_ok, qk_scale, seed,
                                      seqlen_k, drop_threshold, keep_scale, CAUSAL, HAS_DROPOUT, DOT_PRECISION)
        dv += dv_inc
        dk += tl.dot(ds_t, tl.trans(q_t), input_precision=DOT_PRECISION)
        # dQᵀ = kᵀ dSᵀ (D, M) rather than dS k (M, D): a 32-row dS would be below wgmma's 64-row minimum
        # per warp group (sm_90 would fall back to mma.sync and stage dS through shared memory), while
        # head_dim rows are not (ptxas: every dot a wgmma, 16 KB less shared memory, no spills)
        dq_t = tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION) * sm_scale
        tl.store(dq_base + rows[None, :] * stride_dqs + offs_d[:, None], dq_t.to(DQ.dtype.element_ty),
                 mask=row_ok[None, :] & d_ok[:, None])

    _store_kv_grads(DK, DV, dk, dv, sm_scale, b64, h64, start64, offs_n, offs_d, col_ok, d_ok,
                    stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs)


# ------------------------------------------------------------------------------- configurations

def _block_d(head_dim: int) -> int:
    return max(16, _next_pow2(head_dim))


_MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y, the (sequence x head) axis of every launch


_config_override: Optional[dict] = None   # {kind: (BLOCK_M, BLOCK_N, num_warps, num_stages)}
_config_override_read = False


def set_config_override(config: Optional[dict]) -> None:
    """Replace the GPU launch parameters with e.g. {"fwd": [128, 64, 4, 3], "dkdv": [32, 128, 4, 3],
    "dq": [128, 32, 4, 3], "fused": [32, 128, 8, 3]} (BLOCK_M, BLOCK_N, num_warps, num_stages; "fused":
    [] turns the one-launch backward off), or go back to the defaults with None (it applies in the
    interpreter too): a knob for tuning sweeps on a GPU (benchmarks/bench_attention.py --sweep) and tests, not for users;
    such a configuration is not compiled ahead of time by the tests. The environment variable
    FASTBERT_ATTENTION_CONFIG (the same object in JSON) is read once, at the first launch."""
    global _config_override, _config_override_read
    parsed = None
    if config:
        parsed = {}
        for kind, value in config.items():
            value = tuple(int(x) for x in value)
            if kind not in ("fwd", "dkdv", "dq", "fused"):
                raise ValueError(f"attention config override: unknown kind {kind!r} (fwd, dkdv, dq or fused)")
            if len(value) != 4 and not (kind == "fused" and value == ()):
                raise ValueError(f"attention config override {kind}: expected [BLOCK_M, BLOCK_N, num_warps, "
                                 f"num_stages]{' or [] (off)' if kind == 'fused' else ''}, got {list(value)}")
            parsed[kind] = value
    _config_override = parsed
    _config_override_read = True
    _FWD_PLANS.clear()
    _BWD_PLANS.clear()


def _override(kind):
    if not _config_override_read:
        import json
        text = os.environ.get("FASTBERT_ATTENTION_CONFIG")
        set_config_override(json.loads(text) if text else None)
    return None if _config_override is None else _config_override.get(kind)


def fwd_config(block_d: int, dtype: torch.dtype, interpreting: Optional[bool] = None) -> dict:
    """Launch parameters of _attn_fwd (one fixed choice per head_dim / dtype: no autotuning, so the
    interpreter and ahead-of-time compilation see exactly what a GPU runs). `interpreting` defaults
    to whether TRITON_INTERPRET was set (False asks for the GPU choice, e.g. to compile it ahead of time)."""
    override = _override("fwd")
    if override is not None:
        return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), override))
    if _interpreting() if interpreting is None else interpreting:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32 if block_d == 128 else 64, num_warps=4, num_stages=2)
    if block_d <= 64:  # H200 sweep (benchmarks/results/gpu-h200-2026-11-26-sweep): -8% at seq 512
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def bwd_config(block_d: int, dtype: torch.dtype, interpreting: Optional[bool] = None) -> dict:
    """Launch parameters of the backward kernels, each (BLOCK_M, BLOCK_N, warps, stages): dkdv with
    BLOCK_N keys per program; dq with BLOCK_M queries per program; fused (the one-launch backward of
    sequences of at most its BLOCK_N tokens) with BLOCK_M queries per loop step, or None: never fused.
    An override {"fused": []} turns the fused path off (a sweep's baseline)."""
    if _interpreting() if interpreting is None else interpreting:
        # 16-row steps: the tests' short sequences take several loop iterations of the fused kernel.
        config = dict(dkdv=(64, 64, 4, 1), dq=(64, 64, 4, 1), fused=(16, 64, 4, 1))
    elif dtype == torch.float32:
        # The fused kernel's fp32 tiles spill even at 8 warps with head_dim 128 (ptxas: ~21 KB per thread;
        # benchmarks/ptxas_report.py), so that case keeps the split kernels.
        config = dict(dkdv=(32, 64, 4, 2), dq=(64, 32, 4, 2), fused=(32, 64, 8, 2) if block_d <= 64 else None)
    else:
        warps = 8 if block_d == 128 else 4
        # dQ with 64-key blocks and 8 warps: -9% at seq 512 in the H200 sweep (head_dim <= 64). The fused
        # kernel is the dK/dV kernel plus dQ: at 4 warps it spills 370-650 bytes per thread where 8 warps
        # spill none (ptxas, benchmarks/results/ptxas-cpu-2026-11-27-s11); head_dim 128 keeps it to
        # 64 keys and 16-row steps (ptxas: 28 bytes of spills packed without dropout, none otherwise;
        # 32-row steps spill up to 152). Not yet timed on a GPU.
        config = dict(dkdv=(32, 128, warps, 3), dq=(128, 64, 8, 3) if block_d <= 64 else (128, 32, warps, 3),
                      fused=(32, 128, 8, 3) if block_d <= 64 else (16, 64, 8, 3))
    for kind in ("dkdv", "dq", "fused"):
        override = _override(kind)
        if override is not None:
            config[kind] = override or None
    return config


_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}

# Launch decisions per (dtype, head_dim, layout, mask scan width, causal, dropout): built once, so a
# call only gathers strides and launches (the eager path's host time is what limits short sequences).
_FWD_PLANS: dict = {}
_BWD_PLANS: dict = {}


def _flags(key):
    dtype, head_dim, varlen, mask_block, causal, dropout = key
    return dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), MASK_BLOCK=mask_block or 16, IS_VARLEN=varlen,
                HAS_MASK=mask_block is not None, CAUSAL=causal, HAS_DROPOUT=dropout, DOT_PRECISION=_PRECISION[dtype])


def _fwd_plan(key):
    """(BLOCK_M, keyword arguments of the _attn_fwd launch) for one plan key."""
    plan = _FWD_PLANS.get(key)
    if plan is None:
        flags = _flags(key)
        cfg = fwd_config(flags["BLOCK_D"], key[0])
        plan = cfg["BLOCK_M"], dict(flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        _FWD_PLANS[key] = plan
    return plan


def _bwd_plan(key):
    """(dQ BLOCK_M, dQ launch keywords, dK/dV BLOCK_N, dK/dV launch keywords, fused BLOCK_N, fused launch
    keywords) for one plan key; fused BLOCK_N is 0 when the fused kernel is off."""
    plan = _BWD_PLANS.get(key)
    if plan is None:
        flags = _flags(key)
        cfg = bwd_config(flags["BLOCK_D"], key[0])
        (dq_m, dq_n, dq_warps, dq_stages), (kv_m, kv_n, kv_warps, kv_stages) = cfg["dq"], cfg["dkdv"]
        plan = (dq_m, dict(flags, BLOCK_M=dq_m, BLOCK_N=dq_n, num_warps=dq_warps, num_stages=dq_stages),
                kv_n, dict(flags, BLOCK_M=kv_m, BLOCK_N=kv_n, num_warps=kv_warps, num_stages=kv_stages), 0, None)
        if cfg["fused"] is not None:
            f_m, f_n, f_warps, f_stages = cfg["fused"]
            fused_flags = {k: v for k, v in flags.items() if k != "MASK_BLOCK"}  # it never scans for the last key
            plan = plan[:4] + (f_n, dict(fused_flags, BLOCK_M=f_m, BLOCK_N=f_n, num_warps=f_warps,
                                         num_stages=f_stages))
        _BWD_PLANS[key] = plan
    return plan


def _plan_key(q, key_padding_mask, varlen, causal, dropout_p):
    # The whole mask row in one load for BERT's lengths; longer rows take a few steps.
    mask_block = None if key_padding_mask is None else min(1024, max(16, _next_pow2(key_padding_mask.shape[1])))
    return q.dtype, q.shape[-1], varlen, mask_block, bool(causal), dropout_p > 0.0


# ------------------------------------------------------------------------------------------ dropout

def _check_dropout_counter(seqlen_q, seqlen_k):
    # The Philox counter of (row, group of 8 keys) is an int32 per (batch, head).
    if seqlen_q * ((seqlen_k + 7) // 8) >= 2 ** 31:
        raise ValueError(f"Triton attention dropout supports seq_q * ceil(seq_k / 8) < 2**31, got seq_q={seqlen_q}, "
                         f"seq_k={seqlen_k}")


def _check_row_offsets(seqlen, *row_strides):
    """Row offsets inside a sequence are int32 in the kernels (row * token stride; the sequence base
    is int64): refuse shapes whose in-sequence offsets would wrap rather than address wrong memory.
    row_strides: _rows() of each tensor the launch addresses (the launchers pass them on to it)."""
    stride = max(rows[2] for rows in row_strides)
    if seqlen * stride >= 2 ** 31:
        raise ValueError(f"Triton attention: a sequence of {seqlen} tokens at a token stride of {stride} elements "
                         "passes 2**31 elements within one sequence; split it or use the reference kernels")


def _check_given(name, given, like):
    if given.shape != like.shape or given.dtype != like.dtype or given.device != like.device or given.stride(-1) != 1:
        raise ValueError(f"attention: the given {name} must match {tuple(like.shape)} {like.dtype} on {like.device} "
                         f"with a contiguous last dimension, got {tuple(given.shape)} {given.dtype} "
                         f"stride {given.stride()}")


# --------------------------------------------------------------------------------- host launchers

def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_kernel_limits(q, k, v):
    """The checks of the custom ops (fastbert.kernels has done them before the eager path)."""
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"Triton attention supports head_dim <= {MAX_HEAD_DIM}, got {head_dim}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"Triton attention takes fp16, bf16 or fp32, got {q.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q in dtype and device ({q.dtype}, {q.device}); "
                             f"got {t.dtype}, {t.device}")


def _rows(t, varlen):
    """(batch, head, token) strides of a q/k/v-like tensor: padded (B, H, S, D); packed (total, H, D),
    whose batch stride is 0 (the sequence start comes from cu_seqlens)."""
    s = t.stride()
    return (0, s[1], s[0]) if varlen else (s[0], s[1], s[2])


def _flash_fwd(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale,
               out=None):
    """Allocate out (contiguous, like q) and lse, launch _attn_fwd; returns (out, lse). out: a given
    output of q's shape (any strides with a contiguous last dim), written in place."""
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    varlen = cu_seqlens is not None
    if varlen:
        cu_seqlens = cu_seqlens.contiguous()
        total, heads = q.shape[0], q.shape[1]
        batch, seqlen_q, seqlen_k = cu_seqlens.shape[0] - 1, max_seqlen, max_seqlen
        lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
        lse_strides = (0, total)
    else:
        batch, heads, seqlen_q = q.shape[0], q.shape[1], q.shape[2]
        seqlen_k = k.shape[2]
        lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        lse_strides = (heads * seqlen_q, seqlen_q)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        _check_given("out", out, q)
    if q.numel() == 0 or batch == 0 or seqlen_q == 0:
        return out.zero_(), lse.fill_(float("inf"))
    q_rows, k_rows, v_rows, o_rows = rows = [_rows(t, varlen) for t in (q, k, v, out)]
    _check_row_offsets(max(seqlen_q, seqlen_k), *rows)
    if batch * heads > _MAX_GRID_Y:
        raise ValueError(f"attention: batch x heads = {batch} x {heads} exceeds the {_MAX_GRID_Y} sequences x heads "
                         f"one launch covers (CUDA's grid y limit); split the batch")
    if dropout_p > 0.0:
        _check_dropout_counter(seqlen_q, seqlen_k)
    block_m, launch = _fwd_plan(_plan_key(q, key_padding_mask, varlen, causal, dropout_p))
    kpm = None if key_padding_mask is None else _last_dim_contiguous(key_padding_mask).view(torch.uint8)
    _attn_fwd[(_cdiv(seqlen_q, block_m), batch * heads)](
        q, k, v, out, lse, kpm, cu_seqlens, seed,
        *q_rows, *k_rows, *v_rows, *o_rows, *lse_strides, 0 if kpm is None else kpm.stride(0),
        heads, seqlen_q, seqlen_k, softmax_scale * _LOG2E, *dropout_args(dropout_p), **launch,
    )
    return out, lse


def _flash_bwd(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, seed, causal, dropout_p,
               softmax_scale, grads=None):
    """dQ, dK, dV: for sequences within the fused kernel's key block, that one kernel; otherwise one kernel
    for dQ (which also writes delta), then one for dK/dV. Allocated contiguous,
    or grads: given (dq, dk, dv) of q/k/v's shapes (any strides with a contiguous last dim, e.g. views
    of one dqkv buffer), written in place."""
    dout, q, k, v, out = (_last_dim_contiguous(t) for t in (dout, q, k, v, out))
    varlen = cu_seqlens is not None
    if varlen:
        cu_seqlens = cu_seqlens.contiguous()
        total, heads = q.shape[0], q.shape[1]
        batch, seqlen_q, seqlen_k = cu_seqlens.shape[0] - 1, max_seqlen, max_seqlen
        lse_strides = (0, lse.stride(0))
    else:
        batch, heads, seqlen_q = q.shape[0], q.shape[1], q.shape[2]
        seqlen_k = k.shape[2]
        lse_strides = (lse.stride(0), lse.stride(1))
    if grads is None:
        grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    else:
        for name, given, like in zip(("dq", "dk", "dv"), grads, (q, k, v)):
            _check_given(name, given, like)
    dq, dk, dv = grads
    if q.numel() == 0 or k.numel() == 0 or batch == 0 or seqlen_q == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q_rows, k_rows, v_rows, o_rows, do_rows, dq_rows, dk_rows, dv_rows = rows = [
        _rows(t, varlen) for t in (q, k, v, out, dout, dq, dk, dv)]
    _check_row_offsets(max(seqlen_q, seqlen_k), *rows)
    dq_m, dq_launch, kv_n, kv_launch, fused_n, fused_launch = _bwd_plan(
        _plan_key(q, key_padding_mask, varlen, causal, dropout_p))
    kpm = None if key_padding_mask is None else _last_dim_contiguous(key_padding_mask).view(torch.uint8)
    stride_mb = 0 if kpm is None else kpm.stride(0)
    common = (heads, seqlen_q, seqlen_k, softmax_scale * _LOG2E, softmax_scale, *dropout_args(dropout_p))
    if max(seqlen_q, seqlen_k) <= fused_n:
        # Every key of a sequence in one block: one program per (sequence, head) does it all. Long query
        # sides stay on the split path, whose grid also spreads the query blocks.
        _attn_bwd_fused[(1, batch * heads)](
            q, k, v, out, dout, dq, dk, dv, lse, kpm, cu_seqlens, seed,
            *q_rows, *k_rows, *v_rows, *o_rows, *do_rows, *dq_rows, *dk_rows, *dv_rows, *lse_strides, stride_mb,
            *common, **fused_launch,
        )
        return dq, dk, dv
    delta = torch.empty_like(lse)
    # dQ first: it also writes delta = rowsum(dO * O), which the dK/dV kernel reads (stream order).
    _attn_bwd_dq[(_cdiv(seqlen_q, dq_m), batch * heads)](
        q, k, v, out, dout, dq, lse, delta, kpm, cu_seqlens, seed,
        *q_rows, *k_rows, *v_rows, *o_rows, *do_rows, *dq_rows, *lse_strides, stride_mb, *common, **dq_launch,
    )
    _attn_bwd_dkdv[(_cdiv(seqlen_k, kv_n), batch * heads)](
        q, k, v, dout, dk, dv, lse, delta, kpm, cu_seqlens, seed,
        *q_rows, *k_rows, *v_rows, *do_rows, *dk_rows, *dv_rows, *lse_strides, stride_mb, *common, **kv_launch,
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------ custom ops

def _require_interpreter():
    if not _interpreting():
        raise RuntimeError("fastbert's Triton attention on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is imported (FASTBERT_KERNELS=triton)")


@torch.library.custom_op("fastbert::attention_fwd", mutates_args=(), device_types="cuda")
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                  seed: Optional[torch.Tensor], causal: bool, dropout_p: float,
                  softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded-layout forward: (out (B, H, Sq, D), lse fp32 (B, H, Sq) in base 2)."""
    _check_kernel_limits(q, k, v)
    return _flash_fwd(q, k, v, key_padding_mask, None, 0, seed, causal, dropout_p, softmax_scale)


@attention_fwd.register_kernel("cpu")
def _(q, k, v, key_padding_mask, seed, causal, dropout_p, softmax_scale):
    _require_interpreter()
    _check_kernel_limits(q, k, v)
    return _flash_fwd(q, k, v, key_padding_mask, None, 0, seed, causal, dropout_p, softmax_scale)


@attention_fwd.register_fake
def _(q, k, v, key_padding_mask, seed, causal, dropout_p, softmax_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastbert::attention_bwd", mutates_args=(), device_types="cuda")
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                  causal: bool, dropout_p: float, softmax_scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded-layout backward: (dq, dk, dv)."""
    _check_kernel_limits(q, k, v)
    return _flash_bwd(dout, q, k, v, out, lse, key_padding_mask, None, 0, seed, causal, dropout_p, softmax_scale)


@attention_bwd.register_kernel("cpu")
def _(dout, q, k, v, out, lse, key_padding_mask, seed, causal, dropout_p, softmax_scale):
    _require_interpreter()
    _check_kernel_limits(q, k, v)
    return _flash_bwd(dout, q, k, v, out, lse, key_padding_mask, None, 0, seed, causal, dropout_p, softmax_scale)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, seed, causal, dropout_p, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, seed, causal, dropout_p, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
    ctx.causal, ctx.dropout_p, ctx.softmax_scale = causal, dropout_p, softmax_scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, key_padding_mask, seed, ctx.causal, ctx.dropout_p,
                               ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


@torch.library.custom_op("fastbert::varlen_attention_fwd", mutates_args=(), device_types="cuda")
def varlen_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, seed: Optional[torch.Tensor], causal: bool, dropout_p: float,
                         softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed-layout forward: (out (total, H, D), lse fp32 (H, total) in base 2)."""
    _check_kernel_limits(q, k, v)
    return _flash_fwd(q, k, v, None, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale)


@varlen_attention_fwd.register_kernel("cpu")
def _(q, k, v, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale):
    _require_interpreter()
    _check_kernel_limits(q, k, v)
    return _flash_fwd(q, k, v, None, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale)


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastbert::varlen_attention_bwd", mutates_args=(), device_types="cuda")
def varlen_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                         seed: Optional[torch.Tensor], causal: bool, dropout_p: float, softmax_scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed-layout backward: (dq, dk, dv)."""
    _check_kernel_limits(q, k, v)
    return _flash_bwd(dout, q, k, v, out, lse, None, cu_seqlens, max_seqlen, seed, causal, dropout_p,
                      softmax_scale)


@varlen_attention_bwd.register_kernel("cpu")
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale):
    _require_interpreter()
    _check_kernel_limits(q, k, v)
    return _flash_bwd(dout, q, k, v, out, lse, None, cu_seqlens, max_seqlen, seed, causal, dropout_p,
                      softmax_scale)


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
    ctx.max_seqlen, ctx.causal, ctx.dropout_p, ctx.softmax_scale = max_seqlen, causal, dropout_p, softmax_scale
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, seed, ctx.causal,
                                      ctx.dropout_p, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None, None, None


varlen_attention_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


# ---------------------------------------------------------------------------------- public entry

def _draw_seed(q, dropout_p):
    """A Philox seed from PyTorch's generator for q's device (no host sync, traceable)."""
    if dropout_p <= 0.0:
        return None
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=q.device)


def _use_reference(q, k):
    return q.dtype == torch.float64 or q.numel() == 0 or k.numel() == 0


class _Attention(torch.autograd.Function):
    """Eager twin of fastbert::attention_fwd/_bwd: the same launchers without the custom-op dispatch,
    which costs several times a launch in Python (tens of microseconds per call, as much as the
    whole forward of a BERT-base layer at seq 128)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, seed, causal, dropout_p, softmax_scale):
        out, lse = _flash_fwd(q, k, v, key_padding_mask, None, 0, seed, causal, dropout_p, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seed)
        ctx.causal, ctx.dropout_p, ctx.softmax_scale = causal, dropout_p, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_padding_mask, seed = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(dout, q, k, v, out, lse, key_padding_mask, None, 0, seed, ctx.causal,
                                ctx.dropout_p, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None, None


class _VarlenAttention(torch.autograd.Function):
    """Eager twin of fastbert::varlen_attention_fwd/_bwd (see _Attention)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale):
        out, lse = _flash_fwd(q, k, v, None, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
        ctx.max_seqlen, ctx.causal, ctx.dropout_p, ctx.softmax_scale = max_seqlen, causal, dropout_p, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(dout, q, k, v, out, lse, None, cu_seqlens, ctx.max_seqlen, seed, ctx.causal,
                                ctx.dropout_p, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None, None, None


class _AttentionQKVPacked(torch.autograd.Function):
    """_Attention on one fused projection: qkv (B, S, 3, H, D) in, out (B, S, H, D). The kernels read
    q/k/v as strided views, write the output in (B, S, H, D) (a view of it is the next matmul's
    (B*S, H*D) input) and the gradients into one dqkv like qkv: no permute copy forward, no stack or
    reshape copy backward (which q/k/v views of qkv would cost through autograd)."""

    @staticmethod
    def forward(ctx, qkv, key_padding_mask, seed, causal, dropout_p, softmax_scale):
        q, k, v = split_qkv(qkv)
        out = qkv.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])  # (B, S, H, D)
        _, lse = _flash_fwd(q, k, v, key_padding_mask, None, 0, seed, causal, dropout_p, softmax_scale,
                            out=out.transpose(1, 2))
        ctx.save_for_backward(qkv, out, lse, key_padding_mask, seed)
        ctx.causal, ctx.dropout_p, ctx.softmax_scale = causal, dropout_p, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse, key_padding_mask, seed = ctx.saved_tensors
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        _flash_bwd(dout.transpose(1, 2), *split_qkv(qkv), out.transpose(1, 2), lse, key_padding_mask, None, 0,
                   seed, ctx.causal, ctx.dropout_p, ctx.softmax_scale, grads=split_qkv(dqkv))
        return dqkv, None, None, None, None, None


class _VarlenAttentionQKVPacked(torch.autograd.Function):
    """_VarlenAttention on one fused projection: qkv (T, 3, H, D) in, out (T, H, D); the gradients go
    into one dqkv like qkv (see _AttentionQKVPacked)."""

    @staticmethod
    def forward(ctx, qkv, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale):
        out, lse = _flash_fwd(*qkv.unbind(1), None, cu_seqlens, max_seqlen, seed, causal, dropout_p, softmax_scale)
        ctx.save_for_backward(qkv, out, lse, cu_seqlens, seed)
        ctx.max_seqlen, ctx.causal, ctx.dropout_p, ctx.softmax_scale = max_seqlen, causal, dropout_p, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse, cu_seqlens, seed = ctx.saved_tensors
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        _flash_bwd(dout, *qkv.unbind(1), out, lse, None, cu_seqlens, ctx.max_seqlen, seed, ctx.causal,
                   ctx.dropout_p, ctx.softmax_scale, grads=dqkv.unbind(1))
        return dqkv, None, None, None, None, None, None


def _eager_ok(q):
    """Whether to take the autograd.Function path: not while torch.compile traces (it needs the custom
    op), and on CPU tensors only under the interpreter (as the ops' CPU kernels require)."""
    if torch.compiler.is_compiling():
        return False
    if not q.is_cuda:
        _require_interpreter()
    return True


def attention(q, k, v, key_padding_mask, causal, dropout_p, softmax_scale):
    """Padded-layout attention (called by fastbert.kernels.attention after its input checks)."""
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"Triton attention supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if _use_reference(q, k):
        from . import reference
        return reference.attention(q, k, v, key_padding_mask, causal=causal, dropout_p=dropout_p,
                                   softmax_scale=softmax_scale)
    seed = _draw_seed(q, dropout_p)
    args = (q, k, v, key_padding_mask, seed, bool(causal), float(dropout_p), float(softmax_scale))
    if _eager_ok(q):
        return _Attention.apply(*args)
    out, _lse = attention_fwd(*args)
    return out


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, dropout_p, softmax_scale):
    """Packed-layout attention (called by fastbert.kernels.varlen_attention after its input checks)."""
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"Triton attention supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if _use_reference(q, k):
        from . import reference
        return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, dropout_p=dropout_p,
                                          softmax_scale=softmax_scale)
    seed = _draw_seed(q, dropout_p)
    args = (q, k, v, cu_seqlens, int(max_seqlen), seed, bool(causal), float(dropout_p), float(softmax_scale))
    if _eager_ok(q):
        return _VarlenAttention.apply(*args)
    out, _lse = varlen_attention_fwd(*args)
    return out


def attention_qkvpacked(qkv, key_padding_mask, causal, dropout_p, softmax_scale):
    """attention() on one fused projection qkv (B, S, 3, H, D); returns (B, S, H, D)."""
    q, k, v = split_qkv(qkv)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"Triton attention supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if _use_reference(q, k) or not _eager_ok(q):  # float64 / empty, or traced: the unpacked path
        return attention(q, k, v, key_padding_mask, causal, dropout_p, softmax_scale).transpose(1, 2)
    return _AttentionQKVPacked.apply(qkv, key_padding_mask, _draw_seed(q, dropout_p), bool(causal),
                                     float(dropout_p), float(softmax_scale))


def varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, causal, dropout_p, softmax_scale):
    """varlen_attention() on one fused projection qkv (T, 3, H, D); returns (T, H, D)."""
    q, k, v = qkv.unbind(1)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"Triton attention supports head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if _use_reference(q, k) or not _eager_ok(q):
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, dropout_p, softmax_scale)
    return _VarlenAttentionQKVPacked.apply(qkv, cu_seqlens, int(max_seqlen), _draw_seed(q, dropout_p), bool(causal),
                                           float(dropout_p), float(softmax_scale))
