"""A/B of one BERT pretraining step: fastbert's own BertForPreTraining vs transformers + fastbert.patch,
in one process, same weights, same batches (fastbert.bench.build_models / make_batches).

On the GPU (after the editable install gpu_check.sh does):
    OUT=$OUT python3 -m benchmarks.profile_both [--steps 12] [--batches 6] [--trace]
Writes $OUT/profile_both.md (+ trace_<impl>.json with --trace).

What it separates (run 5: the own class 77.8 ms vs the patched model 63.2 ms; before the fix in fastbert/bench.py the own class met every new masked-row count first):
  cold   a batch shape (masked-row count M) neither model has seen: A then B, next batch B then A
  warm   every batch already seen by both; rounds alternate the order (A B, B A, ...)
  prof   torch.profiler over one warm step each: kernel time per family, launches, host syncs,
         the kernels whose count or time differ between the two
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

from benchmarks.harness import output_dir
from benchmarks.profile_step import family, is_kernel, profile_once, train_step
from fastbert import bench

HOST = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMalloc", "cudaFree",
        "aten::nonzero", "aten::_local_scalar_dense", "aten::index_select", "aten::index_copy", "aten::cat",
        "aten::_to_copy", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="base")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12, help="warm timed rounds (order alternates)")
    ap.add_argument("--batches", type=int, default=6, help="distinct warm batches")
    ap.add_argument("--cold", type=int, default=4, help="never-seen batches timed first-touch")
    ap.add_argument("--impls", default="fastbert,transformers-patched")
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args(argv)
    comps = args.impls.split(",")
    models, _ = bench.build_models("pretrain", args.size, 30522, args.seq, "cuda", comps)
    warm_b = bench.make_batches("pretrain", args.batches, args.batch, args.seq, 30522, 0, "cuda")
    cold_b = bench.make_batches("pretrain", args.cold, args.batch, args.seq, 30522, 1, "cuda")
    opts = {c: torch.optim.AdamW(models[c][0].parameters(), lr=1e-4, fused=True) for c in comps}

    def step(c, kw):
        train_step(models[c][1], opts[c], kw)

    def timed(c, kw):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(c, kw)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    lines = [f"# profile_both ({args.size}, {args.batch} x {args.seq}, bf16, {torch.cuda.get_device_name()})", ""]
    for c in comps:  # every warm shape once per model, untimed
        for kw, _, _ in warm_b:
            step(c, kw)
    cold = collections.defaultdict(list)
    for i, (kw, _, m) in enumerate(cold_b):
        for pos, c in enumerate(comps if i % 2 == 0 else comps[::-1]):
            cold[c].append((pos, m, timed(c, kw)))
    warm = collections.defaultdict(list)
    for i in range(args.steps):
        kw = warm_b[i % len(warm_b)][0]
        for pos, c in enumerate(comps if i % 2 == 0 else comps[::-1]):
            warm[(c, pos)].append(timed(c, kw))
    lines += ["| impl | warm median ms (ran 1st) | warm median ms (ran 2nd) | cold ms (pos, M) |", "|---|---|---|---|"]
    for c in comps:
        med = [f"{statistics.median(warm[(c, p)]):.2f}" if warm[(c, p)] else "" for p in (0, 1)]
        lines.append(f"| {c} | {med[0]} | {med[1]} | {', '.join(f'{t:.1f} ({p}, {m})' for p, m, t in cold[c])} |")

    kw = warm_b[0][0]
    per = {}
    for c in comps:
        wall, k_ms, k_n, prof = profile_once(lambda c=c: step(c, kw))
        if args.trace:
            prof.export_chrome_trace(str(output_dir() / f"trace_{c}.json"))
        host = collections.Counter()
        for e in prof.key_averages():
            if e.key in HOST and not is_kernel(e):
                host[e.key] += e.count
        per[c] = (wall, k_ms, k_n, host)
    lines += ["", "| impl | wall ms (profiled) | kernel ms | GPU idle ms | launches | " + " | ".join(HOST) + " |",
              "|---|---|---|---|---|" + "---|" * len(HOST)]
    for c, (wall, k_ms, k_n, host) in per.items():
        total = sum(k_ms.values())
        lines.append(f"| {c} | {wall:.2f} | {total:.2f} | {wall - total:.2f} | {sum(k_n.values())} | "
                     + " | ".join(str(host[h]) for h in HOST) + " |")
    fams = sorted({family(k) for _, k_ms, _, _ in per.values() for k in k_ms})
    lines += ["", "| family | " + " | ".join(comps) + " |", "|---|" + "---|" * len(comps)]
    for f in fams:
        lines.append(f"| {f} | " + " | ".join(f"{sum(t for k, t in per[c][1].items() if family(k) == f):.2f}"
                                               for c in comps) + " |")
    if len(comps) == 2:
        a, b = (per[c] for c in comps)
        diff = [(k, a[2][k], b[2][k], a[1][k], b[1][k]) for k in set(a[1]) | set(b[1])
                if a[2][k] != b[2][k] or abs(a[1][k] - b[1][k]) > 0.05]
        diff.sort(key=lambda r: -abs(r[3] - r[4]))
        lines += ["", f"kernels whose count differs or time differs > 0.05 ms ({comps[0]} vs {comps[1]})", "",
                  "| kernel | calls A | calls B | ms A | ms B |", "|---|---|---|---|---|"]
        lines += [f"| {k[:90]} | {na} | {nb} | {ta:.3f} | {tb:.3f} |" for k, na, nb, ta, tb in diff[:40]]
    text = "\n".join(lines) + "\n"
    print(text)
    (output_dir() / "profile_both.md").write_text(text)


if __name__ == "__main__":
    main()
