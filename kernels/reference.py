"""Plain-PyTorch reference of every fastbert op.

Three jobs: the CPU path of the model, the oracle of the kernel tests (run in float64), and the
baseline of the benchmarks. Written for clarity, not speed: nothing here is fused. Each function
has the signature of its public twin in ``fastbert.kernels`` less the keywords that only concern
the dispatch there (``validate``, ``add_layer_norm``'s ``low_dtype``: fastbert.kernels casts itself),
and supports autograd through PyTorch itself. Input validation lives in ``fastbert.kernels``.

Low-precision inputs (fp16, bf16) are computed in fp32 and the result cast back, which is also
what the Triton kernels promise (fp32 statistics and accumulators, input-dtype storage).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import cpu_dropout

__all__ = [
    "attention",
    "varlen_attention",
    "attention_qkvpacked",
    "varlen_attention_qkvpacked",
    "bias_gelu",
    "add_layer_norm",
    "gelu_layer_norm",
    "embed_layer_norm",
    "mlm_loss",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention(q, k, v, key_padding_mask=None, *, causal=False, dropout_p=0.0, softmax_scale=None):
    """softmax(q kᵀ · scale + mask) v for q (B, H, Sq, D), k/v (B, H, Sk, D).

    key_padding_mask (B, Sk) bool, True = real key. causal masks key j > query i (top-left aligned,
    as F.scaled_dot_product_attention(is_causal=True)). A query row with no visible key gives zeros.
    """
    scale = softmax_scale if softmax_scale is not None else default_scale(q.shape[-1])
    if q.dtype != torch.float64 and not (dropout_p > 0.0 and cpu_dropout.applies(q)):
        return _fused_attention(q, k, v, key_padding_mask, causal, dropout_p, scale)
    if q.dtype in (torch.float16, torch.bfloat16):  # CPU training in low precision: the fp32 path below
        with torch.autocast("cpu", enabled=False):
            out = attention(q.float(), k.float(), v.float(), key_padding_mask, causal=causal, dropout_p=dropout_p,
                            softmax_scale=scale)
        return out.to(q.dtype)
    # float64: the explicit oracle; CPU training too, whose dropout masks are cheaper here (16-bit
    # draws, kernels/cpu_dropout.py) than inside F.scaled_dot_product_attention
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if key_padding_mask is None and not causal:
        probs = torch.softmax(scores, dim=-1)
    else:
        visible = _visible_keys(q, k, key_padding_mask, causal)  # (B, 1, Sq, Sk)
        # A finite fill (not -inf) keeps fully masked rows free of NaN in forward and backward;
        # their probabilities are zeroed below, so the fill value never reaches the output.
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        probs = probs * visible.any(dim=-1, keepdim=True)
    if dropout_p > 0.0:
        probs = dropout(probs, dropout_p)
    return torch.matmul(probs, v)


def default_scale(head_dim: int) -> float:
    """1/sqrt(head_dim); 1.0 for head_dim 0 (an empty product: any scale gives the same output)."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def dropout(x, p):
    """Training-mode dropout: 16-bit draws on the CPU (kernels/cpu_dropout.py), F.dropout elsewhere."""
    return cpu_dropout.dropout(x, p) if cpu_dropout.applies(x) else F.dropout(x, p=p, training=True)


def _visible_keys(q, k, key_padding_mask, causal):
    """(B, 1, Sq, Sk) bool: which keys each query may see (key padding and the causal triangle)."""
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.tril(visible)
    visible = visible.expand(q.shape[0], 1, seq_q, seq_k)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :].to(torch.bool)
    return visible


def _fused_attention(q, k, v, key_padding_mask, causal, dropout_p, scale):
    """The same through PyTorch's fused attention (the CPU path's speed; float64 keeps the explicit
    oracle above). A row with no visible key attends to every key instead (finite), then is zeroed,
    so its output and its gradients are 0, as the explicit path gives."""
    if key_padding_mask is None and not causal:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    visible = _visible_keys(q, k, key_padding_mask, causal)  # (B, 1, Sq, Sk)
    has_key = visible.any(dim=-1, keepdim=True)  # (B, 1, Sq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~has_key, dropout_p=dropout_p, scale=scale)
    return torch.where(has_key, out, out.new_zeros(()))


def _varlen_index(cu_seqlens: torch.Tensor, total: int):
    """(sequence index, position in sequence) of every packed token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total)
    pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens.long()[seq_idx]
    return seq_idx, pos, lengths


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=False, dropout_p=0.0, softmax_scale=None):
    """Attention within each packed sequence: q/k/v (total, H, D), sequence i = rows cu[i]:cu[i+1]."""
    total, heads, dim = q.shape
    batch = cu_seqlens.numel() - 1
    width = max(int(max_seqlen), 1)
    if total == batch * width:  # every sequence is max_seqlen long: a plain reshape, no padding
        def split(x):  # (total, H, D) -> (B, H, S, D)
            return x.view(batch, width, heads, dim).transpose(1, 2)
        out = attention(split(q), split(k), split(v), causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale)
        return out.transpose(1, 2).reshape(total, heads, dim)
    seq_idx, pos, lengths = _varlen_index(cu_seqlens, total)

    def pad(x):  # (total, H, D) -> (B, H, S, D)
        padded = x.new_zeros(batch, width, heads, dim).index_put((seq_idx, pos), x)
        return padded.transpose(1, 2)

    mask = torch.arange(width, device=q.device)[None, :] < lengths[:, None]  # (B, S)
    out = attention(pad(q), pad(k), pad(v), mask, causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale)
    return out.transpose(1, 2)[seq_idx, pos]  # (total, H, D)


def split_qkv(qkv):
    """q, k, v as (B, H, S, D) views of a padded fused projection qkv (B, S, 3, H, D)."""
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


def attention_qkvpacked(qkv, key_padding_mask=None, *, causal=False, dropout_p=0.0, softmax_scale=None):
    """attention() on qkv (B, S, 3, H, D) -> (B, S, H, D)."""
    return attention(*split_qkv(qkv), key_padding_mask, causal=causal, dropout_p=dropout_p,
                     softmax_scale=softmax_scale).transpose(1, 2)


def varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, *, causal=False, dropout_p=0.0, softmax_scale=None):
    """varlen_attention() on qkv (total, 3, H, D) -> (total, H, D)."""
    return varlen_attention(*qkv.unbind(1), cu_seqlens, max_seqlen, causal=causal, dropout_p=dropout_p,
                            softmax_scale=softmax_scale)


def bias_gelu(x, bias, approximate="none"):
    ct = _compute_dtype(x.dtype)
    return F.gelu(x.to(ct) + bias.to(ct), approximate=approximate).to(x.dtype)


def feed_forward(x, w1, b1, w2, approximate="none"):
    """gelu(x @ w1.T + b1) @ w2.T: BERT's intermediate dense + GELU, then its output dense without bias."""
    return F.linear(bias_gelu(F.linear(x, w1), b1, approximate), w2)


def add_layer_norm(x, residual, weight, bias, eps=1e-12, dropout_p=0.0, x_bias=None):
    """layer_norm(dropout(x + x_bias) + residual). The output dtype is that of x + residual (an fp32
    residual stream stays fp32 under autocast); x_bias (n,) or None is added in the compute dtype."""
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    ct = _compute_dtype(out_dtype)
    h = x.to(ct)
    if x_bias is not None:
        h = h + x_bias.to(ct)
    if dropout_p > 0.0:
        h = dropout(h, dropout_p)
    h = h + residual.to(ct)
    return F.layer_norm(h, h.shape[-1:], weight.to(ct), bias.to(ct), eps).to(out_dtype)


def gelu_layer_norm(x, bias, weight, ln_bias, eps=1e-12, approximate="none"):
    ct = _compute_dtype(x.dtype)
    h = F.gelu(x.to(ct) + bias.to(ct), approximate=approximate)
    return F.layer_norm(h, h.shape[-1:], weight.to(ct), ln_bias.to(ct), eps).to(x.dtype)


def _embedding_ids(ids):
    """ids as F.embedding takes them (int32 or int64); the public op takes any integer dtype."""
    return ids if ids is None or ids.dtype in (torch.int32, torch.int64) else ids.long()


def embed_layer_norm(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                     weight, bias, eps=1e-12, dropout_p=0.0, *, word_rows=None):
    """word_rows: the word rows already gathered (input_ids' shape + (hidden,)), for a caller that
    gathers them its own way (fastbert.modeling.embed_ids on the CPU); default F.embedding.
    token_type_ids None means all zeros; position_ids None means 0..seq-1 in every row (as K's)."""
    dtype = word_weight.dtype
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    input_ids, token_type_ids, position_ids = map(_embedding_ids, (input_ids, token_type_ids, position_ids))
    ct = _compute_dtype(dtype)
    word = F.embedding(input_ids, word_weight) if word_rows is None else word_rows
    h = (word.to(ct)
         + F.embedding(position_ids, position_weight).to(ct)
         + F.embedding(token_type_ids, type_weight).to(ct))
    h = F.layer_norm(h, h.shape[-1:], weight.to(ct), bias.to(ct), eps)
    if dropout_p > 0.0:
        h = dropout(h, dropout_p)
    return h.to(dtype)


def mlm_loss(hidden, weight, bias, labels, ignore_index=-100, out_dtype=None):
    """Mean cross-entropy of hidden @ weightᵀ + bias over rows whose label != ignore_index (0.0 if none).

    The loss is returned in out_dtype (default: hidden's dtype)."""
    ct = _compute_dtype(hidden.dtype)
    logits = torch.addmm(bias.to(ct), hidden.to(ct), weight.to(ct).t())  # (rows, vocab)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp(min=1)
    return (total / count).to(out_dtype or hidden.dtype)
