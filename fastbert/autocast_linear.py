"""A linear layer under autocast whose weight and bias gradients come out of the GEMM in fp32.

Under bf16 / fp16 autocast, F.linear casts the fp32 weight (and bias) to the low dtype; its backward
computes the weight gradient in the low dtype and autograd then casts it back to fp32 for the
parameter: a (out, in) cast kernel per weight and per bias on every step (five per BERT layer), and a
weight gradient rounded to 8 (bf16) or 11 (fp16) significant bits before it is accumulated into fp32.
Here the weight-gradient GEMM writes fp32 itself (cuBLAS accumulates in fp32 anyway;
`torch.mm(..., out_dtype=torch.float32)`, PyTorch ≥ 2.8 on CUDA) and the bias gradient is summed into
fp32: the same forward, the same saved tensors, the backward casts removed and the gradients rounded
once instead of twice.

Supports: CUDA autocast in bf16 (compute capability ≥ 8.0) or fp16, fp32 weights and biases, inputs of
any dtype and shape (..., in); frozen weights, biases or inputs; gradient accumulation; activation
checkpointing; CUDA-graph capture; a second derivative (create_graph=True: the backward is then built
from differentiable ops, its weight gradient rounded to the low dtype as autocast's is).
Not supported (`linear` is then plain F.linear): the CPU, ROCm, torch.compile (inductor plans its own
casts), forward-mode AD and torch.func transforms, fp16 with cuBLAS fp16 accumulation allowed, no
autograd (nothing to save).
Caution: autocast caches its weight casts within one autocast region; this path casts per call, so a
model run twice with autograd inside one autocast block casts (and saves) its weights twice.

Used by every plain Linear of the model (QKV, attention output, both feed-forward denses, the MLM
transform, the pooler and the task heads). On the CPU the tests force it with dtype= and the fp32
GEMM is the upcast product (no CPU kernel for out_dtype).
"""
from __future__ import annotations

import functools
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


def _joined(weights) -> torch.Tensor:
    """The weight whose row blocks `weights` are (one block: itself, no copy)."""
    return weights[0] if len(weights) == 1 else torch.cat(weights)


class _AutocastLinear(torch.autograd.Function):
    """y = x·Wᵀ + b in `dtype` from x already in `dtype` and fp32 W, b (what autocast computes); dW, db
    in fp32. `linear` casts x outside, as autocast does: autograd records that cast, so only the
    low-precision copy is saved (an fp32 x is neither kept alive nor pinned against in-place
    changes) and a create_graph backward still reaches x through it."""

    @staticmethod
    def forward(ctx, x, bias, dtype, *weights):
        # weights: the weight, or its row blocks (QKV's three), joined here so that the backward saves
        # the parameters themselves, not an fp32 concatenation of them
        w_low = _joined(weights).to(dtype)  # (out, in)
        y = F.linear(x, w_low, None if bias is None else bias.to(dtype))  # (..., out)
        # the parameters (no memory) only for a create_graph backward's dx
        wants_dw = any(w.requires_grad for w in weights)
        ctx.save_for_backward(x if wants_dw else None, w_low if x.requires_grad else None,
                              *(weights if x.requires_grad else [None] * len(weights)))
        ctx.dtype, ctx.rows = dtype, [w.shape[0] for w in weights]
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_low, *weights = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        # create_graph=True (a second derivative, a gradient penalty): the same products built from
        # differentiable ops, so the graph reaches dy, the weights (through their cast) and x
        create_graph = torch.is_grad_enabled()
        dx = db = None
        dws = [None] * len(weights)
        if ctx.needs_input_grad[0]:
            w = _joined(weights).to(ctx.dtype) if create_graph else w_low
            dx = (dy2 @ w).view(*dy.shape[:-1], w.shape[1])  # (..., in), in the low dtype
        if any(ctx.needs_input_grad[3:]):
            x2 = x.reshape(-1, x.shape[-1])  # (N, in)
            dw = (dy2.t() @ x2).float() if create_graph else _mm_fp32(dy2.t(), x2)  # (out, in)
            blocks = dw.split(ctx.rows) if len(dws) > 1 else (dw,)
            dws = [d if need else None for d, need in zip(blocks, ctx.needs_input_grad[3:])]
        if ctx.needs_input_grad[1]:
            db = dy2.sum(0, dtype=torch.float32)  # (out,)
        return dx, db, None, *dws


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def _path_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when _AutocastLinear applies to this call, else None."""
    if not _MM_OUT_DTYPE or not x.is_cuda or torch.version.hip is not None or weight.dtype != torch.float32:
        return None
    if not torch.is_autocast_enabled("cuda") or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
        return None  # forward-mode AD, torch.func: the Function defines neither jvp nor vmap
    dtype = torch.get_autocast_dtype("cuda")
    if dtype == torch.bfloat16:
        # cuBLAS's fp32-output bf16 GEMM needs sm_80 (older GPUs run bf16 autocast by emulation)
        return dtype if _capability(x.device) >= (8, 0) else None
    if dtype == torch.float16:
        # PyTorch refuses out_dtype while cuBLAS may accumulate fp16 products in fp16
        return None if getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", False) else dtype
    return None


def linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None,
           dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with fp32 weight / bias gradients straight from the GEMM under CUDA
    autocast (module docstring). weight: a tensor, or a sequence of (out_i, in) row blocks that
    torch.cat would join (QKV's three weights: the backward then keeps the parameters, not an fp32
    copy of the joined weight). dtype: force the low-precision path in that dtype (tests, CPU)."""
    weights = tuple(weight) if isinstance(weight, (tuple, list)) else (weight,)
    if dtype is None and all(w.dtype == weights[0].dtype for w in weights):
        dtype = _path_dtype(x, weights[0])
    if dtype is None:
        return F.linear(x, _joined(weights), bias)
    return _AutocastLinear.apply(x.to(dtype), bias, dtype, *weights)
