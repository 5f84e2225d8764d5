"""The benchmark harness every kernel and end-to-end benchmark plugs into.

- ``measure(fn)``: median / p20 / p80 milliseconds. On CUDA, triton.testing.do_bench (L2 flushed
  between runs, CUDA-event timing); on the CPU, a wall-clock loop after warm-up.
- ``measure_graphed(fn)``: fn's device time alone — many calls captured in one CUDA graph and replayed
  (triton.testing.do_bench_cudagraph's method, on one bench stream), so no host launch cost is in it. An op called alone from Python
  on a slow host measures the host (its median ≈ its enqueue time); inside a CUDA-graphed training
  step only this time remains. Benchmarks report it beside the median for every competitor alike.
- ``matmul_ceiling_tflops()`` and ``copy_bandwidth_gbps()``: the ceilings measured in the same run,
  so every figure can be stated as a fraction of what this card actually does.
- ``Recorder``: rows of results, saved as JSON (machine, versions, git SHA, date on every file), a
  markdown table and, when asked, a PNG bar chart, under $OUT (the GPU machine's output folder) or
  benchmarks/results/.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
import traceback
from pathlib import Path

import torch

from fastbert.runtime import cpu_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, *, warmup: int = 10, rep: int = 50, device=None) -> dict:
    """Median, p20 and p80 of fn()'s time in milliseconds. `warmup`/`rep` are ms on CUDA, counts on CPU."""
    cuda = (device is None and torch.cuda.is_available()) or (device is not None and torch.device(device).type == "cuda")
    if cuda:
        import triton.testing
        p20, median, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    for _ in range(max(1, warmup if warmup < 10 else 2)):
        fn()
    times = []
    for _ in range(max(3, rep if rep < 50 else 5)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else times * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


_BENCH_STREAM = None


def bench_stream():
    """The one non-default stream the CUDA-graph timings capture on; benchmarks that time a backward
    run their whole loop on it (torch.cuda.set_stream). Autograd records each node's stream when the
    forward builds it and runs that node's backward there; a node from the legacy default stream (a
    saved forward, a live graph's AccumulateGrad of the inputs) cannot join a capture on another
    stream (cudaErrorStreamCaptureImplicit, or autograd's stale-stream RuntimeError)."""
    global _BENCH_STREAM
    if _BENCH_STREAM is None:
        _BENCH_STREAM = torch.cuda.Stream()
    return _BENCH_STREAM


def _release_failed_capture(device: int, pool) -> None:
    """A capture whose end failed (cudaStreamEndCapture errors once anything invalidated it) never
    tells the caching allocator it is over: CUDAGraph.capture_end raises before endAllocateToPool, so
    the allocator would go on as if a capture were underway (deferring event-synchronised frees for
    the rest of the run) and never free the pool. End it and drop our reference here."""
    end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
        torch._C, "_cuda_endAllocateCurrentStreamToPool", None)
    try:
        end(device, pool)
    except Exception:  # capture_end got that far: the graph owns the pool and releases it
        return
    try:
        torch._C._cuda_releasePool(device, pool)
    except Exception:
        pass


def measure_graphed(fn, *, rep: int = 20, device=None) -> dict | None:
    """Median / p20 / p80 ms of one fn() call as replayed from a CUDA graph of many calls (no host
    time; unlike measure, L2 is not flushed between calls). None on the CPU, or when fn cannot be
    captured (why is printed): the caller keeps its other figures. triton.testing.do_bench_cudagraph's
    method, on bench_stream() and with a pool of its own, so that a failed capture is cleaned up."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if not cuda:
        return None
    stream, caller = bench_stream(), torch.cuda.current_stream()
    if stream != caller:
        stream.wait_stream(caller)
    dev, pool = torch.cuda.current_device(), torch.cuda.graph_pool_handle()
    graph, captured = torch.cuda.CUDAGraph(), False
    try:
        with torch.cuda.stream(stream):
            fn()  # compiles / autotunes outside the capture
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
            torch.cuda.synchronize()
            estimate = start.elapsed_time(end) / 5
            n = max(1, int(rep / estimate)) if estimate > 0 else 1000
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                for _ in range(n):
                    fn()
            captured = True
            torch.cuda.synchronize()
            times = []
            for _ in range(10):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / n)
    except Exception as exc:  # e.g. a host sync inside fn: capture refuses it
        cause = exc.__context__  # capture_end's "invalidated" error hides what invalidated the capture
        why = f"{type(exc).__name__}: {str(exc)[:200]}"
        if cause is not None:
            why += f"; raised first: {type(cause).__name__}: {str(cause)[:200]}"
        print(f"measure_graphed: not capturable ({why})", flush=True)
        del exc, cause
        if not captured:
            _release_failed_capture(dev, pool)
        torch.cuda.synchronize()
        return None
    finally:
        del graph  # its pool goes back before the caller's next figure
    caller.wait_stream(stream)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return {"graph_ms": statistics.median(times), "graph_p20_ms": q[1], "graph_p80_ms": q[7]}


def matmul_ceiling_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """bf16 dense matmul rate on this GPU: 2·n³ FLOPs per n×n×n product."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = measure(lambda: a @ b, warmup=25, rep=100)["median_ms"]
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (2 · nbytes per copy)."""
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), warmup=25, rep=100)["median_ms"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def git_sha() -> str:
    """The checkout's short SHA; FASTBERT_GIT_SHA where there is no .git (the GPU machine gets none)."""
    if os.environ.get("FASTBERT_GIT_SHA"):
        return os.environ["FASTBERT_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def output_dir() -> Path:
    out = os.environ.get("OUT") or os.environ.get("FASTBERT_BENCH_OUT")
    path = Path(out) if out else RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is missing (plots are extras)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path, dpi: int = 110) -> Path:
    """Lay out, write and close a figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


class Recorder:
    """Collects result rows and writes <name>.json, <name>.md (and <name>.png with plot())."""

    def __init__(self, name: str, **context):
        self.name = name
        self.context = context
        self.rows: list[dict] = []

    def add(self, **row) -> dict:
        self.rows.append(row)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}
        print(f"[{self.name}] " + "  ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        return row

    def markdown(self) -> str:
        if not self.rows:
            return f"# {self.name}\n\n(no rows)\n"
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
        lines = [f"# {self.name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in self.rows]
        meta = machine()
        lines += ["", f"Machine: {meta.get('gpu', meta['cpu'])}; torch {meta['torch']}, triton {meta.get('triton')}, "
                      f"git {meta['git_sha']}, {meta['date']}"]
        return "\n".join(lines) + "\n"

    def save(self, directory=None) -> Path:
        directory = Path(directory) if directory else output_dir()
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"name": self.name, "machine": machine(), "context": self.context, "rows": self.rows}
        path = directory / f"{self.name}.json"
        path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        (directory / f"{self.name}.md").write_text(self.markdown())
        return path

    def finish(self, directory=None, plot=None) -> Path:
        """The end of a benchmark script: save the rows, draw plot (plot()'s keyword arguments, or None;
        a failing plot is reported, never fatal), print the table and where it went."""
        path = self.save(directory)
        if plot:
            try:
                self.plot(directory=directory, **plot)
            except Exception:
                traceback.print_exc()
        print()
        print(self.markdown())
        print(f"saved {path}")
        return path

    def plot(self, x: str, y: str, group: str, directory=None, title=None, ylabel=None) -> Path | None:
        """Grouped bar chart of `y` per `x`, one bar per `group` value."""
        plt = pyplot()
        if plt is None:
            return None
        rows = [r for r in self.rows if r.get(y) is not None]
        if not rows:
            return None
        xs = list(dict.fromkeys(str(r[x]) for r in rows))
        groups = list(dict.fromkeys(str(r[group]) for r in rows))
        width = 0.8 / len(groups)
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(xs) * max(1, len(groups)) / 2), 4))
        for i, g in enumerate(groups):
            vals = {str(r[x]): r[y] for r in rows if str(r[group]) == g}
            ax.bar([j + i * width for j in range(len(xs))], [vals.get(v, 0) for v in xs], width, label=g)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))], xs, rotation=20, ha="right")
        ax.set_ylabel(ylabel or y)
        ax.set_title(title or self.name)
        ax.legend(fontsize=8)
        directory = Path(directory) if directory else output_dir()
        return save_figure(fig, directory / f"{self.name}.png")
