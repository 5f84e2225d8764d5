"""Device and precision choices shared by the single-process commands (`fastbert finetune`,
`fastbert encode`), with the meanings `fastbert pretrain` gives its --device and --precision.

- ``--device``: ``cpu``, ``cuda`` or ``cuda:N``; default ``cuda`` when a GPU is visible, else ``cpu``.
- ``--precision``: ``auto`` = bf16 autocast on a CUDA device that supports bf16, fp32 otherwise
  (the CPU always runs fp32 under auto); ``bf16`` / ``fp16`` = autocast in that dtype (fp16 trains
  with a GradScaler); ``fp32`` = no autocast. Weights and optimizer state stay fp32 in every mode.

Nothing here runs at import.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 autocast on a CUDA GPU with bf16 support, fp32 on the CPU; "
                        "fp16 trains with a GradScaler")


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


def autocast(precision: str, device: torch.device):
    """A context for the forward pass: torch.autocast in bf16/fp16, nothing in fp32."""
    dtype = _AMP_DTYPES.get(precision)
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
    return f"cpu ({torch.get_num_threads()} threads)"
