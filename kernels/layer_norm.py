"""Fused LayerNorm with its BERT prologues, forward and backward, in Triton.

- add_layer_norm:  y = layer_norm(dropout(x + x_bias) + residual)   (the end of every attention / FFN
                   block; x_bias optional: the bias of the dense layer that made x)
- gelu_layer_norm: y = layer_norm(gelu(x + bias))          (the MLM head transform after its dense)

Forward: each program holds a (BLOCK_M, BLOCK_N) tile, BLOCK_M whole rows (BLOCK_N =
next_power_of_2(n) columns, masked; rows past the end masked too), so the prologue, the fp32 mean /
rstd (reductions along the row) and the affine map cost one read of each input and one write. It
saves only the per-row mean and rstd (fp32); the backward re-reads the inputs and recomputes the
prologue (dropout mask included) instead of storing the pre-norm sum: the same bytes moved in
total, and no extra activation memory.

Backward: each program owns a contiguous group of rows (a multiple of BLOCK_M), walks it one
(BLOCK_M, BLOCK_N) tile per step (optionally software-pipelined: the next tiles' loads in flight
during this one's math) and keeps its share of dweight / dbias (and the GELU bias gradient) in fp32
(BLOCK_M, BLOCK_N) registers, summed over the tile's rows once at the end and written to a
(programs, n) fp32 buffer that torch reduces afterwards: deterministic, and no bf16 rounding of the
partial sums.

Launch parameters: ln_config(n, kind) -> (BLOCK_M, num_warps, backward programs per SM, pipelining
stages), one fixed choice per width and kernel (reasoned from ptxas' register counts, see the note
above FWD_TILE; no autotuning), a small one in the interpreter; set_ln_config_override / FASTBERT_LN_CONFIG
replace it for tuning sweeps (benchmarks/bench_ln_sweep.py) and tests. BLOCK_M = 1 is the one-row
launch of before the tiling (one_row_config).

Dropout: the keep mask of kernels/philox_dropout.py (16 Philox bits per element, 8 elements per
Philox call, element (row, column) of a (rows, n) tensor; p quantised to 16 bits, kept values scaled by
1 / (1 - effective_dropout_p(p))). One Philox call per element, as tl.rand draws, made the p = 0.1
forward 3x slower than p = 0 on an H200 (philox_dropout.py). The seed is a one-element int64 tensor
drawn with torch.randint on the input's device (so torch.manual_seed makes it repeatable and nothing
syncs with the host, CUDA graphs included); the backward regenerates the mask from it rather than
saving it: a few integer ops per element, where a saved mask would cost a write and a read of rows x n
bytes.

Low-precision copy (add_layer_norm(..., low_dtype=bf16 or fp16)): under autocast the fp32 residual
stream feeds the next block's matmul, which would cast it in a kernel of its own (read 4 bytes, write
2, per element), and in the backward autograd would cast that matmul's input gradient back to fp32
and add it to the residual's gradient (two more kernels). With low_dtype the forward also writes y
in that dtype (the same rounding as y.to(low_dtype)) and the backward takes both output gradients
and adds them in fp32 as it loads them (the same rounding as the add), so three elementwise passes
over the activations become one extra write and one extra read.

Dense bias (add_layer_norm(..., x_bias=dense.bias), x = F.linear(h, dense.weight)): the forward adds
the bias in fp32 as it loads x; the gradient of x (after the dropout mask and scale, in fp32, before
any rounding to x's dtype) is the bias gradient row by row, so the backward sums it into a third
(programs, n) fp32 partial buffer beside dweight / dbias, and the separate column reduction autograd
would run for the Linear's bias (over every row, once per dense layer) goes away. The sum is
accumulated also when x's gradient is not stored (no dropout and one dtype: it equals the residual's).

Supports: fp32, fp16, bf16 activations (statistics and math in fp32; add_layer_norm's output in
promote_types(x, residual), as x + residual, gradients in each input's own dtype; gelu_layer_norm's
in x's dtype); weights (and x_bias) of any of these dtypes; widths 1..MAX_WIDTH (8192); any leading shape and any
number of rows (a multiple of BLOCK_M or not; rows x n past 2**31: int64 offsets); non-contiguous
inputs (copied). The dropout mask does not depend on the launch parameters; outputs and gradients
only through the fp32 rounding of the row reductions, and dweight / dbias through their summation
order (deterministic for one configuration, not bit-equal across configurations).
Not supported: widths above MAX_WIDTH (a clear ValueError; the row would no longer fit in
registers); float64 on the GPU path (use the reference).
Caution: the dropout counter is 32 bits, so the mask pattern repeats after 2**32 groups of 8 elements
(2**35 elements) in one call.
With x_bias, x + x_bias is not rounded to x's dtype (a bf16 matmul with its bias would round it): not
bit-equal to dense(h) under autocast, slightly closer to float64. x_bias's gradient is summed in fp32
per program, then over programs by torch (deterministic, not bit-equal to autograd's reduction).
Rows of 8192 spill registers in the backward, as before the tiling (ptxas, sm_90: 40 bytes per
thread, 332 with x_bias; a row is the smallest tile). An override is not compiled ahead of time by
the tests: a sweep may try a configuration the compiler rejects (reported per configuration).
"""
from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _dispatch
from ._host import cdiv, next_pow2
from .gelu import gelu, gelu_grad
from .philox_dropout import dropout_args, keep_row, keep_tile

__all__ = ["add_layer_norm", "gelu_layer_norm", "dropout_mask", "draw_seed", "MAX_WIDTH", "ln_config",
           "set_ln_config_override"]

MAX_WIDTH = 8192
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------ shared helpers

@triton.jit
def normalize(h, mask, n, eps):
    """LayerNorm statistics of one fp32 row h (masked lanes ignored): (h - mean, mean, 1/std)."""
    mean = tl.sum(h, axis=0) / n
    d = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / n + eps)
    return d, mean, rstd


@triton.jit
def normalize_rows(h, mask, n, eps):
    """normalize of each row of an fp32 (BLOCK_M, BLOCK_N) tile h: (h - mean, mean, 1/std), the two
    statistics (BLOCK_M,). Rows past the end (all lanes masked) give mean 0 and a finite rstd."""
    mean = tl.sum(h, axis=1) / n
    d = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / n + eps)
    return d, mean, rstd


@triton.jit
def normalize_rows_grad(dy, xhat, w, rstd, n):
    """The gradient of each row's LayerNorm input from its output gradient: dy (BLOCK_M, BLOCK_N) fp32,
    xhat the normalised rows (0 at masked lanes), w the weight row (1, BLOCK_N), rstd (BLOCK_M, 1)."""
    g = dy * w
    c1 = tl.sum(xhat * g, axis=1)[:, None] / n
    c2 = tl.sum(g, axis=1)[:, None] / n
    return (g - (xhat * c1 + c2)) * rstd


@triton.jit
def _dropout_mask_kernel(
    SEED,  # pointer to the int64 seed (one element)
    MASK,  # pointer to the (rows, n) int8 keep mask to write
    n,  # width
    drop_threshold,  # drop when the element's 16 random bits < this (philox_dropout.py)
    BLOCK_N: tl.constexpr,  # power of 2 >= n
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    keep = keep_row(tl.load(SEED), row, n, drop_threshold, BLOCK_N)
    tl.store(MASK + row * n + cols, keep.to(tl.int8), mask=cols < n)


def draw_seed(device) -> torch.Tensor:
    """The dropout seed: from PyTorch's generator of `device`, no host sync."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def dropout_mask(seed: torch.Tensor, rows: int, n: int, p: float) -> torch.Tensor:
    """The (rows, n) bool keep mask the kernels use for `seed` (for tests and debugging)."""
    check_width(n)
    mask = torch.empty((rows, n), dtype=torch.int8, device=seed.device)
    if rows and n:
        _dropout_mask_kernel[(rows,)](seed, mask, n, dropout_args(p)[0], BLOCK_N=row_block(n))
    return mask.bool()


def check_width(n: int):
    if n > MAX_WIDTH:
        raise ValueError(f"fastbert LayerNorm kernels support widths up to {MAX_WIDTH}, got {n}; "
                         "use FASTBERT_KERNELS=reference for wider rows")


def row_block(n: int) -> int:
    return max(16, next_pow2(n))


def row_warps(block_n: int) -> int:
    # 4-8 fp32 values per thread and vector: enough bytes in flight, no register spills at 8192.
    return min(max(block_n // 256, 1), 16)


def num_partials(rows: int, device: torch.device) -> int:
    """Programs of a backward: several per SM on a GPU (each reduces its rows' dweight in fp32)."""
    return max(1, min(rows, 8 * _dispatch.sm_count(device)))


# ------------------------------------------------------------- launch parameters of the LN kernels

LN_KINDS = ("add_fwd", "add_bwd", "gelu_fwd", "gelu_bwd")


class LnConfig(NamedTuple):
    block_m: int  # rows per tile (power of 2): a forward program's rows, a backward loop step's rows
    num_warps: int
    programs_per_sm: int = 0  # backward: programs per SM (each writes one row of partial sums); forward: 0
    num_stages: int = 0  # backward: software-pipelining stages of its row loop (1: none); forward: 0


# Register budget, from ptxas -v of these kernels for sm_90a (triton 3.6; `python -m
# benchmarks.ptxas_report --ln --sweep`, compiled with a BERT launch's alignment hints: table in
# benchmarks/results/ptxas-cpu-2026-11-27-s12/), in the model's bf16-autocast case at width 768.
# What bounds a memory-bound LayerNorm is the rows an SM works on at once (the bytes it has in
# flight), and registers cap that:
# - forward: one row per program over 4 warps (before the tiling) takes 47 registers, 10 programs
#   = 10 rows per SM; 4-row tiles over 4 warps (32 fp32 values per thread per tile) take 95, no
#   spills, 5 programs = 20 rows per SM, and 4x fewer, longer programs (w / b loads, mean / rstd
#   stores and scheduling amortized over 4 rows). Over 8 warps: 64 registers, 4 programs = 16 rows.
# - backward: one row over 4 warps takes 80 registers, 6 programs = 6 rows per SM, and no larger
#   tile does better: 2 rows over 4 warps take 168 (3 programs, the same 6 rows), 4 over 8 take 181
#   (one program, 4 rows). So rows of 768-8192 keep the one-row backward of before (warps =
#   BLOCK_N / 256, at most 16); narrower rows get several per step, where one-row programs would hit
#   the 32-programs-per-SM limit with few bytes in flight. (The unhinted compile session 11 read
#   these choices from gave other numbers — 56 / 158 / 120 registers — and the same choices.)
# Not measured on a GPU yet: benchmarks/bench_ln_sweep.py times the alternatives (other tiles, warps,
# pipelined backward loops whose stages sit in shared memory, programs per SM) against these defaults
# and the one-row launch.
FWD_TILE, FWD_VALUES_PER_THREAD = 4096, 32
BWD_TILE, BWD_VALUES_PER_THREAD = 1024, 8
BWD_PROGRAMS_PER_SM = 8  # as before the tiling: two waves of the ~4 one-row programs an SM holds
BWD_STAGES = 1
# The interpreter's cost grows with tile elements x programs: two-row tiles keep the tests' tiny
# shapes fast and still exercise partial tiles, several tiles per backward program and the
# cross-program partial sums (2 'SMs' on the CPU: up to 8 backward programs).
INTERPRETER_CONFIG = {"fwd": LnConfig(2, 4), "bwd": LnConfig(2, 4, 4, 1)}

_ln_override: Optional[dict] = None  # {kind: LnConfig}
_ln_override_read = False
_ln_configs: dict = {}  # (kind, block_n, interpreting) -> LnConfig


def set_ln_config_override(config: Optional[dict]) -> None:
    """Replace the launch parameters of some LayerNorm kernels, e.g. {"add_fwd": [4, 8],
    "add_bwd": [2, 8, 4, 2], "gelu_fwd": [1, 4], "gelu_bwd": [1, 4, 8]}: [BLOCK_M, num_warps] for a
    forward, [BLOCK_M, num_warps, programs per SM(, pipelining stages, default 1)] for a backward (on
    the CPU 'SMs' are 2), or go back to the defaults with None. A knob for tuning sweeps
    (benchmarks/bench_ln_sweep.py) and tests, not for users: it applies to every width and in the
    interpreter too, and such a configuration is not compiled ahead of time by the tests.
    FASTBERT_LN_CONFIG (the same object in JSON) is read once, at the first launch."""
    global _ln_override, _ln_override_read
    parsed = None
    if config:
        parsed = {}
        for kind, value in config.items():
            if kind not in LN_KINDS:
                raise ValueError(f"LayerNorm config override: unknown kind {kind!r} (expected one of {LN_KINDS})")
            value = [int(v) for v in value]
            backward = kind.endswith("_bwd")
            if len(value) not in ((3, 4) if backward else (2,)):
                raise ValueError(f"LayerNorm config override {kind}: expected [BLOCK_M, num_warps"
                                 f"{', programs_per_sm[, num_stages]' if backward else ''}], got {value}")
            block_m, warps = value[:2]
            if block_m < 1 or block_m & (block_m - 1) or warps < 1 or warps > 32 or warps & (warps - 1):
                raise ValueError(f"LayerNorm config override {kind}: BLOCK_M and num_warps must be powers of 2 "
                                 f"(num_warps <= 32), got {value}")
            if backward and min(value[2:]) < 1:
                raise ValueError(f"LayerNorm config override {kind}: programs_per_sm and num_stages must be "
                                 f">= 1, got {value}")
            parsed[kind] = LnConfig(block_m, warps, *(value[2:] + [1])[:2]) if backward else LnConfig(block_m, warps)
    _ln_override = parsed
    _ln_override_read = True
    _ln_configs.clear()


def _ln_override_for(kind: str) -> Optional[LnConfig]:
    if not _ln_override_read:
        text = os.environ.get("FASTBERT_LN_CONFIG")
        set_ln_config_override(json.loads(text) if text else None)
    return None if _ln_override is None else _ln_override.get(kind)


def _gpu_config(block_n: int, backward: bool) -> LnConfig:
    tile, per_thread = (BWD_TILE, BWD_VALUES_PER_THREAD) if backward else (FWD_TILE, FWD_VALUES_PER_THREAD)
    block_m = max(1, tile // block_n)
    warps = min(16, max(1, block_m * block_n // (32 * per_thread)))
    return LnConfig(block_m, warps, BWD_PROGRAMS_PER_SM, BWD_STAGES) if backward else LnConfig(block_m, warps)


def ln_config(n: int, kind: str, interpreting: Optional[bool] = None) -> LnConfig:
    """Launch parameters of one LayerNorm kernel (kind in LN_KINDS) for width n: one fixed choice per
    width, no autotuning, so ahead-of-time compilation sees what a GPU runs. `interpreting` defaults to
    whether Triton interprets the kernels (False asks for the GPU choice). An override wins over both."""
    if interpreting is None:
        interpreting = _dispatch.interpreting()
    block_n = row_block(n)
    key = (kind, block_n, interpreting)
    config = _ln_configs.get(key)
    if config is None:
        if kind not in LN_KINDS:
            raise ValueError(f"unknown LayerNorm kernel kind {kind!r} (expected one of {LN_KINDS})")
        backward = kind.endswith("_bwd")
        config = _ln_override_for(kind)
        if config is None:
            config = (INTERPRETER_CONFIG["bwd" if backward else "fwd"] if interpreting
                      else _gpu_config(block_n, backward))
        _ln_configs[key] = config
    return config


def one_row_config(n: int, kind: str) -> LnConfig:
    """The launch of these kernels before the tiling (one row per program or loop step, warps from
    row_warps, 8 backward programs per SM, no pipelining): the baseline a GPU sweep compares against."""
    warps = row_warps(row_block(n))
    return LnConfig(1, warps, 8, 1) if kind.endswith("_bwd") else LnConfig(1, warps)


def backward_split(rows: int, config: LnConfig, device: torch.device) -> Tuple[int, int]:
    """(programs, rows_per_program) of a backward: rows_per_program is a multiple of BLOCK_M, so only
    the last tile of the last program is partial."""
    programs = max(1, min(cdiv(rows, config.block_m), config.programs_per_sm * _dispatch.sm_count(device)))
    rows_per_program = cdiv(cdiv(rows, programs), config.block_m) * config.block_m
    return cdiv(rows, rows_per_program), rows_per_program


def _check_dtypes(**tensors):
    for name, t in tensors.items():
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"LayerNorm (Triton): {name} must be fp16, bf16 or fp32, got {t.dtype}")


# ---------------------------------------------------------------------------- add + LayerNorm kernels

@triton.jit
def _add_ln_fwd(
    X,  # pointer to x (rows, n), contiguous: the sublayer output, dropout applies to it
    R,  # pointer to the residual (rows, n), contiguous
    W,  # pointer to the LayerNorm weight (n,)
    B,  # pointer to the LayerNorm bias (n,)
    Y,  # pointer to the output (rows, n), in promote_types(x, residual)
    Y_LOW,  # pointer to the output's low-precision copy (rows, n) (written only when STORE_LOW)
    MEAN,  # pointer to the fp32 row means (rows,), saved for the backward
    RSTD,  # pointer to the fp32 row 1/std (rows,), saved for the backward
    SEED,  # pointer to the int64 dropout seed (read only when HAS_DROPOUT)
    XB,  # pointer to x's bias (n,), any float dtype (read only when HAS_X_BIAS)
    rows,  # number of rows
    n,  # width
    eps,  # LayerNorm epsilon
    drop_threshold,  # dropout: drop when the element's 16 random bits < this (philox_dropout.py)
    scale,  # dropout: the kept values' scale, 1 / (1 - drop_threshold / 65536)
    HAS_DROPOUT: tl.constexpr,  # p > 0
    HAS_X_BIAS: tl.constexpr,  # add XB to x (in fp32) before the dropout: the bias of the dense before
    STORE_LOW: tl.constexpr,  # also write y in Y_LOW's dtype (the next matmul's input under autocast)
    BLOCK_M: tl.constexpr,  # rows per program (power of 2)
    BLOCK_N: tl.constexpr,  # power of 2 >= n
):
    first = tl.program_id(0).to(tl.int64) * BLOCK_M
    row = first + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = row < rows
    mask = row_mask[:, None] & (cols < n)[None, :]
    # An int64 base (rows * n may pass 2**31) plus int32 offsets within the tile: one 64-bit add per
    # pointer instead of 64-bit offsets per element.
    base = first * n
    offs = tl.arange(0, BLOCK_M)[:, None] * n + cols[None, :]
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        x += tl.load(XB + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        keep = keep_tile(tl.load(SEED), row, 0, n, drop_threshold, BLOCK_N)
        x = tl.where(keep, x * scale, 0.0)
    h = x + r
    d, mean, rstd = normalize_rows(h, mask, n, eps)
    w = tl.load(W + cols, mask=cols < n, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < n, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)
    if STORE_LOW:  # y.to(low) of the stored y (a no-op first cast when y is fp32, as in the model)
        tl.store(Y_LOW + base + offs, y.to(Y.dtype.element_ty).to(Y_LOW.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean, mask=row_mask)
    tl.store(RSTD + row, rstd, mask=row_mask)


@triton.jit
def _add_ln_bwd(
    X,  # pointer to x (rows, n), contiguous
    R,  # pointer to the residual (rows, n), contiguous
    W,  # pointer to the LayerNorm weight (n,)
    DY,  # pointer to the output gradient (rows, n), contiguous
    DY_LOW,  # pointer to the low-precision copy's gradient (rows, n) (read only when HAS_DY_LOW)
    DR,  # pointer to the residual gradient = gradient of the pre-norm sum (rows, n)
    DX,  # pointer to x's gradient (rows, n) (written only when STORE_DX)
    DW_PART,  # pointer to fp32 partial weight gradients (programs, n)
    DB_PART,  # pointer to fp32 partial bias gradients (programs, n)
    MEAN,  # pointer to the fp32 row means (rows,)
    RSTD,  # pointer to the fp32 row 1/std (rows,)
    SEED,  # pointer to the int64 dropout seed (read only when HAS_DROPOUT)
    XB,  # pointer to x's bias (n,) (read only when HAS_X_BIAS)
    DXB_PART,  # pointer to fp32 partial gradients of x's bias (programs, n) (written only when HAS_X_BIAS)
    rows,  # number of rows
    n,  # width
    rows_per_program,  # rows each program walks
    drop_threshold,  # dropout: drop when the element's 16 random bits < this (philox_dropout.py)
    scale,  # dropout: the kept values' scale, 1 / (1 - drop_threshold / 65536)
    HAS_DROPOUT: tl.constexpr,  # p > 0: regenerate the mask
    HAS_DY_LOW: tl.constexpr,  # the low-precision copy has a gradient too: add it to DY's
    STORE_DX: tl.constexpr,  # x's gradient differs from the residual's (dropout, or another dtype)
    HAS_X_BIAS: tl.constexpr,  # x had XB added: recompute x + XB, sum x's fp32 gradient over rows into DXB_PART
    BLOCK_M: tl.constexpr,  # rows per loop step (power of 2); rows_per_program is a multiple of it
    BLOCK_N: tl.constexpr,  # power of 2 >= n
    NUM_STAGES: tl.constexpr,  # > 1: software-pipeline the loop's loads (cp.async into shared memory)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # Per-tile-row accumulators, reduced over rows once after the loop: no cross-warp reduction in
    # the loop, and a fixed summation order (deterministic).
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_X_BIAS:
        xb = tl.load(XB + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        dxb = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    start = pid.to(tl.int64) * rows_per_program  # int64 rows: offsets may pass 2**31
    end = tl.minimum(start + rows_per_program, rows)
    # One tile of rows per step, and with NUM_STAGES > 1 the next tiles' loads in flight during this
    # one's math: the one-row loop waited on each row's loads, then its two reductions, in turn.
    # Registers cap a backward at ~6 rows of 768 per SM (~80 registers x 128 threads per row on sm_90);
    # pipelined stages sit in shared memory instead.
    for first in tl.range(start, end, BLOCK_M, num_stages=NUM_STAGES):
        row = first + tl.arange(0, BLOCK_M)
        row_mask = row < end
        mask = row_mask[:, None] & col_mask[None, :]
        # int64 offsets per element: here (unlike the forwards) ptxas spilled more with an int64
        # base plus int32 offsets (sm_90, BLOCK_M 4: 376 bytes of spills instead of 36; session 11's
        # compile without a launch's alignment hints, not re-measured)
        offs = row[:, None] * n + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_X_BIAS:
            x += xb
        if HAS_DROPOUT:
            keep = keep_tile(seed, row, 0, n, drop_threshold, BLOCK_N)
            x = tl.where(keep, x * scale, 0.0)
        mean = tl.load(MEAN + row, mask=row_mask, other=0.0)[:, None]
        rstd = tl.load(RSTD + row, mask=row_mask, other=0.0)[:, None]
        xhat = tl.where(mask, (x + r - mean) * rstd, 0.0)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DY_LOW:
            dy += tl.load(DY_LOW + offs, mask=mask, other=0.0).to(tl.float32)
        dw += dy * xhat
        db += dy
        dh = normalize_rows_grad(dy, xhat, w, rstd, n)
        tl.store(DR + offs, dh.to(DR.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            dh = tl.where(keep, dh * scale, 0.0)  # x's gradient from here on
        if STORE_DX:
            tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
        if HAS_X_BIAS:
            # x's gradient in fp32, before any rounding to DX's dtype. Rows past the end add 0 (their
            # rstd loads as 0); columns past n hold garbage that the final store masks off.
            dxb += dh
    tl.store(DW_PART + pid * n + cols, tl.sum(dw, axis=0), mask=col_mask)
    tl.store(DB_PART + pid * n + cols, tl.sum(db, axis=0), mask=col_mask)
    if HAS_X_BIAS:
        tl.store(DXB_PART + pid * n + cols, tl.sum(dxb, axis=0), mask=col_mask)


def _rows(x: torch.Tensor) -> Tuple[int, int]:
    n = x.shape[-1]
    return (x.numel() // n if n else 0), n


def _out_dtype(x, residual) -> torch.dtype:
    # As x + residual would be: under bf16 autocast the residual stream (fp32) stays fp32, as in
    # transformers, whose LayerNorm runs and returns in fp32 there.
    return torch.promote_types(x.dtype, residual.dtype)


def _add_ln_fwd_impl(x, residual, weight, bias, eps: float, dropout_p: float, seed: Optional[torch.Tensor],
                     low_dtype: Optional[torch.dtype] = None, x_bias: Optional[torch.Tensor] = None):
    """(y, mean, rstd, y_low): y_low is y in low_dtype from the same kernel, or None without low_dtype.
    x_bias (n,) or None: added to x (in fp32) before the dropout."""
    _check_dtypes(x=x, residual=residual, weight=weight, bias=bias, x_bias=x_bias)
    rows, n = _rows(x)
    check_width(n)
    x, residual, weight, bias = x.contiguous(), residual.contiguous(), weight.contiguous(), bias.contiguous()
    x_bias = None if x_bias is None else x_bias.contiguous()
    y = torch.empty(x.shape, dtype=_out_dtype(x, residual), device=x.device)
    y_low = None if low_dtype is None else torch.empty(x.shape, dtype=low_dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if rows == 0 or n == 0:
        return y, mean, rstd, y_low
    has_dropout = dropout_p > 0.0
    config = ln_config(n, "add_fwd")
    _add_ln_fwd[(cdiv(rows, config.block_m),)](
        x, residual, weight, bias, y, y if y_low is None else y_low, mean, rstd, seed if has_dropout else mean,
        weight if x_bias is None else x_bias, rows, n, eps, *dropout_args(dropout_p),
        HAS_DROPOUT=has_dropout, HAS_X_BIAS=x_bias is not None, STORE_LOW=y_low is not None,
        BLOCK_M=config.block_m, BLOCK_N=row_block(n), num_warps=config.num_warps)
    return y, mean, rstd, y_low


def _add_ln_bwd_impl(dy, x, residual, weight, mean, rstd, dropout_p: float, seed: Optional[torch.Tensor],
                     x_bias: Optional[torch.Tensor] = None, dy_low: Optional[torch.Tensor] = None,
                     one_reduction: bool = False):
    """(d residual, d x or an empty tensor when it equals d residual, d weight, d bias, d x_bias or an
    empty tensor without x_bias). dy_low: the gradient of the low-precision copy, added to dy's in the
    kernel (None: none). one_reduction: reduce the programs' partial sums in one launch, the parameter
    gradients then being rows of one tensor (the eager autograd path; a custom op's outputs may not
    alias, so the op path runs one reduction per gradient)."""
    rows, n = _rows(x)
    x, residual, weight, dy = x.contiguous(), residual.contiguous(), weight.contiguous(), dy.contiguous()
    x_bias = None if x_bias is None else x_bias.contiguous()
    has_x_bias = x_bias is not None
    dy_low = None if dy_low is None else dy_low.contiguous()
    has_dropout = dropout_p > 0.0
    store_dx = has_dropout or x.dtype != residual.dtype
    dres = torch.empty_like(residual)
    dx = torch.empty_like(x) if store_dx else x.new_empty((0,))
    if rows == 0 or n == 0:
        dres.zero_()
        dx.zero_()
        zeros = torch.zeros_like(weight)
        return (dres, dx, zeros, torch.zeros_like(weight, dtype=torch.float32),
                _no_x_bias_grad(x) if x_bias is None else torch.zeros_like(x_bias))
    config = ln_config(n, "add_bwd")
    programs, rows_per_program = backward_split(rows, config, x.device)
    part = torch.empty((3 if has_x_bias else 2, programs, n), dtype=torch.float32, device=x.device)
    _add_ln_bwd[(programs,)](x, residual, weight, dy, dy if dy_low is None else dy_low, dres, dx if store_dx else dres,
                             part[0], part[1], mean, rstd, seed if has_dropout else mean,
                             x_bias if has_x_bias else weight, part[2] if has_x_bias else part[1], rows, n,
                             rows_per_program, *dropout_args(dropout_p), HAS_DROPOUT=has_dropout,
                             HAS_DY_LOW=dy_low is not None, STORE_DX=store_dx, HAS_X_BIAS=has_x_bias,
                             BLOCK_M=config.block_m, BLOCK_N=row_block(n), NUM_STAGES=config.num_stages,
                             num_warps=config.num_warps)
    sums = part.sum(1) if one_reduction else [p.sum(0) for p in part]  # (2 or 3, n)
    dxb = sums[2].to(x_bias.dtype) if has_x_bias else _no_x_bias_grad(x)
    # d bias in fp32: the autograd wrapper casts it to the bias's own dtype (not rounded via weight's)
    return dres, dx, sums[0].to(weight.dtype), sums[1], dxb


def _no_x_bias_grad(x):
    """The x-bias gradient slot of the backward op without an x bias (a custom op returns tensors only)."""
    return x.new_empty((0,), dtype=torch.float32)


def _add_ln_op_impl(x, residual, weight, bias, eps: float, dropout_p: float, seed: Optional[torch.Tensor],
                    x_bias: Optional[torch.Tensor] = None):
    # (y, mean, rstd): no copy
    return _add_ln_fwd_impl(x, residual, weight, bias, eps, dropout_p, seed, x_bias=x_bias)[:3]


@torch.library.custom_op("fastbert::add_layer_norm", mutates_args=(), device_types="cuda")
def _add_ln_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               dropout_p: float, seed: Optional[torch.Tensor], x_bias: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_ln_op_impl(x, residual, weight, bias, eps, dropout_p, seed, x_bias)


def _add_ln_bwd_op_impl(dy, x, residual, weight, mean, rstd, dropout_p: float, seed: Optional[torch.Tensor],
                        x_bias: Optional[torch.Tensor] = None):
    return _add_ln_bwd_impl(dy, x, residual, weight, mean, rstd, dropout_p, seed, x_bias)


@torch.library.custom_op("fastbert::add_layer_norm_backward", mutates_args=(), device_types="cuda")
def _add_ln_backward_op(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, dropout_p: float, seed: Optional[torch.Tensor],
                        x_bias: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d residual, d x or an empty tensor when it equals d residual, d weight, d bias, d x_bias or an
    empty fp32 tensor without x_bias)."""
    return _add_ln_bwd_op_impl(dy, x, residual, weight, mean, rstd, dropout_p, seed, x_bias)


# CPU tensors reach these only under FASTBERT_KERNELS=triton with TRITON_INTERPRET=1 (tests).
_add_ln_op.register_kernel("cpu")(_add_ln_op_impl)
_add_ln_backward_op.register_kernel("cpu")(_add_ln_bwd_op_impl)


@_add_ln_op.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed, x_bias=None):
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=_out_dtype(x, residual)), mean, torch.empty_like(mean)


@_add_ln_backward_op.register_fake
def _(dy, x, residual, weight, mean, rstd, dropout_p, seed, x_bias=None):
    store_dx = dropout_p > 0.0 or x.dtype != residual.dtype
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if store_dx else x.new_empty((0,))
    dxb = _no_x_bias_grad(x) if x_bias is None else torch.empty_like(x_bias, memory_format=torch.contiguous_format)
    return (torch.empty_like(residual, memory_format=torch.contiguous_format), dx, torch.empty_like(weight),
            torch.empty_like(weight, dtype=torch.float32), dxb)


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed, x_bias = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd, seed, x_bias)
    ctx.dropout_p = dropout_p
    ctx.bias_dtype = bias.dtype


def _add_ln_backward(ctx, dy, _dmean, _drstd, backward=_add_ln_backward_op):
    x, residual, weight, mean, rstd, seed, x_bias = ctx.saved_tensors
    dres, dx, dw, db, dxb = backward(dy, x, residual, weight, mean, rstd, ctx.dropout_p, seed, x_bias)
    if dx.numel() == 0 and x.numel() != 0:
        dx = dres  # no dropout and one dtype: the two gradients are the same tensor of values
    elif x.numel() == 0:
        dx = torch.zeros_like(x)
    return dx, dres, dw, db.to(ctx.bias_dtype), None, None, None, None if x_bias is None else dxb


_add_ln_op.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


class _AddLayerNorm(torch.autograd.Function):
    """Eager twin of fastbert::add_layer_norm(_backward): the same launchers without the custom-op
    dispatch, whose Python overhead (tens of microseconds per call, forward and backward) is as long
    as the kernels themselves at BERT sizes. torch.compile traces the custom ops instead.
    With low_dtype it returns (y, y_low) and its backward takes both gradients (see the module doc)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, dropout_p, seed, x_bias, low_dtype):
        y, mean, rstd, y_low = _add_ln_fwd_impl(x, residual, weight, bias, eps, dropout_p, seed, low_dtype, x_bias)
        _add_ln_setup(ctx, (x, residual, weight, bias, eps, dropout_p, seed, x_bias), (y, mean, rstd))
        if y_low is None:
            return y
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a tensor of zeros
        return y, y_low

    @staticmethod
    def backward(ctx, dy, dy_low=None):
        if dy is None:  # only the copy was used
            dy, dy_low = dy_low, None
        if dy is None:
            return (None,) * 9

        def backward(*args):
            return _add_ln_bwd_impl(*args, dy_low=dy_low, one_reduction=True)

        return (*_add_ln_backward(ctx, dy, None, None, backward=backward), None)


def add_layer_norm(x, residual, weight, bias, eps: float = 1e-12, dropout_p: float = 0.0,
                   low_dtype: Optional[torch.dtype] = None, x_bias: Optional[torch.Tensor] = None):
    """layer_norm(dropout(x + x_bias) + residual) with the Triton kernels (x_bias None: no bias);
    inputs validated by fastbert.kernels. With low_dtype: (y, y.to(low_dtype)), both written by the
    forward kernel."""
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    if torch.compiler.is_compiling():  # the custom op has one output; Inductor fuses the cast itself
        y = _add_ln_op(x, residual, weight, bias, float(eps), float(dropout_p), seed, x_bias)[0]
        return y if low_dtype is None else (y, y.to(low_dtype))
    return _AddLayerNorm.apply(x, residual, weight, bias, float(eps), float(dropout_p), seed, x_bias, low_dtype)


# --------------------------------------------------------------------------- GELU + LayerNorm kernels

@triton.jit
def _gelu_ln_fwd(
    X,  # pointer to x (rows, n), contiguous: the dense layer's output before its bias
    BIAS,  # pointer to the dense bias (n,), added before GELU
    W,  # pointer to the LayerNorm weight (n,)
    B,  # pointer to the LayerNorm bias (n,)
    Y,  # pointer to the output (rows, n), x's dtype
    MEAN,  # pointer to the fp32 row means (rows,)
    RSTD,  # pointer to the fp32 row 1/std (rows,)
    rows,  # number of rows
    n,  # width
    eps,  # LayerNorm epsilon
    APPROX_TANH: tl.constexpr,  # True: tanh GELU, False: erf GELU
    BLOCK_M: tl.constexpr,  # rows per program (power of 2)
    BLOCK_N: tl.constexpr,  # power of 2 >= n
):
    first = tl.program_id(0).to(tl.int64) * BLOCK_M
    row = first + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n
    row_mask = row < rows
    mask = row_mask[:, None] & col_mask[None, :]
    base = first * n  # int64 base, int32 offsets within the tile (see _add_ln_fwd)
    offs = tl.arange(0, BLOCK_M)[:, None] * n + cols[None, :]
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    h = tl.where(mask, gelu(x + c, APPROX_TANH), 0.0)
    d, mean, rstd = normalize_rows(h, mask, n, eps)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + base + offs, (d * rstd[:, None] * w + b).to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean, mask=row_mask)
    tl.store(RSTD + row, rstd, mask=row_mask)


@triton.jit
def _gelu_ln_bwd(
    X,  # pointer to x (rows, n), contiguous
    BIAS,  # pointer to the dense bias (n,)
    W,  # pointer to the LayerNorm weight (n,)
    DY,  # pointer to the output gradient (rows, n), contiguous
    DX,  # pointer to x's gradient (rows, n)
    PART,  # pointer to fp32 partial gradients (3, programs, n): dense bias, LN weight, LN bias
    MEAN,  # pointer to the fp32 row means (rows,)
    RSTD,  # pointer to the fp32 row 1/std (rows,)
    rows,  # number of rows
    n,  # width
    rows_per_program,  # rows each program walks
    part_stride,  # programs * n: distance between the three partial buffers
    APPROX_TANH: tl.constexpr,  # True: tanh GELU, False: erf GELU
    BLOCK_M: tl.constexpr,  # rows per loop step (power of 2); rows_per_program is a multiple of it
    BLOCK_N: tl.constexpr,  # power of 2 >= n
    NUM_STAGES: tl.constexpr,  # > 1: software-pipeline the loop's loads (cp.async into shared memory)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n
    c = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # as in _add_ln_bwd: per-tile-row fp32 accumulators, reduced over rows once at the end
    dc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # int64 rows: offsets may pass 2**31
    end = tl.minimum(start + rows_per_program, rows)
    for first in tl.range(start, end, BLOCK_M, num_stages=NUM_STAGES):  # as in _add_ln_bwd
        row = first + tl.arange(0, BLOCK_M)
        row_mask = row < end
        mask = row_mask[:, None] & col_mask[None, :]
        offs = row[:, None] * n + cols[None, :]  # int64 (see _add_ln_bwd)
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + c
        mean = tl.load(MEAN + row, mask=row_mask, other=0.0)[:, None]
        rstd = tl.load(RSTD + row, mask=row_mask, other=0.0)[:, None]
        xhat = tl.where(mask, (gelu(z, APPROX_TANH) - mean) * rstd, 0.0)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dw += dy * xhat
        db += dy
        dz = normalize_rows_grad(dy, xhat, w, rstd, n) * gelu_grad(z, APPROX_TANH)
        dz = tl.where(mask, dz, 0.0)
        dc += dz
        tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=mask)
    tl.store(PART + pid * n + cols, tl.sum(dc, axis=0), mask=col_mask)
    tl.store(PART + part_stride + pid * n + cols, tl.sum(dw, axis=0), mask=col_mask)
    tl.store(PART + 2 * part_stride + pid * n + cols, tl.sum(db, axis=0), mask=col_mask)


def _gelu_ln_fwd_impl(x, bias, weight, ln_bias, eps: float, approximate: str):
    _check_dtypes(x=x, bias=bias, weight=weight, ln_bias=ln_bias)
    rows, n = _rows(x)
    check_width(n)
    x, bias, weight, ln_bias = x.contiguous(), bias.contiguous(), weight.contiguous(), ln_bias.contiguous()
    y = torch.empty_like(x)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if rows == 0 or n == 0:
        return y, mean, rstd
    config = ln_config(n, "gelu_fwd")
    _gelu_ln_fwd[(cdiv(rows, config.block_m),)](
        x, bias, weight, ln_bias, y, mean, rstd, rows, n, eps, APPROX_TANH=approximate == "tanh",
        BLOCK_M=config.block_m, BLOCK_N=row_block(n), num_warps=config.num_warps)
    return y, mean, rstd


def _gelu_ln_bwd_impl(dy, x, bias, weight, mean, rstd, approximate: str, one_reduction: bool = False):
    rows, n = _rows(x)
    x, bias, weight, dy = x.contiguous(), bias.contiguous(), weight.contiguous(), dy.contiguous()
    dx = torch.empty_like(x)
    if rows == 0 or n == 0:
        dx.zero_()
        return dx, torch.zeros_like(bias), torch.zeros_like(weight), torch.zeros_like(weight, dtype=torch.float32)
    config = ln_config(n, "gelu_bwd")
    programs, rows_per_program = backward_split(rows, config, x.device)
    part = torch.empty((3, programs, n), dtype=torch.float32, device=x.device)
    _gelu_ln_bwd[(programs,)](x, bias, weight, dy, dx, part, mean, rstd, rows, n, rows_per_program, programs * n,
                              APPROX_TANH=approximate == "tanh", BLOCK_M=config.block_m, BLOCK_N=row_block(n),
                              NUM_STAGES=config.num_stages, num_warps=config.num_warps)
    sums = part.sum(1) if one_reduction else [p.sum(0) for p in part]  # (3, n): see _add_ln_bwd_impl
    # d ln_bias in fp32: the autograd wrapper casts it to ln_bias's own dtype (not rounded via weight's)
    return dx, sums[0].to(bias.dtype), sums[1].to(weight.dtype), sums[2]


@torch.library.custom_op("fastbert::gelu_layer_norm", mutates_args=(), device_types="cuda")
def _gelu_ln_op(x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                approximate: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gelu_ln_fwd_impl(x, bias, weight, ln_bias, eps, approximate)


@torch.library.custom_op("fastbert::gelu_layer_norm_backward", mutates_args=(), device_types="cuda")
def _gelu_ln_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                         mean: torch.Tensor, rstd: torch.Tensor, approximate: str
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x, d dense bias, d LN weight, d LN bias)."""
    return _gelu_ln_bwd_impl(dy, x, bias, weight, mean, rstd, approximate)


_gelu_ln_op.register_kernel("cpu")(_gelu_ln_fwd_impl)
_gelu_ln_backward_op.register_kernel("cpu")(_gelu_ln_bwd_impl)


@_gelu_ln_op.register_fake
def _(x, bias, weight, ln_bias, eps, approximate):
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), mean, torch.empty_like(mean)


@_gelu_ln_backward_op.register_fake
def _(dy, x, bias, weight, mean, rstd, approximate):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(bias),
            torch.empty_like(weight), torch.empty_like(weight, dtype=torch.float32))


def _gelu_ln_setup(ctx, inputs, output):
    x, bias, weight, ln_bias, eps, approximate = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, bias, weight, mean, rstd)
    ctx.approximate = approximate
    ctx.ln_bias_dtype = ln_bias.dtype


def _gelu_ln_backward(ctx, dy, _dmean, _drstd, backward=_gelu_ln_backward_op):
    x, bias, weight, mean, rstd = ctx.saved_tensors
    dx, dbias, dw, db = backward(dy, x, bias, weight, mean, rstd, ctx.approximate)
    return dx, dbias, dw, db.to(ctx.ln_bias_dtype), None, None


_gelu_ln_op.register_autograd(_gelu_ln_backward, setup_context=_gelu_ln_setup)


class _GeluLayerNorm(torch.autograd.Function):
    """Eager twin of fastbert::gelu_layer_norm(_backward) (see _AddLayerNorm)."""

    @staticmethod
    def forward(ctx, x, bias, weight, ln_bias, eps, approximate):
        y, mean, rstd = _gelu_ln_fwd_impl(x, bias, weight, ln_bias, eps, approximate)
        _gelu_ln_setup(ctx, (x, bias, weight, ln_bias, eps, approximate), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        return _gelu_ln_backward(ctx, dy, None, None,
                                 backward=functools.partial(_gelu_ln_bwd_impl, one_reduction=True))


def gelu_layer_norm(x, bias, weight, ln_bias, eps: float = 1e-12, approximate: str = "none") -> torch.Tensor:
    """layer_norm(gelu(x + bias)) with the Triton kernels; inputs validated by fastbert.kernels."""
    if torch.compiler.is_compiling():
        return _gelu_ln_op(x, bias, weight, ln_bias, float(eps), approximate)[0]
    return _GeluLayerNorm.apply(x, bias, weight, ln_bias, float(eps), approximate)
