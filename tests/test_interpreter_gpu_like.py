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


# ---------------------------------------------------------------------------------------- bf16

@triton.jit
def _bf16_cast(x_ptr, out_ptr, n, SRC_BF16: tl.constexpr, RTZ: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    if SRC_BF16:  # bf16 -> the output's type (fp32, fp16, int32)
        y = x.to(out_ptr.dtype.element_ty)
    elif RTZ:
        y = x.to(tl.bfloat16, fp_downcast_rounding="rtz")
    else:  # fp32 / fp16 -> bf16
        y = x.to(tl.bfloat16)
    tl.store(out_ptr + offs, y, mask=offs < n)


def _bf16_specials():
    """fp32 values that exercise bf16 rounding: halfway cases both ways (to even), a carry into the
    exponent, the largest finite fp32 (overflows to inf), fp32 subnormals, signed zeros, inf, NaNs, and
    random values over a wide range."""
    one = 1.0
    ulp = 2.0 ** -7  # bf16's spacing at 1
    specials = [one + ulp / 2, one + 3 * ulp / 2, -(one + ulp / 2), one + ulp / 2 + 2 ** -20, 2 - ulp / 2,
                3.4028234663852886e38, -3.4028234663852886e38, 1e-40, -3e-39, 0.0, -0.0,
                float("inf"), float("-inf"), float("nan")]
    g = torch.Generator().manual_seed(3)
    rand = torch.randn(200, generator=g) * torch.exp2(torch.randint(-60, 60, (200,), generator=g).float())
    low_payload_nan = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)  # rounds to inf if added to
    return torch.cat([torch.tensor(specials, dtype=torch.float32), low_payload_nan, rand])


def test_bf16_casts_round_to_nearest_even_as_a_gpu_does():
    x = _bf16_specials()
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    _bf16_cast[(1,)](x, out, x.numel(), SRC_BF16=False, RTZ=False, BLOCK=256)
    finite = ~torch.isnan(x)
    # torch's CPU cast is round-to-nearest-even too (cvt.rn.bf16.f32 on a GPU): the same bits
    assert torch.equal(out[finite].view(torch.int16), x[finite].bfloat16().view(torch.int16))
    assert torch.isnan(out[~finite]).all()
    # from fp16: by value, not by reinterpreting the 16 bits (fp16 -> bf16 is exact-then-rounded)
    h = (torch.randn(256) * 50).half()
    out = torch.empty(256, dtype=torch.bfloat16)
    _bf16_cast[(1,)](h, out, 256, SRC_BF16=False, RTZ=False, BLOCK=256)
    assert torch.equal(out.view(torch.int16), h.float().bfloat16().view(torch.int16))
    # round toward zero when asked: the top 16 bits
    out = torch.empty(x.numel(), dtype=torch.bfloat16)
    _bf16_cast[(1,)](x, out, x.numel(), SRC_BF16=False, RTZ=True, BLOCK=256)
    truncated = (x[finite].view(torch.int32) >> 16).to(torch.int16)
    assert torch.equal(out[finite].view(torch.int16), truncated)
    assert not torch.equal(out[finite], x[finite].bfloat16())  # the halfway cases above differ


@pytest.mark.parametrize("target", [torch.float32, torch.float16, torch.int32], ids=str)
def test_bf16_casts_out_are_by_value(target):
    x = (torch.randn(256, generator=torch.Generator().manual_seed(4)) * 300).bfloat16()
    out = torch.empty(256, dtype=target)
    _bf16_cast[(1,)](x, out, 256, SRC_BF16=True, RTZ=False, BLOCK=256)
    assert torch.equal(out, x.to(target))  # exact to fp32; rounded to fp16; truncated toward zero to int


@triton.jit
def _bf16_ops(a_ptr, b_ptr, c_ptr, out_ptr, lt_ptr, eq_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a, b, c = tl.load(a_ptr + r), tl.load(b_ptr + r), tl.load(c_ptr + r)
    tl.store(out_ptr + 0 * N + r, a + b * 2.0)
    tl.store(out_ptr + 1 * N + r, a * b - c)
    tl.store(out_ptr + 2 * N + r, a / b)
    tl.store(out_ptr + 3 * N + r, tl.maximum(a, b))
    tl.store(out_ptr + 4 * N + r, tl.fma(a, b, c))
    tl.store(out_ptr + 5 * N + r, tl.clamp(a, c - 1.0, c + 1.0))
    tl.store(out_ptr + 6 * N + r, a * 0.1)  # a bf16 constant: 0.1 rounded to nearest (up, here)
    tl.store(lt_ptr + r, (a < b).to(tl.int32))
    tl.store(eq_ptr + r, (a == c).to(tl.int32))


def test_bf16_arithmetic_and_comparisons_are_by_value():
    """The interpreter computed on the bit patterns (negative numbers compare backwards as integers);
    here each op is done in fp32 and rounded once to bf16, as torch's CPU bf16 ops and a GPU do."""
    g = torch.Generator().manual_seed(5)
    a, b, c = ((torch.randn(64, generator=g) * 4).bfloat16() for _ in range(3))
    c[::4] = a[::4]  # some equal pairs
    out = torch.empty(7, 64, dtype=torch.bfloat16)
    lt, eq = torch.empty(64, dtype=torch.int32), torch.empty(64, dtype=torch.int32)
    _bf16_ops[(1,)](a, b, c, out, lt, eq, N=64)
    f = lambda t: t.float()  # noqa: E731
    expected = [f(a) + f(b) * 2, f(a) * f(b) - f(c), f(a) / f(b), torch.maximum(f(a), f(b)),
                f(a) * f(b) + f(c), torch.clamp(f(a), f(c) - 1, f(c) + 1), f(a) * f(torch.tensor(0.1).bfloat16())]
    for i, want in enumerate(expected):
        if i == 1:  # a * b rounded to bf16 first, then - c rounded again: two bf16 ops
            want = (f((f(a) * f(b)).bfloat16()) - f(c))
        assert torch.equal(out[i], want.bfloat16()), i
    assert torch.equal(lt, (a < b).int()) and torch.equal(eq, (a == c).int())
    assert (a < 0).any() and (b < 0).any() and eq.sum() >= 16


@triton.jit
def _bf16_sum(x_ptr, out_ptr):
    r = tl.arange(0, 16)
    tl.store(out_ptr, tl.sum(tl.load(x_ptr + r), 0))


def test_bf16_reductions_are_refused():
    """A GPU adds a bf16 tl.sum in bf16, in its own order: not modelled, so a loud error rather than an
    answer the GPU would not give (kernels upcast after tl.load)."""
    with pytest.raises(Exception, match="reduction over bf16 is not modelled"):
        _bf16_sum[(1,)](torch.ones(16, dtype=torch.bfloat16), torch.empty(1, dtype=torch.bfloat16))


def test_bf16_dot_is_exact_products_fp32_sums(monkeypatch):
    """A bf16 MMA: the products of the bf16 values, summed in fp32. The stock interpreter's product of
    the bit patterns is off by orders of magnitude, and the library's probe (which decides whether bf16
    CPU tensors may take the Triton kernels) notices it."""
    from triton.runtime.interpreter import InterpreterBuilder

    from fastbert.kernels import _interpreter_probe
    g = torch.Generator().manual_seed(6)
    a, b = (torch.randn(16, 16, generator=g).bfloat16() for _ in range(2))
    exact = a.double() @ b.double()
    bound = 16 * 2.0 ** -24 * (a.double().abs() @ b.double().abs())  # fp32 accumulation of 16 terms
    c = torch.empty(16, 16)
    _dot[(1,)](a, b, c, PRECISION="tf32")
    assert ((c.double() - exact).abs() <= bound).all()
    monkeypatch.setattr(_interpreter_probe, "_verdict", None)
    assert _interpreter_probe.interpreter_computes_bf16_dots()
    monkeypatch.setattr(InterpreterBuilder, "create_dot", InterpreterBuilder.create_dot.__wrapped__)
    _dot[(1,)](a, b, c, PRECISION="tf32")
    assert (c.double() - exact).abs().max() > 1e3
    monkeypatch.setattr(_interpreter_probe, "_verdict", None)
    assert not _interpreter_probe.interpreter_computes_bf16_dots()
