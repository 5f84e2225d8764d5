"""K.add_layer_norm and K.gelu_layer_norm's Triton kernels against float64.

Tolerance rule (tests/tolerance.py): our error <= 2 x PyTorch's own error in the same dtype, for the
output and every gradient. Dropout: the kernels' Philox mask is rebuilt with
layer_norm.dropout_mask from the same seed, so forward and backward are checked against the
reference with that mask; repeatability under torch.manual_seed is checked bit for bit.
bf16 runs on CUDA only (the interpreter mishandles bf16 arithmetic).
"""
import pytest
import torch
import torch.nn.functional as F

import fastbert.kernels as K
from fastbert.kernels import layer_norm as L
from tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]
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
    p, rows, seed = 0.25, 6, 1234
    torch.manual_seed(seed)
    keep = L.dropout_mask(L.draw_seed(device), rows, n, p)  # the mask the op will draw after the same seed
    scale = 1.0 / (1.0 - p)
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
@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_add_layer_norm_mixed_dtypes_noncontiguous(triton_kernels, device, x_dtype, res_dtype, p):
    # The bf16-autocast pattern in fp16 (the interpreter's stand-in for bf16): a low-precision
    # sublayer output added to an fp32 residual stream with fp32 LayerNorm parameters. The output is
    # promote_types(x, residual), as x + residual and transformers' fp32 LayerNorm give, and each
    # gradient comes back in its input's dtype. Transposed inputs (copied inside).
    n, rows, seed = 100, 9, 99
    torch.manual_seed(seed)
    keep = L.dropout_mask(L.draw_seed(device), rows, n, p) if p else None
    scale = 1.0 / (1.0 - p)
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
    # bf16 is what autocast uses; the interpreter mishandles bf16 arithmetic, so on the CPU fp16 stands in
    return torch.bfloat16 if device == "cuda" else torch.float16


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("rows, n", [(9, 100), (40, 768)])
def test_add_layer_norm_low_copy(triton_kernels, device, rows, n, p):
    """low_dtype: the copy is y.to(low_dtype) bit for bit, and the backward, given gradients for both
    outputs, is the float64 reference's with the two gradients summed (the autocast pattern: a low
    sublayer output, an fp32 residual stream whose copy feeds the next matmul). Odd width, several
    rows per backward program, transposed inputs, dropout."""
    low, seed = _low_dtype(device), 7
    torch.manual_seed(seed)
    keep = L.dropout_mask(L.draw_seed(device), rows, n, p) if p else None
    x, res = torch.randn(n, rows).t(), 1.0 + torch.randn(n, rows).t()
    w, b = _ln_params(n)
    ours = [t.to(device=device, dtype=d).requires_grad_() for t, d in
            zip((x, res, w, b), (low, torch.float32, torch.float32, torch.float32))]
    base = [t.detach().clone().requires_grad_() for t in ours]
    ref = [t.detach().to(torch.float64).requires_grad_() for t in ours]

    def plain(x, r, w, b):
        h = x.to(r.dtype) if keep is None else x.to(r.dtype) * keep.to(r.dtype) / (1.0 - p)
        return F.layer_norm(h + r, (n,), w.to(r.dtype), b.to(r.dtype), EPS)

    torch.manual_seed(seed)
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
    for name, a, bb, r in zip(("x", "residual", "weight", "bias"), ours, base, ref):
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
