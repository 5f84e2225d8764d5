"""Benchmark of K.attention / K.varlen_attention against PyTorch's SDPA, GPU only.

BERT-base attention: bf16, 12 heads, head_dim 64, about 32k tokens per batch (batch = 32768 / seq),
seq 128 and 512, fill rates 100%, 75%, 50% (the fraction of real tokens; lengths drawn uniformly from
[(2·fill − 1)·seq, seq], the same lengths for every competitor). Competitors, all in one process:

  fastbert-padded   K.attention on (B, H, S, D) with the key padding mask
  fastbert-varlen   K.varlen_attention on the packed real tokens (validate=False, as the model
                    calls it: no host sync for the cu_seqlens checks), q/k/v as views of one fused
                    (total, 3, H, D) projection, as the unpadded model calls it
  fastbert-varlen-split  the same with the one-launch fused backward turned off (seq <= 128 only,
                    where it is on): the A/B of that kernel against the dQ + dK/dV pair
  sdpa-mask         F.scaled_dot_product_attention on (B, H, S, D) with the boolean mask: a mask rules
                    out its flash backend (it picks memory-efficient attention)
  sdpa-flash-equal  SDPA's flash backend, no mask, on B rows of one equal length L̄ with
                    B·L̄² = Σ L_i²: the same useful work with no length variation, the best case
                    for a fixed-length kernel; the fair baseline for varlen

Figures, per pass (fwd under no_grad; bwd = autograd.grad of q, k, v with a saved graph; fwd+bwd):
  FLOPs (useful)  forward 4·Σ_i L_i²·H·D (QKᵀ and PV over real tokens only, 2 FLOPs per MAC);
                  backward 2.5× forward (dV, dP, dQ, dK, plus the recomputed QKᵀ); padding is not
                  counted for anyone, so a kernel that computes on padding pays for it in time
  TFLOP/s         useful FLOPs / median time;  frac_of_ceiling: over the bf16 matmul ceiling
                  measured in this run (benchmarks.harness.matmul_ceiling_tflops)
  vs_sdpa_mask    sdpa-mask's time / ours (goal ≥ 1.5 for fastbert-padded and -varlen)
  vs_flash        sdpa-flash-equal's time / ours (goal ≥ 1.0 for fastbert-varlen)
  host_ms         host time to enqueue one call (20 calls, no sync): close to median_ms means the
                  pass is launch/Python-bound (short sequences), not kernel-bound
  graph_ms        the call's device time alone, replayed from a CUDA graph (harness.measure_graphed,
                  every competitor alike): what the pass costs inside the CUDA-graphed training step;
                  graph_vs_sdpa_mask / graph_vs_flash compare those (no L2 flush between calls)

Dropout rows (p 0.1, full rows: BERT pretraining) time the in-kernel Philox mask; --quick keeps the
seq-128 one, the BERT-base pretraining shape. SDPA draws its own mask (not the same bits).

Run: python -m benchmarks.bench_attention [--quick]   (--quick: < 60 s on an H100)
     python -m benchmarks.bench_attention --sweep [--dropout 0.1]  (block-size sweep of the Triton
     kernels, ~2 min: fastbert-varlen, full rows, seq 128 and 512; prints the fastest configuration of
     each kernel; with --dropout, of the kernels with dropout on)
     python -m benchmarks.bench_attention --host-cpu  (no GPU: host microseconds of the eager fwd+bwd
     with the kernel launches stubbed, i.e. the Python that precedes Triton's launcher)
"""
from __future__ import annotations

import argparse
import math
import time
import traceback

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM, TOKENS = 12, 64, 32768
DTYPE = torch.bfloat16


def _lengths(batch, seq, fill, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo = max(1, round((2 * fill - 1) * seq))
    return torch.randint(lo, seq + 1, (batch,), generator=g).tolist() if lo < seq else [seq] * batch


def _fwd_flops(lengths, heads=HEADS, dim=HEAD_DIM):
    return 4.0 * sum(n * n for n in lengths) * heads * dim


def _sdpa_mask_backend():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel, SDPBackend
    except ImportError:  # older torch
        return None, None


class Case:
    """Tensors of one (seq, fill) case, shared by every competitor."""

    def __init__(self, seq, fill, dropout_p=0.0, tokens=TOKENS, dev="cuda"):
        self.seq, self.fill, self.dropout_p = seq, fill, dropout_p
        self.batch = max(1, tokens // seq)
        self.lengths = _lengths(self.batch, seq, fill)
        self.total = sum(self.lengths)
        self.mask = torch.arange(seq, device=dev)[None, :] < torch.tensor(self.lengths, device=dev)[:, None]
        shape = (self.batch, HEADS, seq, HEAD_DIM)
        self.q, self.k, self.v = (torch.randn(shape, device=dev, dtype=DTYPE, requires_grad=True) for _ in range(3))
        self.cu = torch.tensor([0] + torch.tensor(self.lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        self.qkv = torch.randn(self.total, 3, HEADS, HEAD_DIM, device=dev, dtype=DTYPE, requires_grad=True)
        # equal-length rows with the same Σ L²: the flash baseline
        self.eq_len = max(1, round(math.sqrt(sum(n * n for n in self.lengths) / self.batch)))
        eq_shape = (self.batch, HEADS, self.eq_len, HEAD_DIM)
        self.eq = [torch.randn(eq_shape, device=dev, dtype=DTYPE, requires_grad=True) for _ in range(3)]

    # each returns (output, inputs to differentiate)
    def fastbert_padded(self):
        import fastbert.kernels as K
        return K.attention(self.q, self.k, self.v, self.mask, dropout_p=self.dropout_p), (self.q, self.k, self.v)

    def fastbert_varlen(self):
        import fastbert.kernels as K
        q, k, v = self.qkv[:, 0], self.qkv[:, 1], self.qkv[:, 2]
        return K.varlen_attention(q, k, v, self.cu, self.seq, dropout_p=self.dropout_p,
                                  validate=False), (q, k, v)

    def sdpa_mask(self):
        out = F.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=self.mask[:, None, None, :],
                                             dropout_p=self.dropout_p)
        return out, (self.q, self.k, self.v)

    def sdpa_flash_equal(self):
        sdpa_kernel, backend = _sdpa_mask_backend()
        q, k, v = self.eq
        if sdpa_kernel is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p), (q, k, v)
        with sdpa_kernel(backend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p), (q, k, v)


IMPLS = {  # baselines first: the fastbert rows carry ratios to them
    "sdpa-mask": Case.sdpa_mask,
    "sdpa-flash-equal": Case.sdpa_flash_equal,
    "fastbert-padded": Case.fastbert_padded,
    "fastbert-varlen": Case.fastbert_varlen,
    "fastbert-varlen-split": Case.fastbert_varlen,  # run under SPLIT_BACKWARD's config override
}
SPLIT_BACKWARD = {"fastbert-varlen-split": {"fused": []}}


def _timers(case, impl):
    """fwd, bwd and fwd+bwd callables for one competitor."""
    run = IMPLS[impl]

    def fwd():
        with torch.no_grad():
            run(case)

    out, inputs = run(case)
    grad = torch.randn_like(out)

    def bwd():
        torch.autograd.grad(out, inputs, grad, retain_graph=True)

    def fwd_bwd():
        o, ins = run(case)
        torch.autograd.grad(o, ins, grad)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def _host_ms(fn, device, n=20):
    """Host time to enqueue one call (no sync inside the loop): when it reaches median_ms the pass is
    bound by Python/launch overhead, not by the kernels, and do_bench's figure is the host's."""
    if device != "cuda":
        return None
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return host


def _sanity(case):
    """Guard against timing a broken kernel: our outputs on real tokens against SDPA with the mask."""
    with torch.no_grad():
        ref, _ = case.sdpa_mask()
        padded, _ = case.fastbert_padded()
        packed, _ = case.fastbert_varlen()
        err_padded = (padded - ref)[case.mask[:, None, :, None].expand_as(ref)].abs().max().item()
        q, k, v = case.qkv[:, 0], case.qkv[:, 1], case.qkv[:, 2]
        ref_packed = torch.cat([
            F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                           v[a:b].transpose(0, 1)[None])[0].transpose(0, 1)
            for a, b in zip(case.cu[:-1].tolist()[:8], case.cu[1:].tolist()[:8])])
        err_packed = (packed[:ref_packed.shape[0]] - ref_packed).abs().max().item()
    return err_padded, err_packed


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates; the shipped defaults come first.
SWEEP = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3),
            (128, 64, 4, 2), (128, 128, 4, 2)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 4, 2), (32, 128, 8, 2),
             (16, 128, 4, 4), (64, 128, 8, 2)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 2), (128, 64, 4, 2),
           (64, 128, 8, 2), (128, 64, 4, 3)],
    # the one-launch backward: only sequences within its BLOCK_N (the seq-128 rows)
    "fused": [(32, 128, 8, 3), (32, 128, 4, 3), (64, 128, 8, 3), (16, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 4),
              (64, 128, 8, 2), (16, 128, 4, 4)],
}


def sweep(measure, recorder, seqs, warmup, rep, tokens=TOKENS, device="cuda", dropout_p=0.0):
    """Time each candidate of one kernel with the others at their defaults (flash_attention.set_config_override);
    the dQ and dK/dV candidates with the fused backward off, so their first (default) rows at seq 128 are
    the split backward the fused candidates replace."""
    from fastbert.kernels import flash_attention as fa
    for seq in seqs:
        case = Case(seq, 1.0, dropout_p, tokens=tokens, dev=device)
        for kind, candidates in SWEEP.items():
            best = None
            for cand in candidates:
                if kind == "fused" and seq > cand[1]:
                    continue  # longer sequences take the split path whatever this candidate is
                # dQ and dK/dV candidates on the split path: at seq 128 the default would be the fused kernel
                fa.set_config_override({kind: list(cand)} if kind in ("fwd", "fused") else {kind: list(cand), "fused": []})
                try:
                    timers = _timers(case, "fastbert-varlen")
                    t = measure(timers["fwd" if kind == "fwd" else "bwd"], warmup=warmup, rep=rep, device=device)
                except Exception as exc:  # e.g. out of shared memory
                    print(f"sweep {kind} {cand}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                finally:
                    fa.set_config_override(None)
                recorder.add(op="attention-sweep", kernel=kind, seq=seq, dropout=dropout_p, config=str(cand), **t)
                if best is None or t["median_ms"] < best[1]:
                    best = (cand, t["median_ms"])
            print(f"sweep seq {seq} {kind}: best {best}")
        del case


def host_cpu(bursts=30, calls=100):
    """Host time of one eager fwd+bwd on this CPU (no GPU needed) with the three kernel launches
    stubbed: fastbert.kernels' checks, the launchers (allocation, plan lookup, strides) and the
    autograd.Function, without Triton's launch path or the kernels. BERT-base heads, 8 x 128 tokens,
    bf16, GPU launch configurations. CPU thread time (a shared machine's wall time is noise), the
    minimum over bursts; 'floor' is a no-op autograd.Function under the same autograd.grad."""
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets CPU tensors through to the Triton launchers
    os.environ["FASTBERT_KERNELS"] = "triton"
    import fastbert.kernels as K
    from fastbert.kernels import flash_attention as fa

    class _Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    for name in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv", "_attn_bwd_fused"):
        setattr(fa, name, _Stub())
    fa._interpreting = lambda: False  # the GPU configurations (and so the fused backward at seq 128)
    K._check_interpreted_dtype = lambda q: None  # bf16 is refused only because the interpreter would compute it
    fa._require_interpreter = lambda: None
    batch, seq = 8, 128
    qkv = torch.randn(batch * seq, 3, HEADS, HEAD_DIM, dtype=DTYPE, requires_grad=True)
    cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32)
    q4, k4, v4 = (torch.randn(batch, HEADS, seq, HEAD_DIM, dtype=DTYPE, requires_grad=True) for _ in range(3))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    g3, g4 = torch.randn(batch * seq, HEADS, HEAD_DIM, dtype=DTYPE), torch.randn_like(q4)

    class _Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            return torch.empty(q.shape, dtype=q.dtype)

        @staticmethod
        def backward(ctx, g):
            return tuple(torch.empty(g.shape, dtype=g.dtype) for _ in range(3))

    def varlen(p):
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        torch.autograd.grad(K.varlen_attention(q, k, v, cu, seq, dropout_p=p, validate=False), (q, k, v), g3)

    def padded(p):
        torch.autograd.grad(K.attention(q4, k4, v4, mask, dropout_p=p), (q4, k4, v4), g4)

    def floor(p):
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        torch.autograd.grad(_Noop.apply(q, k, v), (q, k, v), g3)

    print("| case | host us per fwd+bwd (CPU thread time, min over bursts) |\n|---|---|")
    for fn, p in ((varlen, 0.0), (varlen, 0.1), (padded, 0.0), (padded, 0.1), (floor, 0.0)):
        for _ in range(calls):
            fn(p)
        best = float("inf")
        for _ in range(bursts):
            t0 = time.thread_time()
            for _ in range(calls):
                fn(p)
            best = min(best, (time.thread_time() - t0) / calls * 1e6)
        print(f"| {fn.__name__} p={p} | {best:.1f} |")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, one dropout row (< 60 s)")
    parser.add_argument("--dropout", type=float, default=0.0, help="--sweep only: attention dropout (0)")
    parser.add_argument("--sweep", action="store_true", help="block-size sweep of the Triton kernels only")
    parser.add_argument("--host-cpu", action="store_true",
                        help="host time of the eager fwd+bwd on the CPU, kernel launches stubbed (no GPU)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help=argparse.SUPPRESS)  # CPU smoke runs
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512], help="sequence lengths (128 512)")
    args = parser.parse_args(argv)
    if args.host_cpu:
        return host_cpu()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU; nothing to do")
        return 0
    from benchmarks.harness import Recorder, bench_stream, matmul_ceiling_tflops, measure, measure_graphed
    from fastbert.kernels import flash_attention as fa

    if args.device == "cuda":
        # Every pass on measure_graphed's capture stream: the bwd pass replays a backward whose forward
        # ran outside the capture, and autograd runs each node's backward on its forward's stream (a
        # node of the legacy default stream fails the capture; see harness.bench_stream).
        torch.cuda.set_stream(bench_stream())

    warmup, rep = (5, 20) if args.quick else (25, 100)
    if args.device != "cuda":  # a smoke run of the script itself (interpreter), not a measurement
        warmup, rep = 1, 3
    if args.sweep:
        rec = Recorder("bench_attention_sweep")
        sweep(measure, rec, args.seqs, warmup, rep, args.tokens, args.device, args.dropout)
        print(rec.markdown())
        print(f"saved {rec.save()}")
        return 0
    ceiling = matmul_ceiling_tflops() if args.device == "cuda" else float("nan")
    rec = Recorder("bench_attention", ceiling_tflops=ceiling, heads=HEADS, head_dim=HEAD_DIM, tokens=TOKENS,
                   dtype=str(DTYPE), quick=args.quick)
    print(f"bf16 matmul ceiling: {ceiling:.1f} TFLOP/s")
    settings = [(seq, fill, 0.0) for seq in args.seqs for fill in (1.0, 0.75, 0.5)]
    # pretraining: attention dropout 0.1 (--quick: seq 128, BERT-base pretraining's shape)
    settings += [(seq, 1.0, 0.1) for seq in args.seqs if not args.quick or seq == min(args.seqs)]
    for seq, fill, p in settings:
        try:
            case = Case(seq, fill, p, tokens=args.tokens, dev=args.device)
            if p == 0.0:
                err_padded, err_packed = _sanity(case)
                print(f"seq {seq} fill {fill}: max |ours - sdpa| padded {err_padded:.3g}, packed {err_packed:.3g}")
        except Exception:  # one failing case must not lose the others
            traceback.print_exc()
            continue
        flops = _fwd_flops(case.lengths)
        eq_flops = _fwd_flops([case.eq_len] * case.batch)
        times, graph_times = {}, {}
        for impl in IMPLS:
            if p > 0.0 and impl == "sdpa-flash-equal":
                continue
            if impl in SPLIT_BACKWARD and seq > (fa.bwd_config(HEAD_DIM, DTYPE)["fused"] or (0, 0))[1]:
                continue  # the split path is the default there: fastbert-varlen already times it
            fa.set_config_override(SPLIT_BACKWARD.get(impl))
            try:
                timers = _timers(case, impl)
            except Exception:
                traceback.print_exc()
                fa.set_config_override(None)
                continue
            for pass_name, fn in timers.items():
                try:
                    t = measure(fn, warmup=warmup, rep=rep, device=args.device)
                    t["host_ms"] = _host_ms(fn, args.device)
                    t.update(measure_graphed(fn, device=args.device) or {})
                except Exception:
                    traceback.print_exc()
                    continue
                times[(impl, pass_name)] = t["median_ms"]
                graph_times[(impl, pass_name)] = t.get("graph_ms")
                useful = (eq_flops if impl == "sdpa-flash-equal" else flops) * {"fwd": 1.0, "bwd": 2.5,
                                                                                  "fwd+bwd": 3.5}[pass_name]
                tflops = useful / (t["median_ms"] * 1e-3) / 1e12
                row = dict(op="attention", impl=impl, shape=f"{case.batch}x{seq}", seq=seq,
                           case=f"S{seq} fill{fill:g} p{p:g} {pass_name}",
                           fill=round(case.total / (case.batch * seq), 3), dropout=p, dtype="bf16",
                           **{"pass": pass_name}, **t, tflops=tflops, frac_of_ceiling=tflops / ceiling)
                if impl.startswith("fastbert"):
                    base = times.get(("sdpa-mask", pass_name))
                    flash = times.get(("sdpa-flash-equal", pass_name))
                    row["vs_sdpa_mask"] = base / t["median_ms"] if base else None
                    # flash's time scaled to the same useful FLOPs (its rows are rounded to one length)
                    row["vs_flash"] = (flash * flops / eq_flops) / t["median_ms"] if flash else None
                    ours_g = t.get("graph_ms")
                    base_g = graph_times.get(("sdpa-mask", pass_name))
                    flash_g = graph_times.get(("sdpa-flash-equal", pass_name))
                    if ours_g:
                        row["graph_vs_sdpa_mask"] = base_g / ours_g if base_g else None
                        row["graph_vs_flash"] = (flash_g * flops / eq_flops) / ours_g if flash_g else None
                rec.add(**row)
            del timers
            fa.set_config_override(None)
        del case
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.device == "cuda":
        torch.cuda.set_stream(torch.cuda.default_stream())
    rec.finish(plot=dict(x="case", y="tflops", group="impl", ylabel="TFLOP/s (real tokens)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
