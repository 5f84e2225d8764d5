"""Fine-tuning tasks: file readers, label sets, tokenisation into features, batching, QA decoding.

Five tasks, five file formats (README.md, `fastbert finetune --help`):

- classify  JSONL ``{"text", "label"}``
- pair      JSONL ``{"text_a", "text_b", "label"}``
- ner       CoNLL ``token<TAB>tag`` (BIO tags), a blank line between sentences
- qa        JSONL ``{"question", "context", "answers": {"text": [...], "answer_start": [...]}}``
- choice    JSONL ``{"question", "choices": [...], "label"}`` (label = index into choices)

Readers raise ``DataError`` naming the file and the line for anything they cannot use (bad JSON, a
missing or mistyped field, a tag that is not BIO, an answer_start that does not point at the answer
text, an empty file). Unknown labels in a dev/test file are an error, not a silent skip. With
``require_labels=False`` (``fastbert predict``) the label ("label", "answers", a CoNLL line's tag) may be
absent: from every example of the file or from none, as ``labelled()`` then tells.

Over-long input is truncated, never rejected, and the number of truncated examples is reported:
classify/pair/choice keep the first ``max_length`` tokens (pair and choice trim the longer of the
two texts first); ner keeps the words that fit, and words cut off are predicted "O" (so they still
count against recall); qa splits the context into overlapping windows (``doc_stride`` tokens of
overlap) and questions longer than ``max_query_length`` tokens are cut (to half of ``max_length``
when even that would leave the context no room).

Nothing here imports the model: features are plain lists, and ``collate`` pads a batch to its own
longest sequence.
"""
from __future__ import annotations

import codecs
import io
import json
import math
import os
import random
import sys
from typing import Any, Sequence

import torch

from .metrics import _split_tag

TASKS = ("classify", "pair", "ner", "qa", "choice")


class DataError(ValueError):
    """A problem in a data file; the message names the file and line."""


# ----------------------------------------------------------------------------------------- readers

STDIN = "-"  # the path that reads standard input (named "<stdin>" in errors)


def _name(path: str) -> str:
    return "<stdin>" if path == STDIN else path


def _open_nonempty(path: str):
    if path == STDIN:  # read whole: the readers hold every example anyway
        stream = getattr(sys.stdin, "buffer", None)
        data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8")
        if not data:
            raise DataError("<stdin>: standard input is empty")
        return io.BytesIO(data)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder; give the data file itself")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")
    return open(path, "rb")


def _lines(f, path: str):
    """(line number, text) of a file opened by _open_nonempty: UTF-8 (a leading byte-order mark
    dropped), an undecodable line an error that names it. Lines end at \n, \r\n or a lone \r, as in
    text mode (binary iteration alone splits at \n only, so an old-Mac \r file would be one line)."""
    lineno = 0
    for chunk in f:  # each chunk ends at a \n, so a \r\n is never cut in two
        for raw in chunk.splitlines(keepends=True):  # bytes.splitlines: \n, \r\n, \r and nothing else
            lineno += 1
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None


def _need(obj: dict, key: str, kind, where: str):
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} should be {want}, got {type(value).__name__}")
    return value


LABEL_FIELD = {"classify": "label", "pair": "label", "choice": "label", "qa": "answers", "ner": "tags"}


def _all_or_none(examples: list[dict], task: str, path: str) -> None:
    """A file whose examples carry labels only in part is refused, naming the first line that differs."""
    field = LABEL_FIELD[task]
    first = field in examples[0]
    for ex in examples:
        if (field in ex) != first:
            what = "a tag" if task == "ner" else f"{field!r}"
            raise DataError(f"{ex['_where']}: {'has' if not first else 'lacks'} {what}, unlike {examples[0]['_where']}: "
                            f"give every example its label, or none")


def labelled(task: str, examples: Sequence[dict]) -> bool:
    """Whether examples (read with require_labels=False) carry their labels (qa: answers)."""
    return bool(examples) and LABEL_FIELD[task] in examples[0]


def read_jsonl(path: str, task: str, require_labels: bool = True) -> list[dict]:
    """Read a JSONL file of `task` (classify, pair, qa, choice); each example keeps its line as `_where`.
    require_labels=False: "label" ("answers" for qa) may be absent, from all examples or none."""
    examples = []
    with _open_nonempty(path) as f:
        path = _name(path)
        for lineno, line in _lines(f, path):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            ex: dict[str, Any] = {"_where": where}
            if task == "classify":
                ex["text"] = _need(obj, "text", str, where)
                if require_labels or "label" in obj:
                    ex["label"] = _need(obj, "label", (str, int), where)
            elif task == "pair":
                ex["text_a"] = _need(obj, "text_a", str, where)
                ex["text_b"] = _need(obj, "text_b", str, where)
                if require_labels or "label" in obj:
                    ex["label"] = _need(obj, "label", (str, int), where)
            elif task == "qa":
                ex["question"] = _need(obj, "question", str, where)
                ex["context"] = _need(obj, "context", str, where)
                if not require_labels and "answers" not in obj:
                    examples.append(ex)
                    continue
                answers = _need(obj, "answers", dict, where)
                texts = _need(answers, "text", list, where + " (answers)")
                starts = _need(answers, "answer_start", list, where + " (answers)")
                if len(texts) != len(starts):
                    raise DataError(f"{where}: answers has {len(texts)} texts but {len(starts)} answer_start")
                for t, s in zip(texts, starts):
                    if not isinstance(t, str) or not isinstance(s, int) or isinstance(s, bool):
                        raise DataError(f"{where}: answers need string texts and integer answer_start")
                    if s < 0 or ex["context"][s:s + len(t)] != t:
                        raise DataError(f"{where}: answer_start {s} does not point at the answer {t!r} "
                                        f"in the context")
                ex["answers"] = {"text": list(texts), "answer_start": list(starts)}
            elif task == "choice":
                ex["question"] = _need(obj, "question", str, where)
                choices = _need(obj, "choices", list, where)
                if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                    raise DataError(f"{where}: 'choices' should be a list of at least two strings")
                ex["choices"] = choices
                if not require_labels and "label" not in obj:
                    examples.append(ex)
                    continue
                label = _need(obj, "label", (int, str), where)
                if isinstance(label, str):
                    if label not in choices:
                        raise DataError(f"{where}: label {label!r} is not one of the choices")
                    label = choices.index(label)
                if not 0 <= label < len(choices):
                    raise DataError(f"{where}: label {label} is out of range for {len(choices)} choices")
                ex["label"] = label
            else:
                raise ValueError(f"read_jsonl: task {task!r} is not a JSONL task")
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no examples (only blank lines)")
    _all_or_none(examples, task, path)
    return examples


def read_conll(path: str, require_labels: bool = True) -> list[dict]:
    """Sentences of a CoNLL file as {"words", "tags", "_where", "_lines"} (where = the sentence's first
    line; _lines = each token's line). require_labels=False: a line may be the token alone, on every
    line of the file or on none; such sentences have no "tags"."""
    sentences, words, tags, lines = [], [], [], []
    tagged = None  # whether the file's lines carry tags, as its first token line says
    with _open_nonempty(path) as f:
        path = _name(path)
        for lineno, line in _lines(f, path):
            line = line.rstrip("\r\n")
            if not line.strip():
                if words:
                    sentences.append({"words": words, "tags": tags, "_where": f"{path}:{lines[0]}",
                                      "_lines": lines})
                words, tags, lines = [], [], []
                continue
            if line.startswith("-DOCSTART-"):
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                parts = line.split()
            if not require_labels and len(parts) == 1:
                parts.append(None)
            if len(parts) != 2 or not parts[0] or parts[1] == "":
                raise DataError(f"{path}:{lineno}: expected 'token<TAB>tag'"
                                f"{'' if require_labels else ' or a token alone'}, got {line!r}")
            if tagged is None:
                tagged, first = parts[1] is not None, lineno
            elif tagged != (parts[1] is not None):
                raise DataError(f"{path}:{lineno}: {'lacks' if tagged else 'has'} a tag, unlike line {first}: "
                                f"give every token its tag, or none")
            if tagged:
                try:
                    _split_tag(parts[1])
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: {e}") from None
            lines.append(lineno)
            words.append(parts[0])
            tags.append(parts[1])
    if words:
        sentences.append({"words": words, "tags": tags, "_where": f"{path}:{lines[0]}", "_lines": lines})
    if not sentences:
        raise DataError(f"{path}: no sentences")
    if not tagged:
        for s in sentences:
            del s["tags"]
    return sentences


def read_examples(task: str, path: str, require_labels: bool = True) -> list[dict]:
    """The examples of a file of `task` (require_labels=False: labels may be absent, see read_jsonl)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return read_conll(path, require_labels) if task == "ner" else read_jsonl(path, task, require_labels)


# -------------------------------------------------------------------------------------- label sets

def _label_key(v):
    return (0, v, "") if isinstance(v, int) else (1, 0, v)


def build_label_list(task: str, examples: Sequence[dict]) -> list | None:
    """Labels of the training file, in a fixed order: sorted values (ints numerically); for NER "O"
    first, then each type's B- and I- tags. None for qa and choice, which have no label set."""
    if task in ("classify", "pair"):
        return sorted({ex["label"] for ex in examples}, key=_label_key)
    if task == "ner":
        tags = {t for ex in examples for t in ex["tags"]}
        tags.discard("O")
        return ["O"] + sorted(tags, key=lambda t: (t[2:], t[0]))
    return None


def check_labels(task: str, examples: Sequence[dict], labels: Sequence | None, path: str,
                 label_file: str | None = None, model_dir: str | None = None) -> None:
    """Raise DataError naming the line of the first label the model was not trained on: one outside
    the training file's labels, or outside `label_file`'s (--labels FILE) when it gave them, or
    (model_dir: a fine-tuned model's, for fastbert predict) outside that model's."""
    if labels is None:
        return
    known = set(labels)
    for ex in examples:
        seen = ex["tags"] if task == "ner" else [ex["label"]]
        for k, lab in enumerate(seen):
            if lab not in known:
                where = f"{path}:{ex['_lines'][k]}" if "_lines" in ex else ex["_where"]
                if model_dir is not None:
                    raise DataError(f"{where}: label {lab!r} is not one of the labels {model_dir} was fine-tuned "
                                    f"on ({sorted(map(str, known))})")
                if label_file is not None:
                    raise DataError(f"{where}: label {lab!r} is not listed in --labels {label_file} "
                                    f"(it lists {sorted(map(str, known))})")
                raise DataError(f"{where}: label {lab!r} does not occur in the training file "
                                f"(known labels: {sorted(map(str, known))}); --labels FILE gives the "
                                f"full label set when a shortened training file lacks some")


# ------------------------------------------------------------------------------------- tokenizer

def load_tokenizer(model_dir: str, needed_for: str = "fine-tuning", vocab_size: int | None = None):
    """A `tokenizers.Tokenizer` for a checkpoint folder: tokenizer.json if present, else a BERT
    WordPiece tokenizer over vocab.txt with the normaliser options of tokenizer_config.json
    (do_lower_case, strip_accents, tokenize_chinese_chars; lower-cased when it says nothing), as
    transformers' BertTokenizer reads them. Padding and truncation are switched off: this module
    does both itself. needed_for: what the errors say the tokens are needed for. vocab_size: the
    model's word-embedding rows, which every token id must be below (a ValueError here, not an
    input-id error in the middle of a run)."""
    from tokenizers import Tokenizer

    from .tokenization import CLS, SEP, UNK, load_vocab_txt

    tj = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(tj):
        try:
            tok = Tokenizer.from_file(tj)
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{tj}: not a readable tokenizer file ({e})") from None
    else:
        vocab = os.path.join(model_dir, "vocab.txt")
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"{model_dir}: neither tokenizer.json nor vocab.txt found")
        # fine-tuning and encoding need no [MASK] / [PAD] token of the vocabulary
        tok = load_vocab_txt(vocab, required=(UNK, CLS, SEP), needed_for=needed_for)
    # the vocabulary's own tokens (an empty one, from a blank line of vocab.txt, is never produced; added
    # tokens past the model's rows fail only where a text holds them, as in transformers)
    top = max((i for t, i in tok.get_vocab(with_added_tokens=False).items() if t.strip()), default=-1)
    if vocab_size is not None and top >= vocab_size:
        raise ValueError(f"the tokenizer has token ids up to {top}, but the model has {vocab_size} word embeddings: "
                         f"the folder's tokenizer files are not its model's")
    tok.no_padding()
    tok.no_truncation()
    return tok


def copy_tokenizer_files(src: str, dst: str) -> None:
    """Copy src's tokenizer files into dst; a tokenizer file in dst that src lacks (an earlier run's)
    is removed, so that load_tokenizer(dst) gives src's tokenizer."""
    from .tokenization import TOKENIZER_FILES
    from .trainer import atomic_copy
    if os.path.abspath(src) == os.path.abspath(dst):
        return
    for name in TOKENIZER_FILES:
        p, q = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isfile(p):
            atomic_copy(p, q)  # finetune copies at every better epoch: an interrupted copy keeps the last
        elif os.path.isfile(q):
            os.unlink(q)


def _special_id(tok, token: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise ValueError(f"the tokenizer has no {token} token")
    return i


# -------------------------------------------------------------------------------------- features

def _encode_truncated(tok, firsts, seconds, max_length, pretokenized=False):
    """encode_batch with longest-first truncation to max_length; returns (encodings, n_truncated)."""
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    try:
        inputs = list(firsts) if seconds is None else list(zip(firsts, seconds))
        encs = tok.encode_batch(inputs, is_pretokenized=pretokenized)
    finally:
        tok.no_truncation()
    return encs, sum(1 for e in encs if e.overflowing)


def build_features(task: str, examples: Sequence[dict], tok, max_length: int = 128,
                   label2id: dict | None = None, doc_stride: int | None = None,
                   max_query_length: int = 64) -> tuple[list[dict], dict]:
    """Tokenise examples into features; returns (features, info) with info["truncated"] = how many
    examples were cut (qa: how many contexts needed more than one window).

    Every feature has input_ids and token_type_ids (choice: one list per choice) and, where the
    example has one, its label (`labels`; ner: one per token, -100 except on each word's first
    sub-token; qa: start_positions / end_positions, 0 = [CLS] when the answer is not in the
    window). Each feature keeps `example` = the index of its example.
    """
    if max_length < 8:
        raise ValueError(f"max_length {max_length} is too small (at least 8)")
    feats: list[dict] = []
    if task in ("classify", "pair"):
        firsts = [ex["text"] if task == "classify" else ex["text_a"] for ex in examples]
        seconds = None if task == "classify" else [ex["text_b"] for ex in examples]
        encs, n_trunc = _encode_truncated(tok, firsts, seconds, max_length)
        for i, (ex, e) in enumerate(zip(examples, encs)):
            f = {"example": i, "input_ids": e.ids, "token_type_ids": e.type_ids}
            if label2id is not None:
                f["labels"] = label2id[ex["label"]]
            feats.append(f)
        return feats, {"truncated": n_trunc}

    if task == "ner":
        encs, n_trunc = _encode_truncated(tok, [ex["words"] for ex in examples], None, max_length,
                                          pretokenized=True)
        for i, (ex, e) in enumerate(zip(examples, encs)):
            labels, first_token = [], {}
            for pos, w in enumerate(e.word_ids):
                if w is not None and w not in first_token:
                    first_token[w] = pos
                    labels.append(label2id[ex["tags"][w]] if label2id is not None else -100)
                else:
                    labels.append(-100)
            feats.append({"example": i, "input_ids": e.ids, "token_type_ids": e.type_ids,
                          "labels": labels, "word_starts": first_token})
        return feats, {"truncated": n_trunc}

    if task == "choice":
        n_trunc = 0
        for i, ex in enumerate(examples):
            encs, t = _encode_truncated(tok, [ex["question"]] * len(ex["choices"]), ex["choices"], max_length)
            n_trunc += bool(t)
            f = {"example": i, "input_ids": [e.ids for e in encs],
                 "token_type_ids": [e.type_ids for e in encs]}
            if "label" in ex:
                f["labels"] = ex["label"]
            feats.append(f)
        return feats, {"truncated": n_trunc}

    if task == "qa":
        return _qa_features(examples, tok, max_length, doc_stride, max_query_length)
    raise ValueError(f"unknown task {task!r}")


def qa_windows(n_tokens: int, budget: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token windows of at most `budget` tokens covering 0..n_tokens, consecutive windows
    sharing `overlap` tokens (the last window may share more, never fewer)."""
    if budget <= 0:
        raise ValueError("no room left for the context: the question is as long as max_length")
    if not 0 <= overlap < budget:
        raise ValueError(f"doc_stride {overlap} must be smaller than the context room {budget}")
    windows, start = [], 0
    while True:
        end = min(start + budget, n_tokens)
        windows.append((start, end))
        if end >= n_tokens:
            return windows
        start = end - overlap


def char_span_to_tokens(offsets: Sequence[tuple[int, int]], start_char: int, end_char: int):
    """First and last token (inclusive) overlapping characters [start_char, end_char)."""
    first = last = None
    for i, (s, e) in enumerate(offsets):
        if e > start_char and s < end_char:
            if first is None:
                first = i
            last = i
    if first is None:
        raise ValueError(f"no token covers characters [{start_char}, {end_char})")
    return first, last


def _qa_features(examples, tok, max_length, doc_stride, max_query_length):
    cls_id, sep_id = _special_id(tok, "[CLS]"), _special_id(tok, "[SEP]")
    if doc_stride is None:
        doc_stride = max_length // 4
    feats, n_split, n_q_trunc = [], 0, 0
    q_encs = tok.encode_batch([ex["question"] for ex in examples], add_special_tokens=False)
    c_encs = tok.encode_batch([ex["context"] for ex in examples], add_special_tokens=False)
    for i, (ex, qe, ce) in enumerate(zip(examples, q_encs, c_encs)):
        q_limit = max_query_length
        if min(len(qe.ids), q_limit) > max_length - 4:  # it would leave the context no room:
            q_limit = (max_length - 3) // 2              # cut it to half the room instead
        q_ids = qe.ids[:q_limit]
        n_q_trunc += len(qe.ids) > q_limit
        budget = max_length - len(q_ids) - 3
        windows = qa_windows(len(ce.ids), budget, min(doc_stride, budget - 1))
        n_split += len(windows) > 1
        answer = None
        if ex.get("answers") and ex["answers"]["text"]:
            s = ex["answers"]["answer_start"][0]
            try:
                answer = char_span_to_tokens(ce.offsets, s, s + len(ex["answers"]["text"][0]))
            except ValueError as e:  # a blank answer, or one of characters the tokenizer drops
                raise DataError(f"{ex.get('_where', f'example {i}')}: the answer "
                                f"{ex['answers']['text'][0]!r} has no token ({e})") from None
        for ws, we in windows:
            ids = [cls_id] + q_ids + [sep_id] + ce.ids[ws:we] + [sep_id]
            types = [0] * (len(q_ids) + 2) + [1] * (we - ws + 1)
            ctx0 = len(q_ids) + 2  # position of the window's first context token
            offsets = [None] * ctx0 + list(ce.offsets[ws:we]) + [None]
            f = {"example": i, "input_ids": ids, "token_type_ids": types, "offsets": offsets}
            if "answers" in ex:  # [CLS] when the answer is not in this window or there is none
                f["start_positions"] = f["end_positions"] = 0
                if answer is not None and answer[0] >= ws and answer[1] < we:
                    f["start_positions"], f["end_positions"] = ctx0 + answer[0] - ws, ctx0 + answer[1] - ws
            feats.append(f)
    return feats, {"truncated": n_split, "questions_truncated": n_q_trunc}


def qa_best_spans(examples: Sequence[dict], features: Sequence[dict], start_logits, end_logits,
                  n_best: int = 20, max_answer_tokens: int = 30, null_answers: bool = False) -> list[str]:
    """The best answer text of each example over all its windows (score = start + end logit),
    mapped back to the context's characters through the tokenizer's offsets. A span must lie in the
    context part of one window and end at or after its start.

    null_answers (a model trained on questions without an answer, SQuAD 2.0 style: their target is
    [CLS]): "" where [CLS]'s score (start + end logit at position 0, the lowest over the example's
    windows, as SQuAD 2.0's post-processing takes it) beats the best span."""
    best: list[tuple[float, str]] = [(-math.inf, "")] * len(examples)
    null = [math.inf] * len(examples)
    for f, sl, el in zip(features, start_logits, end_logits):
        sl, el = list(map(float, sl)), list(map(float, el))
        null[f["example"]] = min(null[f["example"]], sl[0] + el[0])
        offs = f["offsets"]
        ctx = [j for j, o in enumerate(offs) if o is not None and j < len(sl)]
        starts = sorted(ctx, key=lambda j: -sl[j])[:n_best]
        ends = sorted(ctx, key=lambda j: -el[j])[:n_best]
        i = f["example"]
        for s in starts:
            for e in ends:
                if e < s or e - s + 1 > max_answer_tokens:
                    continue
                score = sl[s] + el[e]
                if score > best[i][0]:
                    context = examples[i]["context"]
                    best[i] = (score, context[offs[s][0]:offs[e][1]])
    if null_answers:
        return ["" if n > score else text for n, (score, text) in zip(null, best)]
    return [text for _, text in best]


# --------------------------------------------------------------------------------------- batches

def length_of(feature: dict) -> int:
    ids = feature["input_ids"]
    return max(map(len, ids)) if ids and isinstance(ids[0], list) else len(ids)


def bucket_batches(lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0,
                   bucket_factor: int = 50) -> list[list[int]]:
    """Batches of indices that group similar lengths, so padding to each batch's longest costs
    little. Training: shuffle, sort within chunks of batch_size * bucket_factor, cut, shuffle the
    batches. Evaluation: sort everything by length."""
    idx = list(range(len(lengths)))
    if not shuffle:
        idx.sort(key=lambda i: lengths[i])
        return [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(idx)
    chunk = batch_size * bucket_factor
    batches = []
    for c in range(0, len(idx), chunk):
        part = sorted(idx[c:c + chunk], key=lambda i: lengths[i])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Shuffled consecutive batches, as transformers' Trainer draws them by default."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return [idx[k:k + batch_size] for k in range(0, n, batch_size)]


def collate(features: Sequence[dict], pad_id: int = 0, length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence (or to `length`): input_ids, token_type_ids, attention_mask and
    the label tensors present (labels / start_positions / end_positions); ner labels are padded with -100."""
    multi = isinstance(features[0]["input_ids"][0], list)
    longest = max(length_of(f) for f in features) if length is None else length

    def pad(seq, value):
        return list(seq) + [value] * (longest - len(seq))

    if multi:
        ids = [[pad(s, pad_id) for s in f["input_ids"]] for f in features]
        types = [[pad(s, 0) for s in f["token_type_ids"]] for f in features]
        mask = [[pad([1] * len(s), 0) for s in f["input_ids"]] for f in features]
    else:
        ids = [pad(f["input_ids"], pad_id) for f in features]
        types = [pad(f["token_type_ids"], 0) for f in features]
        mask = [pad([1] * len(f["input_ids"]), 0) for f in features]
    batch = {"input_ids": torch.tensor(ids, dtype=torch.long),
             "token_type_ids": torch.tensor(types, dtype=torch.long),
             "attention_mask": torch.tensor(mask, dtype=torch.long)}
    if "labels" in features[0]:
        if isinstance(features[0]["labels"], list):
            batch["labels"] = torch.tensor([pad(f["labels"], -100) for f in features], dtype=torch.long)
        else:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    for k in ("start_positions", "end_positions"):
        if k in features[0]:
            batch[k] = torch.tensor([f[k] for f in features], dtype=torch.long)
    return batch
