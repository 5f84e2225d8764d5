"""End-to-end training-step benchmark: fastbert vs transformers (eager, SDPA[, + torch.compile]).

Runs fastbert.bench (the same code as `fastbert bench`) and records the rows with the harness.
On a GPU it also measures the bf16 matmul ceiling in the same run and reports MFU =
useful FLOPs / time / ceiling (useful FLOPs: real tokens only, MLM head on masked rows only;
formula in fastbert/bench.py).

    python -m benchmarks.bench_model                 # CPU: cpu-small config, pretrain + finetune
    python -m benchmarks.bench_model --gpu --quick   # GPU: BERT-base seq 128 (+ large seq 512 unless --quick)
    python -m benchmarks.bench_model --compile       # + fastbert-compile and transformers-sdpa-compile

On a GPU the competitors also include fastbert-graphs (the whole step as CUDA graphs), fastbert-unfused
(session 10's two copy removals off: their A/B), fastbert-before (every kernel change since the last
GPU run off, fastbert.bench.changes_off: their sum) and fastbert-ffn (the feed-forward GELU in the matmul
epilogues, K.feed_forward, opt-in until this row beats fastbert: fastbert.bench.fused_ffn), all in the
same process (fastbert.bench.competitor_list).

Each row's median_ms is the median over the timed steps (p20_ms / p80_ms / repeats beside it), so
benchmarks/compare.py can flag a slower step against the committed results of the same card.
"""
from __future__ import annotations

import argparse
import traceback

import torch

from benchmarks.harness import Recorder, matmul_ceiling_tflops
from fastbert import bench, runtime


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd competitors")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per competitor (rows: their median)")
    ap.add_argument("--case", choices=["pretrain", "finetune", "all"], default="all",
                    help="run only these cases (e.g. --compile --case pretrain to bound compile time)")
    ap.add_argument("--no-padded", action="store_true", help="finetune: skip the fastbert-padded row")
    ap.add_argument("--large", action="store_true", help="GPU: only the BERT-large seq-512 pretraining step")
    ap.add_argument("--name", default=None, help="results file name (default model_step_gpu / model_step_cpu)")
    ap.add_argument("--bf16", action="store_true", help="CPU: every competitor under bf16 autocast (default fp32)")
    runtime.add_malloc_argument(ap)
    args = ap.parse_args(argv)
    malloc = runtime.apply_malloc_flag(args.tuned_malloc)  # before any model or batch exists
    device = "cuda" if args.gpu else "cpu"
    rec = Recorder(args.name or f"model_step_{'gpu' if args.gpu else 'cpu'}")
    ceiling = matmul_ceiling_tflops() if args.gpu else None
    if args.gpu:
        cases = [("pretrain", "base", 256, 128), ("finetune", "base", 32, 128)]
        if args.large:
            cases = []
        if args.large or not args.quick:
            cases.append(("pretrain", "large", 32, 512))
        steps = args.steps or (10 if args.quick else 20)
    else:
        cases = [("pretrain", "cpu-small", 16, 128), ("finetune", "cpu-small", 32, 128)]
        steps = args.steps or 5
    cases = [c for c in cases if args.case in ("all", c[0])]
    for case, size, batch, seq in cases:
        try:
            # finetune also runs fastbert with padding through the encoder: what unpadding alone is worth
            comps = bench.competitor_list(args.compile, case, device) + (
                ["fastbert-padded"] if case == "finetune" and not args.no_padded else [])
            for row in bench.run(case, size, batch, seq, steps=steps, warmup=3 if args.gpu else 2,
                                 competitors=comps, device=device,
                                 precision="bf16" if args.bf16 or args.gpu else "fp32"):
                row["malloc"] = malloc
                if ceiling:
                    row["ceiling_tflops"] = ceiling
                    row["mfu"] = row["useful_tflops"] / ceiling
                rec.add(**row)
        except Exception:  # one failing case must not cost the others
            traceback.print_exc()
            rec.add(case=case, size=size, impl="ERROR", error=traceback.format_exc(limit=2)[-300:])
        if device == "cuda":
            torch.cuda.empty_cache()
    rec.save()
    for r in rec.rows:
        if "median_ms" in r:
            r["label"] = f"{r['case']}/{r['size']}"
    rec.plot(x="label", y="real_tokens_per_s", group="impl", ylabel="real tokens / s (higher is better)",
             title=f"training step, {rec.rows[0].get('device', device) if rec.rows else device}")
    print(rec.markdown())


if __name__ == "__main__":
    main()
