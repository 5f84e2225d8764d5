"""Corpus reading, cached shards, BERT segment pairs and masking.

Statistical checks use honest binomial bounds: a count of n independent draws with probability p is
accepted within 5 standard deviations of n*p (a false failure about once in 1.7 million runs)."""
import gzip
import math
import os

import numpy as np
import pytest

from fastbert.pretraining_data import (Corpus, CorpusError, PretrainingData, Shard, collate, create_instances,
                                       iter_documents, mask_batch, mask_tokens, split_documents, tokenize_corpus)
from fastbert.tokenization import train_tokenizer

CLS, SEP, MASK, PAD = 2, 3, 4, 0


def within_binomial(count, n, p, sigmas=5.0):
    sd = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= sigmas * sd + 1e-9


def synthetic_corpus(doc_sentence_lengths, first_id=100):
    """A Corpus in memory whose token ids count up from first_id, so every token is unique and its
    document and position can be read back from its id."""
    sent_starts, doc_starts, n = [0], [0], 0
    for doc in doc_sentence_lengths:
        for length in doc:
            n += length
            sent_starts.append(n)
        doc_starts.append(len(sent_starts) - 1)
    tokens = np.arange(first_id, first_id + n, dtype=np.int32)
    return Corpus([Shard(tokens, np.array(sent_starts), np.array(doc_starts), "<memory>")])


def doc_of(corpus, token):
    shard = corpus.shards[0]
    sentence = np.searchsorted(shard.sentences, token - 100, side="right") - 1
    return int(np.searchsorted(shard.documents, sentence, side="right") - 1)


# ---- reading ------------------------------------------------------------------------------------

def test_documents_plain_and_gzip_agree(tmp_path):
    text = "First sentence.\nSecond one.\n\n\n  Third, in a new document.  \n\nLast doc.\n\n"
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "c.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    want = [["First sentence.", "Second one."], ["Third, in a new document."], ["Last doc."]]
    assert list(iter_documents(str(tmp_path / "c.txt"))) == want
    assert list(iter_documents(str(tmp_path / "c.gz"))) == want
    # gzip is recognised by content, not by name
    os.rename(tmp_path / "c.gz", tmp_path / "plain-name.txt")
    assert list(iter_documents(str(tmp_path / "plain-name.txt"))) == want


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00", "binary"),
    (b"caf\xe9 au lait\n", "not UTF-8"),
    (b"\x1f\x8bthis is not really gzip", "cannot read"),
])
def test_binary_junk_is_refused(tmp_path, content, message):
    path = tmp_path / "junk.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        list(iter_documents(str(path)))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["the cat sat on the mat .", "a dog ran in the park .", "emma smiled ."] * 4,
                           vocab_size=200, min_frequency=1)


def test_missing_and_empty_corpus(tmp_path, tokenizer):
    with pytest.raises(CorpusError, match="does not exist"):
        tokenize_corpus([str(tmp_path / "nope.txt")], tokenizer, str(tmp_path / "cache"))
    (tmp_path / "empty.txt").write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="empty"):
        tokenize_corpus([str(tmp_path / "empty.txt")], tokenizer, str(tmp_path / "cache"))
    # nothing half-written is left in the cache
    assert [n for n in os.listdir(tmp_path / "cache")] == []


def test_shards_are_cached_and_match_direct_encoding(tmp_path, tokenizer):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the cat sat .\nthe dog ran .\n\nemma smiled .\n", encoding="utf-8")
    b.write_text("a cat in the park .\n", encoding="utf-8")
    cache = str(tmp_path / "cache")
    corpus = tokenize_corpus([str(a), str(b)], tokenizer, cache)
    assert corpus.num_documents == 3
    docs = [[s.tolist() for s in corpus.document(i)] for i in range(3)]
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    assert docs == [[enc("the cat sat ."), enc("the dog ran .")], [enc("emma smiled .")],
                    [enc("a cat in the park .")]]
    assert isinstance(corpus.shards[0].tokens, np.memmap)
    shards = sorted(os.listdir(cache))
    assert len(shards) == 2 and not any(n.startswith(".tmp") for n in shards)
    # the second time reads the cache: the text is not needed beyond its hash
    mtimes = {n: os.path.getmtime(os.path.join(cache, n, "tokens.bin")) for n in shards}
    again = tokenize_corpus([str(a), str(b)], tokenizer, cache)
    assert [[s.tolist() for s in again.document(i)] for i in range(3)] == docs
    assert {n: os.path.getmtime(os.path.join(cache, n, "tokens.bin")) for n in shards} == mtimes
    # another tokenizer gets its own shards
    other = train_tokenizer(["the cat sat on the mat ."] * 3, vocab_size=100, min_frequency=1)
    tokenize_corpus([str(a)], other, cache)
    assert len(os.listdir(cache)) == 3


# ---- segment pairs ------------------------------------------------------------------------------

def test_pair_layout_token_types_and_nsp_sources():
    rng = np.random.default_rng(1)
    lengths = [[int(x) for x in rng.integers(3, 25, size=rng.integers(1, 30))] for _ in range(40)]
    corpus = synthetic_corpus(lengths)
    seq_len = 64
    inst = create_instances(corpus, np.arange(40), seq_len, np.random.default_rng(0), cls_id=CLS, sep_id=SEP)
    assert len(inst) > 100
    saw_short = 0
    for i in range(len(inst)):
        ids = inst.tokens[inst.offsets[i]:inst.offsets[i + 1]]
        la = inst.len_a[i]
        assert len(ids) <= seq_len
        assert ids[0] == CLS and ids[la - 1] == SEP and ids[-1] == SEP
        assert (ids == CLS).sum() == 1 and (ids == SEP).sum() == 2
        a, b = ids[1:la - 1], ids[la:-1]
        assert len(a) >= 1 and len(b) >= 1
        # segments are contiguous runs of the corpus, in order (truncation trims only their ends)
        assert (np.diff(a) == 1).all() or len({doc_of(corpus, t) for t in a}) == 1
        da, db = {doc_of(corpus, t) for t in a}, {doc_of(corpus, t) for t in b}
        assert len(da) == 1 and len(db) == 1
        if inst.nsp_labels[i] == 0:
            assert da == db and b[0] > a[-1]  # the true continuation
        else:
            assert da != db  # a span of another document
        saw_short += len(ids) < seq_len - 8
    assert saw_short > 0

    # NSP: a chunk of two or more sentences flips a fair coin; one-sentence chunks must take a random B
    n_coin = len(inst) - inst.forced_random
    heads = int(inst.nsp_labels.sum()) - inst.forced_random
    assert within_binomial(heads, n_coin, 0.5), (heads, n_coin)


def test_examples_fit_seq_len_without_nsp_too():
    """Without NSP a chunk of several sentences still becomes [CLS] A [SEP] B [SEP]: three special
    tokens, as with NSP (the budget once left room for two only: 33 tokens at seq_len 32)."""
    rng = np.random.default_rng(3)
    corpus = synthetic_corpus([[int(x) for x in rng.integers(3, 12, size=rng.integers(2, 20))] for _ in range(30)])
    for nsp in (False, True):
        for seq_len in (16, 32, 64):
            inst = create_instances(corpus, np.arange(30), seq_len, np.random.default_rng(seq_len), cls_id=CLS,
                                    sep_id=SEP, nsp=nsp)
            lengths = np.diff(inst.offsets)
            assert lengths.max() <= seq_len, (nsp, seq_len, lengths.max())
            assert (lengths == seq_len).any()  # and the budget is used


def test_max_example_len_bound_is_the_same_without_nsp(tokenizer):
    """Without NSP a chunk of several sentences is still [CLS] A [SEP] B [SEP]: the shortest example
    length is 5 either way, refused when the data is made (not later, as a 'seq_len' error)."""
    corpus = synthetic_corpus([[3, 4, 2]] * 4, first_id=5)
    for nsp in (True, False):
        mk = lambda n: PretrainingData(corpus, tokenizer, np.arange(4), seq_len=32, seed=0,  # noqa: E731
                                       nsp=nsp, max_example_len=n)
        with pytest.raises(ValueError, match="max_example_len"):
            mk(4)
        assert np.diff(mk(5).epoch(0).offsets).max() <= 5

def test_token_type_ids_from_example():
    corpus = synthetic_corpus([[5, 6, 7, 4]] * 6)
    data = PretrainingData.__new__(PretrainingData)  # fields set by hand: no tokenizer needed
    data.corpus, data.doc_ids, data.seq_len, data.seed, data.mask_prob = corpus, np.arange(6), 32, 0, 0.15
    data.nsp, data.short_seq_prob, data.max_predictions, data.continuation = True, 0.1, None, None
    data.ids = {"pad": PAD, "unk": 1, "cls": CLS, "sep": SEP, "mask": MASK}
    data.special_vocab = np.zeros(1000, bool)
    data.special_vocab[:5] = True
    data.random_ids = np.arange(5, 1000)
    data._cache = data._rows = None
    data.pack, data.max_example_len = False, 32
    inst = data.epoch(0)
    for i in range(len(inst)):
        ex = data.example(0, i)
        la = inst.len_a[i]
        n = inst.offsets[i + 1] - inst.offsets[i]
        assert ex["token_type_ids"].tolist() == [0] * la + [1] * (n - la)
        assert ex["next_sentence_label"] == inst.nsp_labels[i]


def test_one_sentence_documents_and_nsp_needs_two_documents():
    corpus = synthetic_corpus([[6]] * 10)
    inst = create_instances(corpus, np.arange(10), 32, np.random.default_rng(0), cls_id=CLS, sep_id=SEP)
    # documented: a one-sentence document is segment A with a random B, label 1
    assert len(inst) == 10 and inst.nsp_labels.tolist() == [1] * 10 and inst.forced_random == 10
    with pytest.raises(CorpusError, match="at least two documents"):
        create_instances(corpus, np.arange(1), 32, np.random.default_rng(0), cls_id=CLS, sep_id=SEP)
    solo = create_instances(synthetic_corpus([[6, 5, 7]]), np.arange(1), 32, np.random.default_rng(0),
                            cls_id=CLS, sep_id=SEP, nsp=False)
    assert len(solo) >= 1 and (solo.nsp_labels == 0).all()


def test_pairs_are_redrawn_each_epoch_and_repeatable(tmp_path, tokenizer):
    lines = "\n\n".join("\n".join(f"the cat sat on the mat number {d} {s} ." for s in range(8)) for d in range(12))
    (tmp_path / "c.txt").write_text(lines, encoding="utf-8")
    corpus = tokenize_corpus([str(tmp_path / "c.txt")], tokenizer, str(tmp_path / "cache"))
    mk = lambda seed: PretrainingData(corpus, tokenizer, np.arange(12), seq_len=32, seed=seed)  # noqa: E731
    d = mk(0)
    e0 = [d.example(0, i) for i in range(8)]
    e1 = [d.example(1, i) for i in range(8)]
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(e0, e1))
    again = mk(0)
    assert all(np.array_equal(x["input_ids"], again.example(0, i)["input_ids"]) and
               np.array_equal(x["labels"], again.example(0, i)["labels"]) for i, x in enumerate(e0))
    # take() walks across the epoch boundary
    n0 = len(d.epoch(0))
    batch, pos = d.take((0, n0 - 2), 5)
    assert pos == (1, 3) and len(batch) == 5
    assert np.array_equal(batch[2]["input_ids"], e1[0]["input_ids"])


# ---- masking ------------------------------------------------------------------------------------

def test_masking_statistics():
    vocab = 1000
    random_ids = np.arange(5, vocab)
    rng = np.random.default_rng(123)
    counts = {"mask": 0, "random": 0, "same": 0}
    total_masked = total_candidates = 0
    for _ in range(400):
        n = int(rng.integers(20, 128))
        tokens = rng.integers(5, vocab, n)
        tokens[0], tokens[-1] = CLS, SEP
        special = np.zeros(n, bool)
        special[[0, n - 1]] = True
        inputs, labels = mask_tokens(tokens, special, rng, mask_prob=0.15, mask_id=MASK, random_ids=random_ids)
        chosen = labels != -100
        n_cand = n - 2
        assert chosen.sum() == max(1, round(n_cand * 0.15))  # BERT's count, exactly
        assert not chosen[special].any()  # [CLS]/[SEP] never masked
        assert (labels[chosen] == tokens[chosen]).all()
        assert (inputs[~chosen] == tokens[~chosen]).all()  # unmasked positions untouched
        replaced = inputs[chosen]
        counts["mask"] += int((replaced == MASK).sum())
        counts["same"] += int((replaced == tokens[chosen]).sum())
        counts["random"] += int(((replaced != MASK) & (replaced != tokens[chosen])).sum())
        assert not np.isin(replaced[replaced != MASK], [PAD, 1, CLS, SEP]).any()
        total_masked += int(chosen.sum())
        total_candidates += n_cand
    assert abs(total_masked / total_candidates - 0.15) < 0.005  # rounding per sequence only
    # 80 / 10 / 10: a random draw equals the original with probability 1/995
    p_same = 0.1 + 0.1 / len(random_ids)
    assert within_binomial(counts["mask"], total_masked, 0.8), counts
    assert within_binomial(counts["same"], total_masked, p_same), counts
    assert within_binomial(counts["random"], total_masked, 0.1 - 0.1 / len(random_ids)), counts


def test_batch_masking_statistics():
    """mask_batch (the token masking PretrainingData runs, a batch at once from hashed counters) obeys
    the rules test_masking_statistics checks for mask_tokens: BERT's count per example exactly, never a
    special or padding position, labels the originals, 80 / 10 / 10, replacements ordinary tokens."""
    vocab = 1000
    random_ids = np.arange(5, vocab)
    rng = np.random.default_rng(123)
    n, width = 400, 128
    lengths = rng.integers(20, width + 1, n)
    tokens = rng.integers(5, vocab, (n, width))
    inside = np.arange(width)[None, :] < lengths[:, None]
    tokens[:, 0] = CLS
    tokens[np.arange(n), lengths - 1] = SEP
    tokens[~inside] = PAD
    special = np.isin(tokens, [PAD, CLS, SEP]) | ~inside
    inputs, labels = mask_batch(tokens, special, 7, 0, np.arange(n), mask_prob=0.15, mask_id=MASK,
                                random_ids=random_ids)
    chosen = labels != -100
    n_cand = lengths - 2
    assert (chosen.sum(1) == np.maximum(1, np.rint(n_cand * 0.15))).all()  # BERT's count, exactly
    assert all(chosen.sum(1)[i] == max(1, round(int(n_cand[i]) * 0.15)) for i in range(n))  # as round()
    assert not chosen[special].any()
    assert (labels[chosen] == tokens[chosen]).all()
    assert (inputs[~chosen] == tokens[~chosen]).all()
    replaced, original = inputs[chosen], tokens[chosen]
    total = int(chosen.sum())
    p_same = 0.1 + 0.1 / len(random_ids)
    assert within_binomial(int((replaced == MASK).sum()), total, 0.8)
    assert within_binomial(int((replaced == original).sum()), total, p_same)
    assert not np.isin(replaced[replaced != MASK], [PAD, 1, CLS, SEP]).any()


def test_batch_masking_picks_positions_uniformly():
    """Every candidate position is equally likely to be chosen (the hashed keys have no position or
    index bias): 4000 examples of 50 candidates with 15% masked, per-position counts binomial."""
    n, width = 4000, 52
    tokens = np.tile(np.arange(10, 10 + width), (n, 1))
    special = np.zeros((n, width), bool)
    special[:, [0, width - 1]] = True
    _, labels = mask_batch(tokens, special, 11, 3, np.arange(n), mask_prob=0.15, mask_id=MASK,
                           random_ids=np.arange(5, 100))
    per_position = (labels[:, 1:-1] != -100).sum(0)  # each example masks round(7.5) = 8 of 50
    assert all(within_binomial(int(c), n, 8 / 50) for c in per_position), per_position
    # and the chosen fall in either half of the candidates alike
    first_half = (labels[:, 1:26] != -100).sum()
    assert within_binomial(int(first_half), n * 8, 0.5)


def _splitmix_reference(seed, epoch, index, stream, position):
    """position_keys' hash in plain Python integers (an independent reading of its documentation)."""
    golden, mask = 0x9E3779B97F4A7C15, 2**64 - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    z = mix(((seed & mask) + golden) & mask)
    for field in (epoch & mask, index, stream + 1):
        z = mix((z + golden * field) & mask)
    return mix((z + golden * position) & mask)


def test_position_keys_are_the_documented_hash():
    """The keys are a fixed function of (seed, epoch, index, stream, position): a run resumed by a
    later version draws the same masks only while it stays so. Checked against plain-Python integer
    arithmetic, numpy integers for seed and epoch included, the evaluation epoch and a large seed."""
    from fastbert.pretraining_data import position_keys
    for seed, epoch in ((0, 0), (5, 3), (2**40 + 7, 2**31 - 1), (np.int64(5), np.int64(3))):
        keys = position_keys(seed, epoch, np.array([0, 1, 70000]), 6, 3)
        for stream in range(3):
            for row, index in enumerate((0, 1, 70000)):
                want = [_splitmix_reference(int(seed), int(epoch), index, stream, pos) for pos in range(6)]
                assert keys[stream][row].tolist() == want, (seed, epoch, stream, index)


def test_batch_masking_is_per_example_and_keyed_by_seed_epoch_index():
    """An example's mask depends on (seed, epoch, its index) only: the same in any batch, at any
    width of padding; another index, epoch or seed draws another."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 500, (6, 40))
    special = np.zeros((6, 40), bool)
    kw = dict(mask_prob=0.3, mask_id=MASK, random_ids=np.arange(5, 500))
    inputs, labels = mask_batch(tokens, special, 5, 2, np.arange(10, 16), **kw)
    for row in range(6):
        alone = mask_batch(tokens[row:row + 1], special[row:row + 1], 5, 2, np.array([10 + row]), **kw)
        assert np.array_equal(alone[0][0], inputs[row]) and np.array_equal(alone[1][0], labels[row])
        padded = np.concatenate([tokens[row:row + 1], np.zeros((1, 9), np.int64)], 1)
        pad_special = np.concatenate([special[row:row + 1], np.ones((1, 9), bool)], 1)
        wide = mask_batch(padded, pad_special, 5, 2, np.array([10 + row]), **kw)
        assert np.array_equal(wide[1][0, :40], labels[row]) and (wide[1][0, 40:] == -100).all()
        assert np.array_equal(wide[0][0, :40], inputs[row]) and (wide[0][0, 40:] == 0).all()
    same_tokens = np.tile(tokens[:1], (3, 1))
    draws = [mask_batch(same_tokens[:1], special[:1], *key, **kw)[1][0] for key in
             ((5, 2, np.array([10])), (5, 2, np.array([11])), (5, 3, np.array([10])), (6, 2, np.array([10])))]
    assert len({tuple(d.tolist()) for d in draws}) == 4


def test_batch_masking_cap_and_examples_without_candidates():
    tokens = np.tile(np.arange(10, 110), (3, 1))
    special = np.zeros((3, 100), bool)
    special[2] = True  # nothing to mask
    for cap in (1, 3, 15, 40):
        _, labels = mask_batch(tokens, special, cap, 0, np.arange(3), mask_prob=0.15, mask_id=MASK,
                               random_ids=np.arange(5, 200), max_predictions=cap)
        assert ((labels != -100).sum(1) == [min(cap, 15), min(cap, 15), 0]).all()
    inputs, labels = mask_batch(tokens, special, 0, 0, np.arange(3), mask_prob=0.0, mask_id=MASK,
                                random_ids=np.arange(5, 200))  # as mask_tokens: nothing at mask_prob 0
    assert (labels == -100).all() and np.array_equal(inputs, tokens)
    empty = mask_batch(np.zeros((0, 7), np.int64), np.zeros((0, 7), bool), 0, 0, np.arange(0), mask_prob=0.15,
                       mask_id=MASK, random_ids=np.arange(5, 200))
    assert empty[0].shape == empty[1].shape == (0, 7)


def test_batch_masking_random_replacements_use_every_ordinary_token():
    tokens = np.tile(np.arange(10, 110), (200, 1))
    inputs, labels = mask_batch(tokens, np.zeros((200, 100), bool), 1, 0, np.arange(200), mask_prob=0.5,
                                mask_id=MASK, random_ids=np.array([7, 8]))
    seen = set(inputs[(labels != -100) & (inputs != MASK) & (inputs != tokens)].tolist())
    assert seen == {7, 8}


def test_examples_of_a_batch_equal_the_examples_alone(tmp_path, tokenizer):
    """PretrainingData.examples masks a batch at once; each example equals example(epoch, i) alone,
    and take() / take_rows() (packed) hand out exactly those."""
    lines = "\n\n".join("\n".join(f"the cat sat on the mat number {d} {s} ." for s in range(8)) for d in range(12))
    (tmp_path / "c.txt").write_text(lines, encoding="utf-8")
    corpus = tokenize_corpus([str(tmp_path / "c.txt")], tokenizer, str(tmp_path / "cache"))
    for pack in (False, True):
        data = PretrainingData(corpus, tokenizer, np.arange(corpus.num_documents), seq_len=64, seed=3, pack=pack,
                               max_example_len=32 if pack else None)
        n = len(data.epoch(0))
        batch = data.examples(0, range(n))
        assert data.examples(0, []) == []

        def same(a, b):
            return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

        for i in (0, n // 2, n - 1):
            assert same(batch[i], data.example(0, i)), (pack, i)
        if pack:
            n_rows = len(data.rows(0))
            rows, position = data.take_rows((0, n_rows - 2), 4)  # crosses into epoch 1
            assert position == (1, 2)
            wanted = [(0, data.rows(0)[n_rows - 2]), (0, data.rows(0)[n_rows - 1]), (1, data.rows(1)[0]),
                      (1, data.rows(1)[1])]
            assert [len(r) for r in rows] == [len(w) for _, w in wanted]
            assert all(same(e, data.example(epoch, int(j)))
                       for row, (epoch, want) in zip(rows, wanted) for e, j in zip(row, want))
        else:
            n1 = len(data.epoch(1))  # each epoch draws its own pairs: their number varies
            taken, position = data.take((0, n - 2), 2 + n1 + 2)  # through all of epoch 1 into epoch 2
            assert position == (2, 2)
            assert same(taken[0], batch[n - 2]) and same(taken[2], data.example(1, 0))
            assert same(taken[2 + n1], data.example(2, 0)) and same(taken[-1], data.example(2, 1))
        # numpy integers as seed and epoch give the same examples
        other = PretrainingData(corpus, tokenizer, np.arange(corpus.num_documents), seq_len=64, seed=np.int64(3),
                                pack=pack, max_example_len=32 if pack else None)
        assert same(other.examples(np.int64(0), [1])[0], batch[1])


def test_mask_rate_is_configurable():
    tokens = np.arange(10, 110)
    inputs, labels = mask_tokens(tokens, np.zeros(100, bool), np.random.default_rng(0), mask_prob=0.4,
                                 mask_id=MASK, random_ids=np.arange(5, 200))
    assert (labels != -100).sum() == 40


def test_whole_word_masking_takes_whole_words():
    # vocab: ids >= 500 are "##" continuation pieces
    continuation = np.zeros(1000, bool)
    continuation[500:] = True
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(30, 100))
        tokens = np.where(rng.random(n) < 0.4, rng.integers(500, 1000, n), rng.integers(5, 500, n))
        tokens[0], tokens[1], tokens[-1] = CLS, 7, SEP
        special = np.isin(tokens, [CLS, SEP])
        inputs, labels = mask_tokens(tokens, special, rng, mask_prob=0.15, mask_id=MASK,
                                     random_ids=np.arange(5, 1000), continuation=continuation)
        chosen = labels != -100
        assert 1 <= chosen.sum() <= max(1, round((n - 2) * 0.15))
        # a word is masked entirely or not at all
        word = np.cumsum(~continuation[tokens] | special)
        for w in np.unique(word[chosen]):
            members = (word == w) & ~special
            assert chosen[members].all()


def test_whole_word_masking_skips_a_word_that_would_overshoot_and_goes_on():
    """As BERT: a word longer than the predictions left is skipped and the next words are tried, so
    one long word drawn first does not leave a sequence with no prediction at all."""
    continuation = np.zeros(1000, bool)
    continuation[500:] = True
    # [CLS] w ##a ##b ##c x1 .. x16 [SEP]: 20 candidates, round(0.15 * 20) = 3 predictions; the
    # four-piece word can never fit, the one-token words always can
    tokens = np.array([CLS, 10, 501, 502, 503] + list(range(20, 36)) + [SEP])
    special = np.isin(tokens, [CLS, SEP])
    for seed in range(100):
        _, labels = mask_tokens(tokens, special, np.random.default_rng(seed), mask_prob=0.15, mask_id=MASK,
                                random_ids=np.arange(5, 500), continuation=continuation)
        chosen = labels != -100
        assert chosen.sum() == 3, seed
        assert not chosen[1:5].any()


def test_whole_word_masking_a_leading_continuation_piece_is_its_own_word():
    """A segment truncated mid-word starts with a "##" piece: it is a word on its own (as BERT's
    candidate grouping), not glued to the word after it."""
    continuation = np.zeros(1000, bool)
    continuation[500:] = True
    # [CLS] ##a w ##b [SEP]: words [##a] and [w ##b]; one prediction (round(0.15 * 3) -> 1 at least)
    tokens = np.array([CLS, 501, 10, 502, SEP])
    special = np.isin(tokens, [CLS, SEP])
    for seed in range(20):
        _, labels = mask_tokens(tokens, special, np.random.default_rng(seed), mask_prob=0.15, mask_id=MASK,
                                random_ids=np.arange(5, 500), continuation=continuation)
        assert (labels != -100).tolist() == [False, True, False, False, False], seed


def test_max_predictions_caps_the_masked_tokens():
    """``max_predictions`` (BERT's max_predictions_per_seq) is an upper bound, exactly."""
    tokens = np.arange(10, 110)
    for cap in (1, 3, 15, 40):
        _, labels = mask_tokens(tokens, np.zeros(100, bool), np.random.default_rng(cap), mask_prob=0.15,
                                mask_id=MASK, random_ids=np.arange(5, 200), max_predictions=cap)
        assert (labels != -100).sum() == min(cap, 15)


def test_random_replacements_use_every_ordinary_token():
    """The 10% random replacements are drawn from all of ``random_ids``, the last one included."""
    tokens = np.arange(10, 110)
    seen = set()
    for seed in range(200):
        inputs, labels = mask_tokens(tokens, np.zeros(100, bool), np.random.default_rng(seed), mask_prob=0.5,
                                     mask_id=MASK, random_ids=np.array([7, 8]))
        seen |= set(inputs[(labels != -100) & (inputs != MASK) & (inputs != tokens)].tolist())
    assert seen == {7, 8}


def single_sentence_data(tokenizer, n_tokens, seq_len, **kw):
    """PretrainingData over one document of one sentence of ordinary tokens of the tokenizer (repeating
    ids 5..V-1), without NSP: every epoch holds the same single example [CLS] sentence [SEP]."""
    vocab = tokenizer.get_vocab_size()
    tokens = (5 + np.arange(n_tokens) % (vocab - 5)).astype(np.int32)
    corpus = Corpus([Shard(tokens, np.array([0, n_tokens]), np.array([0, 1]), "<memory>")])
    return PretrainingData(corpus, tokenizer, np.arange(1), seq_len=seq_len, seed=0, nsp=False, **kw)


@pytest.mark.parametrize("whole_word_mask", [False, True])
def test_masks_are_redrawn_each_epoch_for_the_same_pair(tokenizer, whole_word_mask):
    """The mask of an example is seeded by (seed, epoch, index): the same pair in another epoch gets
    another mask, and the same (epoch, index) always the same one — whole-word masks too."""
    data = single_sentence_data(tokenizer, 60, 64, whole_word_mask=whole_word_mask)
    masks = [tuple(data.example(e, 0)["labels"].tolist()) for e in range(6)]
    assert all(len(data.epoch(e)) == 1 for e in range(6))
    assert len(set(masks)) == 6
    assert tuple(data.example(2, 0)["labels"].tolist()) == masks[2]


def test_random_replacements_of_a_run_are_never_special_tokens(tokenizer):
    """PretrainingData draws the 10% random tokens from ordinary tokens only, never [PAD], [UNK],
    [CLS], [SEP] or [MASK]."""
    data = single_sentence_data(tokenizer, 120, 128)
    specials = set(data.ids.values())
    original = data.epoch(0).tokens[1:-1]
    n_random = 0
    for e in range(150):
        ex = data.example(e, 0)
        inputs, chosen = ex["input_ids"][1:-1], ex["labels"][1:-1] != -100
        replaced = inputs[chosen & (inputs != data.ids["mask"]) & (inputs != original)]
        n_random += len(replaced)
        assert not specials & set(replaced.tolist()), e
    assert n_random > 100  # enough draws that a special among V tokens would have shown
    # and the pool is every ordinary token: none left out (the last id once could have been)
    assert sorted(data.random_ids.tolist()) == sorted(set(range(tokenizer.get_vocab_size())) - specials)


def test_truncation_trims_the_longer_segment_from_both_ends():
    """BERT's truncate_seq_pair: one token at a time from the longer segment, from its front or its
    back with equal odds (not always the back)."""
    from fastbert.pretraining_data import _truncate_pair
    fronts = backs = 0
    for seed in range(200):
        a, b = [0, 20], [0, 6]
        _truncate_pair(a, b, 16, np.random.default_rng(seed))
        assert (a[1] - a[0], b) == (10, [0, 6])
        fronts += a[0]
        backs += 20 - a[1]
    assert within_binomial(fronts, 200 * 10, 0.5), (fronts, backs)


def test_truncation_of_equal_segments_trims_b_as_bert():
    """truncate_seq_pair trims A only when it is longer: on a tie B loses the token."""
    from fastbert.pretraining_data import _truncate_pair
    for seed in range(20):
        a, b = [0, 10], [0, 10]
        _truncate_pair(a, b, 19, np.random.default_rng(seed))
        assert a == [0, 10] and b[1] - b[0] == 9, (seed, a, b)


def test_nsp_coin_is_fair_on_a_large_corpus():
    """~2,500 coin flips, so 5 sigma is 0.05: a coin of 0.35 or 0.65 fails (the layout tests see ~150
    flips, whose 5 sigma band admits 0.30-0.70)."""
    rng = np.random.default_rng(5)
    lengths = [[int(x) for x in rng.integers(3, 12, size=30)] for _ in range(500)]
    inst = create_instances(synthetic_corpus(lengths), np.arange(500), 64, np.random.default_rng(0), cls_id=CLS,
                            sep_id=SEP)
    n_coin = len(inst) - inst.forced_random
    heads = int(inst.nsp_labels.sum()) - inst.forced_random
    assert n_coin > 2000, n_coin
    assert within_binomial(heads, n_coin, 0.5), (heads, n_coin)


def test_unused_sentences_of_a_random_next_pair_start_the_next_chunk():
    """When B is a random span, the chunk's sentences after A go back into the pool: without
    truncation (one-token sentences never overshoot the target) every token of the corpus is in
    exactly one segment A or true-next B of the epoch."""
    rng = np.random.default_rng(5)
    lengths = [[1] * int(rng.integers(2, 40)) for _ in range(30)]
    corpus = synthetic_corpus(lengths)
    inst = create_instances(corpus, np.arange(30), 24, np.random.default_rng(0), cls_id=CLS, sep_id=SEP)
    assert 0 < inst.nsp_labels.sum() < len(inst)
    seen = []
    for i in range(len(inst)):
        ids = inst.tokens[inst.offsets[i]:inst.offsets[i + 1]]
        la = inst.len_a[i]
        seen += ids[1:la - 1].tolist()
        if inst.nsp_labels[i] == 0:
            seen += ids[la:-1].tolist()
    assert sorted(seen) == list(range(100, 100 + sum(map(len, lengths))))


@pytest.mark.parametrize("short_seq_prob", [0.1, 0.5])
def test_short_targets_come_with_short_seq_prob(short_seq_prob):
    """A chunk's target is the full length with probability 1 - short_seq_prob, else uniform in
    [2, max], for a document's first chunk and for the later ones. With one-token sentences and no
    NSP an example is exactly target + 3 tokens long (except where its document ends)."""
    seq_len = 32
    max_tokens = seq_len - 3
    p_short = short_seq_prob * (max_tokens - 2) / (max_tokens - 1)
    # later chunks: one long document
    inst = create_instances(synthetic_corpus([[1] * 20000]), np.arange(1), seq_len, np.random.default_rng(0),
                            cls_id=CLS, sep_id=SEP, short_seq_prob=short_seq_prob, nsp=False)
    lengths = np.diff(inst.offsets)[:-1]  # the last chunk ends with the document
    assert within_binomial(int((lengths < seq_len).sum()), len(lengths), p_short)
    # first chunks: documents of max_tokens one-token sentences, whose first chunk is short only
    # when its target is (token id - 100 is the position in the corpus)
    inst = create_instances(synthetic_corpus([[1] * max_tokens] * 1000), np.arange(1000), seq_len,
                            np.random.default_rng(1), cls_id=CLS, sep_id=SEP, short_seq_prob=short_seq_prob,
                            nsp=False)
    first = [(inst.tokens[inst.offsets[i] + 1] - 100) % max_tokens == 0 for i in range(len(inst))]
    lengths = np.diff(inst.offsets)[first]
    assert len(lengths) == 1000
    assert within_binomial(int((lengths < seq_len).sum()), 1000, p_short)


def test_lines_of_only_control_characters_are_dropped_with_a_document_they_empty(tmp_path, tokenizer):
    """A line that tokenizes to nothing is no sentence, and a document left without sentences is
    no document (an empty one would give empty segments, or fail when drawn as a random B)."""
    text = "the cat sat .\n\x07\n\n\x07\x07\n\x08\n\na dog ran .\n\x07\nemma smiled .\n"
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    corpus = tokenize_corpus([str(tmp_path / "c.txt")], tokenizer, str(tmp_path / "cache"))
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    assert corpus.num_documents == 2
    assert [[s.tolist() for s in corpus.document(i)] for i in range(2)] == [
        [enc("the cat sat .")], [enc("a dog ran ."), enc("emma smiled .")]]


def test_random_next_segments_may_start_at_any_sentence():
    """A random B starts at a uniformly drawn sentence of the other document, its last included."""
    corpus = synthetic_corpus([[1, 1]] * 200)  # one-token sentences: no truncation, B starts whole
    inst = create_instances(corpus, np.arange(200), 16, np.random.default_rng(0), cls_id=CLS, sep_id=SEP)
    starts = [int(inst.tokens[inst.offsets[i] + inst.len_a[i]] - 100) % 2
              for i in range(len(inst)) if inst.nsp_labels[i] == 1]
    assert within_binomial(sum(starts), len(starts), 0.5), (sum(starts), len(starts))


def test_seq_len_too_short_for_a_pair_is_refused():
    corpus = synthetic_corpus([[3, 3]] * 4)
    with pytest.raises(ValueError, match="too short"):
        create_instances(corpus, np.arange(4), 4, np.random.default_rng(0), cls_id=CLS, sep_id=SEP)
    assert len(create_instances(corpus, np.arange(4), 5, np.random.default_rng(0), cls_id=CLS, sep_id=SEP))


def test_segment_a_ends_at_a_uniformly_drawn_sentence():
    """A chunk of k sentences is split into A and B at a sentence drawn uniformly from 1..k-1 (A is
    not always the first sentence): one-token sentences, no NSP, full-length chunks of 29."""
    inst = create_instances(synthetic_corpus([[1] * 29 * 400]), np.arange(1), 32, np.random.default_rng(0),
                            cls_id=CLS, sep_id=SEP, short_seq_prob=0.0, nsp=False)
    a_sentences = inst.len_a - 2
    assert len(inst) == 400 and set(a_sentences.tolist()) <= set(range(1, 29))
    assert within_binomial(int((a_sentences <= 14).sum()), 400, 14 / 28)
    assert len(set(a_sentences.tolist())) > 20


def test_split_and_collate():
    train, held = split_documents(100, 0.05, seed=3)
    assert len(held) == 5 and len(train) == 95 and not set(train) & set(held)
    assert len(split_documents(3, 0.05, seed=3)[1]) == 0  # too small to hold any out
    ex = [{"input_ids": np.array([2, 9, 4, 3]), "token_type_ids": np.array([0, 0, 0, 0]),
           "labels": np.array([-100, -100, 8, -100]), "next_sentence_label": np.int64(1)},
          {"input_ids": np.array([2, 9, 3]), "token_type_ids": np.array([0, 0, 1]),
           "labels": np.array([-100, 9, -100]), "next_sentence_label": np.int64(0)}]
    b = collate(ex, PAD)
    assert b["input_ids"].tolist() == [[2, 9, 4, 3], [2, 9, 3, PAD]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"][1].tolist() == [-100, 9, -100, -100]
    assert b["next_sentence_label"].tolist() == [1, 0]
    assert b["token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 1, 0]]  # segment B kept, padding 0
    assert collate(ex, PAD, pad_to=6)["input_ids"].shape == (2, 6)
    assert collate(ex, PAD, pad_to=2)["input_ids"].shape == (2, 4)  # pad_to never cuts an example
    held = split_documents(20, 0.01, seed=3)[1]
    assert len(held) == 2  # at least 2 held out when held out at all


# ---- packing ------------------------------------------------------------------------------------

def test_pack_examples_places_every_item_once_within_capacity():
    from fastbert.pretraining_data import pack_examples
    rng = np.random.default_rng(11)
    for capacity in (16, 128):
        lengths = rng.integers(1, capacity + 1, size=500)
        lengths[:20] = capacity  # full rows on their own
        rows = pack_examples(lengths, capacity, np.random.default_rng(0))
        flat = np.concatenate(rows)
        assert sorted(flat.tolist()) == list(range(len(lengths)))  # every item once, none split
        assert all(lengths[r].sum() <= capacity for r in rows)
        assert all((np.diff(r) > 0).all() for r in rows)
        # best-fit decreasing uses at most 11/9 OPT + 1 rows, and OPT >= ceil(total / capacity)
        assert len(rows) <= 11 / 9 * math.ceil(lengths.sum() / capacity) + 1
        again = pack_examples(lengths, capacity, np.random.default_rng(0))
        assert all(np.array_equal(a, b) for a, b in zip(rows, again))  # seeded, repeatable
    with pytest.raises(ValueError, match="item lengths"):
        pack_examples(np.array([3, 17]), 16)


def test_pack_examples_puts_each_item_in_the_tightest_open_row():
    """Against a plain best-fit-decreasing oracle (scan every open row): the same rows, item for item,
    including ties (the most recently opened of the tightest rows) and fresh rows."""
    from fastbert.pretraining_data import pack_examples

    def oracle(lengths, capacity):
        free, last, rows = [], [], []  # row k: free[k] tokens left, reached at item number last[k]
        for step, i in enumerate(sorted(range(len(lengths)), key=lambda i: -lengths[i])):  # ties by index
            fits = [k for k in range(len(rows)) if 0 < free[k] and lengths[i] <= free[k]]
            if fits:  # the tightest; among equals, the row that reached that free space last
                k = max(fits, key=lambda k: (-free[k], last[k]))
            else:
                rows.append([]), free.append(capacity), last.append(-1)
                k = len(rows) - 1
            rows[k].append(i)
            free[k] -= lengths[i]
            last[k] = step
        return [sorted(r) for r in rows]  # in the order the rows were opened

    rng = np.random.default_rng(5)
    for capacity in (1, 7, 64, 128, 300):
        for n in (0, 1, 40, 300):
            lengths = rng.integers(1, capacity + 1, size=n)
            want = oracle(lengths.tolist(), capacity)
            want = [want[k] for k in np.random.default_rng(1).permutation(len(want))]  # the seeded row order
            # a numpy integer capacity (e.g. lengths.max() or a seq_len read from an array) packs the same
            for cap in (capacity, np.int64(capacity), np.int32(capacity)):
                got = [r.tolist() for r in pack_examples(lengths, cap, np.random.default_rng(1))]
                assert got == want, (capacity, type(cap), n)


def packing_data(corpus, n_docs, seq_len, seed=0, **kw):
    """PretrainingData over a synthetic corpus with fields set by hand (no tokenizer needed)."""
    data = PretrainingData.__new__(PretrainingData)
    data.corpus, data.doc_ids, data.seq_len, data.seed, data.mask_prob = corpus, np.arange(n_docs), seq_len, seed, 0.15
    data.nsp, data.short_seq_prob, data.max_predictions, data.continuation = True, 1.0, None, None
    data.pack, data.max_example_len = True, kw.get("max_example_len", seq_len)
    data.ids = {"pad": PAD, "unk": 1, "cls": CLS, "sep": SEP, "mask": MASK}
    vocab = 100 + sum(sum(d) for d in kw["lengths"])
    data.special_vocab = np.zeros(vocab, bool)
    data.special_vocab[:5] = True
    data.random_ids = np.arange(5, vocab)
    data._cache = data._rows = None
    return data


def test_packed_rows_hold_whole_examples_restarting_positions():
    from fastbert.pretraining_data import collate_packed
    rng = np.random.default_rng(2)
    lengths = [[int(x) for x in rng.integers(2, 12, size=rng.integers(1, 12))] for _ in range(60)]
    corpus = synthetic_corpus(lengths)
    seq_len = 48
    data = packing_data(corpus, 60, seq_len, lengths=lengths, max_example_len=30)
    inst = data.epoch(0)
    rows = data.rows(0)
    assert sorted(np.concatenate(rows).tolist()) == list(range(len(inst)))
    assert max(len(r) for r in rows) >= 2 and len(rows) < len(inst)
    batch_rows, pos = data.take_rows((0, len(rows) - 3), 5)
    assert pos == (1, 2) and len(batch_rows) == 5  # runs on into the next epoch
    batch_rows, _ = data.take_rows((0, 0), len(rows))
    b = collate_packed(batch_rows, PAD, pad_to=seq_len)
    assert b["input_ids"].shape == (len(rows), seq_len)  # never longer than seq_len
    width = max(len(r) for r in rows)
    assert b["next_sentence_label"].shape == (len(rows), width)
    counts = {"masked": 0, "mask": 0, "random": 0, "same": 0}
    for r, idx in enumerate(rows):
        mask, at = b["attention_mask"][r].numpy(), 0
        assert (b["next_sentence_label"][r, len(idx):] == -100).all()
        for j, i in enumerate(idx):
            ex = data.example(0, int(i))
            n = len(ex["input_ids"])
            span = slice(at, at + n)
            assert (mask[span] == j + 1).all()  # the example whole, in one row, numbered j + 1
            assert np.array_equal(b["input_ids"][r, span].numpy(), ex["input_ids"])
            assert np.array_equal(b["token_type_ids"][r, span].numpy(), ex["token_type_ids"])
            assert np.array_equal(b["labels"][r, span].numpy(), ex["labels"])
            assert b["position_ids"][r, span].tolist() == list(range(n))  # positions restart
            assert b["next_sentence_label"][r, j] == inst.nsp_labels[i]
            assert n <= 30  # max_example_len
            # masking per example, exactly as unpacked: round(15%) of its non-special tokens
            original = inst.tokens[inst.offsets[i]:inst.offsets[i + 1]]
            special = np.isin(original, [CLS, SEP])
            chosen = ex["labels"] != -100
            assert chosen.sum() == max(1, round((~special).sum() * 0.15)) and not chosen[special].any()
            got = ex["input_ids"][chosen]
            counts["masked"] += int(chosen.sum())
            counts["mask"] += int((got == MASK).sum())
            counts["same"] += int((got == original[chosen]).sum())
            counts["random"] += int(((got != MASK) & (got != original[chosen])).sum())
            at += n
        assert (mask[at:] == 0).all() and (b["labels"][r, at:] == -100).all()
    assert within_binomial(counts["mask"], counts["masked"], 0.8), counts
    assert within_binomial(counts["random"] + counts["same"], counts["masked"], 0.2), counts
    # NSP: a chunk of two or more sentences flips a fair coin
    n_coin = len(inst) - inst.forced_random
    assert within_binomial(int(inst.nsp_labels.sum()) - inst.forced_random, n_coin, 0.5)
    # far less padding than one example per row
    assert inst.offsets[-1] / (len(rows) * seq_len) > 0.9 > inst.offsets[-1] / (len(inst) * seq_len)


def test_shards_ignore_truncation_and_padding_of_the_tokenizer(tmp_path, tokenizer):
    """A tokenizer.json saved with truncation or padding on must
    neither cut long lines nor fill the shards with [PAD]; the tokenizer given is left as it was."""
    from tokenizers import Tokenizer

    from fastbert.tokenization import load_tokenizer
    saved = Tokenizer.from_str(tokenizer.to_str())
    saved.enable_truncation(8)
    saved.enable_padding(length=12, pad_id=PAD, pad_token="[PAD]")
    saved.save(str(tmp_path / "tokenizer.json"))
    long = "the cat sat on the mat . a dog ran in the park . the cat sat ."
    (tmp_path / "c.txt").write_text(f"{long}\nthe cat .\n", encoding="utf-8")
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    assert len(enc(long)) > 12
    for tok in (load_tokenizer(str(tmp_path / "tokenizer.json")), saved):
        corpus = tokenize_corpus([str(tmp_path / "c.txt")], tok, str(tmp_path / "cache"))
        assert [s.tolist() for s in corpus.document(0)] == [enc(long), enc("the cat .")]
    assert saved.truncation is not None and saved.padding is not None


def test_a_pickled_corpus_carries_its_tokens_once_and_reads_the_same(tmp_path):
    """A spawned worker gets the corpus pickled: its plain-ndarray views of the memory-mapped shards are
    rebuilt there, not sent as a second copy of every token."""
    import pickle
    from fastbert.pretraining_data import Corpus, Shard
    np.arange(50_000, dtype=np.uint16).tofile(tmp_path / "tokens.bin")
    tokens = np.memmap(tmp_path / "tokens.bin", dtype=np.uint16, mode="r", shape=(50_000,))
    corpus = Corpus([Shard(tokens, np.array([0, 10, 30_000, 50_000]), np.array([0, 2, 3]), "synthetic")])
    blob = pickle.dumps(corpus)
    assert tokens.nbytes < len(blob) < 1.5 * tokens.nbytes
    again = pickle.loads(blob)
    for i in range(corpus.num_documents):
        assert [s.tolist() for s in again.document(i)] == [s.tolist() for s in corpus.document(i)]


def test_token_share_samples_every_shard_within_one_budget():
    """token_share reads about `sample` tokens in all, an equal head of each shard: 4 shards of 100 tokens
    with token 7 only in the last shard's head, and a budget of 40: 10 per shard, 10 hits of 40."""
    shards = []
    for k in range(4):
        tokens = np.full(100, 5, dtype=np.int32)
        if k == 3:
            tokens[:10] = 7
        shards.append(Shard(tokens, np.array([0, 100]), np.array([0, 1]), f"<memory {k}>"))
    corpus = Corpus(shards)
    assert corpus.token_share(7, sample=40) == pytest.approx(10 / 40)
    assert corpus.token_share(7, sample=400) == pytest.approx(10 / 400)
    assert corpus.token_share(5, sample=1 << 22) == pytest.approx(390 / 400)
