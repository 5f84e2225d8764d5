"""fastbert.runtime: the glibc malloc tuning the commands apply, checked by where glibc actually puts
a large block (mallinfo2), each case in a fresh interpreter since the setting is process-wide; and the
--device / --precision / --cuda-graphs choices, with torch.cuda's answers faked where a GPU is asked about."""
import argparse
import io
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

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


# ------------------------------------------------------------------ --device, --precision, graphs (no GPU needed)


def _fake_gpus(monkeypatch, count, current=0, bf16=True):
    """torch.cuda as a machine with `count` GPUs (the current one `current`) reports it: resolve_device and
    resolve_precision read only these, so their choices are checked on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_resolve_device_names_and_refusals(monkeypatch):
    """--device: cpu (any index: the CPU is one device), cuda = the current GPU, cuda:N = GPU N if it
    is there; anything else, or a GPU that is not there, a ValueError that says which."""
    assert runtime.resolve_device("cpu") == runtime.resolve_device("cpu:0") == torch.device("cpu")
    assert runtime.resolve_device("cpu:0").index is None
    with pytest.raises(ValueError, match="only cpu and cuda devices are supported"):
        runtime.resolve_device("meta")
    with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
        runtime.resolve_device("gpu0")
    _fake_gpus(monkeypatch, 0)
    assert runtime.resolve_device(None) == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            runtime.resolve_device(name)
    _fake_gpus(monkeypatch, 2, current=1)
    assert runtime.resolve_device(None) == runtime.resolve_device("cuda") == torch.device("cuda", 1)
    assert runtime.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cuda:2: only 2 GPU\(s\) visible"):
        runtime.resolve_device("cuda:2")


def test_resolve_precision_on_each_device(monkeypatch):
    """auto: bf16 on a CUDA GPU with bf16, else fp32 (always fp32 on the CPU); an explicit choice stands,
    except fp16 on the CPU; an unknown name is refused with the choices."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    _fake_gpus(monkeypatch, 1, bf16=True)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_precision("auto", gpu) == "bf16"
    assert [runtime.resolve_precision(p, cpu) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert [runtime.resolve_precision(p, gpu) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        runtime.resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="'fp64': expected one of auto, fp32, bf16, fp16"):
        runtime.resolve_precision("fp64", gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100, a T4
    assert runtime.resolve_precision("auto", gpu) == "fp32"


def test_autocast_context_dtype_and_grad_scaler():
    """bf16 / fp16 mean autocast in that dtype on the given device, fp32 no autocast; only fp16 gets a
    GradScaler (bf16 has fp32's exponent range)."""
    cpu = torch.device("cpu")
    assert [runtime.autocast_dtype(p) for p in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]
    with runtime.autocast("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    with runtime.autocast("fp32", cpu):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32
    assert runtime.grad_scaler("fp32", cpu) is None and runtime.grad_scaler("bf16", cpu) is None
    assert isinstance(runtime.grad_scaler("fp16", cpu), torch.amp.GradScaler)


def test_device_and_graphs_arguments():
    """--precision defaults to auto and takes only its four names; --cuda-graphs defaults to auto and
    the bare flag means on."""
    p = argparse.ArgumentParser()
    runtime.add_device_arguments(p)
    runtime.add_cuda_graphs_argument(p, "replays the step")
    args = p.parse_args([])
    assert (args.device, args.precision, args.cuda_graphs) == (None, "auto", "auto")
    args = p.parse_args(["--device", "cuda:1", "--precision", "fp16", "--cuda-graphs"])
    assert (args.device, args.precision, args.cuda_graphs) == ("cuda:1", "fp16", "on")
    assert p.parse_args(["--cuda-graphs", "off"]).cuda_graphs == "off"
    with pytest.raises(SystemExit):
        p.parse_args(["--precision", "fp64"])


def test_count_synchronize_and_describe(monkeypatch):
    assert [runtime.count(n, "step") for n in (0, 1, 2, 2048)] == ["0 steps", "1 step", "2 steps", "2,048 steps"]
    assert runtime.count(3, "batch", "batches") == "3 batches"
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    runtime.synchronize(torch.device("cpu"))
    assert synced == []
    runtime.synchronize(torch.device("cuda", 1))
    assert synced == [torch.device("cuda", 1)]
    torch.set_num_threads(3)  # (conftest restores the thread count)
    assert runtime.describe(torch.device("cpu")) == "cpu (3 threads)"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA FAKE")
    assert runtime.describe(torch.device("cuda", 0)) == "cuda:0 (NVIDIA FAKE)"


def test_cpu_model_reads_proc_cpuinfo(monkeypatch):
    """The model name line of /proc/cpuinfo, stripped; without that file, platform's processor or machine."""
    cpuinfo = "processor\t: 0\nvendor_id\t: FakeVendor\nmodel name\t: Fake CPU 9000 @ 2.00GHz  \nflags\t: fpu\n"
    monkeypatch.setattr(runtime, "open", lambda path, *a, **k: io.StringIO(cpuinfo) if path == "/proc/cpuinfo"
                        else open(path, *a, **k), raising=False)
    assert runtime.cpu_model() == "Fake CPU 9000 @ 2.00GHz"

    def missing(path, *a, **k):
        raise FileNotFoundError(path)
    monkeypatch.setattr(runtime, "open", missing, raising=False)
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "fakearch64")
    assert runtime.cpu_model() == "fakearch64"


def test_allocator_tuning_is_kept_from_the_first_call(fresh_runtime):
    """A second call (other arguments included) applies nothing and returns the first call's settings; a
    caller changing the returned dict changes nothing kept. 0 is a value mallopt takes."""
    libc = FakeGlibc()
    fresh_runtime.setattr(runtime, "_glibc", lambda: libc)
    with pytest.raises(ValueError, match="mmap_threshold=-1 must fit a C int"):
        runtime.tune_cpu_allocator(mmap_threshold=-1)
    first = runtime.tune_cpu_allocator(mmap_threshold=1 << 20, trim_threshold=0, top_pad=0)
    assert first == {"mmap_threshold": 1 << 20, "trim_threshold": 0, "top_pad": 0}
    assert sorted(libc.calls) == sorted([(runtime._M_MMAP_THRESHOLD, 1 << 20), (runtime._M_TRIM_THRESHOLD, 0),
                                         (runtime._M_TOP_PAD, 0)])
    first["top_pad"] = 123
    again = runtime.tune_cpu_allocator(top_pad=5 << 20)
    assert again == {"mmap_threshold": 1 << 20, "trim_threshold": 0, "top_pad": 0}
    again["mmap_threshold"] = 7
    assert len(libc.calls) == 3 and runtime.tune_cpu_allocator()["mmap_threshold"] == 1 << 20


def test_a_setting_glibc_rejects_alone_is_left_at_its_default(fresh_runtime, capsys):
    """Only the mmap threshold falls back to the 32 MB cap; another rejected setting is None (with a
    warning) and the rest stay applied, which is still "tuned"."""
    libc = FakeGlibc(lambda code, value: code != runtime._M_TRIM_THRESHOLD)
    fresh_runtime.setattr(runtime, "_glibc", lambda: libc)
    with pytest.warns(UserWarning, match=r"glibc rejected trim_threshold=2147483647") as caught:
        assert runtime.apply_malloc_flag(True) == "tuned"
    assert len(caught) == 1 and capsys.readouterr().err == ""
    assert runtime._allocator_tuning == {"mmap_threshold": 1 << 30, "trim_threshold": None, "top_pad": 64 << 20}
    assert sorted(libc.calls) == sorted([(runtime._M_MMAP_THRESHOLD, 1 << 30),
                                         (runtime._M_TRIM_THRESHOLD, (1 << 31) - 1), (runtime._M_TOP_PAD, 64 << 20)])


@pytest.mark.parametrize("text,default,expected", [
    (None, True, True), (None, False, False), ("", False, False), ("  ", True, True),
    ("1", False, True), ("On", False, True), ("TRUE", False, True), ("yes", False, True),
    ("0", True, False), ("off", True, False), ("False", True, False), (" no ", True, False),
])
def test_env_switch_reads_the_usual_spellings(monkeypatch, text, default, expected):
    if text is None:
        monkeypatch.delenv("FASTBERT_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("FASTBERT_TEST_SWITCH", text)
    assert runtime.env_switch("FASTBERT_TEST_SWITCH", default) is expected


@pytest.mark.parametrize("text", ["2", "of", "enable", "-1"])
def test_env_switch_refuses_a_mistyped_value(monkeypatch, text):
    monkeypatch.setenv("FASTBERT_TEST_SWITCH", text)
    with pytest.raises(ValueError, match=f"FASTBERT_TEST_SWITCH='{text}': expected 1/true/on/yes or 0/false/off/no"):
        runtime.env_switch("FASTBERT_TEST_SWITCH", True)


def test_malloc_tuning_and_fused_ffn_switches_take_off_and_on_and_refuse_typos(fresh_runtime):
    """FASTBERT_MALLOC_TUNING=off leaves glibc alone (only '0' did: 'off' tuned it); FASTBERT_FUSED_FFN=on
    turns the fused feed-forward on at import (only '1' did), and a typo is a clear error at import."""
    libc = FakeGlibc()
    fresh_runtime.setattr(runtime, "_glibc", lambda: libc)
    fresh_runtime.setenv("FASTBERT_MALLOC_TUNING", "off")
    assert runtime.tune_cpu_allocator() is None and libc.calls == []
    fresh_runtime.setenv("FASTBERT_MALLOC_TUNING", "maybe")
    with pytest.raises(ValueError, match="FASTBERT_MALLOC_TUNING='maybe'"):
        runtime.tune_cpu_allocator()
    base = {k: v for k, v in os.environ.items() if k != "FASTBERT_FUSED_FFN"}
    code = "import fastbert.modeling as m; print(m.FUSED_FFN)"
    for text, expected in (("on", "True"), ("0", "False"), (None, "False")):
        env = base if text is None else {**base, "FASTBERT_FUSED_FFN": text}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == expected, out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**base, "FASTBERT_FUSED_FFN": "2"})
    assert out.returncode != 0 and "FASTBERT_FUSED_FFN='2': expected" in out.stderr
