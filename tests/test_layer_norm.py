"""K.add_layer_norm and K.gelu_layer_norm's Triton kernels against float64.

Tolerance rule (tests/tolerance.py): our error <= 2 x PyTorch's own error in the same dtype, for the
output and every gradient. Dropout: the kernels' Philox mask is rebuilt with
layer_norm.dropout_mask from the same seed, so forward and backward are checked against the
reference with that mask; repeatability under torch.manual_seed is checked bit for bit.
bf16 runs on CUDA and in the interpreter as tests/interpreter_gpu_like.py makes it compute bf16.
"""
import pytest
import torch
import torch.nn.functional as F

import fastbert.kernels as K
from fastbert.kernels import layer_norm as L
from fastbert.kernels.philox_dropout import effective_dropout_p
from philox_mask import philox_halves, philox_keep_mask
from interpreter_bounds import BF16, BF16_COMPUTED
from tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, BF16]
WIDTHS = [37, 384, 768, 1000, 3072]
EPS = 1e-5


def _check(fn_ours, fn_base, inputs, dtypes, device, names, seed=None, out_dtype=None):
    """Run ours / PyTorch in the test dtype / PyTorch in float64 on the same values; compare all.

    out_dtype: the output dtype expected from ours (default: the first input's)."""
    ours = [t.to(device=device, dtype=d).clone().requires_grad_() for t, d in zip(inputs, dtypes)]
    base = [t.detach().clone().requires_grad_() for t in ours]
    ref = [t.detach().to(torch.float64).requires_grad_() for t in ours]
    if seed is not None:
        torch.manual_seed(seed)
    y = fn_ours(*ours)
    y_base, y_ref = fn_base(*base), fn_base(*ref)
    assert y.dtype == (out_dtype or dtypes[0]) and y.shape == y_ref.shape
    dy = torch.randn(y.shape, device=device, dtype=torch.float64)
    for out in (y, y_base, y_ref):
        out.backward(dy.to(out.dtype))
    assert_close_to_reference(y, y_base, y_ref, name="out")
    for name, a, b, r in zip(names, ours, base, ref):
        assert_close_to_reference(a.grad, b.grad, r.grad, name=f"d{name}")


def _keep_scale(p):
    """The kept values' scale the kernels apply: p is quantised to 16 bits (kernels/philox_dropout.py)."""
    return 1.0 / (1.0 - effective_dropout_p(p))


def _ln_params(n):
    return 1.0 + 0.3 * torch.randn(n), 0.5 * torch.randn(n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", WIDTHS)
def test_add_layer_norm(triton_kernels, device, n, dtype):
    x, res = torch.randn(2, 3, n), 2.0 + torch.randn(2, 3, n)  # an offset mean: the centring matters
    w, b = _ln_params(n)
    _check(lambda x, r, w, b: K.add_layer_norm(x, r, w, b, EPS),
           lambda x, r, w, b: F.layer_norm(x + r, (n,), w, b, EPS),
           (x, res, w, b), [dtype] * 4, device, ("x", "residual", "weight", "bias"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [37, 1000])
def test_add_layer_norm_dropout_matches_reference_with_same_mask(triton_kernels, device, n, dtype):
    p, rows, seed = 0.3, 6, 1234  # 0.3 is not a multiple of 2**-16: the scale must be the effective p's
    torch.manual_seed(seed)
    keep = L.dropout_mask(L.draw_seed(device), rows, n, p)  # the mask the op will draw after the same seed
    scale = _keep_scale(p)
    x, res = torch.randn(rows, n), torch.randn(rows, n)
    w, b = _ln_params(n)
    _check(lambda x, r, w, b: K.add_layer_norm(x, r, w, b, EPS, dropout_p=p),
           lambda x, r, w, b: F.layer_norm(x * keep.to(x.dtype) * scale + r, (n,), w, b, EPS),
           (x, res, w, b), [dtype] * 4, device, ("x", "residual", "weight", "bias"), seed=seed)
    frac = 1.0 - keep.float().mean().item()
    assert abs(frac - p) < 5 * (p * (1 - p) / keep.numel()) ** 0.5, f"dropped fraction {frac} for p={p}"


def test_add_layer_norm_dropout_repeatable(triton_kernels, device):
    x, res = torch.randn(5, 384, device=device), torch.randn(5, 384, device=device)
    w, b = (t.to(device) for t in _ln_params(384))
    torch.manual_seed(7)
    y1 = K.add_layer_norm(x, res, w, b, EPS, dropout_p=0.5)
    torch.manual_seed(7)
    y2 = K.add_layer_norm(x, res, w, b, EPS, dropout_p=0.5)
    y3 = K.add_layer_norm(x, res, w, b, EPS, dropout_p=0.5)  # the generator moved on: a new mask
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("x_dtype,res_dtype", [
    (torch.float16, torch.float32), (torch.float32, torch.float16),
    pytest.param(torch.bfloat16, torch.float32, marks=BF16.marks)], ids=str)
def test_add_layer_norm_mixed_dtypes_noncontiguous(triton_kernels, device, x_dtype, res_dtype, p):
    # The bf16-autocast pattern (and fp16's): a low-precision
    # sublayer output added to an fp32 residual stream with fp32 LayerNorm parameters. The output is
    # promote_types(x, residual), as x + residual and transformers' fp32 LayerNorm give, and each
    # gradient comes back in its input's dtype. Transposed inputs (copied inside).
    n, rows, seed = 100, 9, 99
    torch.manual_seed(seed)
    keep = L.dropout_mask(L.draw_seed(device), rows, n, p) if p else None
    scale = _keep_scale(p)
    x, res = torch.randn(n, rows).t(), torch.randn(n, rows).t()
    w, b = _ln_params(n)
    out_dtype = torch.promote_types(x_dtype, res_dtype)

    def base(x, r, w, b):
        x = x.to(out_dtype)
        if keep is not None:
            x = x * keep.to(out_dtype) * scale
        return F.layer_norm(x + r.to(out_dtype), (n,), w.to(out_dtype), b.to(out_dtype), EPS)

    _check(lambda x, r, w, b: K.add_layer_norm(x, r, w, b, EPS, dropout_p=p), base,
           (x, res, w, b), [x_dtype, res_dtype, torch.float32, torch.float32], device,
           ("x", "residual", "weight", "bias"), seed=seed if p else None, out_dtype=out_dtype)


def test_add_layer_norm_mixed_dtypes_fake_and_grad_dtypes(triton_kernels, device):
    # The fake (meta) implementation promises the same dtypes the kernels produce.
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.randn(3, 8, dtype=torch.float16, device=device, requires_grad=True)
    r = torch.randn(3, 8, dtype=torch.float32, device=device, requires_grad=True)
    w, b = torch.ones(8, device=device, requires_grad=True), torch.zeros(8, device=device, requires_grad=True)
    y = K.add_layer_norm(x, r, w, b, EPS)
    y.sum().backward()
    assert y.dtype == torch.float32
    assert (x.grad.dtype, r.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.float16, torch.float32,
                                                                        torch.float32, torch.float32)
    mode = FakeTensorMode()
    fx, fr, fw, fb = (mode.from_tensor(t.detach()) for t in (x, r, w, b))
    with mode:
        fy = torch.ops.fastbert.add_layer_norm(fx, fr, fw, fb, EPS, 0.0, None)[0]
    assert fy.dtype == torch.float32 and fy.shape == y.shape


def test_add_layer_norm_many_rows(triton_kernels, device):
    # More rows than backward programs: each program walks several rows and the partial dweight /
    # dbias sums of several programs are reduced.
    n = 64
    x, res = torch.randn(40, n), torch.randn(40, n)
    w, b = _ln_params(n)
    _check(lambda x, r, w, b: K.add_layer_norm(x, r, w, b, 1e-12),
           lambda x, r, w, b: F.layer_norm(x + r, (n,), w, b, 1e-12),
           (x, res, w, b), [torch.float32] * 4, device, ("x", "residual", "weight", "bias"))


# ------------------------------------------- add_layer_norm with the dense bias (x_bias) of the model

@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n", [(23, 37), (19, 768)])
def test_add_layer_norm_x_bias(triton_kernels, device, rows, n, dtype, p):
    """layer_norm(dropout(x + x_bias) + residual) against float64 with the kernels' own mask: output
    and every gradient, x_bias's included (summed over several rows per backward program and several
    programs). Without dropout and in one dtype, x's gradient is not stored by the kernel (it is the
    residual's) but the x-bias gradient must still be accumulated."""
    seed, scale = 21, _keep_scale(p)
    torch.manual_seed(seed)
    keep = L.dropout_mask(L.draw_seed(device), rows, n, p) if p else None
    x, res, xb = torch.randn(rows, n), 1.0 + torch.randn(rows, n), 0.5 * torch.randn(n)
    w, b = _ln_params(n)

    def base(x, r, w, b, xb):
        h = x + xb
        return F.layer_norm((h if keep is None else h * keep.to(h.dtype) * scale) + r, (n,), w, b, EPS)

    _check(lambda x, r, w, b, xb: K.add_layer_norm(x, r, w, b, EPS, dropout_p=p, x_bias=xb), base,
           (x, res, w, b, xb), [dtype] * 5, device, ("x", "residual", "weight", "bias", "x_bias"),
           seed=seed if p else None)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("xb_dtype", [torch.float32, torch.float16])
def test_add_layer_norm_x_bias_mixed_dtypes(triton_kernels, device, xb_dtype, p):
    """The autocast pattern with the dense bias: a low-precision x (fp16 standing in for bf16), an fp32
    residual stream and LayerNorm, x_bias in fp32 (the parameter) or in x's dtype. The output is
    promote_types(x, residual) whatever x_bias's dtype; each gradient in its input's dtype."""
    n, rows, seed = 100, 9, 5
    torch.manual_seed(seed)
    keep = L.dropout_mask(L.draw_seed(device), rows, n, p) if p else None
    x, res, xb = torch.randn(n, rows).t(), torch.randn(n, rows).t(), torch.randn(n)
    w, b = _ln_params(n)

    def base(x, r, w, b, xb):
        h = x.to(r.dtype) + xb.to(r.dtype)
        if keep is not None:
            h = h * keep.to(r.dtype) * _keep_scale(p)
        return F.layer_norm(h + r, (n,), w.to(r.dtype), b.to(r.dtype), EPS)

    _check(lambda x, r, w, b, xb: K.add_layer_norm(x, r, w, b, EPS, dropout_p=p, x_bias=xb), base,
           (x, res, w, b, xb), [torch.float16, torch.float32, torch.float32, torch.float32, xb_dtype], device,
           ("x", "residual", "weight", "bias", "x_bias"), seed=seed if p else None, out_dtype=torch.float32)


def test_add_layer_norm_x_bias_reference_path_and_errors(reference_kernels):
    """FASTBERT_KERNELS=reference computes the same function (float64 included), and a bad x_bias is
    refused with a message naming it, on both paths."""
    n = 12
    x, res, xb = torch.randn(3, n, dtype=torch.float64), torch.randn(3, n, dtype=torch.float64), torch.randn(n)
    w, b = (t.double() for t in _ln_params(n))
    xb64 = xb.double().requires_grad_()
    y = K.add_layer_norm(x, res, w, b, EPS, x_bias=xb64)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.layer_norm(x + xb64 + res, (n,), w, b, EPS), rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert xb64.grad is not None and xb64.grad.shape == (n,)
    for bad, error, match in ((xb[:-1], ValueError, "x_bias: expected shape"), (xb[None], ValueError, "x_bias"),
                              (torch.arange(n), TypeError, "x_bias"), ("bias", TypeError, "x_bias"),
                              (torch.empty(n, device="meta"), ValueError, "x_bias is on device")):
        with pytest.raises(error, match=match):
            K.add_layer_norm(x, res, w, b, EPS, x_bias=bad)


def test_add_layer_norm_x_bias_errors_on_the_triton_path(triton_kernels, device):
    n = 12
    x, res = torch.randn(3, n, device=device), torch.randn(3, n, device=device)
    w, b = torch.ones(n, device=device), torch.zeros(n, device=device)
    with pytest.raises(ValueError, match="x_bias: expected shape"):
        K.add_layer_norm(x, res, w, b, EPS, x_bias=torch.zeros(n + 1, device=device))
    with pytest.raises(TypeError, match="x_bias"):
        K.add_layer_norm(x, res, w, b, EPS, x_bias=torch.zeros(n, device=device, dtype=torch.int32))
    with pytest.raises(TypeError, match="x_bias must be fp16, bf16 or fp32"):  # the kernels' own check
        L.add_layer_norm(x, res, w, b, EPS, x_bias=torch.zeros(n, device=device, dtype=torch.float64))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", WIDTHS)
def test_gelu_layer_norm(triton_kernels, device, n, dtype, approximate):
    x = 2.0 * torch.randn(3, n)
    c = torch.randn(n)
    w, b = _ln_params(n)
    _check(lambda x, c, w, b: K.gelu_layer_norm(x, c, w, b, EPS, approximate),
           lambda x, c, w, b: F.layer_norm(F.gelu(x + c, approximate=approximate), (n,), w, b, EPS),
           (x, c, w, b), [dtype] * 4, device, ("x", "bias", "weight", "ln_bias"))


def test_too_wide_raises(triton_kernels, device):
    n = L.MAX_WIDTH + 1
    x = torch.randn(1, n, device=device)
    ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)
    with pytest.raises(ValueError, match="widths up to"):
        K.add_layer_norm(x, x, ones, zeros)
    with pytest.raises(ValueError, match="widths up to"):
        K.gelu_layer_norm(x, zeros, ones, zeros)


def test_max_width(triton_kernels, device):
    n = L.MAX_WIDTH
    x, res = torch.randn(2, n), torch.randn(2, n)
    w, b = _ln_params(n)
    _check(lambda x, r, w, b: K.add_layer_norm(x, r, w, b, EPS),
           lambda x, r, w, b: F.layer_norm(x + r, (n,), w, b, EPS),
           (x, res, w, b), [torch.float32] * 4, device, ("x", "residual", "weight", "bias"))


# ------------------------------------------------- add_layer_norm with a low-precision copy (autocast)

def _low_dtype(device):
    # bf16 is what autocast uses; fp16 stands in only where the interpreter is Triton's own (it
    # computes bf16 wrongly)
    return torch.bfloat16 if BF16_COMPUTED else torch.float16


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("rows, n", [(9, 100), (40, 768)])
def test_add_layer_norm_low_copy(triton_kernels, device, rows, n, p):
    """low_dtype: the copy is y.to(low_dtype) bit for bit, and the backward, given gradients for both
    outputs, is the float64 reference's with the two gradients summed (the autocast pattern: a low
    sublayer output, an fp32 residual stream whose copy feeds the next matmul). Odd width, several
    rows per backward program, transposed inputs, dropout."""
    _check_low_copy(device, rows, n, p)


def _check_low_copy(device, rows, n, p, x_bias=False):
    """x_bias: also an fp32 bias of x (the model's dense bias under autocast)."""
    low, seed = _low_dtype(device), 7
    torch.manual_seed(seed)
    keep = L.dropout_mask(L.draw_seed(device), rows, n, p) if p else None
    x, res = torch.randn(n, rows).t(), 1.0 + torch.randn(n, rows).t()
    w, b = _ln_params(n)
    inputs, dtypes = [x, res, w, b], [low, torch.float32, torch.float32, torch.float32]
    names = ["x", "residual", "weight", "bias"]
    if x_bias:
        inputs, dtypes, names = inputs + [0.5 * torch.randn(n)], dtypes + [torch.float32], names + ["x_bias"]
    ours = [t.to(device=device, dtype=d).clone().requires_grad_() for t, d in zip(inputs, dtypes)]
    base = [t.detach().clone().requires_grad_() for t in ours]
    ref = [t.detach().to(torch.float64).requires_grad_() for t in ours]

    def plain(x, r, w, b, xb=None):
        h = x.to(r.dtype) if xb is None else x.to(r.dtype) + xb.to(r.dtype)
        h = h if keep is None else h * keep.to(r.dtype) * _keep_scale(p)
        return F.layer_norm(h + r, (n,), w.to(r.dtype), b.to(r.dtype), EPS)

    torch.manual_seed(seed)
    if x_bias:
        y, y_low = K.add_layer_norm(*ours[:4], EPS, dropout_p=p, low_dtype=low, x_bias=ours[4])
    else:
        y, y_low = K.add_layer_norm(*ours, EPS, dropout_p=p, low_dtype=low)
    assert y.dtype == torch.float32 and y_low.dtype == low
    assert torch.equal(y_low, y.to(low))
    dy = torch.randn(rows, n, device=device)
    dy_low = torch.randn(rows, n, device=device).to(low)
    torch.autograd.backward([y, y_low], [dy, dy_low])
    y_base = plain(*base)
    torch.autograd.backward([y_base, y_base.to(low)], [dy, dy_low])
    y_ref = plain(*ref)
    y_ref.backward(dy.double() + dy_low.double())
    assert_close_to_reference(y, y_base, y_ref, name="out")
    for name, a, bb, r in zip(names, ours, base, ref):
        assert a.grad.dtype == a.dtype
        assert_close_to_reference(a.grad, bb.grad, r.grad, name=f"d{name}")


@pytest.mark.parametrize("used", ["y", "copy"])
def test_add_layer_norm_low_copy_one_output_used(triton_kernels, device, used):
    """Only one of the two outputs reaches the loss (the last layer's copy is never read): the
    gradients are those of the single-output op given that output's gradient, bit for bit."""
    low, rows, n = _low_dtype(device), 6, 48
    x, res = torch.randn(rows, n, device=device).to(low), torch.randn(rows, n, device=device)
    w, b = (t.to(device) for t in _ln_params(n))
    g = torch.randn(rows, n, device=device)
    if used == "copy":
        g = g.to(low)

    def grads(dual):
        inputs = [t.detach().clone().requires_grad_() for t in (x, res, w, b)]
        if dual:
            y, y_low = K.add_layer_norm(*inputs, EPS, low_dtype=low)
            (y if used == "y" else y_low).backward(g)
        else:
            K.add_layer_norm(*inputs, EPS).backward(g.float())
        return [t.grad for t in inputs]

    for a, s in zip(grads(True), grads(False)):
        assert torch.equal(a, s)


def test_add_layer_norm_low_copy_reference_path_and_errors(reference_kernels):
    x, res = torch.randn(3, 8), torch.randn(3, 8)
    w, b = _ln_params(8)
    y, y_low = K.add_layer_norm(x, res, w, b, EPS, low_dtype=torch.bfloat16)
    assert torch.equal(y, K.add_layer_norm(x, res, w, b, EPS)) and torch.equal(y_low, y.to(torch.bfloat16))
    with pytest.raises(ValueError, match="low_dtype"):
        K.add_layer_norm(x, res, w, b, EPS, low_dtype=torch.float64)


# ------------------------------------------------------------ launch parameters: tiles of BLOCK_M rows

# Forced through layer_norm's override (restored after each test): the one-row launch of before the
# tiling, and tiles that leave a partial last tile (23 rows), take several steps per backward program
# and, last, pipeline the backward loop (a no-op in the interpreter; compiled for GPUs by test_fused_ops).
TILINGS = [
    pytest.param({"add_fwd": [1, 4], "add_bwd": [1, 4, 8], "gelu_fwd": [1, 4], "gelu_bwd": [1, 4, 8]},
                 id="one-row"),
    pytest.param({"add_fwd": [4, 4], "add_bwd": [4, 4, 1], "gelu_fwd": [4, 4], "gelu_bwd": [4, 4, 1]},
                 id="4-rows"),
    pytest.param({"add_fwd": [8, 8], "add_bwd": [2, 4, 2, 2], "gelu_fwd": [16, 8], "gelu_bwd": [8, 4, 1, 3]},
                 id="mixed-pipelined"),
]
TILED_ROWS, TILED_N = 23, 100


@pytest.fixture
def ln_launch(monkeypatch):
    """Sets layer_norm's launch override for one test; back to the defaults after it. The backward grid
    is sized as on a 2-SM device on a GPU too: with a real GPU's SM count these few rows would give
    each program one tile, and the loop over several tiles per program (the pipelined one included)
    would go untested where it is compiled."""
    monkeypatch.setattr(L._dispatch, "sm_count", lambda device: 2)
    yield L.set_ln_config_override
    L.set_ln_config_override(None)


def _assert_tiled_split(kind, device):
    """The backward split the override asks for: whole tiles per program, the last tile of the last
    program partial, several steps per program (except one-row launches with many programs)."""
    config = L.ln_config(TILED_N, kind)
    programs, per_program = L.backward_split(TILED_ROWS, config, torch.device(device))
    assert per_program % config.block_m == 0 and programs == -(-TILED_ROWS // per_program)
    if config.block_m > 1:
        assert TILED_ROWS % config.block_m and per_program >= 2 * config.block_m, (config, programs, per_program)
    return config


@pytest.mark.parametrize("x_bias", [False, True], ids=["", "x_bias"])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("tiling", TILINGS)
def test_add_layer_norm_tiled(triton_kernels, device, ln_launch, tiling, p, x_bias):
    """add_layer_norm under each tiling against float64: the low-precision copy bit for bit, both
    output gradients (HAS_DY_LOW), mixed dtypes (STORE_DX), dropout, rows not a multiple of BLOCK_M,
    with and without the dense bias (x_bias: its gradient summed across tiles and programs)."""
    ln_launch(tiling)
    assert L.ln_config(TILED_N, "add_fwd").block_m == tiling["add_fwd"][0]
    _assert_tiled_split("add_bwd", device)
    _check_low_copy(device, TILED_ROWS, TILED_N, p, x_bias)


@pytest.mark.parametrize("tiling", TILINGS)
def test_add_layer_norm_x_bias_tiled_one_dtype(triton_kernels, device, ln_launch, tiling):
    """x_bias with no dropout and one dtype (x's gradient is not stored, it equals the residual's):
    the x-bias gradient is still summed, under each tiling."""
    ln_launch(tiling)
    _assert_tiled_split("add_bwd", device)
    n = TILED_N
    x, res, xb = torch.randn(TILED_ROWS, n), 1.0 + torch.randn(TILED_ROWS, n), torch.randn(n)
    w, b = _ln_params(n)
    _check(lambda x, r, w, b, xb: K.add_layer_norm(x, r, w, b, EPS, x_bias=xb),
           lambda x, r, w, b, xb: F.layer_norm(x + xb + r, (n,), w, b, EPS),
           (x, res, w, b, xb), [torch.float16] * 5, device, ("x", "residual", "weight", "bias", "x_bias"))


@pytest.mark.parametrize("tiling", TILINGS)
def test_gelu_layer_norm_tiled(triton_kernels, device, ln_launch, tiling):
    ln_launch(tiling)
    _assert_tiled_split("gelu_bwd", device)
    n = TILED_N
    x, c = 2.0 * torch.randn(TILED_ROWS, n), torch.randn(n)
    w, b = _ln_params(n)
    _check(lambda x, c, w, b: K.gelu_layer_norm(x, c, w, b, EPS, "tanh"),
           lambda x, c, w, b: F.layer_norm(F.gelu(x + c, approximate="tanh"), (n,), w, b, EPS),
           (x, c, w, b), [torch.float16] * 4, device, ("x", "bias", "weight", "ln_bias"))


@pytest.mark.parametrize("tiling", [pytest.param(None, id="default")] + TILINGS)
def test_dropout_mask_is_a_function_of_the_element_index(triton_kernels, device, ln_launch, tiling):
    """The forward's and the backward's keep masks equal dropout_mask's (one row per program, its own
    kernel) element for element, whatever the tiling. Read exactly: with x = 1, residual = 0 and an
    identity affine map, y > 0 exactly where x was kept, and x's gradient is 0 exactly where dropped."""
    if tiling is not None:
        ln_launch(tiling)
    rows, n, p, seed = 19, 77, 0.3, 11
    torch.manual_seed(seed)
    keep = L.dropout_mask(L.draw_seed(device), rows, n, p)
    x = torch.ones(rows, n, device=device, requires_grad=True)
    zeros, ones = torch.zeros(n, device=device), torch.ones(n, device=device)
    torch.manual_seed(seed)
    y = K.add_layer_norm(x, torch.zeros(rows, n, device=device), ones, zeros, EPS, dropout_p=p)
    assert torch.equal(y > 0, keep)
    y.backward(torch.randn(rows, n, device=device))
    assert torch.equal(x.grad != 0, keep)
    assert 0.2 < 1.0 - keep.float().mean().item() < 0.4


@pytest.mark.parametrize("rows,n,p", [(3, 5, 0.5), (4, 37, 0.1), (2, 768, 0.3), (2, 1000, 0.9)])
def test_dropout_mask_is_the_documented_philox_mask(triton_kernels, device, rows, n, p):
    """dropout_mask (tied above to what the fused kernels apply) equals kernels/philox_dropout.py's
    mapping recomputed in numpy: element (i, 8g + 2w + h) kept when half h of word w of Philox(seed,
    i * ceil(n / 8) + g) is >= round(p * 65536), widths with a partial last group of 8 included."""
    torch.manual_seed(rows * n)
    seed = L.draw_seed(device)
    keep = L.dropout_mask(seed, rows, n, p).cpu()
    assert torch.equal(keep, philox_keep_mask(int(seed.item()), 1, 1, rows, n, p)[0, 0])


def test_dropout_mask_keeps_bits_equal_to_the_threshold(triton_kernels, device):
    """Kept when the 16 bits are >= the threshold, not >: p set to bits / 65536 for drawn values, so that
    some elements sit exactly on the threshold (at random p, one element in 65536 does)."""
    rows, n = 3, 37
    torch.manual_seed(5)
    seed = L.draw_seed(device)
    halves = philox_halves(int(seed.item()), 1, 1, rows, n)[0, 0]
    for bits in (int(halves[0, 0]), int(halves[2, 36]), int(halves[1, 13])):
        if bits == 0:
            continue  # p = 0 draws no mask
        p = bits / 65536
        keep = L.dropout_mask(seed, rows, n, p).cpu()
        assert torch.equal(keep, torch.from_numpy(halves >= bits)), bits


def test_dropout_mask_statistics(triton_kernels, device):
    """The LayerNorm family's keep mask (dropout_mask, which the tests above tie to what the fused
    kernels apply) over 128 rows of 768: keep rate 1 - p, and neighbouring rows (tokens), neighbouring
    columns, and each row against its neighbour shifted by one column agree as often as independent
    coins do (p^2 + (1 - p)^2), each within 5 sigma; no two rows are the same. The tests above only
    checked the overall drop rate: a mask that repeated one row for every token passed them all."""
    rows, n, p = 128, 768, 0.25
    torch.manual_seed(5)
    keep = L.dropout_mask(L.draw_seed(device), rows, n, p).cpu()
    count = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / count) ** 0.5, f"keep rate {rate}"
    agree = p * p + (1 - p) * (1 - p)
    for name, a, b in (("rows", keep[1:], keep[:-1]), ("columns", keep[:, 1:], keep[:, :-1]),
                       ("rows shifted by a column", keep[1:, :-1], keep[:-1, 1:])):
        frac = (a == b).float().mean().item()
        assert abs(frac - agree) < 5 * (agree * (1 - agree) / a.numel()) ** 0.5, f"{name} agree {frac}, want {agree}"
    assert torch.unique(keep, dim=0).shape[0] == rows, "two rows drew the same mask"


def test_ln_config_defaults_override_and_env(monkeypatch, ln_launch):
    """ln_config: GPU defaults within the register budget of layer_norm's note (32 fp32 values per
    thread per forward tile, 8 per backward tile, except a row wider than that allows), the one-row
    launch of before the tiling, the interpreter's small tiles; the override (and FASTBERT_LN_CONFIG,
    read once) replaces them for every width and is checked; None restores the defaults."""
    for n in (1, 37, 128, 384, 768, 1000, 1024, 3072, 4096, L.MAX_WIDTH):
        block_n = L.row_block(n)
        for kind in L.LN_KINDS:
            cfg = L.ln_config(n, kind, interpreting=False)
            backward = kind.endswith("_bwd")
            assert cfg.block_m >= 1 and cfg.block_m & (cfg.block_m - 1) == 0
            per_thread = cfg.block_m * block_n // (32 * cfg.num_warps)
            assert per_thread <= (8 if backward else 32) or (cfg.block_m == 1 and cfg.num_warps == 16), (n, kind, cfg)
            assert (cfg.programs_per_sm >= 1 and cfg.num_stages >= 1) if backward else cfg[2:] == (0, 0)
            old = L.one_row_config(n, kind)
            assert (old.block_m, old.num_warps) == (1, L.row_warps(block_n))
            assert old[2:] == ((8, 1) if backward else (0, 0))
            assert L.ln_config(n, kind, interpreting=True) == L.INTERPRETER_CONFIG["bwd" if backward else "fwd"]
    assert tuple(L.ln_config(768, "add_fwd", interpreting=False)) == (4, 4, 0, 0)  # 4 rows of 768, 6 KB of bf16
    assert tuple(L.ln_config(768, "add_bwd", interpreting=False)) == tuple(L.one_row_config(768, "add_bwd"))
    default = L.ln_config(768, "add_bwd", interpreting=False)

    ln_launch({"add_bwd": [2, 8, 4], "gelu_fwd": [16, 4]})
    assert L.ln_config(768, "add_bwd", interpreting=False) == (2, 8, 4, 1)  # stages default to 1
    assert L.ln_config(37, "gelu_fwd", interpreting=True) == (16, 4, 0, 0)  # every width, interpreter too
    assert L.ln_config(768, "add_fwd", interpreting=False) == (4, 4, 0, 0)  # kinds not named keep defaults
    for bad in ({"add": [1, 4]}, {"add_fwd": [3, 4]}, {"add_fwd": [4, 6]}, {"add_fwd": [4, 8, 2]},
                {"add_bwd": [4, 8]}, {"add_bwd": [4, 8, 0]}, {"gelu_bwd": [4, 8, 2, 0]}, {"add_fwd": [4, 64]}):
        with pytest.raises(ValueError, match="LayerNorm config override"):
            L.set_ln_config_override(bad)
    monkeypatch.setenv("FASTBERT_LN_CONFIG", '{"gelu_bwd": [4, 16, 2, 3]}')
    monkeypatch.setattr(L, "_ln_override_read", False)  # as in a fresh process
    monkeypatch.setattr(L, "_ln_configs", {})
    assert L.ln_config(1024, "gelu_bwd", interpreting=False) == (4, 16, 2, 3)
    assert L.ln_config(768, "add_bwd", interpreting=False) == default  # the environment replaced the override
    monkeypatch.setenv("FASTBERT_LN_CONFIG", '{"gelu_bwd": [1, 1, 1, 1]}')  # read once: a later change is ignored
    assert L.ln_config(1024, "gelu_bwd", interpreting=False) == (4, 16, 2, 3)
    L.set_ln_config_override(None)
    assert L.ln_config(768, "add_bwd", interpreting=False) == default
    assert L.ln_config(1024, "gelu_bwd", interpreting=False) == L.one_row_config(1024, "gelu_bwd")


def test_bias_grad_not_rounded_through_the_weight_dtype(triton_kernels, device):
    # fp16 LayerNorm weight, fp32 bias: the bias gradient must keep fp32 precision
    n = 37
    x, res, dy = torch.randn(3, n), torch.randn(3, n), 300 * torch.randn(3, n)
    w, b = (1 + 0.3 * torch.randn(n)).half(), 0.5 * torch.randn(n)
    ours, base, ref = ([t.to(device=device, dtype=d).clone().requires_grad_() for t, d in zip((x, res, w, b), dts)]
                       for dts in ([None] * 4, [None, None, torch.float32, None], [torch.float64] * 4))
    K.add_layer_norm(*ours, EPS).backward(dy.to(device))
    F.layer_norm(base[0] + base[1], (n,), base[2], base[3], EPS).backward(dy.to(device))
    F.layer_norm(ref[0] + ref[1], (n,), ref[2], ref[3], EPS).backward(dy.to(device, torch.float64))
    assert ours[3].grad.dtype == torch.float32
    assert_close_to_reference(ours[3].grad, base[3].grad, ref[3].grad, name="dbias")
    c = torch.randn(n)
    ours, base, ref = ([t.to(device=device, dtype=d).clone().requires_grad_() for t, d in zip((x, c, w, b), dts)]
                       for dts in ([None] * 4, [None, None, torch.float32, None], [torch.float64] * 4))
    K.gelu_layer_norm(*ours, EPS).backward(dy.to(device))
    F.layer_norm(F.gelu(base[0] + base[1]), (n,), base[2], base[3], EPS).backward(dy.to(device))
    F.layer_norm(F.gelu(ref[0] + ref[1]), (n,), ref[2], ref[3], EPS).backward(dy.to(device, torch.float64))
    assert_close_to_reference(ours[3].grad, base[3].grad, ref[3].grad, name="dln_bias")
