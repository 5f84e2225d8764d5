"""`fastbert finetune`: fine-tune a checkpoint on classify / pair / ner / qa / choice.

    fastbert finetune --task classify --model DIR --train train.jsonl --dev dev.jsonl \
        [--test test.jsonl] --out OUT [--epochs 3 --batch-size 32 --lr 5e-5 --max-length 128 \
        --seed 42 --freeze {none,all,N} --device cuda --precision auto --random-init]

Recipe (BERT's): AdamW (weight decay 0.01, none on biases and LayerNorm), linear warm-up over the
first 10% of steps then linear decay to zero, gradient clipping at 1.0, dropout as in the config.
Batches are length-bucketed and padded only to their own longest sequence (the encoder itself runs
unpadded). The dev set is evaluated after every epoch and the best epoch's weights are kept (ties:
the earlier epoch); the primary metric is accuracy (classify, pair, choice) or F1 (ner, qa).
``--patience N`` stops once N epochs in a row have not bettered it (metrics.json:
"stopped_early_after_epoch"); the learning-rate schedule is still the one of --epochs.

Writes into OUT: the fine-tuned model (config.json with id2label/label2id + model.safetensors, plus
the tokenizer files, and ``finetune.json``: task, label set and input settings, which ``fastbert
predict --model OUT`` reads), ``metrics.json`` = {"dev": {...}, "test": {...}} (fractions in [0, 1]; "test"
only when --test is given), and ``predictions.jsonl`` with one line per test example (if --test).
metrics.json also records the run: the per-epoch "history", "train_seconds" (wall time of the
training steps only: forward, backward, optimizer; dev evaluations excluded, the device synchronised
before the clock is read), "eval_seconds", "steps" (optimizer steps run; fewer than "planned_steps",
the schedule's length, when --patience stopped the run), "impl", "device", "precision" and "threads".
As the run goes: ``history.jsonl`` gets the training loss of every 10 steps and each epoch's dev
metrics (written after the epoch, outside the timed steps), and the model is saved to OUT whenever
dev improves — so a crash or Ctrl-C keeps the best epoch so far (OUT then lacks metrics.json, which
is written last). ``training_curve.png`` plots history.jsonl after each epoch.

``--device`` / ``--precision`` mean what they mean for ``fastbert pretrain`` (fastbert.runtime):
default cuda when a GPU is visible; auto precision = bf16 autocast on a GPU with bf16, fp32 on the CPU.

``--labels FILE`` fixes the label set (one a line, in id order; e.g. ner_en/labels.txt) instead of
taking the labels seen in the training file: needed when a shortened training file lacks a tag that
the dev file has.

``--cuda-graphs`` (GPU; classify, pair, ner, choice; fp32 or bf16; by default on wherever it runs, at
--batch-size <= 256, and off elsewhere: ``--cuda-graphs off`` / ``on``) replays each training step —
forward, backward, clipping and AdamW — as one CUDA graph (fastbert.cuda_graphs.GraphedTrainStep), one
graph per 32-token length bucket: batches are padded to their bucket and to --batch-size rows (padding
rows carry ignored labels) and the encoder runs its padded layout, so a small fine-tuning step no
longer waits on hundreds of kernel launches from Python (BERT-base, batch 32, sentiment_en lengths,
H100: 8.9 ms per step against 51 ms eager; H200: 7.09 ms, 4.78x transformers SDPA, benchmarks.bench_model's
fastbert-graphs row). Dropout
draws other random numbers than an eager run; without dropout the two train alike.

``--random-init`` keeps the config and tokenizer of --model but starts from freshly initialised
weights (seeded by --seed): the "no pretraining" arm of a two-stage comparison.

``--impl transformers`` is a benchmarking switch, not a user feature: it runs this same loop
(data order, batches padded to the batch maximum, optimizer, schedule, seed, evaluation) on the
``transformers`` class of the same name (needs transformers installed), with the very same initial
weights: the fastbert model is built first (checkpoint or --random-init, task head seeded) and its
state dict is loaded into the transformers model. With ``--freeze all`` the layer mix runs on a frozen
``transformers.BertModel``; ``--freeze N`` freezes the same parameters in both.

``--freeze all`` is the feature-based recipe (fastbert.layer_mix.LayerMixModel): a frozen encoder,
a learned softmax-weighted mix of all hidden layers times a learned scale, and a small head. Its
default learning rate is 1e-2: only the mix and a linear head learn (MiniLM, 2000 sentiment_en
examples x 2 epochs: 1e-3 reached 0.640 dev accuracy, 1e-2 reached 0.758). ``--freeze N``
fine-tunes with the embeddings and the lowest N layers frozen. A ``--freeze all`` OUT holds the frozen
encoder plus ``layer_mix.safetensors`` / ``layer_mix.json``; reload it for prediction with
``fastbert.layer_mix.LayerMixModel.from_pretrained(OUT)`` (a BertFor* class would get a fresh head).

``--grad-accum N`` runs each batch as N micro-batches, one after the other, their gradients summed into
the one optimizer step: the recipe (batches, steps, schedule) unchanged in less activation memory. Each
micro-batch's loss is weighted by its share of the batch's (examples; ner: labelled tokens; qa
micro-batches are padded as their whole batch, whose loss counts the padding positions), so the sum is
the whole batch's gradient up to rounding (tests/test_finetune_cli.py: the same losses, predictions and
weights without dropout). Not with CUDA graphs.

Truncation of over-long inputs is described in fastbert.tasks; the number of truncated examples is
printed for each file.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time

import torch

from . import runtime as R
from . import tasks as T
from . import trainer as TR
from .metrics import accuracy, entity_f1, squad_scores
from .runtime import add_device_arguments

PRIMARY = {"classify": "accuracy", "pair": "accuracy", "choice": "accuracy", "ner": "f1", "qa": "f1"}
HEADS = {"classify": "BertForSequenceClassification", "pair": "BertForSequenceClassification",
         "ner": "BertForTokenClassification", "qa": "BertForQuestionAnswering",
         "choice": "BertForMultipleChoice"}


CHECK_EVERY = 10  # training steps between reads of the loss (finiteness check, progress bar, history)
HISTORY_FILE = "history.jsonl"  # a row per CHECK_EVERY steps (loss) and per epoch (dev metrics)
# beside the saved model: what `fastbert predict` needs to apply it as it was trained and evaluated
SETTINGS_FILE = "finetune.json"
CURVE_FILE = "training_curve.png"


class UsageError(ValueError):
    """A command-line setting that cannot work here (device, precision, a missing package)."""


@contextlib.contextmanager
def _loading(model_dir: str):
    """A ValueError from reading the --model folder (a config.json that is not JSON or not a BERT
    config, a vocabulary without [CLS] / [SEP], weights of another shape) as a usage error naming it."""
    try:
        yield
    except ValueError as e:
        raise UsageError(f"--model {model_dir}: {e}") from None


def _freeze_arg(s: str):
    if s in ("none", "all"):
        return s
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--freeze takes none, all or a number of layers, not {s!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("--freeze N needs N >= 0")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=T.TASKS,
                   help="file formats: classify JSONL {\"text\", \"label\"}; pair JSONL {\"text_a\", \"text_b\", \"label\"}; "
                        "ner CoNLL token<TAB>tag lines (BIO tags), a blank line between sentences; qa JSONL "
                        "{\"question\", \"context\", \"answers\": {\"text\": [...], \"answer_start\": [...]}} (empty text: no "
                        "answer); choice "
                        "JSONL {\"question\", \"choices\": [...], \"label\"} (label: an index into choices, or the choice)")
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + weights + tokenizer)")
    p.add_argument("--train", required=True, help="training file")
    p.add_argument("--dev", required=True, help="dev file, evaluated after each epoch")
    p.add_argument("--test", help="test file: metrics and OUT/predictions.jsonl")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--epochs", type=int, default=3, help="default 3")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--patience", type=int, default=None,
                   help="stop once dev has not improved for this many epochs (default: run every epoch); the "
                        "schedule stays the one of --epochs")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="split each batch of --batch-size into this many micro-batches, run one after the other "
                        "and summed into one optimizer step: the same training in less memory (default 1)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: 2 x --batch-size")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-5; 1e-2 with --freeze all)")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps for linear warm-up (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="gradient clipping norm (default 1.0; 0 = off)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence, special tokens included (default 128)")
    p.add_argument("--doc-stride", type=int, default=None, help="qa: overlap of context windows in tokens "
                   "(default max-length // 4)")
    p.add_argument("--max-answer-length", type=int, default=30, help="qa: longest answer in tokens (default 30)")
    p.add_argument("--seed", type=int, default=42, help="default 42")
    p.add_argument("--freeze", type=_freeze_arg, default="none",
                   help="none (default); all (frozen encoder + learned layer mix); or N (freeze the lowest N layers)")
    p.add_argument("--max-train-examples", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--max-eval-examples", type=int, default=None, help="use only the first N dev/test examples")
    p.add_argument("--labels", metavar="FILE",
                   help="classify / pair / ner: the label set, one label a line, in id order (default: the "
                        "labels seen in the training file); needed when a short training file lacks some")
    p.add_argument("--new-head", action="store_true",
                   help="a task head in --model of another shape (fine-tuned for another label count) starts "
                        "afresh instead of being an error (transformers' ignore_mismatched_sizes)")
    p.add_argument("--random-init", action="store_true",
                   help="use the config and tokenizer of --model but freshly initialised weights")
    p.add_argument("--batching", choices=("bucketed", "random"), default="bucketed",
                   help="training batches: bucketed by length (default; little padding) or random, as "
                        "transformers' Trainer makes them (group_by_length=False), each padded to its longest")
    p.add_argument("--impl", choices=("fastbert", "transformers"), default="fastbert",
                   help="benchmarking switch: run the same loop on the transformers class of the same name "
                        "(same initial weights; needs transformers); default fastbert")
    add_device_arguments(p)
    R.add_cuda_graphs_argument(
        p, "GPU: replay each training step (forward, backward, clipping, AdamW) as one CUDA graph, one per "
           "32-token length bucket (fastbert.cuda_graphs.GraphedTrainStep): every batch is padded to its bucket "
           "and to --batch-size rows, and computed so, in exchange for no launch overhead; classify, pair, ner "
           "and choice, fp32 or bf16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _log(msg: str) -> None:
    print(f"[finetune] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- model

def build_model(task, model_dir, labels, freeze, random_init=False, new_head=False):
    """The fastbert model for `task`: the checkpoint's weights (task head freshly initialised when
    the checkpoint has none, or with new_head when its head has another shape: a 2-label classifier
    given 3 labels), or with random_init every weight fresh; the caller seeds torch."""
    from . import modeling as M
    from .checkpoint import HEAD_PREFIXES, MISMATCH_HINT
    from .config import BertConfig
    from .layer_mix import LayerMixModel, freeze_lowest

    label_cfg = {}
    if labels is not None:
        id2label = {i: str(v) for i, v in enumerate(labels)}
        label_cfg = {"id2label": id2label, "label2id": {v: i for i, v in id2label.items()},
                     "num_labels": len(labels)}
    cls = M.BertModel if freeze == "all" else getattr(M, HEADS[task])
    initial = None if random_init else TR.initial_model_warning(model_dir)
    if initial:
        _log(initial)
    if random_init:
        model = cls(BertConfig.from_pretrained(model_dir, **label_cfg))
    else:
        try:
            model, info = cls.from_pretrained(model_dir, ignore_mismatched_sizes=new_head,
                                              output_loading_info=True, **label_cfg)
        except ValueError as e:  # the command's way out, not the API's keyword
            raise ValueError(str(e).replace(MISMATCH_HINT, "\n(--new-head starts a head of another shape "
                                                           "afresh)")) from None
        body = sorted(k for k, _, _ in info["mismatched_keys"] if not k.startswith(HEAD_PREFIXES))
        if body:  # --new-head is for the head; an encoder of another shape is another model
            raise ValueError(f"checkpoint weights have the wrong shape: {', '.join(body)}")
    if freeze == "all":
        # the head's dropout follows the checkpoint's config (0.1 for BERT's), as a fine-tuned head's does
        return LayerMixModel(model, task, num_labels=len(labels) if labels else 2,
                             dropout=M._classifier_dropout(model.config).p)
    if isinstance(freeze, int):
        freeze_lowest(model, freeze)
    return model


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("--impl transformers needs the transformers package (pip install transformers)") from None
    return transformers


def _transformers_copy(model, class_name):
    """The transformers class `class_name` with `model`'s config and exactly its weights."""
    transformers = _require_transformers()
    config = transformers.BertConfig.from_dict(model.config.to_dict())
    hf = getattr(transformers, class_name)(config)
    # strict: every weight of the fastbert model has its place, none is left at transformers' init
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


def to_transformers(model, task, freeze):
    """The same model as `model` (built by build_model) on transformers' modules: same weights, the
    same parameters frozen; the layer mix and its head (fastbert.layer_mix) run on a transformers
    BertModel for --freeze all."""
    from .layer_mix import LayerMixModel, freeze_lowest
    if freeze == "all":
        hf = LayerMixModel(_transformers_copy(model.encoder, "BertModel"), task, num_labels=model.num_labels,
                           dropout=model.dropout.p)
        hf.mix.load_state_dict(model.mix.state_dict())
        hf.head.load_state_dict(model.head.state_dict())
        return hf
    hf = _transformers_copy(model, HEADS[task])
    if isinstance(freeze, int):
        freeze_lowest(hf, freeze)
    return hf


def _to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.inference_mode()
def predict(model, task, feats, batch_size, progress=False, device=None, precision="fp32", probabilities=None):
    """Raw predictions per feature: a class index (classify, pair, choice), per-token class ids
    (ner) or (start_logits, end_logits) lists (qa). probabilities: a list that gets each feature's
    softmax over the classes (classify, pair, choice: fp32, as lists)."""
    device = device or torch.device("cpu")
    model.eval()
    out = [None] * len(feats)
    if probabilities is not None:
        probabilities[:] = [None] * len(feats)
    batches = T.bucket_batches([T.length_of(f) for f in feats], batch_size, shuffle=False)
    for idx in _progress(batches, progress, "eval"):
        fs = [feats[i] for i in idx]
        batch = T.collate(fs)
        for k in ("labels", "start_positions", "end_positions"):
            batch.pop(k, None)
        with R.autocast(precision, device):
            res = model(**_to_device(batch, device), **R.PLAIN_OUTPUTS)
        # one device-to-host copy per batch, not one per example
        if task == "qa":
            starts, ends = res.start_logits.float().cpu(), res.end_logits.float().cpu()
            for j, i in enumerate(idx):
                n = len(fs[j]["input_ids"])
                out[i] = (starts[j, :n].tolist(), ends[j, :n].tolist())
        elif task == "ner":
            ids = res.logits.argmax(-1).cpu()
            for j, i in enumerate(idx):
                out[i] = ids[j, :len(fs[j]["input_ids"])].tolist()
        else:
            for j, i in zip(res.logits.argmax(-1).tolist(), idx):
                out[i] = j
            if probabilities is not None:
                for row, i in zip(res.logits.float().softmax(-1).cpu().tolist(), idx):
                    probabilities[i] = row
    return out


def _scores(metrics: dict) -> list[str]:
    """The metric names of an evaluation's result, without its example count "n"."""
    return [k for k in metrics if k != "n"]


def decode(task, examples, feats, raw, labels, max_answer_length=30, qa_null=False):
    """Predictions per example from predict()'s raw output: a label (classify, pair), a choice index
    (choice), a tag per word (ner) or an answer text (qa)."""
    if task in ("classify", "pair"):
        return [labels[p] for p in raw]
    if task == "choice":
        return list(raw)
    if task == "ner":
        # words cut off by truncation (or that tokenise to nothing) are predicted "O"
        return [[labels[ids[f["word_starts"][w]]] if w in f["word_starts"] else "O" for w in range(len(ex["words"]))]
                for ex, f, ids in zip(examples, feats, raw)]
    # a model trained on unanswerable questions may answer "" (run() sets qa_null from the training file)
    return T.qa_best_spans(examples, feats, [r[0] for r in raw], [r[1] for r in raw],
                           max_answer_tokens=max_answer_length, null_answers=qa_null)


def score(task, examples, preds) -> dict:
    """The task's metrics of decode()'s predictions against the examples' labels."""
    if task in ("classify", "pair", "choice"):
        return {"accuracy": accuracy(preds, [ex["label"] for ex in examples]), "n": len(examples)}
    if task == "ner":
        r = entity_f1([ex["tags"] for ex in examples], preds)
        return {"f1": r["f1"], "precision": r["precision"], "recall": r["recall"], "n": len(examples)}
    r = squad_scores(preds, [ex["answers"]["text"] for ex in examples])
    return {"exact_match": r["exact_match"], "f1": r["f1"], "n": len(examples)}


def evaluate(model, task, examples, feats, labels, args, progress=False, device=None, precision="fp32"):
    """(metrics dict, predictions per example) on a labelled file."""
    raw = predict(model, task, feats, args.eval_batch_size, progress, device, precision)
    preds = decode(task, examples, feats, raw, labels, args.max_answer_length, getattr(args, "qa_null", False))
    return score(task, examples, preds), preds


def micro_batches(task, feats, idx, n):
    """A batch (feature indices) as up to n contiguous micro-batches, each with its share of the batch's
    mean loss (examples; ner: labelled tokens), so that their summed gradients are the whole batch's.
    A micro-batch without a labelled token (ner) adds nothing and is left out (its mean would be 0 / 0)."""
    if n == 1:
        return [(idx, 1.0)]
    parts = [idx[k * len(idx) // n:(k + 1) * len(idx) // n] for k in range(n)]
    if task == "ner":
        terms = [sum(label != -100 for i in part for label in feats[i]["labels"]) for part in parts]
    else:
        terms = [len(part) for part in parts]
    total = sum(terms)
    if total == 0:  # no labelled token in the whole batch: its loss is what the model says of it
        return [(idx, 1.0)]
    return [(part, t / total) for part, t in zip(parts, terms) if t]


def settings(args, labels) -> dict:
    """finetune.json: the task, its label set (in id order, as the training file spelled the labels:
    integers stay integers) and how inputs were cut and decoded."""
    return {"task": args.task, "labels": labels, "max_length": args.max_length, "doc_stride": args.doc_stride,
            "max_answer_length": args.max_answer_length, "qa_null": bool(getattr(args, "qa_null", False)),
            "freeze": args.freeze, "eval_batch_size": args.eval_batch_size}


def _progress(it, enabled, desc):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


# -------------------------------------------------------------------------------------------- main

def _load(task, path, labels, tok, args, limit, name, examples=None):
    """(examples, features) of a file; `examples`: the file's, already read (and cut to `limit`)."""
    if examples is None:
        examples = T.read_examples(task, path)
        if limit is not None:
            examples = examples[:limit]
    T.check_labels(task, examples, labels, path, label_file=args.labels)
    label2id = {v: i for i, v in enumerate(labels)} if labels is not None else None
    feats, info = T.build_features(task, examples, tok, args.max_length, label2id,
                                   doc_stride=args.doc_stride)
    if info.get("truncated"):
        what = "had their context split into several windows" if task == "qa" else f"cut to {args.max_length} tokens"
        _log(f"{name}: {info['truncated']} of {len(examples)} examples {what}")
    if info.get("questions_truncated"):
        _log(f"{name}: {info['questions_truncated']} questions cut to 64 tokens (fewer where --max-length leaves the context no room)")
    return examples, feats


def read_label_file(path, task, train_ex):
    """The label list of --labels FILE; integer labels when the training file's labels are integers."""
    from .metrics import _split_tag
    if task not in ("classify", "pair", "ner"):
        raise UsageError(f"--labels applies to classify, pair and ner, not {task}")
    with T._open_nonempty(path) as f:
        names = [line.strip() for _, line in T._lines(f, path) if line.strip()]
    if len(set(names)) != len(names):
        raise T.DataError(f"{path}: a label is listed twice")
    if task == "ner":
        for name in names:
            try:
                _split_tag(name)
            except ValueError as e:
                raise T.DataError(f"{path}: {e}") from None
        return names
    if all(isinstance(ex["label"], int) for ex in train_ex):
        try:
            return [int(n) for n in names]
        except ValueError:
            raise T.DataError(f"{path}: the training labels are integers, but the file lists {names}") from None
    return names


def _check_choice_counts(examples, n, source="the training file has {n} per question"):
    """Every question has `n` choices (a batch holds one number); else an error naming the line and
    `source` (where n came from, with {n} in it)."""
    for ex in examples:
        if len(ex["choices"]) != n:
            raise T.DataError(f"{ex['_where']}: {len(ex['choices'])} choices, but {source.format(n=n)} "
                              f"(every question needs the same number)")


def _why_no_cuda_graphs(args, device, precision) -> str | None:
    """Why this run cannot use CUDA graphs (None: it can)."""
    why = None
    if args.task == "qa":
        why = "does not run qa: its span loss counts every position, the padding rows of a bucket included"
    elif getattr(args, "grad_accum", 1) > 1:  # (a Namespace built by hand may lack it)
        why = "does not run --grad-accum above 1: a graph replays one whole step"
    elif precision == "fp16":
        why = "does not run fp16: GradScaler decides on the host whether a step is applied (use bf16)"
    elif args.impl != "fastbert":
        why = "runs fastbert's own models only (--impl fastbert)"
    elif device.type != "cuda":
        why = f"needs a CUDA device, not {device}"
    return why


def use_cuda_graphs(args, device, precision) -> bool:
    """--cuda-graphs on / off / auto (on where it runs, at --batch-size <= R.GRAPHS_AUTO_MAX_BATCH)."""
    choice = getattr(args, "cuda_graphs", "off")  # (a Namespace built by hand may hold the old flag's bool)
    why = _why_no_cuda_graphs(args, device, precision)
    if choice in ("on", True) and why:
        raise UsageError(f"--cuda-graphs {why}")
    if choice == "auto" and device.type == "cuda" and (why or args.batch_size > R.GRAPHS_AUTO_MAX_BATCH):
        _log("CUDA graphs off (--cuda-graphs auto): " + (f"--cuda-graphs {why}" if why else
             f"--batch-size {args.batch_size} is above {R.GRAPHS_AUTO_MAX_BATCH}"))
        return False
    return R.use_cuda_graphs(choice, device, args.batch_size)


def run(args) -> dict:
    for name, least in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("patience", 1), ("eval_batch_size", 1),
                        ("threads", 1),
                        ("max_train_examples", 1), ("max_eval_examples", 1), ("max_answer_length", 1),
                        ("doc_stride", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {least}, not {getattr(args, name)}")
    if args.max_length < 8:
        raise UsageError(f"--max-length {args.max_length} is too small (at least 8)")
    if args.grad_accum > args.batch_size:
        raise UsageError(f"--grad-accum {args.grad_accum} splits a batch of --batch-size {args.batch_size} into more "
                         f"micro-batches than it has examples")
    for name in ("lr", "weight_decay", "max_grad_norm"):  # a negative clipping norm flips the gradients
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < math.inf:
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number at least 0, not {getattr(args, name)}")
    if not 0 <= args.warmup <= 1:
        raise UsageError(f"--warmup is a fraction of the steps in [0, 1], not {args.warmup}")
    for name in ("train", "dev", "test", "labels"):  # the readers take "-" as standard input: predict's only
        if getattr(args, name, None) == T.STDIN:
            raise UsageError(f"--{name} -: fastbert finetune reads files by name (standard input is for "
                             f"fastbert predict --input -)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = R.resolve_device(args.device)
        precision = R.resolve_precision(args.precision, device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    graphs = use_cuda_graphs(args, device, precision)
    if args.impl == "transformers":
        transformers = _require_transformers()
        if args.no_progress:
            transformers.utils.logging.disable_progress_bar()  # its save_pretrained draws one
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    task, freeze = args.task, args.freeze
    if args.lr is None:
        args.lr = 1e-2 if freeze == "all" else 5e-5
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size

    from .config import BertConfig
    with _loading(args.model):
        config = BertConfig.from_pretrained(args.model)
    if args.max_length > config.max_position_embeddings:
        _log(f"--max-length {args.max_length} is above the model's {config.max_position_embeddings} "
             f"positions; using {config.max_position_embeddings}")
        args.max_length = config.max_position_embeddings
    if isinstance(freeze, int) and freeze > config.num_hidden_layers:
        raise UsageError(f"--freeze {freeze}: the model has {config.num_hidden_layers} layers")

    with _loading(args.model):
        tok = T.load_tokenizer(args.model, vocab_size=config.vocab_size)
    train_ex = T.read_examples(task, args.train)
    if args.max_train_examples is not None:
        train_ex = train_ex[:args.max_train_examples]
    labels = read_label_file(args.labels, task, train_ex) if args.labels else T.build_label_list(task, train_ex)
    if labels is not None and task in ("classify", "pair") and len(labels) < 2:
        raise T.DataError(f"{args.train}: only one label ({labels[0]!r}) in the training file")
    train_ex, train_f = _load(task, args.train, labels, tok, args, args.max_train_examples, "train", train_ex)
    # questions without an answer train toward [CLS]; such a model may then answer "" (SQuAD 2.0)
    unanswered = sum(not ex["answers"]["text"] for ex in train_ex) if task == "qa" else 0
    args.qa_null = unanswered > 0
    if unanswered:
        _log(f"{unanswered} training questions have no answer: predictions are \"\" where [CLS] "
             f"outscores every span")
    dev_ex, dev_f = _load(task, args.dev, labels, tok, args, args.max_eval_examples, "dev")
    test_ex = test_f = None
    if args.test:
        test_ex, test_f = _load(task, args.test, labels, tok, args, args.max_eval_examples, "test")
    if task == "choice":
        n = len(train_ex[0]["choices"])
        for exs in (train_ex, dev_ex, test_ex or []):
            _check_choice_counts(exs, n)

    if os.path.isdir(args.model) and os.path.isdir(args.out) and os.path.samefile(args.model, args.out):
        raise UsageError(f"--out {args.out} is the --model folder: the fine-tuned model would replace the model "
                         f"it starts from; choose another --out")
    # The model before the output folder is touched: a checkpoint that does not load (weights of
    # another shape, e.g. a head fine-tuned for another label set) leaves an earlier run there intact.
    with _loading(args.model):
        model = build_model(task, args.model, labels, freeze, random_init=args.random_init,
                            new_head=getattr(args, "new_head", False))
    if args.impl == "transformers":
        model = to_transformers(model, task, freeze)
    try:  # the output folder, checked before training rather than after it
        os.makedirs(args.out, exist_ok=True)
        if not os.access(args.out, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    # An earlier run's outputs that this run may not write would pass for this run's: metrics.json
    # appears only when the run is complete, the rest as it goes.
    from .layer_mix import HEAD_FILE, META_FILE
    found = [n for n in ("model.safetensors", "metrics.json", HISTORY_FILE, HEAD_FILE)
             if os.path.isfile(os.path.join(args.out, n))]
    if found:  # reused by design (reruns, grids), but a mistyped --out should not pass unnoticed
        _log(f"--out {args.out} holds an earlier run ({', '.join(found[:2])}{', ...' if len(found) > 2 else ''}); "
             f"this run replaces it")
    stale = ["metrics.json", "predictions.jsonl", HISTORY_FILE, CURVE_FILE, SETTINGS_FILE] + (
        [] if freeze == "all" else [HEAD_FILE, META_FILE])
    for name in stale:
        if os.path.isfile(os.path.join(args.out, name)):
            os.unlink(os.path.join(args.out, name))
    args.started = True  # OUT's history.jsonl is this run's from here on (main reports it when stopped)

    model.to(device)
    # Both implementations start their dropout streams from the same seed, whatever building
    # (and, for transformers, re-initialising) the model drew.
    torch.manual_seed(args.seed)
    from .optim import build_optimizer, optimizer_step, warmup_linear_schedule
    optimizer = build_optimizer(model, args.lr, weight_decay=args.weight_decay, capturable=graphs)
    steps_per_epoch = math.ceil(len(train_f) / args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = warmup_linear_schedule(optimizer, int(args.warmup * total), total)
    scaler = R.grad_scaler(precision, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    threads = torch.get_num_threads()
    _log(f"{task}: {R.count(len(train_ex), 'train example')} ({R.count(len(train_f), 'feature')}), "
         f"{len(dev_ex):,} dev; {R.count(args.epochs, 'epoch')} x {R.count(steps_per_epoch, 'step')}; lr {args.lr}; "
         f"{sum(p.numel() for p in trainable):,} trainable parameters; impl {args.impl}"
         f"{' (random init)' if args.random_init else ''}; {precision} on {R.describe(device)}")

    metric = PRIMARY[task]
    best, best_state, history, stopped_after = -1.0, None, [], None
    log = TR.MetricsLog(os.path.join(args.out, HISTORY_FILE))
    progress = not args.no_progress
    train_seconds = eval_seconds = 0.0
    t_start = time.perf_counter()
    lengths = [T.length_of(f) for f in train_f]
    graphed = None
    if graphs:
        from .cuda_graphs import GraphedTrainStep
        from .encode import length_buckets
        graphed = GraphedTrainStep(model, optimizer, batch_size=args.batch_size,
                                   seq_buckets=length_buckets(args.max_length), max_grad_norm=args.max_grad_norm,
                                   autocast_dtype=R.autocast_dtype(precision))
    for epoch in range(args.epochs):
        model.train()
        if getattr(args, "batching", "bucketed") == "random":
            batches = T.random_batches(len(lengths), args.batch_size, seed=args.seed + epoch)
        else:
            batches = T.bucket_batches(lengths, args.batch_size, shuffle=True, seed=args.seed + epoch)
        bar = _progress(batches, progress, f"epoch {epoch + 1}/{args.epochs}")
        R.synchronize(device)
        t0 = time.perf_counter()
        # the loss is summed on the device and read every CHECK_EVERY steps, not once per step:
        # a host sync per step would keep a GPU waiting on Python
        loss_acc = torch.zeros((), dtype=torch.float64, device=device)
        loss_sum, n, checked = 0.0, 0, 0
        rows = []  # the loss of every CHECK_EVERY steps, written to history.jsonl after the epoch
        for idx in bar:
            cpu_batch = T.collate([train_f[i] for i in idx])
            if graphed is not None:
                # padded to its bucket, copied into that graph's inputs, replayed: one launch per step
                loss = graphed(cpu_batch)
                scheduler.step()  # the learning rate is a device tensor the graphs read, updated in place
            else:
                loss = None
                for part, weight in micro_batches(task, train_f, idx, args.grad_accum):
                    # qa: padded as the whole batch, whose loss counts the padding positions (as transformers')
                    batch = _to_device(cpu_batch if len(part) == len(idx) else T.collate(
                        [train_f[i] for i in part], length=cpu_batch["input_ids"].shape[-1] if task == "qa" else None),
                        device)
                    with R.autocast(precision, device):
                        part_loss = model(**batch, **R.PLAIN_OUTPUTS).loss
                    if weight != 1.0:  # its share of the whole batch's mean loss
                        part_loss = part_loss * weight
                    (scaler.scale(part_loss) if scaler is not None else part_loss).backward()
                    loss = part_loss.detach() if loss is None else loss + part_loss.detach()
                optimizer_step(optimizer, scheduler, trainable, args.max_grad_norm, scaler)
            loss_acc += loss.detach()
            n += 1
            if n % CHECK_EVERY == 0 or n == len(batches):
                window, loss_sum = float(loss_acc) - loss_sum, float(loss_acc)
                if not math.isfinite(loss_sum):
                    raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}, "
                                             f"steps {checked + 1}..{n} of the epoch")
                rows.append({"step": epoch * steps_per_epoch + n, "epoch": epoch + 1,
                             "loss": window / (n - checked)})
                checked = n
                if progress:
                    bar.set_postfix(loss=f"{loss_sum / n:.4f}")
        R.synchronize(device)
        train_seconds += time.perf_counter() - t0
        t1 = time.perf_counter()
        dev_metrics, _ = evaluate(model, task, dev_ex, dev_f, labels, args, device=device, precision=precision)
        eval_seconds += time.perf_counter() - t1
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(n, 1), **dev_metrics,
                        "train_seconds": round(train_seconds, 2),
                        "elapsed_seconds": round(time.perf_counter() - t_start, 2)})
        improved = dev_metrics[metric] > best
        _log(f"epoch {epoch + 1}: train loss {loss_sum / max(n, 1):.4f}, dev {metric} {dev_metrics[metric]:.4f} "
             f"({train_seconds:.1f} s of training so far)" + ("; best so far, saved" if improved else ""))
        if improved:
            best = dev_metrics[metric]
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best_dev, best_epoch = dev_metrics, epoch + 1
            # on disk at once: a crash or Ctrl-C later in the run keeps the best model so far
            model.save_pretrained(args.out)
            T.copy_tokenizer_files(args.model, args.out)
            TR.atomic_write_json(os.path.join(args.out, SETTINGS_FILE), settings(args, labels))
        rows.append({"step": (epoch + 1) * steps_per_epoch, "epoch": epoch + 1, "train_loss": history[-1]["train_loss"],
                     **{f"dev_{k}": dev_metrics[k] for k in _scores(dev_metrics)}, "saved": improved})
        for row in rows:
            log.write(row)
        # each epoch, so that a run stopped later keeps its curve beside its best model (off the clock)
        TR.plot_metrics(log.path, os.path.join(args.out, CURVE_FILE), title=f"fastbert finetune --task {task}",
                        scores=tuple((f"dev_{k}", f"dev {k.replace('_', ' ')}") for k in _scores(dev_metrics)))
        if args.patience and epoch + 1 - best_epoch >= args.patience and epoch + 1 < args.epochs:
            stopped_after = epoch + 1
            _log(f"stopping early: no better dev {metric} for {R.count(args.patience, 'epoch')} (--patience)")
            break
    total_seconds = time.perf_counter() - t_start

    model.load_state_dict(best_state)
    result = {"dev": best_dev, "best_epoch": best_epoch, "history": history,
              "train_seconds": round(train_seconds, 2), "eval_seconds": round(eval_seconds, 2),
              "total_seconds": round(total_seconds, 2), "impl": args.impl,
              "batching": args.batching, "random_init": args.random_init,
              "device": str(device), "device_name": R.describe(device), "precision": precision,
              "threads": threads, "steps": steps_per_epoch * len(history),  # those run (--patience may stop early)
              "planned_steps": total, "train_features": len(train_f), "cuda_graphs": graphs,
              "stopped_early_after_epoch": stopped_after}
    if graphed is not None:  # included in train_seconds: two eager warm-up steps and a capture per bucket
        result["capture_seconds"] = round(graphed.capture_seconds, 2)
    if args.impl == "transformers":
        cfg = getattr(model, "config", None)
        result["attn_implementation"] = getattr(cfg, "_attn_implementation", None)
    if test_ex is not None:
        test_metrics, preds = evaluate(model, task, test_ex, test_f, labels, args, device=device,
                                       precision=precision)
        result["test"] = test_metrics
    if test_ex is not None:
        key = {"ner": "tags", "qa": "answer"}.get(task, "label")
        with open(os.path.join(args.out, "predictions.jsonl"), "w", encoding="utf-8") as f:
            for i, p in enumerate(preds):
                f.write(json.dumps({"index": i, key: p}, ensure_ascii=False) + "\n")
    ordered = {"dev": result.pop("dev")}
    if "test" in result:
        ordered["test"] = result.pop("test")
    ordered.update(result)
    TR.atomic_write_json(os.path.join(args.out, "metrics.json"), ordered)
    _log(f"best epoch {best_epoch}: dev {metric} {best:.4f}"
         + (f", test {metric} {ordered['test'][metric]:.4f}" if "test" in ordered else "")
         + f"; {train_seconds:.1f} s of training; wrote {args.out}")
    return ordered


def main(args) -> int:
    try:
        run(args)
    except (T.DataError, FileNotFoundError, UsageError) as e:
        print(f"fastbert finetune: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a non-finite training loss: the run stops, as fastbert pretrain's does
        print(f"fastbert finetune: error: {e}{_kept(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastbert finetune: interrupted{_kept(args)}", file=sys.stderr)
        return 130
    return 0


def _kept(args) -> str:
    """What a stopped run left in OUT: the best epoch saved so far, read back from history.jsonl —
    once this run has cleared OUT of an earlier run's files (before, they are the earlier run's)."""
    out = args.out
    if not getattr(args, "started", False):
        return f" before training, {out} untouched"
    saved = [r for r in TR.read_metrics(os.path.join(out, HISTORY_FILE)) if r.get("saved")]
    if not saved:
        earlier = os.path.isfile(os.path.join(out, "model.safetensors"))
        return "; no epoch finished, nothing saved" + (
            f" ({out}'s model files are an earlier run's)" if earlier else "")
    scores = ", ".join(f"{k} {v:.4f}" for k, v in saved[-1].items() if k.startswith("dev_"))
    return f"; {out} holds the best epoch so far (epoch {saved[-1]['epoch']}: {scores}), without metrics.json"
