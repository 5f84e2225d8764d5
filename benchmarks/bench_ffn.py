"""Benchmark of BERT's feed-forward block with GELU in the matmul epilogues (K.feed_forward), GPU only.

Issue 7 asks to measure where a GEMM epilogue fusion (bias + GELU into the matmul) pays. bf16, 32k
tokens, BERT-base (hidden d 768, FFN f 3072) and BERT-large (1024, 4096) widths, one process, one card:

  block rows (gelu(x w1ᵀ + b1) w2ᵀ, forward and forward + backward of x, w1, b1, w2)
    fastbert           K.feed_forward: Triton matmuls with the GELU epilogues (kernels/gemm_gelu.py)
                       for x w1ᵀ (forward) and dout w2 (backward), cuBLAS for the other four products
    fastbert-unfused   what the model runs by default: cuBLAS x w1ᵀ, K.bias_gelu (Triton, both ways),
                       cuBLAS w2 product
    eager              F.linear(F.gelu(F.linear(x, w1, b1)), w2)
    torch.compile      of eager
  epilogue rows (one matmul, the fusion in isolation)
    gemm+gelu fwd      fastbert: gemm_gelu.dense_gelu (writes z and gelu(z));
                       unfused: x @ w1ᵀ then K.bias_gelu's forward kernel
      ..., inference   the same without writing z (what K.feed_forward runs when no gradient is wanted,
                       e.g. fastbert encode; the block's fwd rows run that way too, under no_grad)
    dgrad+gelu'        fastbert: gemm_gelu.gelu_dgrad (dz and the db1 partial sums);
                       unfused: dout @ w2 then K.bias_gelu's backward kernel (dz, db1)

FLOPs (T tokens): the block's forward 4 T d f (two products of 2 T d f), forward + backward 12 T d f;
an epilogue row 2 T d f (the elementwise work is not counted). TFLOP/s = FLOPs / median time, and
frac_of_ceiling = that over the bf16 matmul rate measured in the same run (8192³,
benchmarks.harness.matmul_ceiling_tflops). The fusion saves bytes, not FLOPs: per layer at T = 32k,
d 768, f 3072 it skips one (T, f) bf16 read in the forward and one read + one write in the backward
(0.6 GB), ~0.2 ms at 3 TB/s — against which the Triton matmul's distance from cuBLAS is the cost.

--sweep: the epilogue rows only, under the shipped launch and each FFN_CANDIDATES launch
(gemm_gelu.set_gemm_config_override), each checked against the shipped launch's result first
(ok=False: it computes something else). Rows are saved as they come, so a run cut short keeps them.

Usage: python -m benchmarks.bench_ffn [--quick] [--sweep]   (--quick: BERT-base only; ~1 min on an H100)
       --smoke: a CPU dry run of the script in the interpreter at toy sizes (numbers mean nothing).
"""
from __future__ import annotations

import argparse
import traceback

import torch
import torch.nn.functional as F

from benchmarks.harness import Recorder, matmul_ceiling_tflops, measure

TOKENS = 32768
DT = torch.bfloat16

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); the shipped 16-bit launch is the first.
# Registers and shared memory of each: python -m benchmarks.ptxas_report --gemm --sweep.
# 4-warp 128 x 128 and 256-wide tiles spill 0.3-1.3 KB a thread there and are left out; the 128 x 64 /
# 64 x 128 tiles at 4 warps spill nothing and fit 2 programs per SM (the shipped launch fits 1).
FFN_CANDIDATES = [
    (128, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 8, 3),
    (128, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 3),
    (64, 128, 64, 8, 4, 3),
    (128, 128, 32, 8, 8, 5),
    (128, 128, 64, 16, 8, 4),
]


def _block_cases(T, d, f, dev):
    import fastbert.kernels as K

    g = lambda *shape, s=1.0: (torch.randn(*shape, device=dev) * s).to(DT)  # noqa: E731
    inputs = (g(T, d), g(f, d, s=d ** -0.5), g(f), g(d, f, s=f ** -0.5))

    def unfused(x, w1, b1, w2):
        return F.linear(K.bias_gelu(F.linear(x, w1), b1), w2)

    def eager(x, w1, b1, w2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2)

    impls = [("fastbert", lambda *a: K.feed_forward(*a)), ("fastbert-unfused", unfused), ("eager", eager)]
    return inputs, impls, eager


def _epilogue_cases(T, d, f, dev):
    from fastbert.kernels import gelu as G
    from fastbert.kernels import gemm_gelu as GG

    g = lambda *shape, s=1.0: (torch.randn(*shape, device=dev) * s).to(DT)  # noqa: E731
    x, w1, b1, w2, dout = g(T, d), g(f, d, s=d ** -0.5), g(f), g(d, f, s=f ** -0.5), g(T, d)
    _, z = GG.dense_gelu(x, w1, b1, "none")
    zero_bias = torch.zeros_like(b1)
    return [
        ("gemm+gelu fwd", lambda: GG.dense_gelu(x, w1, b1, "none"),
         lambda: G._fwd_impl(x @ w1.t(), b1, "none")),
        ("gemm+gelu fwd, inference (no z)", lambda: GG.dense_gelu(x, w1, b1, "none", False),
         lambda: G._fwd_impl(x @ w1.t(), b1, "none")),
        ("dgrad+gelu'", lambda: GG.gelu_dgrad(dout, w2, z, "none"),
         lambda: G._bwd_impl(dout @ w2, z, zero_bias, "none")),  # z holds b1 already
    ]


def _grad_run(fn, inputs, dy):
    leaves = [t.detach().requires_grad_() for t in inputs]

    def run():
        torch.autograd.grad(fn(*leaves), leaves, dy)
    return run


def _first(result):
    return result[0] if isinstance(result, tuple) else result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="BERT-base widths only")
    ap.add_argument("--sweep", action="store_true", help="also the epilogue rows under every FFN_CANDIDATES launch")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run in the interpreter (TRITON_INTERPRET=1 "
                                                         "FASTBERT_KERNELS=triton); toy sizes, fp16")
    args = ap.parse_args(argv)
    global DT
    if args.smoke:
        DT, dev, T, sizes = torch.float16, "cpu", 40, [("toy", 32, 48)]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_ffn needs a CUDA GPU (or --smoke)")
        dev, T = "cuda", TOKENS
        sizes = [("base", 768, 3072)] + ([] if args.quick else [("large", 1024, 4096)])
    from fastbert.kernels import gemm_gelu as GG

    torch.manual_seed(0)
    ceiling = float("nan") if args.smoke else matmul_ceiling_tflops()
    print(f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s", flush=True)
    rec = Recorder("bench_ffn_smoke" if args.smoke else "bench_ffn", tokens=T, dtype=str(DT).split(".")[-1],
                   ceiling_tflops=ceiling, shipped=list(GG.gemm_config(DT)))
    warmup, rep = (10, 40) if args.quick else (25, 100)
    out_dir = "/tmp" if args.smoke else None

    def record(op, size, shape, impl, pass_, fn, flops, **extra):
        try:
            if pass_ == "fwd":
                with torch.no_grad():
                    fn()
                    t = measure(fn, warmup=warmup, rep=rep, device=dev)
            else:
                fn()
                t = measure(fn, warmup=warmup, rep=rep, device=dev)
            tflops = flops / (t["median_ms"] * 1e-3) / 1e12
            row = rec.add(op=op, size=size, shape=shape, impl=impl, **{"pass": pass_}, case=f"{op} {pass_} {size}",
                           median_ms=t["median_ms"],
                           p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], tflops=tflops, frac_of_ceiling=tflops / ceiling,
                           **extra)
            rec.save(out_dir)  # after every row: a run cut short by its time limit keeps what it measured
            return row
        except Exception as exc:  # one failure must not lose the other rows
            print(f"FAILED {op} {size} {impl} {pass_}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            return None

    for size, d, f in sizes:
        shape = f"{T}x{d}x{f}"
        inputs, impls, eager = _block_cases(T, d, f, dev)
        if args.sweep:  # the launch sweep times the epilogue rows only (the block rows: a plain run)
            impls = []
        elif not args.smoke:
            impls.append(("torch.compile", torch.compile(eager)))
        dy = torch.randn(T, d, device=dev, dtype=DT)
        rows = {}
        for impl, fn in impls:
            rows[impl, "fwd"] = record("feed-forward block", size, shape, impl, "fwd", lambda fn=fn: fn(*inputs),
                                       4 * T * d * f)
            rows[impl, "fwd+bwd"] = record("feed-forward block", size, shape, impl, "fwd+bwd",
                                           _grad_run(fn, inputs, dy), 12 * T * d * f)
        for pass_ in ("fwd", "fwd+bwd"):
            ours = rows.get(("fastbert", pass_))
            for other in ("fastbert-unfused", "eager", "torch.compile"):
                theirs = rows.get((other, pass_))
                if ours and theirs:
                    ours[f"speedup_vs_{other.replace('fastbert-', '').replace('torch.', '')}"] = (
                        theirs["median_ms"] / ours["median_ms"])
        launches = [("shipped", None)] + ([(str(c), c) for c in FFN_CANDIDATES] if args.sweep else [])
        for op, fused, unfused in _epilogue_cases(T, d, f, dev):
            want = [_first(fused())]
            base = record(op, size, shape, "unfused", "fwd", unfused, 2 * T * d * f)
            for label, config in launches:
                try:
                    GG.set_gemm_config_override(config)
                    ok = True
                    if config is not None:  # a launch that compiles into a wrong kernel is not a fast one
                        ok = bool(torch.allclose(_first(fused()).float(), want[0].float(), rtol=2e-2, atol=2e-2))
                    row = record(op, size, shape, "fastbert" if config is None else f"fastbert {label}", "fwd",
                                 fused, 2 * T * d * f, ok=ok)
                    if row and base:
                        row["speedup_vs_unfused"] = base["median_ms"] / row["median_ms"]
                except Exception as exc:
                    print(f"FAILED {op} {label}: {type(exc).__name__}: {exc}", flush=True)
                finally:
                    GG.set_gemm_config_override(None)
    rec.finish(out_dir,
               plot=dict(x="case", y="median_ms", group="impl", ylabel="median ms",
                         title=f"feed-forward block and its epilogue matmuls ({rec.context['dtype']}, {T} tokens)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
