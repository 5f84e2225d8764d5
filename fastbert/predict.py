"""`fastbert predict`: a fine-tuned model applied to a file of its task.

    fastbert predict --model OUT --input FILE [--output predictions.jsonl] [--metrics metrics.json]

--model is a `fastbert finetune` output folder, whose finetune.json gives the task, the label set
and the input settings it was trained with; or any folder of a fine-tuned BERT head (a transformers
checkpoint, say) with ``--task``, the labels then taken from config.json's id2label. A folder whose
task head has no trained weights (a pretraining checkpoint) is refused: its predictions would come
from a random head.

--input (``-``: standard input) has the task's format (``fastbert finetune --help``) with the labels
optional: the "label" field (classify, pair, choice), "answers" (qa) or a CoNLL line's tag (ner: a
line may be the token alone) — in every example or in none. Unlabelled examples are predicted; when the examples carry
their labels, the metrics of ``fastbert finetune`` are computed too (printed; ``--metrics FILE``
writes them as JSON), and a label the model does not know is an error naming its line.

Output, one JSON line per example in input order (stdout unless ``--output``), as fine-tuning's
predictions.jsonl: ``{"index", "label"}`` (classify, pair; choice: the index of the choice),
``{"index", "tags"}`` (ner: a tag per input token; tokens cut off by truncation get "O") or
``{"index", "answer"}`` (qa; "" where a model trained on unanswerable questions answers nothing);
with ``--probabilities`` (classify, pair, choice) also ``"probabilities"``: the softmax over the labels
as {label: p} (choice: a list over the choices).
Inputs longer than the model's --max-length are cut as in fine-tuning (qa: overlapping windows); the
settings default to finetune.json's (max length, qa windows and null answers, evaluation batch size),
so on fine-tuning's device, precision and thread count the predictions are its own. A folder without
finetune.json is predicted with max length 128 (at most the model's positions) and no null answers
unless told, which the command says.
A file --output is written whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

import torch

from . import runtime as R
from . import tasks as T
from . import trainer as TR
from .finetune import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a fastbert finetune output folder, or a fine-tuned checkpoint "
                                                  "folder with --task")
    p.add_argument("--input", required=True, help="a file in the task's format, labels optional; - reads "
                                                  "standard input")
    p.add_argument("--task", choices=T.TASKS, help="default: the task the model was fine-tuned for (finetune.json)")
    p.add_argument("--output", help="predictions as JSONL, one line per example (default: stdout): "
                                    '{"index", "label"} (classify, pair; choice: the choice\'s index), '
                                    '{"index", "tags"} (ner: one tag per input token), {"index", "answer"} (qa)')
    p.add_argument("--metrics", metavar="FILE", help="labelled input: write its metrics here as JSON")
    p.add_argument("--probabilities", action="store_true",
                   help="classify, pair, choice: each line also gives the softmax probability of every label "
                        "(choice: of every choice, in order)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: fine-tuning's evaluation batch size, else 64")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per sequence (default: as fine-tuned, else 128)")
    p.add_argument("--doc-stride", type=int, default=None, help="qa: overlap of context windows (default: as "
                   "fine-tuned, else max-length // 4)")
    p.add_argument("--max-answer-length", type=int, default=None,
                   help="qa: longest answer in tokens (default: as fine-tuned, else 30)")
    p.add_argument("--null-answers", choices=("auto", "on", "off"), default="auto",
                   help="qa: on: answer \"\" where the model rates no span above its null score (SQuAD 2.0); "
                        "auto (default): on when the model was fine-tuned on unanswerable questions")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")
    R.add_device_arguments(p, training=False)


def _log(msg: str) -> None:
    print(f"fastbert predict: {msg}", file=sys.stderr, flush=True)


def read_settings(model_dir: str) -> dict:
    """finetune.json of a fastbert finetune output ({} for another checkpoint folder)."""
    from .finetune import SETTINGS_FILE
    path = os.path.join(model_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({e})") from None
    if not isinstance(found, dict) or found.get("task") not in T.TASKS:
        raise UsageError(f"{path}: not a fastbert finetune settings file (no known 'task')")
    return found


def load_model(task: str, model_dir: str):
    """The model for `task` from a fine-tuned folder: the layer-mix model of a --freeze all run, else the
    task's BertFor* class, every weight from the checkpoint (a missing head weight is an error; errors
    do not name the folder, which the caller's finetune._loading adds)."""
    from . import modeling as M
    from .finetune import HEADS
    from .layer_mix import META_FILE, LayerMixModel
    if os.path.isfile(os.path.join(model_dir, META_FILE)):
        model = LayerMixModel.from_pretrained(model_dir)
        if model.task != task:
            raise UsageError(f"a layer mix fine-tuned for {model.task}, not {task}")
        return model
    with warnings.catch_warnings():  # the missing weights are this command's error, not a warning
        warnings.simplefilter("ignore")
        model, info = getattr(M, HEADS[task]).from_pretrained(model_dir, output_loading_info=True)
    if info["missing_keys"]:
        raise UsageError(f"no trained {task} head (missing: {', '.join(sorted(info['missing_keys']))}): "
                         f"fine-tune it first (fastbert finetune)")
    return model


def label_list(task: str, settings: dict, model, examples: list) -> list | None:
    """The label of each class id: finetune.json's (the training file's spelling), else config.json's
    id2label; None for qa and choice. config.json's names are strings even where the training labels were
    integers (finetune writes id2label {i: str(label)}; transformers' default is "LABEL_i"): names that
    are all integers ("1", "2", "3") stand for those integers and the default names for their ids, whether
    or not the input is labelled, unless the input's own labels are strings."""
    if task not in ("classify", "pair", "ner"):
        return None
    names = settings.get("labels")
    if names is None:
        names = [str(model.config.id2label[i]) for i in range(len(model.config.id2label))]
        # (ner's tags are strings whatever their names)
        if task != "ner" and not (T.labelled(task, examples) and any(type(ex["label"]) is str for ex in examples)):
            as_ints = [int(n) if re.fullmatch(r"-?[0-9]+", n) and str(int(n)) == n else None for n in names]
            if None not in as_ints:  # as str(int) wrote them: "7", not "007" (a code that is a string)
                names = as_ints
            elif all(n == f"LABEL_{i}" for i, n in enumerate(names)):
                names = list(range(len(names)))
    n_out = getattr(model, "num_labels", None) or model.config.num_labels
    if len(names) != n_out:
        raise UsageError(f"{len(names)} labels ({names[:5]}{' ...' if len(names) > 5 else ''}) for a head of "
                         f"{n_out} outputs: the model folder's finetune.json or config.json is inconsistent")
    return list(names)


def _check_args(args) -> None:
    for name, least in (("batch_size", 1), ("threads", 1), ("max_length", 8), ("doc_stride", 0),
                        ("max_answer_length", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {least}, not {value}")
    if args.output and args.metrics and os.path.realpath(args.output) == os.path.realpath(args.metrics):
        raise UsageError(f"--output and --metrics are the same file ({args.output})")
    for path in (args.output, args.metrics):
        if path and os.path.isdir(path):
            raise UsageError(f"{path}: is a folder; give a file name")
        if path and not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            raise UsageError(f"{path}: cannot write there")


def run(args) -> dict | None:
    """Predict args.input; returns the metrics (None for unlabelled input)."""
    from .finetune import _check_choice_counts, _loading, decode, predict, score
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = R.resolve_device(args.device)
        precision = R.resolve_precision(args.precision, device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model}: no such folder")
    settings = read_settings(args.model)
    task = args.task or settings.get("task")
    if task is None:
        raise UsageError(f"--model {args.model} has no finetune.json (not a fastbert finetune output): give --task")
    if settings and task != settings["task"]:
        raise UsageError(f"--task {task}, but --model {args.model} was fine-tuned for {settings['task']}")
    if args.probabilities and task in ("ner", "qa"):
        raise UsageError(f"--probabilities applies to classify, pair and choice, not {task}")
    if args.null_answers != "auto" and task != "qa":
        raise UsageError(f"--null-answers applies to qa, not {task}")
    examples = T.read_examples(task, args.input, require_labels=False)
    with _loading(args.model):
        model = load_model(task, args.model)
        tok = T.load_tokenizer(args.model, vocab_size=model.config.vocab_size)
    labels = label_list(task, settings, model, examples)
    has_labels = T.labelled(task, examples)
    if has_labels:
        T.check_labels(task, examples, labels, T._name(args.input), model_dir=args.model)
    if task == "choice":  # a batch holds one number of choices
        _check_choice_counts(examples, len(examples[0]["choices"]), "the first question has {n}")
    positions = model.config.max_position_embeddings
    max_length = args.max_length or settings.get("max_length") or 128
    if max_length > positions:
        if args.max_length or settings:  # else the default's cap is said below, once
            given = f"--max-length {max_length}" if args.max_length else f"the fine-tuned max length {max_length}"
            _log(f"{given} is above the model's {positions} positions; using {positions}")
        max_length = positions
    if not settings:
        _log(f"{args.model} has no finetune.json: its input settings are not known; using max length "
             f"{max_length}" + (" (the model's positions)" if max_length < 128 and not args.max_length else "")
             + (f", {'' if args.null_answers == 'on' else 'no '}unanswerable questions" if task == "qa" else ""))
    doc_stride = args.doc_stride if args.doc_stride is not None else settings.get("doc_stride")
    max_answer = args.max_answer_length or settings.get("max_answer_length") or 30
    qa_null = {"on": True, "off": False}.get(args.null_answers, bool(settings.get("qa_null", False)))
    batch_size = args.batch_size or settings.get("eval_batch_size") or 64
    label2id = {v: i for i, v in enumerate(labels)} if has_labels and labels is not None else None
    feats, info = T.build_features(task, examples, tok, max_length, label2id, doc_stride=doc_stride)
    if info.get("truncated"):
        what = "had their context split into several windows" if task == "qa" else f"cut to {max_length} tokens"
        _log(f"{info['truncated']} of {len(examples)} examples {what}")

    model.to(device)
    probs = [] if args.probabilities else None
    raw = predict(model, task, feats, batch_size, not args.no_progress, device, precision, probs)
    preds = decode(task, examples, feats, raw, labels, max_answer, qa_null)
    key = {"ner": "tags", "qa": "answer"}.get(task, "label")
    rows = [{"index": i, key: p} for i, p in enumerate(preds)]
    if probs is not None:  # labels as JSON keys are strings; a choice's are in the order of its choices
        for row, pr in zip(rows, probs):
            row["probabilities"] = pr if task == "choice" else {str(lab): q for lab, q in zip(labels, pr)}
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.output:
        TR.atomic_write_text(args.output, lines)
    else:
        sys.stdout.write(lines)
        sys.stdout.flush()
    metrics = score(task, examples, preds) if has_labels else None
    if metrics is not None:
        _log(", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n") + f" on {metrics['n']} examples")
        if args.metrics:
            TR.atomic_write_json(args.metrics, metrics)
    elif args.metrics:
        _log(f"{T._name(args.input)} has no labels: no metrics, {args.metrics} not written")
    return metrics


def main(args) -> int:
    try:
        run(args)
    except (T.DataError, FileNotFoundError, UsageError) as e:
        print(f"fastbert predict: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastbert predict: interrupted" + (f"; {args.output} not written" if args.output else ""),
              file=sys.stderr)
        return 130
    return 0
