"""Launch census: how many device launches one eager training step issues, per op, without a GPU.

An eager step whose kernels are short is bound by the host: every launch costs the launching thread
a few µs in PyTorch's dispatcher, a Triton launch more (argument binding and specialisation in
Python). On an H200 the eager fine-tuning step (BERT-base, batch 32, real sentence lengths) and
`fastbert encode` at batch 128 were host-bound (benchmarks/results/gpu-h200-2026-11-27-run1/RUN.md),
and every launch is also a few µs of GPU time when kernels are tiny, so the count matters there.

The step runs on the CPU with FASTBERT_KERNELS=triton under Triton's interpreter, its Triton launches
counted and stubbed out (not run: only host code executes, so a BERT-base-shaped step takes
seconds), under torch.profiler. A launch is each ATen op called from outside any other ATen op
(from Python, an autograd node, a custom op's body) that computes something (views, allocations and
metadata excluded), plus each dtype cast that autocast makes inside a matmul op. That is what such
an op costs on CUDA in most cases; the exceptions undercount a little, both competitors alike: fused
AdamW launches once per chunk of tensors there, cross_entropy twice (log-softmax, NLL), an
index_select backward twice (zeros, index_add), and autocast's fp32 upcasts inside non-matmul ops
(transformers' LayerNorm and softmax under autocast) are not counted. The model's CUDA-only choices are made as on CUDA (`cuda_paths`). Host syncs:
nonzero (a data-dependent shape) and tolist / item / bool() reads.

Counts do not depend on widths (only on layers and the step's structure), except the MLM loss's
chunk count (rows x vocab): fastbert runs the real vocabulary 30522 and 32k tokens; transformers'
full-vocabulary logits would take minutes on a CPU and change no count, so it runs vocab 1031.
Autocast is fp16 here (the GPU benchmarks use bf16: the same casts; the interpreter rejects bf16
matmuls); AdamW(fused), dropout on. An A/B across versions: run this file in a checkout of each (it
skips the stand-ins a tree does not have).

    python -m benchmarks.launch_census [--case pretrain|finetune|encode] [--layers 12] [--detail]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

if __name__ == "__main__":  # before triton is imported: its interpreter lets CPU tensors into the launchers
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

# Ops that launch nothing on CUDA: views, allocations, metadata, and composite wrappers that only
# launch through their children (aten::to without a dtype change is free; with one, its copy_ counts).
NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "as_strided", "slice", "select",
    "unsqueeze", "squeeze", "detach", "alias", "empty", "empty_strided", "new_empty", "new_empty_strided",
    "empty_like", "unbind", "split", "split_with_sizes", "chunk", "narrow", "_reshape_alias", "lift_fresh",
    "unflatten", "flatten", "view_as", "diagonal", "is_same_size", "set_", "resize_", "movedim", "to",
    "contiguous", "type_as", "expand_as", "resolve_conj", "resolve_neg", "result_type", "promote_types",
    "_record_function_enter_new", "_record_function_exit", "is_nonzero", "numpy_T", "_nested_tensor_from_mask",
    "dim", "size", "stride", "item", "_local_scalar_dense", "lift_fresh_copy", "_unsafe_index",
}
# Autocast casts these ops' fp32 arguments (each cast a launch of its own on CUDA); the CPU kernels of
# other ops may cast internally (sum with a dtype, mixed-dtype add) where CUDA's do not.
AUTOCAST_MATMULS = {"linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "addbmm", "einsum"}

# record_function ranges named ONE_LAUNCH + op: what CUDA runs as one kernel and the CPU emulates in
# several ops (the fp32-output GEMM of fastbert.autocast_linear, which the CPU computes by upcasting).
ONE_LAUNCH = "census:one_launch:"


def _short(name: str) -> str:
    return name.split("::", 1)[1] if "::" in name else name


def count_launches(events):
    """(launches by op, syncs by op) from a CPU profile: each ATen op called from outside any other
    ATen op (from Python, an autograd node or a custom op's body) that computes something, itself
    or through a child, is one launch -- what one such op costs on CUDA in almost every case -- plus
    one for each dtype cast inside it (autocast's). An aten::to at the top counts once, as a copy."""
    launches, syncs = collections.Counter(), collections.Counter()

    def computes(e):
        return _short(e.name) not in NO_LAUNCH or any(computes(c) for c in e.cpu_children)

    def has_nonzero(e):
        return _short(e.name) == "nonzero" or any(has_nonzero(c) for c in e.cpu_children)

    for e in events:
        if e.name.startswith(ONE_LAUNCH):  # a CPU stand-in for what CUDA does in one kernel
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith(ONE_LAUNCH):
                parent = parent.cpu_parent
            if parent is None:  # (a stand-in inside another is part of it)
                launches[e.name[len(ONE_LAUNCH):]] += 1
            continue
        if not e.name.startswith("aten::"):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(("aten::", ONE_LAUNCH)):
            parent = parent.cpu_parent
        if parent is not None:
            continue  # inside another ATen op (or a stand-in): part of that launch
        if has_nonzero(e):  # a data-dependent shape: the host waits for the count
            syncs[_short(e.name)] += 1
        if computes(e):
            launches[_short(e.name)] += 1
        # autocast's casts inside a matmul (aten::linear casts its weight, bias and input): a copy each
        if _short(e.name) in AUTOCAST_MATMULS:
            for d in _descendants(e):
                if _short(d.name) == "_to_copy" and computes(d):
                    launches[f"_to_copy (in {_short(e.name)})"] += 1
    return launches, syncs


def _descendants(e):
    for c in e.cpu_children:
        yield c
        yield from _descendants(c)


@contextlib.contextmanager
def triton_backend():
    """FASTBERT_KERNELS=triton for the census, the caller's setting restored after."""
    before = os.environ.get("FASTBERT_KERNELS")
    os.environ["FASTBERT_KERNELS"] = "triton"
    try:
        yield
    finally:
        if before is None:
            del os.environ["FASTBERT_KERNELS"]
        else:
            os.environ["FASTBERT_KERNELS"] = before


@contextlib.contextmanager
def stubbed_triton(log: collections.Counter):
    """Triton launches counted by kernel name and not run (outputs stay uninitialised)."""
    from triton.runtime import interpreter

    original = interpreter.InterpretedFunction.__getitem__

    def launch(self, grid):
        name = getattr(self.fn, "__name__", repr(self.fn))

        def run(*args, **kwargs):
            log[name] += 1
        return run
    interpreter.InterpretedFunction.__getitem__ = launch
    try:
        yield
    finally:
        interpreter.InterpretedFunction.__getitem__ = original


@contextlib.contextmanager
def host_reads(log: collections.Counter):
    """Tensor.tolist / .item / bool() calls counted: on CUDA each reads the device (a sync); on the CPU
    they dispatch no copy, so the profile alone would not see them."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "__bool__")}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            log[name.strip("_")] += 1
            return fn(self, *args, **kwargs)
        return counted
    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@contextlib.contextmanager
def cuda_paths(dtype: torch.dtype):
    """The model's CUDA-only choices made on the CPU, each CPU stand-in counted as the one launch it is
    on CUDA: fastbert.autocast_linear's fp32-gradient linear under (CPU) autocast and its fp32-output
    GEMM; K.mlm_loss's fp32-output GEMMs (mm / addmm with out_dtype on CUDA, PyTorch >= 2.10; the CPU
    upcasts, or accumulates through a scratch)."""
    import importlib

    from fastbert.kernels import linear_cross_entropy as LCE

    def one_launch(name, fn):
        def counted(*args, **kwargs):
            with torch.profiler.record_function(ONE_LAUNCH + name):
                return fn(*args, **kwargs)
        return counted
    patches = [(LCE, "_mm_f32_into", one_launch("mm (fp32 out)", LCE._mm_f32_into)),
               (LCE, "_gemm_f32", one_launch("mm (fp32 out)", LCE._gemm_f32))]
    try:
        AL = importlib.import_module("fastbert.autocast_linear")
    except ImportError:  # a tree from before it (an A/B across versions)
        AL = None
    if AL is not None:
        patches += [(AL, "_path_dtype", lambda x, w: (dtype if torch.is_autocast_enabled("cpu")
                                                      and torch.is_grad_enabled() and w.dtype == torch.float32
                                                      else None)),
                    (AL, "_mm_fp32", one_launch("mm (fp32 out)", AL._mm_fp32))]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _step_fn(case, model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if case != "encode" else None

    def step():
        if case == "encode":
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
                model(**batch)
            return
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def census(case: str, competitor: str, layers: int, batch: int, seq: int, hidden: int = 64):
    """(triton launches, ATen launches, syncs) of the second of two identical steps."""
    from fastbert import bench
    from fastbert.kernels._dispatch import interpreting

    if not interpreting():
        raise RuntimeError("launch_census runs the Triton launchers on CPU tensors: set TRITON_INTERPRET=1 "
                           "before triton is imported")

    bench.SIZES["census"] = (hidden, layers, 2, 4 * hidden)
    model_case = "finetune" if case in ("finetune", "encode") else "pretrain"
    # the MLM loss's chunk count depends on rows x vocab: fastbert at the real vocabulary; transformers'
    # full-vocabulary logits would take minutes on a CPU and change no count
    vocab = 30522 if competitor.startswith("fastbert") else 1031
    models, _ = bench.build_models(model_case, "census", vocab, seq, "cpu", [competitor])
    model = models[competitor][1]
    kw, _, _ = bench.make_batches(model_case, 1, batch, seq, vocab, 0, "cpu")[0]
    if case == "encode":
        kw.pop("labels")
        model = model.bert if hasattr(model, "bert") else model
        model.eval()
    step = _step_fn(case, model, kw)
    triton_log, reads = collections.Counter(), collections.Counter()
    paths = cuda_paths(torch.float16) if competitor == "fastbert" else contextlib.nullcontext()
    with triton_backend(), stubbed_triton(triton_log), host_reads(reads), paths:
        step()  # first step: caches, optimizer state
        triton_log.clear()
        reads.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    launches, syncs = count_launches(prof.events())
    syncs.update(reads)
    return triton_log, launches, syncs


def _table(title, counter):
    lines = [f"| {title} | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counter.most_common()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=("pretrain", "finetune", "encode"), default="pretrain")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=None, help="rows (default: 256 pretrain, 32 otherwise)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--competitors", default="fastbert,transformers-sdpa")
    parser.add_argument("--detail", action="store_true", help="per-op tables")
    args = parser.parse_args(argv)
    batch = args.batch or (256 if args.case == "pretrain" else 32)
    print(f"# launch census: {args.case}, {args.layers} layers, batch {batch} x {args.seq}, fp16 autocast (bf16 on the GPU; the interpreter rejects bf16 matmuls), "
          f"torch {torch.__version__}\n")
    print("| competitor | Triton launches | ATen launches | total | host syncs |")
    print("|---|---|---|---|---|")
    details = []
    for comp in args.competitors.split(","):
        tri, aten, syncs = census(args.case, comp, args.layers, batch, args.seq)
        n_t, n_a = sum(tri.values()), sum(aten.values())
        print(f"| {comp} | {n_t} | {n_a} | {n_t + n_a} | {sum(syncs.values())} ({dict(syncs)}) |")
        details.append((comp, tri, aten))
    if args.detail:
        for comp, tri, aten in details:
            print(f"\n## {comp}\n")
            if tri:
                print(_table("Triton kernel", tri) + "\n")
            print(_table("ATen op", aten))
    return 0


if __name__ == "__main__":
    sys.exit(main())
