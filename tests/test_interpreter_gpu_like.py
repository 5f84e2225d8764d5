"""The interpreter's GPU-like numerics (tests/interpreter_gpu_like.py) themselves: each change is in
effect in the kernel tests' process and is what it says, no more."""
import math
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from interpreter_bounds import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED
                                or os.environ.get("FASTBERT_GPU_LIKE", "1") == "0",
                                reason="checks the interpreter's GPU-like numerics")

REL = 2.0 ** -22


@triton.jit
def _masked_load(src, dst, n, BLOCK: tl.constexpr, OTHER_ZERO: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if OTHER_ZERO:
        x = tl.load(src + offs, mask=offs < n, other=0.0)
    else:
        x = tl.load(src + offs, mask=offs < n)
    tl.store(dst + offs, x)


@pytest.mark.parametrize("other_zero", [False, True])
def test_masked_lanes_are_garbage_without_other(other_zero):
    src, dst = torch.arange(1.0, 11.0), torch.zeros(16)
    _masked_load[(1,)](src, dst, 10, BLOCK=16, OTHER_ZERO=other_zero)
    assert torch.equal(dst[:10], src)
    if other_zero:
        assert torch.equal(dst[10:], torch.zeros(6))
    else:
        assert torch.isnan(dst[10:]).all()


@triton.jit
def _dot(a, b, c, PRECISION: tl.constexpr):
    r = tl.arange(0, 16)
    x = tl.load(a + r[:, None] * 16 + r[None, :])
    y = tl.load(b + r[:, None] * 16 + r[None, :])
    tl.store(c + r[:, None] * 16 + r[None, :], tl.dot(x, y, input_precision=PRECISION))


def test_fp32_dot_rounds_operands_to_tf32_unless_ieee():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    exact = a.double() @ b.double()
    for precision in ("ieee", "tf32"):
        c = torch.empty(16, 16)
        _dot[(1,)](a, b, c, PRECISION=precision)
        err = (c.double() - exact).abs().max().item() / exact.abs().max().item()
        if precision == "ieee":
            assert err < 1e-6, err
        else:
            # what tf32 operands give: the product of the truncated inputs, 10 mantissa bits each
            keep = lambda t: (t.view(torch.int32) & -8192).view(torch.float32).double()  # noqa: E731
            assert 1e-4 < err < 1e-2, err
            torch.testing.assert_close(c.double(), keep(a) @ keep(b), rtol=1e-6, atol=1e-6)


@triton.jit
def _math(x_ptr, out_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=1.0)
    if OP == "rsqrt":
        y = tl.math.rsqrt(x)
    elif OP == "exp":
        y = tl.exp(x)
    elif OP == "exp2":
        y = tl.exp2(x)
    elif OP == "log":
        y = tl.log(x)
    elif OP == "sqrt":
        y = tl.sqrt(x)
    elif OP == "sqrt_rn":
        y = tl.sqrt_rn(x)
    elif OP == "div":
        y = 1.0 / x
    else:
        y = tl.div_rn(1.0, x)
    tl.store(out_ptr + offs, y, mask=offs < n)


def _exp_through_base2(x):
    """exp as Triton lowers it: x * log2(e) rounded to fp32, then 2 to that power."""
    return np.exp2((x.astype(np.float32) * np.float32(math.log2(math.e))).astype(np.float64))


EXACT = {"rsqrt": lambda x: 1 / np.sqrt(x), "exp": _exp_through_base2, "exp2": np.exp2, "log": np.log, "sqrt": np.sqrt,
         "sqrt_rn": np.sqrt, "div": lambda x: 1 / x, "div_rn": lambda x: 1 / x}


@pytest.mark.parametrize("op", sorted(EXACT))
def test_fp32_math_is_off_by_the_gpu_bound_except_ieee_spellings(op):
    x = torch.linspace(1.5, 9.5, 64)
    out = torch.empty(64)
    _math[(1,)](x, out, 64, OP=op, BLOCK=64)
    exact = EXACT[op](x.numpy()) if op == "exp" else EXACT[op](x.double().numpy())
    rel = (out.double().numpy() - exact) / exact
    if op in ("sqrt_rn", "div_rn"):
        assert np.abs(rel).max() <= 2 ** -24  # correctly rounded fp32
        return
    # off by 2^-22 either way, alternating element by element (within fp32 rounding of the result)
    assert np.all(np.abs(np.abs(rel) - REL) <= 2 ** -23), np.abs(rel).max()
    assert (rel[0::2] > 0).all() and (rel[1::2] < 0).all()


@triton.jit
def _arrival(counter, out):
    pid = tl.program_id(0)
    turn = tl.load(counter)
    tl.store(out + pid, turn)
    tl.store(counter, turn + 1)


def test_programs_run_last_to_first():
    counter, out = torch.zeros(1, dtype=torch.int32), torch.full((5,), -1, dtype=torch.int32)
    _arrival[(5,)](counter, out)
    assert out.tolist() == [4, 3, 2, 1, 0]


def test_fresh_cpu_memory_is_garbage():
    assert torch.isnan(torch.empty(3, 5)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(4), dtype=torch.float16)).all()
    assert torch.isnan(torch.zeros(2).new_empty((6,))).all()
    assert (torch.empty(7, dtype=torch.int32) == 2 ** 31 - 1).all()
    assert torch.empty(2, 2, requires_grad=True).requires_grad  # a leaf: filled without autograd


@triton.jit
def _min_max(x_ptr, out_ptr, PROPAGATE: tl.constexpr):
    offs = tl.arange(0, 4)
    x = tl.load(x_ptr + offs)
    if PROPAGATE:
        lo = tl.minimum(x, 1.0, propagate_nan=tl.PropagateNan.ALL)
        hi = tl.maximum(x, 1.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        lo = tl.minimum(x, 1.0)
        hi = tl.maximum(x, 1.0)
    tl.store(out_ptr + offs, lo)
    tl.store(out_ptr + 4 + offs, hi)


@pytest.mark.parametrize("propagate", [False, True])
def test_min_max_drop_nan_unless_told_to_propagate(propagate):
    x = torch.tensor([0.5, float("nan"), 2.0, -3.0])
    out = torch.empty(8)
    _min_max[(1,)](x, out, PROPAGATE=propagate)
    nan = float("nan")
    want = [0.5, nan if propagate else 1.0, 1.0, -3.0, 1.0, nan if propagate else 1.0, 2.0, 1.0]
    torch.testing.assert_close(out, torch.tensor(want), equal_nan=True)
