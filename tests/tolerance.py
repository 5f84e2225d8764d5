"""The one tolerance rule of the test suite (DESIGN.md, after flash-attention's tests).

Our result in some dtype must be as close to a float64 reference as PyTorch's own
implementation in that same dtype is, within a factor k (2 for one kernel, 3-4 for a model),
plus a tiny absolute floor scaled by the reference's magnitude. A fixed loose band is not a test.
"""
from __future__ import annotations

import torch

# Floors, relative to max(1, |reference|_max): far below the error of PyTorch itself in each dtype
# except where PyTorch's error is exactly zero (e.g. an op that is exact in that dtype).
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def max_err(x: torch.Tensor, reference: torch.Tensor) -> float:
    return (x.detach().double() - reference.detach().double()).abs().max().item() if x.numel() else 0.0


def assert_close_to_reference(actual, baseline, reference, *, k: float = 2.0, name: str = "", atol=None):
    """max|actual - reference| <= k * max|baseline - reference| + atol.

    actual    our result (any dtype)
    baseline  PyTorch's own implementation of the same thing in the same dtype as `actual`
    reference the float64 answer
    """
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual.detach().double()).all(), f"{name}: non-finite values"
    scale = max(1.0, reference.detach().double().abs().max().item()) if reference.numel() else 1.0
    floor = (ATOL[actual.dtype] if atol is None else atol) * scale
    err, base = max_err(actual, reference), max_err(baseline, reference)
    assert err <= k * base + floor, (
        f"{name}: error {err:.3e} exceeds {k} x PyTorch's {base:.3e} + {floor:.1e} ({actual.dtype})")
