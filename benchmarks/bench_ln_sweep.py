"""Launch-parameter sweep of the add / GELU + LayerNorm kernels (kernels/layer_norm.py), GPU only.

For each case below, at 32768 rows x 768 (BERT-base) and x 1024 (BERT-large), times fastbert's
K.add_layer_norm / K.gelu_layer_norm under candidate launches (layer_norm.set_ln_config_override),
beside the shipped defaults (ln_config) and the one-row launch of before the tiling (one_row_config:
BLOCK_M = 1), all in one process on one card:

  forward candidates   [BLOCK_M, num_warps], timed as the forward alone (no grad)
  backward candidates  [BLOCK_M, num_warps, programs per SM, pipelining stages], timed as
                       forward + backward (autograd.grad of every input) with the forward at its default
  'default' and 'one-row (fwd and bwd)': both kernels at once, forward and forward + backward: the
                       old-vs-new comparison of the whole op

Cases (the model's add_layer_norm under bf16 autocast, and all-bf16 as in bench_fused):
  add autocast p=0.1 +copy   x bf16, residual / weights fp32, y fp32 and its bf16 copy (low_dtype): pretraining
  add autocast p=0 +copy     the same without dropout (fine-tuning, eval-mode dropout)
  add autocast p=0.1 / p=0   without the copy (low_dtype=None)
  add bf16 p=0.1 / p=0       everything bf16
  gelu bf16                  gelu_layer_norm, erf GELU (the MLM head transform)

Bytes per pass (T rows, n width, s_x / s_r / s_y bytes per element of x / residual / y, 2 for the bf16
copy; weight vectors and mean / rstd ignored):
  add  fwd  T n (s_x + s_r + s_y [+ 2 copy])
       bwd  T n (s_y [read dy] [+ 2 read d copy] + s_x + s_r [re-read x, residual] + s_r [write d residual]
                 [+ s_x write dx: when p > 0 or s_x != s_r])
  gelu fwd  T n 2 s;  bwd  T n 3 s (read dy, x; write dx)
  fwd+bwd   the sum.   GB/s = bytes / median time; frac_of_copy = GB/s over the device-to-device copy
  rate measured in the same run (benchmarks.harness.copy_bandwidth_gbps, read + write bytes).

Each candidate's first run is checked against the default launch's outputs and gradients (same seed,
so the same dropout mask): a launch that compiles into a wrong kernel (pipelined loops are not run by
the interpreter tests) is marked ok=False, not taken for a fast one. A candidate the compiler or the
GPU rejects is reported and skipped.

Usage: python -m benchmarks.bench_ln_sweep [--quick] [--widths 768 1024] [--budget-s 420]
  --quick: width 768, three cases (add autocast p=0.1 +copy, add bf16 p=0, gelu), shorter timing (~1-2 min
  on an H100, most of it compiling). Writes bench_ln_sweep.{json,md} under $OUT (benchmarks.harness),
  saved after every case, so a run cut short by --budget-s or a timeout keeps what it finished; prints
  the fastest launch per case and kernel last.
"""
from __future__ import annotations

import argparse
import os
import time
import traceback

import torch

from benchmarks.harness import Recorder, copy_bandwidth_gbps, measure

ROWS = 32768
EPS = 1e-12
DROPOUT = 0.1

# Candidates at BERT widths (row_block 1024); the defaults and the one-row launch are always added.
# Registers per candidate: python -m benchmarks.ptxas_report --ln --sweep (kernels/layer_norm.py's note
# reads them: forward tiles of 32 fp32 values per thread fit without spills, backward tiles of 16 spill;
# pipelined backward stages sit in shared memory).
FWD_CANDIDATES = [(1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (4, 16), (8, 8), (8, 16), (16, 16)]
BWD_CANDIDATES = [(1, 4, 4, 1), (1, 4, 16, 1), (1, 4, 8, 2), (1, 4, 8, 3), (1, 8, 8, 1), (1, 8, 8, 3), (2, 4, 8, 1),
                  (2, 8, 4, 1), (2, 8, 8, 2), (2, 16, 4, 1), (4, 16, 2, 1), (4, 16, 4, 2), (4, 8, 4, 1)]

# (name, kernel family, x dtype, residual / weight dtype, dropout p, copy dtype)
CASES = [
    ("add autocast p=0.1 +copy", "add", torch.bfloat16, torch.float32, DROPOUT, torch.bfloat16),
    ("add autocast p=0 +copy", "add", torch.bfloat16, torch.float32, 0.0, torch.bfloat16),
    ("add autocast p=0.1", "add", torch.bfloat16, torch.float32, DROPOUT, None),
    ("add autocast p=0", "add", torch.bfloat16, torch.float32, 0.0, None),
    ("add bf16 p=0.1", "add", torch.bfloat16, torch.bfloat16, DROPOUT, None),
    ("add bf16 p=0", "add", torch.bfloat16, torch.bfloat16, 0.0, None),
    ("gelu bf16", "gelu", torch.bfloat16, torch.bfloat16, 0.0, None),
]
QUICK_CASES = ("add autocast p=0.1 +copy", "add bf16 p=0", "gelu bf16")


def case_bytes(family, x_dtype, r_dtype, p, low, rows, n):
    """(forward bytes, backward bytes) by the formulas of the module docstring."""
    sx, sr = x_dtype.itemsize, r_dtype.itemsize
    if family == "gelu":
        return 2 * rows * n * sx, 3 * rows * n * sx
    sy = torch.promote_types(x_dtype, r_dtype).itemsize
    sl = 0 if low is None else low.itemsize
    store_dx = p > 0 or x_dtype != r_dtype
    fwd = rows * n * (sx + sr + sy + sl)
    bwd = rows * n * (sy + sl + sx + sr + sr + (sx if store_dx else 0))
    return fwd, bwd


def make_case(family, x_dtype, r_dtype, p, low, rows, n, device):
    """(fn, inputs, output gradients) for one case; fn(*inputs) is the public op."""
    import fastbert.kernels as K

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, n, device=device, generator=g).to(x_dtype)
    w = (1.0 + 0.1 * torch.randn(n, device=device, generator=g)).to(r_dtype)
    b = (0.1 * torch.randn(n, device=device, generator=g)).to(r_dtype)
    if family == "gelu":
        c = (0.1 * torch.randn(n, device=device, generator=g)).to(x_dtype)
        inputs = (x, c, w.to(x_dtype), b.to(x_dtype))
        fn = lambda x, c, w, b: K.gelu_layer_norm(x, c, w, b, EPS)  # noqa: E731
        grads = (torch.randn(rows, n, device=device, generator=g).to(x_dtype),)
        return fn, inputs, grads
    r = torch.randn(rows, n, device=device, generator=g).to(r_dtype)
    inputs = (x, r, w, b)
    fn = lambda x, r, w, b: K.add_layer_norm(x, r, w, b, EPS, p, low_dtype=low)  # noqa: E731
    y_dtype = torch.promote_types(x_dtype, r_dtype)
    grads = (torch.randn(rows, n, device=device, generator=g).to(y_dtype),)
    if low is not None:
        grads += (torch.randn(rows, n, device=device, generator=g).to(low),)
    return fn, inputs, grads


def _leaves(inputs):
    return [t.detach().requires_grad_() for t in inputs]


def run_once(fn, inputs, grads, backward):
    """Outputs (and with backward, the input gradients) of one call, from a fixed seed (the same mask)."""
    torch.manual_seed(1234)
    if not backward:
        with torch.no_grad():
            out = fn(*inputs)
        return list(out) if isinstance(out, tuple) else [out]
    leaves = _leaves(inputs)
    out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, leaves, grads))


def agrees(got, want) -> bool:
    """Within bf16 rounding of one another (a different tile changes only fp32 summation order)."""
    for a, b in zip(got, want):
        a, b = a.float(), b.float()
        scale = b.abs().max().item() or 1.0
        if not torch.isfinite(a).all() or (a - b).abs().max().item() > 2e-2 * scale:
            return False
    return True


def timer(fn, inputs, grads, backward):
    if not backward:
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    leaves = _leaves(inputs)

    def run():
        out = fn(*leaves)
        torch.autograd.grad(list(out) if isinstance(out, tuple) else [out], leaves, grads)
    return run


def launches(family, n):
    """[(kernel kind, label, override)]: forward candidates, backward candidates, and both kernels at
    their defaults / at the one-row launch (kind 'both'). Label 'default+one-row': the default is the
    one-row launch (e.g. the backward at 768), timed once."""
    from fastbert.kernels import layer_norm as L

    fwd, bwd = f"{family}_fwd", f"{family}_bwd"
    out = [("both", "default", {}),
           ("both", "one-row", {fwd: list(L.one_row_config(n, fwd)[:2]), bwd: list(L.one_row_config(n, bwd))})]
    for kind, cands, width in ((fwd, FWD_CANDIDATES, 2), (bwd, BWD_CANDIDATES, 4)):
        default = tuple(L.ln_config(n, kind, interpreting=False))[:width]
        one_row = tuple(L.one_row_config(n, kind))[:width]
        seen = []
        for cand in [default, one_row, *cands]:
            if cand in seen:
                continue
            seen.append(cand)
            label = "+".join(name for name, c in (("default", default), ("one-row", one_row)) if c == cand)
            out.append((kind, label or "candidate", {kind: list(cand)}))
    return out


def sweep_case(rec, name, family, x_dtype, r_dtype, p, low, rows, n, device, warmup, rep, copy_gbps, deadline):
    from fastbert.kernels import layer_norm as L

    fn, inputs, grads = make_case(family, x_dtype, r_dtype, p, low, rows, n, device)
    fwd_bytes, bwd_bytes = case_bytes(family, x_dtype, r_dtype, p, low, rows, n)
    L.set_ln_config_override(None)
    reference = {bwd: run_once(fn, inputs, grads, bwd) for bwd in (False, True)}
    base = {}  # (kind, pass) -> {label: ms}
    for kind, label, override in launches(family, n):
        passes = ("fwd", "fwd+bwd") if kind == "both" else (("fwd",) if kind.endswith("_fwd") else ("fwd+bwd",))
        for pass_ in passes:
            if time.monotonic() > deadline:
                print(f"budget spent: stopping before {name} n={n} {kind} {override}", flush=True)
                return False
            backward = pass_ == "fwd+bwd"
            try:
                L.set_ln_config_override(override or None)
                ok = agrees(run_once(fn, inputs, grads, backward), reference[backward])
                t = measure(timer(fn, inputs, grads, backward), warmup=warmup, rep=rep, device=device)
            except Exception as exc:  # e.g. out of resources: the next candidate still runs
                print(f"FAILED {name} n={n} {kind} {override}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            finally:
                L.set_ln_config_override(None)
            nbytes = fwd_bytes + (bwd_bytes if backward else 0)
            gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
            times = base.setdefault((kind, pass_), {})
            for one in label.split("+"):
                times.setdefault(one, t["median_ms"])
            config = override.get(kind) if kind != "both" else label
            rec.add(case=name, n=n, rows=rows, kernel=kind, label=label, config=str(config), **{"pass": pass_},
                    median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], gbps=gbps,
                    frac_of_copy=gbps / copy_gbps, ok=ok)
    for row in rec.rows:  # speed-ups against the default and the one-row launch of the same kernel and pass
        if row["case"] == name and row["n"] == n:
            times = base.get((row["kernel"], row["pass"]), {})
            for label, key in (("default", "vs_default"), ("one-row", "vs_one_row")):
                row[key] = times[label] / row["median_ms"] if label in times else None
    return True


def summary(rows) -> str:
    lines = ["| case | n | kernel | pass | default ms | one-row ms | best ok config | best ms | best vs default |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r["n"], r["kernel"], r["pass"]), []).append(r)
    for (case, n, kernel, pass_), rs in groups.items():
        by_label = {name: r for r in rs for name in r["label"].split("+")}
        good = [r for r in rs if r["ok"]]
        best = min(good, key=lambda r: r["median_ms"]) if good else None
        fmt = lambda r: f"{r['median_ms']:.4f}" if r else ""  # noqa: E731
        lines.append(f"| {case} | {n} | {kernel} | {pass_} | {fmt(by_label.get('default'))} | "
                     f"{fmt(by_label.get('one-row'))} | {best['config'] if best else ''} | {fmt(best)} | "
                     f"{(best or {}).get('vs_default') or 0:.3f} |")
    bad = sorted({f"{r['case']} n={r['n']} {r['kernel']} {r['config']}" for r in rows if not r["ok"]})
    if bad:
        lines += ["", "Launches whose results disagreed with the default's (ok=False):", *[f"- {b}" for b in bad]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 768, three cases, shorter timing")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="row widths (768 1024; --quick: 768)")
    parser.add_argument("--rows", type=int, default=ROWS, help=f"rows per call ({ROWS})")
    parser.add_argument("--cases", nargs="+", default=None, choices=[c[0] for c in CASES], metavar="CASE",
                        help="a subset of the cases, by name")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop starting new measurements after this many seconds (420); results so far are kept")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU dry run of the script itself: 64 rows x 64, interpreter (TRITON_INTERPRET=1 "
                             "FASTBERT_KERNELS=triton, fp16 for bf16); the numbers mean nothing")
    args = parser.parse_args(argv)
    if args.widths is None:
        args.widths = [64] if args.smoke else [768] if args.quick else [768, 1024]
    if args.cases is None:
        args.cases = list(QUICK_CASES) if args.quick else [c[0] for c in CASES]
    if args.smoke:
        args.rows = min(args.rows, 64)
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_ln_sweep needs a CUDA GPU: it times the compiled LayerNorm kernels "
                         "(nothing was run; --smoke is a CPU dry run of the script)")
    if args.smoke:  # before fastbert.kernels (and triton) are first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["FASTBERT_KERNELS"] = "triton"
    device = "cpu" if args.smoke else "cuda"
    deadline = time.monotonic() + args.budget_s
    warmup, rep = (1, 3) if args.smoke else (10, 40) if args.quick else (25, 100)
    copy_gbps = float("nan") if args.smoke else copy_bandwidth_gbps()
    rec = Recorder("bench_ln_sweep_smoke" if args.smoke else "bench_ln_sweep", rows=args.rows, copy_gbps=copy_gbps,
                   dropout=DROPOUT, quick=args.quick)
    print(f"copy bandwidth (read + write): {copy_gbps:.0f} GB/s", flush=True)
    out_dir = "/tmp" if args.smoke else None
    for n in args.widths:
        for name, family, x_dtype, r_dtype, p, low in CASES:
            if name not in args.cases:
                continue
            if args.smoke:  # the interpreter mishandles bf16 arithmetic: fp16 stands in
                x_dtype, r_dtype, low = (torch.float16 if d == torch.bfloat16 else d for d in (x_dtype, r_dtype, low))
            try:
                finished = sweep_case(rec, name, family, x_dtype, r_dtype, p, low, args.rows, n, device, warmup, rep,
                                      copy_gbps, deadline)
            except Exception:  # one case failing must not lose the others
                traceback.print_exc()
                finished = True
            rec.save(out_dir)
            if not finished:
                break
    path = rec.save(out_dir)
    text = summary(rec.rows)
    with open(path.with_suffix(".md"), "a") as f:
        f.write("\n## Fastest launch per case, kernel and pass\n\n" + text)
    print()
    print(rec.markdown())
    print(text)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    main()
