"""K.mlm_loss: the fused linear + cross-entropy Triton kernels against a float64 reference.

On the CPU the Triton kernels run in Triton's interpreter (the ``triton_kernels`` fixture); with
FASTBERT_TEST_GPU=1 on a CUDA machine the same bodies run compiled, and the ``gpu`` tests add bf16,
memory, CUDA-graph and torch.compile checks.

Tolerance (tests/tolerance.py): ours in dtype X vs float64, at most 2x the error of PyTorch's own
implementation in dtype X — full logits by addmm in X, then F.cross_entropy in X, autograd in X.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastbert.kernels as K
from fastbert.kernels import linear_cross_entropy as lce
from tolerance import assert_close_to_reference

IGNORE = -100


def _inputs(rows, h, vocab, dtype, device, ignored=0.85, ignore_index=IGNORE, noncontiguous=False):
    """Fresh random inputs; ~`ignored` of the labels are ignore_index, but at least two are real."""
    if noncontiguous:  # a column slice of a wider buffer: row stride != h
        hidden = torch.randn(rows, h + 11, dtype=torch.float64, device=device)[:, 3:3 + h]
    else:
        hidden = torch.randn(rows, h, dtype=torch.float64, device=device)
    # logits with std ~2: a softmax neither flat nor one-hot
    weight = torch.randn(vocab, h, dtype=torch.float64, device=device) * (2.0 / h ** 0.5)
    bias = torch.randn(vocab, dtype=torch.float64, device=device) * 0.5
    labels = torch.randint(0, vocab, (rows,), device=device)
    drop = torch.rand(rows, device=device) < ignored
    drop[:2] = False
    labels = torch.where(drop, torch.full_like(labels, ignore_index), labels)
    labels = labels[torch.randperm(rows, device=device)]
    return hidden, weight, bias, labels


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _pytorch_mlm_loss(hidden, weight, bias, labels, ignore_index=IGNORE):
    """PyTorch's own way in the input dtype: the full logits, then F.cross_entropy."""
    logits = torch.addmm(bias, hidden, weight.t())
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def _run(fn, leaves, labels, **kw):
    loss = fn(*leaves, labels, **kw)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _check_against_reference(rows, h, vocab, dtype, device, noncontiguous=False, ignore_index=IGNORE):
    hidden, weight, bias, labels = _inputs(rows, h, vocab, dtype, device, noncontiguous=noncontiguous,
                                           ignore_index=ignore_index)
    reference = _run(K.reference.mlm_loss, _leaves((hidden, weight, bias), torch.float64), labels,
                     ignore_index=ignore_index)
    baseline = _run(_pytorch_mlm_loss, _leaves((hidden, weight, bias), dtype), labels, ignore_index=ignore_index)
    ours_leaves = _leaves((hidden, weight, bias), dtype)
    if noncontiguous:  # keep the strided layout in the tensor the kernel sees
        wide = torch.zeros(rows, h + 11, dtype=dtype, device=device)
        wide[:, 3:3 + h] = ours_leaves[0].detach()
        ours_leaves[0] = wide[:, 3:3 + h].requires_grad_()
        assert not ours_leaves[0].is_contiguous()
    ours = _run(K.mlm_loss, ours_leaves, labels, ignore_index=ignore_index)
    assert ours[0].dtype == dtype and ours[0].dim() == 0
    for name, a, b, r in zip(("loss", "d_hidden", "d_weight", "d_bias"), ours, baseline, reference):
        assert a.dtype == dtype, name
        assert_close_to_reference(a, b, r, k=2, name=f"{name} {dtype} rows={rows} h={h} vocab={vocab}")


# ------------------------------------------------------------------------- interpreter (every CI)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,h,vocab,chunk_rows", [
    (45, 37, 1031, 16),     # 3 balanced chunks of 15: the fp32 d_weight / d_bias accumulation across chunks
    (33, 64, 1031, None),   # one chunk; the d_weight reduction loops over several row tiles
    (6, 64, 30522, None),   # BERT's vocabulary: the online log-sum-exp over several vocabulary tiles
    (5, 37, 30522, 2),      # ... with chunks of 2 rows and an odd width
])
def test_loss_and_grads(triton_kernels, device, monkeypatch, dtype, rows, h, vocab, chunk_rows):
    if chunk_rows is not None:
        monkeypatch.setattr(lce, "CHUNK_ELEMENTS", chunk_rows * vocab)
    _check_against_reference(rows, h, vocab, dtype, device)


def test_noncontiguous_hidden_and_custom_ignore_index(triton_kernels, device, monkeypatch):
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 16 * 1031)
    _check_against_reference(40, 37, 1031, torch.float32, device, noncontiguous=True, ignore_index=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_ignored_gives_exact_zeros(triton_kernels, device, dtype):
    hidden, weight, bias, labels = _inputs(9, 37, 1031, dtype, device)
    labels = torch.full_like(labels, IGNORE)
    leaves = _leaves((hidden, weight, bias), dtype)
    loss, dh, dw, db = _run(K.mlm_loss, leaves, labels)
    assert loss.dtype == dtype and loss.item() == 0.0
    for name, g, t in (("d_hidden", dh, hidden), ("d_weight", dw, weight), ("d_bias", db, bias)):
        assert g.shape == t.shape and g.dtype == dtype
        assert torch.count_nonzero(g) == 0, name


def test_no_rows(triton_kernels, device):
    hidden, weight, bias, _ = _inputs(4, 37, 1031, torch.float32, device)
    leaves = _leaves((hidden[:0], weight, bias), torch.float32)
    loss, dh, dw, db = _run(K.mlm_loss, leaves, torch.empty(0, dtype=torch.int64, device=device))
    assert loss.item() == 0.0 and dh.shape == (0, 37)
    assert torch.count_nonzero(dw) == 0 and torch.count_nonzero(db) == 0


def test_no_grad_path_and_determinism(triton_kernels, device):
    hidden, weight, bias, labels = _inputs(20, 37, 1031, torch.float32, device)
    leaves = _leaves((hidden, weight, bias), torch.float32)
    with torch.no_grad():  # compute_grad=False: the forward writes no dlogits
        plain = K.mlm_loss(*leaves, labels)
    first = _run(K.mlm_loss, leaves, labels)
    for t in leaves:
        t.grad = None
    second = _run(K.mlm_loss, leaves, labels)
    assert torch.equal(plain, first[0])
    for a, b in zip(first, second):  # no atomics: bitwise repeatable
        assert torch.equal(a, b)
    # A forward run without gradients, differentiated anyway: the backward recomputes them.
    for t in leaves:
        t.grad = None
    loss = torch.ops.fastbert.mlm_loss(*leaves, labels, IGNORE, False)[0]
    loss.backward()
    for a, b in zip([loss.detach()] + [t.grad for t in leaves], first):
        assert torch.equal(a, b)


def _nan_empty(shape, device, dtype):
    """Stands in for lce._empty: uninitialised memory on a GPU is garbage, in the interpreter it is
    often zeros, which hides any read of a buffer region nobody wrote."""
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_uninitialised_buffers_never_read(triton_kernels, device, monkeypatch, dtype):
    """Every buffer the op allocates uninitialised starts as NaN: a read of any element the op did
    not write first (padding columns, rows past a short last chunk, the d_weight / d_bias
    accumulators, the fp32 scratch) would make an output non-finite or wrong. 150 rows in chunks
    of 64 (rows of a chunk rounded up to 64): 64 + 64 + 22 rows, the last chunk shorter than the
    buffer; vocab 203 → 256 padded columns."""
    monkeypatch.setattr(lce, "_empty", _nan_empty)
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 64 * 203)
    monkeypatch.setattr(lce, "_dw_block_rows", lambda h: 64)  # several scratch blocks, a short last one
    assert lce._chunk_rows(150, 203) == 64 and lce._vocab_pad(203) == 256
    _check_against_reference(150, 37, 203, dtype, device)


def test_uninitialised_buffers_single_short_chunk(triton_kernels, device, monkeypatch):
    """One chunk with fewer rows than the 64-row tiles, NaN-filled buffers, no-grad and grad paths."""
    monkeypatch.setattr(lce, "_empty", _nan_empty)
    _check_against_reference(21, 37, 203, torch.float32, device)
    hidden, weight, bias, labels = _inputs(21, 37, 203, torch.float32, device)
    with torch.no_grad():
        loss = K.mlm_loss(hidden.float(), weight.float(), bias.float(), labels)
    ref = K.reference.mlm_loss(hidden, weight, bias, labels)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_out_dtype_float32(triton_kernels, device, monkeypatch, dtype):
    """out_dtype=float32: the loss is the fp32 sum / count, not rounded to the 16-bit dtype (as
    autocast's cross-entropy returns it); the gradients are unchanged and in the inputs' dtype."""
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 16 * 1031)
    hidden, weight, bias, labels = _inputs(40, 37, 1031, dtype, device)
    ref = _run(K.reference.mlm_loss, _leaves((hidden, weight, bias), torch.float64), labels)
    plain = _run(lce.mlm_loss, _leaves((hidden, weight, bias), dtype), labels)
    wide = _run(lambda *a: lce.mlm_loss(*a, out_dtype=torch.float32), _leaves((hidden, weight, bias), dtype),
                labels)
    assert plain[0].dtype == dtype and wide[0].dtype == torch.float32
    assert wide[0].to(dtype) == plain[0]
    # the logits are rounded to dtype (as in PyTorch), so the loss cannot beat the fp16 inputs'
    # accuracy, but the fp32 result carries no extra rounding of its own
    err_wide = abs(wide[0].double() - ref[0]).item()
    err_plain = abs(plain[0].double() - ref[0]).item()
    if dtype == torch.float32:
        assert wide[0].item() == plain[0].item()
    else:
        assert err_wide <= err_plain + 1e-6
    for a, b in zip(wide[1:], plain[1:]):
        assert a.dtype == dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="out_dtype"):
        lce.mlm_loss(*_leaves((hidden, weight, bias), dtype), labels, out_dtype=torch.int32)


@pytest.mark.parametrize("bad", [1031, 5000, -1, -101])
def test_labels_out_of_range_raise(device, bad):
    hidden, weight, bias, labels = _inputs(8, 37, 1031, torch.float32, device)
    labels[3] = bad
    with pytest.raises(ValueError, match="labels"):
        K.mlm_loss(hidden.float(), weight.float(), bias.float(), labels)


def test_opcheck(triton_kernels, device):
    hidden, weight, bias, labels = _inputs(12, 37, 203, torch.float32, device)
    hidden, weight, bias = _leaves((hidden, weight, bias), torch.float32)
    for compute_grad in (True, False):
        torch.library.opcheck(torch.ops.fastbert.mlm_loss.default,
                              (hidden, weight, bias, labels, IGNORE, compute_grad))
    h16, w16, b16 = _leaves((hidden, weight, bias), torch.float16)
    torch.library.opcheck(torch.ops.fastbert.mlm_loss.default, (h16, w16, b16, labels, IGNORE, True, True))
    with torch.no_grad():
        _, dh, dw, db = torch.ops.fastbert.mlm_loss(hidden, weight, bias, labels, IGNORE, True)
    grad = torch.tensor(0.75, device=device)
    torch.library.opcheck(torch.ops.fastbert.mlm_loss_backward.default, (grad, labels, IGNORE, dh, dw, db))


def test_torch_compile_fullgraph(triton_kernels, device):
    """The op traces into one graph (fake impl, autograd) and gives the eager bits back.

    It calls the Triton module's entry point: fastbert.kernels' dispatcher imports it with
    importlib.import_module, which dynamo refuses under fullgraph (reported to the lead)."""
    hidden, weight, bias, labels = _inputs(12, 37, 203, torch.float32, device)
    leaves = _leaves((hidden, weight, bias), torch.float32)
    eager = _run(lambda *a: lce.mlm_loss(*a, IGNORE), leaves, labels)
    leaves = _leaves((hidden, weight, bias), torch.float32)
    compiled = torch.compile(lambda hh, ww, bb, ll: lce.mlm_loss(hh, ww, bb, ll, IGNORE),
                             backend="aot_eager" if device == "cpu" else "inductor", fullgraph=True)
    got = _run(compiled, leaves, labels)
    for a, b in zip(got, eager):
        assert torch.equal(a, b)


# ------------------------------------------------------------------- ahead-of-time GPU compilation

def _ptr(dtype):
    return {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def test_aot_compile_ce_rows():
    from aot import compile_in_subprocess
    sig = {"logits_ptr": "", "bias_ptr": "", "labels_ptr": "*i64", "loss_ptr": "*fp32", "vocab": "i32",
           "vocab_pad": "i32", "stride_row": "i32",
           "ignore_index": "i32", "compute_grad": "i32", "BLOCK_V": "constexpr"}
    block_v, _ = lce._ce_config(30522, interpreted=False)
    configs = [(dict(sig, logits_ptr=_ptr(dtype), bias_ptr=_ptr(dtype)), {"BLOCK_V": block_v}) for dtype in _DTYPES]
    # smaller vocabularies pick smaller tiles: the extremes, in bf16
    configs += [(dict(sig, logits_ptr="*bf16", bias_ptr="*bf16"),
                 {"BLOCK_V": lce._ce_config(vocab, interpreted=False)[0]}) for vocab in (10, 1031)]
    compile_in_subprocess("fastbert.kernels.linear_cross_entropy", "_ce_rows_kernel", configs)


# The launcher always passes vocab_pad = stride = a multiple of 64, which Triton's launcher marks
# divisible by 16 (as it does 16-byte-aligned pointers): the variant that actually runs on the GPU.
# tests/aot.py takes no attributes, so this compiles it in its own clean child process and also
# checks what the padding is for: vector loads / stores of the logits rows (before the padding: 65 scalar 2-byte loads per thread in bf16, no ld.global.v4).
_ALIGNED_SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastbert.kernels import linear_cross_entropy as lce
    results = []
    for kernel, signature, constexprs, div16, arch in json.loads(sys.argv[1]):
        fn = getattr(lce, kernel)
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
        try:
            c = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32))
            assert c.asm.get("cubin"), "no cubin produced"
            ptx = c.asm["ptx"]
            results.append({k: len(re.findall(p, ptx)) for k, p in (
                ("v4_loads", r"ld\.global\.v4"), ("v4_stores", r"st\.global\.v4"),
                ("scalar16_loads", r"ld\.global\.b16"), ("cp_async", r"cp\.async\.(?:ca|cg)"))})
        except Exception as exc:
            results.append({"error": f"{kernel} sm_{arch} {constexprs}: {type(exc).__name__}: {str(exc)[:400]}"})
    print(json.dumps(results))
""")


def _compile_aligned(jobs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _ALIGNED_SCRIPT, json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    return results


def test_aot_aligned_variants_vectorise():
    vocab = 30522
    vpad = lce._vocab_pad(vocab)
    assert vpad % 64 == 0 and vocab <= vpad < vocab + 64
    jobs = []
    block_v, _ = lce._ce_config(vocab, interpreted=False)
    for dtype in _DTYPES:
        sig = {"logits_ptr": _ptr(dtype), "bias_ptr": _ptr(dtype), "labels_ptr": "*i64", "loss_ptr": "*fp32",
               "vocab": "i32",
               "vocab_pad": "i32", "stride_row": "i32", "ignore_index": "i32", "compute_grad": "i32",
               "BLOCK_V": "constexpr"}
        for arch in (90, 80):
            jobs.append(("_ce_rows_kernel", sig, {"BLOCK_V": block_v},
                         ["logits_ptr", "bias_ptr", "labels_ptr", "loss_ptr", "vocab_pad", "stride_row"], arch))
    results = _compile_aligned(jobs)
    for (kernel, sig, _, _, arch), r in zip(jobs, results):
        where = f"{kernel} {sig['logits_ptr']} sm_{arch}: {r}"
        # both sweeps load 16-byte vectors of the row, the second also stores them; the target
        # logit comes out of the first sweep (no scalar load racing with the in-place stores)
        assert r["v4_loads"] >= 2 and r["v4_stores"] >= 1, where
        assert r["scalar16_loads"] == 0, where


def test_aot_compile_scale_cast():
    from aot import compile_in_subprocess
    pairs = [(torch.float32, d) for d in _DTYPES] + [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)]
    configs = [({"x_ptr": _ptr(s), "out_ptr": _ptr(d), "scale_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                {"BLOCK": lce._scale_block(interpreted=False)}) for s, d in pairs]
    compile_in_subprocess("fastbert.kernels.linear_cross_entropy", "_scale_cast_kernel", configs)


# ------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("rows,h", [(300, 768), (257, 1024)])
def test_gpu_bf16(triton_kernels, device, rows, h):
    if device != "cuda":
        pytest.skip("needs CUDA (FASTBERT_TEST_GPU=1)")
    _check_against_reference(rows, h, 30522, torch.bfloat16, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_large_rows_chunked(triton_kernels, device, dtype):
    if device != "cuda":
        pytest.skip("needs CUDA (FASTBERT_TEST_GPU=1)")
    _check_against_reference(2500, 768, 30522, dtype, device)  # 2 chunks of 1280 / 1220 rows


@pytest.mark.gpu
def test_gpu_memory_bounded(triton_kernels, device):
    """Peak extra memory of forward+backward stays below the size of the full logits alone."""
    if device != "cuda":
        pytest.skip("needs CUDA (FASTBERT_TEST_GPU=1)")
    rows, h, vocab = 8192, 768, 30522
    hidden, weight, bias, labels = _inputs(rows, h, vocab, torch.bfloat16, device, ignored=0.0)
    hidden, weight, bias = _leaves((hidden, weight, bias), torch.bfloat16)
    K.mlm_loss(hidden, weight, bias, labels).backward()  # warm-up: compile outside the measurement
    for t in (hidden, weight, bias):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    K.mlm_loss(hidden, weight, bias, labels).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    full_logits = rows * vocab * 2
    assert peak < full_logits, f"peak {peak / 2**20:.0f} MiB >= full logits {full_logits / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_gpu_cuda_graph_and_compile(triton_kernels, device):
    """No host sync inside the op: it captures in a CUDA graph; torch.compile(fullgraph) with inductor."""
    if device != "cuda":
        pytest.skip("needs CUDA (FASTBERT_TEST_GPU=1)")
    hidden, weight, bias, labels = _inputs(500, 768, 30522, torch.bfloat16, device)
    hidden, weight, bias = _leaves((hidden, weight, bias), torch.bfloat16)
    eager = _run(K.mlm_loss, (hidden, weight, bias), labels)

    op = torch.ops.fastbert.mlm_loss
    with torch.no_grad():
        op(hidden, weight, bias, labels, IGNORE, True)  # warm-up (Triton compiles) outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = op(hidden, weight, bias, labels, IGNORE, True)
        graph.replay()
        torch.cuda.synchronize()
        again = op(hidden, weight, bias, labels, IGNORE, True)
    for a, b in zip(static, again):
        assert torch.equal(a, b)

    leaves = _leaves((hidden, weight, bias), torch.bfloat16)
    compiled = torch.compile(lambda hh, ww, bb, ll: lce.mlm_loss(hh, ww, bb, ll, IGNORE), fullgraph=True)
    got = _run(compiled, leaves, labels)
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
