"""Readers, label sets, features, QA windows and span decoding on hand-checked cases."""
import json

import pytest
import torch

from fastbert.tasks import (DataError, build_features, build_label_list, bucket_batches, char_span_to_tokens,
                            check_labels, collate, load_tokenizer, qa_best_spans, qa_windows, read_examples)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "near", "big",
         "red", "door", "where", "is", "it", "##s", "good", "bad", "movie", ".", "?", "a", "b"]


@pytest.fixture
def tok(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return load_tokenizer(str(tmp_path))


def write(path, lines):
    path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return str(path)


def jl(*objs):
    return [json.dumps(o) for o in objs]


# ----------------------------------------------------------------------------------------- readers

def test_read_classify_and_labels(tmp_path):
    p = write(tmp_path / "t.jsonl", jl({"text": "good", "label": 1}, {"text": "bad", "label": 0}) + [""])
    ex = read_examples("classify", p)
    assert [e["text"] for e in ex] == ["good", "bad"]
    assert build_label_list("classify", ex) == [0, 1]
    assert ex[1]["_where"] == f"{p}:2"


@pytest.mark.parametrize("lines, message", [
    (['{"text": "x"}'], r"t.jsonl:1: missing field 'label'"),
    (['{"text": "x", "label": 0}', '{"label": 0}'], r"t.jsonl:2: missing field 'text'"),
    (['{"text": 3, "label": 0}'], r"t.jsonl:1: field 'text' should be str"),
    (['{"text": "x", "label": 0}', "{oops"], r"t.jsonl:2: invalid JSON"),
    (["[1, 2]"], r"t.jsonl:1: expected a JSON object"),
    ([""], r"no examples"),
])
def test_classify_errors_name_file_and_line(tmp_path, lines, message):
    p = write(tmp_path / "t.jsonl", lines)
    with pytest.raises(DataError, match=message):
        read_examples("classify", p)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="e.jsonl: the file is empty"):
        read_examples("classify", str(tmp_path / "e.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        read_examples("ner", str(tmp_path / "missing.conll"))


def test_undecodable_lines_folders_and_byte_order_marks(tmp_path):
    """A line that is not UTF-8 is an error naming its file and line (it was a UnicodeDecodeError
    traceback), a folder is said to be one, and a UTF-8 byte-order mark (Windows editors) is read past."""
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok", "label": 1}\n{"text": "\xff", "label": 0}\n')
    with pytest.raises(DataError, match=r"b.jsonl:2: not UTF-8 text"):
        read_examples("classify", str(tmp_path / "b.jsonl"))
    (tmp_path / "b.conll").write_bytes(b"w\tO\nx\xff\tO\n")
    with pytest.raises(DataError, match=r"b.conll:2: not UTF-8 text"):
        read_examples("ner", str(tmp_path / "b.conll"))
    with pytest.raises(DataError, match="is a folder"):
        read_examples("classify", str(tmp_path))
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9", "label": 1}\r\n')
    assert [(ex["text"], ex["label"]) for ex in read_examples("classify", str(tmp_path / "bom.jsonl"))] == [("café", 1)]
    (tmp_path / "bom.conll").write_bytes(b"\xef\xbb\xbfParis\tB-LOC\r\nis\tO\r\n")
    assert read_examples("ner", str(tmp_path / "bom.conll"))[0]["words"] == ["Paris", "is"]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_every_line_ending_splits_lines(tmp_path, eol):
    """\n, \r\n and a lone \r (old Mac editors) all end a line, as in text mode, and line numbers in
    errors count them the same way."""
    (tmp_path / "a.jsonl").write_bytes(eol.join([b'{"text": "a", "label": 1}', b'{"text": "b", "label": 0}', b""]))
    assert [ex["text"] for ex in read_examples("classify", str(tmp_path / "a.jsonl"))] == ["a", "b"]
    (tmp_path / "a.conll").write_bytes(eol.join([b"Paris\tB-LOC", b"is\tO", b"", b"Rome\tB-LOC", b""]))
    assert [s["words"] for s in read_examples("ner", str(tmp_path / "a.conll"))] == [["Paris", "is"], ["Rome"]]
    (tmp_path / "bad.conll").write_bytes(eol.join([b"Paris\tB-LOC", b"", b"is O extra", b""]))
    with pytest.raises(DataError, match=r"bad.conll:3: expected"):
        read_examples("ner", str(tmp_path / "bad.conll"))


def test_unknown_label_names_line(tmp_path):
    train = read_examples("pair", write(tmp_path / "a.jsonl", jl({"text_a": "a", "text_b": "b", "label": "yes"})))
    p = write(tmp_path / "b.jsonl", jl({"text_a": "a", "text_b": "b", "label": "yes"},
                                      {"text_a": "a", "text_b": "b", "label": "maybe"}))
    with pytest.raises(DataError, match=r"b.jsonl:2: label 'maybe' does not occur"):
        check_labels("pair", read_examples("pair", p), build_label_list("pair", train), p)


def test_read_conll(tmp_path):
    p = write(tmp_path / "n.conll", ["the\tO", "red\tB-thing", "door\tI-thing", "", "", "cat\tB-animal", ""])
    ex = read_examples("ner", p)
    assert [e["words"] for e in ex] == [["the", "red", "door"], ["cat"]]
    assert ex[1]["_where"] == f"{p}:6"
    assert build_label_list("ner", ex) == ["O", "B-animal", "B-thing", "I-thing"]
    bad = write(tmp_path / "bad.conll", ["the\tO", "red"])
    with pytest.raises(DataError, match=r"bad.conll:2: expected 'token<TAB>tag'"):
        read_examples("ner", bad)
    bad = write(tmp_path / "bad2.conll", ["the\tO", "red\tX-thing"])
    with pytest.raises(DataError, match=r"bad2.conll:2: tag 'X-thing'"):
        read_examples("ner", bad)


def test_read_qa_and_choice(tmp_path):
    ctx = "the cat sat"
    p = write(tmp_path / "q.jsonl", jl({"question": "where", "context": ctx,
                                        "answers": {"text": ["cat"], "answer_start": [4]}}))
    assert read_examples("qa", p)[0]["answers"]["answer_start"] == [4]
    p = write(tmp_path / "q2.jsonl", jl({"question": "where", "context": ctx,
                                         "answers": {"text": ["cat"], "answer_start": [5]}}))
    with pytest.raises(DataError, match=r"q2.jsonl:1: answer_start 5 does not point at the answer"):
        read_examples("qa", p)
    p = write(tmp_path / "c.jsonl", jl({"question": "q", "choices": ["a", "b"], "label": "b"},
                                       {"question": "q", "choices": ["a", "b"], "label": 2}))
    with pytest.raises(DataError, match=r"c.jsonl:2: label 2 is out of range"):
        read_examples("choice", p)


# -------------------------------------------------------------------------------------- features

def test_classify_features_truncate(tok):
    ex = [{"text": "the cat sat on the mat near", "label": "x"}, {"text": "cat", "label": "y"}]
    feats, info = build_features("classify", ex, tok, max_length=8, label2id={"x": 0, "y": 1})
    assert info["truncated"] == 1
    assert feats[0]["input_ids"] == [2, 5, 6, 7, 8, 5, 9, 3]          # exactly 8, ends in [SEP]
    assert feats[1]["input_ids"] == [2, 6, 3] and feats[1]["labels"] == 1


def test_pair_features_token_types(tok):
    feats, _ = build_features("pair", [{"text_a": "cat", "text_b": "red door", "label": 0}], tok,
                              label2id={0: 0})
    assert feats[0]["input_ids"] == [2, 6, 3, 12, 13, 3]
    assert feats[0]["token_type_ids"] == [0, 0, 0, 1, 1, 1]


def test_ner_labels_first_subtoken_only(tok):
    ex = [{"words": ["The", "mats", "red"], "tags": ["O", "B-x", "I-x"]}]
    label2id = {"O": 0, "B-x": 1, "I-x": 2}
    feats, _ = build_features("ner", ex, tok, label2id=label2id)
    # [CLS] the mat ##s red [SEP]
    assert feats[0]["input_ids"] == [2, 5, 9, 17, 12, 3]
    assert feats[0]["labels"] == [-100, 0, 1, -100, 2, -100]
    assert feats[0]["word_starts"] == {0: 1, 1: 2, 2: 4}


def test_qa_windows_cover_with_overlap():
    assert qa_windows(11, 6, 2) == [(0, 6), (4, 10), (8, 11)]
    assert qa_windows(5, 6, 2) == [(0, 5)]
    assert qa_windows(6, 6, 0) == [(0, 6)]
    with pytest.raises(ValueError):
        qa_windows(10, 4, 4)


def test_char_span_to_tokens():
    offsets = [(0, 3), (4, 7), (7, 8), (9, 12)]       # "the mat s red" -> mat ##s
    assert char_span_to_tokens(offsets, 4, 8) == (1, 2)
    assert char_span_to_tokens(offsets, 5, 6) == (1, 1)   # inside one token
    assert char_span_to_tokens(offsets, 9, 12) == (3, 3)


def test_qa_answer_across_window_boundary(tok):
    #          0   1   2   3  4   5   6    7   8   9   10
    context = "the cat sat on the mat near the big red door"
    s = context.index("mat near")
    ex = [{"question": "where", "context": context, "answers": {"text": ["mat near"], "answer_start": [s]}}]
    # question = 1 token, so the room for context = 10 - 1 - 3 = 6 tokens; overlap 2
    feats, info = build_features("qa", ex, tok, max_length=10, doc_stride=2)
    assert info["truncated"] == 1
    assert len(feats) == 3 and all(len(f["input_ids"]) <= 10 for f in feats)
    # window 0 covers tokens 0..5: 'mat'(5) is in it, 'near'(6) is not -> labelled [CLS]
    assert (feats[0]["start_positions"], feats[0]["end_positions"]) == (0, 0)
    # window 1 covers tokens 4..9; context starts at position 3 ([CLS] where [SEP])
    f = feats[1]
    assert f["input_ids"][:3] == [2, 14, 3] and f["input_ids"][-1] == 3
    assert (f["start_positions"], f["end_positions"]) == (3 + 5 - 4, 3 + 6 - 4)
    assert f["input_ids"][f["start_positions"]] == 9 and f["input_ids"][f["end_positions"]] == 10
    assert f["token_type_ids"] == [0, 0, 0] + [1] * 7
    assert (feats[2]["start_positions"], feats[2]["end_positions"]) == (0, 0)


def test_qa_best_span_maps_back_to_characters(tok):
    context = "The cat sat on the MATS near the Big Red Door"
    ex = [{"question": "where", "context": context, "answers": {"text": ["x"], "answer_start": [0]}}]
    feats, _ = build_features("qa", ex, tok, max_length=10, doc_stride=2)
    # tokens: the cat sat on the mat ##s near the big red door = 12 context tokens
    # room 6, overlap 2 -> windows (0,6) (4,10) (8,12)
    assert len(feats) == 3

    def logits(f, start_tok, end_tok, hi):
        n = len(f["input_ids"])
        s, e = [0.0] * n, [0.0] * n
        s[start_tok], e[end_tok] = hi, hi
        return s, e

    # window 1 points at 'MATS' (tokens mat ##s, positions 3+5-4, 3+6-4); window 2 at 'Big Red Door'
    s1, e1 = logits(feats[1], 4, 5, 5.0)
    s2, e2 = logits(feats[2], 3 + 9 - 8, 3 + 11 - 8, 4.0)
    s0, e0 = logits(feats[0], 0, 0, 9.0)        # a high [CLS] score is never an answer
    out = qa_best_spans(ex, feats, [s0, s1, s2], [e0, e1, e2])
    assert out == ["MATS"]
    s2, e2 = logits(feats[2], 3 + 9 - 8, 3 + 11 - 8, 6.0)
    assert qa_best_spans(ex, feats, [s0, s1, s2], [e0, e1, e2]) == ["Big Red Door"]
    # an end before the start is never chosen
    s1, e1 = logits(feats[1], 5, 4, 50.0)
    assert qa_best_spans(ex, feats[1:2], [s1], [e1]) != ["MATS"]


def test_choice_features_and_collate(tok):
    ex = [{"question": "where is it", "choices": ["cat", "the big red door"], "label": 1}]
    feats, _ = build_features("choice", ex, tok)
    # question first (type 0), each choice second (type 1), as BertForMultipleChoice is trained
    assert feats[0]["input_ids"][1] == [2, 14, 15, 16, 3, 5, 11, 12, 13, 3]
    assert feats[0]["token_type_ids"][1] == [0] * 5 + [1] * 5
    batch = collate(feats)
    assert batch["input_ids"].shape == (1, 2, 10)
    assert batch["attention_mask"][0, 0].tolist() == [1] * 7 + [0] * 3
    assert batch["labels"].tolist() == [1]


def test_collate_pads_to_batch_longest_and_ner_labels_with_ignore():
    feats = [{"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 0], "labels": [-100, 1, -100]},
             {"input_ids": [2, 3], "token_type_ids": [0, 0], "labels": [-100, -100]}]
    b = collate(feats)
    assert b["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 1, -100], [-100, -100, -100]]
    assert b["input_ids"].dtype == torch.long


def test_bucket_batches():
    lengths = [5, 1, 9, 3, 7, 2, 8]
    ev = bucket_batches(lengths, 3, shuffle=False)
    assert ev == [[1, 5, 3], [0, 4, 6], [2]]
    tr = bucket_batches(lengths, 2, shuffle=True, seed=1, bucket_factor=100)
    assert sorted(i for b in tr for i in b) == list(range(7))
    for b in tr:   # one chunk holds everything, so each batch is a run of the sorted order
        order = sorted(range(7), key=lambda i: lengths[i])
        pos = sorted(order.index(i) for i in b)
        assert pos == list(range(pos[0], pos[0] + len(b)))
    assert tr == bucket_batches(lengths, 2, shuffle=True, seed=1, bucket_factor=100)


def test_random_batches_cover_every_example_once_in_a_seeded_order():
    from fastbert.tasks import random_batches
    a, b, c = (random_batches(70, 32, seed=s) for s in (1, 1, 2))
    assert [len(x) for x in a] == [32, 32, 6]
    assert sorted(i for x in a for i in x) == list(range(70))
    assert a == b and a != c


# ------------------------------------------------------------ regressions (session 13's bug hunt)

def test_ner_unknown_tag_names_its_own_line(tmp_path):
    p = write(tmp_path / "dev.conll", ["the\tO", "red\tO", "door\tB-new"])
    with pytest.raises(DataError, match=r"dev.conll:3: label 'B-new' does not occur"):
        check_labels("ner", read_examples("ner", p), ["O"], p)


@pytest.mark.parametrize("answers", [
    {"text": ["sa"], "answer_start": [-3]},    # "the cat sat"[-3:-1] == "sa", but -3 is no offset
    {"text": [" "], "answer_start": [3]},      # no token covers a blank answer
])
def test_qa_bad_answer_is_a_data_error_with_line(tmp_path, tok, answers):
    p = write(tmp_path / "q.jsonl", [json.dumps({"question": "where", "context": "the cat sat",
                                                 "answers": answers})])
    with pytest.raises(DataError, match=r"q.jsonl:1: "):
        build_features("qa", read_examples("qa", p), tok, max_length=16)


def test_qa_unanswerable_example_is_labelled_cls_and_batches(tmp_path, tok):
    # the reader accepts an empty answer list (SQuAD v2's unanswerable question); training on it
    # must label every window [CLS], as for an answer outside the window, not drop the labels
    p = write(tmp_path / "q.jsonl", [json.dumps(o) for o in (
        {"question": "where", "context": "the cat sat", "answers": {"text": ["cat"], "answer_start": [4]}},
        {"question": "where", "context": "the cat sat", "answers": {"text": [], "answer_start": []}})])
    feats, _ = build_features("qa", read_examples("qa", p), tok, max_length=16)
    assert (feats[1]["start_positions"], feats[1]["end_positions"]) == (0, 0)
    batch = collate(feats)                     # was KeyError: 'start_positions'
    assert batch["start_positions"].tolist() == [4, 0]


def test_qa_question_longer_than_max_length_is_cut_not_rejected(tok):
    # max_length 12 leaves 9 tokens for question + context; a 10-token question (under the 64-token
    # max_query_length) used to raise ValueError "no room left for the context" for the whole file.
    # Over-long input is truncated, never rejected: the question gives up tokens so the context has
    # room (half of it), and the answer is still found.
    question = " ".join(["where", "is", "it"] * 3 + ["where"])
    context = "the cat sat on the mat"
    ex = [{"question": question, "context": context, "answers": {"text": ["mat"], "answer_start": [19]}}]
    feats, info = build_features("qa", ex, tok, max_length=12, doc_stride=1)
    assert info["questions_truncated"] == 1
    assert all(len(f["input_ids"]) <= 12 for f in feats)
    hits = [f for f in feats if f["start_positions"]]
    assert hits and all(f["input_ids"][f["start_positions"]] == 9 for f in hits)
    q_len = feats[0]["token_type_ids"].index(1) - 2
    assert q_len == 4  # (12 - 3) // 2 for the question, 5 for each context window


# ------------------------------------------------------------------- mutation audit (session 14)

def test_label_lists_have_a_fixed_documented_order():
    """Label ids are positions in build_label_list: classify/pair labels sorted (ints numerically,
    so 10 after 2), NER "O" first then each type's B- and I- tags together, types sorted."""
    assert build_label_list("classify", [{"label": v} for v in (10, 2, 1, 2)]) == [1, 2, 10]
    assert build_label_list("pair", [{"label": v} for v in ("b", "a", "c")]) == ["a", "b", "c"]
    tags = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"], ["I-MISC", "B-LOC"]]
    assert build_label_list("ner", [{"tags": t} for t in tags]) == [
        "O", "B-LOC", "I-LOC", "I-MISC", "B-PER", "I-PER"]


@pytest.mark.parametrize("lines, words", [
    (["-DOCSTART- -X- -X- O", "", "the\tO", "cat\tB-animal"], [["the", "cat"]]),   # CoNLL-2003 header
    (["New York\tB-LOC", "is\tO"], [["New York", "is"]]),  # a tab separates: a token may hold a space
    (["the O", "cat B-animal"], [["the", "cat"]]),            # whitespace when there is no tab
])
def test_read_conll_separators_and_docstart(tmp_path, lines, words):
    ex = read_examples("ner", write(tmp_path / "n.conll", lines))
    assert [e["words"] for e in ex] == words


def test_qa_default_doc_stride_is_a_quarter_of_max_length(tok):
    """Without doc_stride, consecutive windows overlap by max_length // 4 tokens."""
    context = " ".join(["the cat sat on the mat near the big red door"] * 3)   # 33 tokens
    ex = [{"question": "where", "context": context}]
    feats, _ = build_features("qa", ex, tok, max_length=16)
    # room = 16 - 1 - 3 = 12 tokens; overlap 16 // 4 = 4 -> windows start at 0, 8, 16, 24
    starts = [next(o for o in f["offsets"] if o is not None)[0] for f in feats]
    token_starts = [o[0] for o in tok.encode(context, add_special_tokens=False).offsets]
    assert [token_starts.index(c) for c in starts] == [0, 8, 16, 24]


@pytest.mark.parametrize("q_tokens", [4, 5, 6, 7, 8, 9, 10])
def test_qa_question_near_max_length_leaves_the_context_room(tok, q_tokens):
    """max_length 12: a question of up to 8 tokens is kept whole (one context token per window);
    a longer one is cut to (12 - 3) // 2 = 4 tokens, never refused, and it keeps its first tokens."""
    words = ["where", "is", "it", "the", "big", "red", "door", "cat", "sat", "mat"][:q_tokens]
    ex = [{"question": " ".join(words), "context": "the cat sat on the mat",
           "answers": {"text": ["mat"], "answer_start": [19]}}]
    feats, info = build_features("qa", ex, tok, max_length=12, doc_stride=0)
    kept = q_tokens if q_tokens <= 8 else 4
    assert info["questions_truncated"] == (q_tokens > 8)
    ids = [tok.token_to_id(w) for w in words]
    assert all(f["input_ids"][1:kept + 1] == ids[:kept] and f["input_ids"][kept + 1] == 3 for f in feats)
    assert any(f["start_positions"] for f in feats) and all(len(f["input_ids"]) <= 12 for f in feats)


def test_qa_max_query_length_keeps_the_questions_first_tokens(tok):
    ex = [{"question": "where is it the big red door", "context": "the cat sat"}]
    feats, info = build_features("qa", ex, tok, max_length=32, max_query_length=3)
    assert info["questions_truncated"] == 1
    assert feats[0]["input_ids"][:5] == [2, 14, 15, 16, 3]


def test_qa_answer_at_the_first_context_token_of_a_window(tok):
    """An answer starting at a window's first context token is inside that window (the first window
    and a later one)."""
    context = "the cat sat on the mat near the big red door"
    for answer, window in (("the cat", 0), ("the mat", 1)):
        s = context.index(answer)
        ex = [{"question": "where", "context": context, "answers": {"text": [answer], "answer_start": [s]}}]
        feats, _ = build_features("qa", ex, tok, max_length=10, doc_stride=2)  # windows (0,6) (4,10) (8,11)
        f = feats[window]
        assert (f["start_positions"], f["end_positions"]) == (3, 4), answer


def test_qa_best_span_single_token_and_max_answer_tokens(tok):
    """A one-token answer (end == start) is a valid span; a span of exactly max_answer_tokens is
    allowed and one token more is not."""
    context = "the cat sat on the mat"
    ex = [{"question": "where", "context": context}]
    feats, _ = build_features("qa", ex, tok, max_length=16)
    n = len(feats[0]["input_ids"])

    def scores(start, end):
        s, e = [0.0] * n, [0.0] * n
        s[start], e[end] = 10.0, 10.0
        return [s], [e]

    # [CLS] where [SEP] the cat sat on the mat [SEP]: context tokens at positions 3..8
    assert qa_best_spans(ex, feats, *scores(4, 4)) == ["cat"]
    assert qa_best_spans(ex, feats, *scores(4, 6), max_answer_tokens=3) == ["cat sat on"]
    assert qa_best_spans(ex, feats, *scores(4, 6), max_answer_tokens=2) != ["cat sat on"]


def test_qa_null_answers_abstain_where_cls_wins(tok):
    """A model trained on unanswerable questions answers "" where [CLS]'s score (the lowest over the
    example's windows) beats its best span; without null_answers it always names a span, as for
    SQuAD 1.1 data, where [CLS] only marks windows that miss the answer."""
    context = "the big cat sat on the red mat near the door"
    ex = [{"question": "where", "context": context}, {"question": "where", "context": context}]
    feats, _ = build_features("qa", ex, tok, max_length=10, doc_stride=2)
    assert len({f["example"] for f in feats}) == 2 and len(feats) > 2  # several windows each
    starts, ends = [], []
    for f in feats:
        n = len(f["input_ids"])
        s, e = [-5.0] * n, [-5.0] * n
        first_window = f is next(g for g in feats if g["example"] == f["example"])
        if f["example"] == 0:  # certain there is no answer in every window
            s[0] = e[0] = 20.0
            s[3] = e[3] = 2.0
        else:  # a clear span in its first window; [CLS] high only where the span is missing
            s[0] = e[0] = 1.0 if first_window else 20.0
            if first_window:
                s[3] = e[3] = 8.0
        starts.append(s)
        ends.append(e)
    spans = qa_best_spans(ex, feats, starts, ends)
    assert spans[0] != "" and spans[1] != ""
    with_null = qa_best_spans(ex, feats, starts, ends, null_answers=True)
    assert with_null == ["", spans[1]]


def test_truncated_counts_examples_not_pieces(tok):
    """info["truncated"] counts truncated examples: one long text is one, however much is cut, and a
    choice example with several over-long choices is one."""
    long = " ".join(["the cat sat on the mat"] * 8)
    _, info = build_features("classify", [{"text": long, "label": "x"}], tok, max_length=8, label2id={"x": 0})
    assert info["truncated"] == 1
    ex = [{"question": "where is it", "choices": [long, long, "cat"], "label": 0}]
    _, info = build_features("choice", ex, tok, max_length=8)
    assert info["truncated"] == 1


def test_qa_best_span_looks_past_the_top_start(tok):
    """The best valid span is found among the n_best starts and ends, not only the top start (whose
    ends may all come before it)."""
    context = "the cat sat on the mat"
    ex = [{"question": "where", "context": context}]
    feats, _ = build_features("qa", ex, tok, max_length=16)
    n = len(feats[0]["input_ids"])
    s, e = [0.0] * n, [-5.0] * n
    s[8], s[4] = 10.0, 5.0     # top start 'mat' (8); 'cat' (4) second
    e[4] = 10.0                # top end 'cat' (4): only (4, 4) pairs well
    assert qa_best_spans(ex, feats, [s], [e]) == ["cat"]


def test_a_boolean_label_is_refused(tmp_path):
    p = write(tmp_path / "t.jsonl", ['{"text": "x", "label": true}'])
    with pytest.raises(DataError, match=r"t.jsonl:1: field 'label' should be str or int, got bool"):
        read_examples("classify", p)


# ------------------------------------------------------------- labels optional (fastbert predict)

LABELLED = {
    "classify": ({"text": "good", "label": 1}, "label"),
    "pair": ({"text_a": "good", "text_b": "bad", "label": "x"}, "label"),
    "qa": ({"question": "where ?", "context": "the mat", "answers": {"text": ["mat"], "answer_start": [4]}}, "answers"),
    "choice": ({"question": "it is", "choices": ["good", "bad"], "label": "bad"}, "label"),
}


@pytest.mark.parametrize("task", sorted(LABELLED))
def test_labels_optional_in_every_example_or_none(tmp_path, task):
    from fastbert.tasks import labelled
    row, field = LABELLED[task]
    bare = {k: v for k, v in row.items() if k != field}
    full = write(tmp_path / "full.jsonl", jl(row, row))
    with_labels = read_examples(task, full, require_labels=False)
    assert labelled(task, with_labels) and with_labels == read_examples(task, full)
    none = read_examples(task, write(tmp_path / "none.jsonl", jl(bare, bare)), require_labels=False)
    assert not labelled(task, none) and all(field not in ex for ex in none)
    assert none[0] == {**{k: v for k, v in with_labels[0].items() if k != field}, "_where": none[0]["_where"]}
    with pytest.raises(DataError, match=r"none.jsonl:1: missing field"):
        read_examples(task, str(tmp_path / "none.jsonl"))  # required by default (fine-tuning)
    for rows, line, verb in (((row, bare), 2, "lacks"), ((bare, bare, row), 3, "has")):
        with pytest.raises(DataError, match=rf"mixed.jsonl:{line}: {verb} '{field}', unlike .*mixed.jsonl:1"):
            read_examples(task, write(tmp_path / "mixed.jsonl", jl(*rows)), require_labels=False)


def test_conll_tokens_alone_or_with_tags(tmp_path):
    from fastbert.tasks import labelled
    bare = read_examples("ner", write(tmp_path / "b.conll", ["the", "cat", "", "mat"]), require_labels=False)
    assert [ex["words"] for ex in bare] == [["the", "cat"], ["mat"]] and not labelled("ner", bare)
    tagged = read_examples("ner", write(tmp_path / "t.conll", ["the\tO", "cat\tB-X", "", "mat\tO"]),
                           require_labels=False)
    assert labelled("ner", tagged) and [ex["tags"] for ex in tagged] == [["O", "B-X"], ["O"]]
    with pytest.raises(DataError, match=r"m.conll:4: lacks a tag, unlike line 1"):
        read_examples("ner", write(tmp_path / "m.conll", ["the\tO", "cat\tB-X", "", "mat"]), require_labels=False)
    with pytest.raises(DataError, match=r"n.conll:2: has a tag, unlike line 1"):
        read_examples("ner", write(tmp_path / "n.conll", ["the", "cat\tO"]), require_labels=False)
    with pytest.raises(DataError, match=r"b.conll:1: expected 'token<TAB>tag', got 'the'"):
        read_examples("ner", str(tmp_path / "b.conll"))
    with pytest.raises(DataError, match=r"x.conll:1: tag 'ZZ' is not O, B-TYPE or I-TYPE"):
        read_examples("ner", write(tmp_path / "x.conll", ["the\tZZ"]), require_labels=False)


def test_unknown_label_for_a_fine_tuned_model_names_the_model(tmp_path):
    p = write(tmp_path / "t.jsonl", jl({"text": "good", "label": "pos"}, {"text": "bad", "label": "meh"}))
    with pytest.raises(DataError, match=r"t.jsonl:2: label 'meh' is not one of the labels OUT was fine-tuned on"):
        check_labels("classify", read_examples("classify", p), ["neg", "pos"], p, model_dir="OUT")


# ------------------------------------------------------------------- mutation audit (second pass)

@pytest.mark.parametrize("answers, message", [
    ({"text": ["cat", "sat"], "answer_start": [4]}, r"answers has 2 texts but 1 answer_start"),
    # "the cat sat"[-3:-1] == "sa": a negative start would pass the text check
    ({"text": ["sa"], "answer_start": [-3]}, r"answer_start -3 does not point at the answer 'sa'"),
    # true == 1 and "the cat sat"[1:3] == "he": a boolean start would pass the text check
    ({"text": ["he"], "answer_start": [True]}, r"answers need string texts and integer answer_start"),
])
def test_qa_reader_refuses_answers_that_do_not_line_up(tmp_path, answers, message):
    """The reader itself refuses answers whose texts and starts do not pair up one to one or whose
    start is not a real character offset, naming the line (not a later error, or a silent zip)."""
    p = write(tmp_path / "q.jsonl", jl({"question": "where", "context": "the cat sat", "answers": answers}))
    with pytest.raises(DataError, match=rf"q.jsonl:1: {message}"):
        read_examples("qa", p)


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "choices": ["a"], "label": 0}, r"'choices' should be a list of at least two strings"),
    ({"question": "q", "choices": ["a", "b"], "label": -1}, r"label -1 is out of range for 2 choices"),
])
def test_choice_reader_refuses_one_choice_and_negative_labels(tmp_path, row, message):
    """A negative label would index choices from the end (-1 = the last) instead of being refused."""
    p = write(tmp_path / "c.jsonl", jl({"question": "q", "choices": ["a", "b"], "label": 1}, row))
    with pytest.raises(DataError, match=rf"c.jsonl:2: {message}"):
        read_examples("choice", p)


def test_conll_sentences_name_their_first_line_and_blank_looking_lines_separate(tmp_path):
    """A sentence's _where is its first token's line (after a -DOCSTART- header), _lines each token's;
    a line of spaces or a lone tab separates sentences like an empty one; a tag with no token is refused."""
    p = write(tmp_path / "n.conll", ["-DOCSTART- -X- O", "", "the\tO", "red\tB-X", "door\tI-X", "  ",
                                     "cat\tB-Y", "\t", "mat\tO"])
    ex = read_examples("ner", p)
    assert [e["words"] for e in ex] == [["the", "red", "door"], ["cat"], ["mat"]]
    assert [e["_where"] for e in ex] == [f"{p}:3", f"{p}:7", f"{p}:9"]
    assert ex[0]["_lines"] == [3, 4, 5]
    with pytest.raises(DataError, match=r"e.conll:2: expected 'token<TAB>tag'"):
        read_examples("ner", write(tmp_path / "e.conll", ["the\tO", "\tB-X"]))
    # the first token line, not line 1, is the one a mixed file is compared with
    with pytest.raises(DataError, match=r"m.conll:4: lacks a tag, unlike line 3"):
        read_examples("ner", write(tmp_path / "m.conll", ["-DOCSTART-", "", "the\tO", "cat"]), require_labels=False)


def test_labelled_of_no_examples_is_false():
    from fastbert.tasks import labelled
    assert labelled("classify", []) is False


def test_max_length_below_eight_is_refused(tok):
    with pytest.raises(ValueError, match="max_length 7 is too small"):
        build_features("classify", [{"text": "cat", "label": 0}], tok, max_length=7, label2id={0: 0})


def test_pair_truncation_trims_the_longer_text_first(tok):
    """Longest-first: a long first text gives up tokens for a short second one (only_second would
    fail here; transformers' default truncation is longest_first too)."""
    ex = [{"text_a": "the cat sat on the mat", "text_b": "door", "label": 0}]
    feats, info = build_features("pair", ex, tok, max_length=8, label2id={0: 0})
    # 6 + 1 tokens + 3 specials = 10: two come off the longer text_a
    assert feats[0]["input_ids"] == [2, 5, 6, 7, 8, 3, 13, 3]
    assert feats[0]["token_type_ids"] == [0] * 6 + [1] * 2
    assert info["truncated"] == 1


def test_qa_question_of_exactly_max_query_length_is_not_counted_truncated(tok):
    ex = [{"question": "where is it", "context": "the cat sat"}]
    feats, info = build_features("qa", ex, tok, max_length=32, max_query_length=3)
    assert info["questions_truncated"] == 0
    assert feats[0]["input_ids"][:5] == [2, 14, 15, 16, 3]


def test_qa_default_doc_stride_shrinks_to_fit_a_small_context_room(tok):
    """max_length 12 and an 8-token question leave 1 context token per window: the default stride
    (12 // 4 = 3) must shrink to 0 rather than be refused as larger than the room."""
    ex = [{"question": "where is it the big red door cat", "context": "the cat sat on the mat",
           "answers": {"text": ["mat"], "answer_start": [19]}}]
    feats, info = build_features("qa", ex, tok, max_length=12)
    assert len(feats) == 6 and info["truncated"] == 1
    # [CLS] + 8 question tokens + [SEP] = 10: each window's one context token sits at position 10
    assert [(f["start_positions"], f["end_positions"]) for f in feats] == [(0, 0)] * 5 + [(10, 10)]
    assert feats[5]["input_ids"][10] == 9


def test_qa_training_label_is_the_first_answer(tok):
    """With several gold answers (SQuAD dev files), the span label is the first one, as transformers'
    run_qa.py takes answers["answer_start"][0]."""
    ex = [{"question": "where", "context": "the cat sat on the mat",
           "answers": {"text": ["cat", "mat"], "answer_start": [4, 19]}}]
    feats, _ = build_features("qa", ex, tok, max_length=16)
    assert (feats[0]["start_positions"], feats[0]["end_positions"]) == (4, 4)   # 'cat': 3 + 1


def test_qa_null_answer_needs_a_strictly_higher_score(tok):
    """null_answers: "" only where [CLS]'s score is strictly above the best span's (Google BERT's
    run_squad.py: score_null - best_non_null > threshold 0.0); a tie keeps the span."""
    ex = [{"question": "where", "context": "the cat sat"}]
    feats, _ = build_features("qa", ex, tok, max_length=16)
    n = len(feats[0]["input_ids"])     # [CLS] where [SEP] the cat sat [SEP]; 'cat' at position 4
    for cls, want in ((5.0, "cat"), (5.5, "")):
        s, e = [0.0] * n, [0.0] * n
        s[0] = e[0] = cls
        s[4] = e[4] = 5.0
        assert qa_best_spans(ex, feats, [s], [e], null_answers=True) == [want], cls


def test_qa_best_span_pairs_the_n_best_starts_with_the_n_best_ends(tok):
    """Candidates are the n_best highest start logits and the n_best highest end logits (BERT's
    run_squad.py): the best valid pair among them wins, even where a pair outside scores more."""
    ex = [{"question": "where", "context": "the cat sat on the mat"}]
    feats, _ = build_features("qa", ex, tok, max_length=16)
    # positions:  [CLS] where [SEP] the  cat  sat  on   the  mat  [SEP]
    s = [0.0, 0.0, 0.0, 0.5, 5.0, 2.0, 3.0, 4.0, 10.0, 0.0]
    e = [0.0, 0.0, 0.0, 0.0, 10.0, 9.0, 1.0, 2.0, 8.0, 0.0]
    assert len(feats[0]["input_ids"]) == len(s)
    # top-2 starts: mat (10), cat (5); top-2 ends: cat (10), sat (9). Valid: cat-cat 15, cat-sat 14.
    # mat-mat (18) needs the third-best end and is not a candidate.
    assert qa_best_spans(ex, feats, [s], [e], n_best=2) == ["cat"]
    assert qa_best_spans(ex, feats, [s], [e], n_best=3) == ["mat"]


def test_bucket_batches_shuffle_the_examples_and_the_batches():
    """Training batches are neither drawn in length order (the batches are shuffled after the cut) nor
    cut from the file order (the examples are shuffled before the chunks are sorted)."""
    lengths = list(range(40))                      # distinct lengths: sorted order = index order
    for seed in (0, 1, 2):
        tr = bucket_batches(lengths, 4, shuffle=True, seed=seed, bucket_factor=100)
        assert tr != sorted(tr, key=min), seed     # one chunk: runs of the sorted order, not in order
    same = [1] * 20                                # equal lengths: the sort keeps the shuffled order
    tr = bucket_batches(same, 2, shuffle=True, seed=0, bucket_factor=1)
    assert sorted(i for b in tr for i in b) == list(range(20))
    assert {frozenset(b) for b in tr} != {frozenset((k, k + 1)) for k in range(0, 20, 2)}


def test_collate_pads_token_types_with_zero_and_input_ids_with_pad_id():
    feats = [{"input_ids": [2, 6, 3, 13, 3], "token_type_ids": [0, 0, 0, 1, 1], "labels": 1},
             {"input_ids": [2, 6, 3], "token_type_ids": [0, 0, 0], "labels": 0}]
    b = collate(feats, pad_id=7)
    assert b["input_ids"].tolist() == [[2, 6, 3, 13, 3], [2, 6, 3, 7, 7]]
    assert b["token_type_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [1, 0]
    b = collate(feats, length=6)                   # a fixed length (grad accumulation pads as the whole batch)
    assert b["input_ids"].shape == (2, 6) and b["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0, 0]
