"""Dropout on the CPU with 16-bit random draws: the same op as F.dropout(x, p, training=True), about
half its cost.

Why: PyTorch's CPU dropout draws one Bernoulli sample per element from its Mersenne Twister
(~6 ms per million elements on one thread pair of this project's EPYC), and a BERT pretraining step
drops out ~6.5 M elements (the attention probabilities of every layer and three activations per
layer): ~11% of fastbert's CPU pretraining step. Here one 64-bit draw (torch.Tensor.random_, which
fills 63 random bits) gives four 16-bit lanes: doubled in place (a shift by one bit), its bits 0–62
become lanes 1–3 of 16 random bits and lane 0 of 15 random bits above a zero; an element is kept when
its lane, as an unsigned number, is at least an even threshold t — for every lane, probability
(65536 − t) / 65536 — so one contiguous compare of the int16 view makes the mask (~0.9 ms of draws
per million elements, then that compare and one multiply).

Supports: floating CPU tensors of any shape; 0 < p < 1; autograd (the backward multiplies by the
same mask, kept as one byte per element, as F.dropout keeps its own).
Not supported: CUDA tensors (the Triton kernels draw their own Philox masks), torch.compile
(`applies` is False while compiling; the callers use F.dropout there).
Caution: the drop probability is p rounded to a multiple of 1/32768 (p = 0.1 drops with probability
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


def _threshold(p: float) -> int:
    """Drop when a lane's unsigned 16-bit value is below this (even: lane 0's values are all even)."""
    return 2 * round(p * (_LEVELS >> 1))


def keep_mask(shape, p: float, device="cpu") -> tuple[torch.Tensor, float]:
    """(bool mask of `shape`, scale): True where an element is kept, and 1 / P(keep)."""
    n = torch.Size(shape).numel()
    threshold = _threshold(p)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # 63 random bits each
    draws.mul_(2)  # bits 0..62 -> 1..63: four lanes of 16 bits (lane 0's lowest bit 0)
    lanes = draws.view(torch.int16)  # little-endian lanes; as int16, an unsigned u reads u (- 65536 if u >= 32768)
    # u >= t has the same count as the signed value >= t - 32768 (both keep the top 65536 - t of the
    # lane's values, even ones only in lane 0), which one contiguous compare takes
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
    if _threshold(p) >= _LEVELS:  # p = 1 (or within 2**-16 of it): everything dropped
        return x * 0.0
    return _Dropout.apply(x, p)  # without autograd, apply runs the forward and keeps nothing
