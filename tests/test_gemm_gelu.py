"""K.feed_forward's Triton epilogue matmuls (interpreted on the CPU, compiled on CUDA) against float64.

Tolerance rule (tests/tolerance.py): our error <= 2 x PyTorch's own error in the same dtype, for the
output and all four gradients. bf16 runs on CUDA and in the interpreter as tests/interpreter_gpu_like.py
makes it compute bf16 (Triton's own interpreter multiplies bf16 bit patterns as integers).
Also: the launch order over several row and column groups with ragged tails (a tile the order skips
would leave uninitialised memory in the result), opcheck, the eager twin against the custom ops, bad
input, and ahead-of-time compilation of the shipped launches for sm_90 and sm_80.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastbert.kernels as K
from aot import compile_in_subprocess
from fastbert.kernels import gemm_gelu as GG
from interpreter_bounds import BF16, interpreted
from tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, BF16]
# (M, K, N, H): odd sizes everywhere; K not a multiple of any BLOCK_K (the masked K loop), K a multiple
# (the unmasked one), M over one 128-row block (column sums of dz from two blocks), K = 1.
SHAPES = [(37, 45, 29, 19), (130, 64, 200, 33), (5, 1, 17, 3), (1, 24, 16, 8)]


@pytest.fixture
def small_tiles():
    """16-row / 32-column tiles in groups of 2: many programs, a ragged last group (the launch order's
    tail) and wrapped rows and columns in the last tiles, at shapes the interpreter runs quickly."""
    GG.set_gemm_config_override((16, 32, 16, 2, 4, 1))
    yield
    GG.set_gemm_config_override(None)


def _torch_ffn(x, w1, b1, w2, approximate):
    return F.linear(F.gelu(F.linear(x, w1, b1.to(x.dtype)), approximate=approximate), w2)


def _check(shape, dtype, device, approximate="none", lead=(), b1_dtype=None, transform=lambda t: t):
    M, Kd, N, H = shape
    x = torch.randn(*lead, M, Kd, dtype=torch.float64) * 1.5
    w1 = torch.randn(N, Kd, dtype=torch.float64) / max(Kd, 1) ** 0.5
    b1 = torch.randn(N, dtype=torch.float64)
    w2 = torch.randn(H, N, dtype=torch.float64) / N ** 0.5
    dtypes = (dtype, dtype, b1_dtype or dtype, dtype)
    ours = [transform(t.to(device=device, dtype=d)).requires_grad_() for t, d in zip((x, w1, b1, w2), dtypes)]
    base = [t.detach().clone().requires_grad_() for t in ours]
    ref = [t.detach().double().requires_grad_() for t in ours]
    y = K.feed_forward(*ours, approximate=approximate)
    y_base, y_ref = _torch_ffn(*base, approximate), _torch_ffn(*ref, approximate)
    assert y.dtype == dtype and y.shape == (*lead, M, H)
    dy = torch.randn(y.shape, device=device, dtype=torch.float64)
    for out in (y, y_base, y_ref):
        out.backward(dy.to(out.dtype))
    assert_close_to_reference(y, y_base, y_ref, name="out")
    for name, a, b, r in zip(("x", "w1", "b1", "w2"), ours, base, ref):
        assert a.grad.dtype == a.dtype
        assert_close_to_reference(a.grad, b.grad, r.grad, name=f"d{name}")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_feed_forward(triton_kernels, device, shape, dtype, approximate):
    _check(shape, dtype, device, approximate)


@pytest.mark.parametrize("dtype", DTYPES)
def test_feed_forward_many_tiles(triton_kernels, device, small_tiles, dtype):
    _check((70, 40, 100, 24), dtype, device)  # 5 x 4 tiles, groups of 2 row blocks: the last group has one
    _check((33, 16, 65, 7), dtype, device, "tanh", lead=(2,))  # 3-D input, K one block exactly


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_feed_forward_bert_launch(triton_kernels, device, approximate):
    """The shipped bf16 launch at a BERT-base shape (many 128 x 128 tiles in full groups, K = 768 without
    a tail, N = 3072), the fp32 bias of the model under autocast, compiled."""
    if device != "cuda":
        pytest.skip("the compiled launch needs a GPU")
    _check((2048, 768, 3072, 768), torch.bfloat16, device, approximate, b1_dtype=torch.float32)


def test_feed_forward_fp32_bias_and_strided_operands(triton_kernels, device):
    # The model's autocast layout: 16-bit activations and weights, the bias an fp32 parameter; and
    # operands that are transposed views (the kernel reads them through their strides).
    _check((37, 45, 29, 19), torch.float16, device, b1_dtype=torch.float32)
    _check((37, 45, 29, 19), torch.float32, device, transform=lambda t: t.t().contiguous().t() if t.dim() == 2 else t)
    # every operand a strided view (x along both dimensions, the bias every other element)
    _check((37, 45, 29, 19), torch.float32, device,
           transform=lambda t: t.repeat_interleave(2, -1)[..., ::2] if t.dim() == 1 else t.repeat(2, 2)[::2, ::2])


def test_feed_forward_inference_writes_no_z(triton_kernels, device, monkeypatch):
    """Without gradients (no_grad, inference_mode, or no input requiring one) the forward kernel writes
    h only: the same output as the training forward, bit for bit, and z is never allocated."""
    inputs = [torch.randn(*s, device=device) for s in ((2, 9, 24), (40, 24), (40,), (16, 40))]
    want = K.feed_forward(*(t.clone().requires_grad_() for t in inputs)).detach()
    launches = []
    real = GG._launch
    monkeypatch.setattr(GG, "_launch", lambda *a: launches.append(a[-1]) or real(*a))  # a[-1]: store_z
    with torch.no_grad():
        a = K.feed_forward(*(t.clone().requires_grad_() for t in inputs))
    with torch.inference_mode():
        b = K.feed_forward(*inputs)
    c = K.feed_forward(*inputs)
    assert launches == [False, False, False]
    assert torch.equal(a, want) and torch.equal(b, want) and torch.equal(c, want)


@pytest.mark.parametrize("store_z", [False, True])
def test_forward_kernel_writes_z_only_when_asked(triton_kernels, device, store_z):
    # The kernel itself: a NaN-filled z buffer stays untouched without STORE_Z, and holds x w1ᵀ + b1 with it.
    x, w1, b1 = (torch.randn(*s, device=device) for s in ((37, 24), (40, 24), (40,)))
    h, z = torch.empty(37, 40, device=device), torch.full((37, 40), float("nan"), device=device)
    GG._launch(x, (w1.stride(1), w1.stride(0)), w1, b1, z, h, h, 37, 40, 24, False, "none", store_z)
    want_z = x.double() @ w1.double().t() + b1.double()
    torch.testing.assert_close(h.double(), torch.nn.functional.gelu(want_z), rtol=1e-5, atol=1e-5)
    if store_z:
        torch.testing.assert_close(z.double(), want_z, rtol=1e-5, atol=1e-5)
    else:
        assert torch.isnan(z).all()


def test_feed_forward_gelu_tails(triton_kernels, device):
    # Pre-activations far in both tails (GELU's 0 and identity limits, gelu' 0 and 1) stay finite and right.
    x = torch.tensor([[1.0], [-1.0], [0.0]], device=device)
    w1 = torch.tensor([[60.0], [1e4], [-3.0], [0.5]], device=device)
    b1 = torch.zeros(4, device=device)
    w2 = torch.eye(4, device=device)
    for approximate in ("none", "tanh"):
        leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2)]
        y = K.feed_forward(*leaves, approximate=approximate)
        y.sum().backward()
        want = F.gelu(x @ w1.t(), approximate=approximate)
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
        assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_feed_forward_empty(triton_kernels, device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    w1, b1, w2 = (torch.randn(*s, device=device, requires_grad=True) for s in ((16, 8), (16,), (4, 16)))
    y = K.feed_forward(x, w1, b1, w2)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert w1.grad.abs().sum() == 0 and b1.grad.abs().sum() == 0 and w2.grad.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 0, 9, 5), (7, 6, 9, 0)], ids=["K0", "H0"])
def test_feed_forward_zero_width(triton_kernels, device, shape, dtype):
    """An input of width 0 (the first layer's output is its bias alone) or an output of width 0, with
    leading dimensions: the rows were computed as reshape(-1, 0), which no tensor of 0 elements takes."""
    _check(shape, dtype, device, lead=(2,))


def test_feed_forward_bad_input(triton_kernels, device):
    x = torch.randn(3, 8, device=device)
    w1, b1, w2 = torch.randn(16, 8, device=device), torch.randn(16, device=device), torch.randn(4, 16, device=device)
    with pytest.raises(ValueError, match="w1: expected shape"):
        K.feed_forward(x, w1[:, :7], b1, w2)
    with pytest.raises(ValueError, match="b1: expected shape"):
        K.feed_forward(x, w1, b1[:15], w2)
    with pytest.raises(ValueError, match="w2: expected shape"):
        K.feed_forward(x, w1, b1, w2.t())
    with pytest.raises(ValueError, match="w1 has dtype"):
        K.feed_forward(x, w1.half(), b1, w2)
    with pytest.raises(ValueError, match="approximate"):
        K.feed_forward(x, w1, b1, w2, approximate="sigmoid")


@interpreted  # the refusal by an interpreter that multiplies bf16 bit patterns (Triton's own)
def test_feed_forward_refuses_interpreted_bf16(triton_kernels, monkeypatch):
    from fastbert.kernels import _interpreter_probe
    monkeypatch.setattr(_interpreter_probe, "_verdict", False)
    x, w1, b1, w2 = (torch.randn(*s, dtype=torch.bfloat16) for s in ((3, 8), (16, 8), (16,), (4, 16)))
    with pytest.raises(TypeError, match="matrix products on bf16 CPU tensors"):
        K.feed_forward(x, w1, b1, w2)


@interpreted
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opcheck_feed_forward(triton_kernels, approximate):
    x = torch.randn(5, 24, requires_grad=True)
    w1, b1, w2 = (torch.randn(*s, requires_grad=True) for s in ((40, 24), (40,), (16, 40)))
    torch.library.opcheck(torch.ops.fastbert.feed_forward.default, (x, w1, b1, w2, approximate))
    _, h, z = torch.ops.fastbert.feed_forward(x, w1, b1, w2, approximate)
    torch.library.opcheck(torch.ops.fastbert.feed_forward_backward.default,
                          (torch.randn(5, 16), x.detach(), w1.detach(), b1.detach(), w2.detach(), h, z, approximate))
    # transposed weights and a strided bias: the fake gradients must have the real (contiguous) strides
    w1t, w2t = w1.detach().t().contiguous().t(), w2.detach().t().contiguous().t()
    b1s = b1.detach().repeat_interleave(2)[::2]
    torch.library.opcheck(torch.ops.fastbert.feed_forward_backward.default,
                          (torch.randn(5, 16), x.detach(), w1t, b1s, w2t, h, z, approximate))
    # width 0 in and out, with leading dimensions: the fake's h and z have the real (rows, N) shape
    for k, n_out in ((0, 16), (24, 0)):
        x0 = torch.randn(2, 5, k)
        args = (x0, torch.randn(40, k), torch.randn(40), torch.randn(n_out, 40), approximate)
        torch.library.opcheck(torch.ops.fastbert.feed_forward.default, args)
        _, h0, z0 = torch.ops.fastbert.feed_forward(*args)
        assert h0.shape == z0.shape == (10, 40)


def test_eager_twin_equals_custom_op(triton_kernels, device):
    inputs = [torch.randn(*s, device=device) for s in ((2, 9, 24), (40, 24), (40,), (16, 40))]
    runs = []
    for fn in (lambda *a: GG.feed_forward(*a, "tanh"), lambda *a: torch.ops.fastbert.feed_forward(*a, "tanh")[0]):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape))
        runs.append([y.detach()] + [t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@interpreted
def test_compiles_fullgraph(triton_kernels, monkeypatch):
    leaves = [torch.randn(*s, requires_grad=True) for s in ((7, 24), (40, 24), (40,), (16, 40))]
    launches = []
    for name in ("dense_gelu", "gelu_dgrad"):  # the compiled graph must run the Triton epilogue kernels
        real = getattr(GG, name)
        monkeypatch.setattr(GG, name, lambda *a, _real=real, _name=name: launches.append(_name) or _real(*a))
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: K.feed_forward(*a).square().sum(), fullgraph=True, backend="aot_eager")
    out = fn(*leaves)
    out.backward()
    assert launches.count("dense_gelu") >= 1 and launches.count("gelu_dgrad") == 1, launches
    want = _torch_ffn(*(t.detach() for t in leaves), "none").square().sum()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


# ---------------------------------------------------------------------------- ahead-of-time compile

def _launches(config, dtypes=("bf16", "fp16", "fp32"), tanh=(False, True)):
    """Both launches of K.feed_forward with `config` (benchmarks/ptxas_report.gemm_launch builds each as
    Triton specialises it): bf16 (the GPU recipe) in every GELU form and K-tail variant, the other
    dtypes in BERT's (erf GELU, K a multiple of the tile) and with both flags flipped."""
    from benchmarks.ptxas_report import gemm_launch
    return [gemm_launch(config(dtype), dtype, backward, approx, even_k)
            for dtype, backward, approx, even_k in itertools.product(dtypes, (False, True), tanh, (True, False))
            if dtype == "bf16" or (approx, even_k) in ((False, True), (True, False))]


def test_aot_compile_shipped():
    from benchmarks.ptxas_report import gemm_launch
    shipped = {"bf16": GG.gemm_config(torch.bfloat16), "fp16": GG.gemm_config(torch.float16),
               "fp32": GG.gemm_config(torch.float32)}
    inference = [gemm_launch(shipped[d], d, store_z=False) for d in ("bf16", "fp16")]
    compile_in_subprocess("fastbert.kernels.gemm_gelu", "_gemm_gelu", _launches(shipped.get) + inference)


@pytest.mark.slow
def test_aot_compile_sweep_candidates():
    from benchmarks.bench_ffn import FFN_CANDIDATES
    configs = []
    for cand in FFN_CANDIDATES:
        configs += _launches(lambda dtype, c=GG.GemmConfig(*cand): c, dtypes=("bf16",), tanh=(False,))
    compile_in_subprocess("fastbert.kernels.gemm_gelu", "_gemm_gelu", configs, archs=(90,))


@interpreted
def test_bench_ffn_smoke(triton_kernels):
    # The GPU benchmark script end to end at toy sizes in the interpreter: every row present, and the
    # sweep's launches agree with the shipped one.
    from benchmarks import bench_ffn
    import json
    assert bench_ffn.main(["--smoke"]) == 0
    rows = json.load(open("/tmp/bench_ffn_smoke.json"))["rows"]
    impls = {(r["op"], r["impl"], r["pass"]) for r in rows}
    for impl in ("fastbert", "fastbert-unfused", "eager"):
        assert ("feed-forward block", impl, "fwd+bwd") in impls
    assert {("gemm+gelu fwd", "fastbert"), ("dgrad+gelu'", "unfused")} <= {(r["op"], r["impl"]) for r in rows}
    assert bench_ffn.main(["--smoke", "--sweep"]) == 0
    rows = json.load(open("/tmp/bench_ffn_smoke.json"))["rows"]
    assert not [r for r in rows if r["op"] == "feed-forward block"]
    sweep = [r for r in rows if r["impl"].startswith("fastbert (")]
    assert len(sweep) == 3 * len(bench_ffn.FFN_CANDIDATES) and all(r["ok"] for r in sweep)
