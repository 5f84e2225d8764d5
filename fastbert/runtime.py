"""Device and precision choices shared by the single-process commands (`fastbert finetune`,
`fastbert encode`), with the meanings `fastbert pretrain` gives its --device and --precision.

- ``--device``: ``cpu``, ``cuda`` or ``cuda:N``; default ``cuda`` when a GPU is visible, else ``cpu``.
- ``--precision``: ``auto`` = bf16 autocast on a CUDA device that supports bf16, fp32 otherwise
  (the CPU always runs fp32 under auto); ``bf16`` / ``fp16`` = autocast in that dtype (fp16 trains
  with a GradScaler); ``fp32`` = no autocast. Weights and optimizer state stay fp32 in every mode.

- ``tune_cpu_allocator()``: glibc malloc settings for a training loop on the CPU (below); the
  commands call it, a library user may.

Nothing here runs at import.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import warnings

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# What fastbert's own commands ask of a model, whatever its config says: a config.json may set
# output_attentions / output_hidden_states / return_dict (transformers' forward defaults), and the
# first two would send every call down the padded reference path.
PLAIN_OUTPUTS = dict(return_dict=True, output_hidden_states=False, output_attentions=False)


def add_device_arguments(p: argparse.ArgumentParser, training: bool = True) -> None:
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 autocast on a CUDA GPU with bf16 support, fp32 on the CPU; "
                        + ("fp16 trains with a GradScaler" if training else "bf16 / fp16: autocast"))


# `--cuda-graphs auto` (finetune, encode) runs graphs up to this batch size. H200 (benchmarks/results/
# gpu-h200-2026-11-27-run1, -run3): the graphed fine-tuning step at batch 32 was 4.78x transformers SDPA
# (every eager competitor host-bound); graphed encoding at batch 128 was 4.60x SDPA and 6.8x the eager run,
# but at batch 1024 0.91x the eager run (the padded buckets cost more than the launches they save).
GRAPHS_AUTO_MAX_BATCH = 256


def add_cuda_graphs_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--cuda-graphs [auto|on|off]: `what` says what is replayed (the help text's start)."""
    p.add_argument("--cuda-graphs", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help=f"{what}. auto (the default): on for a CUDA device where it runs, at --batch-size <= "
                        f"{GRAPHS_AUTO_MAX_BATCH}; on (or the bare flag): at any batch size, an error where it "
                        "cannot run; off: never")


def use_cuda_graphs(choice, device: torch.device, batch_size: int) -> bool:
    """Whether --cuda-graphs CHOICE (auto/on/off, or the old flag's bool) runs graphs on `device` at
    `batch_size` (on where graphs cannot run is the caller's error to raise)."""
    choice = {True: "on", False: "off"}.get(choice, choice)
    if choice == "auto":
        return device.type == "cuda" and batch_size <= GRAPHS_AUTO_MAX_BATCH
    return choice == "on"


def resolve_device(name: str | None) -> torch.device:
    """The torch.device for --device; ValueError for a name torch does not know or a GPU that is
    not there (so a typo fails before any data is read, not halfway through training)."""
    if name is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"--device {name!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available (torch {torch.__version__})")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device("cuda", index)


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 step', '2,048 steps': a count for a log line."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32, bf16 or fp16: what --precision means on this device."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("--precision fp16 needs a CUDA device (CPU autocast supports bf16 only)")
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32)."""
    return _AMP_DTYPES.get(precision)


def autocast(precision: str, device: torch.device):
    """A context for the forward pass: torch.autocast in bf16/fp16, nothing in fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """A GradScaler for fp16 training, else None (bf16 has fp32's exponent range and needs none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({count(torch.get_num_threads(), 'thread')})"


# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_allocator_tuning: dict | None = None


_SWITCH = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def env_switch(name: str, default: bool) -> bool:
    """An on/off environment variable: 1/true/on/yes or 0/false/off/no (any case); unset or empty is
    ``default``. Anything else raises ValueError: a mistyped switch must not silently pick a side."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text not in _SWITCH:
        raise ValueError(f"{name}={os.environ[name]!r}: expected 1/true/on/yes or 0/false/off/no")
    return _SWITCH[text]


def _glibc():
    """This process's C library when it is glibc, else None (musl's mallopt accepts the call and does
    nothing). A function of its own so tests can hand tune_cpu_allocator a fake one."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt
    except (OSError, AttributeError):
        return None
    return libc


def tune_cpu_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1,
                       top_pad: int = 64 << 20) -> dict | None:
    """Keep freed tensor memory in the process instead of handing it back to the kernel.

    A CPU training step allocates and frees the same few hundred MB of activations every step.
    glibc serves blocks above its adaptive mmap threshold (128 KB, rising to at most 32 MB) with
    fresh mmaps, and trims the heap top once more than twice that threshold is free, so each step
    faults its buffers in again, a zero-filled page at a time. On this project's 2-core VM that cost
    fastbert's pretraining step ~5-8k faults and up to 40 ms of system time (its GELU backward ran
    5x slower inside the step than alone), and transformers' step ~250k faults and ~1 s (its 250 MB
    of logits). These settings -- heap allocations up to ``mmap_threshold``, no trim below
    ``trim_threshold`` (the largest value mallopt takes), ``top_pad`` extra per heap growth -- take
    both to a steady state with almost no faults (benchmarks/results/cpu-2026-11-26-s8/RUN.md).
    The cost: memory freed by the program stays mapped to the process (its peak, not more).

    Process-wide, for every library in the process; call it before the first large allocations.
    The `fastbert` commands call it (`fastbert bench` only with --tuned-malloc, so that its ratios
    can be measured under either allocator, for every competitor alike). Returns the settings
    applied (a value glibc rejected is None, with a warning), or None where nothing changed: not
    glibc, or ``FASTBERT_MALLOC_TUNING=0`` in the environment. Idempotent: the first call's settings
    stay.
    """
    global _allocator_tuning
    if _allocator_tuning is not None:
        return dict(_allocator_tuning)
    if not env_switch("FASTBERT_MALLOC_TUNING", True):
        return None
    libc = _glibc()
    if libc is None:
        return None
    mallopt = libc.mallopt
    settings = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold, "top_pad": top_pad}
    codes = {"mmap_threshold": _M_MMAP_THRESHOLD, "trim_threshold": _M_TRIM_THRESHOLD, "top_pad": _M_TOP_PAD}
    for name, value in settings.items():  # all checked before any is applied
        if not 0 <= value < 2**31:
            raise ValueError(f"tune_cpu_allocator: {name}={value} must fit a C int (0 <= value < 2**31)")
    for name, value in settings.items():
        if mallopt(ctypes.c_int(codes[name]), ctypes.c_int(value)) != 1:
            # glibc before ~2.35 caps M_MMAP_THRESHOLD at 32 MB on 64-bit: take the cap, never fail a command
            if name == "mmap_threshold" and value > 32 << 20 and mallopt(ctypes.c_int(codes[name]),
                                                                          ctypes.c_int(32 << 20)) == 1:
                settings[name] = 32 << 20
                continue
            warnings.warn(f"tune_cpu_allocator: glibc rejected {name}={value}; left at its default")
            settings[name] = None
    _allocator_tuning = settings
    return dict(settings)


MALLOC_HELP = ("glibc malloc tuned as the fastbert commands run it (fastbert.runtime.tune_cpu_allocator), for every "
               "competitor in this process; default: glibc's own settings")


def add_malloc_argument(p: argparse.ArgumentParser) -> None:
    """``--tuned-malloc`` for benchmarks that compare competitors inside one process."""
    p.add_argument("--tuned-malloc", action="store_true", help=MALLOC_HELP)


def apply_malloc_flag(tuned_malloc: bool) -> str:
    """Apply ``--tuned-malloc`` and return the label results record: "tuned" or "glibc-default".

    Call it before any model or batch exists: the setting is process-wide, so every competitor of
    the run gets the same allocator. Says so on stderr where the flag was given but nothing changed.
    """
    if not tuned_malloc:
        return "glibc-default"
    applied = tune_cpu_allocator()
    if applied is None:
        print("--tuned-malloc: not applied (not glibc, or FASTBERT_MALLOC_TUNING=0)", file=sys.stderr)
        return "glibc-default"
    if all(v is None for v in applied.values()):
        print("--tuned-malloc: not applied (glibc rejected every setting)", file=sys.stderr)
        return "glibc-default"
    return "tuned"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux): CPU timings compare only on the same model."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
