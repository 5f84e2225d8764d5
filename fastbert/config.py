"""BertConfig: the fields of transformers.BertConfig, read from and written to config.json."""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass, field, fields

# hidden_act -> the `approximate` argument of GELU (the only activations BERT checkpoints use)
GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}

# Named sizes for `fastbert pretrain --config NAME` (hidden, layers, heads); intermediate = 4 x hidden.
SIZES = {
    "micro": (64, 2, 2),
    "tiny": (128, 2, 2),
    "mini": (256, 4, 4),
    "small": (512, 4, 8),
    "medium": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def unsupported_features(config) -> list[str]:
    """What a BERT config (fastbert's or transformers') asks for that fastbert's encoder does not run:
    one reason each, for an error rather than outputs that silently differ from transformers'."""
    reasons = []
    if getattr(config, "is_decoder", False):
        reasons.append("is_decoder=True (fastbert runs BERT as a bidirectional encoder)")
    if getattr(config, "add_cross_attention", False):
        reasons.append("add_cross_attention=True (no cross-attention in fastbert)")
    if getattr(config, "is_causal", False):
        reasons.append("is_causal=True (fastbert runs BERT as a bidirectional encoder)")
    position = getattr(config, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        reasons.append(f"position_embedding_type={position!r} (fastbert has absolute position embeddings only)")
    return reasons


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None
    num_labels: int = 2
    id2label: dict | None = None
    label2id: dict | None = None
    tie_word_embeddings: bool = True
    problem_type: str | None = None
    architectures: list | None = None
    # Fields of other config.json files that this class does not model are kept and written back.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.hidden_act not in GELU_APPROXIMATE:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; fastbert supports "
                             f"{', '.join(GELU_APPROXIMATE)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.id2label is not None:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        else:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.label2id = {k: int(v) for k, v in self.label2id.items()}

    def __getattr__(self, name):
        # Called only for names that are not fields: the extra fields read as attributes, as in transformers.
        extra = self.__dict__.get("extra") or {}
        if name in extra:
            return extra[name]
        raise AttributeError(f"BertConfig has no field {name!r}")

    def __setattr__(self, name, value):
        # After construction the label fields stay consistent as in transformers, where num_labels is
        # len(id2label): setting num_labels to another count makes new LABEL_i names, and setting
        # id2label sets num_labels (else save_pretrained writes a config whose id2label contradicts
        # the classifier's shape, and from_pretrained then fails on it).
        if self.__dict__.get("id2label") is not None:
            if name == "num_labels" and value != len(self.id2label):
                object.__setattr__(self, "id2label", {i: f"LABEL_{i}" for i in range(value)})
                object.__setattr__(self, "label2id", {v: k for k, v in self.id2label.items()})
            elif name == "id2label" and value is not None:
                value = {int(k): v for k, v in value.items()}
                object.__setattr__(self, "num_labels", len(value))
        # A name that is neither a field nor a class attribute is an extra field, saved with the rest.
        if name in _FIELDS or name.startswith("_") or hasattr(type(self), name):
            object.__setattr__(self, name, value)
        else:
            self.extra[name] = value

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        return GELU_APPROXIMATE[self.hidden_act]

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "BertConfig":
        d = {**d, **overrides}
        if "num_labels" in overrides and "id2label" not in overrides and (
                d.get("id2label") is None or len(d["id2label"]) != overrides["num_labels"]):
            # as in transformers: asking for another label count replaces the saved label names (the
            # count they already have keeps them: its num_labels setter renames only on a change)
            d.pop("id2label", None)
            d.pop("label2id", None)
        d.pop("extra", None)  # to_dict writes extras at the top level; the constructor files them again
        return cls(**d)

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "BertConfig":
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(file, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{file} is not valid JSON: {exc}") from exc
        return cls.from_dict(d, **overrides)

    @classmethod
    def from_size(cls, name: str, **overrides) -> "BertConfig":
        if name not in SIZES:
            raise ValueError(f"unknown size {name!r}; choose one of {', '.join(SIZES)}")
        hidden, layers, heads = SIZES[name]
        return cls(**{"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                      "intermediate_size": 4 * hidden, **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        d["model_type"] = "bert"
        return {**extra, **d}

    def save_pretrained(self, path) -> None:
        # atomically: `fastbert finetune` re-saves OUT at every better epoch, and a save that fails
        # part-way must leave the earlier config.json whole (trainer imports torch: imported here)
        from .trainer import atomic_write_json
        os.makedirs(path, exist_ok=True)
        atomic_write_json(os.path.join(path, "config.json"), self.to_dict())


_FIELDS = frozenset(f.name for f in fields(BertConfig))
_dataclass_init = BertConfig.__init__


def _init_keeping_extra_fields(self, *args, **kwargs):
    """The dataclass __init__, taking keywords it does not model as transformers does
    (``BertConfig(**transformers_config.to_dict())`` works): they go to ``extra`` and are written back."""
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in _FIELDS}
    _dataclass_init(self, *args, **kwargs)
    self.extra = {**self.extra, **extra}
    reasons = unsupported_features(self)  # read from the extra fields: checked once they are filed
    if reasons:
        raise ValueError(f"this BERT config is not supported: {'; '.join(reasons)}")


_init_keeping_extra_fields.__signature__ = inspect.signature(_dataclass_init)
BertConfig.__init__ = _init_keeping_extra_fields
