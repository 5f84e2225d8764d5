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

# Mallocs a 48 MB block and reports how glibc served it: from an mmap of its own (hblkhd grows) or
# from the heap (arena grows, by the block plus M_TOP_PAD), and how much of that growth the heap still
# holds after the free (M_TRIM_THRESHOLD). Plain malloc/free with nothing allocated in between, so the
# block sits at the heap top, where a trim would take it.
_PROBE = r"""
import ctypes, json, sys
from fastbert import runtime
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = runtime.tune_cpu_allocator() if sys.argv[1] == "tune" else None
before = libc.mallinfo2()
block = libc.malloc(48 << 20)  # above glibc's default mmap threshold (at most 32 MB)
during = libc.mallinfo2()
libc.free(block)
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
    assert tuned["mmapped_mb"] == 0
    # from the heap, grown by the block and M_TOP_PAD's 64 MB (less a page or two of the heap's own
    # bookkeeping: the MB are rounded down); glibc's default would grow it by the block alone
    assert tuned["heap_growth_mb"] >= 48 + 64 - 2
    # freed at the heap top but not trimmed (glibc trims once 128 KB is free there by default):
    # the next step's block needs no new pages
    assert tuned["heap_kept_mb"] == tuned["heap_growth_mb"]


@pytest.mark.skipif(not PROBES, reason="the probes need glibc >= 2.35 (mallinfo2, uncapped mmap threshold)")
def test_allocator_tuning_opt_out():
    res = _probe("tune", FASTBERT_MALLOC_TUNING="0")
    assert res["applied"] is None
    assert res["mmapped_mb"] >= 48  # glibc's defaults untouched


class FakeGlibc:
    """Records mallopt calls; ``accept(code, value)`` says whether glibc would take a setting."""
    def __init__(self, accept=lambda code, value: True):
        self.calls, self.accept = [], accept

    def mallopt(self, code, value):
        self.calls.append((code.value, value.value))
        return 1 if self.accept(code.value, value.value) else 0


@pytest.fixture
def fresh_runtime(monkeypatch):
    """tune_cpu_allocator as in a fresh process (its first call's settings are kept per process)."""
    monkeypatch.setattr(runtime, "_allocator_tuning", None)
    monkeypatch.delenv("FASTBERT_MALLOC_TUNING", raising=False)
    return monkeypatch


def test_allocator_tuning_checks_every_value_before_applying_any(fresh_runtime):
    libc = FakeGlibc()
    fresh_runtime.setattr(runtime, "_glibc", lambda: libc)
    with pytest.raises(ValueError, match="top_pad"):  # the last one checked
        runtime.tune_cpu_allocator(top_pad=1 << 31)
    assert libc.calls == [] and runtime._allocator_tuning is None
    assert runtime.tune_cpu_allocator() == {"mmap_threshold": 1 << 30, "trim_threshold": (1 << 31) - 1,
                                            "top_pad": 64 << 20}
    assert sorted(libc.calls) == sorted([(runtime._M_MMAP_THRESHOLD, 1 << 30),
                                         (runtime._M_TRIM_THRESHOLD, (1 << 31) - 1), (runtime._M_TOP_PAD, 64 << 20)])


def test_an_older_glibc_gets_the_32_mb_mmap_cap(fresh_runtime):
    libc = FakeGlibc(lambda code, value: code != runtime._M_MMAP_THRESHOLD or value <= 32 << 20)
    fresh_runtime.setattr(runtime, "_glibc", lambda: libc)
    assert runtime.tune_cpu_allocator()["mmap_threshold"] == 32 << 20
    assert runtime.apply_malloc_flag(True) == "tuned"


def test_settings_glibc_rejects_are_reported_and_not_labelled_tuned(fresh_runtime, capsys):
    fresh_runtime.setattr(runtime, "_glibc", lambda: FakeGlibc(lambda code, value: False))
    with pytest.warns(UserWarning, match="glibc rejected") as caught:
        assert runtime.apply_malloc_flag(True) == "glibc-default"
    assert len(caught) == 3
    assert runtime._allocator_tuning == {"mmap_threshold": None, "trim_threshold": None, "top_pad": None}
    assert "glibc rejected every setting" in capsys.readouterr().err


def test_no_glibc_means_nothing_to_tune(fresh_runtime, capsys):
    fresh_runtime.setattr(runtime, "_glibc", lambda: None)
    assert runtime.tune_cpu_allocator() is None
    assert runtime.apply_malloc_flag(True) == "glibc-default"
    assert "not applied" in capsys.readouterr().err


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
