"""Many runs of the model-step benchmark, one table and one plot: per-run step times, the ratio to
transformers SDPA of each run, and the median ratio per series.

    python -m benchmarks.summarize_runs benchmarks/results/cpu-2026-11-26-s8 [--out DIR]

Reads every ``model_step_*.json`` below the folder (benchmarks/bench_model.py's Recorder files, one
per run). A series is (case, precision, malloc); within a run every competitor ran in the same
process, round robin, so the ratio of one run is the only ratio that compares like with like — the
medians here are medians of those per-run ratios, never a ratio of medians from different runs.
Writes ``summary.md`` and ``summary.png`` into --out (default: the folder read).
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

BASE = "transformers-sdpa"


def load_runs(folder: Path) -> list[dict]:
    """One dict per run file: {"file", "date", "series", "ms": {impl: median_ms}}, by date."""
    runs = []
    for path in sorted(folder.rglob("model_step_*.json")):
        payload = json.loads(path.read_text())
        by_case = defaultdict(dict)
        for row in payload.get("rows", []):
            if "median_ms" in row:
                key = (row["case"], row.get("precision", "?"), row.get("malloc", "glibc-default"))
                by_case[key][row["impl"]] = row["median_ms"]
        for key, ms in by_case.items():
            runs.append({"file": str(path.relative_to(folder)), "date": payload["machine"].get("date", ""),
                         "git": payload["machine"].get("git_sha", ""), "series": key, "ms": ms})
    return sorted(runs, key=lambda r: r["date"])


def markdown(runs: list[dict]) -> str:
    impls = list(dict.fromkeys(i for r in runs for i in r["ms"]))
    lines = ["| case | precision | malloc | run (date, git) | " + " | ".join(f"{i} ms" for i in impls)
             + f" | fastbert / {BASE} |", "|" + "---|" * (len(impls) + 5)]
    ratios = defaultdict(list)
    for r in runs:
        ratio = r["ms"].get(BASE, float("nan")) / r["ms"]["fastbert"] if "fastbert" in r["ms"] else float("nan")
        ratios[r["series"]].append(ratio)
        cells = [f"{r['ms'][i]:.0f}" if i in r["ms"] else "" for i in impls]
        lines.append(f"| {' | '.join(r['series'])} | {r['date'][11:16]} {r['git']} | " + " | ".join(cells)
                     + f" | {ratio:.2f}× |")
    lines += ["", "| case | precision | malloc | runs | median ratio | range |", "|---|---|---|---|---|---|"]
    for series, rs in ratios.items():
        lines.append(f"| {' | '.join(series)} | {len(rs)} | **{statistics.median(rs):.2f}×** | "
                     f"{min(rs):.2f}–{max(rs):.2f}× |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = list(dict.fromkeys(r["series"] for r in runs))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, s in enumerate(series):
        rs = [r for r in runs if r["series"] == s and "fastbert" in r["ms"] and BASE in r["ms"]]
        xs = [i + (j - (len(rs) - 1) / 2) * 0.08 for j in range(len(rs))]
        ax.scatter(xs, [r["ms"][BASE] / r["ms"]["fastbert"] for r in rs], color="C0", zorder=3)
        masked = [(x, r["ms"][BASE] / r["ms"][f"{BASE}-masked-head"]) for x, r in zip(xs, rs)
                  if f"{BASE}-masked-head" in r["ms"]]
        if masked:
            ax.scatter(*zip(*masked), color="C1", marker="x", zorder=3)
    ax.scatter([], [], color="C0", label="fastbert")
    ax.scatter([], [], color="C1", marker="x", label="transformers, MLM head on masked rows only")
    ax.set_xticks(range(len(series)), ["\n".join(s) for s in series], fontsize=8)
    ax.set_ylabel(f"step-time ratio {BASE} / competitor, same run")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
