"""Fused LayerNorm with its BERT prologues, forward and backward, in Triton.

- add_layer_norm:  y = layer_norm(dropout(x) + residual)   (the end of every attention / FFN block)
- gelu_layer_norm: y = layer_norm(gelu(x + bias))          (the MLM head transform after its dense)

Every kernel works on tiles of BLOCK_M whole rows x BLOCK_N (= next_power_of_2(n), masked) columns,
statistics and math in fp32, so a row is read once and written once.

Forward: a program per BLOCK_M rows (BLOCK_M = 1 at BERT widths, several rows for narrow ones, so a
program still moves a few KB). It saves only the per-row mean and rstd (fp32); the backward
re-reads the inputs and recomputes the prologue (dropout mask included) instead of storing the
pre-norm sum: the same bytes moved in total, and no extra activation memory.

Backward: a persistent-style grid of a few programs per SM; each owns a contiguous range of rows,
walks it BLOCK_M rows at a time (the saved mean / rstd reused, BLOCK_M rows of loads in flight per
step), writes dx row by row and keeps its share of dweight / dbias (and GELU's bias gradient) in
fp32 registers, written once to a (programs, n) fp32 buffer that torch sums afterwards: no atomics,
deterministic, and no bf16 rounding of partial sums.

Dropout: the keep mask of element (row, col) is output col % 4 of Philox4x32-10(seed, counter
row * ceil(n / 4) + col // 4) (tl.randint4x), kept when that 32-bit draw (as int32) is >= a
threshold that drops a fraction p, kept values scaled by 1 / (1 - p). One Philox call serves four
elements: a call costs ~20 wide integer multiplies, and one call per element (tl.rand) took as long
as the memory traffic of the whole LayerNorm at BERT widths. The seed is a one-element int64
tensor drawn with torch.randint on the input's device (torch.manual_seed makes it repeatable and
nothing syncs with the host, CUDA graphs included); the backward regenerates the mask from it
rather than saving it (a saved mask costs a write and a read of rows x n bytes).

Supports: fp32, fp16, bf16 activations (add_layer_norm's output in promote_types(x, residual), as
x + residual, gradients in each input's own dtype; gelu_layer_norm's in x's dtype); weights of any
of these dtypes; widths 1..MAX_WIDTH (8192); any leading shape; non-contiguous inputs (copied).
Not supported: widths above MAX_WIDTH (a clear ValueError; the row would no longer fit in
registers); float64 on the GPU path (use the reference).
Caution: Philox counters are 32-bit, so the mask pattern repeats after 2**34 elements in one call;
p is applied in steps of 2**-32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .gelu import gelu, gelu_grad

__all__ = ["add_layer_norm", "gelu_layer_norm", "dropout_mask", "draw_seed", "MAX_WIDTH", "fwd_config",
           "bwd_config"]

MAX_WIDTH = 8192
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FWD_TILE = 1024  # elements per forward program at least: rows of n < 1024 are grouped
BWD_TILE = 1024  # elements per backward step: one row of 1024 (BERT widths), several narrower rows
BWD_STAGES = 3  # backward row tiles in flight per program at BERT widths: two prefetched (cp.async)
# into shared memory while one computes; fewer for wide rows (shared memory: 8192 fp32 columns x 3
# tensors x 2 buffers would pass sm_80's 163 KB)
BWD_FALLBACK_PROGRAMS_PER_SM = 4  # when the occupancy query is unavailable (and in the interpreter)

# ------------------------------------------------------------------------------------ shared helpers

@triton.jit
def normalize(h, mask, n, eps):
    """LayerNorm statistics of an fp32 tile h (rows, BLOCK_N), masked lanes ignored:
    (h - mean, masked to 0), mean (rows,), 1/std (rows,)."""
    mean = tl.sum(h, axis=1) / n
    d = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / n + eps)
    return d, mean, rstd


@triton.jit
def dropout_keep(seed, rows, n, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep mask (BLOCK_M, BLOCK_N) of rows `rows` (int64, (BLOCK_M,)), columns 0..BLOCK_N-1, of a
    (*, n) tensor: output col % 4 of Philox(seed, row * ceil(n / 4) + col // 4), kept when >= threshold."""
    quads = tl.arange(0, BLOCK_N // 4)
    counter = (rows[:, None] * ((n + 3) // 4) + quads[None, :]).to(tl.uint32)  # wraps mod 2**32
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # join(join(r0, r2), join(r1, r3))[i, q, a, b] = r(2a + b)[i, q]: flattened, column 4q + m gets r(m).
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return bits.to(tl.int32, bitcast=True) >= threshold


@triton.jit
def _dropout_mask_kernel(
    SEED,  # pointer to the int64 seed (one element)
    MASK,  # pointer to the (rows, n) int8 keep mask to write
    rows,  # number of rows
    n,  # width
    threshold,  # int32 keep threshold (dropout_threshold(p))
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of 2 >= n, >= 16
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    keep = dropout_keep(tl.load(SEED), row, n, threshold, BLOCK_M, BLOCK_N)
    mask = (row < rows)[:, None] & (cols < n)[None, :]
    tl.store(MASK + row[:, None] * n + cols[None, :], keep.to(tl.int8), mask=mask)


def draw_seed(device) -> torch.Tensor:
    """The dropout seed: from PyTorch's generator of `device`, no host sync."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def dropout_threshold(p: float) -> int:
    """int32 threshold t with P(int32 draw >= t) = 1 - p (to 2**-32): floor(p * 2**32) - 2**31."""
    return min(int(p * 2.0**32), 2**32 - 1) - 2**31


def dropout_mask(seed: torch.Tensor, rows: int, n: int, p: float) -> torch.Tensor:
    """The (rows, n) bool keep mask the kernels use for `seed` (for tests and debugging)."""
    check_width(n)
    mask = torch.empty((rows, n), dtype=torch.int8, device=seed.device)
    if rows and n:
        block_m, block_n, num_warps = fwd_config(n)
        _dropout_mask_kernel[(triton.cdiv(rows, block_m),)](seed, mask, rows, n, dropout_threshold(p),
                                                           BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return mask.bool()


def check_width(n: int):
    if n > MAX_WIDTH:
        raise ValueError(f"fastbert LayerNorm kernels support widths up to {MAX_WIDTH}, got {n}; "
                         "use FASTBERT_KERNELS=reference for wider rows")


def row_block(n: int) -> int:
    # >= 16: dropout draws four columns per Philox call, and tiny aranges are awkward to lay out
    return max(16, triton.next_power_of_2(n))


def tile_warps(elements: int) -> int:
    # 8 fp32 values per thread and tensor up to 8 warps (4 at BERT-base/large widths: 1024 columns),
    # 16 warps only for 8192-wide tiles, whose row reductions then stay at 16 values per thread.
    return min(max(elements // 256, 1), 8 if elements <= 4096 else 16)


def fwd_config(n: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward kernels for width n."""
    block_n = row_block(n)
    block_m = max(1, FWD_TILE // block_n)
    return block_m, block_n, tile_warps(block_m * block_n)


def bwd_config(n: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, NUM_STAGES) of the backward kernels for width n."""
    block_n = row_block(n)
    block_m = max(1, BWD_TILE // block_n)
    tile = block_m * block_n
    stages = BWD_STAGES if tile <= 1024 else min(BWD_STAGES, 2) if tile <= 4096 else 1
    return block_m, block_n, tile_warps(tile), stages


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: few programs, yet more than one, so the partial-sum path is exercised


_RESIDENT = {}  # (kernel, device, launch key) -> programs per SM that fit at once


def resident_programs(kernel, key, device: torch.device, args, constexprs: dict, num_warps: int) -> int:
    """Programs of `kernel` (compiled for these args) that one SM holds at once, from its registers
    and shared memory: the backward grid is exactly one resident wave, so no program waits for a
    second wave and the partial-sum buffers stay small. Cached per launch key."""
    if device.type != "cuda":
        return BWD_FALLBACK_PROGRAMS_PER_SM
    cache_key = (kernel.__name__ if hasattr(kernel, "__name__") else id(kernel), device.index, key)
    hit = _RESIDENT.get(cache_key)
    if hit is not None:
        return hit
    try:
        compiled = kernel.warmup(*args, grid=(1,), num_warps=num_warps, **constexprs)
        compiled._init_handles()
        props = torch.cuda.get_device_properties(device)
        regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
        smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 232448)
        threads_per_sm = getattr(props, "max_threads_per_multi_processor", 2048)
        warp_regs = -(-max(compiled.n_regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
        by_regs = regs_per_sm // (warp_regs * num_warps)
        by_smem = smem_per_sm // (compiled.metadata.shared + 1024)  # + 1 KB reserved per block (sm_80+)
        by_threads = threads_per_sm // (32 * num_warps)
        resident = max(1, min(by_regs, by_smem, by_threads, 32))
    except Exception:  # an older / newer Triton without this API: a fixed guess, still correct
        resident = BWD_FALLBACK_PROGRAMS_PER_SM
    _RESIDENT[cache_key] = resident
    return resident


def bwd_grid(rows: int, block_m: int, device: torch.device, per_sm: int) -> Tuple[int, int]:
    """(programs, rows_per_program) of a backward: at most per_sm programs per SM, rows_per_program
    a multiple of block_m, every program non-empty (so every partial row is written)."""
    programs = max(1, min(triton.cdiv(rows, block_m), per_sm * sm_count(device)))
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), block_m) * block_m
    return triton.cdiv(rows, rows_per_program), rows_per_program


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
    MEAN,  # pointer to the fp32 row means (rows,), saved for the backward
    RSTD,  # pointer to the fp32 row 1/std (rows,), saved for the backward
    SEED,  # pointer to the int64 dropout seed (read only when HAS_DROPOUT)
    rows,  # number of rows
    n,  # width
    eps,  # LayerNorm epsilon
    threshold,  # int32 dropout keep threshold (dropout_threshold(p))
    scale,  # 1 / (1 - p)
    HAS_DROPOUT: tl.constexpr,  # p > 0
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of 2 >= n, >= 16
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * n may pass 2**31
    cols = tl.arange(0, BLOCK_N)
    row_mask = row < rows
    mask = row_mask[:, None] & (cols < n)[None, :]
    offs = row[:, None] * n + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(SEED), row, n, threshold, BLOCK_M, BLOCK_N)
        x = tl.where(keep, x * scale, 0.0)
    d, mean, rstd = normalize(x + r, mask, n, eps)
    w = tl.load(W + cols, mask=cols < n, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < n, other=0.0).to(tl.float32)
    tl.store(Y + offs, (d * rstd[:, None] * w[None, :] + b[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean, mask=row_mask)
    tl.store(RSTD + row, rstd, mask=row_mask)


@triton.jit
def _add_ln_bwd(
    X,  # pointer to x (rows, n), contiguous
    R,  # pointer to the residual (rows, n), contiguous
    W,  # pointer to the LayerNorm weight (n,)
    DY,  # pointer to the output gradient (rows, n), contiguous
    DR,  # pointer to the residual gradient = gradient of the pre-norm sum (rows, n)
    DX,  # pointer to x's gradient (rows, n) (written only when STORE_DX)
    DW_PART,  # pointer to fp32 partial weight gradients (programs, n)
    DB_PART,  # pointer to fp32 partial bias gradients (programs, n)
    MEAN,  # pointer to the fp32 row means (rows,)
    RSTD,  # pointer to the fp32 row 1/std (rows,)
    SEED,  # pointer to the int64 dropout seed (read only when HAS_DROPOUT)
    rows,  # number of rows
    n,  # width
    rows_per_program,  # rows each program walks (a multiple of BLOCK_M)
    threshold,  # int32 dropout keep threshold
    scale,  # 1 / (1 - p)
    HAS_DROPOUT: tl.constexpr,  # p > 0: regenerate the mask
    STORE_DX: tl.constexpr,  # x's gradient differs from the residual's (dropout, or another dtype)
    BLOCK_M: tl.constexpr,  # rows per step
    BLOCK_N: tl.constexpr,  # power of 2 >= n, >= 16
    NUM_STAGES: tl.constexpr,  # row tiles in flight (> 1: the next tiles' loads are issued, through
    # shared memory, while this one is computed)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    start = pid.to(tl.int64) * rows_per_program  # int64 rows: offsets may pass 2**31
    end = tl.minimum(start + rows_per_program, rows)
    for row0 in tl.range(start, end, BLOCK_M, num_stages=NUM_STAGES):
        row = row0 + tl.arange(0, BLOCK_M)
        row_mask = row < end
        mask = row_mask[:, None] & col_mask[None, :]
        offs = row[:, None] * n + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + row, mask=row_mask, other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, row, n, threshold, BLOCK_M, BLOCK_N)
            x = tl.where(keep, x * scale, 0.0)
        xhat = tl.where(mask, (x + r - mean[:, None]) * rstd[:, None], 0.0)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        g = dy * w[None, :]
        c1 = tl.sum(xhat * g, axis=1) / n
        c2 = tl.sum(g, axis=1) / n
        dh = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DR + offs, dh.to(DR.dtype.element_ty), mask=mask)
        if STORE_DX:
            if HAS_DROPOUT:
                dh = tl.where(keep, dh * scale, 0.0)
            tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * n + cols, dw, mask=col_mask)
    tl.store(DB_PART + pid * n + cols, db, mask=col_mask)


def _rows(x: torch.Tensor) -> Tuple[int, int]:
    n = x.shape[-1]
    return (x.numel() // n if n else 0), n


def _out_dtype(x, residual) -> torch.dtype:
    # As x + residual would be: under bf16 autocast the residual stream (fp32) stays fp32, as in
    # transformers, whose LayerNorm runs and returns in fp32 there.
    return torch.promote_types(x.dtype, residual.dtype)


def _add_ln_fwd_impl(x, residual, weight, bias, eps: float, dropout_p: float, seed: Optional[torch.Tensor]):
    _check_dtypes(x=x, residual=residual, weight=weight, bias=bias)
    rows, n = _rows(x)
    check_width(n)
    x, residual, weight, bias = x.contiguous(), residual.contiguous(), weight.contiguous(), bias.contiguous()
    y = torch.empty(x.shape, dtype=_out_dtype(x, residual), device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if rows == 0 or n == 0:
        return y, mean, rstd
    has_dropout = dropout_p > 0.0
    block_m, block_n, num_warps = fwd_config(n)
    _add_ln_fwd[(triton.cdiv(rows, block_m),)](
        x, residual, weight, bias, y, mean, rstd, seed if has_dropout else mean, rows, n, eps,
        dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), HAS_DROPOUT=has_dropout, BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=num_warps)
    return y, mean, rstd


def _add_ln_bwd_impl(dy, x, residual, weight, mean, rstd, dropout_p: float, seed: Optional[torch.Tensor]):
    rows, n = _rows(x)
    x, residual, weight, dy = x.contiguous(), residual.contiguous(), weight.contiguous(), dy.contiguous()
    has_dropout = dropout_p > 0.0
    store_dx = has_dropout or x.dtype != residual.dtype
    dres = torch.empty_like(residual)
    dx = torch.empty_like(x) if store_dx else x.new_empty((0,))
    if rows == 0 or n == 0:
        dres.zero_()
        dx.zero_()
        zeros = torch.zeros_like(weight)
        return dres, dx, zeros, zeros.clone()
    block_m, block_n, num_warps, stages = bwd_config(n)
    consts = dict(HAS_DROPOUT=has_dropout, STORE_DX=store_dx, BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=stages)

    def args(dw_part, db_part, rows_per_program):
        return (x, residual, weight, dy, dres, dx if store_dx else dres, dw_part, db_part, mean, rstd,
                seed if has_dropout else mean, rows, n, rows_per_program, dropout_threshold(dropout_p),
                1.0 / (1.0 - dropout_p))

    key = (x.dtype, residual.dtype, weight.dtype, dy.dtype, n % 16 == 0, tuple(consts.items()))
    per_sm = resident_programs(_add_ln_bwd, key, x.device, args(mean, mean, 16), consts, num_warps)
    programs, rows_per_program = bwd_grid(rows, block_m, x.device, per_sm)
    part = torch.empty((2, programs, n), dtype=torch.float32, device=x.device)
    _add_ln_bwd[(programs,)](*args(part[0], part[1], rows_per_program), num_warps=num_warps, **consts)
    # Separate reductions: views of one tensor would alias, which custom ops forbid.
    return dres, dx, part[0].sum(0).to(weight.dtype), part[1].sum(0).to(weight.dtype)


@torch.library.custom_op("fastbert::add_layer_norm", mutates_args=(), device_types="cuda")
def _add_ln_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               dropout_p: float, seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _add_ln_fwd_impl(x, residual, weight, bias, eps, dropout_p, seed)


@torch.library.custom_op("fastbert::add_layer_norm_backward", mutates_args=(), device_types="cuda")
def _add_ln_backward_op(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, dropout_p: float, seed: Optional[torch.Tensor]
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d residual, d x or an empty tensor when it equals d residual, d weight, d bias)."""
    return _add_ln_bwd_impl(dy, x, residual, weight, mean, rstd, dropout_p, seed)


# CPU tensors reach these only under FASTBERT_KERNELS=triton with TRITON_INTERPRET=1 (tests).
_add_ln_op.register_kernel("cpu")(_add_ln_fwd_impl)
_add_ln_backward_op.register_kernel("cpu")(_add_ln_bwd_impl)


@_add_ln_op.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed):
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=_out_dtype(x, residual)), mean, torch.empty_like(mean)


@_add_ln_backward_op.register_fake
def _(dy, x, residual, weight, mean, rstd, dropout_p, seed):
    store_dx = dropout_p > 0.0 or x.dtype != residual.dtype
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if store_dx else x.new_empty((0,))
    return (torch.empty_like(residual, memory_format=torch.contiguous_format), dx, torch.empty_like(weight),
            torch.empty_like(weight))


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.bias_dtype = bias.dtype


def _add_ln_backward(ctx, dy, _dmean, _drstd, backward=_add_ln_backward_op):
    x, residual, weight, mean, rstd, seed = ctx.saved_tensors
    dres, dx, dw, db = backward(dy, x, residual, weight, mean, rstd, ctx.dropout_p, seed)
    if dx.numel() == 0 and x.numel() != 0:
        dx = dres  # no dropout and one dtype: the two gradients are the same tensor of values
    elif x.numel() == 0:
        dx = torch.zeros_like(x)
    return dx, dres, dw, db.to(ctx.bias_dtype), None, None, None


_add_ln_op.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


class _AddLayerNorm(torch.autograd.Function):
    """Eager twin of fastbert::add_layer_norm(_backward): the same launchers without the custom-op
    dispatch, whose Python overhead (tens of microseconds per call, forward and backward) is as long
    as the kernels themselves at BERT sizes. torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, dropout_p, seed):
        y, mean, rstd = _add_ln_fwd_impl(x, residual, weight, bias, eps, dropout_p, seed)
        _add_ln_setup(ctx, (x, residual, weight, bias, eps, dropout_p, seed), (y, mean, rstd))
        return y

    @staticmethod
    def backward(ctx, dy):
        return _add_ln_backward(ctx, dy, None, None, backward=_add_ln_bwd_impl)


def add_layer_norm(x, residual, weight, bias, eps: float = 1e-12, dropout_p: float = 0.0) -> torch.Tensor:
    """layer_norm(dropout(x) + residual) with the Triton kernels; inputs validated by fastbert.kernels."""
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    if torch.compiler.is_compiling():
        return _add_ln_op(x, residual, weight, bias, float(eps), float(dropout_p), seed)[0]
    return _AddLayerNorm.apply(x, residual, weight, bias, float(eps), float(dropout_p), seed)


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
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # power of 2 >= n, >= 16
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * n may pass 2**31
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n
    row_mask = row < rows
    mask = row_mask[:, None] & col_mask[None, :]
    offs = row[:, None] * n + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    h = tl.where(mask, gelu(x + c[None, :], APPROX_TANH), 0.0)
    d, mean, rstd = normalize(h, mask, n, eps)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (d * rstd[:, None] * w[None, :] + b[None, :]).to(Y.dtype.element_ty), mask=mask)
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
    rows_per_program,  # rows each program walks (a multiple of BLOCK_M)
    part_stride,  # programs * n: distance between the three partial buffers
    APPROX_TANH: tl.constexpr,  # True: tanh GELU, False: erf GELU
    BLOCK_M: tl.constexpr,  # rows per step
    BLOCK_N: tl.constexpr,  # power of 2 >= n, >= 16
    NUM_STAGES: tl.constexpr,  # row tiles in flight (> 1: the next tiles' loads are issued, through
    # shared memory, while this one is computed)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n
    c = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # int64 rows: offsets may pass 2**31
    end = tl.minimum(start + rows_per_program, rows)
    for row0 in tl.range(start, end, BLOCK_M, num_stages=NUM_STAGES):
        row = row0 + tl.arange(0, BLOCK_M)
        row_mask = row < end
        mask = row_mask[:, None] & col_mask[None, :]
        offs = row[:, None] * n + cols[None, :]
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + c[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + row, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (gelu(z, APPROX_TANH) - mean[:, None]) * rstd[:, None], 0.0)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        g = dy * w[None, :]
        c1 = tl.sum(xhat * g, axis=1) / n
        c2 = tl.sum(g, axis=1) / n
        dz = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None] * gelu_grad(z, APPROX_TANH)
        dz = tl.where(mask, dz, 0.0)
        dc += tl.sum(dz, axis=0)
        tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=mask)
    tl.store(PART + pid * n + cols, dc, mask=col_mask)
    tl.store(PART + part_stride + pid * n + cols, dw, mask=col_mask)
    tl.store(PART + 2 * part_stride + pid * n + cols, db, mask=col_mask)


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
    block_m, block_n, num_warps = fwd_config(n)
    _gelu_ln_fwd[(triton.cdiv(rows, block_m),)](x, bias, weight, ln_bias, y, mean, rstd, rows, n, eps,
                                                APPROX_TANH=approximate == "tanh", BLOCK_M=block_m,
                                                BLOCK_N=block_n, num_warps=num_warps)
    return y, mean, rstd


def _gelu_ln_bwd_impl(dy, x, bias, weight, mean, rstd, approximate: str):
    rows, n = _rows(x)
    x, bias, weight, dy = x.contiguous(), bias.contiguous(), weight.contiguous(), dy.contiguous()
    dx = torch.empty_like(x)
    if rows == 0 or n == 0:
        dx.zero_()
        return dx, torch.zeros_like(bias), torch.zeros_like(weight), torch.zeros_like(weight)
    block_m, block_n, num_warps, stages = bwd_config(n)
    consts = dict(APPROX_TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=stages)

    def args(part, rows_per_program, programs):
        return (x, bias, weight, dy, dx, part, mean, rstd, rows, n, rows_per_program, programs * n)

    key = (x.dtype, bias.dtype, weight.dtype, dy.dtype, n % 16 == 0, tuple(consts.items()))
    per_sm = resident_programs(_gelu_ln_bwd, key, x.device, args(mean, 16, 16), consts, num_warps)
    programs, rows_per_program = bwd_grid(rows, block_m, x.device, per_sm)
    part = torch.empty((3, programs, n), dtype=torch.float32, device=x.device)
    _gelu_ln_bwd[(programs,)](*args(part, rows_per_program, programs), num_warps=num_warps, **consts)
    return dx, part[0].sum(0).to(bias.dtype), part[1].sum(0).to(weight.dtype), part[2].sum(0).to(weight.dtype)


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
            torch.empty_like(weight), torch.empty_like(weight))


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
        return _gelu_ln_backward(ctx, dy, None, None, backward=_gelu_ln_bwd_impl)


def gelu_layer_norm(x, bias, weight, ln_bias, eps: float = 1e-12, approximate: str = "none") -> torch.Tensor:
    """layer_norm(gelu(x + bias)) with the Triton kernels; inputs validated by fastbert.kernels."""
    if torch.compiler.is_compiling():
        return _gelu_ln_op(x, bias, weight, ln_bias, float(eps), approximate)[0]
    return _GeluLayerNorm.apply(x, bias, weight, ln_bias, float(eps), approximate)
