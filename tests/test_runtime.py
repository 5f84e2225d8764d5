"""fastbert.runtime: the glibc malloc tuning the commands apply, checked by where glibc actually puts
a large block (mallinfo2), each case in a fresh interpreter since the setting is process-wide."""
import json
import os
import platform
import subprocess
import sys

import pytest

from fastbert import runtime

IS_GLIBC = platform.libc_ver()[0] == "glibc"
# The probes read mallinfo2 (glibc 2.33+) and expect the 1 GiB mmap threshold to be taken as asked
# (older glibc caps it at 32 MB, where tune_cpu_allocator falls back to the cap).
PROBES = IS_GLIBC and tuple(map(int, platform.libc_ver()[1].split(".")[:2])) >= (2, 35)

# Allocates a 48 MB tensor and reports how glibc served it: from an mmap of its own (hblkhd grows)
# or from the heap (arena grows), and whether the heap still holds it after the free.
_PROBE = r"""
import ctypes, json, sys
import torch
from fastbert import runtime
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = runtime.tune_cpu_allocator() if sys.argv[1] == "tune" else None
before = libc.mallinfo2()
x = torch.ones(12 << 20)  # 48 MB: above glibc's default mmap threshold (at most 32 MB)
during = libc.mallinfo2()
del x
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "again": runtime.tune_cpu_allocator() if applied else None,
                  "mmapped_mb": (during.hblkhd - before.hblkhd) >> 20,
                  "heap_growth_mb": (during.arena - before.arena) >> 20,
                  "heap_kept_mb": (after.arena - before.arena) >> 20}))
"""


def _probe(mode, **env):
    base = {k: v for k, v in os.environ.items() if k != "FASTBERT_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={**base, **env}, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not PROBES, reason="the probes need glibc >= 2.35 (mallinfo2, uncapped mmap threshold)")
def test_tuned_allocator_serves_large_blocks_from_the_heap_and_keeps_them():
    untuned = _probe("plain")
    assert untuned["mmapped_mb"] >= 48 and untuned["heap_growth_mb"] < 48  # glibc's default: its own mmap

    tuned = _probe("tune")
    assert tuned["applied"] == {"mmap_threshold": 1 << 30, "trim_threshold": (1 << 31) - 1, "top_pad": 64 << 20}
    assert tuned["again"] == tuned["applied"]  # idempotent
    assert tuned["mmapped_mb"] == 0 and tuned["heap_growth_mb"] >= 48
    assert tuned["heap_kept_mb"] >= 48  # freed, but not trimmed: the next step's block needs no new pages


@pytest.mark.skipif(not PROBES, reason="the probes need glibc >= 2.35 (mallinfo2, uncapped mmap threshold)")
def test_allocator_tuning_opt_out():
    res = _probe("tune", FASTBERT_MALLOC_TUNING="0")
    assert res["applied"] is None
    assert res["mmapped_mb"] >= 48  # glibc's defaults untouched


def test_allocator_tuning_rejects_values_mallopt_cannot_take(monkeypatch):
    monkeypatch.setattr(runtime, "_allocator_tuning", None)  # as in a fresh process
    monkeypatch.delenv("FASTBERT_MALLOC_TUNING", raising=False)
    if not IS_GLIBC:  # nothing to tune, so nothing is checked or applied
        assert runtime.tune_cpu_allocator(mmap_threshold=1 << 31) is None
        return
    with pytest.raises(ValueError, match="mmap_threshold"):
        runtime.tune_cpu_allocator(mmap_threshold=1 << 31)
    assert runtime._allocator_tuning is None  # nothing recorded as applied


def test_malloc_flag_label(monkeypatch, capsys):
    """--tuned-malloc's label is what ran: "tuned" only where the settings were applied."""
    monkeypatch.setattr(runtime, "_allocator_tuning", None)
    monkeypatch.setenv("FASTBERT_MALLOC_TUNING", "0")
    assert runtime.apply_malloc_flag(False) == "glibc-default"
    assert capsys.readouterr().err == ""
    assert runtime.apply_malloc_flag(True) == "glibc-default"  # asked for, but opted out
    assert "not applied" in capsys.readouterr().err
    assert runtime._allocator_tuning is None
    if IS_GLIBC:  # applied for real only in a fresh interpreter: the setting is process-wide
        base = {k: v for k, v in os.environ.items() if k != "FASTBERT_MALLOC_TUNING"}
        out = subprocess.run([sys.executable, "-c", "from fastbert import runtime; print(runtime.apply_malloc_flag(True))"],
                             capture_output=True, text=True, check=True, env=base, timeout=120)
        assert out.stdout.split() == ["tuned"]
