"""Where a linear model puts sentiment_zh's dev accuracy: logistic regression on binary character
n-grams (n <= N, n-grams seen at least twice in train), L2 strength picked on dev (as the BERT runs
pick lr and epoch on dev). Full-batch L-BFGS in float64 with torch; no sklearn on this machine.
``--truncate 126`` keeps the first 126 characters of each text, what BERT sees at max length 128.

    python benchmarks/results/zh-two-stage-cpu-2026-11-27-s9/ngram_baseline.py [--truncate 126]
"""
import argparse
import collections
import json

import torch

DATA = "/work/shared/data/sentiment_zh"


def grams(text, n):
    return {text[i:i + k] for k in range(1, n + 1) for i in range(len(text) - k + 1)}


def features(rows, vocab, n):
    idx = [[vocab[g] for g in grams(r["text"], n) if g in vocab] for r in rows]
    ii = torch.tensor([i for i, x in enumerate(idx) for _ in x])
    jj = torch.tensor([j for x in idx for j in x])
    x = torch.sparse_coo_tensor(torch.stack([ii, jj]), torch.ones(len(jj), dtype=torch.float64),
                                (len(rows), len(vocab))).coalesce()
    return x, torch.tensor([r["label"] for r in rows], dtype=torch.float64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--truncate", type=int, default=None)
    args = ap.parse_args()
    load = lambda split: [json.loads(line) for line in open(f"{DATA}/{split}.jsonl")]  # noqa: E731
    train, dev = load("train"), load("dev")
    if args.truncate:
        for r in train + dev:
            r["text"] = r["text"][:args.truncate]
    for n in (2, 3, 4):
        counts = collections.Counter(g for r in train for g in grams(r["text"], n))
        vocab = {g: i for i, g in enumerate(g for g, c in counts.items() if c >= 2)}
        xt, yt = features(train, vocab, n)
        xd, yd = features(dev, vocab, n)
        for lam in (1e-4, 3e-4, 1e-3, 3e-3):
            w = torch.zeros(len(vocab), dtype=torch.float64, requires_grad=True)
            b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                z = torch.sparse.mm(xt, w[:, None]).squeeze(1) + b
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yt) + lam * (w * w).sum()
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                acc = ((torch.sparse.mm(xd, w[:, None]).squeeze(1) + b > 0).double() == yd).double().mean().item()
            print(f"truncate {args.truncate} | n <= {n} | {len(vocab)} n-grams | L2 {lam:g} | dev accuracy {acc:.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
