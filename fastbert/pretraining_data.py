"""Pretraining data: corpus reading, tokenized shards, BERT's example creation and masking.

Corpus format (BERT's): UTF-8 text, one sentence per line, a blank line between documents; plain or
gzip (recognised by its magic bytes, whatever the file name); several files are read in order.

Pipeline:
1. ``tokenize_corpus`` streams each file once through the tokenizer (``encode_batch`` runs on every
   core in the tokenizers library's thread pool) into a shard in a cache folder keyed by the file's
   content hash and the tokenizer's hash: ``tokens.bin`` (flat token ids), ``sentences.npy``
   (sentence start offsets) and ``documents.npy`` (document start offsets, in sentences). A shard is
   written into a temporary folder and renamed into place, so an interrupted run leaves no half
   shard; later runs memory-map it instead of re-reading the text.
2. ``PretrainingData.epoch`` builds one epoch of segment pairs as BERT's create_pretraining_data does:
   chunks of whole sentences up to the target length (10% of targets shorter), split at a random
   sentence into A and B; half the time B is replaced by a span of another document (NSP label 1,
   "random next"), and the unused sentences go back into the pool; the pair is truncated one token at
   a time from a random end of the longer segment. Layout: ``[CLS] A [SEP] B [SEP]``, token types 0
   for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``. The pairs are re-drawn every epoch.
3. ``PretrainingData.example`` masks one pair: ``round(mask_prob * n)`` (at least 1) of its n
   non-special tokens are chosen (whole words with ``whole_word_mask``), 80% become [MASK], 10% a
   random non-special token and 10% stay; labels are -100 elsewhere. The choice is seeded by
   (seed, epoch, index), so it is re-drawn every epoch, independent of batch size and process count,
   and repeatable on resume. Token masking draws a batch's masks at once (``mask_batch``): every
   position gets counter-based random numbers hashed from (seed, epoch, index, position), the
   ``n_pred`` candidates with the smallest keys are chosen (a uniformly random subset); whole-word
   masking shuffles each example's words with a Generator seeded the same way (``mask_tokens``).

4. Packing (``pack=True``): the examples of an epoch, created and masked exactly as above, are
   packed whole into rows of ``seq_len`` tokens by best-fit decreasing (``pack_examples``; seeded
   row order), so a row holds several examples and little padding. A data position is then
   (epoch, row). ``collate_packed`` numbers the examples of a row in its attention_mask (1, 2, ...;
   0 = padding), restarts position_ids and token types per example, and gives the NSP labels as
   (rows, max examples per row) with -100 in the empty slots: the model input of packed rows that
   fastbert.BertModel documents. The example lengths are BERT's (``short_seq_prob`` as unpacked), so
   packing changes what a step holds, not the distribution of examples: it removes the padding of
   short examples (document ends, the short targets). ``max_example_len`` below ``seq_len`` makes
   every example shorter (more of them per row, less context each).

Documented behaviours: a chunk of one sentence (a one-sentence document, or one sentence that fills
the target length) can only be segment A (its B is then a random span, NSP label 1), as in BERT's
create_pretraining_data.py, so NSP is 50/50 only among chunks of several sentences: at a short
seq_len most pairs are random (``fastbert pretrain`` logs the share); NSP needs at least two
training documents (else a CorpusError suggests ``nsp=False``); with ``nsp=False`` B is always the
true continuation, or absent when a chunk has one sentence (``[CLS] A [SEP]``).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import operator
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .tokenization import Tokenizer, special_ids

SHARD_VERSION = 1
IGNORE_INDEX = -100


class CorpusError(ValueError):
    """The corpus is missing, empty, not text, or too small for what was asked."""


# ----------------------------------------------------------------------------------------------
# Reading text
# ----------------------------------------------------------------------------------------------

def _open_binary(path: str):
    if not os.path.exists(path):
        raise CorpusError(f"corpus file {path!r} does not exist")
    if os.path.isdir(path):
        raise CorpusError(f"corpus {path!r} is a folder; give the text files themselves")
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def iter_documents(path: str) -> Iterator[list[str]]:
    """Yield each document of a BERT-format file as a list of sentences (stripped, non-empty).

    Raises CorpusError for a missing file, a broken gzip stream, NUL bytes or invalid UTF-8 (binary
    junk), naming the file and line."""
    doc: list[str] = []
    try:
        with _open_binary(path) as raw:
            for lineno, line in enumerate(raw, 1):
                if b"\x00" in line:
                    raise CorpusError(f"{path}:{lineno}: NUL byte: this looks like a binary file, "
                                      f"not UTF-8 text")
                try:
                    text = line.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte "
                                      f"{e.start}); is this a binary file?") from None
                if text:
                    doc.append(text)
                elif doc:
                    yield doc
                    doc = []
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # zlib.error: garbage after a gzip header
        if isinstance(e, FileNotFoundError):
            raise CorpusError(f"corpus file {path!r} does not exist") from None
        raise CorpusError(f"{path}: cannot read ({e})") from None
    if doc:
        yield doc


def iter_sentences(paths: Sequence[str]) -> Iterator[str]:
    for path in paths:
        for doc in iter_documents(path):
            yield from doc


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> str:
    return os.environ.get("FASTBERT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "fastbert", "corpora")


# ----------------------------------------------------------------------------------------------
# Tokenized shards
# ----------------------------------------------------------------------------------------------

@dataclass
class Shard:
    tokens: np.ndarray      # (n_tokens,) uint16 or int32, memory-mapped
    sentences: np.ndarray   # (n_sentences + 1,) int64 start offsets into tokens
    documents: np.ndarray   # (n_documents + 1,) int64 start offsets into sentences
    path: str

    @property
    def num_documents(self) -> int:
        return len(self.documents) - 1


def _write_shard(path: str, tokenizer: Tokenizer, folder: str, batch_sentences: int = 8192) -> None:
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    sent_starts, doc_starts = [0], [0]
    n_tokens = 0
    pending: list[str] = []
    pending_docs: list[int] = []  # sentence count of each document in `pending`

    with open(os.path.join(folder, "tokens.bin"), "wb") as out:
        def flush():
            nonlocal n_tokens
            if not pending:
                return
            encodings = tokenizer.encode_batch(pending, add_special_tokens=False)
            k = 0
            for count in pending_docs:
                kept = 0
                for enc in encodings[k:k + count]:
                    ids = enc.ids
                    if not ids:  # a line of only control characters tokenizes to nothing
                        continue
                    out.write(np.asarray(ids, dtype=dtype).tobytes())
                    n_tokens += len(ids)
                    sent_starts.append(n_tokens)
                    kept += 1
                k += count
                if kept:
                    doc_starts.append(len(sent_starts) - 1)
            pending.clear()
            pending_docs.clear()

        for doc in iter_documents(path):
            pending.extend(doc)
            pending_docs.append(len(doc))
            if len(pending) >= batch_sentences:
                flush()
        flush()
    if n_tokens == 0:
        raise CorpusError(f"corpus file {path!r} is empty (no sentences with tokens)")
    np.save(os.path.join(folder, "sentences.npy"), np.asarray(sent_starts, dtype=np.int64))
    np.save(os.path.join(folder, "documents.npy"), np.asarray(doc_starts, dtype=np.int64))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"source": os.path.abspath(path), "dtype": np.dtype(dtype).name, "tokens": n_tokens,
                   "sentences": len(sent_starts) - 1, "documents": len(doc_starts) - 1,
                   "version": SHARD_VERSION}, f)


def _load_shard(folder: str) -> Shard:
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    tokens = np.memmap(os.path.join(folder, "tokens.bin"), dtype=np.dtype(meta["dtype"]), mode="r",
                       shape=(meta["tokens"],))
    return Shard(tokens, np.load(os.path.join(folder, "sentences.npy"), mmap_mode="r"),
                 np.load(os.path.join(folder, "documents.npy"), mmap_mode="r"), meta["source"])


def file_hashes(paths: Sequence[str]) -> dict[str, str]:
    """The sha256 of each file's bytes, for callers that key several caches on the same files (a
    corpus of gigabytes is read once for all of them)."""
    return {p: _file_sha256(p) for p in paths}


def shard_key(path: str, tokenizer: Tokenizer, file_hash: str | None = None) -> str:
    h = hashlib.sha256()
    h.update(f"fastbert-shard-v{SHARD_VERSION}\n".encode())
    h.update((file_hash or _file_sha256(path)).encode())
    h.update(hashlib.sha256(tokenizer.to_str().encode()).hexdigest().encode())
    return h.hexdigest()[:32]


def trained_vocab_path(paths: Sequence[str], kind: str, vocab_size: int, lowercase: bool,
                       cache_dir: str | None = None, hashes: dict[str, str] | None = None) -> str:
    """Where the vocabulary trained on these files (by content) with these settings is cached: the
    `tokenizers` trainer may break frequency ties differently from one process to the next
    (huggingface/tokenizers#1794), so runs of the same corpus share the first run's vocabulary (and
    with it the tokenized shards) rather than each training its own."""
    import tokenizers
    h = hashlib.sha256(f"fastbert-vocab-v1\n{kind}\n{vocab_size}\n{lowercase}\n{tokenizers.__version__}\n".encode())
    hashes = hashes or file_hashes(paths)
    for path in paths:
        h.update(hashes[path].encode())
    return os.path.join(cache_dir or default_cache_dir(), f"vocab-{h.hexdigest()[:32]}.json")


def tokenize_corpus(paths: Sequence[str], tokenizer: Tokenizer, cache_dir: str | None = None,
                    log=None, hashes: dict[str, str] | None = None) -> "Corpus":
    """Tokenize each file once into a cached, memory-mapped shard; return the corpus over them.
    ``hashes``: the files' sha256 (file_hashes) when the caller already has them."""
    if not paths:
        raise CorpusError("no corpus files given")
    for p in paths:  # fail before any work on a later missing file
        _open_binary(p).close()
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        # a tokenizer.json saved with truncation or padding on would
        # cut long lines and fill sentences with [PAD]; shards hold every sentence whole, unpadded
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    shards = []
    for path in paths:
        folder = os.path.join(cache_dir, shard_key(path, tokenizer, (hashes or {}).get(path)))
        if not os.path.isfile(os.path.join(folder, "meta.json")):
            if log:
                log(f"tokenizing {path} into {folder}")
            tmp = tempfile.mkdtemp(prefix=".tmp-shard-", dir=cache_dir)
            try:
                _write_shard(path, tokenizer, tmp)
                try:
                    os.rename(tmp, folder)
                except OSError:  # another process finished the same shard first
                    if not os.path.isfile(os.path.join(folder, "meta.json")):
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        shards.append(_load_shard(folder))
    return Corpus(shards)


class Corpus:
    """Documents of several shards behind one index; a document is a list of sentence id arrays."""

    def __init__(self, shards: list[Shard]):
        self.shards = shards
        self._first_doc = np.cumsum([0] + [s.num_documents for s in shards])
        # plain-ndarray views of the memmaps (no data read): slicing an np.memmap costs ~1 µs of
        # subclass overhead per slice, which adds up over an epoch's sentences
        self._views = [(np.asarray(s.tokens), np.asarray(s.sentences), np.asarray(s.documents)) for s in shards]

    def __getstate__(self):  # pickled (a spawned worker): the views would carry the tokens a second time
        return {"shards": self.shards}

    def __setstate__(self, state):
        self.__init__(state["shards"])

    @property
    def num_documents(self) -> int:
        return int(self._first_doc[-1])

    @property
    def num_tokens(self) -> int:
        return int(sum(len(s.tokens) for s in self.shards))

    def token_share(self, token_id: int, sample: int = 1 << 22) -> float:
        """The share of the corpus' tokens equal to ``token_id``, from about ``sample`` tokens in all,
        the head of every shard an equal part of it (a whole corpus of gigabytes would be read for a
        warning; one shard's head alone could be unlike the rest)."""
        hits = seen = 0
        per_shard = -(-sample // max(len(self._views), 1))
        for tokens, _, _ in self._views:
            head = tokens[:per_shard]
            hits += int(np.count_nonzero(head == token_id))
            seen += len(head)
        return hits / max(seen, 1)

    def document_span(self, i: int) -> tuple[np.ndarray, list[int]]:
        """Document ``i`` as one token array (a view of its shard, the shard's dtype) and its sentence
        boundaries: sentence t is tokens[starts[t]:starts[t + 1]]."""
        k = int(np.searchsorted(self._first_doc, i, side="right")) - 1
        tokens, sentences, documents = self._views[k]
        j = i - int(self._first_doc[k])
        bounds = sentences[int(documents[j]):int(documents[j + 1]) + 1]
        # a view, not a copy: a random segment B reads a few sentences of a document that may be long
        return tokens[int(bounds[0]):int(bounds[-1])], (bounds - bounds[0]).tolist()

    def document(self, i: int) -> list[np.ndarray]:
        """Document ``i`` as a list of sentences (int64 token arrays)."""
        tokens, starts = self.document_span(i)
        tokens = tokens.astype(np.int64)
        return [tokens[a:b] for a, b in zip(starts[:-1], starts[1:])]


# ----------------------------------------------------------------------------------------------
# Segment pairs (one epoch)
# ----------------------------------------------------------------------------------------------

@dataclass
class Instances:
    """One epoch of segment pairs, flat: instance i is tokens[offsets[i]:offsets[i+1]], laid out
    [CLS] A [SEP] B [SEP]; len_a[i] counts [CLS] A [SEP] (token type 0)."""
    tokens: np.ndarray
    offsets: np.ndarray
    len_a: np.ndarray
    nsp_labels: np.ndarray  # 1 = B is a random span of another document, 0 = the true next
    forced_random: int      # pairs that had to take a random B (a one-sentence chunk)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def _truncate_pair(a: list, b: list, max_tokens: int, rng: np.random.Generator) -> None:
    """BERT's truncate_seq_pair on [start, end) ranges: drop one token at a time from the longer
    segment, from its front or back with equal odds."""
    excess = (a[1] - a[0]) + (b[1] - b[0]) - max_tokens
    if excess <= 0:
        return
    coins = rng.random(excess) < 0.5
    for front in coins:
        seg = a if (a[1] - a[0]) > (b[1] - b[0]) else b
        if front:
            seg[0] += 1
        else:
            seg[1] -= 1


def create_instances(corpus: Corpus, doc_ids: np.ndarray, seq_len: int, rng: np.random.Generator, *,
                     cls_id: int, sep_id: int, short_seq_prob: float = 0.1, nsp: bool = True) -> Instances:
    """One epoch of BERT segment pairs from the documents ``doc_ids`` (visited in random order)."""
    max_tokens = seq_len - 3  # [CLS] A [SEP] B [SEP], with or without NSP (B: the continuation then)
    if max_tokens < 2:
        raise ValueError(f"seq_len {seq_len} is too short for [CLS] A [SEP] B [SEP]")
    doc_ids = np.asarray(doc_ids)
    if nsp and len(doc_ids) < 2:
        raise CorpusError("next-sentence prediction needs at least two documents to draw random "
                          "segments from; add documents or pass --no-nsp")
    pieces, lens, len_a, labels = [], [], [], []
    forced = 0
    cls, sep = np.array([cls_id]), np.array([sep_id])

    order = rng.permutation(len(doc_ids))
    for pos in order:
        # sentences are contiguous in a document: a chunk of them, or a run of a random document's,
        # is one slice of its tokens (sentence boundaries as Python ints: no numpy call per sentence)
        doc, starts = corpus.document_span(int(doc_ids[pos]))
        n_sent = len(starts) - 1
        target = max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
        c0, i = 0, 0  # the chunk is sentences c0..i
        while i < n_sent:
            if i == n_sent - 1 or starts[i + 1] - starts[c0] >= target:
                n_chunk = i - c0 + 1
                a_end = c0 + (int(rng.integers(1, n_chunk)) if n_chunk >= 2 else 1)  # A: sentences c0..a_end-1
                tokens_a = doc[starts[c0]:starts[a_end]]
                is_random = False
                if nsp and (n_chunk == 1 or rng.random() < 0.5):
                    forced += n_chunk == 1
                    is_random = True
                    other = int(rng.integers(0, len(doc_ids) - 1))
                    other += other >= pos  # any training document but this one
                    rand_doc, rand_starts = corpus.document_span(int(doc_ids[other]))
                    start = int(rng.integers(0, len(rand_starts) - 1))
                    need, end = target - len(tokens_a), start  # whole sentences from `start` until `need` is met
                    while True:
                        need -= rand_starts[end + 1] - rand_starts[end]
                        end += 1
                        if need <= 0 or end == len(rand_starts) - 1:
                            break
                    tokens_b = rand_doc[rand_starts[start]:rand_starts[end]]
                    i = a_end - 1  # the unused sentences start the next chunk
                else:
                    tokens_b = doc[starts[a_end]:starts[i + 1]]  # empty when A took the whole chunk
                ra, rb = [0, len(tokens_a)], [0, len(tokens_b)]
                _truncate_pair(ra, rb, max_tokens, rng)
                a = tokens_a[ra[0]:ra[1]]
                b = tokens_b[rb[0]:rb[1]]
                parts = [cls, a, sep] + ([b, sep] if len(b) else [])
                pieces.extend(parts)
                lens.append(sum(len(p) for p in parts))
                len_a.append(len(a) + 2)
                labels.append(int(is_random))
                c0 = i + 1
                target = max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
            i += 1
    if not lens:
        raise CorpusError("the corpus gave no training examples")
    tokens = np.concatenate(pieces).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return Instances(tokens, offsets, np.asarray(len_a, np.int32), np.asarray(labels, np.int64), forced)


# ----------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------

def mask_tokens(tokens: np.ndarray, special: np.ndarray, rng: np.random.Generator, *, mask_prob: float,
                mask_id: int, random_ids: np.ndarray, continuation: np.ndarray | None = None,
                max_predictions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BERT's create_masked_lm_predictions for one sequence.

    ``special``: bool per position, True where the token may not be masked ([CLS], [SEP], [PAD]).
    ``continuation``: bool per vocab id ("##" pieces): when given, whole words are masked together.
    Returns (input_ids, labels) with labels -100 at unmasked positions."""
    cand = np.flatnonzero(~special)
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
    inputs = tokens.astype(np.int64, copy=True)
    if len(cand) == 0 or mask_prob <= 0:
        return inputs, labels
    n_pred = max(1, int(round(len(cand) * mask_prob)))
    if max_predictions is not None:
        n_pred = min(n_pred, max_predictions)
    if continuation is None:
        chosen = rng.permutation(cand)[:n_pred]
    else:
        # words: a candidate that is a "##" piece joins the word before it; word w is
        # cand[first[w]:first[w + 1]] (Python ints and one slice per picked word: no array per word)
        starts = ~continuation[tokens[cand]]
        starts[0] = True
        first = np.flatnonzero(starts).tolist() + [len(cand)]
        picked, count = [], 0
        for w in rng.permutation(len(first) - 1).tolist():
            if count >= n_pred:
                break
            size = first[w + 1] - first[w]
            if count + size > n_pred:  # as BERT: skip a word that would overshoot
                continue
            picked.append(cand[first[w]:first[w + 1]])
            count += size
        chosen = np.concatenate(picked) if picked else np.empty(0, np.int64)
    chosen = np.sort(chosen)
    labels[chosen] = tokens[chosen]
    u = rng.random(len(chosen))
    to_mask = chosen[u < 0.8]
    to_random = chosen[(u >= 0.8) & (u < 0.9)]
    inputs[to_mask] = mask_id
    inputs[to_random] = random_ids[rng.integers(0, len(random_ids), len(to_random))]
    return inputs, labels


_U64 = np.uint64
_GOLDEN = np.array([0x9E3779B97F4A7C15], dtype=_U64)  # arrays: numpy wraps uint64 products silently


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (a bijection of uint64 with full avalanche)."""
    z = (z ^ (z >> _U64(30))) * np.array([0xBF58476D1CE4E5B9], dtype=_U64)
    z = (z ^ (z >> _U64(27))) * np.array([0x94D049BB133111EB], dtype=_U64)
    return z ^ (z >> _U64(31))


def position_keys(seed: int, epoch: int, indices: np.ndarray, length: int, streams: int) -> list[np.ndarray]:
    """``streams`` arrays of (len(indices), length) uint64 random keys, each a pure function of (seed,
    epoch, example index, stream, position): the fields are mixed in turn (add the field times the
    golden ratio, then SplitMix64's finaliser)."""
    # operator.index: numpy integers too (np.int64 & a 64-bit Python int overflows)
    z = _mix64(np.array([operator.index(seed) & (2**64 - 1)], dtype=_U64) + _GOLDEN)
    z = _mix64(z + _GOLDEN * _U64(operator.index(epoch) & (2**64 - 1)))
    z = _mix64(z + _GOLDEN * np.asarray(indices, dtype=_U64)[:, None])  # (n, 1)
    positions = _GOLDEN * np.arange(length, dtype=_U64)[None, :]
    return [_mix64(_mix64(z + _GOLDEN * _U64(stream + 1)) + positions) for stream in range(streams)]


def _uniform(keys: np.ndarray) -> np.ndarray:
    """Floats in [0, 1) from the top 53 bits of uint64 keys."""
    return (keys >> _U64(11)).astype(np.float64) * 2.0**-53


def mask_batch(tokens: np.ndarray, special: np.ndarray, seed: int, epoch: int, indices: np.ndarray, *,
               mask_prob: float, mask_id: int, random_ids: np.ndarray,
               max_predictions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """BERT's token masking for a batch of examples at once: ``tokens`` (n, L) int64 (padding past
    each example's end marked ``special``), ``indices`` the examples' indices in their epoch.

    Each example draws its own: ``max(1, round(mask_prob * c))`` of its c candidates, as mask_tokens
    counts (BERT's script counts [CLS] / [SEP] too), capped by ``max_predictions``; none with no
    candidate or mask_prob 0 — those with the smallest ``position_keys`` (stream 0), i.e. a uniformly
    random subset — then 80% [MASK], 10% a random id from ``random_ids``, 10% unchanged (streams 1
    and 2). Keys depend on (seed, epoch, index, position) only: an example's mask is the same in
    any batch. Returns (input_ids, labels) (n, L), labels -100 where not chosen."""
    n, length = tokens.shape
    candidate = ~special
    keys, u, pick = position_keys(seed, epoch, indices, length, 3)
    keys[special] = np.iinfo(np.uint64).max
    order = np.argsort(keys, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(length), (n, length)), axis=1)
    count = candidate.sum(1)
    n_pred = np.maximum(1, np.rint(count * mask_prob)).astype(np.int64)  # rint: half to even, as round()
    if mask_prob <= 0:
        n_pred[:] = 0
    if max_predictions is not None:
        n_pred = np.minimum(n_pred, max_predictions)
    chosen = candidate & (rank < n_pred[:, None])
    labels = np.where(chosen, tokens, IGNORE_INDEX).astype(np.int64)
    u = _uniform(u)
    inputs = np.where(chosen & (u < 0.8), mask_id, tokens).astype(np.int64)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    inputs[to_random] = random_ids[(_uniform(pick[to_random]) * len(random_ids)).astype(np.int64)]
    return inputs, labels


# ----------------------------------------------------------------------------------------------
# The data of a run
# ----------------------------------------------------------------------------------------------

def pack_examples(lengths: np.ndarray, capacity: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Pack items of the given lengths whole into rows of ``capacity`` tokens; returns each row's item
    indices (ascending). Best-fit decreasing: the longest item first, each into the open row whose
    free space it fills most tightly (a new row when none has room). Rows come in ``rng``'s random
    order (as made when None). Every length must be in [1, capacity]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    capacity = operator.index(capacity)  # a Python int: the free-space bitmask below is one (np.int64 shifts overflow)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must lie in [1, {capacity}], got [{lengths.min()}, {lengths.max()}]")
    # open rows by free space: free[r] lists the rows with r tokens free (r = 0: full, never reused)
    free: list[list[int]] = [[] for _ in range(capacity + 1)]
    nonempty = 0  # bit r set <=> free[r] holds a row: the tightest fit is the lowest set bit >= n
    rows: list[list[int]] = []
    order = np.argsort(-lengths, kind="stable")
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        fits = nonempty >> n
        if not fits:
            rows.append([])
            row, r = len(rows) - 1, capacity
        else:
            r = n + (fits & -fits).bit_length() - 1
            row = free[r].pop()
            if not free[r]:
                nonempty &= ~(1 << r)
        rows[row].append(i)
        left = r - n
        if left:
            free[left].append(row)
            nonempty |= 1 << left
    out = [np.sort(np.asarray(r, dtype=np.int64)) for r in rows]
    if rng is not None:
        out = [out[k] for k in rng.permutation(len(out))]
    return out


def split_documents(num_documents: int, eval_fraction: float, seed: int, max_eval_documents: int = 200,
                    min_train_documents: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a random ``eval_fraction`` of the documents (at least 2 when there are enough,
    at most ``max_eval_documents``) for evaluation; none when the corpus is too small."""
    ids = np.arange(num_documents)
    n_eval = min(max_eval_documents, int(round(num_documents * eval_fraction)))
    if eval_fraction > 0:
        n_eval = max(n_eval, 2)
    if num_documents - n_eval < min_train_documents or eval_fraction <= 0:
        return ids, ids[:0]
    perm = np.random.default_rng([seed, 0x5EED]).permutation(num_documents)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


class PretrainingData:
    """Examples of a run: epoch ``e`` holds its own segment pairs (seeded by (seed, e)) and each
    example's mask is seeded by (seed, e, index). A data position is (epoch, index)."""

    EVAL_EPOCH = 2**31 - 1
    MASK_CHUNK = 8192  # examples masked at once by examples()

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, doc_ids: np.ndarray, *, seq_len: int, seed: int,
                 mask_prob: float = 0.15, nsp: bool = True, whole_word_mask: bool = False,
                 short_seq_prob: float = 0.1, max_predictions: int | None = None, pack: bool = False,
                 max_example_len: int | None = None):
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        shortest = 5  # [CLS] A [SEP] B [SEP] with two tokens of text at least, with or without NSP
        if max_example_len is not None and not shortest <= max_example_len <= seq_len:
            raise ValueError(f"max_example_len must lie in [{shortest}, seq_len={seq_len}], got {max_example_len}")
        self.pack, self.max_example_len = pack, max_example_len or seq_len
        self.corpus, self.doc_ids = corpus, np.asarray(doc_ids)
        self.seq_len, self.seed, self.mask_prob, self.nsp = seq_len, seed, mask_prob, nsp
        self.short_seq_prob, self.max_predictions = short_seq_prob, max_predictions
        self.ids = special_ids(tokenizer)
        vocab = tokenizer.get_vocab_size()
        specials = {v for v in self.ids.values()}
        self.special_vocab = np.zeros(vocab, dtype=bool)
        self.special_vocab[list(specials)] = True
        # random replacements come from the ordinary tokens, never [CLS]/[SEP]/[PAD]/[MASK]/[UNK]
        self.random_ids = np.flatnonzero(~self.special_vocab)
        if whole_word_mask:
            from .tokenization import continuation_mask
            self.continuation = continuation_mask(tokenizer)
        else:
            self.continuation = None
        self._cache: tuple[int, Instances] | None = None
        self._rows: tuple[int, list[np.ndarray]] | None = None

    def epoch(self, epoch: int) -> Instances:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 1])
            self._cache = (epoch, create_instances(
                self.corpus, self.doc_ids, self.max_example_len, rng, cls_id=self.ids["cls"], sep_id=self.ids["sep"],
                short_seq_prob=self.short_seq_prob, nsp=self.nsp))
        return self._cache[1]

    def example(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        return self.examples(epoch, [index])[0]

    def examples(self, epoch: int, indices) -> list[dict[str, np.ndarray]]:
        """The masked examples ``indices`` of ``epoch`` (each the same as alone: its randomness is its
        own), token masking drawn for all of them at once."""
        inst = self.epoch(epoch)
        indices = np.asarray(indices, dtype=np.int64)
        if self.continuation is not None:  # whole words: a Python loop over each example's words anyway
            return [self._whole_word_example(inst, epoch, int(i)) for i in indices]
        if len(indices) > self.MASK_CHUNK:  # bounded memory (the padded batch's ~75 B per position)
            return [e for at in range(0, len(indices), self.MASK_CHUNK)
                    for e in self.examples(epoch, indices[at:at + self.MASK_CHUNK])]
        starts, ends = inst.offsets[indices], inst.offsets[indices + 1]
        lengths = ends - starts
        width = int(lengths.max()) if len(indices) else 0
        inside = np.arange(width)[None, :] < lengths[:, None]
        # (n, width) token ids, 0 past each end (marked special below, so never chosen)
        tokens = np.where(inside, inst.tokens[np.minimum(starts[:, None] + np.arange(width)[None, :],
                                                         len(inst.tokens) - 1)], 0).astype(np.int64)
        inputs, labels = mask_batch(tokens, self.special_vocab[tokens] | ~inside, self.seed, epoch, indices,
                                    mask_prob=self.mask_prob, mask_id=self.ids["mask"], random_ids=self.random_ids,
                                    max_predictions=self.max_predictions)
        out = []
        for row, (i, k) in enumerate(zip(indices.tolist(), lengths.tolist())):
            token_types = np.zeros(k, dtype=np.int64)
            token_types[inst.len_a[i]:] = 1
            # copies: a view would keep the whole padded batch alive as long as one example is
            out.append({"input_ids": inputs[row, :k].copy(), "token_type_ids": token_types,
                        "labels": labels[row, :k].copy(), "next_sentence_label": np.int64(inst.nsp_labels[i])})
        return out

    def _whole_word_example(self, inst: Instances, epoch: int, index: int) -> dict[str, np.ndarray]:
        tokens = inst.tokens[inst.offsets[index]:inst.offsets[index + 1]].astype(np.int64)
        token_types = np.zeros(len(tokens), dtype=np.int64)
        token_types[inst.len_a[index]:] = 1
        rng = np.random.default_rng([self.seed, epoch, index, 2])
        inputs, labels = mask_tokens(tokens, self.special_vocab[tokens], rng, mask_prob=self.mask_prob,
                                     mask_id=self.ids["mask"], random_ids=self.random_ids,
                                     continuation=self.continuation, max_predictions=self.max_predictions)
        return {"input_ids": inputs, "token_type_ids": token_types, "labels": labels,
                "next_sentence_label": np.int64(inst.nsp_labels[index])}

    def take(self, position: tuple[int, int], count: int) -> tuple[list[dict], tuple[int, int]]:
        """``count`` examples from ``position`` on, running into the next epoch when one ends."""
        epoch, index = position
        out = []
        while len(out) < count:
            n = len(self.epoch(epoch))
            if index >= n:
                epoch, index = epoch + 1, 0
                continue
            stop = min(n, index + count - len(out))
            out.extend(self.examples(epoch, range(index, stop)))
            index = stop
        return out, (epoch, index)

    def rows(self, epoch: int) -> list[np.ndarray]:
        """The packed rows of an epoch: each the indices of the examples it holds (``pack=True``)."""
        if self._rows is None or self._rows[0] != epoch:
            inst = self.epoch(epoch)
            self._rows = (epoch, pack_examples(np.diff(inst.offsets), self.seq_len,
                                               np.random.default_rng([self.seed, epoch, 3])))
        return self._rows[1]

    def take_rows(self, position: tuple[int, int], count: int) -> tuple[list[list[dict]], tuple[int, int]]:
        """``count`` packed rows (each a list of examples) from ``position`` = (epoch, row) on."""
        epoch, index = position
        out = []
        while len(out) < count:
            rows = self.rows(epoch)
            if index >= len(rows):
                epoch, index = epoch + 1, 0
                continue
            stop = min(len(rows), index + count - len(out))
            chunk = rows[index:stop]
            flat = self.examples(epoch, np.concatenate(chunk))
            for row in chunk:
                out.append(flat[:len(row)])
                flat = flat[len(row):]
            index = stop
        return out, (epoch, index)

    def eval_examples(self, limit: int) -> list[dict]:
        n = min(limit, len(self.epoch(self.EVAL_EPOCH)))
        examples = self.examples(self.EVAL_EPOCH, range(n))
        self._cache = None
        return examples


def collate(examples: list[dict], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Stack examples into int64 tensors, padded to ``pad_to`` (or the longest example); padding has
    attention_mask 0, token type 0 and label -100."""
    length = max(len(e["input_ids"]) for e in examples)
    if pad_to is not None:
        length = max(length, pad_to)
    n = len(examples)
    input_ids = np.full((n, length), pad_id, dtype=np.int64)
    token_types = np.zeros((n, length), dtype=np.int64)
    labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((n, length), dtype=np.int64)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = e["input_ids"]
        token_types[i, :k] = e["token_type_ids"]
        labels[i, :k] = e["labels"]
        attention[i, :k] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "token_type_ids": torch.from_numpy(token_types), "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.tensor([int(e["next_sentence_label"]) for e in examples])}


def collate_packed(rows: list[list[dict]], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Packed rows (each a list of examples laid end to end) as the model input of packed rows:
    attention_mask numbers the examples of a row 1, 2, ... (0 = padding), position_ids and
    token_type_ids restart per example, labels are per token (-100 at padding), and
    next_sentence_label is (rows, max examples per row) with -100 in the empty slots. Rows are
    padded to ``pad_to`` (or the longest row)."""
    length = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    if pad_to is not None:
        length = max(length, pad_to)
    n, width = len(rows), max(len(row) for row in rows)
    input_ids = np.full((n, length), pad_id, dtype=np.int64)
    token_types = np.zeros((n, length), dtype=np.int64)
    positions = np.zeros((n, length), dtype=np.int64)
    labels = np.full((n, length), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((n, length), dtype=np.int64)
    nsp = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(rows):
        at = 0
        for j, e in enumerate(row):
            k = len(e["input_ids"])
            input_ids[i, at:at + k] = e["input_ids"]
            token_types[i, at:at + k] = e["token_type_ids"]
            positions[i, at:at + k] = np.arange(k)
            labels[i, at:at + k] = e["labels"]
            attention[i, at:at + k] = j + 1
            nsp[i, j] = int(e["next_sentence_label"])
            at += k
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "token_type_ids": torch.from_numpy(token_types), "position_ids": torch.from_numpy(positions),
            "labels": torch.from_numpy(labels), "next_sentence_label": torch.from_numpy(nsp)}
