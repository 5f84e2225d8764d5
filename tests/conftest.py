"""Test set-up shared by every test module.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the top of
the first file pytest loads. Kernel tests then run the Triton kernels themselves on CPU tensors
(FASTBERT_KERNELS=triton through the ``triton_kernels`` fixture), not the reference fallback.
On a machine with a GPU, benchmarks/gpu_check.sh runs the same tests without the interpreter.
"""
import os
import sys

if not os.environ.get("FASTBERT_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("PYTEST_XDIST_WORKER"):
    # One Triton cache per xdist worker: workers compiling the same kernel at once must not share
    # cache files (a GPU run under -n 8 saw a C++ length_error from inside a kernel launch).
    os.environ.setdefault("TRITON_CACHE_DIR",
                          os.path.join(os.path.expanduser("~/.triton"), "cache-" + os.environ["PYTEST_XDIST_WORKER"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tests that call the CLI in-process must not retune malloc for the rest of the session
# (tests/test_runtime.py probes it in subprocesses without this variable)
os.environ["FASTBERT_MALLOC_TUNING"] = "0"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(__file__))  # for `from tolerance import ...`

import pytest  # noqa: E402
import torch  # noqa: E402

import interpreter_bounds  # noqa: E402

if interpreter_bounds.INTERPRETED:  # TRITON_INTERPRET as Triton reads it
    if os.environ.get("FASTBERT_CHECK_BOUNDS", "1") != "0":
        interpreter_bounds.install()  # every interpreted load/store is checked against its launch's tensors
    if os.environ.get("FASTBERT_GPU_LIKE", "1") != "0":
        import interpreter_gpu_like  # noqa: E402

        interpreter_gpu_like.install()  # masked-lane garbage, tf32 dots, approximate fp32 math: as on a GPU

DEVICE = "cuda" if os.environ.get("FASTBERT_TEST_GPU") and torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def triton_kernels(monkeypatch):
    """Force the Triton implementation (interpreted on CPU, compiled on CUDA)."""
    monkeypatch.setenv("FASTBERT_KERNELS", "triton")
    yield


@pytest.fixture
def reference_kernels(monkeypatch):
    monkeypatch.setenv("FASTBERT_KERNELS", "reference")
    yield


@pytest.fixture
def add_layer_norm_calls(monkeypatch):
    """The keyword arguments of every fastbert.kernels.add_layer_norm call made from here on (the model
    calls it as modeling.K.add_layer_norm), in order; the calls still run."""
    from fastbert import modeling
    calls = []
    real = modeling.K.add_layer_norm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling.K, "add_layer_norm", spy)
    return calls


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_threads():
    """The CLIs' --threads sets torch's thread count for the process; later tests must not inherit
    it (a GEMM's rounding depends on how it is split, and the tolerance rule compares against one)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
