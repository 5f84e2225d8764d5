"""BERT's feed-forward block with GELU fused into the matmuls around it, in Triton.

    out = gelu(x @ w1.T + b1) @ w2.T            x (M, K), w1 (N, K), b1 (N,), w2 (H, N) -> out (M, H)

(BertIntermediate then BertOutput's dense without its bias: the model adds that bias in the add +
LayerNorm kernel, see K.add_layer_norm(x_bias=).)

Unfused, GELU costs an elementwise kernel each way: the forward re-reads the (M, N) pre-activation
the first matmul just wrote, the backward reads the (M, N) gradient the second matmul's input-gradient
product just wrote, plus the pre-activation, and writes the pre-activation's gradient. Here the two
matmuls at GELU's sides do that work in their epilogues, on the fp32 accumulator while it is still in
registers:

- forward, `x @ w1.T`: adds b1 in fp32, writes z (the pre-activation, kept for the backward; not
  written when no gradient is wanted) and h = gelu(z) (the second matmul's input);
- backward, `dout @ w2` (dh): multiplies by gelu'(z) before anything is rounded and writes dz, and sums
  each block's dz over its rows into an fp32 (row blocks, N) buffer that torch reduces to db1
  (deterministic, no atomics).

The other four products (out = h @ w2.T, dw2 = doutᵀ h, dx = dz w1, dw1 = dzᵀ x) have no epilogue to
fuse and stay with cuBLAS. Per BERT-base layer at 32k tokens that removes two launches and ~0.6 GB of
HBM traffic (the forward's re-read of z; the backward's write and re-read of dh: 3 x 32768 x 3072 x 2
bytes); in inference, where z is not written at all, the forward moves one (M, N) tensor instead of
three. Whether it pays depends on how close this Triton matmul comes to cuBLAS on the same shape —
`benchmarks.bench_ffn` times both, and the model uses this path only when asked (FASTBERT_FUSED_FFN=1,
`fastbert.modeling.FUSED_FFN`).

Supports: fp16 / bf16 (fp32 accumulation, wgmma on sm_90) and fp32 (input_precision="ieee": no tf32,
like torch's default matmul); any M, N, K (masked K tail, wrapped M/N tails); both GELU forms; b1 in any
float dtype (added in fp32; its gradient returned in its dtype); x, w1, w2 with any strides (an x
strided along both dimensions is copied first; a strided b1 too).
Not supported: float64 on the GPU path (the reference runs it); mixed dtypes among x, w1 and w2.
Caution: fp32 inputs always take the IEEE fp32 dot (no tensor cores), whatever
torch.backends.cuda.matmul.allow_tf32 says, so under tf32 settings cuBLAS is faster on fp32; the
model's GPU recipe is bf16 autocast. z and h are rounded to x's dtype once each, from fp32 — one
rounding fewer than cuBLAS then bias + GELU (which rounds the product before adding the bias), so
results differ from that path in the last bit.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._host import cdiv
from .gelu import gelu, gelu_grad

__all__ = ["feed_forward", "GemmConfig", "gemm_config", "set_gemm_config_override"]


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int  # row blocks that walk the same column panel together (L2 reuse of w)
    num_warps: int
    num_stages: int


# 16-bit: a 128 x 128 fp32 accumulator is 64 registers a thread at 8 warps, which leaves room for
# the GELU epilogue; 4 stages of 128 x 64 + 64 x 128 bf16 tiles are 128 KB of shared memory (sm_80
# has 163 KB, sm_90 227 KB). fp32 ("ieee" dot, 4-byte tiles) takes a quarter of the tile.
_CONFIGS = {
    16: GemmConfig(128, 128, 64, 8, 8, 4),
    32: GemmConfig(64, 64, 32, 8, 4, 3),
}
_override: Optional[GemmConfig] = None


def gemm_config(dtype: torch.dtype) -> GemmConfig:
    """The launch of both epilogue matmuls for inputs of `dtype` (the override, if one is set)."""
    if _override is not None:
        return _override
    return _CONFIGS[32 if dtype == torch.float32 else 16]


def set_gemm_config_override(config) -> None:
    """Launch every epilogue matmul with `config` (a GemmConfig or a 6-tuple; None: the defaults) —
    for benchmark sweeps and tests."""
    global _override
    if config is None:
        _override = None
        return
    config = GemmConfig(*config)
    for name in ("block_m", "block_n", "block_k"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value}: tl.dot needs a power of two >= 16")
    if config.group_m < 1 or config.num_warps not in (1, 2, 4, 8, 16) or config.num_stages < 1:
        raise ValueError(f"bad GemmConfig {config}")
    _override = config


@triton.jit
def _gemm_gelu(
    A,  # pointer to the left operand (M, K): x (forward) or dout (backward)
    B,  # pointer to the right operand as (K, N) through its strides: w1.T (forward) or w2 (backward)
    BIAS,  # pointer to b1 (N,) (forward only)
    Z,  # pointer to z (M, N), contiguous: written by the forward, read by the backward
    C,  # pointer to the result (M, N), contiguous: h = gelu(z) (forward) or dz (backward)
    DB_PART,  # pointer to fp32 (cdiv(M, BLOCK_M), N) column sums of dz per row block (backward only)
    M, N, K,  # problem size
    stride_am, stride_ak,  # A's strides in elements
    stride_bk, stride_bn,  # B's strides as a (K, N) matrix
    BACKWARD: tl.constexpr,  # False: bias + GELU epilogue; True: gelu' + column-sum epilogue
    STORE_Z: tl.constexpr,  # forward: also write z (the backward's input); False when no gradient is wanted
    APPROX_TANH: tl.constexpr,  # True: tanh GELU, False: erf GELU
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no mask in the K loop
    INPUT_PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" for fp32, "tf32" ignored for 16-bit
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row blocks per group of the launch order
):
    # Launch order: GROUP_M row blocks sweep the column blocks together, so a column panel of B is
    # read from HBM once per group rather than once per row block.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # The tails wrap around (row M reads row 0): every load in the K loop is in bounds without a mask,
    # and the wrapped rows and columns are dropped at the stores and out of the column sums.
    a_rows = (rows % M).to(tl.int64)
    b_cols = (cols % N).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = B + ks[:, None] * stride_bk + b_cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=ks[None, :] < K - k0, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < K - k0, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if BACKWARD:
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(mask, acc * gelu_grad(z, APPROX_TANH), 0.0)
        tl.store(C + offs, dz.to(C.dtype.element_ty), mask=mask)
        tl.store(DB_PART + pid_m.to(tl.int64) * N + cols, tl.sum(dz, axis=0), mask=col_ok)
    else:
        z = acc + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if STORE_Z:
            tl.store(Z + offs, z.to(Z.dtype.element_ty), mask=mask)
        tl.store(C + offs, gelu(z, APPROX_TANH).to(C.dtype.element_ty), mask=mask)


def _launch(a, b_kn_strides, b, bias, z, c, db_part, M, N, K, backward: bool, approximate: str, store_z=True):
    cfg = gemm_config(a.dtype)
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n),)
    _gemm_gelu[grid](
        a, b, bias, z, c, db_part, M, N, K, a.stride(0), a.stride(1), *b_kn_strides,
        BACKWARD=backward, STORE_Z=store_z, APPROX_TANH=approximate == "tanh", EVEN_K=K % cfg.block_k == 0,
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def dense_gelu(x2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, approximate: str, store_z: bool = True):
    """(h, z): z = x2 @ w1.T + b1 and h = gelu(z), both (M, N) in x2's dtype, from one kernel; store_z=False
    (inference: no backward will read z) writes h only and returns z as None."""
    if x2.stride(1) != 1 and x2.stride(0) != 1:
        x2 = x2.contiguous()  # a tile strided along both dimensions would leave the cp.async pipeline
    b1 = b1.contiguous()  # the kernel reads the bias at unit stride
    M, K = x2.shape
    N = w1.shape[0]
    h = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    z = torch.empty_like(h) if store_z else None
    if M and N:
        if K == 0:  # no product to accumulate: the epilogue alone
            if store_z:
                z.copy_(b1.expand(M, N))
            h.copy_(torch.nn.functional.gelu(b1.float(), approximate=approximate).expand(M, N))
        else:  # (z's pointer is h's when z is not stored: a placeholder the kernel never writes)
            _launch(x2, (w1.stride(1), w1.stride(0)), w1, b1, h if z is None else z, h, h, M, N, K, False,
                    approximate, store_z)
    return h, z


def gelu_dgrad(dout2: torch.Tensor, w2: torch.Tensor, z: torch.Tensor, approximate: str):
    """(dz, db1 in fp32): dz = (dout2 @ w2) * gelu'(z), db1 = dz summed over rows, from one kernel."""
    M, K = dout2.shape
    N = w2.shape[1]
    dz = torch.empty((M, N), dtype=dout2.dtype, device=dout2.device)
    if M == 0 or N == 0 or K == 0:
        return dz.zero_(), torch.zeros(N, dtype=torch.float32, device=dout2.device)
    db_part = torch.empty((cdiv(M, gemm_config(dout2.dtype).block_m), N), dtype=torch.float32,
                          device=dout2.device)
    _launch(dout2, (w2.stride(0), w2.stride(1)), w2, db_part, z, dz, db_part, M, N, K, True, approximate)
    return dz, db_part.sum(0)


def _check(x, w1, b1, w2):
    for name, t in (("w1", w1), ("w2", w2)):
        if t.dtype != x.dtype:
            raise TypeError(f"feed_forward (Triton): {name} is {t.dtype} but x is {x.dtype}; cast the weights "
                            f"to x's dtype (the model does so under autocast)")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"feed_forward (Triton): x must be fp16, bf16 or fp32, got {x.dtype}")
    if b1.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"feed_forward (Triton): b1 must be fp16, bf16 or fp32, got {b1.dtype}")


def _fwd_impl(x, w1, b1, w2, approximate, store_z=True):
    """-> (out, h, z); h and z are saved for the backward (z None with store_z=False)."""
    _check(x, w1, b1, w2)
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (M, K); M given: -1 is ambiguous when K == 0
    h, z = dense_gelu(x2, w1, b1, approximate, store_z)  # (M, N) each
    out = h @ w2.t()  # (M, H)
    return out.reshape(*x.shape[:-1], w2.shape[0]), h, z


def _bwd_impl(dout, x, w1, b1, w2, h, z, approximate):
    """-> (dx, dw1, db1, dw2)."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (M, K)
    dout2 = dout.reshape(x2.shape[0], dout.shape[-1]).to(x.dtype).contiguous()  # (M, H)
    dz, db1 = gelu_dgrad(dout2, w2, z, approximate)  # (M, N), (N,) fp32
    dw2 = dout2.t() @ h  # (H, N)
    dx = (dz @ w1).reshape(x.shape)  # (M, K)
    dw1 = dz.t() @ x2  # (N, K)
    return dx, dw1, db1.to(b1.dtype), dw2


# ------------------------------------------------------------------------------ custom ops + autograd

@torch.library.custom_op("fastbert::feed_forward", mutates_args=(), device_types="cuda")
def _feed_forward_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                     approximate: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(x, w1, b1, w2, approximate)


@torch.library.custom_op("fastbert::feed_forward_backward", mutates_args=(), device_types="cuda")
def _feed_forward_backward_op(dout: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                              w2: torch.Tensor, h: torch.Tensor, z: torch.Tensor, approximate: str
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(dout, x, w1, b1, w2, h, z, approximate)


# CPU tensors reach these only under FASTBERT_KERNELS=triton with TRITON_INTERPRET=1 (tests).
_feed_forward_op.register_kernel("cpu")(_fwd_impl)
_feed_forward_backward_op.register_kernel("cpu")(_bwd_impl)


@_feed_forward_op.register_fake
def _(x, w1, b1, w2, approximate):
    m = math.prod(x.shape[:-1])  # the real rows of h and z, also when x has width 0
    inner = x.new_empty((m, w1.shape[0]))
    return x.new_empty((*x.shape[:-1], w2.shape[0])), inner, torch.empty_like(inner)


@_feed_forward_backward_op.register_fake
def _(dout, x, w1, b1, w2, h, z, approximate):
    # contiguous, as the real backward's products and sum are, whatever the inputs' strides
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (x, w1, b1, w2))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, approximate = inputs
    _, h, z = output
    ctx.save_for_backward(x, w1, b1, w2, h, z)
    ctx.approximate = approximate
    ctx.mark_non_differentiable(h, z)


def _backward(ctx, dout, _dh, _dz, backward=_feed_forward_backward_op):
    x, w1, b1, w2, h, z = ctx.saved_tensors
    dx, dw1, db1, dw2 = backward(dout, x, w1, b1, w2, h, z, ctx.approximate)
    return dx, dw1, db1, dw2, None


_feed_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _FeedForward(torch.autograd.Function):
    """Eager twin of fastbert::feed_forward(_backward): the same launchers without the custom-op
    dispatch (tens of microseconds a call); torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, approximate):
        out, h, z = _fwd_impl(x, w1, b1, w2, approximate)
        _setup_context(ctx, (x, w1, b1, w2, approximate), (out, h, z))
        return out, h, z

    @staticmethod
    def backward(ctx, dout, dh, dz):
        return _backward(ctx, dout, dh, dz, backward=_bwd_impl)


def feed_forward(x, w1, b1, w2, approximate="none"):
    """gelu(x @ w1.T + b1) @ w2.T with the Triton epilogue matmuls; inputs validated by fastbert.kernels."""
    if torch.compiler.is_compiling():
        return _feed_forward_op(x, w1, b1, w2, approximate)[0]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, b1, w2))):
        return _fwd_impl(x, w1, b1, w2, approximate, store_z=False)[0]  # inference: z is never written
    return _FeedForward.apply(x, w1, b1, w2, approximate)[0]
