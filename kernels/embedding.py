"""BERT's embedding layer in Triton: y = dropout(layer_norm(word[ids] + position[pos] + type[tt])).

Forward: one program per token gathers its three table rows, sums them, normalises with fp32
statistics, applies the affine map and dropout, and writes the row once; it saves the fp32 mean and
rstd of each token (nothing else: the backward re-gathers the rows, cheaper than storing the sum).

Backward, in two steps:
1. A row kernel regenerates the dropout mask, recomputes the normalised row and writes the gradient
   of the pre-norm sum, dh, in fp32 (tokens, n); each program also reduces its share of the
   LayerNorm weight / bias gradients in fp32 (a (programs, n) buffer summed by torch).
2. Each table's gradient is a deterministic segment sum of dh: the tokens are stably sorted by id
   (torch.sort, stable), the sorted list is cut into chunks of CHUNK tokens, and a program per
   (chunk, column block) sums each run of equal ids in order, in fp32. A run that lies inside one
   chunk is written straight to its table row; the pieces of a run that crosses chunk boundaries go
   to a small fp32 carry buffer, and a second kernel lets the chunk where the run starts add them
   up in chunk order. Every table row is written exactly once, no atomics, so the result is
   bitwise repeatable, and a run as long as half the batch (token type 0) is spread over many
   programs instead of serialised in one. Rows of ids absent from the batch are zero.

Dropout: the keep mask of kernels/philox_dropout.py (16 Philox bits per element, 8 per call, element
(token, column)) after the LayerNorm, kept values scaled by 1 / (1 - effective_dropout_p(p)); the seed is
a one-element tensor drawn from PyTorch's generator on the tables' device (torch.manual_seed makes it
repeatable, no host sync); the backward regenerates the mask instead of storing it (see layer_norm.py).

Supports: fp32, fp16, bf16 tables (math in fp32, output in the word table's dtype); LayerNorm
weights of those dtypes; any integer id dtype; non-contiguous (e.g. expanded) id tensors, read
through their strides without a copy; widths 1..MAX_WIDTH (8192).
Not supported: widths above MAX_WIDTH (ValueError); float64 on the GPU path.
Caution: ids are validated (range) by fastbert.kernels before this runs; an id out of range that
slips past (e.g. inside a compiled region, where the check is skipped) reads out of bounds.
dh in fp32 costs 4 bytes per element of traffic in the backward, the price of fp32 table
gradients.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2
from .layer_norm import check_width, draw_seed, normalize, num_partials, row_block, row_warps
from .philox_dropout import dropout_args, keep_row

__all__ = ["embed_layer_norm", "segment_sum"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SEGMENT_BLOCK_N = 256  # columns per segment-sum program


def segment_chunk(device: torch.device) -> int:
    """Sorted tokens per segment-sum program. Tiny on the CPU, so tests cross chunk boundaries."""
    return 64 if device.type == "cuda" else 4


@triton.jit
def _gather_sum(IDS, TT, POS, WORD, POSW, TYPEW, row, seq, s_ids_b, s_ids_s, s_tt_b, s_tt_s, s_pos_b, s_pos_s,
                n, cols, mask):
    """word[ids] + position[pos] + type[tt] of token `row` (int64), in fp32."""
    b = row // seq
    s = row % seq
    wid = tl.load(IDS + b * s_ids_b + s * s_ids_s).to(tl.int64)
    tid = tl.load(TT + b * s_tt_b + s * s_tt_s).to(tl.int64)
    pid = tl.load(POS + b * s_pos_b + s * s_pos_s).to(tl.int64)
    h = tl.load(WORD + wid * n + cols, mask=mask, other=0.0).to(tl.float32)
    h += tl.load(POSW + pid * n + cols, mask=mask, other=0.0).to(tl.float32)
    h += tl.load(TYPEW + tid * n + cols, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _embed_ln_fwd(
    IDS,  # pointer to input_ids (batch, seq), any integer dtype, read through its strides
    TT,  # pointer to token_type_ids (batch, seq)
    POS,  # pointer to position_ids (batch, seq)
    WORD,  # pointer to the word table (vocab, n), contiguous
    POSW,  # pointer to the position table (max_positions, n), contiguous
    TYPEW,  # pointer to the token-type table (type_vocab, n), contiguous
    W,  # pointer to the LayerNorm weight (n,)
    B,  # pointer to the LayerNorm bias (n,)
    Y,  # pointer to the output (batch * seq, n), the word table's dtype
    MEAN,  # pointer to the fp32 token means (batch * seq,)
    RSTD,  # pointer to the fp32 token 1/std (batch * seq,)
    SEED,  # pointer to the int64 dropout seed (read only when HAS_DROPOUT)
    seq,  # sequence length (to split a token index into batch, position)
    s_ids_b, s_ids_s,  # strides of input_ids (elements)
    s_tt_b, s_tt_s,  # strides of token_type_ids
    s_pos_b, s_pos_s,  # strides of position_ids (often 0 along batch: an expanded arange)
    n,  # width
    eps,  # LayerNorm epsilon
    drop_threshold,  # dropout: drop when the element's 16 random bits < this (philox_dropout.py)
    scale,  # dropout: the kept values' scale, 1 / (1 - drop_threshold / 65536)
    HAS_DROPOUT: tl.constexpr,  # p > 0
    BLOCK_N: tl.constexpr,  # power of 2 >= n
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n
    h = _gather_sum(IDS, TT, POS, WORD, POSW, TYPEW, row, seq, s_ids_b, s_ids_s, s_tt_b, s_tt_s, s_pos_b, s_pos_s,
                    n, cols, mask)
    d, mean, rstd = normalize(h, mask, n, eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = d * rstd * w + b
    if HAS_DROPOUT:
        keep = keep_row(tl.load(SEED), row, n, drop_threshold, BLOCK_N)
        y = tl.where(keep, y * scale, 0.0)
    tl.store(Y + row * n + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _embed_ln_bwd(
    IDS, TT, POS,  # pointers to the three id tensors (batch, seq), read through their strides
    WORD, POSW, TYPEW,  # pointers to the three tables, contiguous
    W,  # pointer to the LayerNorm weight (n,)
    DY,  # pointer to the output gradient (tokens, n), contiguous
    DH,  # pointer to the fp32 gradient of the pre-norm sum (tokens, n), written here
    DW_PART,  # pointer to fp32 partial LayerNorm weight gradients (programs, n)
    DB_PART,  # pointer to fp32 partial LayerNorm bias gradients (programs, n)
    MEAN,  # pointer to the fp32 token means
    RSTD,  # pointer to the fp32 token 1/std
    SEED,  # pointer to the int64 dropout seed (read only when HAS_DROPOUT)
    tokens,  # batch * seq
    seq,  # sequence length
    s_ids_b, s_ids_s, s_tt_b, s_tt_s, s_pos_b, s_pos_s,  # id strides (elements)
    n,  # width
    rows_per_program,  # tokens each program walks
    drop_threshold,  # dropout: drop when the element's 16 random bits < this (philox_dropout.py)
    scale,  # dropout: the kept values' scale, 1 / (1 - drop_threshold / 65536)
    HAS_DROPOUT: tl.constexpr,  # p > 0: regenerate the mask
    BLOCK_N: tl.constexpr,  # power of 2 >= n
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    start = pid.to(tl.int64) * rows_per_program  # int64 rows: offsets may pass 2**31
    end = tl.minimum(start + rows_per_program, tokens)
    for row in range(start, end):
        h = _gather_sum(IDS, TT, POS, WORD, POSW, TYPEW, row, seq, s_ids_b, s_ids_s, s_tt_b, s_tt_s, s_pos_b,
                        s_pos_s, n, cols, mask)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        dy = tl.load(DY + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = keep_row(seed, row, n, drop_threshold, BLOCK_N)
            dy = tl.where(keep, dy * scale, 0.0)
        dw += dy * xhat
        db += dy
        g = dy * w
        c1 = tl.sum(xhat * g, axis=0) / n
        c2 = tl.sum(g, axis=0) / n
        dh = (g - (xhat * c1 + c2)) * rstd
        tl.store(DH + row * n + cols, dh, mask=mask)
    tl.store(DW_PART + pid * n + cols, dw, mask=mask)
    tl.store(DB_PART + pid * n + cols, db, mask=mask)


@triton.jit
def _flush_run(OUT, CARRY, chunk, n, cols, cmask, run_id, acc, prev_id, next_id):
    # A run equal to the previous chunk's last id continues from there (head piece, slot 0); one
    # equal to the next chunk's first id continues there (tail piece, slot 1); else it is whole.
    if run_id == prev_id:
        tl.store(CARRY + (chunk * 2) * n + cols, acc, mask=cmask)
    elif run_id == next_id:
        tl.store(CARRY + (chunk * 2 + 1) * n + cols, acc, mask=cmask)
    else:
        tl.store(OUT + run_id * n + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


@triton.jit
def _segment_sum_chunks(
    SORTED,  # pointer to the sorted ids (tokens,), int64
    PERM,  # pointer to the token index of each sorted id (tokens,), int64
    DH,  # pointer to the fp32 rows to sum (tokens, n)
    OUT,  # pointer to the table gradient (vocab, n), zero-filled, written once per present id
    CARRY,  # pointer to fp32 pieces of runs that cross chunk boundaries (chunks, 2, n)
    tokens,  # number of sorted ids
    n,  # width
    CHUNK: tl.constexpr,  # sorted ids per program (a runtime-size loop; constexpr keeps it static)
    BLOCK_N: tl.constexpr,  # columns per program (power of 2)
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n
    start = chunk.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, tokens)
    prev_id = tl.load(SORTED + start - 1, mask=start > 0, other=-1)
    next_id = tl.load(SORTED + end, mask=end < tokens, other=-1)
    run_id = tl.load(SORTED + start)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(start, end):
        cur = tl.load(SORTED + i)
        if cur != run_id:
            _flush_run(OUT, CARRY, chunk, n, cols, cmask, run_id, acc, prev_id, next_id)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            run_id = cur
        tok = tl.load(PERM + i)
        acc += tl.load(DH + tok * n + cols, mask=cmask, other=0.0)
    _flush_run(OUT, CARRY, chunk, n, cols, cmask, run_id, acc, prev_id, next_id)


@triton.jit
def _segment_sum_carries(
    SORTED,  # pointer to the sorted ids (tokens,), int64
    CARRY,  # pointer to the fp32 run pieces written by _segment_sum_chunks (chunks, 2, n)
    OUT,  # pointer to the table gradient (vocab, n)
    tokens,  # number of sorted ids
    n,  # width
    CHUNK: tl.constexpr,  # sorted ids per chunk, as in _segment_sum_chunks
    BLOCK_N: tl.constexpr,  # columns per program (power of 2)
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n
    start = chunk.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, tokens)
    first_id = tl.load(SORTED + start)
    last_id = tl.load(SORTED + end - 1)
    prev_id = tl.load(SORTED + start - 1, mask=start > 0, other=-1)
    next_id = tl.load(SORTED + end, mask=end < tokens, other=-1)
    # This chunk owns the run that leaves through its end, unless that run also entered it.
    started_before = (first_id == last_id) & (first_id == prev_id)
    if (last_id == next_id) & (started_before == 0):
        acc = tl.load(CARRY + (chunk * 2 + 1) * n + cols, mask=cmask, other=0.0)
        j = chunk + 1
        going = True
        while going:
            acc += tl.load(CARRY + (j * 2) * n + cols, mask=cmask, other=0.0)
            end_j = tl.minimum((j + 1).to(tl.int64) * CHUNK, tokens)
            last_j = tl.load(SORTED + end_j - 1)
            next_j = tl.load(SORTED + end_j, mask=end_j < tokens, other=-1)
            going = (last_j == last_id) & (next_j == last_id)
            j += 1
        tl.store(OUT + last_id * n + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


def segment_sum(ids: torch.Tensor, rows: torch.Tensor, num_embeddings: int, dtype: torch.dtype,
                chunk: Optional[int] = None) -> torch.Tensor:
    """out[v] = sum of rows[t] over tokens t with ids[t] == v, in fp32, deterministic; out in `dtype`.

    ids (tokens,) integer, rows (tokens, n) fp32 contiguous.
    """
    tokens, n = rows.shape
    out = torch.zeros((num_embeddings, n), dtype=dtype, device=rows.device)
    if tokens == 0 or n == 0:
        return out
    chunk = chunk or segment_chunk(rows.device)
    sorted_ids, perm = torch.sort(ids.reshape(-1).to(torch.int64), stable=True)
    chunks = cdiv(tokens, chunk)
    block_n = min(next_pow2(n), SEGMENT_BLOCK_N)
    grid = (chunks, cdiv(n, block_n))
    carry = torch.empty((chunks, 2, n), dtype=torch.float32, device=rows.device)
    _segment_sum_chunks[grid](sorted_ids, perm, rows, out, carry, tokens, n, CHUNK=chunk, BLOCK_N=block_n,
                              num_warps=2)
    _segment_sum_carries[grid](sorted_ids, carry, out, tokens, n, CHUNK=chunk, BLOCK_N=block_n, num_warps=2)
    return out


# ------------------------------------------------------------------------------ host launchers + ops

def _strides(*ids):
    return [s for t in ids for s in t.stride()]


def _fwd_impl(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, weight, bias,
              eps: float, dropout_p: float, seed: Optional[torch.Tensor]):
    for name, t in (("word_weight", word_weight), ("position_weight", position_weight),
                    ("type_weight", type_weight), ("weight", weight), ("bias", bias)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"embed_layer_norm (Triton): {name} must be fp16, bf16 or fp32, got {t.dtype}")
    batch, seq = input_ids.shape
    n = word_weight.shape[1]
    check_width(n)
    word_weight, position_weight, type_weight = (word_weight.contiguous(), position_weight.contiguous(),
                                                 type_weight.contiguous())
    weight, bias = weight.contiguous(), bias.contiguous()
    tokens = batch * seq
    y = torch.empty((batch, seq, n), dtype=word_weight.dtype, device=word_weight.device)
    mean = torch.empty((batch, seq), dtype=torch.float32, device=word_weight.device)
    rstd = torch.empty_like(mean)
    if tokens == 0 or n == 0:
        return y, mean, rstd
    has_dropout = dropout_p > 0.0
    block_n = row_block(n)
    _embed_ln_fwd[(tokens,)](input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                             weight, bias, y, mean, rstd, seed if has_dropout else mean, seq,
                             *_strides(input_ids, token_type_ids, position_ids), n, eps,
                             *dropout_args(dropout_p), HAS_DROPOUT=has_dropout, BLOCK_N=block_n,
                             num_warps=row_warps(block_n))
    return y, mean, rstd


def _bwd_impl(dy, input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, weight,
              mean, rstd, dropout_p: float, seed: Optional[torch.Tensor]):
    batch, seq = input_ids.shape
    n = word_weight.shape[1]
    tokens = batch * seq
    word_weight, position_weight, type_weight = (word_weight.contiguous(), position_weight.contiguous(),
                                                 type_weight.contiguous())
    weight, dy = weight.contiguous(), dy.contiguous()
    has_dropout = dropout_p > 0.0
    dh = torch.empty((tokens, n), dtype=torch.float32, device=dy.device)
    programs = max(1, num_partials(tokens, dy.device))
    rows_per_program = cdiv(tokens, programs) if tokens else 1
    programs = cdiv(tokens, rows_per_program) if tokens else 0
    part = torch.zeros((2, max(programs, 1), n), dtype=torch.float32, device=dy.device)
    if tokens and n:
        block_n = row_block(n)
        _embed_ln_bwd[(programs,)](input_ids, token_type_ids, position_ids, word_weight, position_weight,
                                   type_weight, weight, dy, dh, part[0], part[1], mean, rstd,
                                   seed if has_dropout else mean, tokens, seq,
                                   *_strides(input_ids, token_type_ids, position_ids), n, rows_per_program,
                                   *dropout_args(dropout_p), HAS_DROPOUT=has_dropout, BLOCK_N=block_n,
                                   num_warps=row_warps(block_n))
    d_word = segment_sum(input_ids, dh, word_weight.shape[0], word_weight.dtype)
    d_pos = segment_sum(position_ids, dh, position_weight.shape[0], position_weight.dtype)
    d_type = segment_sum(token_type_ids, dh, type_weight.shape[0], type_weight.dtype)
    # d bias in fp32: the autograd wrapper casts it to the bias's own dtype (not rounded via weight's)
    return d_word, d_pos, d_type, part[0].sum(0).to(weight.dtype), part[1].sum(0)


@torch.library.custom_op("fastbert::embed_layer_norm", mutates_args=(), device_types="cuda")
def _embed_ln_op(input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor,
                 word_weight: torch.Tensor, position_weight: torch.Tensor, type_weight: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor, eps: float, dropout_p: float,
                 seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, weight,
                     bias, eps, dropout_p, seed)


@torch.library.custom_op("fastbert::embed_layer_norm_backward", mutates_args=(), device_types="cuda")
def _embed_ln_backward_op(dy: torch.Tensor, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                          position_ids: torch.Tensor, word_weight: torch.Tensor, position_weight: torch.Tensor,
                          type_weight: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                          dropout_p: float, seed: Optional[torch.Tensor]
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d word table, d position table, d type table, d LN weight, d LN bias)."""
    return _bwd_impl(dy, input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, weight,
                     mean, rstd, dropout_p, seed)


# CPU tensors reach these only under FASTBERT_KERNELS=triton with TRITON_INTERPRET=1 (tests).
_embed_ln_op.register_kernel("cpu")(_fwd_impl)
_embed_ln_backward_op.register_kernel("cpu")(_bwd_impl)


@_embed_ln_op.register_fake
def _(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, weight, bias, eps,
      dropout_p, seed):
    batch, seq = input_ids.shape
    y = word_weight.new_empty((batch, seq, word_weight.shape[1]))
    mean = word_weight.new_empty((batch, seq), dtype=torch.float32)
    return y, mean, torch.empty_like(mean)


@_embed_ln_backward_op.register_fake
def _(dy, input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, weight, mean, rstd,
      dropout_p, seed):
    return (torch.empty_like(word_weight, memory_format=torch.contiguous_format),
            torch.empty_like(position_weight, memory_format=torch.contiguous_format),
            torch.empty_like(type_weight, memory_format=torch.contiguous_format),
            torch.empty_like(weight), torch.empty_like(weight, dtype=torch.float32))


def _setup(ctx, inputs, output):
    (input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, weight, bias, eps,
     dropout_p, seed) = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, weight,
                          mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.bias_dtype = bias.dtype


def _backward(ctx, dy, _dmean, _drstd, backward=_embed_ln_backward_op):
    (input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, weight, mean, rstd,
     seed) = ctx.saved_tensors
    d_word, d_pos, d_type, dw, db = backward(dy, input_ids, token_type_ids, position_ids, word_weight,
                                                          position_weight, type_weight, weight, mean, rstd,
                                                          ctx.dropout_p, seed)
    return None, None, None, d_word, d_pos, d_type, dw, db.to(ctx.bias_dtype), None, None, None


_embed_ln_op.register_autograd(_backward, setup_context=_setup)


class _EmbedLayerNorm(torch.autograd.Function):
    """Eager twin of fastbert::embed_layer_norm(_backward): the same launchers without the custom-op
    dispatch (tens of microseconds of Python per call); torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, *inputs):
        y, mean, rstd = _fwd_impl(*inputs)
        _setup(ctx, inputs, (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, None, None, backward=_bwd_impl)


def embed_layer_norm(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, weight,
                     bias, eps: float = 1e-12, dropout_p: float = 0.0) -> torch.Tensor:
    """dropout(layer_norm(word[ids] + position[pos] + type[tt])); inputs validated by fastbert.kernels."""
    seed = draw_seed(word_weight.device) if dropout_p > 0.0 else None
    args = (input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight, weight, bias,
            float(eps), float(dropout_p), seed)
    if torch.compiler.is_compiling():
        return _embed_ln_op(*args)[0]
    return _EmbedLayerNorm.apply(*args)
