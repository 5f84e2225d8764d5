"""fastbert.autocast_linear: autocast's linear with fp32 weight / bias gradients from the GEMM itself.

On CUDA the model's hot matmuls take this path under bf16 / fp16 autocast; on the CPU (no mm
out_dtype kernel) the tests force it with dtype= (the fp32 product is then the upcast one) and
check what the CUDA path changes: the same forward as autocast, gradients in fp32 that are closer
to float64 than autocast's (rounded once, not twice), the same input gradient, and in the model
five casts fewer per layer.
"""
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_to_reference, max_err

from fastbert import autocast_linear
from fastbert.autocast_linear import linear
from interpreter_bounds import interpreted


def _inputs(n, k, m, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g).requires_grad_()
    w = (torch.randn(m, k, generator=g) / k ** 0.5).requires_grad_()
    b = torch.randn(m, generator=g).requires_grad_() if bias else None
    dy = torch.randn(n, m, generator=g)
    return x, w, b, dy


def _grads(fn, x, w, b, dy):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    y = fn()
    y.backward(dy.to(y.dtype))
    return y, x.grad, w.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 24, 40), (129, 64, 3), (1, 8, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_as_autocast_and_fp32_parameter_gradients(dtype, shape, bias):
    n, k, m = shape
    x, w, b, dy = _inputs(n, k, m, bias)
    with torch.autocast("cpu", dtype=dtype):
        y_ac, dx_ac, dw_ac, db_ac = _grads(lambda: F.linear(x, w, b), x, w, b, dy)
    y, dx, dw, db = _grads(lambda: linear(x, w, b, dtype=dtype), x, w, b, dy)
    assert y.dtype == dtype and torch.equal(y, y_ac)  # the same low-precision forward
    assert dw.dtype == torch.float32 and torch.equal(dx, dx_ac)  # dx: the same low-precision GEMM
    # float64 reference of the gradients of the rounded inputs the GEMMs see
    x_low, w_low, dy_low = x.detach().to(dtype).double(), w.detach().to(dtype).double(), dy.to(dtype).double()
    ref_dw = dy_low.t() @ x_low
    # fp32 from the GEMM: at most fp32 rounding (PyTorch's own fp32 product of the same inputs as baseline)
    baseline = dy.to(dtype).float().t() @ x.detach().to(dtype).float()
    assert_close_to_reference(dw, baseline, ref_dw, name="dW")
    # ... and far closer than autocast's, which rounds dW to the low dtype before its fp32 cast
    assert max_err(dw, ref_dw) < max_err(dw_ac, ref_dw) / 8
    assert_close_to_reference(dx, dx_ac, dy_low @ w_low, name="dx", k=1.0)
    if bias:
        assert db.dtype == torch.float32
        ref_db = dy_low.sum(0)
        assert_close_to_reference(db, dy.to(dtype).float().sum(0), ref_db, name="db")
        assert max_err(db, ref_db) <= max_err(db_ac, ref_db)


def test_three_dimensional_inputs_and_frozen_parts():
    """(B, S, in) inputs as the padded model passes them; a frozen weight gets no GEMM, an input
    that needs no gradient none either (the layer-freezing recipe)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=g)
    w = torch.randn(12, 16, generator=g).requires_grad_()
    y = linear(x, w, None, dtype=torch.bfloat16)
    assert y.shape == (3, 5, 12)
    y.float().sum().backward()
    ref = torch.ones(15, 12).to(torch.bfloat16).double().t() @ x.reshape(15, 16).to(torch.bfloat16).double()
    assert max_err(w.grad, ref) <= 1e-6 * ref.abs().max().item()
    x.requires_grad_()
    w.requires_grad_(False)
    w.grad = None
    linear(x, w, None, dtype=torch.bfloat16).float().sum().backward()
    assert w.grad is None and x.grad.shape == x.shape


def test_second_derivatives_as_autocast_gives_them():
    """create_graph=True (a gradient penalty through x's gradient): the backward recomputes autocast's
    differentiable graph, so the penalty's gradient reaches the weight as with F.linear itself."""
    def penalised_grads(fn):
        x, w, b, _ = _inputs(9, 6, 5, seed=3)
        y = fn(x, w, b)
        (gx,) = torch.autograd.grad(y.float().sum(), x, create_graph=True)
        ((gx ** 2).sum() + (w ** 2).sum()).backward()
        return w.grad, b.grad

    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = penalised_grads(F.linear)
    got = penalised_grads(lambda x, w, b: linear(x, w, b, dtype=torch.bfloat16))
    assert torch.equal(got[0], want[0])  # the same bf16 ops in the same order
    assert got[1] is None and want[1] is None  # the penalty does not reach the bias


def test_second_derivatives_through_the_weight_gradient_reach_the_fp32_input():
    """A penalty on the weight's gradient differentiates dW = dyᵀ·x with respect to x: the graph must
    reach an fp32 x through its cast, although only the bf16 copy is saved."""
    def penalised_grads(fn):
        x, w, b, dy = _inputs(11, 7, 5, seed=4)
        y = fn(x, w, b)
        gw, gb = torch.autograd.grad(y, (w, b), dy.to(y.dtype), create_graph=True)
        ((gw ** 2).sum() + (gb ** 2).sum()).backward()
        return x.grad, gw.dtype

    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_dtype = penalised_grads(F.linear)
    got, got_dtype = penalised_grads(lambda x, w, b: linear(x, w, b, dtype=torch.bfloat16))
    assert got.dtype == torch.float32 and got_dtype == want_dtype == torch.float32
    assert torch.equal(got, want)  # bf16 dW then its fp32 cast, as autocast


def test_only_the_low_precision_input_is_saved():
    """An fp32 input is cast outside the autograd Function (as autocast casts it): the backward keeps
    the bf16 copy, not the fp32 tensor, so the fp32 activation can be freed and changed in place."""
    x, w, b, dy = _inputs(13, 8, 6, seed=5)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape), t.data_ptr()))
        return t

    h = x * 1.0  # an fp32 activation
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = linear(h, w, b, dtype=torch.bfloat16)
    assert (torch.float32, tuple(h.shape), h.data_ptr()) not in saved, saved
    assert (torch.bfloat16, tuple(h.shape)) in [s[:2] for s in saved]
    h.add_(1.0)  # in place after the forward, as autocast's F.linear allows
    y.backward(dy.to(y.dtype))
    ref = dy.to(torch.bfloat16).double().t() @ x.detach().to(torch.bfloat16).double()
    assert_close_to_reference(w.grad, dy.to(torch.bfloat16).float().t() @ x.detach().to(torch.bfloat16).float(),
                              ref, name="dW")


def test_row_blocks_of_one_weight_save_the_parameters_not_their_concatenation():
    """QKV's three weights as row blocks: the same output and gradients as the joined weight (each
    block's gradient the rows of the joined one's, a frozen block none), and the backward keeps the
    parameters and the low-precision copy but no fp32 concatenation (at BERT-base 7 MB per layer held
    from forward to backward), also through a second derivative."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(10, 8, generator=g).requires_grad_()
    blocks = [(torch.randn(m, 8, generator=g) / 8 ** 0.5).requires_grad_() for m in (5, 3, 5)]
    b = torch.randn(13, generator=g).requires_grad_()
    dy = torch.randn(10, 13, generator=g).to(torch.bfloat16)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = linear(x, blocks, b, dtype=torch.bfloat16)
    joined = torch.cat([w.detach() for w in blocks]).requires_grad_()
    y_joined = linear(x, joined, b, dtype=torch.bfloat16)
    assert torch.equal(y, y_joined)
    assert not [t for t in saved if t.dtype == torch.float32 and t.shape == joined.shape]
    assert sum(any(t is w for t in saved) for w in blocks) == 3  # the parameters themselves
    (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    y.backward(dy)
    dx_joined, dw_joined = torch.autograd.grad(y_joined, (x, joined), dy)
    assert torch.equal(dx, dx_joined)
    for w, want in zip(blocks, dw_joined.split([5, 3, 5])):
        assert w.grad.dtype == torch.float32 and torch.equal(w.grad, want)
    blocks[1].requires_grad_(False)
    for w in blocks:
        w.grad = None
    linear(x, blocks, b, dtype=torch.bfloat16).backward(dy)
    assert blocks[1].grad is None and torch.equal(blocks[2].grad, dw_joined[8:])
    blocks[1].requires_grad_()
    # a gradient penalty through dx reaches every block as autocast's F.linear on the joined weight does
    for w in blocks:
        w.grad = None
    (gx,) = torch.autograd.grad(linear(x, blocks, b, dtype=torch.bfloat16).float().sum(), x, create_graph=True)
    (gx ** 2).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = [w.detach().requires_grad_() for w in blocks]
        (gx_ac,) = torch.autograd.grad(F.linear(x, torch.cat(parts), b).float().sum(), x, create_graph=True)
    (gx_ac ** 2).sum().backward()
    for w, want in zip(blocks, parts):
        assert torch.equal(w.grad, want.grad)


def test_the_path_is_taken_only_where_it_runs(monkeypatch):
    """_path_dtype's conditions, with the device side faked: sm_80+ for bf16, not with cuBLAS fp16
    accumulation, not under ROCm, torch.compile, forward-mode AD or torch.func, nor without autograd
    or autocast; then F.linear."""
    class FakeCuda:
        is_cuda, device = True, torch.device("cuda", 0)
    x, w = FakeCuda(), torch.empty(2, 2)
    autocast = {"on": True, "dtype": torch.bfloat16}
    monkeypatch.setattr(autocast_linear, "_MM_OUT_DTYPE", True)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device=None: autocast["on"])
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device=None: autocast["dtype"])
    capability = {"c": (9, 0)}
    monkeypatch.setattr(autocast_linear, "_capability", lambda device: capability["c"])
    assert autocast_linear._path_dtype(x, w) == torch.bfloat16
    capability["c"] = (7, 5)  # a T4: bf16 autocast by emulation, no fp32-output bf16 GEMM
    assert autocast_linear._path_dtype(x, w) is None
    autocast["dtype"] = torch.float16
    assert autocast_linear._path_dtype(x, w) == torch.float16  # fp16 GEMMs run on sm_75 too
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", True, raising=False)
    assert autocast_linear._path_dtype(x, w) is None
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", False, raising=False)
    assert autocast_linear._path_dtype(x, w) == torch.float16
    assert autocast_linear._path_dtype(x, w.double()) is None  # only fp32 weights are autocast's casts
    with torch.no_grad():
        assert autocast_linear._path_dtype(x, w) is None
    with torch.autograd.forward_ad.dual_level():
        assert autocast_linear._path_dtype(x, w) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert autocast_linear._path_dtype(x, w) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert autocast_linear._path_dtype(x, w) is None
    monkeypatch.setattr(torch.version, "hip", None)
    autocast["on"] = False
    assert autocast_linear._path_dtype(x, w) is None
    autocast["on"] = True
    monkeypatch.setattr(autocast_linear, "_MM_OUT_DTYPE", False)  # PyTorch < 2.8
    assert autocast_linear._path_dtype(x, w) is None


@pytest.mark.skipif(not autocast_linear._MM_OUT_DTYPE, reason="PyTorch < 2.8: no mm out_dtype, the path is off")
def test_the_cuda_gemm_call_is_valid():
    """The CUDA path's product, on meta tensors: mm's out_dtype overload takes a transposed 16-bit
    operand and gives fp32 (the CPU has no kernel for it, so this is where the call is checked)."""
    a = torch.empty(40, 37, dtype=torch.bfloat16, device="meta").t()
    b = torch.empty(40, 24, dtype=torch.bfloat16, device="meta")
    out = autocast_linear._mm_fp32(a, b)
    assert out.dtype == torch.float32 and out.shape == (37, 24) and out.device.type == "meta"


def test_off_the_cuda_autocast_path_it_is_f_linear():
    x, w, b, _ = _inputs(5, 8, 6)
    assert autocast_linear._path_dtype(x, w) is None  # CPU
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_linear._path_dtype(x, w) is None
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))


@interpreted
def test_the_model_drops_five_casts_per_layer_and_keeps_its_gradients(triton_kernels, monkeypatch):
    """The model's Linears take the path (as they do on CUDA; here forced under CPU fp16 autocast, the
    Triton kernels interpreted): every parameter gradient stays within fp16-level rounding of the
    autocast run's, and the backward issues five fewer dtype casts per layer (QKV weight and bias,
    three weights) and five fewer in the heads."""
    from torch.profiler import ProfilerActivity, profile

    from fastbert import BertConfig, BertForPreTraining

    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForPreTraining(config).train()
    ids = torch.randint(5, 97, (2, 12))
    labels = torch.full((2, 12), -100)
    labels[:, 3] = ids[:, 3]
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                 labels=labels, next_sentence_label=torch.tensor([0, 1]))

    def run(forced):
        monkeypatch.setattr(autocast_linear, "_path_dtype",
                            (lambda x, w: torch.float16 if torch.is_autocast_enabled("cpu") else None) if forced
                            else (lambda x, w: None))
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch).loss
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss.backward()
        # every dtype cast of the backward (autograd's ToCopyBackward and its engine's alike), except the
        # CPU's upcasts standing in for CUDA's one fp32-output GEMM and the CPU sum's internal cast (CUDA's
        # sum with a dtype is one kernel)
        casts = sum(1 for e in prof.events() if e.name == "aten::_to_copy"
                    and any(c.name == "aten::copy_" for c in e.cpu_children)
                    and not {"gemm_stand_in", "aten::sum"} & set(_ancestors(e)))
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, casts

    real_mm = autocast_linear._mm_fp32

    def marked_mm(a, b):
        with torch.profiler.record_function("gemm_stand_in"):
            return real_mm(a, b)
    monkeypatch.setattr(autocast_linear, "_mm_fp32", marked_mm)
    autocast_grads, autocast_casts = run(False)
    grads, casts = run(True)
    # per layer QKV weight and bias, attention output, both feed-forward weights; in the heads the MLM
    # transform's weight, the pooler's and the NSP classifier's weights and biases
    assert autocast_casts - casts == 5 * config.num_hidden_layers + 5, (autocast_casts, casts)
    assert grads.keys() == autocast_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32
        scale = autocast_grads[name].abs().max().item()
        # the autocast run's fp16 rounding of each weight gradient and of the activations before them: a
        # few fp16 ulps of the largest entry (2.5e-3 of it measured; fp16's ulp is 9.8e-4 relative)
        assert max_err(g, autocast_grads[name]) <= 0.01 * scale + 1e-6, name


def _ancestors(event):
    names = []
    while event.cpu_parent is not None:
        event = event.cpu_parent
        names.append(event.name)
    return names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_takes_the_path_and_its_gemm(device, dtype):
    """On a GPU (benchmarks/gpu_check.sh): under CUDA autocast `linear` takes the fp32-gradient path by
    itself, and the real fp32-output cuBLAS GEMM gives dW within fp32 rounding of float64."""
    if device != "cuda":
        pytest.skip("the CUDA path; its CPU stand-in is tested above")
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16's fp32-output GEMM needs sm_80: F.linear there")
    x, w, b, dy = (t.detach().to(device).requires_grad_(t.requires_grad) for t in _inputs(300, 768, 200))
    with torch.autocast("cuda", dtype=dtype):
        assert autocast_linear._path_dtype(x, w) == dtype
        y = linear(x, w, b)
        y_ac = F.linear(x, w, b)
    assert torch.equal(y, y_ac)
    y.backward(dy.to(dtype))
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    x_low, w_low, dy_low = x.detach().to(dtype), w.detach().to(dtype), dy.to(dtype)
    ref = dy_low.double().t() @ x_low.double()
    assert_close_to_reference(w.grad, dy_low.float().t() @ x_low.float(), ref, name="dW")
    assert_close_to_reference(b.grad, dy_low.float().sum(0), dy_low.double().sum(0), name="db")
    assert torch.equal(x.grad, (dy_low @ w_low).float())  # dx: the same low-precision GEMM as autocast's


def test_the_path_at_the_edges_of_its_conditions(monkeypatch):
    """An A100 (sm_80, the first with the fp32-output bf16 GEMM) takes the bf16 path; a CPU tensor under
    a CUDA autocast does not (the CPU has no out_dtype kernel), nor a call inside torch.func's vmap."""
    class FakeCuda:
        is_cuda, device = True, torch.device("cuda", 0)
    w = torch.empty(2, 2)
    monkeypatch.setattr(autocast_linear, "_MM_OUT_DTYPE", True)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device=None: True)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device=None: torch.bfloat16)
    monkeypatch.setattr(autocast_linear, "_capability", lambda device: (8, 0))
    assert autocast_linear._path_dtype(FakeCuda(), w) == torch.bfloat16
    assert autocast_linear._path_dtype(torch.empty(2, 2), w) is None
    seen = []

    def probe(t):
        seen.append(autocast_linear._path_dtype(FakeCuda(), w))
        return t
    torch.func.vmap(probe)(torch.ones(3))
    assert seen == [None]


def test_a_frozen_side_saves_nothing_for_its_gradient():
    """A frozen weight's gradient is not computed, so the input copy it would need is not kept; an input
    that needs no gradient keeps no low-precision weight copy (the layer-freezing recipe's memory)."""
    x, w, b, dy = _inputs(6, 8, 4, seed=9)
    x = x.detach()

    def saved_shapes(x, w):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t,
                                                      lambda t: t):
            y = linear(x, w, b, dtype=torch.bfloat16)
        y.backward(dy.to(y.dtype))
        return saved
    both = saved_shapes(x.requires_grad_(), w)
    assert (torch.bfloat16, (6, 8)) in both and (torch.bfloat16, (4, 8)) in both
    frozen_w = saved_shapes(x, w.detach())
    assert (torch.bfloat16, (6, 8)) not in frozen_w and (torch.bfloat16, (4, 8)) in frozen_w
    fixed_x = saved_shapes(x.detach(), w)
    assert (torch.bfloat16, (6, 8)) in fixed_x and (torch.bfloat16, (4, 8)) not in fixed_x
