"""Whether Triton's CPU interpreter multiplies bf16 matrices right (asked once, by one tiny launch).

Triton 3.6's interpreter keeps bf16 values as their uint16 bit patterns and its `tl.dot` multiplies
those as integers (~1e8 for unit inputs); compiled GPU kernels are right. The test suite's
tests/interpreter_gpu_like.py makes the interpreter compute bf16 as a GPU does, and a later Triton
may fix it: the launchers ask the interpreter itself rather than assume either.

Supports: CPU tensors under TRITON_INTERPRET=1 only (the only place the question arises).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bf16_dot_probe(a_ptr,            # (16, 16) bf16, row-major
                    out_ptr):          # (16, 16) fp32: a @ a
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    tl.store(out_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, a))


_verdict: bool | None = None


def interpreter_computes_bf16_dots() -> bool:
    global _verdict
    if _verdict is None:
        a = torch.full((16, 16), 0.5, dtype=torch.bfloat16)
        out = torch.zeros(16, 16)
        _bf16_dot_probe[(1,)](a, out)
        _verdict = bool((out == 4.0).all())  # sixteen products of 0.25: exact in any order
    return _verdict
