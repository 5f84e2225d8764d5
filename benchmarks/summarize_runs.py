"""Many runs of the model-step benchmark, one table and one plot: per-run step times, each run's
speed-up of fastbert over transformers SDPA, and the median speed-up per series.

    python -m benchmarks.summarize_runs benchmarks/results/cpu-2026-11-26-s8 [--out DIR]

Reads every ``model_step_*.json`` below the folder (benchmarks/bench_model.py's Recorder files, one
per run). A series is everything that changes what is measured: case, model size, batch, sequence
length, device, precision and malloc. Within a run every competitor ran in the same process, round
robin, so the ratio of one run is the only ratio that compares like with like — the medians here are
medians of those per-run ratios, never a ratio of medians from different runs. A run without both
fastbert and transformers SDPA timed is listed but has no ratio. Writes ``summary.md`` and
``summary.png`` into --out (default: the folder read).
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.compare import FIELD_DEFAULTS
from benchmarks.harness import pyplot, save_figure

BASE = "transformers-sdpa"
FLOOR = f"{BASE}-masked-head"  # transformers with its MLM head on the masked rows only (the floor)
SERIES = ("case", "size", "batch", "seq", "device", "precision", "malloc")


def load_runs(folder: Path) -> list[dict]:
    """One dict per (run file, series): {"file", "date", "git", "series", "ms": {impl: median_ms}}, by date."""
    runs = []
    for path in sorted(folder.rglob("model_step_*.json")):
        payload = json.loads(path.read_text())
        by_series = defaultdict(dict)
        for row in payload.get("rows", []):
            if "median_ms" in row:
                key = tuple(str(row.get(k, FIELD_DEFAULTS.get(k, "?"))) for k in SERIES)
                by_series[key][row["impl"]] = row["median_ms"]
        for key, ms in by_series.items():
            runs.append({"file": str(path.relative_to(folder)), "date": payload["machine"].get("date", ""),
                         "git": payload["machine"].get("git_sha", ""), "series": key, "ms": ms})
    return sorted(runs, key=lambda r: r["date"])


def speedup(run: dict, impl: str = "fastbert") -> float | None:
    """transformers SDPA's step time over `impl`'s, both from this run; None unless both were timed."""
    ms = run["ms"]
    return ms[BASE] / ms[impl] if BASE in ms and impl in ms else None


def markdown(runs: list[dict]) -> str:
    impls = list(dict.fromkeys(i for r in runs for i in r["ms"]))
    lines = ["| " + " | ".join(SERIES) + " | run (date, git) | " + " | ".join(f"{i} ms" for i in impls)
             + f" | speed-up: {BASE} ms / fastbert ms |", "|" + "---|" * (len(SERIES) + len(impls) + 2)]
    ratios = defaultdict(list)
    for r in runs:
        ratio = speedup(r)
        if ratio is not None:
            ratios[r["series"]].append(ratio)
        cells = [f"{r['ms'][i]:.0f}" if i in r["ms"] else "" for i in impls]
        lines.append(f"| {' | '.join(r['series'])} | {r['date'][11:16]} {r['git']} | " + " | ".join(cells)
                     + (f" | {ratio:.2f}× |" if ratio is not None else " | — |"))
    lines += ["", "| " + " | ".join(SERIES) + " | runs with both | median speed-up | range |",
              "|" + "---|" * (len(SERIES) + 3)]
    for series, rs in ratios.items():
        lines.append(f"| {' | '.join(series)} | {len(rs)} | **{statistics.median(rs):.2f}×** | "
                     f"{min(rs):.2f}–{max(rs):.2f}× |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    series = list(dict.fromkeys(r["series"] for r in runs if speedup(r) is not None))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(series)), 4.5))
    for i, s in enumerate(series):
        rs = [r for r in runs if r["series"] == s and speedup(r) is not None]
        xs = [i + (j - (len(rs) - 1) / 2) * 0.08 for j in range(len(rs))]
        ax.scatter(xs, [speedup(r) for r in rs], color="C0", zorder=3)
        floor = [(x, speedup(r, FLOOR)) for x, r in zip(xs, rs) if speedup(r, FLOOR) is not None]
        if floor:
            ax.scatter(*zip(*floor), color="C1", marker="x", zorder=3)
    ax.scatter([], [], color="C0", label="fastbert")
    ax.scatter([], [], color="C1", marker="x", label="transformers, MLM head on masked rows only")
    # (case, size, batch, seq, device, precision, malloc) on three lines
    ax.set_xticks(range(len(series)), [f"{c} {sz}\n{b} × {q} {d}\n{p} {m}" for c, sz, b, q, d, p, m in series],
                  fontsize=8)
    ax.set_ylabel(f"{BASE} ms / competitor ms (same run)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    runs = load_runs(args.folder)
    if not runs:
        print(f"no model_step_*.json with timed rows under {args.folder}")
        return 2
    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(runs)
    (out / "summary.md").write_text(text)
    plot(runs, out / "summary.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
