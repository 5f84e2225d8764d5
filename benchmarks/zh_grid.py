"""Two-stage check, fine-tuning half: a pretrained model and the same model from random weights,
fine-tuned over the same grid of learning rates x seeds, judged on the mean over seeds.

    python -m benchmarks.zh_grid MODEL_DIR [--lrs 1e-4,3e-4,1e-3] [--seeds 42,43,44] [--epochs 6]
                                 [--workers 2] [--threads 1] [--out DIR]

MODEL_DIR is a `fastbert pretrain` output (config, tokenizer, model.safetensors), e.g. the
``zh_model/`` of ``benchmarks/zh_two_stage.sh`` run with ZH_EXPORT=1 on a GPU. Every run is one
`fastbert finetune --task classify` process (the random arm adds --random-init: same config and
tokenizer, fresh weights); --workers of them run at a time with --threads CPU threads each. A run's
score is its best epoch's dev accuracy (the dev set picks the epoch, alike for both arms).

One fine-tuning seed is a noisy judge on 1,000 dev examples (one point is ~1.2 standard errors), so
the summary compares the arms on the mean over seeds at each lr, the paired per-seed differences (the
same seed draws the same batches for both arms), and the best lr of each arm. Runs that finished are
kept in --out/finetune (their metrics.json) and skipped when the command is started again, so an
interrupted grid resumes. Writes --out/grid.md, grid.json and grid.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from benchmarks.harness import pyplot, save_figure

DATA = "/work/shared/data/sentiment_zh"
ARMS = ("pretrained", "random")
RUNS = "finetune"  # one folder per run under --out (not "runs/", which .gitignore keeps out of the repo)
SETTINGS = "grid_run.json"  # what a run was started with, to compare on read-back
KEPT = ("metrics.json", "config.json", SETTINGS)
# What makes two models "the same model" for the comparison: the pretrained arm and the random arm
# must share shape and vocabulary (the classifier head's num_labels and the like may differ).
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size")


def run_name(arm: str, lr: str, seed: int) -> str:
    return f"{arm}-lr{lr}-s{seed}"


def finetune_command(model: str, data: str, arm: str, lr: str, seed: int, out: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "fastbert.cli", "finetune", "--task", "classify", "--model", model,
           "--train", f"{data}/train.jsonl", "--dev", f"{data}/dev.jsonl", "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--seed", str(seed),
           "--lr", lr, "--device", "cpu", "--precision", "fp32", "--no-progress", "--out", str(out)]
    if arm == "random":
        cmd.append("--random-init")
    if args.max_train_examples:
        cmd += ["--max-train-examples", str(args.max_train_examples)]
    if args.max_eval_examples:
        cmd += ["--max-eval-examples", str(args.max_eval_examples)]
    return cmd


def data_digest(data: str) -> str:
    """The data's identity wherever its folder lies: sha256 over train.jsonl then dev.jsonl, its first
    16 hex digits (64 bits: a fingerprint, not a security check)."""
    h = hashlib.sha256()
    for split in ("train", "dev"):
        h.update(Path(data, f"{split}.jsonl").read_bytes())
    return h.hexdigest()[:16]


def run_settings(arm: str, lr: str, seed: int, digest: str, args) -> dict:
    return {"arm": arm, "lr": lr, "seed": seed, "data_sha256": digest, "epochs": args.epochs,
            "batch_size": args.batch_size, "max_length": args.max_length,
            "max_train_examples": args.max_train_examples, "max_eval_examples": args.max_eval_examples}


def model_shape(config_path: Path) -> dict:
    config = json.loads(Path(config_path).read_text())
    return {k: config.get(k) for k in SHAPE_KEYS}


def read_back_mismatch(run_dir: Path, settings: dict, shape: dict) -> str | None:
    """Why a finished run cannot join this grid (settings or model shape differ), or None if it can."""
    try:
        ran = json.loads((run_dir / SETTINGS).read_text())
    except (OSError, ValueError):
        return f"no readable {SETTINGS} (the settings it ran with are unknown)"
    diff = [f"{k} {ran.get(k)!r} (command: {v!r})" for k, v in settings.items() if ran.get(k) != v]
    try:
        ran_shape = model_shape(run_dir / "config.json")
    except (OSError, ValueError):
        return "no readable config.json (the model shape it ran with is unknown)"
    diff += [f"{k} {ran_shape[k]!r} (model: {v!r})" for k, v in shape.items() if ran_shape[k] != v]
    return "; ".join(diff) or None


def load_result(run_dir: Path) -> dict | None:
    """{"accuracy", "best_epoch", "epochs": [...], "train_seconds"} of a finished run, else None."""
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return {"accuracy": m["dev"]["accuracy"], "best_epoch": m["best_epoch"],
            "epochs": [h["accuracy"] for h in m["history"]], "train_seconds": m["train_seconds"]}


def prune_run(run_dir: Path) -> None:
    """Keep what the summary and a later read-back need (KEPT); drop weights and tokenizer files."""
    for f in run_dir.iterdir():
        if f.is_file() and f.name not in KEPT:
            f.unlink()


def _stats(xs: list[float]) -> dict:
    return {"n": len(xs), "mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def summarize(results: dict, lrs: list[str], seeds: list[int]) -> dict:
    """results[(arm, lr, seed)] -> run result. Per lr: each arm's accuracy over seeds, and the paired
    (same seed) differences pretrained - random; then the best lr of each arm by mean accuracy."""
    per_lr = []
    for lr in lrs:
        row = {"lr": lr}
        for arm in ARMS:
            accs = [results[(arm, lr, s)]["accuracy"] for s in seeds if (arm, lr, s) in results]
            if accs:
                row[arm] = _stats(accs)
        diffs = [results[("pretrained", lr, s)]["accuracy"] - results[("random", lr, s)]["accuracy"]
                 for s in seeds if ("pretrained", lr, s) in results and ("random", lr, s) in results]
        if diffs:
            row["paired_difference"] = _stats(diffs)
        per_lr.append(row)
    best = {}
    for arm in ARMS:
        rows = [r for r in per_lr if arm in r]
        if rows:
            top = max(rows, key=lambda r: r[arm]["mean"])
            best[arm] = {"lr": top["lr"], **top[arm]}
    out = {"per_lr": per_lr, "best": best}
    if len(best) == 2:
        out["best_difference"] = best["pretrained"]["mean"] - best["random"]["mean"]
    return out


def markdown(summary: dict, header: str) -> str:
    def cell(s):
        return f"{s['mean']:.4f} ± {s['sd']:.4f} (n={s['n']}; {s['min']:.3f}–{s['max']:.3f})" if s else "—"

    lines = [f"# Two-stage grid: pretrained vs random init\n\n{header}\n",
             "| lr | pretrained: mean ± sd over seeds | random: mean ± sd | paired difference (same seed) |",
             "|---|---|---|---|"]
    for r in summary["per_lr"]:
        d = r.get("paired_difference")
        lines.append(f"| {r['lr']} | {cell(r.get('pretrained'))} | {cell(r.get('random'))} | "
                     + (f"{d['mean'] * 100:+.2f} ± {d['sd'] * 100:.2f} points (n={d['n']}) |" if d else "— |"))
    b = summary["best"]
    if "best_difference" in summary:
        lines += ["", f"Best lr of each arm by mean over seeds: pretrained {b['pretrained']['mean']:.4f} "
                      f"(lr {b['pretrained']['lr']}) vs random {b['random']['mean']:.4f} (lr {b['random']['lr']}): "
                      f"**{summary['best_difference'] * 100:+.2f} points**."]
    return "\n".join(lines) + "\n"


def plot(results: dict, lrs: list[str], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None or not results:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(lrs)), 4))
    for k, arm in enumerate(ARMS):
        for i, lr in enumerate(lrs):
            accs = [r["accuracy"] for (a, l, _), r in results.items() if a == arm and l == lr]
            x = i + (k - 0.5) * 0.3
            ax.scatter([x] * len(accs), accs, color=f"C{k}", alpha=0.6, label=arm if i == 0 else None)
            if accs:
                ax.hlines(statistics.fmean(accs), x - 0.12, x + 0.12, color=f"C{k}", linewidth=2)
    ax.set_xticks(range(len(lrs)), [f"lr {lr}" for lr in lrs])
    ax.set_ylabel("dev accuracy, best epoch (bar: mean over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="pretrained checkpoint folder (fastbert pretrain output)")
    ap.add_argument("--data", default=DATA, help=f"folder with train.jsonl and dev.jsonl (default {DATA})")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="fine-tuning processes at a time")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--arms", default=",".join(ARMS), help="pretrained, random or both (default both)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/zh-grid-<model folder name>")
    ap.add_argument("--keep-models", action="store_true",
                    help="keep each run's fine-tuned weights and tokenizer copy (default: only metrics.json, "
                         "config.json and grid_run.json stay; a mini run's weights are 20 MB)")
    ap.add_argument("--max-train-examples", type=int, help="quick smoke: only the first N training examples")
    ap.add_argument("--max-eval-examples", type=int, help="quick smoke: only the first N dev examples")
    args = ap.parse_args(argv)

    model = os.path.abspath(args.model)
    if not os.path.exists(os.path.join(model, "config.json")):
        print(f"zh_grid: {model} is not a checkpoint folder (no config.json)", file=sys.stderr)
        return 2
    for split in ("train", "dev"):
        if not os.path.exists(f"{args.data}/{split}.jsonl"):
            print(f"zh_grid: missing {args.data}/{split}.jsonl", file=sys.stderr)
            return 2
    lrs = [x.strip() for x in args.lrs.split(",") if x.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not lrs or not seeds or not arms or any(a not in ARMS for a in arms):
        print(f"zh_grid: need at least one lr and seed, and arms from {ARMS}", file=sys.stderr)
        return 2
    for name, values in (("--lrs", lrs), ("--seeds", seeds), ("--arms", arms)):
        if len(set(values)) != len(values):  # a repeated seed would count one run twice in the means
            print(f"zh_grid: {name} names a value twice: {values}", file=sys.stderr)
            return 2
    out = args.out or Path("benchmarks/results") / f"zh-grid-{Path(model).name}"
    (out / RUNS).mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    shape, digest = model_shape(Path(model) / "config.json"), data_digest(args.data)
    results, todo, refused = {}, [], []
    for seed in seeds:  # seed-major: a cut grid still has whole seeds of every lr and arm
        for lr in lrs:
            for arm in arms:
                run_dir = out / RUNS / run_name(arm, lr, seed)
                done = load_result(run_dir)
                why = done and read_back_mismatch(run_dir, run_settings(arm, lr, seed, digest, args), shape)
                if why:
                    refused.append(f"  {run_dir}: {why}")
                elif done:
                    results[(arm, lr, seed)] = done
                else:
                    todo.append((arm, lr, seed))
    if refused:
        print("zh_grid: finished runs in --out that this command would mix with runs of other settings "
              "(move them away or pick another --out):\n" + "\n".join(refused), file=sys.stderr)
        return 2
    print(f"zh_grid: {len(results)} runs done, {len(todo)} to go, {args.workers} at a time", flush=True)

    def one(job):
        arm, lr, seed = job
        name = run_name(arm, lr, seed)
        t0 = time.time()
        # the settings go in first: a grid killed after a run finished still knows what it ran with
        (out / RUNS / name).mkdir(parents=True, exist_ok=True)
        (out / RUNS / name / SETTINGS).write_text(json.dumps(run_settings(arm, lr, seed, digest, args), indent=1))
        with open(out / "logs" / f"{name}.log", "w") as log:
            rc = subprocess.run(finetune_command(model, args.data, arm, lr, seed, out / RUNS / name, args),
                                stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        return job, rc, time.time() - t0

    failed = []
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = [pool.submit(one, job) for job in todo]
        for n, fut in enumerate(as_completed(futures), 1):
            (arm, lr, seed), rc, secs = fut.result()
            res = load_result(out / RUNS / run_name(arm, lr, seed)) if rc == 0 else None
            if res:
                results[(arm, lr, seed)] = res
                if not args.keep_models:
                    prune_run(out / RUNS / run_name(arm, lr, seed))
            else:
                failed.append(run_name(arm, lr, seed))
            acc = f"{res['accuracy']:.4f}" if res else f"FAILED rc={rc} (logs/{run_name(arm, lr, seed)}.log)"
            print(f"[{n}/{len(todo)}] {run_name(arm, lr, seed)}: {acc} in {secs:.0f} s", flush=True)

    summary = summarize(results, lrs, seeds)
    header = (f"Model `{model}`; data `{args.data}`; {args.epochs} epochs, batch {args.batch_size}, max length "
              f"{args.max_length}, CPU, {args.threads} thread(s) per run; seeds {seeds}; score = best epoch's "
              "dev accuracy.")
    text = markdown(summary, header)
    (out / "grid.md").write_text(text)
    (out / "grid.json").write_text(json.dumps(
        {"model": model, "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size,
         "max_length": args.max_length, "lrs": lrs, "seeds": seeds, "summary": summary,
         "runs": [{"arm": a, "lr": lr, "seed": s, **r} for (a, lr, s), r in sorted(results.items())]}, indent=1))
    plot(results, lrs, out / "grid.png")
    print(text)
    if failed:
        print(f"zh_grid: {len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
