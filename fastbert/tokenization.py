"""WordPiece tokenizers for pretraining, built on the `tokenizers` library.

Three ways to get one (``build_tokenizer``):
- load: a ``vocab.txt`` (BERT's format, one token a line), a ``tokenizer.json``, or a folder holding
  either (a transformers checkpoint folder works);
- ``"wordpiece"``: train a WordPiece vocabulary on the corpus, with BERT's normalisation (clean-up,
  CJK characters split apart, lower case and accents stripped unless ``lowercase=False``);
- ``"chinese"``: the character level of BERT's Chinese models. Every CJK character is its own token
  (the normaliser puts spaces around each one, so WordPiece never joins them); runs of other scripts
  (Latin, digits) still get word pieces ("1998" may be one token), and such a word whose pieces the
  corpus never showed (a Latin word in a Chinese corpus with few) is [UNK]. Every character of the
  corpus is kept in the vocabulary.
  Text is NFKC-normalised first, so full-width and half-width forms (１/1, ！/!) are one token.

Caution: a vocab.txt carries no normaliser. A Chinese vocabulary loaded from vocab.txt alone, or by
transformers' ``BertTokenizer`` / ``BertTokenizerFast`` (which rebuild a plain BertNormalizer:
transformers 5 always), skips the NFKC step; ``AutoTokenizer.from_pretrained(run_folder)`` (the
folder names ``PreTrainedTokenizerFast`` for it) or fastbert's load_tokenizer read tokenizer.json as
saved and tokenize exactly as in training.

Caution: the `tokenizers` trainer may choose different merges at frequency ties from one process to
the next (huggingface/tokenizers#1794), so two trainings on the same text can differ. `fastbert
pretrain` therefore caches the vocabulary it trains (pretraining_data.trained_vocab_path, keyed by the
corpus files' contents and the settings) and later runs of the same corpus reuse it; a run keeps its
own (``--resume`` reuses it), and ``--tokenizer RUN_DIR`` reuses one across corpora.

``save_tokenizer`` writes vocab.txt, tokenizer.json, tokenizer_config.json and
special_tokens_map.json, so ``AutoTokenizer.from_pretrained(folder)`` loads the same tokenizer from a
run folder (and ``BertTokenizerFast`` does for a WordPiece one).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .trainer import atomic_write_text

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, or lacks a token BERT pretraining needs."""


def _bert_pipeline(tok: Tokenizer, lowercase: bool, nfkc: bool = False, strip_accents: bool | None = None,
                   handle_chinese_chars: bool = True) -> Tokenizer:
    # strip_accents None: follow lowercase (BERT's rule: uncased vocabularies strip accents)
    bert = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=handle_chinese_chars,
                                      strip_accents=strip_accents, lowercase=lowercase)
    # NFKC folds full-width digits, Latin letters and punctuation (１，Ａ！) into their ASCII forms, so
    # news text written full width and reviews written half width share one token per character.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), bert]) if nfkc else bert
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _add_post_processor(tok: Tokenizer) -> Tokenizer:
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)])
    return tok


def check_special_tokens(tok: Tokenizer, source: str = "tokenizer", required: Sequence[str] = SPECIAL_TOKENS,
                         needed_for: str = "BERT pretraining") -> None:
    missing = [t for t in required if tok.token_to_id(t) is None]
    if missing:
        raise TokenizerError(f"{source}: the vocabulary lacks {', '.join(missing)}; {needed_for} "
                             f"needs all of {', '.join(required)}")


def train_tokenizer(sentences: Iterable[str], kind: str = "wordpiece", vocab_size: int = 8192,
                    lowercase: bool = True, min_frequency: int = 2) -> Tokenizer:
    """Train a WordPiece vocabulary (``kind="wordpiece"``) or a Chinese character-level one
    (``kind="chinese"``) on an iterator of sentences."""
    if kind not in ("wordpiece", "chinese"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'wordpiece' or 'chinese'")
    nfkc = kind == "chinese"
    tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##")),
                         lowercase, nfkc)
    # English: BERT's 1000 most frequent characters; Chinese: every character must stay (a CJK
    # character never merges with a neighbour, so a dropped one would become [UNK]).
    alphabet = {"limit_alphabet": 1000} if kind == "wordpiece" else {}
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        continuing_subword_prefix="##", show_progress=False, **alphabet)
    tok.train_from_iterator(sentences, trainer=trainer)
    learned = tok.get_vocab()
    if len(learned) <= len(SPECIAL_TOKENS):
        raise TokenizerError("the corpus gave no tokens to build a vocabulary from")
    # The trainer numbers tokens in hash-map order, which changes from run to run; renumber them
    # (special tokens first, then sorted) so the same vocabulary always gives the same ids. The
    # vocabulary itself can still differ between processes: the trainer breaks ties between equally
    # frequent merges in hash-map order too (a few of 5.5k tokens on the sample corpus), so `fastbert
    # pretrain` caches what it trains and later runs reuse it (pretraining_data.trained_vocab_path).
    ordered = SPECIAL_TOKENS + sorted(t for t in learned if t not in SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(ordered)}
    tok = _bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##")),
                         lowercase, nfkc)
    return _add_post_processor(tok)


def _read_normalizer_flags(folder: str) -> dict:
    """BertNormalizer's options from a tokenizer_config.json beside a vocab.txt, as transformers'
    BertTokenizer reads them: do_lower_case, strip_accents, tokenize_chinese_chars (those absent or
    not booleans are left out)."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not a readable JSON file ({e})") from None
    names = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
             "tokenize_chinese_chars": "handle_chinese_chars"}
    return {ours: cfg[theirs] for theirs, ours in names.items() if isinstance(cfg.get(theirs), bool)} \
        if isinstance(cfg, dict) else {}


def load_vocab_txt(path: str, lowercase: bool | None = None, required: Sequence[str] = SPECIAL_TOKENS,
                   needed_for: str = "BERT pretraining") -> Tokenizer:
    """A BERT WordPiece tokenizer over a vocab.txt, normalised as the tokenizer_config.json beside it
    says (do_lower_case, strip_accents, tokenize_chinese_chars; lower-cased when it says nothing);
    ``lowercase``, when given, overrides do_lower_case. ``required``: the special tokens it must hold
    (pretraining needs all five; fine-tuning and encoding [UNK], [CLS] and [SEP])."""
    # As transformers' load_vocab: a token's id is its line number (a blank line holds an id too, and
    # a repeated token keeps its last line), so ids match BertTokenizerFast and the checkpoint's rows.
    vocab: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for index, line in enumerate(f):
                vocab[line.rstrip("\n").rstrip("\r")] = index
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not a UTF-8 vocab.txt ({e})") from None
    if not any(vocab):
        raise TokenizerError(f"{path}: the vocabulary file is empty")
    flags = {"lowercase": True, **_read_normalizer_flags(os.path.dirname(path) or ".")}
    if lowercase is not None:
        flags["lowercase"] = lowercase
    tok = _bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##")), **flags)
    check_special_tokens(tok, path, required, needed_for)
    return _add_post_processor(tok)


def load_tokenizer(path: str, lowercase: bool | None = None) -> Tokenizer:
    """Load a vocab.txt, a tokenizer.json, or a folder holding one (tokenizer.json preferred).

    ``lowercase`` applies to vocab.txt only (tokenizer.json carries its own normaliser); when None it
    is read from a tokenizer_config.json beside the file, else True (uncased BERT)."""
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer {path!r} does not exist (give a vocab.txt, a tokenizer.json, "
                             f"a folder with one, 'wordpiece' or 'chinese')")
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            path = os.path.join(path, "tokenizer.json")
        elif os.path.isfile(os.path.join(path, "vocab.txt")):
            path = os.path.join(path, "vocab.txt")
        else:
            raise TokenizerError(f"folder {folder!r} holds neither tokenizer.json nor vocab.txt")
    if path.endswith(".json"):
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception type for bad files
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None
        check_special_tokens(tok, path)
        return tok
    return load_vocab_txt(path, lowercase)


def _normalizer_nodes(tok: Tokenizer) -> list[dict]:
    """The tokenizer's normalisers (its JSON form), Sequence normalisers flattened, in order."""
    def walk(node) -> list[dict]:
        if not node:
            return []
        return [node] + [m for n in node.get("normalizers", []) or [] for m in walk(n)]
    return walk(json.loads(tok.to_str()).get("normalizer"))


def is_lowercase(tok: Tokenizer) -> bool:
    """Whether the tokenizer's normaliser lower-cases."""
    return any(n.get("type") == "Lowercase" or (n.get("type") == "BertNormalizer" and n.get("lowercase"))
               for n in _normalizer_nodes(tok))


def _bert_normalizer_options(tok: Tokenizer) -> dict:
    """The BertNormalizer's options in the tokenizer's normaliser; {} when it has none."""
    return next((n for n in _normalizer_nodes(tok) if n.get("type") == "BertNormalizer"), {})


def vocab_list(tok: Tokenizer) -> list[str]:
    """Tokens in id order; ids must be 0..n-1 with no gaps (vocab.txt cannot say otherwise)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise TokenizerError(
            f"no token has id {', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}: the vocab.txt "
            f"repeats a token (line {missing[0] + 1} and a later one; the later line's id wins, as in transformers); "
            f"a model trained on it needs every token once")
    return tokens


def save_tokenizer(tok: Tokenizer, folder: str, model_max_length: int = 512) -> None:
    """Write the four files transformers' BertTokenizerFast reads; each file atomically."""
    os.makedirs(folder, exist_ok=True)
    lowercase = is_lowercase(tok)
    atomic_write_text(os.path.join(folder, "vocab.txt"), "\n".join(vocab_list(tok)) + "\n")
    atomic_write_text(os.path.join(folder, "tokenizer.json"), tok.to_str(pretty=True))
    special = {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK}
    # transformers' BertTokenizer(Fast) rebuilds a plain BertNormalizer from do_lower_case (transformers 5
    # always, 4 when the flags differ), so a normaliser it cannot express (the Chinese kind's NFKC step)
    # needs the generic class, which AutoTokenizer loads from tokenizer.json exactly as saved.
    # The generic class returns only input_ids and attention_mask unless told BERT's inputs: without
    # token_type_ids a pair's second segment would run as type 0.
    bert_only = isinstance(tok.normalizer, normalizers.BertNormalizer)
    # the normaliser's own CJK split and accent stripping (a vocab.txt's tokenizer_config.json may have
    # set them): BertTokenizer rebuilds its normaliser from these flags, not from tokenizer.json
    options = _bert_normalizer_options(tok)
    config = {"tokenizer_class": "BertTokenizer" if bert_only else "PreTrainedTokenizerFast", "do_lower_case": lowercase,
              "tokenize_chinese_chars": bool(options.get("handle_chinese_chars", True)),
              "strip_accents": options.get("strip_accents"),
              "model_max_length": int(model_max_length), "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
              **special}
    atomic_write_text(os.path.join(folder, "tokenizer_config.json"), json.dumps(config, indent=2) + "\n")
    atomic_write_text(os.path.join(folder, "special_tokens_map.json"), json.dumps(special, indent=2) + "\n")


def build_tokenizer(spec: str | None, sentences: Iterator[str] | None = None, *, vocab_size: int = 8192,
                    lowercase: bool | None = None) -> Tokenizer:
    """``spec``: None or "wordpiece" (train on ``sentences``), "chinese" (character level, trained on
    ``sentences``), or a path to load."""
    if spec in (None, "wordpiece", "chinese"):
        if sentences is None:
            raise ValueError("training a tokenizer needs the corpus sentences")
        return train_tokenizer(sentences, spec or "wordpiece", vocab_size=vocab_size,
                               lowercase=True if lowercase is None else lowercase)
    return load_tokenizer(spec, lowercase)


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {name: tok.token_to_id(t) for name, t in
            (("pad", PAD), ("unk", UNK), ("cls", CLS), ("sep", SEP), ("mask", MASK))}


def continuation_mask(tok: Tokenizer) -> np.ndarray:
    """bool per id: True for a word piece that continues the previous token's word ("##...").
    Whole-word masking groups a token with the continuation pieces after it."""
    return np.array([t.startswith("##") for t in vocab_list(tok)], dtype=bool)
