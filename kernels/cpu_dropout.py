"""Dropout on the CPU with 16-bit random draws: the same op as F.dropout(x, p, training=True), about
half its cost.

Why: PyTorch's CPU dropout draws one Bernoulli sample per element from its Mersenne Twister
(~6 ms per million elements on one thread pair of this project's EPYC), and a BERT pretraining step
drops out ~6.5 M elements (the attention probabilities of every layer and three activations per
layer): ~11% of fastbert's CPU pretraining step. Here one 64-bit draw (torch.Tensor.random_ over the
whole int64 range: 64 random bits) gives four 16-bit uniforms; an element is kept when its uniform is
at least round(p · 65536), which one contiguous compare of the draws' int16 view decides (~0.8 ms of
draws per million elements, then that compare and one multiply).

Supports: floating CPU tensors of any shape; 0 < p < 1; autograd (the backward multiplies by the
same mask, kept as one byte per element, as F.dropout keeps its own).
Not supported: CUDA tensors (the Triton kernels draw their own Philox masks), torch.compile
(`applies` is False while compiling; the callers use F.dropout there).
Caution: the drop probability is p rounded to a multiple of 1/65536 (p = 0.1 drops with probability
0.1000061), and kept elements are scaled by 1 / (1 − that probability), so the output's expectation
is exactly the input's. The draws come from torch's default CPU generator: torch.manual_seed makes
them repeatable, but they are not F.dropout's masks for the same seed.
"""
from __future__ import annotations

import torch

__all__ = ["applies", "dropout"]

_LEVELS = 1 << 16


def applies(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.is_floating_point() and not torch.compiler.is_compiling()


def _draws(words: int, device) -> torch.Tensor:
    """`words` int64 values with all 64 bits random (torch's default generator for `device`)."""
    return torch.empty(words, dtype=torch.int64, device=device).random_(-(1 << 63), None)


def keep_mask(shape, p: float, device="cpu") -> tuple[torch.Tensor, float]:
    """(bool mask of `shape`, scale): True where an element is kept, and 1 / P(keep)."""
    n = torch.Size(shape).numel()
    threshold = round(p * _LEVELS)  # drop when a lane's unsigned value u < threshold
    lanes = _draws((n + 3) // 4, device).view(torch.int16)  # four 16-bit lanes per draw
    # As int16 a lane reads u, or u - 65536 when u >= 32768: a bijection, so "at least
    # threshold - 32768" keeps 65536 - threshold of the 65536 values, as u >= threshold would.
    keep = lanes >= threshold - (_LEVELS >> 1)
    return keep[:n].view(shape), _LEVELS / (_LEVELS - threshold)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        keep, scale = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """x with each element zeroed with probability ~p (see Caution) and the rest scaled up."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must lie in [0, 1], got {p}")
    if p == 0.0:
        return x
    if round(p * _LEVELS) >= _LEVELS:  # p = 1 (or within 2**-17 of it): everything dropped
        return x * 0.0
    return _Dropout.apply(x, p)  # without autograd, apply runs the forward and keeps nothing
