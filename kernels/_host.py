"""Host-side integer helpers for the launchers: plain-Python twins of triton.cdiv and
triton.next_power_of_2.

Those two are Triton ConstexprFunctions: called from host code they go through Triton's JIT call
machinery, ~2 µs per call on an idle host (Triton 3.6, this project's CPU) against ~0.03 µs here, and
the launchers call them several times per op (an add + LayerNorm forward and backward: 9 calls), some
hundreds of times per BERT training step, on the thread that launches the step's kernels.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
