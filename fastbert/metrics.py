"""Evaluation metrics for fine-tuning: accuracy, entity-level F1 for BIO tags, SQuAD EM / token F1.

Entity F1 counts chunks the way conlleval (and seqeval's default, non-strict mode) does:
- a chunk starts at B-X, at I-X after O or after a tag of another type (an I- without a B- opens
  a chunk), and at B-X right after I-X / B-X;
- a chunk ends before O, before B-, before a tag of another type, and at the end of the sentence;
- a predicted chunk counts as correct only if its type, first and last token all match a gold chunk.
Tags other than B-/I-/O (e.g. E-, S- of BIOES) are not supported and raise ValueError.

SQuAD metrics follow the official v1.1 evaluation script: lower-case, drop punctuation, drop the
articles a/an/the, collapse whitespace; each prediction is scored against every gold answer and the
best score is kept. An empty normalised answer only matches another empty one (as in v2.0).
"""
from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Sequence

__all__ = ["accuracy", "bio_entities", "entity_f1", "normalize_answer", "exact_match_score",
           "token_f1_score", "squad_scores"]


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"accuracy: {len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy of an empty set is undefined")
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def _split_tag(tag: str):
    if tag == "O":
        return "O", ""
    if len(tag) >= 2 and tag[1] == "-" and tag[0] in "BI":
        return tag[0], tag[2:]
    raise ValueError(f"tag {tag!r} is not O, B-TYPE or I-TYPE")


def bio_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The chunks of one sentence as (type, first, last) with inclusive token indices."""
    chunks = []
    start, cur_type = None, None
    for i, tag in enumerate(tags):
        prefix, typ = _split_tag(tag)
        # does the open chunk end before token i?
        if start is not None and (prefix in ("O", "B") or typ != cur_type):
            chunks.append((cur_type, start, i - 1))
            start, cur_type = None, None
        if prefix != "O" and start is None:
            start, cur_type = i, typ
    if start is not None:
        chunks.append((cur_type, start, len(tags) - 1))
    return chunks


def entity_f1(gold: Iterable[Sequence[str]], pred: Iterable[Sequence[str]]) -> dict:
    """Micro precision / recall / F1 over exact chunks, summed over sentences.

    `gold` and `pred` are lists of sentences, each a list of tags of the same length. With no
    predicted chunks precision is 0; with no gold chunks recall is 0 (conlleval's convention).
    """
    gold, pred = list(gold), list(pred)
    if len(gold) != len(pred):
        raise ValueError(f"entity_f1: {len(pred)} predicted sentences for {len(gold)} gold ones")
    n_gold = n_pred = n_correct = 0
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"entity_f1: sentence {i} has {len(g)} gold tags but {len(p)} predicted")
        gs, ps = set(bio_entities(g)), set(bio_entities(p))
        n_gold += len(gs)
        n_pred += len(ps)
        n_correct += len(gs & ps)
    precision = n_correct / n_pred if n_pred else 0.0
    recall = n_correct / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "n_gold": n_gold, "n_pred": n_pred, "n_correct": n_correct}


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1_score(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], gold_answers: Sequence[Sequence[str]]) -> dict:
    """Mean exact match and token F1 (fractions); each prediction takes its best gold answer."""
    if len(predictions) != len(gold_answers):
        raise ValueError(f"squad_scores: {len(predictions)} predictions for {len(gold_answers)} questions")
    if not predictions:
        raise ValueError("squad_scores of an empty set is undefined")
    em = f1 = 0.0
    for p, golds in zip(predictions, gold_answers):
        # as the official SQuAD 2.0 script: gold answers that normalise to nothing ("the", "!") are
        # dropped, and a question left without any is unanswerable (only "" matches it)
        golds = [g for g in golds if normalize_answer(g)] or [""]
        em += max(exact_match_score(p, g) for g in golds)
        f1 += max(token_f1_score(p, g) for g in golds)
    return {"exact_match": em / len(predictions), "f1": f1 / len(predictions)}
