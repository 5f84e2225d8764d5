"""The host's share of a pretraining step: how long `fastbert pretrain` takes to build one step's batch.

    python -m benchmarks.bench_data                                   # sample corpus, 128 x 128, 40 steps
    python -m benchmarks.bench_data --corpus ../shared/data/pretrain/en.txt.gz --steps 100

On a GPU the batch is built on the host while the device trains (``--prefetch``, a thread that shares
the GIL with the thread launching the step's kernels), so every millisecond here is a millisecond the
launching thread may lose. GPU run of 2026-11-27 (H200, gpu-h200-2026-11-27-run1/RUN.md): the eager
loop kept 0.49-0.51 of the bare step's tokens/s, with CUDA graphs 0.93, on the sample corpus.

Rows, one per data recipe (plain, whole-word masking, packing), each from the CLI's own data code
(fastbert.pretraining_data: PretrainingData.take / take_rows, then collate / collate_packed):
  step_ms_median  a step that stays inside one epoch: sampling, masking and collating its examples
  step_ms_mean    over --steps consecutive steps, epoch boundaries included: at an epoch's first step
                  the epoch's segment pairs (documents cut into [CLS] A [SEP] B [SEP]) are built
  epoch_ms        building one epoch's segment pairs alone (PretrainingData.epoch)
  examples_per_s  the batch's examples over step_ms_median
No FLOPs: this is host Python and numpy; the figure to hold it against is the device's step time at
the same batch (e.g. ~24 ms for BERT-base 128 x 128 on an H200 with CUDA graphs: 47.0 ms at 256).
Output under $OUT (or benchmarks/results/): bench_data.json / .md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np

from benchmarks.harness import Recorder

# packed: examples of at most half a row (`fastbert pretrain --pack --max-example-len SEQ/2`), so rows hold several
RECIPES = {"plain": {}, "whole-word": {"whole_word_mask": True}, "packed": {"pack": True}}


def time_recipe(corpus, tokenizer, doc_ids, *, seq_len: int, batch: int, steps: int, **kw) -> dict:
    from fastbert.pretraining_data import PretrainingData, collate, collate_packed
    if kw.get("pack"):
        kw = dict(kw, max_example_len=seq_len // 2)
    def fresh():
        return PretrainingData(corpus, tokenizer, doc_ids, seq_len=seq_len, seed=0, **kw)
    alone = fresh()
    t0 = time.perf_counter()
    n_pairs = len(alone.epoch(0))
    epoch_ms = (time.perf_counter() - t0) * 1e3
    data = fresh()  # the timed steps build epoch 0 again, as a run does
    pad_id = data.ids["pad"]
    pos, times, n_examples = (0, 0), [], []
    for _ in range(steps):
        t = time.perf_counter()
        if kw.get("pack"):
            rows, nxt = data.take_rows(pos, batch)
            collate_packed(rows, pad_id, seq_len)
            n = sum(len(r) for r in rows)
        else:
            items, nxt = data.take(pos, batch)
            collate(items, pad_id, seq_len)
            n = len(items)
        times.append((time.perf_counter() - t) * 1e3)
        # a step that began a new epoch paid for building it
        n_examples.append((n, nxt[0] != pos[0] or pos == (0, 0)))
        pos = nxt
    inside = [t for t, (_, new_epoch) in zip(times, n_examples) if not new_epoch]
    median = statistics.median(inside or times)
    per_step = statistics.mean(n for n, _ in n_examples)
    return {"step_ms_median": median, "step_ms_mean": statistics.mean(times), "epoch_ms": epoch_ms,
            "pairs_per_epoch": n_pairs, "examples_per_step": per_step, "examples_per_s": per_step / median * 1e3}


def main(argv=None) -> int:
    from fastbert.pretrain import sample_corpus_path
    from fastbert.pretraining_data import iter_sentences, split_documents, tokenize_corpus
    from fastbert.tokenization import train_tokenizer
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=None, help="corpus file (default: the sample corpus in the package)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40, help="consecutive steps timed per recipe (default 40)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    args = ap.parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    corpus_path = args.corpus or sample_corpus_path()
    tokenizer = train_tokenizer(iter_sentences([corpus_path]), vocab_size=args.vocab_size)
    rec = Recorder("bench_data", corpus=corpus_path, batch=args.batch_size, seq=args.seq_len, steps=args.steps)
    with tempfile.TemporaryDirectory(prefix="bench_data-") as cache:
        corpus = tokenize_corpus([corpus_path], tokenizer, cache)
        train_docs, _ = split_documents(corpus.num_documents, 0.05, 0)
        for name in recipes:
            r = time_recipe(corpus, tokenizer, train_docs, seq_len=args.seq_len, batch=args.batch_size,
                            steps=args.steps, **RECIPES[name])
            rec.add(bench="bench_data", recipe=name, batch=args.batch_size, seq=args.seq_len,
                    documents=len(train_docs), **r)
    rec.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
