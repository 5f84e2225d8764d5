"""GPU resource properties the shipped launch configurations were chosen for, checked without a GPU:
each kernel is compiled for sm_90 and ptxas (shipped with Triton) reports its registers and spills
(benchmarks/ptxas_report.py). Not timings — only a GPU gives those — but the facts the defaults rest
on (benchmarks/results/ptxas-cpu-2026-11-27-*), so an edit that makes a default spill, or sends the
fused attention backward's matmuls back to mma.sync, fails here instead of silently on the next GPU
run. Slow (a few seconds per compile): pytest -m slow; the GELU NaN check (two compiles) runs always."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a child without TRITON_INTERPRET (the interpreter replaces the kernels it would compile).
_SCRIPT = textwrap.dedent("""
    import json
    import torch
    from benchmarks import ptxas_report as P
    from fastbert.kernels import flash_attention as fa, layer_norm as L
    out = {}
    for head_dim in (64, 128):
        fused = fa.bwd_config(head_dim, torch.bfloat16, interpreting=False)["fused"]
        for dropout in (False, True):
            for varlen in (True, False):
                compiled = P.compile_attention("_attn_bwd_fused", tuple(fused), dropout, head_dim=head_dim, varlen=varlen)
                regs, st, ld, smem = P._ptxas_resources(compiled, "fused")
                ptx = compiled.asm["ptx"]
                out[f"fused d{head_dim} dropout={dropout} varlen={varlen}"] = dict(
                    regs=regs, spills=st + ld, mma_sync=ptx.count("mma.sync"), wgmma=ptx.count("wgmma.mma_async"))
    kernels = {"add_fwd": "_add_ln_fwd", "add_bwd": "_add_ln_bwd", "gelu_fwd": "_gelu_ln_fwd", "gelu_bwd": "_gelu_ln_bwd"}
    for kind, kernel in kernels.items():
        config = L.ln_config(768, kind, interpreting=False)
        for variant, dtypes, flags in P._LN_VARIANTS[kernel]:
            regs, st, ld, smem = P.ln_resources(kernel, L.row_block(768), config, dtypes, flags)
            out[f"{kernel} 768 {variant}"] = dict(regs=regs, spills=st + ld,
                                                  programs_per_sm=P.programs_per_sm(regs, config.num_warps, smem),
                                                  block_m=config.block_m)
    from fastbert.kernels import gemm_gelu as GG
    for backward in (False, True):
        signature, constexprs, options = P.gemm_launch(GG.gemm_config(torch.bfloat16), backward=backward)
        compiled = P.compile_launch(GG._gemm_gelu, signature, constexprs, options)
        regs, st, ld, smem = P._ptxas_resources(compiled, "gemm")
        ptx = compiled.asm["ptx"]
        out[f"gemm backward={backward}"] = dict(regs=regs, spills=st + ld, shared=smem, mma_sync=ptx.count("mma.sync"),
                                                wgmma=ptx.count("wgmma.mma_async"))
    for kernel, (per_thread, without, with_) in P.dropout_costs(768).items():
        out[f"dropout {kernel}"] = dict(per_thread=per_thread, without=without, with_dropout=with_)
    for (kernel, form), per_element in P.gelu_costs().items():
        out[f"gelu {kernel} {form}"] = per_element
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fused_attention_backward_defaults_do_not_spill_and_use_wgmma(report):
    fused = {k: v for k, v in report.items() if k.startswith("fused")}
    assert len(fused) == 8
    for name, r in fused.items():
        # head_dim 128's 16-row tile may spill a few bytes in one variant (28 B measured): a bound, not zero
        assert r["spills"] <= (64 if " d128 " in name else 0), (name, r)
        assert r["mma_sync"] == 0 and r["wgmma"] > 0, (name, r)  # every dot on sm_90's warp-group MMA


@pytest.mark.slow
def test_layer_norm_defaults_at_bert_width(report):
    """At 768 the defaults spill nothing; the forward holds 4-row tiles; the add + LayerNorm backward
    keeps 4 programs per SM with the dense bias too (5 measured, uncapped: a 128-register cap, kept in
    session 11 from an unhinted compile, held it at 4)."""
    ln = {k: v for k, v in report.items() if k.startswith("_")}  # the LayerNorm entries
    assert len(ln) == 8
    for name, r in ln.items():
        assert r["spills"] == 0, (name, r)
    assert report["_add_ln_fwd 768 autocast"]["block_m"] == 4
    assert report["_add_ln_bwd 768 autocast+xbias"]["programs_per_sm"] >= 4
    assert report["_add_ln_bwd 768 autocast"]["programs_per_sm"] >= 4


@pytest.mark.slow
def test_feed_forward_epilogue_matmul_defaults(report):
    """The shipped bf16 launch of both epilogue matmuls runs on wgmma with its cp.async pipeline (4 stages
    of 128 x 64 + 64 x 128 bf16 tiles: 128 KB of shared memory), both without spills: the backward
    (gelu' of a loaded z tile and the column sums) took 255 registers and spilled 32 B with tl.erf's GELU,
    171 and none with kernels/gelu.py's normal-tail formula (ptxas-cpu-2026-11-28-s18-gelu/)."""
    for backward in (False, True):
        r = report[f"gemm backward={backward}"]
        assert r["mma_sync"] == 0 and r["wgmma"] > 0, r
        assert r["shared"] == 4 * (128 * 64 + 64 * 128) * 2, r
        assert r["spills"] == 0, r


@pytest.mark.slow
def test_dropout_mask_costs_a_fraction_of_a_philox_call_per_element(report):
    """The LayerNorm family draws its keep mask 8 elements per Philox call (kernels/philox_dropout.py):
    at 768 under bf16 autocast, dropout adds 12-21 SASS instructions per element a thread handles (one
    Philox call per element, as tl.rand draws, added 57-65: ptxas-cpu-2026-11-27-s17-dropout/)."""
    costs = {k: v for k, v in report.items() if k.startswith("dropout ")}
    assert sorted(costs) == ["dropout _add_ln_bwd", "dropout _add_ln_fwd", "dropout _embed_ln_bwd",
                             "dropout _embed_ln_fwd"]
    for name, r in costs.items():
        extra = (r["with_dropout"] - r["without"]) / r["per_thread"]
        assert 0 < extra <= 30, (name, r, extra)


@pytest.mark.slow
def test_exact_gelu_costs_what_a_memory_bound_kernel_can_afford(report):
    """Exact (erf) bias + GELU at BERT-base's 3072 in bf16 was bound by issued instructions on an H200
    (forward 0.155 ms at 40 SASS instructions per element, where the bytes alone take 0.095). With Phi
    from kernels/gelu.py's normal-tail formula instead of tl.erf: 26.5 forward, 33 backward
    (ptxas-cpu-2026-11-28-s18-gelu/). Fails on a return to tl.erf (40 / 53)."""
    assert report["gelu _bias_gelu_fwd erf"] <= 30, report["gelu _bias_gelu_fwd erf"]
    assert report["gelu _bias_gelu_bwd erf"] <= 40, report["gelu _bias_gelu_bwd erf"]
    # the tanh form's reciprocal (no IEEE division): 29.5 / 41.2, from 45.0 / 55.5
    assert report["gelu _bias_gelu_fwd tanh"] <= 33, report["gelu _bias_gelu_fwd tanh"]
    assert report["gelu _bias_gelu_bwd tanh"] <= 47, report["gelu _bias_gelu_bwd tanh"]


def test_exact_gelu_clamp_propagates_nan_when_compiled():
    """The exact GELU clamps |z| at 64 with tl.minimum. Compiled, a plain min.f32 returns the operand
    that is not NaN, which made GELU(nan) = 0 and GELU'(nan) = 0 on a GPU (the interpreter's numpy
    minimum propagates nan, so test_gelu cannot see it): the PTX must use min.NaN.f32. Two compiles
    (~2 s), so not slow: every run checks it. The other GELU kernels share kernels/gelu.py's gelu()."""
    script = ("import json; from benchmarks import ptxas_report as P; print(json.dumps({k: P.gelu_launch(k, False)"
              "[0].asm['ptx'].count('min.NaN.f32') for k in ('_bias_gelu_fwd', '_bias_gelu_bwd')}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["_bias_gelu_fwd"] > 0 and counts["_bias_gelu_bwd"] > 0, counts
