"""Fused linear + cross-entropy: the masked-LM loss without the (rows, vocab) logits.

Computes, for hidden (rows, h), weight (vocab, h), bias (vocab,), labels (rows,) int64:

    loss = Σ_{r: labels[r] != ignore_index} (lse_r - logit_{r, labels[r]}) / max(1, #labelled rows)
    logits = hidden @ weightᵀ + bias,  lse_r = log Σ_v exp(logit_{r, v})

and the gradients of hidden, weight and bias.

Design (chunked, after the idea of Liger-Kernel's fused linear cross-entropy). The rows are
processed in balanced chunks of C rows whose logits block (C, vocab_pad) in the input dtype is at
most ``CHUNK_BYTES`` (128 MiB: 4915 masked rows at vocab 30522 in bf16 run as 2 × 1664 + 1587 rows),
so at most one such block exists at any time, whatever ``rows`` is. The block's rows are padded to
vocab_pad = a multiple of 64 columns (30522 → 30528): 16-byte aligned rows for vector loads and
an aligned leading dimension for cuBLAS. For each chunk:
  1. cuBLAS: logits = hidden_c @ weightᵀ, in two GEMMs: the first vocab8 = vocab rounded down to a
     multiple of 8 columns (30520), and the < 8 remaining columns (a tiny GEMM). Why: with a
     vocabulary dimension that is not a multiple of 8, cuBLAS falls back to 4-byte-aligned kernels
     (an H200 profile of the earlier unsplit version: ``cutlass_80_..._align2`` at ≈ 240 TFLOP/s for
     both the logits and the d_hidden GEMM, ≈ 2 ms of its 3.65 ms fwd+bwd); the split keeps every
     big GEMM dimension a multiple of 8.
  2. Triton ``_ce_rows_lse_kernel``, one program per row (on a GPU): adds the bias, online log-sum-exp over
     vocabulary tiles in fp32 (one exp per element: a tile-wise running max), the per-row loss.
  3. (gradients wanted) Triton ``_ce_rows_grad_kernel``, one program per stripe of 64 columns and
     split of ≥ 256 rows, looping over its rows: overwrites the logits in place with dlogits =
     softmax - onehot (exact zeros for ignored rows and for the padding columns) and adds its
     Σ_rows dlogits into an fp32 d_bias partial row of its split (summed once at the end): tile
     ownership makes that sum deterministic and free (no extra pass over the block, no atomics).
     The 1/count scale is not applied here but in fp32 at the very end, so the 16-bit dlogits
     keep their full relative precision (p - onehot is O(1); p/count is not).
  4. cuBLAS: d_hidden_c = dlogits @ weight with fp32 output (mm's out_dtype; the < 8 tail columns
     added by a tiny beta=1 GEMM), rows are independent: no accumulation across chunks.
  5. cuBLAS: d_weight (+)= dlogitsᵀ @ hidden_c over all vocab_pad columns (the padding rows of
     d_weight get zeros) with fp32 accumulation into the fp32 d_weight: the first chunk writes it
     (beta=0), later chunks add inside the GEMM (addmm with out_dtype=float32 and beta=1, PyTorch
     ≥ 2.10); older PyTorch goes through a ≤ 16 MiB fp32 scratch, a block of rows at a time.
The gradients are computed during the forward pass (3 GEMMs in all instead of the 4 a recompute-in-
backward design needs) for the inputs that autograd will want; the backward op only multiplies them
by grad_output / count in fp32 and casts (``_mlm_scale_cast_kernel``), which is valid because the
loss is a scalar.

Memory at BERT-base (4915 × 768 × 30522, bf16): logits block 97 MiB + fp32 d_weight 89 MiB + fp32
d_hidden 14 MiB ≈ 200 MiB at the forward's peak, about 0.24 of eager PyTorch's ≈ 860 MiB (bf16
logits, log-softmax and their gradient alive at once), inside issue 4's quarter. A larger CHUNK_BYTES
means fewer chunks — fewer launches and beta=1 passes over the fp32 d_weight (94 MB read + write
each) — but a larger block: on an H100 (benchmarks/results/gpu-h100-2026-11-26-run8/mlm_loss.md, one
run) forward + backward took 6.28 / 2.80 / 2.35 ms at 32 / 64 / 128 MiB for 156 / 164 / 202 MiB of
peak memory, so 128 MiB is the default (it was 64).

Supports: fp32, fp16, bf16; weight and bias in another of these dtypes than hidden (an fp32 weight
under autocast): cast once inside (the weight into a vocab_pad-row buffer, padding rows zero, so
that the GEMMs need no tail GEMM), their gradients returned in their own dtypes, each scaled and
rounded once from fp32; any vocab and h;
non-contiguous hidden / weight; rows with and without labels in any mix; a chunk with no labelled
row; no labelled row at all (loss 0.0 and zero gradients); zero rows; gradients for any subset of
hidden / weight / bias (the others' GEMMs are skipped). The count of labelled rows stays a device
tensor and the op never synchronises the host, so it can be captured in a CUDA graph and traced by
torch.compile. Deterministic: fixed reduction orders, no atomics.

Not supported: float64 hidden (the public wrapper computes it with the PyTorch reference; a float64
weight or bias beside other hidden is cast to fp32 there); label smoothing,
class weights, reductions other than the mean.

Caution:
- Rows whose label is ignore_index still cost their share of the GEMMs: gather the labelled rows
  first (the model does) — this op cannot compact them without a data-dependent shape.
- Forward with autograd on holds d_weight and d_hidden in fp32 until the backward runs.
- The logits block is in the input dtype (rounded as eager PyTorch rounds its logits); softmax
  statistics and every GEMM accumulation are fp32. fp32 inputs: half as many rows per chunk, and
  the cuBLAS GEMMs follow torch.backends.cuda.matmul.allow_tf32 (off by default).
- Label range is checked by ``fastbert.kernels.mlm_loss`` (a host sync, skipped with validate=False,
  under torch.compile and in CUDA-graph capture). Unchecked, a label outside [0, vocab) that is not
  ignore_index makes that row's loss (hence the mean) NaN; it never causes an out-of-bounds access.
- The loss is in hidden's dtype unless out_dtype=torch.float32 (then the fp32 sum / count as is).
- A forward run without some gradient (no_grad, or flags off when calling
  torch.ops.fastbert.mlm_loss directly) that is differentiated anyway recomputes it in the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2

# Bound on the bytes of the one logits block that exists at a time (see "Memory" above).
CHUNK_BYTES = 128 << 20
# Tests set this to force a fixed number of rows per chunk on tiny inputs (None: from CHUNK_BYTES).
CHUNK_ROWS: Optional[int] = None

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ------------------------------------------------------------------------------------------ kernels

@triton.jit
def _lse_tile(row_ptrs, bias_ptr, start, cols, vocab, vocab_pad, rmask):
    """One (BLOCK_R, BLOCK_V) tile: logits + bias in fp32, -inf outside the vocabulary."""
    idx = start + cols
    in_buf = idx < vocab_pad  # vocab_pad-aligned mask: 16-byte vector loads
    x = tl.load(row_ptrs + idx, mask=rmask & in_buf, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + idx, mask=in_buf, other=0.0).to(tl.float32)
    # the padding columns hold garbage (maybe NaN) or old dlogits: out of the sums
    return tl.where(idx < vocab, x + b, float("-inf"))


@triton.jit
def _ce_rows_lse_kernel(
    logits_ptr,      # *T (n_rows, stride_row): the chunk's logits without bias; read only
    bias_ptr,        # *T (vocab_pad,): bias, zero-padded
    labels_ptr,      # *i64 (n_rows,): target class or ignore_index
    lse_ptr,         # *f32 (n_rows,): out, log Σ_v exp(logit + bias)
    loss_ptr,        # *f32 (n_rows,): out, lse - target logit; 0 for ignored rows, NaN for bad labels
    n_rows,          # rows in this chunk
    vocab,           # real columns
    vocab_pad,       # columns in the buffer (a multiple of 64)
    stride_row,      # elements between rows of the logits buffer
    ignore_index,    # label value of rows without a target
    BLOCK_R: tl.constexpr,  # rows per program: 1 on a GPU; many in the interpreter (per-program cost)
    BLOCK_V: tl.constexpr,  # vocabulary tile (power of 2)
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row
    cols = tl.arange(0, BLOCK_V)[None, :]
    rmask2 = rmask[:, None]
    # Online log-sum-exp with a per-tile running max: one exp per element (a per-lane running max
    # needs two, and the exps, not the bytes, then bound the kernel). The first tile is peeled so
    # the running max starts finite (every tile start < vocab: vocab_pad - vocab < 64 <= BLOCK_V).
    x = _lse_tile(row_ptrs, bias_ptr, 0, cols, vocab, vocab_pad, rmask2)
    m = tl.max(x, axis=1)
    s = tl.sum(tl.exp(x - m[:, None]), axis=1)
    for start in range(BLOCK_V, vocab_pad, BLOCK_V):
        x = _lse_tile(row_ptrs, bias_ptr, start, cols, vocab, vocab_pad, rmask2)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)

    label = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
    in_range = (label >= 0) & (label < vocab)
    lab = tl.where(in_range, label, 0)  # clamped: an unchecked bad label never reads out of bounds
    # nothing in this kernel writes the rows, so the target logits may simply be loaded again
    target = (tl.load(logits_ptr + rows.to(tl.int64) * stride_row + lab, mask=rmask, other=0.0).to(tl.float32)
              + tl.load(bias_ptr + lab, mask=rmask, other=0.0).to(tl.float32))
    loss = tl.where(in_range, lse - target, float("nan"))
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(loss_ptr + rows, tl.where(label != ignore_index, loss, 0.0), mask=rmask)


@triton.jit
def _ce_rows_grad_kernel(
    logits_ptr,      # *T (n_rows, stride_row): logits without bias in, dlogits = softmax - onehot out
    bias_ptr,        # *T (vocab_pad,): bias, zero-padded
    labels_ptr,      # *i64 (n_rows,)
    lse_ptr,         # *f32 (n_rows,): from _ce_rows_lse_kernel
    db_ptr,          # *f32 (num_programs(1), vocab_pad): d_bias partial sums, one row per row split,
                     #   += Σ over the split's rows of dlogits (when ACC_DB)
    n_rows,          # rows in this chunk
    rows_per_split,  # rows of one row split (a multiple of BLOCK_R)
    vocab,           # real columns
    vocab_pad,       # columns in the buffer (a multiple of 64)
    stride_row,      # elements between rows of the logits buffer
    ignore_index,    # label value of rows without a target
    ACC_DB: tl.constexpr,   # accumulate d_bias (else db_ptr is not touched)
    BLOCK_R: tl.constexpr,  # rows per step (power of 2)
    BLOCK_C: tl.constexpr,  # columns owned by this program (power of 2)
):
    # Program (c, s) owns column stripe c of row split s: its d_bias partial sums need no atomics
    # and no second pass over the block (deterministic: fixed split, fixed order), and the bias
    # stripe is loaded once.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    in_buf = cols < vocab_pad
    real = cols < vocab
    b = tl.load(bias_ptr + cols, mask=in_buf, other=0.0).to(tl.float32)
    r_begin = split * rows_per_split
    r_end = tl.minimum(n_rows, r_begin + rows_per_split)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)  # reduced over rows once, at the end
    for r0 in range(r_begin, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        label = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        offs = rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
        mask = rmask[:, None] & in_buf[None, :]
        x = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(real[None, :], x + b[None, :], float("-inf"))  # exp → exactly 0 on the padding
        g = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
        # ignored (and masked) rows: exact zeros (a select, not a product), so the GEMMs need no
        # row mask and the d_bias sums no row mask either
        g = tl.where((label != ignore_index)[:, None], g, 0.0).to(logits_ptr.dtype.element_ty)
        tl.store(logits_ptr + offs, g, mask=mask)
        if ACC_DB:
            # the rounded values: d_bias is then exactly the column sum of what the GEMMs see
            acc += g.to(tl.float32)
    if ACC_DB:
        part_ptr = db_ptr + split * vocab_pad + cols
        d = tl.load(part_ptr, mask=in_buf, other=0.0)
        tl.store(part_ptr, d + tl.sum(acc, axis=0), mask=in_buf)


@triton.jit
def _mlm_scale_cast_kernel(
    x_ptr,           # *f32 (n,): input, contiguous
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

# Triton's interpreter (CPU tensors) pays per program and per op, not per element: there, fewer and
# larger blocks. The kernels are the same; the GPU configurations are compiled ahead of time in tests.
_LSE_BLOCK = {False: 8192, True: 32768}  # [interpreted]: largest vocabulary tile of the lse kernel


def _lse_config(vocab_pad: int, interpreted: bool):
    """(BLOCK_R, BLOCK_V, num_warps). GPU: one row per program, 8 KiB-element tiles with 8 warps
    (≈ 50 registers: many programs per SM keep loads in flight through the reductions)."""
    block_v = min(_LSE_BLOCK[interpreted], next_pow2(vocab_pad))
    block_r = max(1, min(64, (1 << 18) // block_v)) if interpreted else 1
    return block_r, block_v, (8 if block_v >= 2048 else 4)


def _grad_config(vocab_pad: int, chunk_rows: int, interpreted: bool):
    """(BLOCK_R, BLOCK_C, num_warps, row_splits). GPU: 64 × 64 tiles (8 KB in bf16 per step), 477
    column stripes at vocab 30522 × up to 8 row splits of ≥ 256 rows (1908 programs for 1024-row
    chunks: enough in flight per SM to cover memory latency). Interpreter: wide stripes, one split."""
    if interpreted:
        return 64, min(4096, next_pow2(vocab_pad)), 4, 1
    return 64, 64, 4, max(1, min(8, chunk_rows // 256))


def _scale_block(interpreted: bool) -> int:
    return 1 << 16 if interpreted else 4096


def _vocab_pad(vocab: int) -> int:
    """Columns of the logits buffer: a multiple of 64 (16-byte aligned rows in every dtype)."""
    return cdiv(max(vocab, 1), 64) * 64


def _chunk_rows(rows: int, vocab_pad: int, elem_bytes: int) -> int:
    """Rows per chunk: the fewest chunks whose block fits CHUNK_BYTES, balanced and rounded up to
    a multiple of 64 rows when that still fits (4915 rows of 30528 bf16 columns: 4 × 1024 + 819,
    not 1099 × 4 + 519)."""
    if CHUNK_ROWS is not None:
        return max(1, min(rows, CHUNK_ROWS))
    c_max = max(1, CHUNK_BYTES // (vocab_pad * elem_bytes))
    if rows <= c_max:
        return max(1, rows)
    c = cdiv(rows, cdiv(rows, c_max))
    if c_max >= 64:  # multiples of 64 rows keep the GEMM tiles full
        c = min(c_max, cdiv(c, 64) * 64)
    return c


def _count(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labelled rows as an fp32 device tensor, at least 1 (all ignored → loss 0/1 = 0)."""
    return (labels != ignore_index).sum().clamp_(min=1).to(torch.float32)


def _empty(shape, device, dtype) -> torch.Tensor:
    """Every buffer this module allocates without initialising it (tests fill them with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def _dw_block_rows(h: int) -> int:
    """Rows per accumulation GEMM on the scratch path: an fp32 scratch of ≤ 2^22 elements (16 MiB)."""
    return max(64, ((1 << 22) // max(h, 1)) // 64 * 64)


# Whether torch.mm(A_16bit, B_16bit, out_dtype=torch.float32, out=C_fp32) works here (PyTorch ≥ 2.8
# on CUDA), and torch.addmm(C_fp32, A_16bit, B_16bit, out_dtype=torch.float32, out=C_fp32) (fp32
# self: PyTorch ≥ 2.10); None until first tried. Both only fail in their argument checks, before
# anything runs, so a try costs nothing and leaves nothing to undo.
_MM_F32: Optional[bool] = None
_ADDMM_F32: Optional[bool] = None
_API_ERRORS = (TypeError, RuntimeError, NotImplementedError)


def _mm_f32_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32) = a @ b for 16-bit a, b: fp32 accumulation and result (the CPU upcasts)."""
    global _MM_F32
    if out.is_cuda and _MM_F32 is not False:
        try:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            _MM_F32 = True
            return
        except _API_ERRORS:
            _MM_F32 = False
    torch.mm(a.float(), b.float(), out=out)  # PyTorch < 2.8 on CUDA: correct, slower, chunk-sized temps


def _gemm_f32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (fp32) = a @ b, or out += a @ b when accumulate: fp32 accumulation, one rounding.

    cuBLAS on CUDA; accumulation inside the GEMM (beta=1) where PyTorch exposes it for 16-bit
    inputs, else through a bounded fp32 scratch, a block of rows at a time. The CPU (Triton's
    interpreter runs) always takes the scratch path, so the interpreted tests cover it."""
    global _ADDMM_F32
    if a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if not accumulate:
        _mm_f32_into(out, a, b)
        return
    if out.is_cuda and _ADDMM_F32 is not False:
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            _ADDMM_F32 = True
            return
        except _API_ERRORS:
            _ADDMM_F32 = False
    rows = out.shape[0]
    step = _dw_block_rows(out.shape[1])
    scratch = _empty((min(step, rows), out.shape[1]), out.device, torch.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        part = scratch[:r1 - r0]
        _mm_f32_into(part, a[r0:r1], b)
        out[r0:r1].add_(part)


def _forward(hidden, weight, bias, labels, ignore_index: int, grad_hidden: bool, grad_weight: bool,
             grad_bias: bool, fp32_out: bool):
    rows, h = hidden.shape
    vocab = weight.shape[0]
    dtype = hidden.dtype
    if any(t.dtype not in _TL_DTYPES for t in (hidden, weight, bias)):
        raise TypeError(f"mlm_loss kernel: hidden, weight, bias must be fp32, fp16 or bf16, "
                        f"got {hidden.dtype}, {weight.dtype}, {bias.dtype}")
    labels = labels.contiguous()
    dev = hidden.device
    f32 = torch.float32
    interpreted = dev.type == "cpu"
    vpad = _vocab_pad(vocab)
    # A weight of another dtype (fp32 under autocast) is cast here anyway: into a vocab_pad-row buffer
    # whose padding rows are zero, so every GEMM runs over all vocab_pad columns (aligned, no tail
    # GEMMs). A weight of hidden's dtype is used in place: the big GEMMs see the first vocab8 columns
    # and a tiny GEMM the < 8 others (step 1 of the module docstring).
    cast_weight = weight.dtype != dtype
    vocab8 = vpad if cast_weight else vocab // 8 * 8
    any_grad = grad_hidden or grad_weight or grad_bias

    lse = _empty((rows,), dev, f32)
    row_loss = _empty((rows,), dev, f32)
    # distinct tensors where a gradient is not computed: outputs of a custom op may not alias
    if grad_hidden:  # with no vocabulary column no GEMM writes it: zeros then
        dh = _empty((rows, h), dev, f32) if vocab else torch.zeros(rows, h, device=dev, dtype=f32)
    else:
        dh = torch.empty(0, device=dev, dtype=f32)
    if grad_weight:
        dw = _empty((vpad, h), dev, f32) if rows else torch.zeros(vpad, h, device=dev, dtype=f32)
    else:
        dw = torch.empty(0, device=dev, dtype=f32)
    db = torch.empty(0, device=dev, dtype=f32)
    if grad_bias and not rows:
        db = torch.zeros(vpad, device=dev, dtype=f32)

    if rows:
        chunk = _chunk_rows(rows, vpad, hidden.element_size())
        buf = _empty((chunk, vpad), dev, dtype)
        bias_pad = torch.zeros(vpad, device=dev, dtype=dtype)
        bias_pad[:vocab] = bias
        if cast_weight:
            w_main = _empty((vpad, h), dev, dtype)
            w_main[:vocab] = weight
            w_main[vocab:].zero_()
            w_tail = w_main[vpad:]  # (0, h): no tail columns
        else:
            w_main, w_tail = weight[:vocab8], weight[vocab8:]
        lse_r, block_v, lse_warps = _lse_config(vpad, interpreted)
        block_r, block_c, grad_warps, splits = _grad_config(vpad, chunk, interpreted)
        # d_bias partial sums, one row per row split of the gradient kernel, summed at the end
        db_part = torch.zeros(splits, vpad, device=dev, dtype=f32) if grad_bias else lse
        for c0 in range(0, rows, chunk):
            c1 = min(rows, c0 + chunk)
            n = c1 - c0
            h_c = hidden[c0:c1]
            g = buf[:n]  # (n, vpad), contiguous
            # mm, not addmm: into a row-strided out, addmm would first copy the broadcast bias in
            if vocab8:
                torch.mm(h_c, w_main.t(), out=g[:, :vocab8])
            if w_tail.shape[0]:
                torch.mm(h_c, w_tail.t(), out=g[:, vocab8:vocab])
            _ce_rows_lse_kernel[(cdiv(n, lse_r),)](
                buf, bias_pad, labels[c0:c1], lse[c0:c1], row_loss[c0:c1], n, vocab, vpad, vpad, ignore_index,
                BLOCK_R=lse_r, BLOCK_V=block_v, num_warps=lse_warps,
            )
            if not any_grad:
                continue
            per_split = cdiv(cdiv(n, splits), block_r) * block_r
            _ce_rows_grad_kernel[(cdiv(vpad, block_c), splits)](
                buf, bias_pad, labels[c0:c1], lse[c0:c1], db_part, n, per_split, vocab, vpad, vpad,
                ignore_index, ACC_DB=bool(grad_bias), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=grad_warps,
            )
            if grad_hidden:
                d = dh[c0:c1]
                if vocab8:
                    _gemm_f32(d, g[:, :vocab8], w_main, accumulate=False)
                if w_tail.shape[0]:
                    _gemm_f32(d, g[:, vocab8:vocab], w_tail, accumulate=vocab8 > 0)
            if grad_weight:
                # all vocab_pad columns (the padding ones are zeros): every GEMM dimension aligned
                _gemm_f32(dw, g.t(), h_c, accumulate=c0 > 0)
        if grad_bias:
            db = db_part.sum(0) if splits > 1 else db_part[0].clone()
    loss = row_loss.sum() / _count(labels, ignore_index)
    return (loss if fp32_out else loss.to(dtype)), dh, dw, db


def _scale_cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=dtype)
    n = x.numel()
    if n:
        block = _scale_block(x.device.type == "cpu")
        _mlm_scale_cast_kernel[(cdiv(n, block),)](x, out, scale, n, BLOCK=block, num_warps=8)
    return out


def _computed(x: torch.Tensor) -> bool:
    """The forward returns an empty 1-D tensor for a gradient it did not compute (d_bias, when
    computed, has vocab_pad >= 64 elements; d_hidden of zero rows is (0, h))."""
    return not (x.dim() == 1 and x.numel() == 0)


def _backward(grad, labels, ignore_index: int, dh, dw, db, vocab: int, dtype: torch.dtype,
              w_dtype: torch.dtype, b_dtype: torch.dtype):
    scale = (grad.to(torch.float32) / _count(labels, ignore_index)).reshape(())
    return tuple(_scale_cast(x, scale, dt) if _computed(x) else torch.empty(0, device=x.device, dtype=dt)
                 for x, dt in ((dh, dtype), (dw[:vocab], w_dtype), (db[:vocab], b_dtype)))


# ------------------------------------------------------------------------------------- registration

@torch.library.custom_op("fastbert::mlm_loss", mutates_args=(), device_types="cuda")
def _mlm_loss_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                 ignore_index: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
                 fp32_out: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, Σ dlogits @ W (rows, h), Σ dlogitsᵀ @ hidden (vocab_pad, h), Σ dlogits (vocab_pad,)),
    the last three in fp32, unscaled (multiply by grad / count), each empty (0,) when its flag is off.
    The loss is fp32 when fp32_out, else in hidden's dtype."""
    return _forward(hidden, weight, bias, labels, ignore_index, grad_hidden, grad_weight, grad_bias, fp32_out)


@_mlm_loss_op.register_kernel("cpu")
def _(hidden, weight, bias, labels, ignore_index, grad_hidden, grad_weight, grad_bias, fp32_out=False):
    # Reached only under FASTBERT_KERNELS=triton with TRITON_INTERPRET=1: the same Triton kernels.
    return _forward(hidden, weight, bias, labels, ignore_index, grad_hidden, grad_weight, grad_bias, fp32_out)


@_mlm_loss_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, grad_hidden, grad_weight, grad_bias, fp32_out=False):
    f32 = torch.float32
    loss = hidden.new_empty((), dtype=f32 if fp32_out else hidden.dtype)
    vpad = _vocab_pad(weight.shape[0])
    dh = hidden.new_empty(hidden.shape, dtype=f32) if grad_hidden else hidden.new_empty((0,), dtype=f32)
    dw = weight.new_empty((vpad, weight.shape[1]), dtype=f32) if grad_weight else weight.new_empty((0,), dtype=f32)
    db = bias.new_empty((vpad,), dtype=f32) if grad_bias else bias.new_empty((0,), dtype=f32)
    return loss, dh, dw, db


@torch.library.custom_op("fastbert::mlm_loss_backward", mutates_args=(), device_types="cuda")
def _mlm_loss_backward_op(grad: torch.Tensor, labels: torch.Tensor, ignore_index: int, dh: torch.Tensor,
                          dw: torch.Tensor, db: torch.Tensor, vocab: int, dtype: torch.dtype,
                          w_dtype: torch.dtype, b_dtype: torch.dtype
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad / count) · the forward's gradient sums (the first vocab rows of dw / db), in dtype
    (hidden's), w_dtype and b_dtype (the weight's and the bias's); empty (0,) where the forward
    computed none."""
    return _backward(grad, labels, ignore_index, dh, dw, db, vocab, dtype, w_dtype, b_dtype)


@_mlm_loss_backward_op.register_kernel("cpu")
def _(grad, labels, ignore_index, dh, dw, db, vocab, dtype, w_dtype, b_dtype):
    return _backward(grad, labels, ignore_index, dh, dw, db, vocab, dtype, w_dtype, b_dtype)


@_mlm_loss_backward_op.register_fake
def _(grad, labels, ignore_index, dh, dw, db, vocab, dtype, w_dtype, b_dtype):
    return tuple(x[:n].new_empty(x[:n].shape, dtype=dt) if _computed(x) else x.new_empty((0,), dtype=dt)
                 for x, n, dt in ((dh, dh.shape[0], dtype), (dw, vocab, w_dtype), (db, vocab, b_dtype)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, grad_hidden, grad_weight, grad_bias, *_ = inputs
    _, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    # The gradient outputs never receive gradients: without this, autograd would hand the backward
    # zero-filled fp32 tensors of their shapes (at BERT-base size ~100 MB for dW alone).
    ctx.set_materialize_grads(False)
    ctx.ignore_index = ignore_index
    ctx.computed = (grad_hidden, grad_weight, grad_bias)
    ctx.vocab = weight.shape[0]
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype)
    # the inputs cost no memory here (the caller holds them); they allow a recompute (see below)
    ctx.save_for_backward(labels, hidden, weight, bias, dh, dw, db)


def _backward_rule(ctx, grad_loss, *_unused):
    labels, hidden, weight, bias, dh, dw, db = ctx.saved_tensors
    needed = tuple(bool(x) for x in ctx.needs_input_grad[:3])
    if any(n and not c for n, c in zip(needed, ctx.computed)):
        # The forward skipped a gradient that autograd wants (the public wrapper asks for exactly
        # those autograd will want): recompute, one more GEMM than the precomputed path.
        _, dh, dw, db = _mlm_loss_op(hidden, weight, bias, labels, ctx.ignore_index, *needed)
    # grad_loss may be fp32 (fp32_out) or 16-bit: the backward op reads it in fp32 either way
    grads = _mlm_loss_backward_op(grad_loss, labels, ctx.ignore_index, dh, dw, db, ctx.vocab, *ctx.dtypes)
    return tuple(g if n else None for g, n in zip(grads, needed)) + (None,) * 6


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
    # a float64 weight / bias beside 16-bit or fp32 hidden: an fp32 copy through autograd (the kernels
    # take no float64; fp32 keeps more of it than hidden's dtype would)
    weight = weight.float() if weight.dtype == torch.float64 else weight
    bias = bias.float() if bias.dtype == torch.float64 else bias
    # weight / bias of another dtype (fp32 under autocast): cast inside the op, their gradients returned
    # in their own dtypes (no autograd casts, and no rounding through hidden's dtype on the way)
    grad_on = torch.is_grad_enabled()
    fp32_out = out_dtype == torch.float32 and dtype != torch.float32
    loss, _, _, _ = _mlm_loss_op(hidden, weight, bias, labels, int(ignore_index),
                                 bool(grad_on and hidden.requires_grad), bool(grad_on and weight.requires_grad),
                                 bool(grad_on and bias.requires_grad), bool(fp32_out))
    return loss
