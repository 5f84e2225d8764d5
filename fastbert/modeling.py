"""BERT, one readable file. Module and parameter names are those of transformers' Bert classes, so
checkpoints load in both directions with no remap table.

Two structural choices make it fast before any kernel does:
1. Unpadded execution. After the embeddings, padding tokens are dropped; the encoder runs on the
   packed real tokens, (total_tokens, hidden), with variable-length attention over cu_seqlens.
   Every linear layer then does only useful work. Outputs are scattered back to (batch, seq, hidden)
   with zeros at padding positions (values there are unspecified by the API; zeros are finite).
2. The masked-LM head in training runs on the masked rows only, through the fused linear +
   cross-entropy op, so the (tokens, vocab) logits never exist.
3. Packed rows (a fastbert extension, see BertModel.forward): an attention_mask that numbers the
   examples sharing a row (1, 2, 3, ...) makes each example its own varlen-attention sequence, so
   pretraining can fill rows with several short examples instead of padding.
The hot paths call fastbert.kernels (Triton on CUDA, the PyTorch reference elsewhere).

Shapes: B batch, S sequence, T real tokens (sum of lengths), D hidden, nh heads, hd head_dim, V vocab.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastbert.kernels as K
from fastbert.kernels._workspace import ReusedBuffer

from .autocast_linear import linear
from .config import BertConfig
from .runtime import env_switch


# ------------------------------------------------------------------------------------------ outputs

# Every field a BERT output may have. An output rebuilt from its items (accelerate's mixed precision
# calls type(output)(mapping), which has lost the None fields) reads each of these as None.
_OUTPUT_FIELDS = ("loss", "logits", "prediction_logits", "seq_relationship_logits", "start_logits", "end_logits",
                  "last_hidden_state", "pooler_output", "hidden_states", "attentions", "cross_attentions")


class ModelOutput(OrderedDict):
    """Attribute- and key-addressable output, as transformers' ModelOutput: a None field is not a key
    (keys(), items(), to_tuple() and integer indexing skip it; Trainer's evaluation reads items())
    but reads as None by attribute; an undeclared name is an AttributeError. Built from fields by
    name, or, as transformers' is, from one mapping (then any BERT output field reads as None)."""

    def __init__(self, mapping=None, /, **fields):
        if mapping is not None:
            fields = {**dict(mapping), **fields}
        super().__init__((k, v) for k, v in fields.items() if v is not None)
        declared = tuple(fields)
        if isinstance(mapping, ModelOutput):  # a copy: the same fields
            declared += tuple(f for f in mapping._declared if f not in fields)
        elif mapping is not None:
            declared += tuple(f for f in _OUTPUT_FIELDS if f not in fields)
        self.__dict__["_declared"] = declared

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            if name in self.__dict__.get("_declared", ()):
                return None
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_declared", ()):  # a field: the key follows, as in transformers
            if value is None:
                self.pop(name, None)
            else:
                self[name] = value
        else:
            super().__setattr__(name, value)

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self):
        return tuple(v for v in self.values() if v is not None)

    def fields(self) -> dict:
        """Every declared field in order, the None ones included (keys() leaves them out)."""
        return {k: getattr(self, k) for k in self._declared}


def _output_flatten(out: ModelOutput):
    return list(out.values()), (tuple(out.keys()), out._declared)


def _output_flatten_with_keys(out: ModelOutput):
    from torch.utils._pytree import MappingKey
    values, context = _output_flatten(out)
    return [(MappingKey(k), v) for k, v in zip(context[0], values)], context


def _output_unflatten(values, context) -> ModelOutput:
    keys, declared = context
    out = ModelOutput(**dict(zip(keys, values)))
    out.__dict__["_declared"] = tuple(declared)
    return out


# As transformers registers its outputs: torch.export (and other pytree users) see the tensors inside
# an output as its leaves, and rebuild the output around them.
torch.utils._pytree.register_pytree_node(ModelOutput, _output_flatten, _output_unflatten,
                                         serialized_type_name="fastbert.modeling.ModelOutput",
                                         flatten_with_keys_fn=_output_flatten_with_keys)


def _static_label_rows(flat_labels, k: int):
    """(K,) row indices without a host sync: every labelled row (label != -100) in order, then
    unlabelled ones (their -100 labels add nothing to the loss) up to K = min(k, rows); and a 0-dim
    bool that is True when more than K rows are labelled (some were left out: the caller poisons
    its loss with NaN rather than return a wrong one)."""
    labelled = flat_labels != -100
    k = min(int(k), flat_labels.numel())
    order = torch.argsort((~labelled).to(torch.uint8), stable=True)  # labelled first, each group in order
    return order[:k], labelled.sum() > k


def _drop_bad_labels(labels, vocab: int):
    """(labels with every one outside [0, vocab) that is not -100 set to -100, a 0-dim bool: whether
    there was one), without a host sync."""
    bad = K.mlm_bad_labels(labels, vocab)
    return labels.masked_fill(bad, -100), bad.any()


_GRAPH_LAYOUT = False  # set by graph_layout()


def _capturing() -> bool:
    """Whether to run as a CUDA graph is captured, or traced by torch.export (one graph, no
    data-dependent shapes): the padded layout, no host syncs."""
    return (_GRAPH_LAYOUT or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
            or _exporting())


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # PyTorch >= 2.5
    return bool(is_exporting and is_exporting())


@contextlib.contextmanager
def graph_layout():
    """Run eager steps exactly as a captured one will (the padded layout, fixed row counts), so that a
    warm-up before capture meets every shape the graph will: Triton specialisations, cuBLAS
    heuristics and allocations then happen outside the capture."""
    global _GRAPH_LAYOUT
    before, _GRAPH_LAYOUT = _GRAPH_LAYOUT, True
    try:
        yield
    finally:
        _GRAPH_LAYOUT = before


# transformers' return_dict=False tuples always hold the logits. In training with MLM labels fastbert's
# MLM head runs on the masked rows only and leaves them None: their slot stays, as None, so a tuple
# unpacks by position as transformers' does (other None fields are left out, as transformers leaves them).
_KEPT_SLOTS = ("prediction_logits", "logits")


def _transformers_major() -> int:
    """The installed transformers' major version (0 if none), read from its metadata: no import."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


# transformers 5's BertModel records cross-attentions with output_attentions, an empty tuple for an
# encoder (4.x: None), which its return_dict=False tuple carries last: the same here, so that the tuple
# has transformers' length and order whichever version is installed.
_EMPTY_CROSS_ATTENTIONS = _transformers_major() >= 5


def _to_tuple(fields: dict) -> tuple:
    """return_dict=False's tuple of an output's fields (all of them, None included, in order)."""
    return tuple(v for k, v in fields.items() if v is not None or k in _KEPT_SLOTS)


def _finish(output: ModelOutput, return_dict: bool):
    return output if return_dict else _to_tuple(output.fields())


def _flags(config, output_hidden_states, output_attentions, return_dict):
    """forward's output_hidden_states, output_attentions and return_dict: an argument left None takes the
    config's value, as in transformers (``from_pretrained(dir, output_hidden_states=True)`` sets it there),
    else False, False, True."""
    if output_hidden_states is None:
        output_hidden_states = getattr(config, "output_hidden_states", False)
    if output_attentions is None:
        output_attentions = getattr(config, "output_attentions", False)
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    return output_hidden_states, output_attentions, return_dict


# ------------------------------------------------------------------------------------------- layout

class _Packed:
    """Where the real tokens of a (B, S) batch sit once packed into (T, ...) rows, and where each
    sequence of the varlen attention starts.

    A 0/1 (or bool) mask gives one sequence per row. An integer mask may also number the examples
    packed into a row (1, 2, 3, ...; 0 = padding), each example's tokens contiguous among the row's
    real tokens: every example is then its own sequence, so attention never crosses examples.
    Everything is computed on the device and read back in one host sync (six numbers, seven with
    output_rows); every kernel call after it is sync-free.
    """

    def __init__(self, attention_mask: torch.Tensor, output_rows: torch.Tensor | None = None, pending=None):
        """pending: _check_inputs' deferred (bounds, finish), read in this layout's sync and checked first."""
        self.batch, self.seq = attention_mask.shape
        m = attention_mask
        if m.dtype == torch.bool or m.is_floating_point():
            m = m != 0  # bool and float masks are 0/1 masks, as before packing existed
        m = m.long()  # (B, S) example number of each token, 0 = padding
        real = m != 0  # (B, S)
        # Example numbers never decrease along a valid row, so the running maximum of the tokens
        # before a token is the number of the last real token before it (0 at the row's start).
        step = m - F.pad(m[:, :-1], (1, 0)).cummax(dim=1).values if m.numel() else m  # (B, S)
        self.starts = real & (step != 0)  # (B, S) first token of each example
        # a number that goes back (an example split around another), skips one, or is negative
        bad = real & (step.clamp(0, 1) != step)
        # A row of padding only keeps a zero-length sequence, so a 0/1 mask gives exactly one
        # sequence per row (cu_seqlens of B + 1 entries, as before packing existed).
        boundary = self.starts.clone()
        boundary[:, :1] |= ~real.any(dim=1, keepdim=True)
        seg = (boundary.flatten().cumsum(0) - 1).clamp_(min=0)  # (B*S,) sequence of each token
        lengths = torch.zeros(max(self.batch * self.seq, self.batch), dtype=torch.long, device=m.device)
        lengths.scatter_add_(0, seg, real.flatten().long())  # (B*S,) tokens per sequence, zeros past the last
        keep = None
        if output_rows is not None and m.numel():
            # the rows a caller reads, plus every example's first token and column 0 (the pooler's)
            keep = (output_rows.bool() | self.starts) & real  # (B, S)
            keep[:, 0] |= real[:, 0]
        stats = [real.sum(), boundary.sum(), lengths.max(), bad.sum(), m.max(), (~real[:, 0]).sum()] if m.numel() else []
        if keep is not None:
            stats.append(keep.sum())
        host = ([torch.stack(stats)] if stats else []) + ([pending[0]] if pending is not None else [])
        values = torch.cat(host).tolist() if host else []  # (all int64) the one host sync
        if pending is not None:  # the input checks first, as if they had synced on their own
            pending[1](values[len(stats):])
        total, n_seqs, self.max_seqlen, n_bad, top, n_lead_pad, *n_keep = (
            values[:len(stats)] if stats else (0, self.batch, 0, 0, 0, 0))
        self.lead_padding = n_lead_pad > 0  # some row starts with padding (left padding)
        if n_bad:
            raise ValueError(
                f"attention_mask: {n_bad} token(s) break the packed-example numbering; a row must number "
                f"its examples 1, 2, 3, ... in order, each example's tokens contiguous (0 = padding)")
        self.total = total
        self.cu_seqlens = F.pad(torch.cumsum(lengths[:n_seqs], 0, dtype=torch.int32), (1, 0))  # (n_seqs + 1,)
        self.packed = top > 1  # some row holds two or more examples
        self.max_examples = top
        self.m = m
        if self.total == self.batch * self.seq:
            self.indices = None  # no padding: packing is a reshape
        else:
            # A real token may sit anywhere in its row (left padding, holes): gather by the mask.
            # Row-major order keeps row b's tokens before row b + 1's, in position order, which is
            # the layout cu_seqlens describes.
            self.indices = torch.nonzero_static(real.flatten(), size=self.total).squeeze(1)  # (T,)
        # rows: the packed rows (R,) that the last layer computes past its attention (None: all T)
        self.rows = self.row_positions = None
        if keep is not None and n_keep[0] < total:
            self.row_positions = torch.nonzero_static(keep.flatten(), size=n_keep[0]).squeeze(1)  # (R,) in B*S
            rank = real.flatten().cumsum(0) - 1  # (B*S,) packed row of each real position
            self.rows = rank.index_select(0, self.row_positions)  # (R,) in T

    def position_ids(self) -> torch.Tensor:
        """(B, S) positions that restart at 0 at the first token of every example."""
        col = torch.arange(self.seq, device=self.m.device).expand(self.batch, self.seq)  # (B, S)
        start_col = torch.where(self.starts, col, 0).cummax(dim=1).values  # (B, S)
        return col - start_col

    def first_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each example's first token sits in the flattened (B*S) batch: (positions (B, E),
        present (B, E) bool), E = the most examples in a row; absent slots point at position 0."""
        b, e = self.batch, self.max_examples
        row = torch.arange(b, device=self.m.device)[:, None]  # (B, 1)
        slot = torch.where(self.starts, row * e + self.m - 1, b * e).flatten()  # (B*S,); b*e: not a start
        flat_pos = torch.arange(b * self.seq, device=self.m.device)
        first = torch.full((b * e + 1,), -1, dtype=torch.long, device=self.m.device).scatter_(0, slot, flat_pos)
        first = first[:-1].view(b, e)
        return first.clamp(min=0), first >= 0

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(self.batch * self.seq, *x.shape[2:])  # (B*S, ...)
        return x if self.indices is None else x.index_select(0, self.indices)  # (T, ...)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None and x.shape[0] == self.rows.shape[0]:  # the last layer's output rows only
            return _scatter_rows(x, self.row_positions, self.batch, self.seq)
        if self.indices is not None:
            x = x.new_zeros(self.batch * self.seq, *x.shape[1:]).index_copy(0, self.indices, x)
        return x.view(self.batch, self.seq, *x.shape[1:])  # (B, S, ...)


def _scatter_rows(x, positions, batch, seq):
    """(R, ...) rows at flat positions (R,) of a (batch, seq) grid -> (batch, seq, ...), zeros elsewhere."""
    x = x.new_zeros(batch * seq, *x.shape[1:]).index_copy(0, positions, x)
    return x.view(batch, seq, *x.shape[1:])


class _Padded:
    """The padded layout: every position runs through the encoder, padding is masked as keys only.

    Used where values at padding positions matter (the QA loss normalises over every position, as
    transformers does) and, with want_probs, when attention probabilities are requested.
    """

    def __init__(self, attention_mask: torch.Tensor, dtype: torch.dtype, want_probs: bool = False,
                 output_rows: torch.Tensor | None = None, max_rows: int | None = None):
        self.batch, self.seq = attention_mask.shape
        self.key_padding_mask = attention_mask  # (B, S) bool
        self.want_probs = want_probs
        # rows, as in _Packed, but a fixed count (max_rows) chosen without a host sync, so that a
        # CUDA graph can hold it: the wanted positions and column 0 first, in order, then others.
        # More wanted positions than max_rows would drop some: the caller's bound must cover them.
        self.rows = self.row_positions = None
        if output_rows is not None and max_rows is not None and max_rows < self.batch * self.seq:
            keep = output_rows.bool().clone()
            keep[:, 0] = True  # the pooler's token
            order = torch.argsort((~keep).flatten().to(torch.uint8), stable=True)  # (B*S,) kept first
            self.rows = self.row_positions = order[:max_rows]  # (R,); packing is a reshape here
        # Additive mask exactly as transformers builds it, so the returned probabilities match.
        self.additive = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # (B,1,1,S)

    def pack(self, x):
        return x.reshape(self.batch * self.seq, *x.shape[2:])

    def unpack(self, x):
        if self.rows is not None and x.shape[0] == self.rows.shape[0]:  # the last layer's output rows only
            return _scatter_rows(x, self.row_positions, self.batch, self.seq)
        return x.view(self.batch, self.seq, *x.shape[1:])


# --------------------------------------------------------------------------------------- embeddings

class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
        return embed(self, input_ids, token_type_ids, position_ids, inputs_embeds)


def embed(emb, input_ids, token_type_ids, position_ids, inputs_embeds):
    """A BertEmbeddings forward (fastbert's or a patched transformers one): one fused kernel when its
    four parts are plain torch.nn modules, else (a hook, an adapter) their own calls, as transformers."""
    if inputs_embeds is None and not _plain(emb.word_embeddings, nn.Embedding):
        # a hook must see the word embeddings' call: transformers' enable_input_require_grads (reentrant
        # gradient checkpointing, PEFT) makes their output require grad through one
        inputs_embeds = emb.word_embeddings(input_ids)
    fusable = all(_plain(m, cls) for m, cls in ((emb.position_embeddings, nn.Embedding),
                                                (emb.token_type_embeddings, nn.Embedding),
                                                (emb.LayerNorm, nn.LayerNorm), (emb.dropout, nn.Dropout)))
    if inputs_embeds is None and fusable:
        p = emb.dropout.p if emb.training else 0.0  # the module's, as transformers reads it
        return embed_ids(emb, input_ids, token_type_ids, position_ids, p)
    if inputs_embeds is None:
        inputs_embeds = emb.word_embeddings(input_ids)
    h = inputs_embeds + emb.position_embeddings(position_ids) + emb.token_type_embeddings(token_type_ids)
    return emb.dropout(emb.LayerNorm(h))


def embed_ids(emb, input_ids, token_type_ids, position_ids, p: float):
    """LayerNorm(word + position + segment embeddings), dropout p, for a BertEmbeddings module
    (fastbert's or a patched transformers one): K.embed_layer_norm, except when training in fp32 on
    the CPU, where the word rows go through _GatherRows so that their gradient reuses its memory."""
    word = emb.word_embeddings.weight
    pad = emb.word_embeddings.padding_idx
    grad = torch.is_grad_enabled() and word.requires_grad
    if grad and word.device.type == "cpu" and word.dtype == torch.float32 and not torch.compiler.is_compiling():
        # the reference embed_layer_norm (fp32: no casts) with the word gather swapped
        cache = emb.__dict__.get("_word_grad")
        if cache is None:
            cache = emb._word_grad = ReusedBuffer()
        return K.reference.embed_layer_norm(input_ids, token_type_ids, position_ids, word,
                                            emb.position_embeddings.weight, emb.token_type_embeddings.weight,
                                            emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps, p,
                                            word_rows=_GatherRows.apply(word, input_ids, pad, cache))
    if grad and pad is not None:
        word = _ZeroRowGrad.apply(word, pad)
    return K.embed_layer_norm(input_ids, token_type_ids, position_ids, word,
                              emb.position_embeddings.weight, emb.token_type_embeddings.weight,
                              emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps, p,
                              validate=False)  # the model checked the ids (one sync for all)


class _GatherRows(torch.autograd.Function):
    """F.embedding(ids, weight) whose weight gradient (index_add of the output gradient, the padding
    row zeroed as nn.Embedding(padding_idx) does) is written into a reused buffer (kernels/_workspace.py)."""

    @staticmethod
    def forward(ctx, weight, ids, padding_idx, cache):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.cache, ctx.weight_shape = padding_idx, cache, weight.shape
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        ids, = ctx.saved_tensors
        gw = ctx.cache.take(ctx.weight_shape, grad.dtype, grad.device, zero=True)
        gw.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))  # (B*S, H) rows into (vocab, H)
        if ctx.padding_idx is not None:
            gw[ctx.padding_idx] = 0
        return gw, None, None, None


class _ZeroRowGrad(torch.autograd.Function):
    """Identity whose gradient skips one row: nn.Embedding(padding_idx=...) semantics for the
    word table, applied on the embedding path only (the tied MLM decoder still trains that row)."""

    @staticmethod
    def forward(ctx, weight, row):
        ctx.row = row
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        # In place: the gradient is the embedding op's own fresh (vocab, hidden) buffer with no other
        # reader; a copy of it cost 17 ms of a 293 ms MiniLM fine-tuning step (16 x 30 tokens, 2 CPU
        # threads). A broadcast or strided gradient (no op returns one today) is copied first.
        if not grad.is_contiguous():
            grad = grad.contiguous()
        grad[ctx.row] = 0  # a fill kernel: no index tensor copied from the host (CUDA-graph capture forbids that)
        return grad, None


# ------------------------------------------------------------------------------------------ encoder

class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)  # its p is the attention dropout

    @property
    def dropout_p(self) -> float:
        """The attention-probability dropout: the module's p, as in transformers (a caller that sets every
        nn.Dropout's p, as `fastbert pretrain --dropout` does on a loaded checkpoint, sets it)."""
        return self.dropout.p

    def forward(self, x, layout):
        nh, hd = self.num_attention_heads, self.attention_head_size
        projections = (self.query, self.key, self.value)
        if all(_plain(m, nn.Linear) and m.bias is not None for m in projections):
            # One GEMM for q, k and v; the concatenated weight is rebuilt each call (inside `linear`,
            # from the three weights) so that the three Linear modules (and their state-dict keys)
            # stay the source of truth.
            bias = torch.cat([m.bias for m in projections])  # (3D,)
            qkv = linear(x, [m.weight for m in projections], bias)  # (N, 3D)
        else:  # a hooked, wrapped (LoRA) or bias-free projection: each its own call
            qkv = torch.cat([m(x) for m in projections], dim=-1)  # (N, 3D)
        qkv = qkv.view(-1, 3, nh, hd)  # (N, 3, nh, hd)
        p = self.dropout_p if self.training else 0.0
        # The qkv-packed ops read q, k, v as strided views, write the context in the layout the output
        # matmul reads and return one gradient for qkv: no permute, stack or reshape copies.
        if isinstance(layout, _Packed):
            ctx = K.varlen_attention_qkvpacked(qkv, layout.cu_seqlens, layout.max_seqlen, dropout_p=p,
                                               validate=False)  # (T, nh, hd); the model built cu_seqlens itself
            return ctx.reshape(-1, nh * hd), None
        if not layout.want_probs:
            ctx = K.attention_qkvpacked(qkv.view(layout.batch, layout.seq, 3, nh, hd), layout.key_padding_mask,
                                        dropout_p=p)  # (B, S, nh, hd)
            return ctx.reshape(-1, nh * hd), None
        q, k, v = qkv.view(layout.batch, layout.seq, 3, nh, hd).permute(2, 0, 3, 1, 4)  # each (B, nh, S, hd)
        # Reference path that also returns the probabilities (output_attentions=True).
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + layout.additive  # (B, nh, S, S)
        # the probabilities after dropout, as transformers' eager attention returns them (what multiplies v)
        probs = F.dropout(torch.softmax(scores, dim=-1), p=p, training=p > 0)
        ctx = probs @ v  # (B, nh, S, hd)
        return ctx.permute(0, 2, 1, 3).reshape(-1, nh * hd), probs


# The matmul copy. Under autocast the fp32 residual stream is cast for each matmul it feeds, and
# autograd casts that matmul's input gradient back and adds it to the stream's. Instead, each residual
# LayerNorm also writes the copy (K.add_layer_norm(low_dtype=)) and its backward adds the copy's
# gradient; the copy goes to the next QKV or feed-forward matmul. Hooks keep their meaning: modules
# return what transformers' do, and a copy is made or used only where no hook could change the value
# between the LayerNorm and the matmul (else the matmul casts the stream itself, as before).

def _matmul_copy_dtype(residual):
    """The autocast dtype when autocast will cast this fp32 residual stream for a matmul, else None."""
    device = residual.device.type
    if residual.dtype != torch.float32 or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _hooked(module: nn.Module) -> bool:
    """Whether a hook (the module's own or a global one) would see a call of this module."""
    from torch.nn.modules import module as m
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)


def _plain(module: nn.Module, cls: type) -> bool:
    """Whether calling `module` is exactly `cls`'s own computation with its parameters, unobserved: a
    torch.nn `cls` whose forward is not overridden, without hooks. Only then may the model run its
    parameters in a fused kernel instead of calling it. A wrapped or subclassed layer (a LoRA
    adapter exposing its base layer's weight, a quantized Linear) or a hooked one runs as its own call."""
    return isinstance(module, cls) and type(module).forward is cls.forward and not _hooked(module)


def _dense(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a Linear; a plain one through autocast_linear.linear (fp32 weight gradients from
    the GEMM under CUDA autocast), anything else (hooked, wrapped) as its own call."""
    return linear(x, module.weight, module.bias) if _plain(module, nn.Linear) else module(x)


def _add_norm_with_copy(module, h, residual, low_dtype):
    """(y, y_mm) for a BertSelfOutput / BertOutput: y = module(h, residual), y_mm its matmul copy or None."""
    if low_dtype is None or _hooked(module):
        return module(h, residual), None
    return module.add_norm(h, residual, low_dtype)


def _dense_and_bias(dense: nn.Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x w^T, b) for a kernel that adds the bias itself (bias-GELU, GELU + LayerNorm). A dense that is
    not a plain Linear (hooked, wrapped, subclassed) or has no bias runs as the module instead, so its
    own call makes the output: (dense(x), zeros)."""
    if not _plain(dense, nn.Linear) or dense.bias is None:
        y = dense(x)
        return y, y.new_zeros(y.shape[-1])
    return linear(x, dense.weight), dense.bias


def _fuse_dense_bias(dense: nn.Linear, residual) -> bool:
    """Whether a residual block's dense bias joins its add + LayerNorm kernel (BertSelfOutput.add_norm)."""
    return _plain(dense, nn.Linear) and dense.bias is not None and K.use_triton(residual)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.add_norm(h, residual)

    def add_norm(self, h, residual, low_dtype=None):
        """LayerNorm(dropout(dense(h)) + residual); with low_dtype, (y, y in low_dtype) from one kernel.

        On the Triton kernels the dense runs without its bias and the add + LayerNorm kernel adds it
        (x_bias): its gradient is then summed by the LayerNorm backward kernel, not by a reduction of
        its own. Elsewhere (the CPU reference path), or when the dense has hooks (they must see its
        call and its output) or no bias, the dense runs as a module, as before."""
        if not (_plain(self.LayerNorm, nn.LayerNorm) and _plain(self.dropout, nn.Dropout)):
            y = self.LayerNorm(self.dropout(self.dense(h)) + residual)  # as transformers computes it
            return y if low_dtype is None else (y, None)
        p = self.dropout.p if self.training else 0.0
        dense = self.dense
        if _fuse_dense_bias(dense, residual):
            return K.add_layer_norm(linear(h, dense.weight), residual, self.LayerNorm.weight, self.LayerNorm.bias,
                                    self.LayerNorm.eps, p, low_dtype=low_dtype, x_bias=dense.bias)
        return K.add_layer_norm(dense(h), residual, self.LayerNorm.weight, self.LayerNorm.bias,
                                self.LayerNorm.eps, p, low_dtype=low_dtype)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, layout, rows=None, x_mm=None, low_dtype=None):
        """-> (y, probs); with low_dtype ((y, y_mm), probs) (the matmul copy, above). x_mm: x as the
        QKV matmul's input (None: x). rows (R,): continue past the attention on these rows only (the
        last layer, when the caller reads R of the T outputs; see _Packed); every row is still a key
        and value."""
        ctx, probs = self.self(x if x_mm is None else x_mm, layout)
        if rows is not None:
            ctx, x = ctx.index_select(0, rows), x.index_select(0, rows)  # (R, D) each
        if low_dtype is None:
            return self.output(ctx, x), probs
        return _add_norm_with_copy(self.output, ctx, x, low_dtype), probs


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.approximate = config.gelu_approximate

    def forward(self, x):
        act = getattr(self, "intermediate_act_fn", None)  # a patched transformers module's GELU
        if act is not None and _hooked(act):
            return act(self.dense(x))  # a hook must see the activation called and may change its output
        return K.bias_gelu(*_dense_and_bias(self.dense, x), self.approximate)


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


# The feed-forward block with GELU in the epilogues of the matmuls beside it (K.feed_forward): opt-in
# until a GPU run shows it beats cuBLAS + the bias-GELU kernel on the training step
# (benchmarks.bench_ffn, the fastbert-ffn row of benchmarks.bench_model). Read once at import;
# fastbert.bench.fused_ffn() turns it on for a block of code.
FUSED_FFN = env_switch("FASTBERT_FUSED_FFN", False)


def _fuse_ffn(layer, residual) -> bool:
    """Whether a BertLayer runs its feed-forward block as K.feed_forward: opted in, on the Triton kernels,
    no hook that must see the intermediate or output modules (or their denses) called, both denses
    with their biases (the output one's goes into the add + LayerNorm kernel, see _fuse_dense_bias)."""
    if not FUSED_FFN or not K.use_triton(residual):
        return False
    inter, out = layer.intermediate, layer.output
    return (inter.dense.bias is not None and out.dense.bias is not None
            and not any(map(_hooked, (inter, out))) and _plain(inter.dense, nn.Linear) and _plain(out.dense, nn.Linear)
            and _plain(out.LayerNorm, nn.LayerNorm) and _plain(out.dropout, nn.Dropout))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def feed_forward_add_norm(self, h_in, h, low_dtype=None):
        """output(intermediate(h_in), h) through K.feed_forward, its output bias in the add + LayerNorm
        kernel: (y, y_mm) as _add_norm_with_copy gives. h_in: h or its matmul copy. Under autocast the
        weights are cast to the autocast dtype here (as F.linear's autocast would), and h_in with them."""
        inter, out = self.intermediate, self.output
        device = h_in.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h_in.dtype
        w1, w2 = inter.dense.weight.to(dtype), out.dense.weight.to(dtype)
        ffn = K.feed_forward(h_in.to(dtype), w1, inter.dense.bias, w2, inter.approximate)  # (N, D), no output bias
        p = out.dropout.p if out.training else 0.0
        norm = out.LayerNorm
        y = K.add_layer_norm(ffn, h, norm.weight, norm.bias, norm.eps, p, low_dtype=low_dtype, x_bias=out.dense.bias)
        return y if low_dtype is not None else (y, None)

    def forward(self, x, layout, rows=None, x_mm=None, with_copy=False):
        """x (N, D), N = T packed or B*S padded -> (y, probs), y (R, D) given rows. with_copy: also
        return y's matmul copy for the next layer's QKV (or None): (y, probs, y_mm). x_mm: x's copy."""
        stream_low = _matmul_copy_dtype(x)  # h below is the same stream (dtype, device)
        low = stream_low
        if _hooked(self.attention):  # a pre-hook may change x: the QKV matmul must read what it passes on
            low = x_mm = None
        if low is None:
            h, probs = self.attention(x, layout, rows, x_mm)
            h_mm = None
        else:
            (h, h_mm), probs = self.attention(x, layout, rows, x_mm, low)
        h_in = h if h_mm is None else h_mm
        if _fuse_ffn(self, h):
            y, y_mm = self.feed_forward_add_norm(h_in, h, stream_low if with_copy else None)
        else:
            y, y_mm = _add_norm_with_copy(self.output, self.intermediate(h_in), h, stream_low if with_copy else None)
        return (y, probs, y_mm) if with_copy else (y, probs)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.checkpoint_kwargs = {}  # extra keywords of torch.utils.checkpoint.checkpoint

    def forward(self, x, layout, output_hidden_states=False, output_attentions=False):
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        kwargs = {"use_reentrant": False, **getattr(self, "checkpoint_kwargs", {})}
        reentrant = kwargs["use_reentrant"] is not False  # torch reads None as reentrant
        if (checkpointing and reentrant and not x.requires_grad
                and any(p.requires_grad for p in self.layer.parameters())):
            # A reentrant checkpoint differentiates only through inputs that need a gradient: with the
            # embeddings frozen (an adapter, a frozen lower model) the layers would silently get none
            # (a wholly frozen encoder needs none: not marked, no backward through it).
            # transformers hooks the word embeddings for this (enable_input_require_grads, which its
            # activation_checkpointing_enable calls); marking the encoder's input keeps the fused
            # embedding kernel.
            x = x.detach().requires_grad_()

        def checkpointed(layer):
            return functools.partial(torch.utils.checkpoint.checkpoint, layer, **kwargs)

        return run_layers(self.layer, x, layout, output_hidden_states, output_attentions,
                          checkpointed if checkpointing else lambda layer: None)


def run_layers(layers, x, layout, output_hidden_states, output_attentions, checkpointed):
    """The encoder loop -> (last x, hidden states or None, attention probabilities or None).
    checkpointed(layer): the checkpointed call of that layer, returning (y, probs), or None for a plain
    call. The matmul copy passes between plain calls only: a checkpoint keeps its inputs until backward."""
    hidden, attentions = ([x] if output_hidden_states else None), ([] if output_attentions else None)
    x_mm = None  # the matmul copy of x (see above); the embeddings' output has none
    for i, layer in enumerate(layers):
        rows = _last_layer_rows(layout, i, len(layers))
        call = checkpointed(layer)
        if call is not None:
            x, probs = call(x, layout, rows)
            x_mm = None
        else:
            x, probs, x_mm = _layer_with_copy(layer, x, layout, rows, x_mm, i < len(layers) - 1)
        if output_hidden_states:
            hidden.append(x)
        if output_attentions:
            attentions.append(probs)
    return x, hidden, attentions


def _layer_with_copy(layer, x, layout, rows, x_mm, copy_wanted):
    """A BertLayer call passing the matmul copy in and out, except into and out of a hooked layer
    (a hook may change x or replace y; a hooked layer returns transformers' (y, probs))."""
    if _hooked(layer):
        return (*layer(x, layout, rows), None)
    if not copy_wanted:
        return (*layer(x, layout, rows, x_mm), None)
    return layer(x, layout, rows, x_mm, with_copy=True)


def _last_layer_rows(layout, i: int, n_layers: int):
    """The rows layer i computes past its attention: all (None), or in the last layer the layout's
    `rows` when the caller reads only those outputs (BertModel's output_rows)."""
    return getattr(layout, "rows", None) if i == n_layers - 1 else None


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):  # (B, S, D) -> (B, D)
        return self.activation(_dense(self.dense, hidden_states[:, 0]))


# ---------------------------------------------------------------------------------------- the model

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class BertPreTrainedModel(nn.Module):
    """Weight initialisation and checkpoint I/O shared by every class (transformers' scheme)."""

    base_model_prefix = "bert"
    main_input_name = "input_ids"  # transformers' Trainer reads it (token counts, FLOPs)

    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a fastbert.BertConfig, got {type(config).__name__}")
        self.config = config

    def post_init(self):
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertLMPredictionHead):
            nn.init.zeros_(module.bias)

    def tie_weights(self):
        decoder = self.get_output_embeddings()
        if decoder is not None and self.config.tie_word_embeddings:
            decoder.weight = self.get_input_embeddings().weight

    def get_input_embeddings(self):
        return getattr(self, self.base_model_prefix, self).embeddings.word_embeddings

    def get_output_embeddings(self):
        cls = getattr(self, "cls", None)
        predictions = getattr(cls, "predictions", None)
        return predictions.decoder if predictions is not None else None

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' count: each Parameter once (the tied decoder is the word embeddings), only those
        that require grad if asked, without the embedding tables' weights if asked (Trainer's FLOPs
        estimate: 6 x tokens x this)."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in embeddings and (p.requires_grad or not only_trainable))

    def enable_input_require_grads(self):
        """transformers' switch (PEFT calls it): the word embeddings' output requires grad, so that a
        frozen model's reentrant checkpoints still pass gradients to adapters. A forward hook, as in
        transformers: the embeddings then run as their own call, not in the fused kernel (fastbert's
        own gradient checkpointing needs no hook: its encoder marks its input)."""
        def make_inputs_require_grads(module, inputs, output):
            output.requires_grad_(True)
        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(make_inputs_require_grads)

    def disable_input_require_grads(self):
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()

    def set_input_embeddings(self, value: nn.Embedding):
        getattr(self, self.base_model_prefix, self).embeddings.word_embeddings = value

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        predictions = getattr(getattr(self, "cls", None), "predictions", None)
        if predictions is None:
            raise AttributeError(f"{type(self).__name__} has no MLM decoder")
        predictions.decoder = new_embeddings
        bias = new_embeddings.bias
        if bias is not None and not self.config.tie_word_embeddings:
            # Untied, the decoder adds its own bias and cls.predictions.bias is unused (transformers 5).
            # An alias would be saved under cls.predictions.bias only (safetensors keeps one name),
            # and transformers would start the decoder's bias afresh: a copy keeps both names.
            bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        predictions.bias = bias  # tied: one Parameter under two names, as in __init__

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """transformers' method: grow or shrink the vocabulary to new_num_tokens rows (rounded up to a
        multiple of pad_to_multiple_of), keeping the first rows, in the word embeddings, the MLM
        decoder (re-tied when tied) and its bias; config.vocab_size follows. Rows added with
        mean_resizing are the mean of the old rows — transformers draws them around that mean with
        a covariance scaled by 1e-9, a spread of ~3e-5 of the rows' own; without it they are drawn
        as at initialisation (N(0, initializer_range)). Added decoder-bias entries, as transformers 5
        makes them: 0 when tied (it pads the bias), the old entries' mean when untied and
        mean_resizing. Shrinking below pad_token_id sets it to None. The Parameters are new: build
        the optimizer afterwards.
        Returns the word-embedding module."""
        embeddings = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return embeddings
        for name, value in (("new_num_tokens", new_num_tokens), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        n = embeddings.weight.shape[0] if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        embeddings.weight = self._resized_rows(embeddings.weight, n, mean_resizing)
        embeddings.num_embeddings = n
        if embeddings.padding_idx is not None and embeddings.padding_idx >= n:
            # The padding row was cut off. transformers keeps pad_token_id in its config, which then
            # fails to load (pad_token_id outside the vocabulary); None loads in both.
            embeddings.padding_idx = self.config.pad_token_id = None
        decoder = self.get_output_embeddings()
        if decoder is not None:
            tied = self.config.tie_word_embeddings
            if not tied:
                decoder.weight = self._resized_rows(decoder.weight, n, mean_resizing)
            if decoder.bias is not None:
                # untied, transformers starts the added entries at the old ones' mean (mean_resizing)
                decoder.bias = self._resized_rows(decoder.bias, n, mean_resizing=mean_resizing and not tied,
                                                  init_std=0.0)
                self.set_output_embeddings(decoder)  # cls.predictions.bias follows, as in transformers
            decoder.out_features = n
        self.config.vocab_size = n
        self.tie_weights()
        return embeddings

    def _resized_rows(self, weight: torch.Tensor, n: int, mean_resizing: bool,
                      init_std: float | None = None) -> nn.Parameter:
        """(old, ...) -> a new (n, ...) Parameter: the first min(old, n) rows kept, the rest initialised."""
        old = weight.shape[0]
        with torch.no_grad():
            new = weight.new_empty(n, *weight.shape[1:])
            new[:min(old, n)] = weight[:n]
            if n > old:
                if mean_resizing:
                    new[old:] = weight.float().mean(0).to(weight.dtype)
                else:
                    std = self.config.initializer_range if init_std is None else init_std
                    new[old:].normal_(0.0, std)
        return nn.Parameter(new, requires_grad=weight.requires_grad)

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers: int = 1,
                                      offload: bool = False):
        """transformers' switch and signature (Trainer(activation_checkpointing=True) calls it with keywords):
        gradient_checkpointing_kwargs go to torch.utils.checkpoint.checkpoint (use_reentrant defaults to
        False); every layer is checkpointed, on the device (every_n_layers > 1 and offload are not supported)."""
        if every_n_layers != 1 or offload:
            raise ValueError("fastbert checkpoints every encoder layer on the device: every_n_layers=1, offload=False")
        encoder = getattr(self, self.base_model_prefix, self).encoder
        encoder.gradient_checkpointing = True
        encoder.checkpoint_kwargs = dict(gradient_checkpointing_kwargs or {})

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False):
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self):
        getattr(self, self.base_model_prefix, self).encoder.gradient_checkpointing = False

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return getattr(self, self.base_model_prefix, self).encoder.gradient_checkpointing

    @classmethod
    def from_pretrained(cls, path, dtype=None, **config_overrides):
        """dtype None builds float32 whatever the checkpoint stores (transformers 4's default);
        "auto" keeps the checkpoint's dtype (transformers 5's default); a torch.dtype or its name casts."""
        from .checkpoint import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, **config_overrides)

    def save_pretrained(self, path, is_main_process: bool = True, state_dict=None, *, push_to_hub: bool = False,
                        variant=None, safe_serialization: bool = True, max_shard_size=None, **ignored):
        """config.json + model.safetensors, taking transformers' save_pretrained arguments as libraries
        pass them (Trainer, accelerate, sentence-transformers): is_main_process=False writes nothing,
        state_dict replaces the model's own. Always one safetensors file, as transformers 5 writes:
        max_shard_size is taken and one file written (from_pretrained reads both), safe_serialization=False
        warns; other keywords (token, save_peft_format, ...) are ignored, as transformers ignores them
        without a hub push. A hub push or a weights variant is refused (local files only)."""
        if push_to_hub or variant is not None:
            raise ValueError("save_pretrained: fastbert writes config.json + model.safetensors to a local folder "
                             f"(push_to_hub={push_to_hub!r}, variant={variant!r} are not supported)")
        if not safe_serialization:
            warnings.warn("save_pretrained: fastbert writes safetensors only; safe_serialization=False ignored",
                          UserWarning, stacklevel=2)
        if not is_main_process:
            return
        from .checkpoint import save_pretrained
        save_pretrained(self, path, state_dict=state_dict)


def _check_inputs(config, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                  vocab_size: int, defer: bool = False):
    """(shape, mask_max, pending). vocab_size: the rows of the word-embedding table in use
    (set_input_embeddings changes the table, not config.vocab_size, as in transformers).

    The value checks (ids in range, mask values) read every min and max in one host sync. With
    ``defer`` they are not read here: ``pending`` is (bounds tensor, finish) for the caller to read
    in its own sync (the unpadded layout's, _Packed) and pass to ``finish(values)``, which raises as
    the check would have and returns mask_max; mask_max is then None. Without defer, pending is None."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in _INT_DTYPES:
            raise ValueError(f"input_ids must be an integer tensor, got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"inputs_embeds must be (batch, seq, {config.hidden_size}), "
                             f"got {tuple(inputs_embeds.shape)}")
        shape = tuple(inputs_embeds.shape[:2])
    if 0 in shape:  # transformers fails here too, in a reshape; say what is wrong instead
        raise ValueError(f"an empty batch: the input is {shape} (batch, seq); give at least one row of at least "
                         f"one token")
    if shape[1] > config.max_position_embeddings:
        raise ValueError(f"sequence length {shape[1]} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                    ("position_ids", position_ids)):
        if t is not None and tuple(t.shape) != shape and not (name == "position_ids" and t.dim() == 2
                                                               and t.shape[0] == 1 and t.shape[1] == shape[1]):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but the input is {shape}")
    checks = [("token_type_ids", token_type_ids, config.type_vocab_size),
              ("position_ids", position_ids, config.max_position_embeddings)]
    if input_ids is not None:
        checks.insert(0, ("input_ids", input_ids, vocab_size))
    checks = [(name, t, bound) for name, t, bound in checks if t is not None and t.numel()]
    for name, t, _ in checks:
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    # An integer mask may number packed examples (values above 1): its range joins the same sync.
    if (attention_mask is not None and attention_mask.numel() and not attention_mask.is_floating_point()
            and attention_mask.dtype != torch.bool):
        checks.append(("attention_mask", attention_mask, None))
    if not (checks and K._check_values()):  # skipped under torch.compile and CUDA-graph capture
        return shape, None, None

    def finish(bounds):
        mask_max = None
        for (name, _, bound), lo, hi in zip(checks, bounds[0::2], bounds[1::2]):
            if bound is None:  # the mask
                if lo < 0:
                    raise ValueError(f"attention_mask must be 0 (padding), 1 (real token) or, in packed "
                                     f"rows, an example number 1, 2, 3, ...; got {lo}")
                mask_max = hi
            elif lo < 0 or hi >= bound:
                raise ValueError(f"{name} must lie in [0, {bound}); got values in [{lo}, {hi}]")
        return mask_max

    bounds = torch.stack([v.long() for _, t, _ in checks for v in t.aminmax()])  # every min and max
    if defer:
        return shape, None, (bounds, finish)
    return shape, finish(bounds.tolist()), None


class BertModel(BertPreTrainedModel):
    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                inputs_embeds=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                unpad=True, output_rows=None, max_output_rows=None, **unused):
        """unpad=False runs padding positions through the encoder too (their outputs then equal
        transformers'); the default drops them after the embeddings, except for a left-padded batch
        when there is a pooler (it reads column 0, which transformers runs through every layer).
        output_hidden_states, output_attentions and return_dict left None take the config's values.

        output_rows (a fastbert extension, used by the pretraining and MLM heads when training with
        labels, and by the heads that read pooler_output alone — sequence classification, multiple
        choice, NSP — unless a hook watches the encoder, see _watched): a (batch, seq) bool mask of
        the positions whose last_hidden_state the caller reads.
        The last layer then runs its output projection, LayerNorms and feed-forward on those rows and
        on the pooler's (every example's first token, column 0) only — its attention still sees every
        token as key and value, so those rows are exact — and last_hidden_state is 0 at the rows not
        computed (the padded layout's fixed count may compute some unwanted rows too). In
        pretraining (15% of tokens labelled) that skips ~80% of the last layer's linear work. Ignored
        with output_hidden_states or output_attentions, and on the padded layout (unpad=False, CUDA-graph
        capture) unless max_output_rows bounds the count: there the last layer runs on exactly that
        many rows (the wanted ones first), a shape fixed without a host sync, as a CUDA graph needs.

        Packed rows (a fastbert extension; transformers has no equivalent): an integer
        attention_mask may hold, instead of 1, the number of the example each token belongs to
        (1, 2, 3, ... in order along the row, each example's tokens contiguous; 0 = padding), as
        Graphcore's packed BERT does. Every example is then its own sequence for attention (no token
        attends across examples), and
        - position_ids and token_type_ids are per token and should restart for every example; when
          position_ids is None they are made so (0, 1, ... from each example's first token);
        - pooler_output is (batch, max_examples, hidden): the pooler on each example's first token,
          zeros in the slots past a row's last example;
        - last_hidden_state and hidden_states stay (batch, seq, hidden).
        A batch is packed when some mask value is above 1; a 0/1 mask (int, bool or float) gives
        exactly the outputs it gave before packing existed. A mask that numbers a row's examples out
        of order, skips a number or splits an example around another raises ValueError. Packing
        needs the unpadded layout: a packed mask is refused with output_attentions=True or
        unpad=False (so by BertForQuestionAnswering); that check shares the input check's host sync,
        so it is skipped in compiled regions and CUDA-graph capture, where a packed mask is NOT
        supported (capture runs the padded layout, whose attention would cross examples).
        """
        output_hidden_states, output_attentions, return_dict = _flags(
            self.config, output_hidden_states, output_attentions, return_dict)
        # Unpadding needs one host sync (the row lengths), which CUDA-graph capture forbids: a
        # captured step runs the padded layout (its shapes are static, padding is masked as keys).
        padded = output_attentions or not unpad or _capturing()
        # unpadded, the input checks' values join _Packed's sync: one round trip per forward, not two
        (batch, seq), mask_max, pending = _check_inputs(self.config, input_ids, attention_mask, token_type_ids,
                                                        position_ids, inputs_embeds,
                                                        self.embeddings.word_embeddings.weight.shape[0],
                                                        defer=not padded)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if padded and mask_max is not None and mask_max > 1:
            raise ValueError("packed attention masks (example numbers above 1) run on the unpadded layout only: "
                             "not with output_attentions=True, unpad=False or BertForQuestionAnswering")
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        if output_rows is not None and tuple(output_rows.shape) != (batch, seq):
            if pending is not None:  # the value checks' errors come first, as when they synced on their own
                pending[1](pending[0].tolist())
            raise ValueError(f"output_rows has shape {tuple(output_rows.shape)} but the input is {(batch, seq)}")
        layout = None if padded else _Packed(attention_mask, None if output_hidden_states else output_rows,
                                             pending=pending)
        if layout is not None and layout.lead_padding and not layout.packed and self.pooler is not None:
            # The pooler reads column 0, padding in a left-padded row; transformers runs that position
            # through every layer (a query over the row's real keys). The padded layout does the same.
            layout = None
        if position_ids is None:
            if layout is not None and layout.packed:
                position_ids = layout.position_ids()
            else:
                position_ids = torch.arange(seq, device=device).expand(batch, seq)
        else:
            position_ids = position_ids.expand(batch, seq)

        h = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, S, D)
        if layout is None:
            rows_ok = not (output_hidden_states or output_attentions)
            layout = _Padded(attention_mask.bool(), h.dtype, want_probs=output_attentions,
                             output_rows=output_rows if rows_ok else None, max_rows=max_output_rows)
        x, hidden, attentions = self.encoder(layout.pack(h), layout, output_hidden_states, output_attentions)
        sequence_output = layout.unpack(x)  # (B, S, D)
        pooled = None
        if self.pooler is not None:
            if isinstance(layout, _Packed) and layout.packed:
                first, present = layout.first_tokens()  # (B, E) each
                heads = sequence_output.reshape(batch * seq, 1, -1).index_select(0, first.flatten())  # (B*E, 1, D)
                pooled = self.pooler(heads).view(batch, layout.max_examples, -1)  # (B, E, D)
                pooled = pooled * present[..., None].to(pooled.dtype)
            else:
                pooled = self.pooler(sequence_output)  # (B, D)
        return _finish(ModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled,
            hidden_states=tuple(layout.unpack(t) for t in hidden) if hidden is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
            cross_attentions=() if attentions is not None and _EMPTY_CROSS_ATTENTIONS else None,
        ), return_dict)


# -------------------------------------------------------------------------------------------- heads

class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.approximate = config.gelu_approximate

    def forward(self, x):
        act = getattr(self, "transform_act_fn", None)  # a patched transformers module's GELU
        if (act is not None and _hooked(act)) or not _plain(self.LayerNorm, nn.LayerNorm):
            return self.LayerNorm((act or functools.partial(F.gelu, approximate=self.approximate))(self.dense(x)))
        return K.gelu_layer_norm(*_dense_and_bias(self.dense, x), self.LayerNorm.weight, self.LayerNorm.bias,
                                 self.LayerNorm.eps, self.approximate)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        if config.tie_word_embeddings:
            self.decoder.bias = self.bias  # one Parameter under two names, as in transformers
        # else the decoder adds its own bias and cls.predictions.bias is unused, as in transformers 5

    def forward(self, sequence_output):  # (..., D) -> (..., V)
        return self.decoder(self.transform(sequence_output))

    # Rows the head runs on when a step is captured as a CUDA graph (fastbert/cuda_graphs.py sets it
    # while capturing): a fixed count K, chosen without the host sync of nonzero(). None: exactly the
    # labelled rows.
    static_rows = None

    def masked_loss(self, sequence_output, labels):
        """Mean MLM loss over labelled positions, running the head on those rows only."""
        flat_labels = labels.reshape(-1)  # (B*S,)
        static = getattr(self, "static_rows", None)
        plain = _plain(self.decoder, nn.Linear)  # a wrapped decoder need not have .weight / .bias
        vocab = self.decoder.weight.shape[0] if plain else None
        if static is None:
            # The label check's answer is computed before nonzero's host sync and read after it, when
            # nothing is queued: one sync of the step's middle, not two (K.mlm_loss's own check would
            # read it again after the head's kernels are queued). A wrapped decoder's vocabulary is
            # its logits' width: checked below.
            bad = K.mlm_labels_bad(flat_labels, vocab) if plain and K._check_values() else None
            rows = (flat_labels != -100).nonzero().squeeze(1)  # (M,)
            if bad is not None and bool(bad):
                K.raise_bad_mlm_labels(flat_labels, vocab)
        else:
            # No host sync on this path (a CUDA graph, the eager pretraining loop): a label outside the
            # vocabulary makes the loss NaN, as too many labelled rows do, and reaches no cross-entropy
            # (on CUDA an out-of-range target is a device assert that ends the process).
            rows, overflow = _static_label_rows(flat_labels, static)  # (K,)
            if plain:
                flat_labels, bad = _drop_bad_labels(flat_labels, vocab)
                overflow = overflow | bad
        h = sequence_output.reshape(-1, sequence_output.shape[-1]).index_select(0, rows)  # (M, D)
        h = self.transform(h)
        if not plain:  # a hooked or wrapped decoder: its own call, full logits
            target = flat_labels.index_select(0, rows)  # (M,)
            logits = self.decoder(h).float()  # (M, V)
            if static is not None:
                target, bad = _drop_bad_labels(target, logits.shape[-1])
                overflow = overflow | bad
            elif K._check_values() and bool(K.mlm_labels_bad(target, logits.shape[-1])):
                K.raise_bad_mlm_labels(target, logits.shape[-1])
            total = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
            loss = total / (target != -100).sum().clamp(min=1)
            return loss if static is None else loss.masked_fill(overflow, math.nan)
        # the decoder's bias, as forward adds it (None after set_output_embeddings of a bias-free Linear)
        bias = self.decoder.bias if self.decoder.bias is not None else self.decoder.weight.new_zeros(
            self.decoder.out_features)
        # at least fp32: under bf16 autocast a bf16 loss would be rounded to ~3 significant digits
        loss = K.mlm_loss(h, self.decoder.weight, bias, flat_labels.index_select(0, rows),
                          out_dtype=torch.promote_types(h.dtype, torch.float32),
                          validate=False)  # checked above: raised, or dropped into a NaN loss
        return loss if static is None else loss.masked_fill(overflow, math.nan)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, sequence_output):
        return self.predictions(sequence_output)


class BertOnlyNSPHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, pooled_output):
        return _dense(self.seq_relationship, pooled_output)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)

    def forward(self, sequence_output, pooled_output):  # -> (prediction logits, NSP logits), as in transformers
        return self.predictions(sequence_output), _dense(self.seq_relationship, pooled_output)


def _mlm(head: BertLMPredictionHead, sequence_output, labels, training: bool, logits=None):
    """(loss, logits) of the MLM head; masked rows only when training with labels (logits None).
    logits: the full logits when the caller ran the head itself (through its parent module)."""
    if labels is not None and training:
        return head.masked_loss(sequence_output, labels), None
    if logits is None:
        logits = head(sequence_output)  # (B, S, V)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return loss, logits


def _watched(bert) -> bool:
    """Whether a hook could see the rows that output_rows leaves out: one on the encoder model, the
    encoder, the last layer or its parts, or the pooler (it takes the whole sequence output), or a
    global one. The heads then run every row, so that features read by hooks stay whole, as in
    transformers."""
    pooler = (bert.pooler,) if bert.pooler is not None else ()
    return any(_hooked(m) for m in (bert, bert.encoder, *bert.encoder.layer[-1:].modules(), *pooler))


def _mlm_rows(head, labels, training: bool, input_ids, inputs_embeds, bert) -> dict:
    """BertModel's output_rows for an MLM head: the labelled positions when the head will read only
    those (training with labels, see _mlm); and when the head runs a fixed K rows (static_rows, in a
    CUDA graph), the bound K + batch (the labelled rows and each row's first token). Nothing ({})
    while `bert` is _watched."""
    if labels is None or not training or getattr(labels, "dim", lambda: 0)() != 2 or _watched(bert):
        return {}
    shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    if labels.shape != shape:
        return {}
    static = getattr(head, "static_rows", None)
    return dict(output_rows=labels != -100, max_output_rows=None if static is None else int(static) + shape[0])


def _nsp_loss(logits, labels):
    """Mean cross-entropy over the labelled sentence pairs; packed rows give (B, E, 2) logits and take
    (B, E) labels with -100 in the slots past a row's last example (ignored)."""
    if labels.numel() * logits.shape[-1] != logits.numel():
        raise ValueError(f"next_sentence_label has shape {tuple(labels.shape)} but there are "
                         f"{tuple(logits.shape[:-1])} sentence pairs (packed rows: (batch, max_examples), "
                         f"-100 past a row's last example)")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _pooler_rows(bert, input_ids, inputs_embeds) -> dict:
    """BertModel's output_rows for a head that reads pooler_output only: no rows beyond those BertModel
    always keeps (every example's first token and column 0), so the last layer runs past its attention
    on one row per example — exact, as its attention still sees every key. max_output_rows = batch is
    the padded layout's fixed count (CUDA-graph capture). Nothing ({}) while `bert` is _watched."""
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None or _watched(bert):
        return {}
    batch, seq = ref.shape[:2]
    return dict(output_rows=torch.zeros(batch, seq, dtype=torch.bool, device=ref.device), max_output_rows=batch)


def _refuse_packed(name, pooled):
    if pooled.dim() == 3:
        raise ValueError(f"{name} does not take packed rows (attention_mask values above 1); packing is for "
                         f"BertModel, BertForPreTraining, BertForMaskedLM, BertForNextSentencePrediction and "
                         f"BertForTokenClassification")


class BertForPreTraining(BertPreTrainedModel):
    """MLM + NSP. Packed rows (see BertModel.forward; a fastbert extension): labels stay per token;
    seq_relationship_logits are (batch, max_examples, 2), one pair per example, and
    next_sentence_label is (batch, max_examples) with -100 where a row holds fewer examples, so the
    NSP loss is the mean over the real examples (and the MLM loss the mean over every masked token
    of the batch, as unpacked). As in transformers, the loss needs both label kinds; in training mode
    MLM ``labels`` alone give loss None and, by API.md's masked-rows rule, prediction_logits None too:
    pass next_sentence_label, or use BertForMaskedLM's loss for MLM alone. In training, MLM labels all
    -100 add 0.0 (transformers: nan), so the loss is the NSP loss alone."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                inputs_embeds=None, labels=None, next_sentence_label=None, output_hidden_states=None,
                output_attentions=None, return_dict=None, **unused):
        output_hidden_states, output_attentions, return_dict = _flags(
            self.config, output_hidden_states, output_attentions, return_dict)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds=inputs_embeds,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                        return_dict=True,
                        **_mlm_rows(self.cls.predictions, labels, self.training, input_ids, inputs_embeds, self.bert))
        prediction_logits = None
        if labels is None or not self.training:  # full logits: the heads module runs (hooks see it)
            prediction_logits, nsp_logits = self.cls(out.last_hidden_state, out.pooler_output)
        else:
            nsp_logits = _dense(self.cls.seq_relationship, out.pooler_output)  # (B, 2); packed rows (B, E, 2)
        mlm_loss, prediction_logits = _mlm(self.cls.predictions, out.last_hidden_state, labels, self.training,
                                           prediction_logits)
        loss = None
        if labels is not None and next_sentence_label is not None:
            loss = mlm_loss + _nsp_loss(nsp_logits, next_sentence_label)
        return _finish(ModelOutput(loss=loss, prediction_logits=prediction_logits,
                                   seq_relationship_logits=nsp_logits, hidden_states=out.hidden_states,
                                   attentions=out.attentions), return_dict)


class BertForMaskedLM(BertPreTrainedModel):
    """In training with labels the head runs on the labelled rows only (logits None); labels all -100
    then give loss 0.0 and zero gradients (an optimizer step still applies its momentum and weight
    decay), not transformers' nan (eval mode gives its nan)."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **unused):
        output_hidden_states, output_attentions, return_dict = _flags(
            self.config, output_hidden_states, output_attentions, return_dict)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds=inputs_embeds,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                        return_dict=True,
                        **_mlm_rows(self.cls.predictions, labels, self.training, input_ids, inputs_embeds, self.bert))
        full = None if labels is not None and self.training else self.cls(out.last_hidden_state)  # its hooks see it
        loss, logits = _mlm(self.cls.predictions, out.last_hidden_state, labels, self.training, full)
        return _finish(ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                   attentions=out.attentions), return_dict)


class BertForNextSentencePrediction(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.cls = BertOnlyNSPHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                inputs_embeds=None, labels=None, next_sentence_label=None, output_hidden_states=None,
                output_attentions=None, return_dict=None, **unused):
        output_hidden_states, output_attentions, return_dict = _flags(
            self.config, output_hidden_states, output_attentions, return_dict)
        labels = labels if labels is not None else next_sentence_label
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds=inputs_embeds,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                        return_dict=True, **_pooler_rows(self.bert, input_ids, inputs_embeds))
        logits = self.cls(out.pooler_output)  # (B, 2); packed rows (B, E, 2)
        loss = _nsp_loss(logits, labels) if labels is not None else None
        return _finish(ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                   attentions=out.attentions), return_dict)


def _classifier_dropout(config):
    p = config.classifier_dropout
    return nn.Dropout(config.hidden_dropout_prob if p is None else p)


def _sequence_classification_loss(config, logits, labels):
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
        # recorded, as transformers does: save_pretrained writes it, and transformers' text-classification
        # pipeline reads it to choose sigmoid (multi-label) or softmax
        config.problem_type = problem
    if problem == "regression":
        return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype)) if config.num_labels == 1 \
            else F.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class BertForSequenceClassification(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **unused):
        output_hidden_states, output_attentions, return_dict = _flags(
            self.config, output_hidden_states, output_attentions, return_dict)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds=inputs_embeds,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                        return_dict=True, **_pooler_rows(self.bert, input_ids, inputs_embeds))
        _refuse_packed(type(self).__name__, out.pooler_output)
        logits = _dense(self.classifier, self.dropout(out.pooler_output))  # (B, num_labels)
        loss = _sequence_classification_loss(self.config, logits, labels) if labels is not None else None
        return _finish(ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                   attentions=out.attentions), return_dict)


class BertForTokenClassification(BertPreTrainedModel):
    """Padding positions are not run through the encoder: label them -100 (transformers' collators
    do), or the loss includes logits of unspecified values there."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **unused):
        output_hidden_states, output_attentions, return_dict = _flags(
            self.config, output_hidden_states, output_attentions, return_dict)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds=inputs_embeds,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                        return_dict=True)
        logits = _dense(self.classifier, self.dropout(out.last_hidden_state))  # (B, S, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return _finish(ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                   attentions=out.attentions), return_dict)


class BertForQuestionAnswering(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                inputs_embeds=None, start_positions=None, end_positions=None, output_hidden_states=None,
                output_attentions=None, return_dict=None, **unused):
        output_hidden_states, output_attentions, return_dict = _flags(
            self.config, output_hidden_states, output_attentions, return_dict)
        # Padding positions stay in: their logits enter the softmax of the span loss in transformers.
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds=inputs_embeds,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                        return_dict=True, unpad=False)
        logits = _dense(self.qa_outputs, out.last_hidden_state)  # (B, S, 2)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))  # (B, S) each
        loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the input (e.g. a truncated answer) are ignored, as in transformers.
            ignored = start_logits.size(1)
            start = start_positions.reshape(-1).clamp(0, ignored)
            end = end_positions.reshape(-1).clamp(0, ignored)
            loss = (F.cross_entropy(start_logits, start, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2
        return _finish(ModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                   hidden_states=out.hidden_states, attentions=out.attentions), return_dict)


class BertForMultipleChoice(BertPreTrainedModel):
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, *,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **unused):
        output_hidden_states, output_attentions, return_dict = _flags(
            self.config, output_hidden_states, output_attentions, return_dict)
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None or ref.dim() < 3:
            raise ValueError("BertForMultipleChoice takes input of shape (batch, choices, seq)")
        if 0 in ref.shape[:3]:  # said here: flattened, the shape the user gave is lost
            raise ValueError(f"an empty batch: the input is {tuple(ref.shape[:3])} (batch, choices, seq); give at "
                             f"least one question of at least one choice of at least one token")
        choices = ref.shape[1]

        def flat(t):  # (B, C, S, ...) -> (B*C, S, ...)
            return t.reshape(-1, *t.shape[2:]) if t is not None else None

        if position_ids is not None:  # (B, C, S) or one (1, S) row for all, as transformers takes them
            position_ids = position_ids.reshape(-1, position_ids.shape[-1])  # (B*C, S) or (1, S)
        out = self.bert(flat(input_ids), flat(attention_mask), flat(token_type_ids), position_ids,
                        inputs_embeds=flat(inputs_embeds), output_hidden_states=output_hidden_states,
                        output_attentions=output_attentions, return_dict=True,
                        **_pooler_rows(self.bert, flat(input_ids), flat(inputs_embeds)))
        _refuse_packed(type(self).__name__, out.pooler_output)
        logits = _dense(self.classifier, self.dropout(out.pooler_output)).view(-1, choices)  # (B, C)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return _finish(ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                   attentions=out.attentions), return_dict)


MODEL_CLASSES = {
    cls.__name__: cls for cls in (
        BertModel, BertForPreTraining, BertForMaskedLM, BertForNextSentencePrediction,
        BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering,
        BertForMultipleChoice)
}
