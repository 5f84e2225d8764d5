"""Buffers reused step after step on the CPU, where a fresh large tensor is expensive.

Why: glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh mappings, and
the kernel zero-fills every page on first touch: a 47 MB tensor costs ~20 ms per step on one core of
this project's 2-core EPYC, against ~1.5 ms to zero memory already mapped. A training step makes the
same large buffers (the word-embedding gradient, the MLM head's logits) every step, so keeping one
and handing it out again removes that cost. The caching allocator on CUDA has no such cost.

Caution: a buffer is handed out again only when no tensor but ours still refers to its memory
(`sole_owner`), so a result the caller kept, or one still saved for a backward, is never overwritten.
"""
from __future__ import annotations

import torch

__all__ = ["sole_owner", "ReusedBuffer"]


def sole_owner(t: torch.Tensor) -> bool:
    """True when only `t` (and no other tensor or view) holds t's storage."""
    try:  # storage references: t itself, the temporary storage object below, and any other tensor
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2
    except AttributeError:  # a PyTorch without this private counter: never reuse
        return False


class ReusedBuffer:
    """One buffer handed out again and again while nobody else holds it; otherwise a fresh one."""

    def __init__(self):
        self.buf = None

    def take(self, shape, dtype, device, *, zero: bool) -> torch.Tensor:
        """A tensor of `shape` (zeroed when `zero`) over this buffer's memory when it is free and
        fits (same dtype and device, at least as many elements), else over a fresh buffer kept for
        next time."""
        shape = torch.Size(shape)
        n = shape.numel()
        b = self.buf
        if not (b is not None and b.dtype == dtype and b.device == device and b.numel() >= n and sole_owner(b)):
            b = self.buf = (torch.zeros if zero else torch.empty)(n, dtype=dtype, device=device)
        elif zero:
            b[:n].zero_()
        # A new tensor over the same memory: AccumulateGrad adopts a gradient as .grad without a copy
        # only when no other tensor object refers to it (ours, self.buf, is a different one).
        return b[:n].view(shape)
