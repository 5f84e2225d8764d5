"""Make Triton's interpreter compute as a GPU does where the two differ, so CI sees those slips.

The interpreter evaluates a kernel with numpy: exactly rounded transcendentals, IEEE division, fp32
`tl.dot` in full fp32 whatever the input precision, and zeros in the masked-off lanes of a load
that gives no `other=`. A compiled kernel on an NVIDIA GPU does none of that, and a kernel whose
accuracy or correctness leans on the interpreter's behaviour passes CI and fails on the device. (A
mutation audit found three such slips that every CPU test let through: a dropped Newton step after
`rsqrt`, a `dy` load without `other=0` summed into a bias gradient, an fp32 `tl.dot` left at tf32.)

What `install()` changes, each to what a GPU is documented to do, never better:

- a masked load without `other=` returns NaN in the masked lanes (the largest value for integers):
  on a GPU those lanes hold whatever the registers held;
- fp32 `tl.dot` at tf32 input precision (Triton's default for fp32) keeps 10 mantissa bits of each
  operand, as the tensor cores read them; `input_precision="ieee"` (and tf32x3) stay fp32;
- the fp32 results of `exp`, `exp2`, `log`, `log2`, `sqrt`, `rsqrt`, `erf` and `/` are off by
  2**-22 relative (two fp32 ulps), with the sign alternating element by element so that a ratio or
  a normalisation cannot cancel it. Compiled for sm_90 by Triton 3.6, exp / exp2 / sqrt / rsqrt
  are `ex2` / `sqrt` / `rsqrt.approx` and `/` is `div.full.f32` (the PTX ISA bounds them at about
  two ulps), log / log2 / erf inline libdevice's polynomials (within two ulps); `tl.exp` also goes
  through base 2 with the argument rounded to fp32 first (x * log2(e), then ex2), as it is
  lowered. The IEEE spellings (`tl.sqrt_rn`, `tl.div_rn`) stay exact;
- `tl.minimum` / `tl.maximum` without `propagate_nan=ALL` return the operand that is not NaN, as
  PTX min.f32 / max.f32 do (numpy's minimum / maximum propagate it; reductions already ignore NaN);
- the programs of a launch run last to first: a GPU runs them in no promised order (and many at
  once), so a kernel that reads what an earlier program of the same launch wrote must not pass
  because the interpreter happens to run them in order;
- bf16 is computed, not mangled: the interpreter keeps bf16 as its uint16 bit patterns, and its
  casts to bf16 truncated (from fp16 they reinterpreted the bits), its `tl.dot` multiplied the bit
  patterns as integers, and its arithmetic and comparisons treated them as integers too. Here casts
  round to nearest even as `cvt.rn.bf16.f32` does (`fp_downcast_rounding="rtz"` truncates), a bf16
  `tl.dot` takes the exact values with fp32 accumulation as a bf16 MMA does, and element-wise
  arithmetic, comparisons, fma and clamp go through fp32 and are rounded once to bf16. A `tl.sum`
  (or other reduction or scan left in bf16) raises: a GPU adds in bf16 in an order not modelled
  here (kernels upcast after `tl.load`; tl.max / tl.cumsum upcast by themselves);
- fresh memory is garbage: `torch.empty`, `empty_like`, `empty_strided` and `Tensor.new_empty` on
  the CPU return NaN (integers: their max) instead of whatever the allocator handed back, which on
  the CPU is often zeros; a kernel or launcher that leaves part of an output unwritten, or reads a
  buffer before writing it, then fails here as it would on a GPU's recycled memory.

Deterministic: the sign pattern depends only on the element's position, so a test's result does
not depend on what ran before it.
"""
from __future__ import annotations

import numpy as np

REL = np.float32(2.0 ** -22)
LOG2E = np.float32(1.4426950408889634)


_FACTORS: dict = {}  # block shape -> its ±2^-22 factor array


def _perturbed(x):
    """x * (1 ± 2^-22), the sign alternating by flat position; only fp32 arrays (fp64 is exact on a
    GPU too, and the 16-bit types are computed in fp32 by the kernels before they are rounded)."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        return x
    factor = _FACTORS.get(x.shape)
    if factor is None:  # kernels reuse a handful of block shapes: build each factor array once
        factor = _FACTORS[x.shape] = np.where(np.arange(x.size).reshape(x.shape) % 2 == 0,
                                              1 + REL, 1 - REL).astype(np.float32)
    return x * factor


def _tf32(x):
    """The top 19 bits of an fp32 value (sign, exponent, 10 mantissa bits): what a tf32 MMA reads."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _bf16_to_f32(bits):
    """bf16 bit patterns (the interpreter keeps bf16 as uint16) as the fp32 values they are: exact."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _f32_to_bf16(x):
    """fp32 values rounded to bf16 bit patterns to nearest, ties to even, as cvt.rn.bf16.f32 does
    (overflow goes to inf; NaN stays a quiet NaN of the same sign)."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)  # uint64: adding the rounding bias must not wrap
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), ((bits >> 16) | 0x40).astype(np.uint16), rounded)


def _garbage(factory):
    import torch

    def empty(*args, **kwargs):
        t = factory(*args, **kwargs)
        if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
            with torch.no_grad():
                if t.is_floating_point() or t.is_complex():
                    t.fill_(float("nan"))
                elif t.dtype != torch.bool:
                    t.fill_(torch.iinfo(t.dtype).max)
        return t
    empty.__wrapped__ = factory
    return empty


def install():
    import torch
    from triton.runtime import interpreter as I

    B = I.InterpreterBuilder
    if getattr(B, "_fastbert_gpu_like", False):  # one flag for both the torch and the Triton patches
        return
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch, "empty_strided"), (torch.Tensor, "new_empty")):
        setattr(owner, name, _garbage(getattr(owner, name)))
    TensorHandle = I.TensorHandle

    original_load = B.create_masked_load

    def create_masked_load(self, ptrs, mask, other, *args):
        if other is None:
            dtype = np.dtype(I._get_np_dtype(ptrs.get_element_ty()))
            if np.issubdtype(dtype, np.floating):
                fill = np.nan
            elif np.issubdtype(dtype, np.integer):
                fill = np.iinfo(dtype).max
            else:  # bool: no value is "garbage" for a predicate
                fill = 0
            other = TensorHandle(np.full(np.shape(ptrs.data), fill, dtype=dtype), ptrs.get_element_ty())
        return original_load(self, ptrs, mask, other, *args)

    # bf16 (the module docstring says what the interpreter got wrong): values through fp32, rounded
    # back once to nearest even.
    BF16, FP32 = I.tl.bfloat16, I.tl.float32

    def as_f32(h):
        return TensorHandle(_bf16_to_f32(h.data), FP32) if h.dtype.scalar == BF16 else h

    original_cast = B.cast_impl

    def cast_impl(self, src, dst_type):
        source, target = src.dtype.scalar, dst_type.scalar
        if BF16 not in (source, target) or source == target:
            return original_cast(self, src, dst_type)
        value = as_f32(src).data
        if target == BF16:
            return TensorHandle(_f32_to_bf16(value.astype(np.float32)), BF16)
        return TensorHandle(value.astype(I._get_np_dtype(target)), target)

    original_fp_to_fp = B.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == BF16 and src.dtype.scalar == FP32 and "RTZ" in str(rounding_mode):
            bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)
            return TensorHandle(np.where(np.isnan(src.data), (bits >> 16) | 0x40, bits >> 16).astype(np.uint16), BF16)
        if BF16 in (src.dtype.scalar, dst_type.scalar):
            return cast_impl(self, src, dst_type)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    original_binary = B.binary_op

    def binary_op(self, lhs, rhs, op):
        if lhs.dtype.scalar != BF16:
            return original_binary(self, lhs, rhs, op)
        out = op(as_f32(lhs).data, as_f32(rhs).data)
        if out.dtype == np.bool_:  # a comparison
            return TensorHandle(out, I.tl.int1)
        return TensorHandle(_f32_to_bf16(out), BF16)

    def through_f32(original):
        def create(self, *args):
            if not any(isinstance(a, TensorHandle) and a.dtype.scalar == BF16 for a in args):
                return original(self, *args)
            out = original(self, *[as_f32(a) if isinstance(a, TensorHandle) else a for a in args])
            return TensorHandle(_f32_to_bf16(out.data), BF16)
        return create

    def no_bf16(original, what):
        def apply_impl(self, input):
            if any(t.dtype.scalar == BF16 for t in input):
                raise NotImplementedError(f"interpreter_gpu_like: a {what} over bf16 is not modelled (its rounding "
                                          "order is the GPU's); upcast to fp32 after tl.load")
            return original(self, input)
        return apply_impl

    original_dot = B.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        precision = str(input_precision).upper()
        if "TF32" in precision and "X3" not in precision and a.data.dtype == np.float32 and b.data.dtype == np.float32:
            a, b = TensorHandle(_tf32(a.data), a.dtype), TensorHandle(_tf32(b.data), b.dtype)
        a, b = as_f32(a), as_f32(b)  # a bf16 MMA: exact products, fp32 accumulation
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
    create_dot.__wrapped__ = original_dot  # the stock product, for the test that the library notices it

    def approximate(original):
        """The interpreter's op with its fp32 result off by 2^-22 (the module docstring says why)."""
        def create(self, *args):
            exact = original(self, *args)
            return TensorHandle(_perturbed(exact.data), exact.dtype)
        return create

    original_exp = B.create_exp

    def exp_through_base2(self, arg):
        if arg.data.dtype != np.float32:
            return original_exp(self, arg)
        return TensorHandle(np.exp2((arg.data * LOG2E).astype(np.float32)), arg.dtype.scalar)

    original_set_grid_idx = B.set_grid_idx

    def set_grid_idx(self, x, y, z):
        # the executor walks x, y, z upward; each program sees its mirror image: last to first
        gx, gy, gz = self.grid_dim
        original_set_grid_idx(self, gx - 1 - x, gy - 1 - y, gz - 1 - z)

    B.create_masked_load = create_masked_load
    B.create_dot = create_dot
    for name in ("create_exp2", "create_log", "create_log2", "create_sqrt", "create_rsqrt", "create_erf",
                 "create_fdiv"):
        setattr(B, name, approximate(getattr(B, name)))
    B.create_exp = approximate(exp_through_base2)
    B.get_bf16 = lambda self, value: TensorHandle(_f32_to_bf16(np.array([value], dtype=np.float32)), BF16)
    B.cast_impl = cast_impl
    B.create_fp_to_fp = create_fp_to_fp
    B.binary_op = binary_op
    for name in ("create_fma", "create_clampf"):  # Triton's math functions refuse bf16 themselves
        setattr(B, name, through_f32(getattr(B, name)))
    I.ReduceOps.apply_impl = no_bf16(I.ReduceOps.apply_impl, "reduction")
    I.ScanOps.apply_impl = no_bf16(I.ScanOps.apply_impl, "scan")
    B.set_grid_idx = set_grid_idx
    B.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin)
    B.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax)
    B._fastbert_gpu_like = True
