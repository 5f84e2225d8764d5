"""The masked-LM loss on the CPU: vocabulary-chunked GEMMs, the gradient formed in the forward, one
reused workspace.

Computes what reference.mlm_loss does — the mean cross-entropy of hidden @ weightᵀ + bias over the
rows whose label != ignore_index, 0.0 when there is none — for fp32 CPU tensors, where it is the
pretraining step's largest single cost after the encoder's GEMMs.

Why not the reference (addmm, then F.cross_entropy) there. Measured on this project's 2-core EPYC
at 2 threads, 307 masked rows × 256 × 30522: the logits GEMM runs at ~90 GFLOP/s when it takes the
31 MB weight whole and ~150 when it takes the vocabulary ~1 MiB of weight at a time; log_softmax and
its backward pass over the 37 MB of logits twice more; and the logits and their gradient are new
allocations every step, which glibc maps fresh and the kernel zero-fills page by page. Here:

  forward   per vocabulary chunk of C columns (C · hidden · 4 B ≈ 1 MiB of weight): the chunk's
            logits = addmm into its own contiguous slice of one workspace (rows · vocab fp32), the
            running row max; then exp(logit − max) in place and the row sums (log-sum-exp); the label
            logits are read from the workspace before that. When a gradient is wanted the workspace
            becomes d loss / d logits = (softmax − onehot) · valid / n, in place, and is kept for the
            backward (no logits tensor is ever made).
  backward  per chunk: d_hidden += G_c @ W_c, d_weight[c] = G_cᵀ @ hidden, d_bias[c] = Σ_rows G_c,
            times the incoming gradient.

Forward + backward at that shape: 153 ms (reference) → 94 ms.

bf16 hidden (the MLM head under CPU autocast) with fp32 weight and bias: the GEMMs take bf16 operands
(the weight cast once per call), as autocast's own linear layer would, while the logits, softmax and
gradients stay fp32 (the logits of a chunk are rounded to bf16 by its GEMM, then the bias is added in
fp32). The reference under autocast rounds the full logits to bf16 and runs F.cross_entropy on them.

Supports: fp32 CPU tensors, or bf16 hidden with fp32 weight and bias; any number of rows (0 too),
width and vocabulary; non-contiguous hidden (copied); any subset of the three gradients; an incoming
gradient other than 1.
Not supported: other dtypes and devices, torch.compile — fastbert.kernels.mlm_loss sends those to the
reference or Triton (`applies` says which calls come here).
Caution: the workspace (one per thread) is reused only when no pending backward still holds it (two
forwards before one backward get two workspaces) and stays allocated between calls (rows × vocab × 4 B: 37 MB at
BERT's vocabulary and 307 rows). The gradient is formed in the forward whenever one is wanted, so a
forward under autograd costs the same whether or not backward runs.
"""
from __future__ import annotations

import math
import threading

import torch

from ._dispatch import backend
from ._workspace import ReusedBuffer

__all__ = ["applies", "mlm_loss", "chunk_columns"]

_LOCAL = threading.local()  # one workspace per thread: two threads never hand out the same one


def _workspace() -> ReusedBuffer:
    ws = getattr(_LOCAL, "workspace", None)
    if ws is None:
        ws = _LOCAL.workspace = ReusedBuffer()
    return ws


def chunk_columns(hidden_size: int) -> int:
    """Vocabulary columns per chunk: a power of two in [128, 2048] with ~1 MiB of fp32 weight."""
    target = (1 << 18) // max(1, hidden_size)  # 2**18 fp32 values = 1 MiB
    return 1 << max(7, min(11, target.bit_length() - 1))


def applies(hidden, weight, bias, out_dtype) -> bool:
    return (backend() == "auto" and hidden.device.type == "cpu" and weight.shape[0] > 0
            and hidden.dtype in (torch.float32, torch.bfloat16) and weight.dtype == bias.dtype == torch.float32
            and out_dtype in (None, torch.float32) and not torch.compiler.is_compiling())


def mlm_loss(hidden, weight, bias, labels, ignore_index: int = -100, out_dtype=None) -> torch.Tensor:
    """The loss in out_dtype (default: hidden's), computed in fp32."""
    loss = _ChunkedMLMLoss.apply(hidden, weight, bias, labels, ignore_index)
    return loss.to(out_dtype or hidden.dtype)


class _ChunkedMLMLoss(torch.autograd.Function):

    @staticmethod
    @torch.autocast("cpu", enabled=False)  # the dtypes below are chosen here, not by autocast
    def forward(ctx, hidden, weight, bias, labels, ignore_index):
        hidden = hidden.contiguous()
        rows, vocab = hidden.shape[0], weight.shape[0]
        c = chunk_columns(hidden.shape[1])
        low = hidden.dtype != torch.float32  # bf16 operands (the weight cast once), fp32 logits
        w = weight.to(hidden.dtype) if low else weight
        scratch = hidden.new_empty(rows * c) if low else None  # one chunk's bf16 logits
        flat = _workspace().take((rows * vocab,), torch.float32, hidden.device, zero=False)
        row_max = flat.new_full((rows,), -math.inf)
        blocks = []
        for s in range(0, vocab, c):
            e = min(vocab, s + c)
            block = flat[s * rows:e * rows].view(rows, e - s)  # logits of columns s..e, contiguous
            if low:
                torch.add(torch.mm(hidden, w[s:e].t(), out=scratch[:block.numel()].view(rows, e - s)), bias[s:e],
                          out=block)
            else:
                torch.addmm(bias[s:e], hidden, weight[s:e].t(), out=block)
            torch.maximum(row_max, block.amax(1), out=row_max)
            blocks.append(block)

        valid = labels != ignore_index
        n = valid.sum().clamp(min=1)
        # A label outside [0, vocab) (possible only with validate=False) gives a NaN loss, as the
        # Triton path does, rather than reading another row's logit.
        bad = valid & ((labels < 0) | (labels >= vocab))
        safe = torch.where(valid & ~bad, labels, torch.zeros_like(labels))
        start = torch.div(safe, c, rounding_mode="floor") * c  # first column of each label's chunk
        width = (vocab - start).clamp(max=c)
        at_label = start * rows + torch.arange(rows, device=labels.device) * width + (safe - start)  # (rows,)
        label_logit = flat[at_label].masked_fill(bad, math.nan)  # read before the exp pass overwrites the logits

        sums = torch.zeros_like(row_max)
        for block in blocks:
            block.sub_(row_max[:, None]).exp_()
            sums += block.sum(1)
        lse = row_max + sums.log()
        loss = torch.where(valid, lse - label_logit, torch.zeros_like(lse)).sum() / n

        if any(ctx.needs_input_grad[:3]):
            scale = valid.to(torch.float32) / n  # d loss / d (row's loss); 0 for ignored rows
            per_row = scale / sums
            for block in blocks:
                block.mul_(per_row[:, None])  # softmax · scale
            flat.index_put_((at_label,), -scale, accumulate=True)  # − onehot · scale
            ctx.save_for_backward(hidden, w)
            ctx.blocks, ctx.chunk = blocks, c
        return loss

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad):
        hidden, w = ctx.saved_tensors  # w: the weight in hidden's dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        low = hidden.dtype != torch.float32
        d_hidden = hidden.new_zeros(hidden.shape, dtype=torch.float32) if need_h else None
        d_weight = w.new_empty(w.shape, dtype=torch.float32) if need_w else None
        d_bias = w.new_empty(w.shape[0], dtype=torch.float32) if need_b else None
        scratch = hidden.new_empty(hidden.shape[0] * ctx.chunk) if low else None  # one chunk's bf16 gradient
        for i, block in enumerate(ctx.blocks):
            s = i * ctx.chunk
            e = s + block.shape[1]
            g = scratch[:block.numel()].view(block.shape).copy_(block) if low else block
            if need_h:
                if low:  # bf16 product, accumulated over the chunks in fp32
                    d_hidden.add_(torch.mm(g, w[s:e]))
                else:
                    d_hidden.addmm_(g, w[s:e])  # (rows, c) @ (c, h)
            if need_w:
                if low:
                    d_weight[s:e].copy_(torch.mm(g.t(), hidden))
                else:
                    torch.mm(g.t(), hidden, out=d_weight[s:e])  # (c, rows) @ (rows, h)
            if need_b:
                torch.sum(block, 0, out=d_bias[s:e])
        if float(grad) != 1.0:
            for t in (d_hidden, d_weight, d_bias):
                if t is not None:
                    t.mul_(grad)
        return (d_hidden.to(hidden.dtype) if need_h else None), d_weight, d_bias, None, None
