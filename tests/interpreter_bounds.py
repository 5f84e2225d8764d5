"""Bounds checking for Triton's interpreter (which has none).

The interpreter runs kernels on the tensors' own CPU memory, so an out-of-range store silently
corrupts the Python process's heap; the damage shows up later, elsewhere, as a random C++
bad_alloc or length_error. This hook records the memory of every tensor argument of a launch and
checks every unmasked lane of every load and store against it, raising at the faulty access.

Also ``interpreted``: the mark for tests that send CPU tensors through the Triton kernels, which
needs the interpreter; a GPU run (FASTBERT_TEST_GPU=1) leaves it off and skips them, its kernel
tests covering the compiled path. And ``BF16``: torch.bfloat16 as a dtype parameter, run on a GPU
and in the interpreter when tests/interpreter_gpu_like.py computes bf16 (Triton's own interpreter
does not; FASTBERT_GPU_LIKE=0 turns that module off).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastbert.kernels._dispatch import _interpret_flag

# As Triton reads the flag ("false" or "2" is off): conftest has set it before this import.
INTERPRETED = _interpret_flag()
interpreted = pytest.mark.skipif(not INTERPRETED, reason="CPU tensors through the Triton kernels need TRITON_INTERPRET=1")
BF16_COMPUTED = not INTERPRETED or os.environ.get("FASTBERT_GPU_LIKE", "1") != "0"
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not BF16_COMPUTED, reason="Triton's own interpreter computes bf16 wrongly (tests/interpreter_gpu_like.py fixes it)"))


def install():
    from triton.runtime import interpreter as I

    builder_cls, executor_cls = I.InterpreterBuilder, I.GridExecutor
    if getattr(builder_cls, "_fastbert_bounds", False):
        return
    ranges = {"starts": np.zeros(0, np.uint64), "ends": np.zeros(0, np.uint64), "kernel": "?"}

    original_init = executor_cls._init_args_hst

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = original_init(self, args_dev, kwargs)
        spans = []

        def visit(arg):
            if isinstance(arg, tuple):
                for a in arg:
                    visit(a)
            elif hasattr(arg, "untyped_storage"):
                storage = arg.untyped_storage()
                spans.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))

        for a in list(args_hst) + list(kwargs_hst.values()):
            visit(a)
        spans.sort()
        ranges["starts"] = np.array([s for s, _ in spans], dtype=np.uint64)
        ranges["ends"] = np.array([e for _, e in spans], dtype=np.uint64)
        ranges["kernel"] = getattr(self.fn, "__name__", "?")
        return args_hst, kwargs_hst

    def check(ptrs, mask, what):
        if ranges["starts"].size == 0:
            return
        addr = np.asarray(ptrs.data).astype(np.uint64, copy=False)
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        addr = addr[live]
        if addr.size == 0:
            return
        size = np.uint64(np.dtype(I._get_np_dtype(ptrs.get_element_ty())).itemsize)
        idx = np.searchsorted(ranges["starts"], addr, side="right") - 1
        ok = idx >= 0
        ok[ok] = addr[ok] + size <= ranges["ends"][idx[ok]]
        if not ok.all():
            bad = addr[~ok][:4]
            raise AssertionError(f"Triton kernel {ranges['kernel']}: out-of-bounds {what} at {bad.size}+ lanes "
                                 f"(first addresses {[hex(int(b)) for b in bad]}); tensor argument ranges "
                                 f"{[(hex(int(s)), int(e - s)) for s, e in zip(ranges['starts'], ranges['ends'])]}")

    original_load, original_store = builder_cls.create_masked_load, builder_cls.create_masked_store

    def create_masked_load(self, ptrs, mask, other, *args):
        check(ptrs, mask, "load")
        return original_load(self, ptrs, mask, other, *args)

    def create_masked_store(self, ptrs, value, mask, *args):
        check(ptrs, mask, "store")
        return original_store(self, ptrs, value, mask, *args)

    executor_cls._init_args_hst = init_args_hst
    builder_cls.create_masked_load = create_masked_load
    builder_cls.create_masked_store = create_masked_store
    builder_cls._fastbert_bounds = True
