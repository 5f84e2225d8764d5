"""Benchmark of K.mlm_loss (fused linear + cross-entropy) against PyTorch, GPU only.

The masked-LM head's loss for one pretraining batch: 32k tokens, 15% masked → rows = 4915 masked
rows (already gathered, every row labelled), vocab 30522, hidden 768 (BERT-base) and 1024
(BERT-large), bf16. Competitors, all in this one process on the same inputs:

  fastbert        K.mlm_loss(validate=False, as the model calls it after its one input check per step):
                  chunked, a ≤ 128 MiB logits block (2 × 1664 + 1587 rows here), fp32 weight/bias grads
  fastbert-chunkN (h=768 only) the same with CHUNK_BYTES = N MiB: the block size vs the fp32 d_weight
                  accumulation passes (one per chunk after the first)
  eager           F.linear → full (rows, vocab) bf16 logits → F.cross_entropy, autograd
  compile         torch.compile of the eager function
  eager-all-tok   (context, not a target) what BertForMaskedLM does without gathering: the head on
                  all 32k tokens, labels -100 on the 85% unmasked ones

Figures (forward+backward = loss, then torch.autograd.grad w.r.t. hidden, weight, bias):
  time            median / p20 / p80 ms (triton.testing.do_bench via benchmarks.harness.measure)
  graph_ms        the same fwd+bwd's device time alone, replayed from a CUDA graph
                  (harness.measure_graphed, every competitor alike): fastbert's chunked call issues ~50
                  launches, so on a slow host median_ms times the host; in the CUDA-graphed training step
                  only graph_ms remains. graph_speedup_vs_eager compares those.
  FLOPs (useful)  3 GEMMs × 2·rows·h·vocab over the masked rows only; forward alone 2·rows·h·vocab.
                  fastbert's forward already computes the gradients when autograd wants them, so its
                  fwd+bwd is still 3 GEMMs; eager-all-tok's extra work over unmasked rows is not useful.
  frac_of_ceiling TFLOP/s over the bf16 matmul ceiling measured in the same run
  peak_mib        torch.cuda.max_memory_allocated during one fwd+bwd minus the memory allocated before
                  it (inputs excluded; the three returned gradients included, for every competitor)
  speedup / mem_ratio  eager's time / ours and our peak / eager's, same shape, same run.
Goal (issue 4): fastbert ≥ 2× eager at ≤ 1/4 of eager's peak memory.
Also written: mlm_loss_kernels.md, where fastbert's fwd+bwd time goes at h=768 (torch.profiler, one
call after warm-up, per kernel), and the context field addmm_fp32_accumulate (whether d_weight
accumulates inside cuBLAS's GEMM, PyTorch ≥ 2.10, or through the fp32 scratch).

Run: python -m benchmarks.bench_mlm_loss [--quick]   (--quick: < 30 s on an H100/H200)
"""
from __future__ import annotations

import argparse
import traceback

import torch
import torch.nn.functional as F

IGNORE = -100
TOKENS = 32768
VOCAB = 30522


def _eager(hidden, weight, bias, labels):
    logits = F.linear(hidden, weight, bias)  # (rows, vocab), all of it
    return F.cross_entropy(logits, labels, ignore_index=IGNORE)


def _fastbert(hidden, weight, bias, labels):
    import fastbert.kernels as K
    return K.mlm_loss(hidden, weight, bias, labels, IGNORE, validate=False)


def _with_chunk_bytes(nbytes):
    def run(hidden, weight, bias, labels):
        from fastbert.kernels import linear_cross_entropy as lce
        saved, lce.CHUNK_BYTES = lce.CHUNK_BYTES, nbytes
        try:
            return _fastbert(hidden, weight, bias, labels)
        finally:
            lce.CHUNK_BYTES = saved
    return run


def _kernel_breakdown(fn, inputs, path):
    """One fwd+bwd under torch.profiler: device time per kernel, largest first, as markdown (the
    same filter as benchmarks/profile_step.py), and the wall time (the gap = GPU idle)."""
    from torch.profiler import ProfilerActivity, profile
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        _fwd_bwd(fn, *inputs)
        end.record()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0))
        if t > 0 and evt.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((t / 1e3, evt.count, evt.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = ["# mlm_loss: fastbert fwd+bwd per kernel (4915 x 768 x 30522 bf16, one call, profiled)", "",
             f"wall {start.elapsed_time(end):.3f} ms (under the profiler); kernel time {total:.3f} ms", "",
             "| ms | calls | kernel |", "|---|---|---|"]
    lines += [f"| {ms:.3f} | {n} | {name[:110]} |" for ms, n, name in rows[:25]]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    print(text)


def _inputs(rows, h, masked_fraction=1.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (torch.randn(VOCAB, h, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    bias = torch.zeros(VOCAB, device="cuda", dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, VOCAB, (rows,), device="cuda", generator=g)
    if masked_fraction < 1.0:
        keep = torch.rand(rows, device="cuda", generator=g) < masked_fraction
        labels = torch.where(keep, labels, torch.full_like(labels, IGNORE))
    return hidden, weight, bias, labels


def _fwd_bwd(fn, hidden, weight, bias, labels):
    loss = fn(hidden, weight, bias, labels)
    return loss, torch.autograd.grad(loss, (hidden, weight, bias))


def _peak_mib(fn, *args):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2 ** 20


def main(argv=None):
    from benchmarks.harness import Recorder, matmul_ceiling_tflops, measure, measure_graphed, output_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions; torch.compile at h=768 only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_mlm_loss: needs a CUDA GPU; skipped")
        return 0
    warmup, rep = (10, 40) if args.quick else (25, 200)
    rows = round(TOKENS * 0.15)  # 4915 masked rows
    ceiling = matmul_ceiling_tflops()
    rec = Recorder("mlm_loss", rows=rows, tokens=TOKENS, vocab=VOCAB, matmul_ceiling_tflops=ceiling)
    print(f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s")

    compiled = torch.compile(_eager)
    for h in (768, 1024):
        impls = [("fastbert", _fastbert), ("eager", _eager)]
        if not (args.quick and h != 768):
            impls.append(("compile", compiled))
        if h == 768:
            impls += [(f"fastbert-chunk{mib}MiB", _with_chunk_bytes(mib << 20)) for mib in (64, 256)]
        inputs = _inputs(rows, h)
        flops_fwd = 2 * rows * h * VOCAB
        eager_ms = eager_peak = eager_graph_ms = None
        losses = {}
        for name, fn in impls:
            try:
                loss, _ = _fwd_bwd(fn, *inputs)  # warm-up: Triton / inductor compile here
                losses[name] = loss.float().item()
                # a live loss keeps its graph, whose AccumulateGrad nodes of hidden / weight / bias carry
                # the default stream: every later backward would meet them (measure_graphed's capture fails)
                del loss
                t_fwd = None
                if not (args.quick and (name == "compile" or "chunk" in name)):  # (one more inductor compile)
                    with torch.no_grad():
                        t_fwd = measure(lambda: fn(*inputs), warmup=warmup, rep=rep)
                t = measure(lambda: _fwd_bwd(fn, *inputs), warmup=warmup, rep=rep)
                g = measure_graphed(lambda: _fwd_bwd(fn, *inputs)) or {}
                peak = _peak_mib(_fwd_bwd, fn, *inputs)
                if name == "eager":
                    eager_ms, eager_peak, eager_graph_ms = t["median_ms"], peak, g.get("graph_ms")
                tflops = 3 * flops_fwd / (t["median_ms"] * 1e-3) / 1e12
                if t_fwd is not None:
                    rec.add(op="mlm_loss", impl=name, shape=f"{rows}x{h}x{VOCAB}", dtype="bf16", **{"pass": "fwd"},
                            median_ms=t_fwd["median_ms"], p20_ms=t_fwd["p20_ms"], p80_ms=t_fwd["p80_ms"],
                            tflops=flops_fwd / (t_fwd["median_ms"] * 1e-3) / 1e12)
                rec.add(op="mlm_loss", impl=name, shape=f"{rows}x{h}x{VOCAB}", dtype="bf16", **{"pass": "fwd+bwd"},
                        median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"], tflops=tflops,
                        frac_of_ceiling=tflops / ceiling, peak_mib=peak, **g)
            except Exception:  # one failure must not lose the other rows
                traceback.print_exc()
        # every row above ran on the same inputs: report the ratios against eager and the loss agreement
        for row in rec.rows:
            if row["shape"] == f"{rows}x{h}x{VOCAB}" and row["pass"] == "fwd+bwd" and eager_ms:
                row["speedup_vs_eager"] = eager_ms / row["median_ms"]
                row["mem_ratio_vs_eager"] = row["peak_mib"] / eager_peak
                if eager_graph_ms and row.get("graph_ms"):
                    row["graph_speedup_vs_eager"] = eager_graph_ms / row["graph_ms"]
        if losses:
            print(f"h={h}: losses {', '.join(f'{k}={v:.5f}' for k, v in losses.items())}")
        if h == 768:
            try:
                _kernel_breakdown(_fastbert, inputs, output_dir() / "mlm_loss_kernels.md")
            except Exception:
                traceback.print_exc()
            from fastbert.kernels import linear_cross_entropy as lce
            rec.context["addmm_fp32_accumulate"] = lce._ADDMM_F32
            print(f"d_weight accumulation inside the GEMM (addmm out_dtype=float32): {lce._ADDMM_F32}")
        del inputs
        torch.cuda.empty_cache()

    # Context: the head on all tokens, as an ungathered BertForMaskedLM does (not a target).
    try:
        h = 768
        all_inputs = _inputs(TOKENS, h, masked_fraction=0.15)
        _fwd_bwd(_eager, *all_inputs)
        t = measure(lambda: _fwd_bwd(_eager, *all_inputs), warmup=warmup, rep=rep)
        peak = _peak_mib(_fwd_bwd, _eager, *all_inputs)
        tflops = 3 * 2 * rows * h * VOCAB / (t["median_ms"] * 1e-3) / 1e12  # useful FLOPs only
        rec.add(op="mlm_loss", impl="eager-all-tok", shape=f"{TOKENS}x{h}x{VOCAB}", dtype="bf16",
                **{"pass": "fwd+bwd"}, median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"],
                tflops=tflops, frac_of_ceiling=tflops / ceiling, peak_mib=peak)
        del all_inputs
    except Exception:
        traceback.print_exc()

    rec.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
