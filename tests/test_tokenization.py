"""Tokenizers for pretraining: training, Chinese character level, saving for transformers, bad vocabularies."""
import json
import os
import unicodedata

import pytest

from fastbert.pretrain import sample_corpus_path
from fastbert.tokenization import (SPECIAL_TOKENS, TokenizerError, continuation_mask, load_tokenizer,
                                   save_tokenizer, train_tokenizer, vocab_list)

ZH = ["我爱北京天安门。", "今天天气很好，我们去公园散步吧！", "人民日报发表社论《迈向新世纪》。",
      "床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"] * 3


@pytest.fixture(scope="module")
def english():
    with open(sample_corpus_path(), encoding="utf-8") as f:
        lines = [line for _, line in zip(range(800), f) if line.strip()]
    return train_tokenizer(lines, vocab_size=2000)


def test_trained_wordpiece_is_bert_like(english):
    assert [english.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert 1000 < english.get_vocab_size() <= 2000
    enc = english.encode("Emma Woodhouse, handsome and CLEVER.")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert enc.tokens[1:3] == ["emma", "woodhouse"]  # lower-cased, known words whole
    assert "clever" in enc.tokens
    # an unseen long word falls into word pieces, not [UNK]
    pieces = english.encode("unbelievableness", add_special_tokens=False).tokens
    assert len(pieces) > 1 and all(p.startswith("##") for p in pieces[1:]) and "[UNK]" not in pieces
    pair = english.encode("she smiled.", "he left.")
    na = len(english.encode("she smiled.", add_special_tokens=False).ids)
    nb = len(english.encode("he left.", add_special_tokens=False).ids)
    assert pair.type_ids == [0] * (na + 2) + [1] * (nb + 1)
    assert pair.tokens[na + 1] == "[SEP]" and pair.tokens[-1] == "[SEP]" and pair.tokens.count("[SEP]") == 2


def test_same_token_set_gets_the_same_ids():
    # tokenizers' trainer can pick different merges at frequency ties (huggingface/tokenizers#1794);
    # what we control: ids follow from the token set alone (specials first, then sorted)
    tok = train_tokenizer(["the cat sat on the mat ."] * 3, vocab_size=60, min_frequency=1)
    vocab = vocab_list(tok)
    assert vocab[:5] == SPECIAL_TOKENS and vocab[5:] == sorted(vocab[5:])


def test_cased_keeps_case():
    tok = train_tokenizer(["Emma met Harriet .", "Emma smiled ."] * 5, vocab_size=200, lowercase=False)
    assert tok.encode("Emma", add_special_tokens=False).tokens == ["Emma"]


def test_chinese_is_character_level():
    tok = train_tokenizer(ZH, "chinese", vocab_size=5000, min_frequency=1)
    text = "今天我们去北京。"
    tokens = tok.encode(text, add_special_tokens=False).tokens
    assert tokens == list(text)  # every CJK character (and the full stop) its own token
    # frequent pairs are NOT merged, even though they repeat in the corpus
    assert "明月" not in tok.get_vocab() and "天天" not in tok.get_vocab()
    # every character of the corpus made it into the vocabulary (in its NFKC form: "，" is ",")
    assert all(tok.token_to_id(c) is not None for c in set(unicodedata.normalize("NFKC", "".join(ZH))))
    # full-width and half-width forms are one token, so news text and reviews share them
    full, half = (tok.encode(t, add_special_tokens=False).ids for t in ("好，去！", "好,去!"))
    assert full == half and tok.token_to_id("[UNK]") not in half


def test_whole_word_continuation_mask(english):
    cont = continuation_mask(english)
    vocab = vocab_list(english)
    assert len(cont) == english.get_vocab_size()
    assert all(cont[i] == vocab[i].startswith("##") for i in range(len(vocab)))
    assert not cont[:5].any()


def test_saved_tokenizer_loads_in_transformers(english, tmp_path):
    from transformers import AutoTokenizer, BertTokenizer, BertTokenizerFast

    save_tokenizer(english, tmp_path, model_max_length=128)
    assert sorted(os.listdir(tmp_path)) == ["special_tokens_map.json", "tokenizer.json",
                                           "tokenizer_config.json", "vocab.txt"]
    text_a, text_b = "Mr. Knightley laughed at Emma's schemes.", "Harriet blushed."
    ours = english.encode(text_a, text_b)
    for cls in (BertTokenizerFast, AutoTokenizer, BertTokenizer):
        hf = cls.from_pretrained(str(tmp_path))
        got = hf(text_a, text_b)
        assert got["input_ids"] == ours.ids, cls.__name__
        assert got["token_type_ids"] == ours.type_ids
        assert hf.mask_token_id == english.token_to_id("[MASK]")
    # and it loads back into ours from the folder, the tokenizer.json and the vocab.txt
    for path in (tmp_path, tmp_path / "tokenizer.json", tmp_path / "vocab.txt"):
        assert load_tokenizer(str(path)).encode(text_a, text_b).ids == ours.ids, path


def test_vocab_txt_lowercase_read_from_config(tmp_path):
    tok = train_tokenizer(["Emma met Harriet ."] * 5, vocab_size=100, lowercase=False)
    save_tokenizer(tok, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["do_lower_case"] is False
    loaded = load_tokenizer(str(tmp_path / "vocab.txt"))
    assert loaded.encode("Emma", add_special_tokens=False).tokens == ["Emma"]


@pytest.mark.parametrize("drop", ["[PAD]", "[UNK]", "[MASK]", "[CLS]", "[SEP]"])
def test_vocab_without_special_token_is_refused(tmp_path, drop):
    tokens = [t for t in SPECIAL_TOKENS + ["the", "cat", "##s"] if t != drop]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=rf"lacks \{drop}"):
        load_tokenizer(str(tmp_path / "vocab.txt"))


def test_tokenizer_json_without_mask_is_refused(english, tmp_path):
    data = json.loads(english.to_str())
    data["model"]["vocab"].pop("[MASK]")
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[MASK]"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"lacks \[MASK\]"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_missing_and_junk_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.txt"))
    (tmp_path / "tokenizer.json").write_bytes(b"\x00\x01 not json")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(str(empty))


@pytest.mark.parametrize("extra", [["the", "", "cat"], ["the", "cat", "the"]], ids=["blank_line", "duplicate"])
def test_vocab_txt_ids_are_line_numbers_as_in_transformers(tmp_path, extra):
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + extra + ["sat", "##s"]) + "\n", encoding="utf-8")
    text = "the cat sat cats"
    assert load_tokenizer(str(tmp_path)).encode(text).ids == BertTokenizerFast.from_pretrained(str(tmp_path))(text)["input_ids"]


@pytest.mark.parametrize("config", [{"do_lower_case": True, "strip_accents": False},
                                    {"do_lower_case": False, "strip_accents": True},
                                    {"do_lower_case": True, "tokenize_chinese_chars": False}, {}],
                         ids=["lower-keep-accents", "cased-strip-accents", "no-cjk-split", "no-config"])
def test_vocab_txt_normaliser_options_as_transformers_reads_them(tmp_path, config):
    """A vocab.txt checkpoint's tokenizer_config.json options (do_lower_case, strip_accents,
    tokenize_chinese_chars) are read by pretraining's and fine-tuning's loaders alike, giving
    transformers' ids: strip_accents and the CJK split used to be fixed, so a lower-cased vocabulary
    that keeps accents read 'café' as 'cafe'."""
    from transformers import BertTokenizer

    from fastbert.tasks import load_tokenizer as finetune_tokenizer

    words = ["café", "cafe", "naïve", "naive", "Café", "Cafe", "北京", "北", "京", "is", "in"]
    (tmp_path / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + words) + "\n", encoding="utf-8")
    if config:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    text = "Café is naïve in 北京"
    want = BertTokenizer.from_pretrained(str(tmp_path))(text)["input_ids"]
    assert load_tokenizer(str(tmp_path)).encode(text).ids == want
    assert finetune_tokenizer(str(tmp_path)).encode(text).ids == want


def test_saved_chinese_tokenizer_keeps_nfkc_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(ZH, "chinese", vocab_size=5000, min_frequency=1)
    save_tokenizer(tok, tmp_path)
    text = "今天天气很好，我们去公园！"  # full-width punctuation: NFKC folds it to the vocabulary's "," and "!"
    assert AutoTokenizer.from_pretrained(str(tmp_path))(text)["input_ids"] == tok.encode(text).ids


@pytest.mark.parametrize("kind", ["wordpiece", "chinese"])
def test_saved_tokenizer_gives_transformers_the_token_types(tmp_path, kind):
    """AutoTokenizer on a saved tokenizer returns the token_type_ids of a pair, as ours encodes it:
    without them a transformers user's second segment would run as type 0 (the Chinese kind saves the
    generic PreTrainedTokenizerFast, whose default inputs lack them)."""
    from transformers import AutoTokenizer

    tok = train_tokenizer(ZH * 2 + ["Emma met Harriet.", "Mr. Knightley laughed."] * 5, kind,
                          vocab_size=5000, min_frequency=1)
    save_tokenizer(tok, tmp_path)
    text_a, text_b = "我们去公园。", "今天天气很好！"
    ours = tok.encode(text_a, text_b)
    got = AutoTokenizer.from_pretrained(str(tmp_path))(text_a, text_b)
    assert got["input_ids"] == ours.ids
    assert got.get("token_type_ids") == ours.type_ids and 1 in ours.type_ids


# ------------------------------------------------------------------- mutation audit (session 14)

def test_chinese_vocabulary_keeps_every_character_past_a_thousand():
    """Chinese kind: every character of the corpus stays in the vocabulary, however many there are
    (a limit on the alphabet, as the English kind has, would make the rare ones [UNK])."""
    chars = [chr(0x4E00 + k) for k in range(1200)]
    lines = ["".join(chars[k:k + 40]) for k in range(0, 1200, 40)]
    tok = train_tokenizer(lines, "chinese", vocab_size=5000, min_frequency=1)
    assert all(tok.token_to_id(c) is not None for c in chars)
    assert tok.encode(chars[-1], add_special_tokens=False).tokens == [chars[-1]]


def test_continuation_mask_marks_only_double_hash_pieces(tmp_path):
    vocab = SPECIAL_TOKENS + ["#", "#tag", "##s", "cat"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = load_tokenizer(str(tmp_path / "vocab.txt"))
    assert continuation_mask(tok).tolist() == [False] * 5 + [False, False, True, False]


def test_is_lowercase_reads_a_lowercase_normaliser_too():
    """A tokenizer.json whose normaliser lower-cases with Lowercase (not BertNormalizer) is uncased:
    save_tokenizer then writes do_lower_case true."""
    from tokenizers import normalizers

    from fastbert.tokenization import is_lowercase
    tok = train_tokenizer(["the cat sat on the mat ."] * 3, vocab_size=60, min_frequency=1)
    assert is_lowercase(tok)
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    assert is_lowercase(tok)
    tok.normalizer = normalizers.NFKC()
    assert not is_lowercase(tok)
    cased = train_tokenizer(["The cat sat ."] * 3, vocab_size=60, min_frequency=1, lowercase=False)
    assert not is_lowercase(cased)


def test_a_folder_with_both_files_loads_tokenizer_json(tmp_path):
    """tokenizer.json is preferred to vocab.txt: a saved Chinese tokenizer keeps its NFKC step when
    loaded from its folder (vocab.txt carries no normaliser)."""
    tok = train_tokenizer(ZH, "chinese", vocab_size=5000, min_frequency=1)
    save_tokenizer(tok, tmp_path)
    back = load_tokenizer(str(tmp_path))
    full, half = (back.encode(t, add_special_tokens=False).ids for t in ("好，去！", "好,去!"))
    assert full == half and back.token_to_id("[UNK]") not in full


def test_uncased_strips_accents_as_bert_uncased():
    tok = train_tokenizer(["the cafe was open .", "a naive cat ."] * 3, vocab_size=100, min_frequency=1)
    assert tok.encode("Café naïve", add_special_tokens=False).tokens == ["cafe", "naive"]


def test_build_tokenizer_passes_lowercase_on():
    from fastbert.tokenization import build_tokenizer
    tok = build_tokenizer(None, iter(["Emma met Harriet .", "Emma smiled ."] * 5), vocab_size=200, lowercase=False)
    assert tok.encode("Emma", add_special_tokens=False).tokens == ["Emma"]


def test_chinese_nfkc_folds_before_the_cjk_split():
    """NFKC runs before BERT's normaliser, so a compatibility form that folds to a CJK character
    (the Kangxi radical ⽉ -> 月) is split off as that character, even beside a digit."""
    tok = train_tokenizer(ZH + ["今年2月2日。"], "chinese", vocab_size=5000, min_frequency=1)
    assert tok.encode("2⽉", add_special_tokens=False).tokens == ["2", "月"]


# ------------------------------------------------------------------- mutation audit (session 27)

def _vocab_dir(folder, words, config=None):
    """A folder holding a vocab.txt of these lines (and a tokenizer_config.json of this text)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(config, encoding="utf-8")
    return str(folder)


@pytest.mark.parametrize("text", ["the cat\x00s", "the cat\ufffds", "the\x07 cats"])
def test_control_characters_are_cleaned_as_transformers_does(tmp_path, text):
    """BERT's clean-up drops NUL, U+FFFD and control characters before word pieces are looked up
    (scraped text carries them): 'cat\\x00s' reads as 'cats', not as one unknown word."""
    from transformers import BertTokenizer
    folder = _vocab_dir(tmp_path, SPECIAL_TOKENS + ["the", "cat", "##s"])
    got = load_tokenizer(folder).encode(text)
    assert got.tokens == ["[CLS]", "the", "cat", "##s", "[SEP]"]
    assert got.ids == BertTokenizer.from_pretrained(folder)(text)["input_ids"]


def test_decode_joins_word_pieces(tmp_path):
    """decode (and the tokenizer.json that transformers' AutoTokenizer decodes with) glues '##' pieces
    back onto their word: 'the cat ##s' is 'the cats'."""
    from transformers import AutoTokenizer
    tok = load_tokenizer(_vocab_dir(tmp_path / "vocab", SPECIAL_TOKENS + ["the", "cat", "##s"]))
    ids = tok.encode("the cats", add_special_tokens=False).ids
    assert tok.decode(ids) == "the cats"
    save_tokenizer(tok, str(tmp_path / "saved"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "saved")).decode(ids) == "the cats"


def test_training_refuses_an_unknown_kind_and_an_empty_corpus():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
        train_tokenizer(["the cat sat ."], "bpe")
    with pytest.raises(TokenizerError, match="no tokens"):
        train_tokenizer(["", "   "], vocab_size=100, min_frequency=1)


def test_min_frequency_reaches_the_trainer():
    """A word seen once becomes a token with min_frequency=1 and stays in pieces with 2: WordPiece merges
    need a pair seen at least min_frequency times."""
    assert "cat" in train_tokenizer(["cat dog ."], vocab_size=100, min_frequency=1).get_vocab()
    assert "cat" not in train_tokenizer(["cat dog ."], vocab_size=100, min_frequency=2).get_vocab()


def test_wordpiece_alphabet_keeps_the_thousand_most_frequent_characters():
    """The English kind keeps BERT's 1000 most frequent characters (the Chinese kind keeps all, tested
    above): of 1200 characters, the 200 seen once are left out when 1000 are seen twice."""
    chars = [chr(0x4E00 + k) for k in range(1200)]
    lines = ["".join(chars[k:k + 40]) for k in range(0, 1200, 40)] + ["".join(chars[k:k + 40]) for k in range(0, 1000, 40)]
    vocab = train_tokenizer(lines, vocab_size=5000, min_frequency=1).get_vocab()
    assert all(c in vocab for c in chars[:1000]) and not any(c in vocab for c in chars[1000:])


@pytest.mark.parametrize("config, error", [("{not json", "not a readable JSON file"), ("[1, 2]", None),
                                           ('{"do_lower_case": null, "strip_accents": null}', None),
                                           ('{"do_lower_case": "no", "tokenize_chinese_chars": 0}', None)],
                         ids=["junk", "not-a-dict", "nulls", "not-booleans"])
def test_a_bad_tokenizer_config_is_refused_or_ignored(tmp_path, config, error):
    """Beside a vocab.txt: a tokenizer_config.json that is not JSON is a TokenizerError naming it; one
    that is not an object, or whose flags are not booleans, leaves BERT's defaults (lower case, strip
    accents, split CJK), as with no config at all."""
    from transformers import BertTokenizer
    words = SPECIAL_TOKENS + ["cafe", "café", "Café", "北", "京", "北京"]
    want = BertTokenizer.from_pretrained(_vocab_dir(tmp_path / "plain", words))("Café 北京")["input_ids"]
    folder = _vocab_dir(tmp_path, words, config)
    if error:
        with pytest.raises(TokenizerError, match=error):
            load_tokenizer(folder)
    else:
        assert load_tokenizer(folder).encode("Café 北京").ids == want == [2, 5, 8, 9, 3]  # cafe, 北, 京


def test_a_vocab_txt_of_blank_lines_is_empty(tmp_path):
    with pytest.raises(TokenizerError, match="vocabulary file is empty"):
        load_tokenizer(_vocab_dir(tmp_path, ["", ""]))


@pytest.mark.parametrize("config, lowercase, want", [('{"do_lower_case": true}', False, ["Emma"]),
                                                     ('{"do_lower_case": false}', True, ["emma"])])
def test_lowercase_argument_overrides_the_config_also_through_build_tokenizer(tmp_path, config, lowercase, want):
    from fastbert.tokenization import build_tokenizer
    folder = _vocab_dir(tmp_path, SPECIAL_TOKENS + ["emma", "Emma"], config)
    for path in (folder, os.path.join(folder, "vocab.txt")):
        assert load_tokenizer(path, lowercase=lowercase).encode("Emma", add_special_tokens=False).tokens == want
        assert build_tokenizer(path, lowercase=lowercase).encode("Emma", add_special_tokens=False).tokens == want


def test_vocab_list_refuses_ids_with_no_token(tmp_path):
    """A vocab.txt repeating a token leaves the first line's id unused (the last line wins): a model
    trained on it would have a row no token reaches, so vocab_list (what save_tokenizer writes) refuses."""
    tok = load_tokenizer(_vocab_dir(tmp_path, SPECIAL_TOKENS + ["the", "cat", "the"]))
    with pytest.raises(TokenizerError, match=r"no token has id 5: .* \(line 6 and a later one"):
        vocab_list(tok)


def test_special_ids_are_the_vocabularys_own(tmp_path):
    """special_ids reads each special token's id from the vocabulary, here in a non-default order
    ([SEP] before [CLS]), as transformers reports them."""
    from transformers import BertTokenizerFast

    from fastbert.tokenization import special_ids
    folder = _vocab_dir(tmp_path, ["[PAD]", "a", "[UNK]", "[SEP]", "[CLS]", "[MASK]", "b"])
    hf = BertTokenizerFast.from_pretrained(folder)
    want = {"pad": 0, "unk": 2, "cls": 4, "sep": 3, "mask": 5}
    assert special_ids(load_tokenizer(folder)) == want == {
        "pad": hf.pad_token_id, "unk": hf.unk_token_id, "cls": hf.cls_token_id, "sep": hf.sep_token_id,
        "mask": hf.mask_token_id}


def test_saved_model_max_length_reaches_transformers(english, tmp_path):
    """save_tokenizer's model_max_length is what transformers truncates to."""
    from transformers import AutoTokenizer
    save_tokenizer(english, str(tmp_path), model_max_length=16)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.model_max_length == 16
    assert len(hf("emma " * 40, truncation=True)["input_ids"]) == 16


@pytest.mark.parametrize("config", [{"do_lower_case": True, "strip_accents": False},
                                    {"do_lower_case": False, "strip_accents": True},
                                    {"do_lower_case": True, "tokenize_chinese_chars": False}],
                         ids=["lower-keep-accents", "cased-strip-accents", "no-cjk-split"])
def test_saved_tokenizer_keeps_the_accent_and_cjk_options_it_was_loaded_with(tmp_path, config):
    """A vocab.txt tokenizer loaded with strip_accents / tokenize_chinese_chars from its config, then
    saved (a pretraining run's folder): transformers' BertTokenizer rebuilds its normaliser from the saved
    tokenizer_config.json, so those flags must be written as loaded. They were always written as
    strip_accents null / tokenize_chinese_chars true, and the run folder read 'Café' as 'cafe' in
    transformers (and in fastbert's vocab.txt loader) although training kept the accent."""
    from transformers import AutoTokenizer, BertTokenizer
    words = ["café", "cafe", "naïve", "naive", "Café", "Cafe", "北京", "北", "京", "is", "in"]
    source = _vocab_dir(tmp_path / "source", SPECIAL_TOKENS + words, json.dumps(config))
    text = "Café is naïve in 北京"
    want = BertTokenizer.from_pretrained(source)(text)["input_ids"]
    tok = load_tokenizer(source)
    assert tok.encode(text).ids == want
    save_tokenizer(tok, str(tmp_path / "saved"))
    for cls in (BertTokenizer, AutoTokenizer):
        assert cls.from_pretrained(str(tmp_path / "saved"))(text)["input_ids"] == want, cls.__name__
    assert load_tokenizer(str(tmp_path / "saved" / "vocab.txt")).encode(text).ids == want
