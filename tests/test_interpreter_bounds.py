"""The interpreter bounds check (tests/interpreter_bounds.py) itself: it must catch an
out-of-range load and store, and let masked-off lanes through."""
import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") in (None, "", "0")
                                or os.environ.get("FASTBERT_CHECK_BOUNDS", "1") == "0",
                                reason="checks the interpreter's bounds hook")


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)
    else:
        tl.store(dst + offs, tl.load(src + offs))


def test_masked_access_in_range_passes():
    src, dst = torch.arange(10.0), torch.zeros(10)
    _copy[(1,)](src, dst, 10, BLOCK=16, MASKED=True)
    assert torch.equal(src, dst)


def test_out_of_range_access_is_caught():
    src, dst = torch.arange(10.0), torch.zeros(10)
    with pytest.raises(Exception, match="out-of-bounds"):
        _copy[(1,)](src, dst, 10, BLOCK=16, MASKED=False)
