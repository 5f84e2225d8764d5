"""Make a transformers Bert model run fastbert's kernels, in place.

    model = transformers.BertForSequenceClassification.from_pretrained(path)
    fastbert.patch(model)         # same object, same Parameters, same state-dict keys; returns model
    ...                           # train / evaluate as before (a Trainer script included)
    fastbert.unpatch(model)       # transformers' own forward again, bit for bit

    with fastbert.patch(model):   # or patched for one block only
        ...

How: each module whose forward fastbert replaces has its class swapped (``module.__class__``) for a
subclass of its own transformers class whose forward is fastbert's. fastbert/modeling.py uses
transformers' module and attribute names, so most of its forward functions run on transformers'
modules as they are; the few attributes that differ (dropout probability, GELU form) are read
through properties of the subclass. No Parameter, buffer or hook is touched, so an optimizer made
before or after patching keeps working; ``isinstance(model, transformers.BertForX)`` stays true;
the class name, which save_pretrained writes into config.json, stays the same; ``.to()``,
``.half()``, ``copy.deepcopy``, pickling and ``save_pretrained`` (loadable by unpatched
transformers) keep working.

Supports: transformers' BertModel, BertForPreTraining, BertForMaskedLM,
BertForNextSentencePrediction, BertForSequenceClassification, BertForTokenClassification,
BertForQuestionAnswering and BertForMultipleChoice (transformers 5.x), with hidden_act "gelu",
"gelu_new", "gelu_pytorch_tanh" (or their "_python" spellings); positional or keyword arguments as
transformers takes them, return_dict, inputs_embeds, output_hidden_states (also 5.2x's index
selection), output_attentions, labels for every head, gradient checkpointing through transformers'
own switch.

Not supported (patch raises, naming the reason): other models, subclasses of these classes,
is_decoder / add_cross_attention / is_causal, position_embedding_type other than "absolute", other
activations, modules replaced by adapters or quantized layers (e.g. LoRA, bitsandbytes: only plain
nn.Linear / nn.LayerNorm / nn.Embedding), modules whose forward was overridden on the instance
(accelerate hooks, device_map offloading), a model already wrapped by torch.compile or DDP (patch
first, then wrap: torch.compile traces the patched forward).

Caution, where a patched model differs from transformers (exactly as fastbert's own classes do):
- With MLM labels in training mode the MLM head runs on the masked rows only: the loss is
  transformers' loss, and prediction_logits / logits are None (a return_dict=False tuple keeps their slot,
  as None, so it unpacks by position). In eval mode they are full. Forward hooks on cls,
  cls.predictions and the decoder are not called then (the transform runs on the masked rows, and
  its hooks see those).
- The last encoder layer runs past its attention only on the rows a head reads: with MLM labels in
  training mode the masked rows and each example's first token; in the heads that read pooler_output
  alone (sequence classification, multiple choice, NSP) each example's first token, in training and
  eval. Not while a forward or backward hook is registered on bert, bert.encoder, the last layer or
  its submodules, or bert.pooler (or globally): then every row runs, so features read by hooks stay whole.
- Values at padding positions are unspecified but finite.
- output_hidden_states, output_attentions or return_dict passed as an explicit None takes the config's
  value (transformers 4.x's rule, and fastbert's own classes'). transformers 5.x is not consistent there:
  an explicit None turns hidden states and attentions off, and BertModel (not its heads) returns an
  output object for return_dict=None even when the config says False.
- attention_mask must be (batch, seq) (0/1, bool or float); 4-D masks raise ValueError. Integer
  values above 1 are fastbert's packed rows (see fastbert.modeling.BertModel.forward).
- config._attn_implementation is ignored: fastbert's attention always runs; output_attentions=True
  runs fastbert's reference (eager) attention for that call.
- Forward hooks on the query / key / value Linears, the LayerNorms and Embeddings inside the encoder
  and the MLM transform do not fire (the fused kernels read their weights); hooks on Bert* modules
  and on the attention-output, intermediate and output denses, the GELU modules (intermediate_act_fn,
  transform_act_fn), the MLM transform's dense and the word embeddings do (a hooked one runs as a
  module).
"""
from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn as nn

from . import modeling as fb
from .config import unsupported_features

__all__ = ["patch", "unpatch"]

_HEADS = [name for name in fb.MODEL_CLASSES if name != "BertModel"]

# transformers' output class of each model class (module, name)
_OUTPUTS = {
    "BertModel": ("transformers.modeling_outputs", "BaseModelOutputWithPoolingAndCrossAttentions"),
    "BertForPreTraining": ("transformers.models.bert.modeling_bert", "BertForPreTrainingOutput"),
    "BertForMaskedLM": ("transformers.modeling_outputs", "MaskedLMOutput"),
    "BertForNextSentencePrediction": ("transformers.modeling_outputs", "NextSentencePredictorOutput"),
    "BertForSequenceClassification": ("transformers.modeling_outputs", "SequenceClassifierOutput"),
    "BertForTokenClassification": ("transformers.modeling_outputs", "TokenClassifierOutput"),
    "BertForQuestionAnswering": ("transformers.modeling_outputs", "QuestionAnsweringModelOutput"),
    "BertForMultipleChoice": ("transformers.modeling_outputs", "MultipleChoiceModelOutput"),
}

# transformers' Bert modules whose forward is left as it is (it computes what fastbert's would).
_KEPT = ("BertPooler", "BertOnlyMLMHead", "BertOnlyNSPHead", "BertPreTrainingHeads")
_PLAIN = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Dropout, nn.ModuleList, nn.Tanh)


def _bert_module():
    from transformers.models.bert import modeling_bert  # imported on first use: transformers is optional
    return modeling_bert


# transformers' GELU module type -> the `approximate` argument of fastbert's GELU kernels; filled by
# the first patch. A plain dict (no functools.cache) in the forward path, which torch.compile traces.
_APPROXIMATE: dict = {}


def _gelu_types() -> dict:
    if not _APPROXIMATE:
        from transformers.activations import ACT2FN
        for name, approximate in (("gelu", "none"), ("gelu_python", "none"), ("gelu_new", "tanh"),
                                  ("gelu_pytorch_tanh", "tanh"), ("gelu_python_tanh", "tanh")):
            _APPROXIMATE[type(ACT2FN[name])] = approximate
    return _APPROXIMATE


# ------------------------------------------------------------------------------ forward functions

def _embeddings_forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None):
    """fastbert.modeling.BertEmbeddings.forward, reading the dropout probability from the module
    (transformers' embeddings hold no config)."""
    return fb.embed(self, input_ids, token_type_ids, position_ids, inputs_embeds)


def _encoder_forward(self, x, layout, output_hidden_states=False, output_attentions=False):
    """fastbert.modeling.BertEncoder.forward, except that gradient checkpointing is transformers'
    (its BertLayer checkpoints its own call when model.gradient_checkpointing_enable() was called)."""
    def checkpointed(layer):  # transformers' layer checkpoints its own call
        on = getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()
        return layer if on else None

    return fb.run_layers(self.layer, x, layout, output_hidden_states, output_attentions, checkpointed)


def _masked_loss(self, sequence_output, labels):
    """fastbert's masked-rows MLM loss on transformers' head. It adds the decoder's own bias, as
    transformers' decoder does (the head's `bias` is that one only when the two are tied), and reads
    no weight of a wrapped decoder."""
    view = types.SimpleNamespace(transform=self.transform, decoder=self.decoder,
                                 static_rows=getattr(self, "static_rows", None))
    return fb.BertLMPredictionHead.masked_loss(view, sequence_output, labels)


def _arguments(self, args, kwargs) -> dict:
    """Every argument by name: positional ones in the order of transformers' own forward."""
    names = type(self)._fastbert_positional
    if len(args) > len(names):
        raise TypeError(f"{type(self).__name__}.forward() takes {len(names)} positional arguments, "
                        f"got {len(args)}")
    a = dict(zip(names, args))
    for key in kwargs:
        if key in a:
            raise TypeError(f"{type(self).__name__}.forward() got multiple values for argument {key!r}")
    a.update(kwargs)
    if a.pop("is_causal", False):
        raise ValueError("fastbert runs BERT as a bidirectional encoder; is_causal=True is not supported")
    return a


def _positional_names(original) -> tuple:
    """The names transformers' forward gives its positional arguments (self left out)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in inspect.signature(original.forward).parameters.values() if p.kind in kinds)[1:]


def _flags(config, a):
    """return_dict, output_attentions, output_hidden_states popped from ``a``, defaulting to the
    config's as transformers does (fastbert's own forward applies the same rule: modeling._flags)."""
    output_hidden_states, output_attentions, return_dict = fb._flags(
        config, a.pop("output_hidden_states", None), a.pop("output_attentions", None), a.pop("return_dict", None))
    if not output_hidden_states:  # transformers records hidden states only for a truthy value: 0 and [] are off
        output_hidden_states = False
    return return_dict, bool(output_attentions), output_hidden_states


def _output(self, fields: dict, return_dict: bool):
    """transformers' output class of the model, or (return_dict=False) fastbert's tuple of the fields."""
    return type(self)._fastbert_output(**fields) if return_dict else fb._to_tuple(fields)


def _model_forward(self, *args, **kwargs):
    a = _arguments(self, args, kwargs)
    return_dict, output_attentions, output_hidden_states = _flags(self.config, a)
    # transformers 5.2x: output_hidden_states may select layers by index (others come back None)
    selected = None
    if not isinstance(output_hidden_states, bool):
        picks = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
        n = self.config.num_hidden_layers + 1
        selected = {i % n for i in picks if -n <= i < n}
    out = fb.BertModel.forward(self, a.get("input_ids"), a.get("attention_mask"), a.get("token_type_ids"),
                               a.get("position_ids"), inputs_embeds=a.get("inputs_embeds"),
                               output_hidden_states=bool(output_hidden_states) or selected is not None,
                               output_attentions=output_attentions, unpad=a.get("unpad", True),
                               output_rows=a.get("output_rows"), max_output_rows=a.get("max_output_rows"),
                               return_dict=True)
    hidden = out.hidden_states
    if hidden is not None and selected is not None:
        hidden = tuple(h if i in selected else None for i, h in enumerate(hidden))
    # transformers' BertModel records cross-attentions whenever it records attentions: () for an encoder
    return _output(self, dict(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                              hidden_states=hidden, attentions=out.attentions,
                              cross_attentions=() if output_attentions else None), return_dict)


def _head_forward(self, *args, **kwargs):
    name = type(self).__name__
    if not _is_patched(self.bert):
        # the encoder alone was unpatched: transformers' head forward drives it as it expects
        return type(self)._fastbert_original.forward(self, *args, **kwargs)
    a = _arguments(self, args, kwargs)
    return_dict, a["output_attentions"], a["output_hidden_states"] = _flags(self.config, a)
    if name == "BertForSequenceClassification":
        _set_problem_type(self, a.get("labels"))
    # arguments fastbert does not take land in its **unused; fastbert's heads drive their encoder with
    # return_dict=True whatever the config says (they read its output's attributes)
    out = getattr(fb, name).forward(self, **a, return_dict=True)
    return _output(self, out.fields(), return_dict)


def _set_problem_type(self, labels):
    """transformers records the problem type it infers from the first labels in the config."""
    if labels is None or self.config.problem_type is not None:
        return
    if self.num_labels == 1:
        self.config.problem_type = "regression"
    elif self.num_labels > 1 and labels.dtype in (torch.long, torch.int):
        self.config.problem_type = "single_label_classification"
    else:
        self.config.problem_type = "multi_label_classification"


# ------------------------------------------------------------------------------ patched classes

def _with_signature(impl, original):
    """impl under transformers' signature: Trainer keeps the dataset columns, finds the label
    names and decides on loss kwargs by inspecting model.forward."""
    @functools.wraps(original.forward)
    def forward(self, *args, **kwargs):
        return impl(self, *args, **kwargs)
    return forward


def _members(name: str, original) -> dict:
    """The attributes a patched subclass of transformers' class `name` overrides."""
    if name == "BertModel" or name in _HEADS:
        import importlib
        module, output = _OUTPUTS[name]
        return {"forward": _with_signature(_model_forward if name == "BertModel" else _head_forward, original),
                "_fastbert_positional": _positional_names(original),
                "_fastbert_output": getattr(importlib.import_module(module), output)}
    return {
        "BertEmbeddings": {"forward": _embeddings_forward},
        "BertEncoder": {"forward": _encoder_forward},
        "BertLayer": {"forward": fb.BertLayer.forward,
                      "feed_forward_add_norm": fb.BertLayer.feed_forward_add_norm},
        "BertAttention": {"forward": fb.BertAttention.forward},
        "BertSelfAttention": {"forward": fb.BertSelfAttention.forward,
                              "dropout_p": property(lambda self: self.dropout.p)},
        "BertSelfOutput": {"forward": fb.BertSelfOutput.forward, "add_norm": fb.BertSelfOutput.add_norm},
        "BertOutput": {"forward": fb.BertSelfOutput.forward, "add_norm": fb.BertSelfOutput.add_norm},
        "BertIntermediate": {"forward": fb.BertIntermediate.forward,
                             "approximate": property(lambda self: _APPROXIMATE[type(self.intermediate_act_fn)])},
        "BertPredictionHeadTransform": {"forward": fb.BertPredictionHeadTransform.forward,
                                        "approximate": property(lambda self: _APPROXIMATE[type(self.transform_act_fn)])},
        "BertLMPredictionHead": {"masked_loss": _masked_loss},
    }[name]


_PATCHED_NAMES = ("BertModel", *_HEADS, "BertEmbeddings", "BertEncoder", "BertLayer", "BertAttention",
                  "BertSelfAttention", "BertSelfOutput", "BertOutput", "BertIntermediate",
                  "BertPredictionHeadTransform", "BertLMPredictionHead")


def _enter(self):
    return self


def _exit(self, *exc):
    unpatch(self)
    return False


@functools.cache
def _patched_class(name: str):
    original = getattr(_bert_module(), name)
    _gelu_types()  # the GELU properties read it (also in a process that only unpickles a patched model)
    members = {
        **_members(name, original),
        "_fastbert_original": original,
        "__enter__": _enter,
        "__exit__": _exit,
        "__module__": __name__,
        # pickle finds the class again as fastbert.patch._patched.<name>
        "__qualname__": f"_patched.{name}",
        "__doc__": f"transformers' {name}, running fastbert's kernels (fastbert.patch).",
    }
    return type(original)(name, (original,), members)


class _PatchedClasses:
    """Namespace of the patched classes, built on first use (also when unpickling)."""

    def __getattr__(self, name):
        if name not in _PATCHED_NAMES:
            raise AttributeError(name)
        return _patched_class(name)


_patched = _PatchedClasses()


def _original(cls):
    return cls.__dict__.get("_fastbert_original", cls)


def _is_patched(module) -> bool:
    return hasattr(type(module), "_fastbert_original")  # transformers' own classes never have it


# ---------------------------------------------------------------------------------- the checks

def _check(model) -> None:
    """Raise, naming the reason, unless fastbert can run every part of `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbert.patch takes a transformers Bert model, got {type(model).__name__}")
    top = _original(type(model))
    if isinstance(model, fb.BertPreTrainedModel):
        raise TypeError(f"{top.__name__} is already fastbert's own class; patch transformers' models")
    mb = _bert_module()
    if top.__name__ not in fb.MODEL_CLASSES or getattr(mb, top.__name__) is not top:
        hint = ""
        if hasattr(model, "_orig_mod") or hasattr(model, "module"):
            hint = " (a torch.compile / DDP wrapper? patch the model before wrapping it)"
        elif any(issubclass(top, getattr(mb, n)) for n in fb.MODEL_CLASSES):
            hint = " (a subclass of a transformers Bert class: its own forward would be lost)"
        raise TypeError(f"fastbert.patch supports transformers' {', '.join(fb.MODEL_CLASSES)}; "
                        f"got {top.__module__}.{top.__qualname__}{hint}")
    config = model.config
    reasons = unsupported_features(config)
    acts = [(f"{path}.intermediate_act_fn", m.intermediate_act_fn) for path, m in model.named_modules()
            if isinstance(m, mb.BertIntermediate)]
    acts += [(f"{path}.transform_act_fn", m.transform_act_fn) for path, m in model.named_modules()
             if isinstance(m, mb.BertPredictionHeadTransform)]
    others = [(where, act) for where, act in acts if type(act) not in _gelu_types()]
    if others:
        where, act = others[0]
        # the config's hidden_act may still say gelu when a module's activation was swapped after loading
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        reasons.append(f"{where} is {type(act).__qualname__}{more}, "
                       f"hidden_act={getattr(config, 'hidden_act', None)!r} "
                       f"(fastbert runs gelu, gelu_new and gelu_pytorch_tanh)")
    if reasons:
        raise ValueError(f"fastbert.patch cannot run this {top.__name__}: {'; '.join(reasons)}")

    kinds = tuple(getattr(mb, n) for n in (*_PATCHED_NAMES, *_KEPT)) + _PLAIN + tuple(_gelu_types())
    for path, m in model.named_modules():
        where = path or top.__name__
        if type(m) not in kinds and _original(type(m)) not in kinds:
            raise TypeError(f"fastbert.patch: {where} is a {type(m).__module__}.{type(m).__qualname__}; fastbert "
                            f"runs transformers' own Bert modules with plain nn.Linear / nn.LayerNorm / "
                            f"nn.Embedding only (adapters such as LoRA and quantized layers are not supported)")
        if "forward" in m.__dict__:
            raise TypeError(f"fastbert.patch: {where} has its forward replaced on the instance (accelerate hooks, "
                            f"device_map offloading or another patch); fastbert cannot run it")
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.scale_grad_by_freq or m.sparse):
            raise ValueError(f"fastbert.patch: {where} uses max_norm / scale_grad_by_freq / sparse, which "
                             f"fastbert's embedding kernel does not")
        if isinstance(m, nn.LayerNorm) and (m.weight is None or m.bias is None):
            raise ValueError(f"fastbert.patch: {where} has no affine weight or bias")


# ----------------------------------------------------------------------------------- public API

def patch(model):
    """Make a transformers Bert model run fastbert's kernels, in place; returns the same model.

    Also a context manager: ``with fastbert.patch(model): ...`` unpatches on leaving the block.
    Patching a patched model changes nothing. Raises TypeError / ValueError naming what fastbert
    cannot run (see the module docstring)."""
    _check(model)
    for m in model.modules():
        name = type(m).__name__
        if not _is_patched(m) and name in _PATCHED_NAMES and type(m) is getattr(_bert_module(), name):
            m.__class__ = _patched_class(name)
    return model


def unpatch(model):
    """Give every module patched by fastbert.patch its transformers class back; returns the model.
    A model that is not patched is returned unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbert.unpatch takes a model, got {type(model).__name__}")
    for m in model.modules():
        if _is_patched(m):
            m.__class__ = type(m)._fastbert_original
            m.__dict__.pop("_word_grad", None)  # the CPU word-gradient buffer of fastbert.modeling.embed_ids
    return model
