"""Backend selection for fastbert.kernels (read at call time, so tests can flip it).

FASTBERT_KERNELS:
  auto      (default) Triton on CUDA tensors, plain PyTorch on CPU tensors: the reference, except
            mlm_loss on fp32, which takes the CPU-tuned cpu_mlm_loss (same result within fp32 rounding)
  triton    Triton always; CPU tensors need TRITON_INTERPRET=1 set before triton is imported
  reference the PyTorch reference always (A/B checks, GPUs below sm_80)
"""
from __future__ import annotations

import os
import warnings

import torch

_BACKENDS = ("auto", "triton", "reference")
_warned_old_gpu = False


def backend() -> str:
    value = os.environ.get("FASTBERT_KERNELS", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"FASTBERT_KERNELS={value!r}: expected one of {', '.join(_BACKENDS)}")
    return value


def _interpret_flag() -> bool:
    """TRITON_INTERPRET read as Triton 3.6 reads it (triton.knobs' env_bool): "false" or "2" is off,
    and then Triton compiles real kernels whatever fastbert believes."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")


# Triton reads TRITON_INTERPRET when fastbert.kernels defines its kernels (this module is imported
# just before): what counts is the value then, not a later change of the environment.
_INTERPRETING_AT_IMPORT = _interpret_flag()


def interpreting() -> bool:
    return _INTERPRETING_AT_IMPORT


_sm_counts: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once per device: the backward launchers size
    their grids by it on every call); 2 elsewhere, so interpreted kernels still run several programs and
    their cross-program partial sums are exercised."""
    if device.type != "cuda":
        return 2
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


_sm80_plus: dict = {}


def _sm80_or_newer(device: torch.device) -> bool:
    """Whether a CUDA device is sm_80 or newer (asked once per device: every op asks on every call).
    Traced code asks the driver as before (no cache mutation inside a torch.compile'd graph)."""
    if torch.compiler.is_compiling():
        return torch.cuda.get_device_capability(device)[0] >= 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm80_plus:
        _sm80_plus[index] = torch.cuda.get_device_capability(index)[0] >= 8
    return _sm80_plus[index]


def use_triton(t: torch.Tensor) -> bool:
    """True when the op on tensor `t` should run its Triton kernel."""
    global _warned_old_gpu
    mode = backend()
    if mode == "reference":
        return False
    if t.is_cuda:
        if not _sm80_or_newer(t.device):
            if not _warned_old_gpu:
                warnings.warn("fastbert: GPUs below sm_80 run the PyTorch reference path", stacklevel=3)
                _warned_old_gpu = True
            return False
        return True
    if mode == "auto":
        return False
    if t.device.type != "cpu":
        raise ValueError(f"FASTBERT_KERNELS=triton: tensors on {t.device} are not supported")
    if not interpreting():
        late = " (it was set after fastbert.kernels was imported, too late for Triton)" if _interpret_flag() else ""
        raise RuntimeError(
            "FASTBERT_KERNELS=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            f"in the environment before triton is imported{late}"
        )
    return True
