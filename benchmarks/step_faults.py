"""What the memory allocator costs a CPU training step: page faults and system time per step.

    python -m benchmarks.step_faults [--tuned-malloc] [--case pretrain] [competitor ...]

Each competitor (fastbert.bench names; default fastbert and transformers-sdpa) trains alone, after
the others, in this one process: 3 warm-up steps, then 9 timed ones, with getrusage before and after.
Minor faults are pages the kernel had to map (and zero) because the allocator handed out memory it
had returned to the system or never had; the system time is mostly those faults. With glibc's
default settings a step that frees and re-allocates large blocks pays them every step;
``--tuned-malloc`` applies fastbert.runtime.tune_cpu_allocator() first (as the fastbert commands do).
Order matters little: each competitor reaches its own steady state during its warm-up.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from fastbert import bench, runtime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("competitors", nargs="*", default=["fastbert", "transformers-sdpa"])
    ap.add_argument("--case", choices=["pretrain", "finetune"], default="pretrain")
    runtime.add_malloc_argument(ap)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    malloc = runtime.apply_malloc_flag(args.tuned_malloc)
    torch.set_num_threads(args.threads)
    batch = 16 if args.case == "pretrain" else 32
    models, _ = bench.build_models(args.case, "cpu-small", 30522, 128, "cpu", args.competitors)
    batches = bench.make_batches(args.case, 12, batch, 128, 30522, 0, "cpu")
    print(f"{args.case}, cpu-small, batch {batch} x 128, fp32, malloc {malloc}, {args.threads} threads")
    print("competitor | median step ms | minor faults / step | system s / step | user s / step")
    for comp in args.competitors:
        model, step_model = models[comp]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(kw):
            step_model(**kw).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for kw, _, _ in batches[:3]:
            step(kw)
        times = []
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for kw, _, _ in batches[3:]:
            t0 = time.perf_counter()
            step(kw)
            times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        n = len(times)
        print(f"{comp} | {statistics.median(times) * 1e3:.0f} | {(r1.ru_minflt - r0.ru_minflt) // n} | "
              f"{(r1.ru_stime - r0.ru_stime) / n:.3f} | {(r1.ru_utime - r0.ru_utime) / n:.3f}", flush=True)
        del models[comp], model, step_model, opt  # free this competitor before the next one's turn
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
