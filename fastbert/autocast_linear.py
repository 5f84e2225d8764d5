"""A linear layer under autocast whose weight and bias gradients come out of the GEMM in fp32.

Under bf16 / fp16 autocast, F.linear casts the fp32 weight (and bias) to the low dtype; its backward
computes the weight gradient in the low dtype and autograd then casts it back to fp32 for the
parameter: a (out, in) cast kernel per weight and per bias on every step, 71 launches in a BERT-base
pretraining step (`python -m benchmarks.launch_census`), and a weight gradient rounded to 8 (bf16) or
11 (fp16) significant bits before it is accumulated into fp32. Here the weight-gradient GEMM writes
fp32 itself (cuBLAS accumulates in fp32 anyway; `torch.mm(..., out_dtype=torch.float32)`, PyTorch ≥ 2.8
on CUDA) and the bias gradient is summed into fp32: the same forward, the same saved tensors, the
backward casts removed and the gradients rounded once instead of twice.

Used by the model's hot matmuls (QKV, attention output, both feed-forward denses) where autocast
would cast fp32 weights, on CUDA outside torch.compile (inductor plans its own casts); everywhere
else `linear` is F.linear. On the CPU (tests) the fp32 GEMM is the upcast product, since PyTorch has
no CPU kernel for mm's out_dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# mm's out_dtype overload (PyTorch ≥ 2.8; its CUDA kernel takes 16-bit inputs to an fp32 result, which
# K.mlm_loss's d_hidden GEMM has used on the H100 / H200 runs since 2026-11-26). Without it: F.linear.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 for 16-bit a, b: cuBLAS's fp32 accumulator written as is (CPU: upcast first)."""
    if a.device.type != "cpu":  # CUDA (and meta, where tests check the call)
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


class _AutocastLinear(torch.autograd.Function):
    """y = x·Wᵀ + b in `dtype` from fp32 W, b (what autocast computes); dW, db in fp32."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        x_low = x.to(dtype)
        w_low = weight.to(dtype)
        y = F.linear(x_low, w_low, None if bias is None else bias.to(dtype))  # (..., out)
        ctx.save_for_backward(x_low if weight.requires_grad else None, w_low if x.requires_grad else None)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises instead of coming out wrong
    def backward(ctx, dy):
        x_low, w_low = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ w_low).view(*dy.shape[:-1], w_low.shape[1])  # (..., in), in the low dtype
        if ctx.needs_input_grad[1]:
            dw = _mm_fp32(dy2.t(), x_low.reshape(-1, x_low.shape[-1]))  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0, dtype=torch.float32)  # (out,)
        return dx, dw, db, None


def _fp32_grads_apply(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when _AutocastLinear applies to this call, else None."""
    if not _MM_OUT_DTYPE or not x.is_cuda or weight.dtype != torch.float32 or not torch.is_autocast_enabled("cuda"):
        return None
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    dtype = torch.get_autocast_dtype("cuda")
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    return dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with fp32 weight / bias gradients straight from the GEMM under CUDA
    autocast (module docstring). dtype: force the low-precision path in that dtype (tests, CPU)."""
    dtype = dtype or _fp32_grads_apply(x, weight)
    if dtype is None:
        return F.linear(x, weight, bias)
    return _AutocastLinear.apply(x, weight, bias, dtype)
