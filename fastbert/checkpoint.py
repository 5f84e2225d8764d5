"""Checkpoint I/O in Hugging Face's layout: config.json + model.safetensors (or shards listed by
model.safetensors.index.json, or pytorch_model.bin read with weights_only=True, never as an
arbitrary pickle).

Loading follows transformers' rules: a bare BertModel checkpoint loads into every head class and
a head checkpoint into BertModel; missing task-head weights are initialised and named in a warning;
missing encoder/embedding weights or mis-shaped weights raise; `embeddings.position_ids` (a legacy
buffer) is ignored; other unexpected keys are named in a warning.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import warnings
from collections import Counter

import torch

from .config import BertConfig
from .layer_mix import META_FILE as LAYER_MIX_META

SAFETENSORS = "model.safetensors"
PYTORCH_BIN = "pytorch_model.bin"
INDEX = ".index.json"  # a sharded checkpoint's map from tensor names to shard files
# The task-head classes a `fastbert finetune --freeze all` folder (a layer-mix model) may be mistaken for.
LAYER_MIX_HEADS = ("BertForSequenceClassification", "BertForTokenClassification",
                   "BertForQuestionAnswering", "BertForMultipleChoice")
# Parameters that belong to task heads: transformers initialises these when a checkpoint lacks them.
HEAD_PREFIXES = ("bert.pooler.", "pooler.", "cls.", "classifier.", "qa_outputs.")
# Aliases of one Parameter (weight tying): either name satisfies both.
TIED = {"cls.predictions.decoder.bias": "cls.predictions.bias", "cls.predictions.bias": "cls.predictions.decoder.bias"}
IGNORED = ("embeddings.position_ids", "bert.embeddings.position_ids", "embeddings.token_type_ids",
           "bert.embeddings.token_type_ids")


def read_state_dict(path: str, use_safetensors: bool | None = None) -> dict:
    """Tensors of a checkpoint folder (or a file), with a clear error for a corrupt file. A folder
    may hold one file or shards listed by an index (model.safetensors.index.json, as transformers
    writes checkpoints above its max_shard_size). use_safetensors as in transformers: None prefers
    safetensors, True reads only safetensors, False only pytorch_model.bin (weights_only)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        # transformers' order: safetensors (one file, then shards) before pytorch_model.bin (the same)
        names = (SAFETENSORS, SAFETENSORS + INDEX, PYTORCH_BIN, PYTORCH_BIN + INDEX)
        names = names[2:] if use_safetensors is False else names[:2] if use_safetensors else names
        for name in names:
            if os.path.exists(os.path.join(path, name)):
                if name.endswith(INDEX):
                    return _read_shards(os.path.join(path, name))
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path} holds none of {', '.join(names)}"
                                    + (f" (use_safetensors={use_safetensors})" if use_safetensors is not None else ""))
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{path} could not be read as a weights-only PyTorch checkpoint: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def _read_shards(index_path: str) -> dict:
    """The tensors of every shard an index's weight_map names, each checked to hold its keys."""
    folder = os.path.dirname(index_path)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index_path} is not a readable checkpoint index: {exc!r}") from exc
    state = {}
    for shard in sorted(set(weight_map.values())):
        # a name, not a path out of the folder; checked on the name, not on where a symlink leads
        # (a hub cache snapshot's files are symlinks into ../../blobs)
        if shard in ("", ".", "..") or os.path.basename(shard) != shard or (os.altsep and os.altsep in shard):
            raise ValueError(f"{index_path}: shard {shard!r} is not a file of that folder")
        shard_path = os.path.join(folder, shard)
        if not os.path.exists(shard_path):
            raise FileNotFoundError(f"{index_path} names shard {shard}, which is missing")
        state.update(read_state_dict(shard_path))
    absent = [f"{key} ({shard})" for key, shard in weight_map.items() if key not in state]
    if absent:
        raise ValueError(f"{index_path}: shards lack tensors their index lists: {', '.join(absent[:5])}"
                         + (f" and {len(absent) - 5} more" if len(absent) > 5 else ""))
    return state


def _rename_legacy(key: str) -> str:
    # TF-converted checkpoints name LayerNorm parameters gamma/beta.
    if key.endswith(".gamma"):
        return key[:-6] + ".weight"
    if key.endswith(".beta"):
        return key[:-5] + ".bias"
    return key


def _align_prefix(state: dict, expected: set, prefix: str) -> dict:
    """Add or strip the `bert.` prefix so a base checkpoint fits a head class and vice versa."""
    has_prefix = any(k.startswith(prefix) for k in state)
    wants_prefix = any(k.startswith(prefix) for k in expected)
    if wants_prefix and not has_prefix:
        return {(prefix + k if k.split(".")[0] in ("embeddings", "encoder", "pooler") else k): v
                for k, v in state.items()}
    if has_prefix and not wants_prefix:
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    return state


MISMATCH_HINT = "\n(from_pretrained(..., ignore_mismatched_sizes=True) initialises them afresh)"


def load_state_dict_into(model: torch.nn.Module, state: dict, ignore_mismatched_sizes: bool = False) -> dict:
    """Copies ``state`` into ``model`` by transformers' rules; returns transformers' loading info.
    A weight of another shape is an error, or with ignore_mismatched_sizes (transformers' keyword: a
    head for another label count) left as initialised, warned and listed in "mismatched_keys"."""
    expected = model.state_dict()
    state = {_rename_legacy(k): v for k, v in state.items() if k not in IGNORED}
    state = _align_prefix(state, set(expected), "bert.")
    state = {k: v for k, v in state.items() if k not in IGNORED}

    tied_decoder = model.config.tie_word_embeddings and "cls.predictions.decoder.weight" in expected
    missing, mismatched = [], []  # mismatched: (key, the checkpoint's shape, the model's)
    for key, param in expected.items():
        if key in state:
            if tuple(state[key].shape) != tuple(param.shape):
                mismatched.append((key, tuple(state[key].shape), tuple(param.shape)))
        elif key in TIED and TIED[key] in state:
            continue
        elif key == "cls.predictions.decoder.weight" and tied_decoder:
            continue  # the word-embedding matrix itself
        else:
            missing.append(key)
    said = [f"{key}: checkpoint {theirs}, model {ours}" for key, theirs, ours in mismatched]
    if mismatched and not ignore_mismatched_sizes:
        raise ValueError("checkpoint weights have the wrong shape:\n  " + "\n  ".join(said) + MISMATCH_HINT)
    if mismatched:
        warnings.warn(f"{type(model).__name__}: newly initialised (another shape in the checkpoint): "
                      + "; ".join(said), stacklevel=4)
        state = {k: v for k, v in state.items() if k not in {key for key, _, _ in mismatched}}
    head_missing = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    body_missing = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if body_missing:
        raise ValueError(f"checkpoint lacks encoder/embedding weights: {', '.join(body_missing)}")
    unexpected = sorted(set(state) - set(expected))
    if head_missing:
        warnings.warn(f"{type(model).__name__}: newly initialised (not in the checkpoint): {', '.join(head_missing)}",
                      stacklevel=4)  # the from_pretrained caller
    if unexpected:
        warnings.warn(f"{type(model).__name__}: checkpoint weights not used: {', '.join(unexpected)}", stacklevel=4)
    # transformers 5's types: sets of names, a list of messages
    info = {"missing_keys": set(head_missing), "unexpected_keys": set(unexpected), "mismatched_keys": set(mismatched),
            "error_msgs": []}

    decoder_key, embedding_key = "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"
    if (tied_decoder and decoder_key in state and embedding_key in state
            and not torch.equal(state[decoder_key].to(state[embedding_key].dtype), state[embedding_key])):
        # Two different matrices under a tied config: transformers keeps both (unties them, with a
        # warning), so the MLM logits come from the decoder's and the encoder reads the embeddings.
        warnings.warn(f"{type(model).__name__}: the checkpoint's {decoder_key} differs from its {embedding_key} "
                      f"although config.tie_word_embeddings is true: both are kept, untied (as transformers "
                      f"does); set tie_word_embeddings=False in config.json to silence this", stacklevel=4)
        decoder = model.get_output_embeddings()
        decoder.weight = torch.nn.Parameter(decoder.weight.detach().clone(), requires_grad=decoder.weight.requires_grad)

    with torch.no_grad():
        params = dict(model.named_parameters(remove_duplicate=False))
        params.update(dict(model.named_buffers()))
        for key, target in params.items():
            source = state.get(key)
            if source is None and key in TIED:
                source = state.get(TIED[key])
            if source is not None:
                target.copy_(source.to(target.dtype))
    return info


# transformers' from_pretrained keywords with nothing to do here: fetching files (a local folder needs
# none of them), and attn_implementation (fastbert's attention is its own, output_attentions works anyway)
LOADER_KEYWORDS = ("cache_dir", "force_download", "local_files_only", "proxies", "resume_download", "revision",
                  "token", "trust_remote_code", "low_cpu_mem_usage", "attn_implementation")


def load_pretrained(cls, path, dtype=None, **config_overrides):
    path = os.fspath(path)
    config_overrides = dict(config_overrides)
    for key in LOADER_KEYWORDS:  # not config fields: they would land in the saved config.json
        config_overrides.pop(key, None)
    subfolder = config_overrides.pop("subfolder", None) or ""
    path = os.path.join(path, subfolder) if subfolder else path
    if config_overrides.pop("variant", None) is not None:
        raise ValueError("variant= (model.<variant>.safetensors) is not supported: rename the file to model.safetensors")
    device = _resolve_device_map(config_overrides.pop("device_map", None))
    loading_info = config_overrides.pop("output_loading_info", False)
    use_safetensors = config_overrides.pop("use_safetensors", None)
    ignore_mismatched = bool(config_overrides.pop("ignore_mismatched_sizes", False))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a checkpoint folder (config.json + {SAFETENSORS})")
    if dtype is None:  # transformers' older name of dtype, still taken there
        dtype = config_overrides.pop("torch_dtype", None)
    dtype = _resolve_dtype(dtype)
    config, model_kwargs = _config_and_model_kwargs(cls, path, config_overrides)
    model = cls(config, **model_kwargs)
    state = read_state_dict(path, use_safetensors)
    if dtype == "auto":  # transformers 5's default: the config's dtype, else the one the weights are stored in
        named = config.extra.get("dtype") or config.extra.get("torch_dtype")
        named = getattr(torch, named, None) if isinstance(named, str) else None
        stored = Counter(t.dtype for t in state.values() if t.is_floating_point())
        if isinstance(named, torch.dtype) and named.is_floating_point:
            dtype = named
        else:
            dtype = stored.most_common(1)[0][0] if stored else None
    info = load_state_dict_into(model, state, ignore_mismatched)
    if cls.__name__ in LAYER_MIX_HEADS and os.path.exists(os.path.join(path, LAYER_MIX_META)):
        # a `fastbert finetune --freeze all` folder: the trained head is in layer_mix.safetensors
        warnings.warn(f"{path} holds a layer-mix model (fastbert finetune --freeze all): {cls.__name__}'s task "
                      "head is newly initialised, not the trained one; load it with "
                      "fastbert.layer_mix.LayerMixModel.from_pretrained", stacklevel=3)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return (model.eval(), info) if loading_info else model.eval()


def _resolve_device_map(device_map):
    """transformers' device_map, for a model on one device: None, "auto" (a GPU when there is one), or
    a device ("cpu", "cuda:1", 0, torch.device); a map of modules to devices is refused."""
    if device_map is None:
        return None
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"device_map: fastbert keeps a model on one device, got {sorted(map(str, devices))}")
        device_map = devices.pop()
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r}: expected 'auto', a device or a device index") from None


def _config_and_model_kwargs(cls, path, overrides: dict):
    """As transformers' from_pretrained: keywords of the class's constructor (BertModel's add_pooling_layer)
    go to it; config= (a BertConfig, a transformers config or a path) replaces the folder's config.json; the
    other keywords override config fields."""
    overrides = dict(overrides)
    init = inspect.signature(cls.__init__).parameters
    model_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in init and k not in ("self", "config")}
    config = overrides.pop("config", None)
    if config is None or isinstance(config, (str, os.PathLike)):
        return BertConfig.from_pretrained(path if config is None else config, **overrides), model_kwargs
    if isinstance(config, BertConfig):
        config = copy.deepcopy(config)  # as transformers: the model's own copy
    else:
        config = BertConfig(**config.to_dict())  # a transformers.BertConfig
    return (BertConfig.from_dict(config.to_dict(), **overrides) if overrides else config), model_kwargs


def _resolve_dtype(dtype):
    """None (float32, as the classes build), "auto", a floating torch.dtype or its name ("bfloat16")."""
    if dtype is None or dtype == "auto":
        return dtype
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be None, 'auto' or a floating torch.dtype (or its name), got {dtype!r}")
    return resolved


def save_pretrained(model, path, state_dict=None) -> None:
    """config.json + model.safetensors that the transformers class of the same name loads; state_dict
    (transformers' keyword, e.g. a gathered one) instead of the model's own."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    # the dtype of the weights written, as transformers records it: transformers 5's default
    # dtype="auto" reads it first (a loaded checkpoint's own value would be stale after a cast)
    model.config.extra.pop("torch_dtype", None)
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if weights is not None:
        model.config.dtype = str(weights).removeprefix("torch.")
    model.config.save_pretrained(path)
    state, seen = {}, {}
    for key, tensor in (model.state_dict() if state_dict is None else state_dict).items():
        # safetensors stores no aliases: keep the first name of each shared tensor (as transformers does)
        ident = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else None
        if ident is not None and ident in seen:
            continue
        seen[ident] = key
        state[key] = tensor.detach().contiguous().cpu()
    # atomically: a failed write (disk full, interrupt) leaves the earlier file whole and no stray one
    from .trainer import atomic_write_with
    atomic_write_with(os.path.join(path, SAFETENSORS), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
