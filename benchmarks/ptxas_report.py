"""Registers, spills and shared memory of the attention kernels' GPU launch configurations, from
ptxas, with no GPU: compile for sm_90 (as tests/test_attention.py's AOT tests do), then run the
ptxas that ships with Triton with -v on the PTX.

A spilling kernel keeps part of its tiles in local memory (L1, then L2): not always slower (the H200
sweep's fastest dK/dV config spills), but it is the first thing to look at when a config disappoints,
and it is the one performance fact a CPU-only session can establish. Times come from
`benchmarks.bench_attention --sweep` on a GPU.

Run: python -m benchmarks.ptxas_report [--sweep]  (--sweep: also every bench_attention --sweep candidate;
     a few seconds per config). Writes $OUT/ptxas_report.md when OUT is set.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

_ARGS = dict(dtype="bf16", head_dim=64, varlen=True)  # BERT-base training: bf16, packed, head_dim 64


def _signature(fn, constexprs, dtype):
    pointers = {name: "*" + dtype for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    pointers.update(LSE="*fp32", DELTA="*fp32", KPM="*u8", CU_SEQLENS="*i32", SEED="*i64")
    floats = {"qk_scale", "sm_scale", "keep_scale"}
    return {arg: "constexpr" if arg in constexprs else pointers.get(arg, "fp32" if arg in floats else "i32")
            for arg in fn.arg_names}


def resources(kernel, config, dropout, dtype="bf16", head_dim=64, varlen=True, arch=90):
    """(registers per thread, spill store bytes, spill load bytes, shared memory bytes) of one launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastbert.kernels import flash_attention as fa

    fn = getattr(fa, kernel)
    block_m, block_n, warps, stages = config
    flags = dict(IS_VARLEN=varlen, HAS_MASK=not varlen, CAUSAL=False, HAS_DROPOUT=dropout,
                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", HEAD_DIM=head_dim,
                 BLOCK_D=fa._block_d(head_dim), MASK_BLOCK=128, BLOCK_M=block_m, BLOCK_N=block_n)
    constexprs = {k: v for k, v in flags.items() if k in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=_signature(fn, constexprs, dtype), constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        proc = subprocess.run([ptxas, "-v", "--gpu-name", gpu, path, "-o", os.devnull], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spill is None:
        raise RuntimeError(f"ptxas gave no resource line for {kernel} {config}:\n{text[-2000:]}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2)), compiled.metadata.shared


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also every bench_attention --sweep candidate")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") not in (None, "", "0"):
        sys.exit("ptxas_report compiles for a GPU target: run it without TRITON_INTERPRET")
    import torch

    from fastbert.kernels import flash_attention as fa

    fwd = fa.fwd_config(64, torch.bfloat16, interpreting=False)
    bwd = fa.bwd_config(64, torch.bfloat16, interpreting=False)
    shipped = {"fwd": (fwd["BLOCK_M"], fwd["BLOCK_N"], fwd["num_warps"], fwd["num_stages"]),
               "dkdv": bwd["dkdv"], "dq": bwd["dq"], "fused": bwd["fused"]}
    kernels = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq", "fused": "_attn_bwd_fused"}
    jobs = [(kind, tuple(config), True) for kind, config in shipped.items() if config is not None]
    if args.sweep:
        from benchmarks.bench_attention import SWEEP
        jobs += [(kind, tuple(c), False) for kind, cands in SWEEP.items() for c in cands]
    lines = ["# ptxas_report: attention kernels, bf16, head_dim 64, packed, sm_90a (ptxas -v, no GPU)", "",
             "| kernel | config (BLOCK_M, BLOCK_N, warps, stages) | shipped | dropout | registers | spill stores B "
             "| spill loads B | shared B |", "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for kind, config, is_shipped in jobs:
        for dropout in (False, True):
            if (kind, config, dropout) in seen:
                continue
            seen.add((kind, config, dropout))
            try:
                regs, st, ld, smem = resources(kernels[kind], config, dropout)
                row = f"| {kernels[kind]} | {config} | {'yes' if config == tuple(shipped[kind] or ()) else ''} " \
                      f"| {int(dropout)} | {regs} | {st} | {ld} | {smem} |"
            except Exception as exc:  # one config that fails to compile must not hide the others
                row = f"| {kernels[kind]} | {config} | | {int(dropout)} | {type(exc).__name__}: {str(exc)[:80]} | | | |"
            print(row, flush=True)
            lines.append(row)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        with open(os.path.join(os.environ["OUT"], "ptxas_report.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
