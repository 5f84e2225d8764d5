"""fastbert.kernels._dispatch: the per-device facts every op asks on every call are asked of the
driver once per device (faked here: no GPU in CI), and the backend switch is read at call time."""
import types
import warnings

import pytest
import torch

from fastbert.kernels import _dispatch as D


def test_compute_capability_is_asked_once_per_device(monkeypatch):
    asked = []
    monkeypatch.setattr(D, "_sm80_plus", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    capability = {0: (7, 5), 1: (9, 0), 2: (8, 0)}  # 2: an A100, sm_80 itself
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: asked.append(i) or capability[i])
    answers = [D._sm80_or_newer(torch.device(d)) for d in ("cuda:0", "cuda", "cuda:1", "cuda:0", "cuda", "cuda:2")]
    assert answers == [False, True, True, False, True, True]  # "cuda" is the current device, 1
    assert asked == [0, 1, 2]


def test_backend_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("FASTBERT_KERNELS", "reference")
    assert D.backend() == "reference" and not D.use_triton(torch.zeros(1))
    monkeypatch.setenv("FASTBERT_KERNELS", "bogus")
    with pytest.raises(ValueError, match="FASTBERT_KERNELS='bogus'"):
        D.backend()


def test_gpus_below_sm80_take_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(D, "_sm80_plus", {})
    monkeypatch.setattr(D, "_warned_old_gpu", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (7, 5))
    monkeypatch.delenv("FASTBERT_KERNELS", raising=False)
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))  # a CUDA tensor, as use_triton sees it
    with pytest.warns(UserWarning, match="below sm_80"):
        assert D.use_triton(fake) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert D.use_triton(fake) is False  # warned once
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(D, "_sm80_plus", {})
    assert D.use_triton(fake) is True


def test_traced_code_asks_the_driver_each_time(monkeypatch):
    asked = []
    monkeypatch.setattr(D, "_sm80_plus", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or (7, 0))
    assert D._sm80_or_newer(torch.device("cuda", 0)) is False and D._sm80_or_newer(torch.device("cuda", 0)) is False
    assert len(asked) == 2 and D._sm80_plus == {}


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "On", "y", "0", "false", "2", "", " 1", "t"])
def test_interpret_flag_reads_triton_interpret_as_triton_does(monkeypatch, value):
    """fastbert must agree with Triton on whether the kernels are interpreted: "false" once counted as
    on here while Triton compiled GPU kernels, and CPU launches failed far from the cause."""
    from triton import knobs
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert D._interpret_flag() == knobs.runtime.interpret


@pytest.mark.parametrize("value,expected", [("  Reference ", "reference"), ("", "auto"), ("TRITON", "triton")])
def test_backend_value_is_trimmed_and_case_blind(monkeypatch, value, expected):
    monkeypatch.setenv("FASTBERT_KERNELS", value)
    assert D.backend() == expected


def test_triton_backend_refuses_devices_other_than_cpu_and_cuda(monkeypatch):
    monkeypatch.setenv("FASTBERT_KERNELS", "triton")
    with pytest.raises(ValueError, match="not supported"):
        D.use_triton(torch.empty(1, device="meta"))


def test_value_checks_are_skipped_inside_compiled_code():
    """API.md: checks of values (a host sync on CUDA) may be skipped inside compiled regions — and must
    be, or a compiled graph breaks or syncs on every call. Eager code runs them."""
    import fastbert.kernels as K
    assert K._check_values()
    compiled = torch.compile(lambda x: x * int(K._check_values()), backend="eager", fullgraph=True)
    assert compiled(torch.ones(1)).item() == 0.0
