"""Registers, spills and shared memory of the attention kernels' GPU launch configurations, from
ptxas, with no GPU: compile for sm_90 (as tests/test_attention.py's AOT tests do), then run the
ptxas that ships with Triton with -v on the PTX.

A spilling kernel keeps part of its tiles in local memory (L1, then L2): not always slower (the H200
sweep's fastest dK/dV config spills), but it is the first thing to look at when a config disappoints,
and it is the one performance fact a CPU-only session can establish. Times come from
`benchmarks.bench_attention --sweep` on a GPU.

Run: python -m benchmarks.ptxas_report [--sweep]  (--sweep: also every bench_attention --sweep candidate;
     a few seconds per config). Writes $OUT/ptxas_report.md when OUT is set.
     python -m benchmarks.ptxas_report --ln [--sweep]: the add / GELU + LayerNorm kernels instead
     (kernels/layer_norm.py: ln_config's launches at widths 768, 4096 and 8192, the one-row launch of
     before the tiling, --sweep: bench_ln_sweep's candidates at 768), with the programs per SM their
     registers and shared memory allow on an H100 / H200 SM; writes $OUT/ptxas_report_ln.md.
     python -m benchmarks.ptxas_report --gemm [--sweep]: the feed-forward epilogue matmuls
     (kernels/gemm_gelu.py: the shipped bf16 launch, --sweep: bench_ffn's candidates), forward and
     backward epilogue; writes $OUT/ptxas_report_gemm.md.
     python -m benchmarks.ptxas_report --dropout: SASS instructions (cuobjdump, sm_90a) of the kernels
     that draw a dropout mask — add_layer_norm and embed_layer_norm forward and backward, as the model
     launches them at width 768 — with and without dropout, and the difference per element each
     thread handles: what the keep mask costs in issued instructions; writes $OUT/ptxas_report_dropout.md.
     python -m benchmarks.ptxas_report --gelu: SASS instructions per element of bias_gelu's forward and
     backward (bf16, width 3072, both GELU forms), which at BERT sizes are bound by issued instructions
     more than by bytes; writes $OUT/ptxas_report_gelu.md.
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
    compiled = compile_attention(kernel, config, dropout, dtype, head_dim, varlen, arch)
    return _ptxas_resources(compiled, f"{kernel} {config}", arch)


# Integer arguments that are not multiples of 16 in BERT's launches (12 heads); every other size and
# stride is (768, 3072, 32768 tokens, 128 per sequence, 2304-element qkv rows, ...).
NOT_DIVISIBLE = {"n_heads"}


def compile_launch(fn, signature, constexprs, options, arch=90):
    """Compile one launch for sm_<arch> as a BERT-size launch on torch tensors specialises it: pointers
    16-byte aligned, integers multiples of 16 (but NOT_DIVISIBLE). Those hints turn on vectorised loads
    and stores and the cp.async pipeline; without them the compiler builds another kernel, with other
    registers and a fraction of the shared memory. (tests/aot.py marks only pointers and strides: it
    checks what any launch compiles to, this reports the BERT launch.)"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
             if ty.startswith("*") or (ty == "i32" and name not in NOT_DIVISIBLE)}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def compile_attention(kernel, config, dropout, dtype="bf16", head_dim=64, varlen=True, arch=90):
    """One attention launch compiled for sm_<arch> (Triton's CompiledKernel: .asm["ptx"], .metadata)."""
    from fastbert.kernels import flash_attention as fa

    fn = getattr(fa, kernel)
    block_m, block_n, warps, stages = config
    flags = dict(IS_VARLEN=varlen, HAS_MASK=not varlen, CAUSAL=False, HAS_DROPOUT=dropout,
                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", HEAD_DIM=head_dim,
                 BLOCK_D=fa._block_d(head_dim), MASK_BLOCK=128, BLOCK_M=block_m, BLOCK_N=block_n)
    constexprs = {k: v for k, v in flags.items() if k in fn.arg_names}
    return compile_launch(fn, _signature(fn, constexprs, dtype), constexprs, dict(num_warps=warps, num_stages=stages),
                          arch)


def _ptxas_resources(compiled, what, arch=90):
    """(registers per thread, spill store bytes, spill load bytes, shared memory bytes) of a compiled kernel."""
    import triton

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
        raise RuntimeError(f"ptxas gave no resource line for {what}:\n{text[-2000:]}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2)), compiled.metadata.shared


# The LayerNorm kernels as the model calls them under bf16 autocast (x bf16, residual / weights /
# y fp32, the bf16 copy, dropout: every flag on) and all-bf16 without flags; GELU + LayerNorm in bf16.
# "autocast+xbias": the same with the dense bias (x_bias, an fp32 parameter) added by the kernel, as
# BertSelfOutput / BertOutput call it on the Triton kernels.
_LN_VARIANTS = {
    "_add_ln_fwd": [("autocast", dict(X="bf16", R="fp32", W="fp32", B="fp32", Y="fp32", Y_LOW="bf16"),
                     dict(HAS_DROPOUT=True, STORE_LOW=True, HAS_X_BIAS=False)),
                    ("autocast+xbias", dict(X="bf16", R="fp32", W="fp32", B="fp32", Y="fp32", Y_LOW="bf16", XB="fp32"),
                     dict(HAS_DROPOUT=True, STORE_LOW=True, HAS_X_BIAS=True)),
                    ("bf16", dict(X="bf16", R="bf16", W="bf16", B="bf16", Y="bf16", Y_LOW="bf16"),
                     dict(HAS_DROPOUT=False, STORE_LOW=False, HAS_X_BIAS=False))],
    "_add_ln_bwd": [("autocast", dict(X="bf16", R="fp32", W="fp32", DY="fp32", DY_LOW="bf16", DR="fp32", DX="bf16"),
                     dict(HAS_DROPOUT=True, HAS_DY_LOW=True, STORE_DX=True, HAS_X_BIAS=False)),
                    ("autocast+xbias", dict(X="bf16", R="fp32", W="fp32", DY="fp32", DY_LOW="bf16", DR="fp32",
                                            DX="bf16", XB="fp32"),
                     dict(HAS_DROPOUT=True, HAS_DY_LOW=True, STORE_DX=True, HAS_X_BIAS=True)),
                    ("bf16", dict(X="bf16", R="bf16", W="bf16", DY="bf16", DY_LOW="bf16", DR="bf16", DX="bf16"),
                     dict(HAS_DROPOUT=False, HAS_DY_LOW=False, STORE_DX=False, HAS_X_BIAS=False))],
    "_gelu_ln_fwd": [("bf16", dict(X="bf16", BIAS="bf16", W="bf16", B="bf16", Y="bf16"), dict(APPROX_TANH=False))],
    "_gelu_ln_bwd": [("bf16", dict(X="bf16", BIAS="bf16", W="bf16", DY="bf16", DX="bf16"), dict(APPROX_TANH=False))],
}


def ln_launch(kernel, block_n, config, dtypes, flags, arch=90):
    """One add / GELU + LayerNorm launch compiled for sm_<arch>: config = layer_norm.LnConfig."""
    from fastbert.kernels import layer_norm as L

    fn = getattr(L, kernel)
    constexprs = dict(flags, BLOCK_M=config.block_m, BLOCK_N=block_n)
    if "NUM_STAGES" in fn.arg_names:
        constexprs["NUM_STAGES"] = config.num_stages
    floats = {"eps", "scale"}
    signature = {arg: "constexpr" if arg in constexprs else "*" + dtypes[arg] if arg in dtypes
                 else "*i64" if arg == "SEED" else "*fp32" if arg.isupper() else "fp32" if arg in floats else "i32"
                 for arg in fn.arg_names}
    return compile_launch(fn, signature, constexprs, dict(num_warps=config.num_warps), arch)


def ln_resources(kernel, block_n, config, dtypes, flags, arch=90):
    """ptxas resources of one add / GELU + LayerNorm launch: config = layer_norm.LnConfig."""
    return _ptxas_resources(ln_launch(kernel, block_n, config, dtypes, flags, arch), f"{kernel} {block_n} {config}",
                            arch)


def gemm_launch(config, dtype="bf16", backward=False, approx=False, even_k=True, store_z=True):
    """(signature, constexprs, options) of one kernels/gemm_gelu.py launch as K.feed_forward makes it:
    the forward reads x and w1ᵀ, the backward dout and w2, each unit-stride along K (forward) or along N
    (w2), and Triton specialises a stride of 1 into a constant. config = gemm_gelu.GemmConfig; the bias
    is an fp32 parameter in the model. store_z=False: the inference forward (z not written)."""
    unit = "stride_bn" if backward else "stride_bk"
    constexprs = {"stride_ak": 1, unit: 1, "BACKWARD": backward, "STORE_Z": store_z, "APPROX_TANH": approx,
                  "EVEN_K": even_k,
                  "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "BLOCK_M": config.block_m,
                  "BLOCK_N": config.block_n, "BLOCK_K": config.block_k, "GROUP_M": config.group_m}
    elem = "*" + dtype
    signature = {"A": elem, "B": elem, "BIAS": "*fp32", "Z": elem, "C": elem, "DB_PART": "*fp32", "M": "i32",
                 "N": "i32", "K": "i32", "stride_am": "i32", "stride_ak": "i32", "stride_bk": "i32", "stride_bn": "i32"}
    signature.update({name: "constexpr" for name in constexprs})
    return signature, constexprs, {"num_warps": config.num_warps, "num_stages": config.num_stages}


def gemm_report(sweep: bool):
    import torch

    from fastbert.kernels import gemm_gelu as GG

    configs = [(GG.gemm_config(torch.bfloat16), "shipped")]
    if sweep:
        from benchmarks.bench_ffn import FFN_CANDIDATES
        configs += [(GG.GemmConfig(*c), "candidate") for c in FFN_CANDIDATES if GG.GemmConfig(*c) != configs[0][0]]
    lines = ["# ptxas_report --gemm: the feed-forward epilogue matmuls (kernels/gemm_gelu.py), bf16, sm_90a "
             "(ptxas -v, no GPU)", "",
             "Config: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages); accumulator/thread: fp32 values of the "
             "BLOCK_M x BLOCK_N accumulator per thread; programs/SM: what registers, warps and shared memory allow "
             "on an H100 / H200 SM.", "",
             "| epilogue | config | launch | accumulator/thread | registers | spill stores B | spill loads B "
             "| shared B | programs/SM |", "|---" * 9 + "|"]
    for config, label in configs:
        # (backward, store_z): the training forward, the inference forward (z not written), the backward
        for backward, store_z in ((False, True), (False, False), (True, True)):
            what = "dgrad + gelu'" if backward else "bias + gelu" if store_z else "bias + gelu, inference"
            acc = config.block_m * config.block_n // (32 * config.num_warps)

            def measure(config=config, backward=backward, store_z=store_z):
                signature, constexprs, options = gemm_launch(config, backward=backward, store_z=store_z)
                compiled = compile_launch(GG._gemm_gelu, signature, constexprs, options)
                regs, st, ld, smem = _ptxas_resources(compiled, f"_gemm_gelu {config}")
                return regs, st, ld, smem, programs_per_sm(regs, config.num_warps, smem)

            lines.append(_row((what, tuple(config), label, acc), measure, 5))
    _save(lines, "ptxas_report_gemm.md")
    return 0


def programs_per_sm(regs, warps, shared):
    """Programs an H100 / H200 SM holds at once: 64K registers (allocated per warp in units of 256),
    64 warps, 228 KB of shared memory (1 KB reserved per program), 32 programs."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // per_warp // warps, 64 // warps, 233472 // (shared + 1024), 32)


def ln_report(sweep: bool):
    from fastbert.kernels import layer_norm as L

    jobs = []
    for n in (768, 4096, L.MAX_WIDTH):
        for kind in L.LN_KINDS:
            jobs += [(kind, n, L.ln_config(n, kind, interpreting=False), "default"),
                     (kind, n, L.one_row_config(n, kind), "one-row")]
    if sweep:
        from benchmarks.bench_ln_sweep import BWD_CANDIDATES, FWD_CANDIDATES
        for kind in L.LN_KINDS:
            cands = BWD_CANDIDATES if kind.endswith("_bwd") else FWD_CANDIDATES
            jobs += [(kind, 768, L.LnConfig(*c), "candidate") for c in cands]
    lines = ["# ptxas_report --ln: add / GELU + LayerNorm kernels, sm_90a (ptxas -v, no GPU)", "",
             "Config: (BLOCK_M, num_warps[, backward programs per SM, pipelining stages]); values/thread: fp32 "
             "elements of one tile per thread; programs/SM: what registers, warps and shared memory allow on "
             "an H100 / H200 SM; rows/SM: programs/SM x BLOCK_M (rows computed on at once).", "",
             "| kernel | variant | width | config | launch | values/thread | registers | spill stores B "
             "| spill loads B | shared B | programs/SM | rows/SM |", "|---" * 12 + "|"]
    seen = set()
    kernels = {kind: f"_{kind.replace('_', '_ln_')}" for kind in L.LN_KINDS}  # add_fwd -> _add_ln_fwd
    for kind, n, config, label in jobs:
        block_n = L.row_block(n)
        shown = tuple(config) if kind.endswith("_bwd") else tuple(config)[:2]
        compiled_as = (config.block_m, config.num_warps, config.num_stages)  # programs per SM is not compiled
        for variant, dtypes, flags in _LN_VARIANTS[kernels[kind]]:
            key = (kind, block_n, compiled_as, variant, label if label != "candidate" else "")
            if key in seen:
                continue
            seen.add(key)
            per_thread = config.block_m * block_n // (32 * config.num_warps)
            def measure(kind=kind, config=config, block_n=block_n, dtypes=dtypes, flags=flags):
                regs, st, ld, smem = ln_resources(kernels[kind], block_n, config, dtypes, flags)
                progs = programs_per_sm(regs, config.num_warps, smem)
                return regs, st, ld, smem, progs, progs * config.block_m

            lines.append(_row((kernels[kind], variant, n, shown, label, per_thread), measure, 6))
    _save(lines, "ptxas_report_ln.md")
    return 0


def sass_instructions(compiled) -> int:
    """Instructions in the SASS of a compiled kernel (cuobjdump -sass of its cubin; static count)."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    count = len(re.findall(r"/\*[0-9a-f]{4}\*/\s+[^;]*;", text))
    if count == 0:
        raise RuntimeError(f"cuobjdump printed no SASS:\n{text[-2000:]}")
    return count


def _embed_launch(kernel, dropout, block_n):
    """One embed_layer_norm kernel as the model launches it: int64 ids, fp32 tables and LayerNorm."""
    from fastbert.kernels import embedding as E

    fn = getattr(E, kernel)
    constexprs = dict(HAS_DROPOUT=dropout, BLOCK_N=block_n)
    signature = {arg: "constexpr" if arg in constexprs else "*i64" if arg in ("IDS", "TT", "POS", "SEED")
                 else "*fp32" if arg.isupper() else "fp32" if arg in ("eps", "scale") else "i32"
                 for arg in fn.arg_names}
    return compile_launch(fn, signature, constexprs, dict(num_warps=E.row_warps(block_n)))


def _dropout_launches(n=768):
    """(kernel, BLOCK_M, num_warps, make(dropout) -> compiled kernel) of the kernels that draw a dropout mask,
    as the model launches them at width n under bf16 autocast."""
    from fastbert.kernels import layer_norm as L

    block_n = L.row_block(n)
    jobs = []
    for kernel, kind in (("_add_ln_fwd", "add_fwd"), ("_add_ln_bwd", "add_bwd")):
        config = L.ln_config(n, kind, interpreting=False)
        _, dtypes, flags = _LN_VARIANTS[kernel][0]  # "autocast"

        def make(dropout, kernel=kernel, config=config, dtypes=dtypes, flags=flags):
            return ln_launch(kernel, block_n, config, dtypes, dict(flags, HAS_DROPOUT=dropout))
        jobs.append((kernel, config.block_m, config.num_warps, make))
    for kernel in ("_embed_ln_fwd", "_embed_ln_bwd"):
        jobs.append((kernel, 1, L.row_warps(block_n),
                     lambda dropout, kernel=kernel: _embed_launch(kernel, dropout, block_n)))
    return jobs


def _dropout_cost(block_m, warps, make, block_n):
    """(elements per thread per step, SASS instructions without dropout, with dropout) of one launch."""
    return block_m * block_n // (32 * warps), sass_instructions(make(False)), sass_instructions(make(True))


def dropout_costs(n=768):
    """{kernel: (elements per thread per step, SASS instructions without dropout, with dropout)}."""
    from fastbert.kernels.layer_norm import row_block

    return {kernel: _dropout_cost(block_m, warps, make, row_block(n))
            for kernel, block_m, warps, make in _dropout_launches(n)}


def dropout_report():
    """SASS instructions of the dropout-carrying LayerNorm-family kernels with and without the mask."""
    from fastbert.kernels.layer_norm import row_block

    n = 768
    block_n = row_block(n)
    lines = ["# ptxas_report --dropout: what drawing the keep mask costs, SASS instructions, sm_90a (no GPU)", "",
             f"Width {n} (BLOCK_N {block_n}), the model's bf16-autocast launches. Static counts from cuobjdump; "
             "the backwards' loops run one tile per step, so the difference is the loop body's cost per step. "
             "extra / element: (with - without) / (tile elements per thread).", "",
             "| kernel | tile (BLOCK_M x BLOCK_N), warps | elements / thread | instructions without dropout "
             "| with dropout | extra / element |", "|---|---|---|---|---|---|"]
    for kernel, block_m, warps, make in _dropout_launches(n):
        def measure(block_m=block_m, warps=warps, make=make):
            per_thread, without, with_ = _dropout_cost(block_m, warps, make, block_n)
            return without, with_, f"{(with_ - without) / per_thread:.1f}"
        lines.append(_row((kernel, f"{block_m} x {block_n}, {warps}", block_m * block_n // (32 * warps)), measure, 3))
    _save(lines, "ptxas_report_dropout.md")
    return 0


def _gelu_tile(kernel, n):
    """(BLOCK_M, BLOCK_N, num_warps, elements one thread handles per tile) of a bias + GELU launch."""
    from fastbert.kernels import gelu as G

    block_m, block_n, warps = (G.fwd_config if kernel == "_bias_gelu_fwd" else G.bwd_config)(n)
    return block_m, block_n, warps, block_m * block_n // (32 * warps)


def gelu_launch(kernel, approx, n=3072):
    """(compiled kernel, elements one thread handles per tile) of a bias + GELU launch as the model
    makes it (bf16, width n)."""
    from fastbert.kernels import gelu as G

    fn = getattr(G, kernel)
    block_m, block_n, warps, per_thread = _gelu_tile(kernel, n)
    constexprs = dict(APPROX_TANH=approx, BLOCK_M=block_m, BLOCK_N=block_n)
    signature = {arg: "constexpr" if arg in constexprs else "*fp32" if arg == "DBIAS_PART"
                 else "*bf16" if arg.isupper() else "i32" for arg in fn.arg_names}
    return compile_launch(fn, signature, constexprs, dict(num_warps=warps)), per_thread


def gelu_costs(n=3072) -> dict:
    """{(kernel, "erf" | "tanh"): SASS instructions per element a thread handles} of bias + GELU."""
    costs = {}
    for kernel in ("_bias_gelu_fwd", "_bias_gelu_bwd"):
        for approx in (False, True):
            compiled, per_thread = gelu_launch(kernel, approx, n)
            costs[(kernel, "tanh" if approx else "erf")] = sass_instructions(compiled) / per_thread
    return costs


def gelu_report(n=3072):
    """SASS instructions per element of the bias + GELU kernels as the model launches them (bf16)."""
    lines = ["# ptxas_report --gelu: bias + GELU, SASS instructions per element, sm_90a (no GPU)", "",
             f"bf16, width {n}, the launches of kernels/gelu.py; static counts from cuobjdump over the elements a "
             "thread holds per tile (the backward's loop body dominates its count).", "",
             "| kernel | GELU | tile (BLOCK_M x BLOCK_N), warps | elements / thread | instructions | per element |",
             "|---|---|---|---|---|---|"]
    for kernel in ("_bias_gelu_fwd", "_bias_gelu_bwd"):
        block_m, block_n, warps, per_thread = _gelu_tile(kernel, n)
        for approx in (False, True):
            def measure(kernel=kernel, approx=approx):
                compiled, per_thread = gelu_launch(kernel, approx, n)
                count = sass_instructions(compiled)
                return count, f"{count / per_thread:.1f}"
            lines.append(_row((kernel, "tanh" if approx else "erf", f"{block_m} x {block_n}, {warps}", per_thread),
                              measure, 2))
    _save(lines, "ptxas_report_gelu.md")
    return 0


def _row(lead, measure, width):
    """One printed table row: the lead cells, then measure()'s `width` cells — or, when it raises, the
    error in the first of them (one config that fails to compile must not hide the others)."""
    try:
        cells = list(measure())
    except Exception as exc:
        cells = [f"{type(exc).__name__}: {str(exc)[:80]}"] + [""] * (width - 1)
    row = "| " + " | ".join(str(c) for c in (*lead, *cells)) + " |"
    print(row, flush=True)
    return row


def _save(lines, name):
    """The table under $OUT, when OUT is set."""
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also every bench_attention (--ln: bench_ln_sweep) candidate")
    ap.add_argument("--ln", action="store_true", help="the add / GELU + LayerNorm kernels instead of attention")
    ap.add_argument("--gemm", action="store_true", help="the feed-forward epilogue matmuls instead of attention")
    ap.add_argument("--gelu", action="store_true", help="SASS instructions per element of bias + GELU instead")
    ap.add_argument("--dropout", action="store_true", help="SASS instructions of the LayerNorm family with / "
                    "without dropout instead")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") not in (None, "", "0"):
        sys.exit("ptxas_report compiles for a GPU target: run it without TRITON_INTERPRET")
    if args.ln:
        return ln_report(args.sweep)
    if args.gemm:
        return gemm_report(args.sweep)
    if args.dropout:
        return dropout_report()
    if args.gelu:
        return gelu_report()
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
            shipped_mark = "yes" if config == tuple(shipped[kind] or ()) else ""
            lines.append(_row((kernels[kind], config, shipped_mark, int(dropout)),
                              lambda k=kernels[kind], c=config, d=dropout: resources(k, c, d), 4))
    _save(lines, "ptxas_report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
