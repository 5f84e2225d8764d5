"""Benchmark of the memory-bound fused ops: bias-GELU, add+LayerNorm, GELU+LayerNorm, embeddings+LayerNorm.

GPU only. bf16, 32k tokens (64 x 512), BERT-base (hidden 768, FFN 3072) and BERT-large (1024, 4096)
widths; fastbert (the public fastbert.kernels ops: Triton) beside PyTorch eager and torch.compile of
the same function, forward and forward+backward. Reports GB/s by the state-bytes formulas below and
the fraction of the device-to-device copy bandwidth measured in the same run.

State bytes (s = 2 bytes for bf16, T tokens, n width, V vocab; vectors of n and id tensors ignored):
  bias_gelu        fwd  2 T n s (read x, write y)
                   bwd  3 T n s (read x, dy; write dx)
  add_layer_norm   fwd  3 T n s (read x, residual; write y)
                   bwd  4 T n s (read dy, x, residual; write d residual), + T n s for dx when p > 0
  add_layer_norm   the autocast pattern (x bf16, residual fp32, y fp32 plus its bf16 copy for the next matmul):
   + bf16 copy     fwd  (2 + 4 + 4 + 2) T n (read x, residual; write y, copy)
                   bwd  (4 + 2 + 2 + 4 + 4 + 2) T n (read dy, d copy, x, residual; write d residual, dx)
                   fastbert fuses the copy and its gradient (low_dtype=); "fastbert-unfused" is the single-
                   output op followed by .to(bf16), autograd adding the two gradients (what the model ran
                   before the fusion); eager / compile: F.layer_norm on x.float() + residual, then .to
  add_layer_norm   the same with the dense bias of x (x_bias=, fp32): the bytes of the copy case (the bias is
   + dense bias    a vector). fastbert adds it in the kernel and sums its gradient in the LayerNorm backward;
                   "fastbert-unfused" adds it in a separate op ((x + bias) in bf16, then the copy case's fused
                   op) and autograd sums its gradient over the rows (a reduction kernel). In the model the
                   matmul's epilogue adds the bias for free, so that competitor's forward overstates what the
                   fusion saves by one bf16 pass (read and write T n s); the reduction is what it removes
  gelu_layer_norm  fwd  2 T n s (read x, write y)
                   bwd  3 T n s (read dy, x; write dx)
  embed_layer_norm fwd  2 T n s (gather word rows, write y; position/type rows stay in cache)
                   bwd  2 T n s + V n s (read dy, re-gather word rows; write the word-table gradient)
fwd+bwd counts the sum. These are the bytes the op cannot avoid, so GB/s compare implementations on
the same work. graph_* columns: the same call's device time alone, replayed from a CUDA graph
(harness.measure_graphed, every impl alike): called one at a time from Python these ops are short
enough that a slow host's launch cost can be most of median_ms (a p20-p80 spread is the sign), while
inside the model's CUDA-graphed step only the device time remains. Caution: replays do not flush L2
between calls, and a 32k x 768 bf16 working set (~48 MB per tensor) partly stays in an H100/H200's
50 MB L2, so graph_frac_of_ceiling (against a 1 GB copy) can read high, even above 1.
(fastbert's embedding backward also writes and reads an fp32 dh, 8 T n bytes, which
the formula does not credit.) fastbert is called through fastbert.kernels, with its input checks,
except embed_layer_norm's id range check (validate=False): it syncs with the host (min/max of three
id tensors), which eager's F.embedding does not do either, so it would time the sync, not the op.

Usage: python -m benchmarks.bench_fused [--quick]   (--quick: BERT-base widths only, < 60 s on an H100)
"""
from __future__ import annotations

import argparse
import contextlib
import traceback

import torch
import torch.nn.functional as F

from benchmarks.bench_ln_sweep import case_bytes
from benchmarks.harness import Recorder, copy_bandwidth_gbps, measure, measure_graphed

TOKENS = 32768
BATCH, SEQ = 64, 512
VOCAB, MAX_POS, TYPES = 30522, 512, 2
EPS = 1e-12
DROPOUT = 0.1
DT = torch.bfloat16
S = 2  # bytes per bf16


def _make_cases(hidden: int, ffn: int, dev: str = "cuda", batch: int = BATCH, seq: int = SEQ):
    import fastbert.kernels as K

    TOKENS = batch * seq  # noqa: N806 (shadows the module constant for --smoke)
    g = lambda *shape: torch.randn(*shape, device=dev, dtype=DT)  # noqa: E731
    cases = []

    def ln_bytes(family, x_dtype, r_dtype, p, low):
        """The LayerNorm cases' state bytes: bench_ln_sweep's formulas (the ones of the docstring above)."""
        fwd, bwd = case_bytes(family, x_dtype, r_dtype, p, low, TOKENS, hidden)
        return dict(fwd_bytes=fwd, bwd_bytes=bwd)

    # bias_gelu at the FFN width
    x, b = g(TOKENS, ffn), g(ffn)
    cases.append(dict(op="bias_gelu", n=ffn, inputs=(x, b), grad_inputs=(0, 1),
                      ours=lambda x, b: K.bias_gelu(x, b),
                      eager=lambda x, b: F.gelu(x + b),
                      fwd_bytes=2 * TOKENS * ffn * S, bwd_bytes=3 * TOKENS * ffn * S))

    # add_layer_norm with BERT's hidden dropout
    x, r, w, bb = g(TOKENS, hidden), g(TOKENS, hidden), g(hidden), g(hidden)
    cases.append(dict(op="add_layer_norm(p=0.1)", n=hidden, inputs=(x, r, w, bb), grad_inputs=(0, 1, 2, 3),
                      ours=lambda x, r, w, b: K.add_layer_norm(x, r, w, b, EPS, DROPOUT),
                      eager=lambda x, r, w, b: F.layer_norm(F.dropout(x, DROPOUT, True) + r, (hidden,), w, b, EPS),
                      **ln_bytes("add", DT, DT, DROPOUT, None)))
    cases.append(dict(op="add_layer_norm(p=0)", n=hidden, inputs=(x, r, w, bb), grad_inputs=(0, 1, 2, 3),
                      ours=lambda x, r, w, b: K.add_layer_norm(x, r, w, b, EPS, 0.0),
                      eager=lambda x, r, w, b: F.layer_norm(x + r, (hidden,), w, b, EPS),
                      **ln_bytes("add", DT, DT, 0.0, None)))

    # add_layer_norm as the model runs it under bf16 autocast: fp32 residual stream and its bf16 copy
    r32, w32, b32 = r.float(), w.float(), bb.float()

    def copy_eager(x, r, w, b):
        y = F.layer_norm(x.float() + r, (hidden,), w, b, EPS)
        return y, y.to(DT)

    def copy_unfused(x, r, w, b):
        y = K.add_layer_norm(x, r, w, b, EPS, 0.0)
        return y, y.to(DT)

    cases.append(dict(op="add_layer_norm + bf16 copy", n=hidden, inputs=(x, r32, w32, b32), grad_inputs=(0, 1, 2, 3),
                      ours=lambda x, r, w, b: K.add_layer_norm(x, r, w, b, EPS, 0.0, low_dtype=DT),
                      eager=copy_eager, extra=[("fastbert-unfused", copy_unfused)],
                      **ln_bytes("add", DT, torch.float32, 0.0, DT)))

    # ... and with the dense bias of x (BertSelfOutput / BertOutput on the Triton kernels)
    xb32 = g(hidden).float()

    def bias_unfused(x, r, w, b, xb):
        return K.add_layer_norm(x + xb.to(DT), r, w, b, EPS, 0.0, low_dtype=DT)

    def bias_eager(x, r, w, b, xb):
        y = F.layer_norm(x.float() + xb + r, (hidden,), w, b, EPS)
        return y, y.to(DT)

    cases.append(dict(op="add_layer_norm + dense bias", n=hidden, inputs=(x, r32, w32, b32, xb32),
                      grad_inputs=(0, 1, 2, 3, 4),
                      ours=lambda x, r, w, b, xb: K.add_layer_norm(x, r, w, b, EPS, 0.0, low_dtype=DT, x_bias=xb),
                      eager=bias_eager, extra=[("fastbert-unfused", bias_unfused)],
                      **ln_bytes("add", DT, torch.float32, 0.0, DT)))

    # gelu_layer_norm (MLM head transform; benchmarked on all tokens for a bandwidth figure)
    x, c = g(TOKENS, hidden), g(hidden)
    cases.append(dict(op="gelu_layer_norm", n=hidden, inputs=(x, c, w, bb), grad_inputs=(0, 1, 2, 3),
                      ours=lambda x, c, w, b: K.gelu_layer_norm(x, c, w, b, EPS),
                      eager=lambda x, c, w, b: F.layer_norm(F.gelu(x + c), (hidden,), w, b, EPS),
                      **ln_bytes("gelu", DT, DT, 0.0, None)))

    # embed_layer_norm
    ids = torch.randint(0, VOCAB, (batch, seq), device=dev)
    tt = torch.randint(0, TYPES, (batch, seq), device=dev)
    pos = torch.arange(seq, device=dev).expand(batch, seq)
    tables = (g(VOCAB, hidden), g(MAX_POS, hidden), g(TYPES, hidden))

    def embed_eager(word, posw, typew, w, b):
        h = F.embedding(ids, word) + F.embedding(pos, posw) + F.embedding(tt, typew)
        return F.dropout(F.layer_norm(h, (hidden,), w, b, EPS), DROPOUT, True)

    cases.append(dict(op="embed_layer_norm(p=0.1)", n=hidden, inputs=(*tables, w, bb), grad_inputs=(0, 1, 2, 3, 4),
                      ours=lambda W, P, T, w, b: K.embed_layer_norm(ids, tt, pos, W, P, T, w, b, EPS, DROPOUT,
                                                                      validate=False),
                      eager=embed_eager,
                      fwd_bytes=2 * TOKENS * hidden * S,
                      bwd_bytes=2 * TOKENS * hidden * S + VOCAB * hidden * S))
    return cases


def _fwd_bwd(fn, inputs, grad_idx, dy):
    """dy: a tensor, or a tuple of them for an op with several outputs (each gets its gradient)."""
    leaves = [t.detach().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]
    wanted = [leaves[i] for i in grad_idx]

    def run():
        y = fn(*leaves)
        torch.autograd.grad(y, wanted, dy)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="BERT-base widths only (< 60 s on an H100)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU dry run of the script itself: 2x8 tokens, interpreter (TRITON_INTERPRET=1 "
                             "FASTBERT_KERNELS=triton); the numbers mean nothing")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_fused needs a CUDA GPU")
    torch.manual_seed(0)
    dev, shape = ("cpu", (2, 8)) if args.smoke else ("cuda", (BATCH, SEQ))
    tokens = shape[0] * shape[1]
    copy_gbps = float("nan") if args.smoke else copy_bandwidth_gbps()
    rec = Recorder("bench_fused_smoke" if args.smoke else "bench_fused", tokens=tokens, dtype="bf16", copy_gbps=copy_gbps, dropout=DROPOUT)
    print(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s", flush=True)
    sizes = [("base", 768, 3072)] + ([] if args.quick or args.smoke else [("large", 1024, 4096)])
    warmup, rep = (10, 40) if args.quick else (25, 100)
    for size, hidden, ffn in sizes:
        try:
            cases = _make_cases(hidden, ffn, dev, *shape)
        except Exception:
            traceback.print_exc()
            continue
        for case in cases:
            impls = [("fastbert", case["ours"]), ("eager", case["eager"]), *case.get("extra", [])]
            if not args.smoke:
                impls.append(("torch.compile", torch.compile(case["eager"])))
            times, graph_times = {}, {}
            for impl, fn in impls:
                for pass_ in ("fwd", "fwd+bwd"):
                    try:
                        if pass_ == "fwd":
                            with torch.no_grad():
                                fn(*case["inputs"])  # compile / warm up outside the timing
                            run = lambda fn=fn: fn(*case["inputs"])  # noqa: E731
                            nbytes = case["fwd_bytes"]
                        else:
                            y = fn(*case["inputs"])
                            dy = tuple(map(torch.randn_like, y)) if isinstance(y, tuple) else torch.randn_like(y)
                            run = _fwd_bwd(fn, case["inputs"], case["grad_inputs"], dy)
                            run()
                            nbytes = case["fwd_bytes"] + case["bwd_bytes"]
                        with torch.no_grad() if pass_ == "fwd" else contextlib.nullcontext():
                            t = measure(run, warmup=warmup, rep=rep, device=dev)
                            g = measure_graphed(run, device=dev)
                        gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
                        times[(impl, pass_)] = t["median_ms"]
                        row = dict(op=case["op"], size=size, shape=f"{tokens}x{case['n']}", dtype="bf16", impl=impl,
                                   **{"pass": pass_}, median_ms=t["median_ms"], p20_ms=t["p20_ms"],
                                   p80_ms=t["p80_ms"], gbps=gbps, frac_of_ceiling=gbps / copy_gbps)
                        if impl == "fastbert":
                            row.update(speedup_vs_eager=None, speedup_vs_compile=None)
                        if g is not None:
                            graph_times[(impl, pass_)] = g["graph_ms"]
                            graph_gbps = nbytes / (g["graph_ms"] * 1e-3) / 1e9
                            row.update(graph_ms=g["graph_ms"], graph_frac_of_ceiling=graph_gbps / copy_gbps)
                        rec.add(**row)
                    except Exception as exc:  # one failure must not lose the other cases
                        print(f"FAILED {case['op']} {size} {impl} {pass_}: {type(exc).__name__}: {exc}", flush=True)
            for row in rec.rows:
                if row["op"] == case["op"] and row["size"] == size and row["impl"] == "fastbert":
                    ours = times.get(("fastbert", row["pass"]))
                    for other, key in (("eager", "speedup_vs_eager"), ("torch.compile", "speedup_vs_compile"),
                                       ("fastbert-unfused", "speedup_vs_unfused")):
                        if other == "fastbert-unfused" and not case.get("extra"):
                            continue
                        theirs = times.get((other, row["pass"]))
                        row[key] = theirs / ours if ours and theirs else None
                        ours_g, theirs_g = graph_times.get(("fastbert", row["pass"])), graph_times.get((other, row["pass"]))
                        if ours_g and theirs_g:
                            row["graph_" + key] = theirs_g / ours_g
    rec.finish("/tmp" if args.smoke else None,
               plot=dict(x="op", y="frac_of_ceiling", group="impl",
                         title="fraction of copy bandwidth (bf16, 32k tokens)"))


if __name__ == "__main__":
    main()
