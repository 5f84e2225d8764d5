"""Feature-based use of a frozen encoder, and partial freezing for fine-tuning.

``LayerMixModel``: BERT's feature-based recipe in the form ELMo made standard. The pretrained
encoder is frozen (no gradients, always in eval mode, so no dropout inside it); every hidden layer
(the embeddings and each of the L layers, L + 1 tensors) is combined as

    mix = gamma * sum_j softmax(w)_j * h_j

with w (L + 1 scalars, starting equal) and gamma (starting at 1) learned, and a small task head
reads the mix: a masked mean over tokens then a linear layer (classify, pair, choice), or a linear
layer per token (ner: num_labels outputs; qa: start and end logits).

The encoder runs under torch.no_grad, so training costs one forward pass of the encoder per batch
and the optimiser sees only the mix and the head (a few thousand parameters). The encoder is any
module called as ``encoder(input_ids, attention_mask, token_type_ids, output_hidden_states=True)``
that returns ``.hidden_states`` and has a BERT ``.config``: fastbert's BertModel, or transformers'
(the baseline arm of ``fastbert finetune --impl transformers``).

Saving writes the frozen encoder as a ``BertModel`` checkpoint (config.json with id2label, plus
model.safetensors) and the learned part as ``layer_mix.safetensors`` + ``layer_mix.json``.

``freeze_lowest(model, n)``: for whole-network fine-tuning with the embeddings and the lowest n
layers frozen.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ScalarMix", "LayerMixModel", "freeze_lowest"]

HEAD_FILE = "layer_mix.safetensors"
META_FILE = "layer_mix.json"


class ScalarMix(nn.Module):
    """gamma * sum_j softmax(w)_j * h_j over a list of same-shaped tensors."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(n_layers))
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, layers):
        if len(layers) != self.weights.numel():
            raise ValueError(f"ScalarMix was built for {self.weights.numel()} layers, got {len(layers)}")
        w = torch.softmax(self.weights, dim=0)
        stacked = torch.stack(list(layers), dim=0)  # (L+1, ..., D)
        return self.gamma * torch.einsum("l,l...->...", w.to(stacked.dtype), stacked)


class _Output(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _masked_mean(x, mask):  # x (B, S, D), mask (B, S) -> (B, D)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def _takes_unpad(encoder) -> bool:
    """Whether the encoder is fastbert's BertModel (or a patched transformers one): it takes unpad=."""
    from .modeling import BertModel
    return isinstance(encoder, BertModel) or hasattr(type(encoder), "_fastbert_positional")


class LayerMixModel(nn.Module):
    """A frozen BertModel (fastbert's or transformers') + learned scalar mix of all its layers + a task head."""

    def __init__(self, encoder: nn.Module, task: str, num_labels: int = 2, dropout: float = 0.1):
        super().__init__()
        if task not in ("classify", "pair", "ner", "qa", "choice"):
            raise ValueError(f"unknown task {task!r}")
        self.encoder = encoder
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.config = encoder.config
        self.task = task
        self.num_labels = num_labels
        self.mix = ScalarMix(self.config.num_hidden_layers + 1)
        self.dropout = nn.Dropout(dropout)
        out = {"qa": 2, "choice": 1}.get(task, num_labels)
        self.head = nn.Linear(self.config.hidden_size, out)
        nn.init.normal_(self.head.weight, std=self.config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen features: no dropout inside the encoder, ever
        return self

    def features(self, input_ids, attention_mask, token_type_ids):
        # qa: the span loss normalises over every position, padding too (as transformers' does), so a
        # fastbert encoder runs padding through its layers (unpad=False), as BertForQuestionAnswering does
        kw = {"unpad": False} if self.task == "qa" and _takes_unpad(self.encoder) else {}
        with torch.no_grad():
            out = self.encoder(input_ids, attention_mask, token_type_ids, output_hidden_states=True,
                               output_attentions=False, return_dict=True, **kw)
        return self.mix([h.detach() for h in out.hidden_states])

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *, labels=None,
                start_positions=None, end_positions=None, **unused):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.task == "choice":
            b, c = input_ids.shape[:2]
            flat = [t.reshape(b * c, -1) if t is not None else None
                    for t in (input_ids, attention_mask, token_type_ids)]
            h = self.features(*flat)
            logits = self.head(self.dropout(_masked_mean(h, flat[1]))).view(b, c)
            loss = F.cross_entropy(logits, labels) if labels is not None else None
            return _Output(loss=loss, logits=logits)
        h = self.features(input_ids, attention_mask, token_type_ids)  # (B, S, D)
        if self.task in ("classify", "pair"):
            logits = self.head(self.dropout(_masked_mean(h, attention_mask)))
            loss = F.cross_entropy(logits, labels) if labels is not None else None
            return _Output(loss=loss, logits=logits)
        logits = self.head(self.dropout(h))
        if self.task == "ner":
            loss = (F.cross_entropy(logits.reshape(-1, self.num_labels), labels.reshape(-1))
                    if labels is not None else None)
            return _Output(loss=loss, logits=logits)
        start, end = logits[..., 0].contiguous(), logits[..., 1].contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
        return _Output(loss=loss, start_logits=start, end_logits=end)

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file
        self.encoder.save_pretrained(path)
        head = {f"mix.{k}": v for k, v in self.mix.state_dict().items()}
        head.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        # atomically, as the encoder's files: `fastbert finetune --freeze all` re-saves OUT at every
        # better epoch, and an interrupted save must leave the earlier head whole
        from .trainer import atomic_write_text, atomic_write_with
        tensors = {k: v.detach().contiguous().cpu() for k, v in head.items()}
        atomic_write_with(os.path.join(path, HEAD_FILE), lambda tmp: save_file(tensors, tmp))
        atomic_write_text(os.path.join(path, META_FILE), json.dumps(
            {"task": self.task, "num_labels": self.num_labels,
             "layer_weights": torch.softmax(self.mix.weights.detach(), 0).tolist(),
             "gamma": float(self.mix.gamma.detach())}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str):
        from safetensors.torch import load_file

        from .modeling import BertModel
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
        model = cls(BertModel.from_pretrained(path), meta["task"], meta["num_labels"])
        state = load_file(os.path.join(path, HEAD_FILE))
        model.mix.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mix.")})
        model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        return model.eval()


def freeze_lowest(model: nn.Module, n: int) -> None:
    """Freeze the embeddings and encoder layers 0 .. n-1 of a BertModel or BertFor* model."""
    bert = getattr(model, "bert", model)
    layers = bert.encoder.layer
    if not 0 <= n <= len(layers):
        raise ValueError(f"--freeze {n}: the model has {len(layers)} layers")
    if n == 0:
        return
    for p in bert.embeddings.parameters():
        p.requires_grad_(False)
    for layer in layers[:n]:
        for p in layer.parameters():
            p.requires_grad_(False)
