"""Metrics on hand-checked cases (chunk rules of conlleval; the SQuAD v1.1 evaluation script)."""
import pytest

from fastbert.metrics import (accuracy, bio_entities, entity_f1, exact_match_score, normalize_answer,
                              squad_scores, token_f1_score)


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(["a"], ["a"]) == 1.0
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])
    with pytest.raises(ValueError):
        accuracy([], [])


@pytest.mark.parametrize("tags, chunks", [
    (["O", "O"], []),
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    # an I- without a B- opens a chunk (conlleval, seqeval default mode)
    (["O", "I-PER", "I-PER", "O"], [("PER", 1, 2)]),
    (["I-PER"], [("PER", 0, 0)]),
    # a type change inside I- tags closes one chunk and opens another
    (["B-PER", "I-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 2, 3)]),
    # B- right after a chunk of the same type starts a new chunk
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),
    (["I-ORG", "B-ORG"], [("ORG", 0, 0), ("ORG", 1, 1)]),
    # a chunk open at the end of the sentence is closed there; types may contain dashes
    (["O", "B-geo-loc", "I-geo-loc"], [("geo-loc", 1, 2)]),
])
def test_bio_entities(tags, chunks):
    assert bio_entities(tags) == chunks


def test_bad_tag_raises():
    with pytest.raises(ValueError, match="E-PER"):
        bio_entities(["E-PER"])


def test_entity_f1_hand_counted():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "I-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"],  # PER right; LOC missed, ORG spurious
            ["B-ORG", "I-ORG", "I-MISC"]]      # ORG has the wrong end; MISC(2,2) right
    # gold chunks: PER, LOC, ORG(0,0), MISC(2,2) = 4; predicted: PER, ORG, ORG(0,1), MISC(2,2) = 4
    r = entity_f1(gold, pred)
    assert (r["n_gold"], r["n_pred"], r["n_correct"]) == (4, 4, 2)
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(0.5)
    assert r["f1"] == pytest.approx(0.5)


def test_entity_f1_unequal_precision_recall():
    gold = [["B-A", "I-A", "O", "B-B", "O", "B-C"]]
    pred = [["B-A", "I-A", "O", "O", "O", "O"]]
    r = entity_f1(gold, pred)
    assert r["precision"] == 1.0 and r["recall"] == pytest.approx(1 / 3)
    assert r["f1"] == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))


def test_entity_f1_chunks_do_not_cross_sentences():
    # the same tags as one sentence would give one chunk; as two sentences they give two
    assert entity_f1([["B-X", "I-X"]], [["B-X", "I-X"]])["n_gold"] == 1
    assert entity_f1([["B-X"], ["I-X"]], [["B-X"], ["I-X"]])["n_gold"] == 2


def test_entity_f1_degenerate():
    assert entity_f1([["O"]], [["O"]])["f1"] == 0.0
    assert entity_f1([["B-X"]], [["O"]])["f1"] == 0.0
    with pytest.raises(ValueError, match="sentence 0"):
        entity_f1([["O", "O"]], [["O"]])


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an apple,  a pear! ", "apple pear"),
    ("Theater", "theater"),            # 'the' is only removed as a whole word
    ("U.S.A.", "usa"),
    ("the", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_squad_em_and_f1():
    assert exact_match_score("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert exact_match_score("Eiffel", "Eiffel Tower") == 0.0
    # pred tokens {eiffel}, gold {eiffel, tower}: P = 1, R = 1/2, F1 = 2/3
    assert token_f1_score("Eiffel", "the Eiffel Tower") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: pred [x x y], gold [x y y] -> common 2
    assert token_f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1_score("cat", "dog") == 0.0
    assert token_f1_score("the", "a") == 1.0    # both normalise to empty
    assert token_f1_score("the", "dog") == 0.0


def test_squad_scores_take_best_gold():
    r = squad_scores(["Paris", "in 1889"], [["paris", "Paris, France"], ["1889", "in the year 1889"]])
    assert r["exact_match"] == pytest.approx(0.5)
    # second: vs "1889": P 1/2 R 1 -> 2/3; vs "in year 1889": P 1, R 2/3 -> 0.8
    assert r["f1"] == pytest.approx((1.0 + 0.8) / 2)


def test_squad_gold_answers_that_normalise_to_nothing_are_dropped_as_the_official_script_does():
    # golds "the" and "a" normalise to "": the official SQuAD 2.0 script drops them, so the question is
    # unanswerable and only an empty prediction matches; a real gold beside them still counts
    assert squad_scores([""], [["the", "a"]]) == {"exact_match": 1.0, "f1": 1.0}
    assert squad_scores([""], [["the", "cat"]]) == {"exact_match": 0.0, "f1": 0.0}
    assert squad_scores(["cat"], [["the", "the cat"]]) == {"exact_match": 1.0, "f1": 1.0}


# ------------------------------------------------------------------- mutation audit (session 14)

@pytest.mark.parametrize("gold, pred, precision, recall", [
    ([["O", "O"]], [["B-X", "O"]], 0.0, 0.0),   # no gold chunks: recall 0 (conlleval), not 1
    ([["B-X", "O"]], [["O", "O"]], 0.0, 0.0),   # no predicted chunks: precision 0, not 1
])
def test_entity_f1_empty_side_scores_zero(gold, pred, precision, recall):
    r = entity_f1(gold, pred)
    assert (r["precision"], r["recall"], r["f1"]) == (precision, recall, 0.0)


def test_token_f1_counts_repeated_tokens_with_multiplicity():
    # pred [x x x], gold [x x]: common 2 (not 1, as a set would say): P 2/3, R 1, F1 0.8
    assert token_f1_score("x x x", "x x") == pytest.approx(0.8)
    assert token_f1_score("x", "x x") == pytest.approx(2 / 3)


def test_squad_scores_take_the_best_gold_for_exact_match_and_f1_alike():
    """Each prediction is scored against every gold answer and keeps the best, wherever that gold
    stands in the list (first, middle or last)."""
    for golds in (["Paris", "London", "Rome"], ["London", "Paris", "Rome"], ["London", "Rome", "Paris"]):
        assert squad_scores(["paris"], [golds]) == {"exact_match": 1.0, "f1": 1.0}, golds


# ------------------------------------------------------------------- mutation audit (second pass)

@pytest.mark.parametrize("tag", ["B", "I", "B_PER", "IPER", "BPER"])
def test_tags_without_a_prefix_and_dash_raise(tag):
    """Only O, B-TYPE and I-TYPE are tags: a bare "B" / "I" or a prefix without its dash is refused
    (read_conll turns the ValueError into an error naming the line), not read as some chunk type."""
    with pytest.raises(ValueError, match="is not O, B-TYPE or I-TYPE"):
        bio_entities(["O", tag])


def test_entity_f1_refuses_a_different_number_of_sentences():
    """A prediction file one sentence short must not be scored on the sentences the two share."""
    with pytest.raises(ValueError, match="1 predicted sentences for 2 gold"):
        entity_f1([["B-X"], ["B-Y"]], [["B-X"]])


def test_squad_scores_refuse_mismatched_and_empty_inputs():
    with pytest.raises(ValueError, match="1 predictions for 2 questions"):
        squad_scores(["paris"], [["paris"], ["london"]])
    with pytest.raises(ValueError, match="empty set"):
        squad_scores([], [])


def test_normalize_answer_replaces_an_article_with_a_space():
    """The official script substitutes ' ' for an article (after dropping ASCII punctuation only), so an
    article between two non-ASCII dashes leaves two tokens: 'rock– –bye', not 'rock––bye'."""
    assert normalize_answer("Rock\u2013a\u2013bye") == "rock\u2013 \u2013bye"
    assert token_f1_score("Rock\u2013a\u2013bye", "\u2013bye") == pytest.approx(2 * 0.5 * 1 / 1.5)
