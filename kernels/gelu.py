"""Fused bias + GELU: y = gelu(x + bias), forward and backward, in Triton.

x (..., n), bias (n,). GELU is either the exact form 0.5 z (1 + erf(z / sqrt 2)) (approximate="none",
BERT's "gelu") or the tanh form 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) (approximate="tanh",
"gelu_new" / "gelu_pytorch_tanh"), as torch.nn.functional.gelu.

Forward: one pass over x in (BLOCK_M, BLOCK_N) tiles, a program per tile, the bias loaded once per
program. (It used to walk x flattened and read the bias at offs % n: on sm_90 the int64 remainder and
its addresses cost 8.5 of the 48.5 SASS instructions per element, and at BERT sizes the exact-GELU
forward is bound by issued instructions, not bytes: H200, 0.155 ms for 32768 x 3072 bf16 where the
instruction count predicts 0.145 and the copy bandwidth 0.095.) The exact form's Phi(z) comes from
a fitted normal-tail formula (`_normal_tail`) instead of tl.erf: 26.5 instead of 40 instructions per
element in the forward, 33 instead of 53 in the backward (`python -m benchmarks.ptxas_report --gelu`);
the tanh form's reciprocal is no longer an IEEE division: 29.5 / 41 instead of 45 / 55.5.
Backward: dx = dy * gelu'(x + bias) and dbias = sum over rows of dx; every program owns a group of
rows and a block of columns, sums its dbias share in fp32 and writes it to a
(programs, n) fp32 buffer that torch then reduces: deterministic, and no bf16 rounding of the
partial sums.

Supports: fp32, fp16, bf16 (math in fp32, stored in the input dtype); any width n up to 65535 x 1024
(column blocks ride the grid's second axis); any leading shape; non-contiguous x (copied once).
Not supported: float64 on the GPU path (use the reference); wider rows (the forward raises ValueError).
Caution: the element-wise `gelu` / `gelu_grad` helpers take fp32 input; the layer_norm and gemm_gelu
modules reuse them. Exact GELU of +-inf is inf / 0 (derivative 1 / 0), where PyTorch's erf form gives
nan. On a GPU the formula's rsqrt and exp2 are the hardware approximations (a few ulp; the interpreter
computes them exactly): emulated in numpy with the PTX's FMAs and those error bounds, the max error of
GELU' over [-12, 12] is 3.2e-7 against PyTorch's fp32 2.8e-7 on the CPU (GELU: 2.4e-7 against 1.2e-6;
benchmarks/results/ptxas-cpu-2026-11-28-s18-gelu/fp32_emulation.py). exp2 is ex2.approx.ftz: the
normal tail flushes to 0 from |z| ~ 13.2 on (the interpreter keeps values down to ~1e-38).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._dispatch import sm_count
from ._host import cdiv, next_pow2

__all__ = ["bias_gelu", "gelu", "gelu_grad"]

# constexpr: compiled kernels may read only constexpr globals (the interpreter reads any global)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_NEG_HALF_LOG2E = tl.constexpr(-0.7213475204444817)  # -log2(e) / 2: exp(-a^2 / 2) = exp2(a^2 * this)
# The standard normal tail Q(a) = P(N(0, 1) > a) = phi(a) M(a), M the Mills ratio, as
# phi(a) t P(t) with t = 1 / (1 + TAIL_P a) and P of degree 5: the form of Abramowitz & Stegun
# 26.2.17 with coefficients fitted here (benchmarks/fit_normal_tail.py, minimax by Lawson's
# iteration): |error| <= 6.4e-9 / max(1, a) on [0, inf) in exact arithmetic, 1.5e-8 / max(1, a) with
# the constants rounded to fp32 (at a = 0: a quarter ulp of Q = 0.5). The kernels' immediates include
# the 1 / sqrt(2 pi) of phi.
TAIL_P = 0.2775
TAIL_COEFFS = (0.2939085303056151, 0.13599911530091846, 0.7591117458427542, -0.7167432909103041,
               1.058897571628505, -0.27785955071569823)
_TAIL_P = tl.constexpr(TAIL_P)
_Q1, _Q2, _Q3, _Q4, _Q5, _Q6 = (tl.constexpr(c * 0.3989422804014327) for c in TAIL_COEFFS)
_TAIL_CLAMP = tl.constexpr(64.0)  # Q(64) is 0 in fp32; keeps t, and so the whole formula, finite at |z| = inf
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_TANH_COEF = tl.constexpr(0.044715)

FWD_ELEMS = 2048  # elements per forward tile (BLOCK_M rows x BLOCK_N columns): 16 per thread at 4 warps
FWD_MAX_BLOCK_N = 1024
BWD_ELEMS = 4096  # elements per backward tile (BLOCK_M rows x BLOCK_N columns)
BWD_MAX_BLOCK_N = 1024


@triton.jit
def _reciprocal(d):
    """1 / d for fp32 d >= 1 (finite), to ~1 ulp: the approximate rsqrt squared (~4 ulp), then one
    Newton step. The compiled `/` (div.full.f32) spends 6 instructions on range fix-ups d >= 1 never
    needs, and div_rn (IEEE) several times that."""
    r = tl.math.rsqrt(d)
    t = r * r
    return t + t * (1.0 - d * t)


@triton.jit
def _tanh_parts(u):
    """(1 + tanh(u), 1 - tanh(u)^2) for fp32 u, both to a few ulp *relative* error.

    Built from e = exp(-2|u|) in (0, 1]: 1 + tanh u = 2 / (1 + e) for u >= 0 and 2 e / (1 + e) for
    u < 0; 1 - tanh^2 u = 4 e / (1 + e)^2. No subtraction anywhere, so nothing cancels: forming tanh
    first (e.g. 1 - 2 / (exp(2u) + 1)) and then 1 + t or 1 - t*t loses the small results to
    cancellation near t = -1 / |t| = 1 (GELU of z <= -3, its derivative at |z| >= 3), where fast
    exp/div make it worse than PyTorch's accurate tanh. The reciprocal is _reciprocal's (~1 ulp; it
    was an IEEE division, 45 / 55.5 SASS instructions per element in bias_gelu then).
    """
    e = tl.exp(-2.0 * tl.abs(u))  # underflows to 0 for large |u|: the limits 2 or 0, and 0, exactly
    d = 1.0 + e
    inv = _reciprocal(d)
    one_plus_t = tl.where(u >= 0, 2.0 * inv, 2.0 * e * inv)
    one_minus_t2 = 4.0 * e * inv * inv
    return one_plus_t, one_minus_t2


@triton.jit
def _normal_tail(z):
    """(a, e, q) for fp32 z: a = min(|z|, 64), e = exp(-a^2 / 2), q = Q(a) = P(N(0, 1) > a).

    Why not tl.erf: libdevice's erff picks its coefficients from two ranges per element, and on
    sm_90 those selects compile to ~15 register moves, and the exact-GELU forward was bound by issued
    instructions on an H200 (40 per element; the backward had 53), not by its bytes. Here one
    polynomial serves every z, its coefficients are FMA immediates, and the exponential is the one
    the derivative needs anyway (phi(z) = e / sqrt(2 pi)). No subtraction: Q(a) keeps its relative
    accuracy in the tail, where 1 + erf(z / sqrt 2) cancels (PyTorch's GELU returns 0 at z = -6).
    t = 1 / (1 + p a) from _reciprocal.
    """
    # NaN-propagating: PTX min.f32 returns the operand that is not NaN, which made GELU(nan) = 0 on a GPU
    a = tl.minimum(tl.abs(z), _TAIL_CLAMP, propagate_nan=tl.PropagateNan.ALL)
    t = _reciprocal(1.0 + _TAIL_P * a)
    q = t * (_Q1 + t * (_Q2 + t * (_Q3 + t * (_Q4 + t * (_Q5 + t * _Q6)))))
    e = tl.exp2(a * a * _NEG_HALF_LOG2E)
    return a, e, e * q


@triton.jit
def gelu(z, APPROX_TANH: tl.constexpr):
    """gelu(z) for fp32 z."""
    if APPROX_TANH:
        one_plus_t, _ = _tanh_parts(_SQRT_2_OVER_PI * (z + _TANH_COEF * z * z * z))
        return 0.5 * z * one_plus_t
    else:
        # z Phi(z) = z (1 - Q(z)) for z >= 0 and z Q(-z) for z < 0: both are max(z, 0) - |z| Q(|z|)
        a, _, q = _normal_tail(z)
        return tl.maximum(z, 0.0) - a * q


@triton.jit
def gelu_grad(z, APPROX_TANH: tl.constexpr):
    """d gelu(z) / dz for fp32 z."""
    if APPROX_TANH:
        one_plus_t, one_minus_t2 = _tanh_parts(_SQRT_2_OVER_PI * (z + _TANH_COEF * z * z * z))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_COEF * z * z)
        return 0.5 * one_plus_t + 0.5 * z * one_minus_t2 * du
    else:
        # Phi(z) + z phi(z), with |z| clamped like a (so that z = +-inf gives 1 and 0, not nan)
        a, e, q = _normal_tail(z)
        a_phi = a * e * _INV_SQRT_2PI
        return tl.where(z >= 0, (1.0 - q) + a_phi, q - a_phi)


@triton.jit
def _bias_gelu_fwd(
    X,  # pointer to x (rows, n), contiguous
    BIAS,  # pointer to bias (n,)
    Y,  # pointer to the output (rows, n), x's dtype
    rows,  # number of rows
    n,  # width (the bias length)
    APPROX_TANH: tl.constexpr,  # True: tanh GELU, False: erf GELU
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program (power of 2); the grid's second axis walks the width
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows x n may pass 2**31
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    mask = (r < rows)[:, None] & col_mask[None, :]
    offs = r[:, None] * n + cols[None, :]
    b = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = gelu(x + b[None, :], APPROX_TANH)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd(
    X,  # pointer to x (rows, n), contiguous
    BIAS,  # pointer to bias (n,)
    DY,  # pointer to the output gradient (rows, n), contiguous
    DX,  # pointer to the input gradient (rows, n), written in x's dtype
    DBIAS_PART,  # pointer to fp32 partial bias gradients (programs along axis 0, n)
    rows,  # number of rows
    n,  # width
    rows_per_program,  # rows handled by one program along axis 0 (a multiple of BLOCK_M)
    APPROX_TANH: tl.constexpr,  # True: tanh GELU, False: erf GELU
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile (power of 2)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    b = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    start = pid_m * rows_per_program
    end = tl.minimum(start + rows_per_program, rows)
    for r0 in range(start, end, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        mask = (r < end)[:, None] & col_mask[None, :]
        offs = r.to(tl.int64)[:, None] * n + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        # Masked elements load x = dy = 0, so dx = 0 * gelu'(bias) = 0 there (gelu' is finite unless the
        # bias is inf / nan, and then the column's real rows are nan already): no select needed.
        dx = dy * gelu_grad(x + b[None, :], APPROX_TANH)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        acc += tl.sum(dx, axis=0)
    tl.store(DBIAS_PART + pid_m * n + cols, acc, mask=col_mask)


def fwd_config(n: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward for width n."""
    block_n = min(next_pow2(n), FWD_MAX_BLOCK_N)
    return max(1, FWD_ELEMS // block_n), block_n, 4


def bwd_config(n: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the backward for width n."""
    block_n = min(next_pow2(n), BWD_MAX_BLOCK_N)
    block_m = max(1, BWD_ELEMS // block_n)
    return block_m, block_n, 4


def _check(x: torch.Tensor, bias: torch.Tensor):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"bias_gelu (Triton): x must be fp16, bf16 or fp32, got {x.dtype}")
    if bias.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"bias_gelu (Triton): bias must be fp16, bf16 or fp32, got {bias.dtype}")


def _fwd_impl(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    _check(x, bias)
    x = x.contiguous()
    bias = bias.contiguous()
    y = torch.empty_like(x)
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    if rows == 0:
        return y
    block_m, block_n, num_warps = fwd_config(n)
    grid = (cdiv(rows, block_m), cdiv(n, block_n))
    if grid[1] > 65535:
        raise ValueError(f"bias_gelu (Triton): width {n} needs {grid[1]} column blocks, the grid allows 65535")
    _bias_gelu_fwd[grid](x, bias, y, rows, n, APPROX_TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n,
                         num_warps=num_warps)
    return y


def _bwd_impl(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, approximate: str):
    x = x.contiguous()
    dy = dy.contiguous()
    bias = bias.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    dx = torch.empty_like(x)
    if rows == 0 or n == 0:
        return dx, torch.zeros_like(bias)
    block_m, block_n, num_warps = bwd_config(n)
    col_blocks = cdiv(n, block_n)
    # Enough programs to fill the GPU about four times over, each with whole tiles of rows.
    programs = max(1, min(cdiv(rows, block_m), (4 * sm_count(x.device)) // col_blocks or 1))
    rows_per_program = cdiv(cdiv(rows, programs), block_m) * block_m
    programs = cdiv(rows, rows_per_program)
    partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    _bias_gelu_bwd[(programs, col_blocks)](x, bias, dy, dx, partial, rows, n, rows_per_program,
                                          APPROX_TANH=approximate == "tanh", BLOCK_M=block_m, BLOCK_N=block_n,
                                          num_warps=num_warps)
    return dx, partial.sum(0).to(bias.dtype)


# ------------------------------------------------------------------------------ custom ops + autograd

@torch.library.custom_op("fastbert::bias_gelu", mutates_args=(), device_types="cuda")
def _bias_gelu_op(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    return _fwd_impl(x, bias, approximate)


@torch.library.custom_op("fastbert::bias_gelu_backward", mutates_args=(), device_types="cuda")
def _bias_gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                           approximate: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _bwd_impl(dy, x, bias, approximate)


# CPU tensors reach these only under FASTBERT_KERNELS=triton with TRITON_INTERPRET=1 (tests).
_bias_gelu_op.register_kernel("cpu")(_fwd_impl)
_bias_gelu_backward_op.register_kernel("cpu")(_bwd_impl)


@_bias_gelu_op.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_bias_gelu_backward_op.register_fake
def _(dy, x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, dy, backward=_bias_gelu_backward_op):
    x, bias = ctx.saved_tensors
    dx, dbias = backward(dy, x, bias, ctx.approximate)
    return dx, dbias, None


_bias_gelu_op.register_autograd(_backward, setup_context=_setup_context)


class _BiasGelu(torch.autograd.Function):
    """Eager twin of fastbert::bias_gelu(_backward): the same launchers without the custom-op
    dispatch, whose Python overhead (tens of microseconds per call) rivals the kernels at BERT sizes.
    torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, x, bias, approximate):
        y = _fwd_impl(x, bias, approximate)
        _setup_context(ctx, (x, bias, approximate), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, backward=_bwd_impl)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias) with the Triton kernels; inputs already validated by fastbert.kernels."""
    if torch.compiler.is_compiling():
        return _bias_gelu_op(x, bias, approximate)
    return _BiasGelu.apply(x, bias, approximate)
