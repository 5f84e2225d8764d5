"""Fused linear + cross-entropy: the masked-LM loss without the (rows, vocab) logits.

Computes, for hidden (rows, h), weight (vocab, h), bias (vocab,), labels (rows,) int64:

    loss = Σ_{r: labels[r] != ignore_index} (lse_r - logit_{r, labels[r]}) / max(1, #labelled rows)
    logits = hidden @ weightᵀ + bias,  lse_r = log Σ_v exp(logit_{r, v})

and the gradients of hidden, weight and bias.

Design (a chunked design, after Liger-Kernel's fused linear cross-entropy):
the rows are processed in balanced chunks of ``C`` rows, C·vocab ≤ ``CHUNK_ELEMENTS``, so at most one
(C, vocab_pad) block of logits exists at any time (≤ 128 MiB in bf16), whatever ``rows`` is. Its rows
are padded to vocab_pad = a multiple of 64 columns (30522 → 30528), so that Triton can use 16-byte
vector loads / stores on them and cuBLAS gets an aligned leading dimension; the GEMMs see only the
first vocab columns (a row-strided view), the padding columns of dlogits are zeros.
Chunk size trade-off: each chunk after the first writes its fp32 d_weight product to a scratch and
adds it into the fp32 d_weight (4·vocab·h·4 B, 375 MB at BERT-base), so fewer chunks save HBM
traffic, but the logits block is the op's largest allocation. With 2^26 elements, 4915 masked rows
(a 32k-token batch) run as 3 chunks of ≤ 1664 rows (102 MB buffer) and the peak stays ≈ 220 MB at
h=768 (buffer + fp32 d_weight + 16 MiB scratch + d_hidden): about 1/4 of eager's ≈ 900 MB
(bf16 logits, log-softmax and their gradient alive at once). 2 chunks would need a 150 MB buffer
(peak ≈ 250 MB, over 1/4). At h=1024 the fp32 d_weight alone is 125 MB and the peak ≈ 237 MB.
For each chunk:
  1. cuBLAS: logits_c = hidden_c @ weightᵀ                    (torch.mm into a reused buffer)
  2. Triton ``_ce_rows_kernel``, one program per row: adds the bias, an online log-sum-exp over
     vocabulary tiles (fp32) that also picks out the target logit, the per-row loss, and — when
     gradients are wanted — a second sweep over the same row
     (still in L1/L2) that overwrites the logits with dlogits = softmax - onehot (zero rows for ignored
     labels). The 1/count scale is not applied here: it is applied in fp32 at the very end, so the
     low-precision dlogits keep their full relative precision (p - onehot is O(1); p/count is not).
  3. cuBLAS: d_hidden_c = dlogits_c @ weight                   (rows are independent: no accumulation)
  4. cuBLAS: d_weight (+)= dlogits_cᵀ @ hidden_c with fp32 accumulation and an fp32 result (mm's
     out_dtype for 16-bit inputs; later chunks through a ≤ 16 MiB fp32 scratch, a block of vocabulary
     rows at a time, added into the fp32 d_weight); d_bias (+)= Σ_rows dlogits_c (torch.sum in fp32).
The gradients are computed during the forward pass (3 GEMMs in all instead of the 4 a recompute-in-
backward design needs) when autograd will want them; the backward op only multiplies them by
grad_output / count in fp32 and casts (``_scale_cast_kernel``).

Supports: fp32, fp16, bf16 (hidden, weight and bias are brought to hidden's dtype); any vocab and h;
non-contiguous hidden / weight; rows with and without labels in any mix; no labelled row at all
(loss 0.0 and zero gradients); zero rows. The count of labelled rows stays a device tensor and the op
never synchronises the host, so it can be captured in a CUDA graph and traced by torch.compile.
Deterministic: fixed reduction orders, no atomics (cuBLAS and torch.sum are deterministic here).

Not supported: float64 (the public wrapper computes it with the PyTorch reference); label smoothing,
class weights, reductions other than the mean.

Caution:
- Rows whose label is ignore_index still cost their share of the GEMMs: gather the labelled rows
  first (the model does) — this op cannot compact them without a data-dependent shape.
- Forward with autograd on holds d_weight in fp32 (vocab·h·4 bytes) until the backward runs.
- fp32 inputs: the logits block is twice as large (≤ 256 MiB).
- The GEMMs write into / read a row-strided (non-contiguous) view, which cuBLAS takes without a
  copy; the bias is added in the CE-row kernel (addmm into such a view copies the bias in first).
- fp32 d_weight accumulation across chunks relies on torch.mm(..., out_dtype=torch.float32) on CUDA
  (PyTorch ≥ 2.8); the CPU (interpreter) path upcasts to fp32 instead.
- The logits block is in the input dtype (as in eager PyTorch); softmax statistics are fp32.
- fp32 inputs: the three cuBLAS GEMMs follow torch.backends.cuda.matmul.allow_tf32 (off by default);
  turning TF32 on globally trades the fp32 accuracy away.
- A forward run without gradients (no_grad, or no input requiring grad) that is differentiated anyway
  (only possible by calling torch.ops.fastbert.mlm_loss directly) recomputes them in the backward.
- Label range is checked by ``fastbert.kernels.mlm_loss`` (a host sync); here an out-of-range label
  matches no column (target 0 or -inf: a wrong loss, never an out-of-bounds access).
- The loss is in hidden's dtype unless out_dtype=torch.float32 (then the fp32 sum / count as is).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Bound on rows·vocab of the one logits block that exists at a time (2**26 → ≤ 128 MiB in bf16, at
# most 2198 rows of vocab 30522; see "Chunk size trade-off" above). Interpreted tests use rows far
# below it, and lower it to force several chunks on tiny inputs.
CHUNK_ELEMENTS = 1 << 26

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ------------------------------------------------------------------------------------ Triton kernels

# compute_grad is a runtime flag (one uniform branch per program), not a constexpr: one compiled
# variant per dtype instead of two; do_not_specialize keeps the value 1 from forking another.
@triton.jit(do_not_specialize=["compute_grad"])
def _ce_rows_kernel(
    logits_ptr,      # *T (n_rows, vocab_pad): hidden @ weightᵀ of this chunk (no bias) in columns < vocab,
                     #   anything (uninitialised) in the padding; overwritten with softmax - onehot
                     #   (zeros for ignored rows and for the padding columns) when compute_grad
    bias_ptr,        # *T (vocab_pad,): bias, zero-padded like the rows (so its loads vectorise too);
                     #   added here, so the cuBLAS GEMM needs no bias copy into the row-strided output
    labels_ptr,      # *i64 (n_rows,): targets of this chunk's rows
    loss_ptr,        # *f32 (n_rows,): per-row loss out; 0 for ignored rows
    vocab,           # number of classes (real columns of logits)
    vocab_pad,       # allocated columns, a multiple of 64 >= vocab: the load/store bound, so the
                     #   bound (and stride_row) are divisible by 16 and the accesses vectorise
    stride_row,      # elements between consecutive rows of logits (vocab_pad for the launcher's buffer)
    ignore_index,    # label value meaning "no target"
    compute_grad,    # 1: also write dlogits in place; 0: loss only
    BLOCK_V: tl.constexpr,       # vocabulary tile (power of 2)
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index

    # Online log-sum-exp with one running (max, sum) per lane, merged once at the end: the loop body
    # stays element-wise (no cross-lane reduction per tile). The finite initial max keeps
    # exp(m_old - m_new) away from exp(-inf + inf) = NaN on lanes that only ever see padding.
    # The target logit is picked out in the same sweep: a separate load of it after the sweep could
    # race with other threads of this program already overwriting that column with dlogits.
    m = tl.full((BLOCK_V,), -1.0e30, tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    t = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, vocab_pad, BLOCK_V):
        idx = start + cols
        x = tl.load(row_ptr + idx, mask=idx < vocab_pad, other=float("-inf")).to(tl.float32)
        b = tl.load(bias_ptr + idx, mask=idx < vocab_pad, other=0.0).to(tl.float32)
        # the padding columns hold garbage (maybe NaN): out of the sum, without breaking the
        # vocab_pad-aligned mask that lets the load vectorise
        x = tl.where(idx < vocab, x + b, float("-inf"))
        t += tl.where(idx == label, x, 0.0)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    target = tl.sum(t, axis=0)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))

    if compute_grad != 0:
        # Ignored rows get exact zeros, so the GEMMs downstream need no row mask; padding columns
        # too (a select, not a product: the garbage may be NaN), so d_bias may sum whole rows.
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, vocab_pad, BLOCK_V):
            idx = start + cols
            in_buf = idx < vocab_pad
            x = tl.load(row_ptr + idx, mask=in_buf, other=0.0).to(tl.float32)
            b = tl.load(bias_ptr + idx, mask=in_buf, other=0.0).to(tl.float32)
            x = tl.where(idx < vocab, x + b, float("-inf"))   # exp → exactly 0 on the padding
            g = (tl.exp(x - lse) - tl.where(idx == label, 1.0, 0.0)) * keep
            tl.store(row_ptr + idx, g.to(logits_ptr.dtype.element_ty), mask=in_buf)


@triton.jit
def _scale_cast_kernel(
    x_ptr,           # *S (n,): input, contiguous
    out_ptr,         # *T (n,): x * scale in the output dtype
    scale_ptr,       # *f32 (): the scale (grad_output / count), read on the device (no host sync)
    n,               # elements
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(scale_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x * scale).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------- launchers

# Triton's interpreter (CPU tensors) pays per program, not per element: there, fewer and larger
# blocks. The kernels are the same; the GPU configurations are the ones compiled ahead of time in tests.

def _ce_config(vocab: int, interpreted: bool):
    block_v = min(8192 if interpreted else 4096, triton.next_power_of_2(max(vocab, 16)))
    return block_v, (8 if block_v >= 2048 else 4)


def _scale_block(interpreted: bool) -> int:
    return 1 << 16 if interpreted else 4096


def _chunk_rows(rows: int, vocab: int) -> int:
    """Rows per chunk: the fewest chunks within CHUNK_ELEMENTS, balanced (4915 rows at vocab 30522:
    3 × 1664 rows, not 2198 + 2198 + 519 — the same dW traffic with a 25% smaller buffer)."""
    c_max = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if rows <= c_max:
        return max(1, rows)
    c = triton.cdiv(rows, triton.cdiv(rows, c_max))
    if c_max >= 64:  # multiples of 64 rows keep the GEMM tiles full
        c = min(c_max, triton.cdiv(c, 64) * 64)
    return c


def _vocab_pad(vocab: int) -> int:
    """Columns of the logits buffer: a multiple of 64 (16-byte aligned rows in every dtype)."""
    return triton.cdiv(max(vocab, 1), 64) * 64


def _count(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labelled rows as an fp32 device tensor, at least 1 (all ignored → loss 0/1 = 0)."""
    return (labels != ignore_index).sum().clamp_(min=1).to(torch.float32)


def _empty(shape, device, dtype) -> torch.Tensor:
    """Every buffer this module allocates without initialising it (tests fill them with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _dw_block_rows(h: int) -> int:
    """Rows of d_weight per accumulation GEMM: an fp32 scratch of ≤ 2^22 elements (16 MiB)."""
    return max(64, ((1 << 22) // max(h, 1)) // 64 * 64)


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (fp32) = a @ b with fp32 accumulation and no rounding to a's dtype: cuBLAS computes
    16-bit products in fp32 and writes fp32 (mm's out_dtype; the CPU, for the interpreter, upcasts)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    global _MM_OUT_DTYPE
    if a.is_cuda and _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError, NotImplementedError):  # mm's out_dtype came with torch 2.8
            _MM_OUT_DTYPE = False
    return torch.mm(a.float(), b.float(), out=out)


_MM_OUT_DTYPE = True


def _accumulate_dweight(dl: torch.Tensor, h_c: torch.Tensor, dw: torch.Tensor, db: torch.Tensor,
                        first: bool) -> None:
    """dw (+)= dlᵀ @ h_c and db (+)= Σ_rows dl, all sums in fp32.

    cuBLAS does the GEMM. The first chunk writes dw directly; later chunks need the product in fp32
    before adding it (cuBLAS' own beta=1 accumulation into an fp32 C is not exposed for 16-bit A/B by
    every PyTorch release), so they go through a ≤ 16 MiB fp32 scratch, a block of vocabulary rows
    at a time, instead of a second (vocab, h) fp32 buffer. fp32 inputs accumulate in place (addmm_)."""
    dlt = dl.t()
    if first:
        _mm_f32(dlt, h_c, dw)
        torch.sum(dl, dim=0, dtype=torch.float32, out=db)
        return
    if dl.dtype == torch.float32:
        dw.addmm_(dlt, h_c)
    else:
        vocab, h = dw.shape
        step = _dw_block_rows(h)
        scratch = _empty((min(step, vocab), h), dw.device, torch.float32)
        for v0 in range(0, vocab, step):
            v1 = min(vocab, v0 + step)
            part = _mm_f32(dlt[v0:v1], h_c, scratch[:v1 - v0])
            dw[v0:v1].add_(part)
    db.add_(torch.sum(dl, dim=0, dtype=torch.float32))


def _forward(hidden, weight, bias, labels, ignore_index: int, compute_grad: bool, fp32_out: bool):
    rows, h = hidden.shape
    vocab = weight.shape[0]
    dtype = hidden.dtype
    if dtype not in _TL_DTYPES or weight.dtype != dtype or bias.dtype != dtype:
        raise TypeError(f"mlm_loss kernel: hidden, weight, bias must share one of fp32/fp16/bf16, "
                        f"got {hidden.dtype}, {weight.dtype}, {bias.dtype}")
    labels = labels.contiguous()
    dev = hidden.device
    row_loss = _empty((rows,), dev, torch.float32)
    if compute_grad:
        dh = _empty((rows, h), dev, dtype)
        dw = _empty((vocab, h), dev, torch.float32) if rows else \
            torch.zeros(vocab, h, device=dev, dtype=torch.float32)
        db = _empty((vocab,), dev, torch.float32) if rows else \
            torch.zeros(vocab, device=dev, dtype=torch.float32)
    else:
        # three distinct tensors: outputs of a custom op may not alias one another
        dh, dw, db = (torch.empty(0, device=dev, dtype=torch.float32) for _ in range(3))

    chunk = _chunk_rows(rows, vocab)
    # Padded rows: vocab 30522 is not a multiple of 8, so unpadded rows would be misaligned for
    # vector loads (Triton) and give cuBLAS an odd leading dimension. The GEMMs see only the
    # first vocab columns (a row-strided view, which cuBLAS takes as is).
    vpad = _vocab_pad(vocab)
    buf = _empty((chunk, vpad), dev, dtype) if rows else None
    bias_pad = torch.zeros(vpad, device=dev, dtype=dtype)
    bias_pad[:vocab] = bias
    interpreted = dev.type == "cpu"
    block_v, ce_warps = _ce_config(vocab, interpreted)
    wt = weight.t()
    for c0 in range(0, rows, chunk):
        c1 = min(rows, c0 + chunk)
        n = c1 - c0
        logits = buf[:n, :vocab]
        h_c = hidden[c0:c1]
        # mm, not addmm: with a row-strided out, addmm would first copy the broadcast bias into it
        torch.mm(h_c, wt, out=logits)
        _ce_rows_kernel[(n,)](
            buf, bias_pad, labels[c0:c1], row_loss[c0:c1], vocab, vpad, vpad, ignore_index, int(compute_grad),
            BLOCK_V=block_v, num_warps=ce_warps,
        )
        if not compute_grad:
            continue
        torch.mm(logits, weight, out=dh[c0:c1])
        _accumulate_dweight(logits, h_c, dw, db, first=c0 == 0)
    loss = row_loss.sum() / _count(labels, ignore_index)
    return (loss if fp32_out else loss.to(dtype)), dh, dw, db


def _scale_cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    n = x.numel()
    if n:
        block = _scale_block(x.device.type == "cpu")
        _scale_cast_kernel[(triton.cdiv(n, block),)](x, out, scale, n, BLOCK=block, num_warps=8)
    return out


def _backward(grad, labels, ignore_index: int, dh, dw, db):
    scale = (grad.to(torch.float32) / _count(labels, ignore_index)).reshape(())
    dtype = dh.dtype
    return _scale_cast(dh, scale, dtype), _scale_cast(dw, scale, dtype), _scale_cast(db, scale, dtype)


# ------------------------------------------------------------------------------------- registration

@torch.library.custom_op("fastbert::mlm_loss", mutates_args=(), device_types="cuda")
def _mlm_loss_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                 ignore_index: int, compute_grad: bool, fp32_out: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, Σ dlogits @ W, Σ dlogitsᵀ @ hidden (fp32), Σ dlogits (fp32)); the sums are unscaled
    (multiply by grad / count) and empty when not compute_grad. The loss is fp32 when fp32_out,
    else in hidden's dtype."""
    return _forward(hidden, weight, bias, labels, ignore_index, compute_grad, fp32_out)


@_mlm_loss_op.register_kernel("cpu")
def _(hidden, weight, bias, labels, ignore_index, compute_grad, fp32_out=False):
    # Reached only under FASTBERT_KERNELS=triton with TRITON_INTERPRET=1: the same Triton kernels.
    return _forward(hidden, weight, bias, labels, ignore_index, compute_grad, fp32_out)


@_mlm_loss_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, compute_grad, fp32_out=False):
    loss = hidden.new_empty((), dtype=torch.float32 if fp32_out else hidden.dtype)
    if compute_grad:
        return (loss, torch.empty_like(hidden, memory_format=torch.contiguous_format),
                weight.new_empty(weight.shape, dtype=torch.float32),
                bias.new_empty(bias.shape, dtype=torch.float32))
    empty = hidden.new_empty((0,), dtype=torch.float32)
    return loss, empty, empty.clone(), empty.clone()


@torch.library.custom_op("fastbert::mlm_loss_backward", mutates_args=(), device_types="cuda")
def _mlm_loss_backward_op(grad: torch.Tensor, labels: torch.Tensor, ignore_index: int, dh: torch.Tensor,
                          dw: torch.Tensor, db: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad / count) · the forward's gradient sums, in the dtype of dh (= hidden's)."""
    return _backward(grad, labels, ignore_index, dh, dw, db)


@_mlm_loss_backward_op.register_kernel("cpu")
def _(grad, labels, ignore_index, dh, dw, db):
    return _backward(grad, labels, ignore_index, dh, dw, db)


@_mlm_loss_backward_op.register_fake
def _(grad, labels, ignore_index, dh, dw, db):
    return (torch.empty_like(dh, memory_format=torch.contiguous_format),
            torch.empty_like(dw, dtype=dh.dtype, memory_format=torch.contiguous_format),
            torch.empty_like(db, dtype=dh.dtype, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, compute_grad, *_ = inputs
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.ignore_index = ignore_index
    ctx.compute_grad = compute_grad
    if compute_grad:
        ctx.save_for_backward(labels, dh, dw, db)
    else:
        ctx.save_for_backward(labels, hidden, weight, bias)


def _backward_rule(ctx, grad_loss, *_unused):
    if ctx.compute_grad:
        labels, dh, dw, db = ctx.saved_tensors
    else:
        # The forward skipped the gradients (the public wrapper asks for them whenever autograd
        # will want them): recompute them now, one more GEMM than the precomputed path.
        labels, hidden, weight, bias = ctx.saved_tensors
        _, dh, dw, db = _mlm_loss_op(hidden, weight, bias, labels, ctx.ignore_index, True)
    # grad_loss may be fp32 (fp32_out) or 16-bit: the backward op reads it in fp32 either way
    d_hidden, d_weight, d_bias = _mlm_loss_backward_op(grad_loss, labels, ctx.ignore_index, dh, dw, db)
    return d_hidden, d_weight, d_bias, None, None, None, None


_mlm_loss_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- public

def mlm_loss(hidden, weight, bias, labels, ignore_index: int = -100,
             out_dtype: Optional[torch.dtype] = None):
    """Mean cross-entropy of hidden @ weightᵀ + bias over labelled rows (see the module docstring).

    out_dtype: None → the loss in hidden's dtype; torch.float32 → the fp32 sum / count, never
    rounded to a 16-bit dtype (what autocast's cross-entropy returns: a bf16 loss near 5 would
    otherwise carry an ulp of 0.03). Gradients are in the inputs' dtypes either way.
    Inputs are validated by ``fastbert.kernels.mlm_loss``; this is the Triton path it dispatches to.
    """
    dtype = hidden.dtype
    if out_dtype is not None and out_dtype not in (dtype, torch.float32):
        raise ValueError(f"mlm_loss: out_dtype must be None, hidden's dtype or torch.float32, got {out_dtype}")
    if dtype == torch.float64:
        from . import reference
        loss = reference.mlm_loss(hidden, weight, bias, labels, ignore_index)
        return loss if out_dtype is None else loss.to(out_dtype)
    # autograd's own casts carry the gradients back to weight / bias dtypes when they differ.
    weight_c = weight if weight.dtype == dtype else weight.to(dtype)
    bias_c = bias if bias.dtype == dtype else bias.to(dtype)
    compute_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or bias.requires_grad)
    fp32_out = out_dtype == torch.float32 and dtype != torch.float32
    loss, _, _, _ = _mlm_loss_op(hidden, weight_c, bias_c, labels, int(ignore_index), bool(compute_grad),
                                 bool(fp32_out))
    return loss
