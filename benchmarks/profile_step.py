"""Where one training step's time goes: torch.profiler over a fastbert BERT pretraining step.

Prints (and saves as profile_step.md) the kernels ranked by total GPU time, grouped by family
(GEMM, attention, LayerNorm family, embedding, MLM loss, optimizer, other), plus the step's wall
time beside the sum of kernel time, which shows how much of the step is host-side launch overhead.

    python -m benchmarks.profile_step [--size base] [--batch 256] [--seq 128]
"""
from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import output_dir
from fastbert import bench

FAMILIES = [("attention", ("attn", "attention")), ("mlm_loss", ("ce_rows", "mlm")),
            ("layer_norm", ("_ln_", "layer_norm", "add_ln", "gelu_ln")), ("embedding", ("embed", "segment")),
            ("gelu", ("gelu",)), ("gemm", ("gemm", "sm90_xmma", "cutlass", "cublas", "nvjet", "matmul")),
            ("optimizer", ("adam", "multi_tensor")), ("copy/cast", ("copy", "cast", "elementwise"))]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def train_step(model, opt, kw) -> None:
    """One bf16-autocast training step: forward, backward, AdamW, gradients dropped."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**kw).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def is_kernel(evt) -> bool:
    return kernel_ms(evt) > 0 and evt.device_type == torch.autograd.DeviceType.CUDA


def kernel_ms(evt) -> float:
    return getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0)) / 1e3


def profile_once(step):
    """torch.profiler over one call of step(): (wall ms between CUDA events, GPU ms per kernel name,
    calls per kernel name, the profiler for anything else)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
    kernels, counts = collections.Counter(), collections.Counter()
    for evt in prof.key_averages():
        if is_kernel(evt):
            kernels[evt.key] += kernel_ms(evt)
            counts[evt.key] += evt.count
    return start.elapsed_time(end), kernels, counts, prof


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="base")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args(argv)
    models, _ = bench.build_models("pretrain", args.size, 30522, args.seq, "cuda", ["fastbert"])
    model, _ = models["fastbert"]
    kw = bench.make_batches("pretrain", 1, args.batch, args.seq, 30522, 0, "cuda")[0][0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    for _ in range(3):
        train_step(model, opt, kw)
    wall_ms, kernels, counts, _ = profile_once(lambda: train_step(model, opt, kw))
    total = sum(kernels.values())
    fams = collections.Counter()
    for k, t in kernels.items():
        fams[family(k)] += t
    lines = [f"# profile_step ({args.size}, batch {args.batch} x {args.seq}, bf16 autocast, {torch.cuda.get_device_name()})",
             "", f"step wall {wall_ms:.2f} ms; kernel time {total:.2f} ms "
             f"({100 * total / wall_ms:.0f}% of the step; the rest is GPU idle, i.e. host-bound gaps)", "",
             "| family | ms | share |", "|---|---|---|"]
    lines += [f"| {f} | {t:.2f} | {100 * t / total:.1f}% |" for f, t in fams.most_common()]
    lines += ["", "| kernel | calls | ms |", "|---|---|---|"]
    lines += [f"| {k[:90]} | {counts[k]} | {t:.3f} |" for k, t in kernels.most_common(30)]
    text = "\n".join(lines) + "\n"
    print(text)
    (output_dir() / "profile_step.md").write_text(text)


if __name__ == "__main__":
    main()
