"""fastbert.kernels: the fused ops of BERT, Triton on CUDA, plain PyTorch elsewhere.

Every public op validates its input here (shared by both backends), then runs either the Triton
implementation (``fastbert.kernels.<family>``, imported lazily so that importing this package never
touches a GPU or compiles anything) or ``fastbert.kernels.reference`` (on fp32 CPU tensors, mlm_loss
takes ``cpu_mlm_loss``, the reference's CPU-tuned twin). See ``_dispatch`` for the FASTBERT_KERNELS switch.

Value checks (ids, labels, cu_seqlens) need a host sync on CUDA tensors: they always run on CPU
tensors and in eager mode, and are skipped inside torch.compile'd regions and CUDA-graph capture.
Ops with value checks take ``validate=False`` for callers that vouch for their input (the model
checks its inputs once per step with a single sync, then calls every layer with validate=False).
"""
from __future__ import annotations

import importlib
import sys

if __name__ != "fastbert.kernels":
    # This folder installs as fastbert.kernels. From the repository root it is also importable as a
    # plain `kernels` — and transformers imports a package of that name when it probes for Hugging
    # Face's `kernels`. Executed a second time, its modules would define fastbert's torch.library ops
    # again, which replaces them and leaves every handle of the first copy dangling (crashes inside
    # the dispatcher, now or later). So under any other name it is fastbert.kernels, modules and all:
    # the imports below then find them in sys.modules and define nothing.
    try:
        _package = importlib.import_module("fastbert.kernels")
    except ImportError:  # fastbert is not installed: this is the only copy, and it runs as is
        _package = None
    if _package is not None:
        for _name, _module in list(sys.modules.items()):
            if _name.startswith("fastbert.kernels."):
                sys.modules[__name__ + _name[len("fastbert.kernels"):]] = _module
        sys.modules[__name__] = _package  # what the import statement returns

import torch  # noqa: E402

from . import cpu_mlm_loss, reference  # noqa: E402
from ._dispatch import backend, use_triton  # noqa: E402

# The Triton families are imported here (defining kernels compiles nothing and touches no GPU) so
# that torch.compile can trace the dispatch below: Dynamo refuses importlib calls inside a graph.
# Triton reads TRITON_INTERPRET when kernels are defined, i.e. at this import.
try:
    from . import embedding, flash_attention, gelu, gemm_gelu, layer_norm, linear_cross_entropy  # noqa: F401
    _TRITON_IMPORT_ERROR = None
except ImportError as exc:  # no triton on this platform: the reference path still works
    _TRITON_IMPORT_ERROR = exc

__all__ = [
    "attention",
    "varlen_attention",
    "attention_qkvpacked",
    "varlen_attention_qkvpacked",
    "bias_gelu",
    "feed_forward",
    "add_layer_norm",
    "gelu_layer_norm",
    "embed_layer_norm",
    "mlm_loss",
    "backend",
    "reference",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_APPROXIMATE = ("none", "tanh")


def _triton(module: str):
    mod = sys.modules.get(f"{__name__}.{module}")
    if mod is None:
        raise RuntimeError(f"fastbert's Triton kernels are unavailable here ({_TRITON_IMPORT_ERROR}); "
                           "set FASTBERT_KERNELS=reference")
    return mod


def _check_values() -> bool:
    """Whether data-dependent checks may run (they sync the host with the device)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_tensor(name, t, ndim=None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_same(names_tensors, what="device"):
    first_name, first = names_tensors[0]
    for name, t in names_tensors[1:]:
        if getattr(t, what) != getattr(first, what):
            raise ValueError(f"{name} is on {what} {getattr(t, what)} but {first_name} is on {getattr(first, what)}"
                             if what == "device" else
                             f"{name} has {what} {getattr(t, what)} but {first_name} has {getattr(first, what)}")


def _check_dropout(p):
    if not (0.0 <= float(p) < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")


def _check_width(name, t, n):
    if t.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------- attention

def _check_interpreted_dtype(q):
    # Triton 3.6's interpreter computes tl.dot on bf16 operands wrongly (outputs ~1e8 for unit
    # inputs); the compiled kernels are right. Refuse rather than return a silent wrong answer, unless
    # the interpreter has been made to compute them (the test suite does: tests/interpreter_gpu_like.py).
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        from ._interpreter_probe import interpreter_computes_bf16_dots
        if interpreter_computes_bf16_dots():
            return
        raise TypeError("matrix products on bf16 CPU tensors with FASTBERT_KERNELS=triton: Triton's interpreter "
                        "computes bf16 matrix products wrongly; use fp16 or fp32 there, or the reference kernels")


def attention(q, k, v, key_padding_mask=None, *, causal=False, dropout_p=0.0, softmax_scale=None):
    """softmax(q kᵀ·scale + mask) v. q (B, H, Sq, D), k/v (B, H, Sk, D), key_padding_mask (B, Sk) bool."""
    scale = _check_attention(q, k, v, key_padding_mask, dropout_p, softmax_scale)
    if use_triton(q):
        _check_interpreted_dtype(q)
        return _triton("flash_attention").attention(q, k, v, key_padding_mask, causal, float(dropout_p), scale)
    return reference.attention(q, k, v, key_padding_mask, causal=causal, dropout_p=dropout_p, softmax_scale=scale)


def attention_qkvpacked(qkv, key_padding_mask=None, *, causal=False, dropout_p=0.0, softmax_scale=None):
    """attention() on one fused QKV projection: qkv (B, S, 3, H, D) -> (B, S, H, D), the layout of the
    next matmul's input. On the Triton path the output is written in that layout and the gradient
    comes back as one dqkv, without the copies that q/k/v views would cost through autograd."""
    _check_tensor("qkv", qkv, 5, _FLOAT_DTYPES)
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected shape (batch, seq, 3, heads, head_dim), got {tuple(qkv.shape)}")
    scale = _check_attention(*reference.split_qkv(qkv), key_padding_mask, dropout_p, softmax_scale)
    if use_triton(qkv):
        _check_interpreted_dtype(qkv)
        return _triton("flash_attention").attention_qkvpacked(qkv, key_padding_mask, causal, float(dropout_p), scale)
    return reference.attention_qkvpacked(qkv, key_padding_mask, causal=causal, dropout_p=dropout_p,
                                         softmax_scale=scale)


def _check_attention(q, k, v, key_padding_mask, dropout_p, softmax_scale) -> float:
    """The checks of attention(); returns the softmax scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4, _FLOAT_DTYPES)
    _check_same([("q", q), ("k", k), ("v", v)], "device")
    _check_same([("q", q), ("k", k), ("v", v)], "dtype")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, heads and head_dim")
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, 2, (torch.bool,))
        _check_same([("q", q), ("key_padding_mask", key_padding_mask)], "device")
        if key_padding_mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask: expected shape {(k.shape[0], k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
    _check_dropout(dropout_p)
    return float(softmax_scale) if softmax_scale is not None else reference.default_scale(q.shape[-1])


def _check_cu_seqlens(cu_seqlens, total, max_seqlen, validate=True):
    _check_tensor("cu_seqlens", cu_seqlens, 1, (torch.int32,))
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must hold at least two entries (batch + 1)")
    if not (validate and _check_values()):
        return
    cu = cu_seqlens.cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but q holds {total} tokens")
    if int(lengths.max()) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is below the longest sequence ({int(lengths.max())})")


def _check_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, validate):
    """The checks of varlen_attention(); returns (max_seqlen, softmax scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 3, _FLOAT_DTYPES)
    _check_same([("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)], "device")
    _check_same([("q", q), ("k", k), ("v", v)], "dtype")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    max_seqlen = int(max_seqlen)
    _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen, validate)
    _check_dropout(dropout_p)
    return max_seqlen, float(softmax_scale) if softmax_scale is not None else reference.default_scale(q.shape[-1])


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=False, dropout_p=0.0, softmax_scale=None,
                     validate=True):
    """Attention within each packed sequence. q/k/v (total, H, D); cu_seqlens int32 (batch + 1,).

    Value checks (cu_seqlens starts at 0, never decreases, ends at total; max_seqlen covers the
    longest; validate=False skips them) read cu_seqlens on the host: on CUDA tensors a sync, skipped
    inside torch.compile'd regions and CUDA-graph capture."""
    max_seqlen, scale = _check_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, validate)
    if use_triton(q):
        _check_interpreted_dtype(q)
        return _triton("flash_attention").varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal,
                                                          float(dropout_p), scale)
    return reference.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, dropout_p=dropout_p,
                                      softmax_scale=scale)


def varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, *, causal=False, dropout_p=0.0, softmax_scale=None,
                               validate=True):
    """varlen_attention() on one fused QKV projection: qkv (total, 3, H, D) -> (total, H, D); on the
    Triton path the gradient comes back as one dqkv (no stack copy). Checks as varlen_attention."""
    _check_tensor("qkv", qkv, 4, _FLOAT_DTYPES)
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv: expected shape (total, 3, heads, head_dim), got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(1)
    max_seqlen, scale = _check_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, validate)
    if use_triton(qkv):
        _check_interpreted_dtype(qkv)
        return _triton("flash_attention").varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, causal,
                                                                    float(dropout_p), scale)
    return reference.varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, causal=causal, dropout_p=dropout_p,
                                                softmax_scale=scale)


# ------------------------------------------------------------------------------ GELU and LayerNorm

def _check_approximate(approximate):
    if approximate not in _APPROXIMATE:
        raise ValueError(f"approximate must be 'none' (erf GELU) or 'tanh', got {approximate!r}")


def bias_gelu(x, bias, approximate="none"):
    """gelu(x + bias); x (..., n), bias (n,)."""
    _check_tensor("x", x, None, _FLOAT_DTYPES)
    _check_tensor("bias", bias, 1, _FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    _check_width("bias", bias, x.shape[-1])
    _check_same([("x", x), ("bias", bias)], "device")
    _check_approximate(approximate)
    if use_triton(x):
        return _triton("gelu").bias_gelu(x, bias, approximate)
    return reference.bias_gelu(x, bias, approximate)


def feed_forward(x, w1, b1, w2, approximate="none"):
    """gelu(x @ w1.T + b1) @ w2.T — BERT's feed-forward block without the output bias (the model adds
    that in K.add_layer_norm(x_bias=)). x (..., K), w1 (N, K), b1 (N,), w2 (H, N) -> (..., H).

    On the Triton path the GELU runs in the epilogues of the two matmuls beside it (the forward's
    x @ w1.T and the backward's dout @ w2), the other products on cuBLAS; kernels/gemm_gelu.py."""
    _check_tensor("x", x, None, _FLOAT_DTYPES)
    _check_tensor("w1", w1, 2, _FLOAT_DTYPES)
    _check_tensor("b1", b1, 1, _FLOAT_DTYPES)
    _check_tensor("w2", w2, 2, _FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    if w1.shape[1] != x.shape[-1]:
        raise ValueError(f"w1: expected shape (N, {x.shape[-1]}) for x of width {x.shape[-1]}, got {tuple(w1.shape)}")
    _check_width("b1", b1, w1.shape[0])
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"w2: expected shape (H, {w1.shape[0]}) after w1 {tuple(w1.shape)}, got {tuple(w2.shape)}")
    _check_same([("x", x), ("w1", w1), ("b1", b1), ("w2", w2)], "device")
    _check_same([("x", x), ("w1", w1), ("w2", w2)], "dtype")
    _check_approximate(approximate)
    if use_triton(x):
        _check_interpreted_dtype(x)
        return _triton("gemm_gelu").feed_forward(x, w1, b1, w2, approximate)
    return reference.feed_forward(x, w1, b1, w2, approximate)


def add_layer_norm(x, residual, weight, bias, eps=1e-12, dropout_p=0.0, *, low_dtype=None, x_bias=None):
    """layer_norm(dropout(x + x_bias) + residual); x, residual (..., n); weight, bias, x_bias (n,).

    low_dtype (torch.bfloat16 or torch.float16): return (y, y.to(low_dtype)) instead of y — under
    autocast, y is the fp32 residual stream and its copy the next matmul's input. The Triton kernels
    write both in one pass and add the two gradients in the backward kernel (no cast kernels).

    x_bias (n,) or None: the bias of the dense layer that made x, added here instead of by the matmul
    (x = h @ W.T without its bias). The forward adds it in fp32 (not rounded to x's dtype first, as a
    low-precision matmul's epilogue would); the Triton backward sums its gradient over the rows beside
    the LayerNorm weight's, so no separate column reduction runs. Its gradient comes in its own dtype;
    the output's dtype is that of x + residual, whatever x_bias's."""
    _check_tensor("x", x, None, _FLOAT_DTYPES)
    _check_tensor("residual", residual, None, _FLOAT_DTYPES)
    if x.dim() < 1 or x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape")
    params = [("weight", weight), ("bias", bias)] + ([] if x_bias is None else [("x_bias", x_bias)])
    for name, t in params:
        _check_tensor(name, t, 1, _FLOAT_DTYPES)
        _check_width(name, t, x.shape[-1])
    _check_same([("x", x), ("residual", residual), *params], "device")
    _check_dropout(dropout_p)
    if low_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"low_dtype must be None, torch.bfloat16 or torch.float16, got {low_dtype}")
    if use_triton(x):
        return _triton("layer_norm").add_layer_norm(x, residual, weight, bias, float(eps), float(dropout_p),
                                                    low_dtype, x_bias)
    y = reference.add_layer_norm(x, residual, weight, bias, eps, dropout_p, x_bias=x_bias)
    return y if low_dtype is None else (y, y.to(low_dtype))


def gelu_layer_norm(x, bias, weight, ln_bias, eps=1e-12, approximate="none"):
    """layer_norm(gelu(x + bias)): the MLM head transform after its dense layer."""
    _check_tensor("x", x, None, _FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    for name, t in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        _check_tensor(name, t, 1, _FLOAT_DTYPES)
        _check_width(name, t, x.shape[-1])
    _check_same([("x", x), ("bias", bias), ("weight", weight), ("ln_bias", ln_bias)], "device")
    _check_approximate(approximate)
    if use_triton(x):
        return _triton("layer_norm").gelu_layer_norm(x, bias, weight, ln_bias, float(eps), approximate)
    return reference.gelu_layer_norm(x, bias, weight, ln_bias, eps, approximate)


def _check_ids(name, ids, bound, validate=True):
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {ids.dtype}")
    if validate and _check_values() and ids.numel() > 0:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= bound:
            raise ValueError(f"{name}: values must lie in [0, {bound}), got min {lo}, max {hi}")


def embed_layer_norm(input_ids, token_type_ids, position_ids, word_weight, position_weight, type_weight,
                     weight, bias, eps=1e-12, dropout_p=0.0, *, validate=True):
    """dropout(layer_norm(word[ids] + position[pos] + type[tt])); ids (batch, seq).

    token_type_ids None means all zeros; position_ids None means 0..seq-1 in every row.
    Value checks (ids within their tables; validate=False skips them) read the ids on the host: on CUDA
    tensors a sync, skipped inside torch.compile'd regions and CUDA-graph capture.
    """
    _check_tensor("input_ids", input_ids, 2)
    for name, t in (("word_weight", word_weight), ("position_weight", position_weight),
                    ("type_weight", type_weight)):
        _check_tensor(name, t, 2, _FLOAT_DTYPES)
    hidden = word_weight.shape[1]
    if position_weight.shape[1] != hidden or type_weight.shape[1] != hidden:
        raise ValueError("word, position and type embedding tables must have the same width")
    for name, t in (("weight", weight), ("bias", bias)):
        _check_tensor(name, t, 1, _FLOAT_DTYPES)
        _check_width(name, t, hidden)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
        _check_tensor(name, t, 2)
        if t.shape != input_ids.shape:
            raise ValueError(f"{name}: expected shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
    _check_same([("input_ids", input_ids), ("token_type_ids", token_type_ids), ("position_ids", position_ids),
                 ("word_weight", word_weight), ("position_weight", position_weight), ("type_weight", type_weight),
                 ("weight", weight), ("bias", bias)], "device")
    _check_ids("input_ids", input_ids, word_weight.shape[0], validate)
    _check_ids("token_type_ids", token_type_ids, type_weight.shape[0], validate)
    _check_ids("position_ids", position_ids, position_weight.shape[0], validate)
    _check_dropout(dropout_p)
    if use_triton(word_weight):
        return _triton("embedding").embed_layer_norm(input_ids, token_type_ids, position_ids, word_weight,
                                                    position_weight, type_weight, weight, bias, float(eps),
                                                    float(dropout_p))
    return reference.embed_layer_norm(input_ids, token_type_ids, position_ids, word_weight, position_weight,
                                      type_weight, weight, bias, eps, dropout_p)


# ----------------------------------------------------------------------------------- masked-LM loss

def mlm_bad_labels(labels, vocab: int, ignore_index: int = -100) -> torch.Tensor:
    """Which labels are neither ignore_index nor in [0, vocab): a bool tensor of labels' shape."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab))


def mlm_labels_bad(labels, vocab: int, ignore_index: int = -100) -> torch.Tensor:
    """Whether some label is neither ignore_index nor in [0, vocab): a device bool, no host sync (a
    caller that syncs anyway, e.g. for the labelled rows' count, reads it after that sync for free)."""
    return mlm_bad_labels(labels, vocab, ignore_index).any()


def raise_bad_mlm_labels(labels, vocab: int, ignore_index: int = -100):
    """The ValueError of mlm_loss's label check, naming the first offending labels."""
    bad = mlm_bad_labels(labels, vocab, ignore_index)
    raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                     f"found {labels[bad][:5].tolist()}")


def mlm_loss(hidden, weight, bias, labels, ignore_index=-100, *, out_dtype=None, validate=True):
    """Mean cross-entropy of (hidden @ weightᵀ + bias) over rows with label != ignore_index; 0.0 if none.

    The loss has hidden's dtype unless out_dtype says otherwise (the model asks for float32 so that
    a bf16 forward does not round its loss to bf16, as autocast's cross-entropy does not).
    Value checks (labels within the vocabulary or ignore_index; validate=False skips them) read the
    labels on the host: on CUDA tensors a sync, skipped inside torch.compile'd regions and CUDA-graph
    capture.
    """
    _check_tensor("hidden", hidden, 2, _FLOAT_DTYPES)
    _check_tensor("weight", weight, 2, _FLOAT_DTYPES)
    _check_tensor("bias", bias, 1, _FLOAT_DTYPES)
    _check_tensor("labels", labels, 1, (torch.int64,))
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be (vocab, {hidden.shape[1]})")
    _check_width("bias", bias, weight.shape[0])
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows but hidden has {hidden.shape[0]}")
    _check_same([("hidden", hidden), ("weight", weight), ("bias", bias), ("labels", labels)], "device")
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a floating dtype, got {out_dtype}")
    vocab = weight.shape[0]
    if validate and _check_values() and labels.numel() > 0 and bool(mlm_labels_bad(labels, vocab, ignore_index)):
        raise_bad_mlm_labels(labels, vocab, ignore_index)
    if use_triton(hidden):
        # The Triton path returns hidden's dtype or fp32; another out_dtype is the fp32 loss cast, as
        # the reference gives it.
        native = out_dtype in (None, hidden.dtype, torch.float32)
        loss = _triton("linear_cross_entropy").mlm_loss(hidden, weight, bias, labels, int(ignore_index),
                                                        out_dtype=out_dtype if native else torch.float32)
        return loss if native else loss.to(out_dtype)
    if cpu_mlm_loss.applies(hidden, weight, bias, out_dtype):
        return cpu_mlm_loss.mlm_loss(hidden, weight, bias, labels, int(ignore_index), out_dtype)
    return reference.mlm_loss(hidden, weight, bias, labels, ignore_index, out_dtype)
