"""How much of the model step's speed reaches a `fastbert pretrain` run: the CLI's loop vs the bare step.

    python -m benchmarks.pretrain_loop                                    # GPU: base, 128 x 128, 40 steps
    python -m benchmarks.pretrain_loop --config micro --seq-len 32 --batch-size 4 --steps 6 --log-every 2  # CPU

Three rows (four on CUDA), one process, the same corpus (default: the sample corpus shipped in the
package), tokenizer, config, batch size and recipe:
  bare-step          the eager training step alone (fastbert.pretrain.PretrainingLoss forward +
                     backward, clipping, AdamW, bf16 autocast on CUDA) over batches built beforehand
                     with the CLI's data code (benchmarks.pretrain_race.build_batches) and already on
                     the device; one sync at the end. The eager loop's ceiling.
  loop-prefetch-off  `fastbert pretrain --prefetch off`: each step's batches built in the loop.
  loop-prefetch-on   `fastbert pretrain --prefetch on` (the default on a GPU): built one step ahead in
                     a background thread.
  loop-cuda-graphs   (CUDA) `fastbert pretrain --prefetch on --cuda-graphs`: each step one CUDA graph
                     replay (batches padded to --seq-len; tokens/s still counts real tokens only); it
                     can pass the bare eager step, whose kernel launches it does not pay.
Each loop runs --repeats times (default 2), interleaved (off, on[, graphs], off, ...), so that no
mode gets all of the warmer process. Its figure is the median of its runs' metrics rows' tokens_per_s (each row: the
real tokens of its steps over their wall time, evaluation and checkpoints excluded), each run's first
row dropped (Triton compilation, cuBLAS heuristics, the allocator's warm-up, graph capture).
vs_bare = loop tokens/s ÷ bare tokens/s: what the loop's host work (batch building, copies, the
model's host syncs, logging) costs, or with graphs gains.
Output under $OUT (or benchmarks/results/): pretrain_loop.json / .md.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import Recorder


def bare_step_tokens_per_s(config, batches, *, device, lr, warmup=3) -> tuple[float, int]:
    """Real tokens/s of the bare training step over `batches` (moved to the device first)."""
    from fastbert.modeling import BertForPreTraining
    from fastbert.optim import build_optimizer, optimizer_step, warmup_linear_schedule
    from fastbert.pretrain import PretrainingLoss
    torch.manual_seed(0)
    model = BertForPreTraining(config).to(device).train()
    # the loop's MLM head bound (fastbert/pretrain.py: K rows without a nonzero() sync), 15% masking
    rows, seq = (max(b["input_ids"].shape[i] for b in batches) for i in (0, 1))
    model.cls.predictions.static_rows = rows * (round(0.15 * seq) + 1)
    loss_module = PretrainingLoss(model, True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, lr=lr, weight_decay=0.01)
    sched = warmup_linear_schedule(opt, 1, 10 ** 9)
    cuda = device.type == "cuda"
    on_device = [{k: v.to(device) for k, v in b.items()} for b in batches]

    def step(b):
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            mlm, nsp = loss_module(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"],
                                   b["next_sentence_label"])
        (mlm.float() + nsp.float()).backward()
        optimizer_step(opt, sched, params, 1.0)

    for b in on_device[:warmup]:
        step(b)
    timed = on_device[warmup:]
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for b in timed:
        step(b)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    return tokens / seconds, len(timed)


def main(argv=None) -> int:
    from fastbert.pretrain import SIZE_LR, sample_corpus_path
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=None, help="corpus file (default: the sample corpus in the package)")
    ap.add_argument("--config", default=None, help="size name (default: base on CUDA, micro on the CPU)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 4 on the CPU")
    ap.add_argument("--steps", type=int, default=None, help="steps per loop run (default 40 on CUDA, 6 on the CPU)")
    ap.add_argument("--log-every", type=int, default=10, help="steps per metrics row (one row = one figure)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per loop mode, interleaved (default 2)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    config_name = args.config or ("base" if cuda else "micro")
    batch = args.batch_size or (128 if cuda else 4)
    steps = args.steps or (40 if cuda else 6)
    if steps < 2 * args.log_every:
        raise SystemExit(f"--steps {steps} gives fewer than two metrics rows of --log-every {args.log_every}")
    corpus = args.corpus or sample_corpus_path()

    from fastbert.cli import main as cli_main
    from fastbert.config import BertConfig
    from fastbert.pretraining_data import iter_sentences
    from fastbert.tokenization import save_tokenizer, train_tokenizer
    from benchmarks.pretrain_race import build_batches

    rec = Recorder("pretrain_loop", corpus=corpus, config=config_name, batch=batch, seq=args.seq_len, steps=steps)
    common = dict(bench="pretrain_loop", config=config_name, batch=batch, seq=args.seq_len, device=str(
        torch.cuda.get_device_name(device) if cuda else "cpu"))
    with tempfile.TemporaryDirectory(prefix="pretrain_loop-") as tmp:
        tmp = Path(tmp)
        # one vocabulary for all three rows (the WordPiece trainer may break ties differently per run)
        save_tokenizer(train_tokenizer(iter_sentences([corpus]), vocab_size=args.vocab_size), str(tmp / "tok"))
        modes = ("prefetch-off", "prefetch-on") + (("cuda-graphs",) if cuda else ())
        loops = {m: [] for m in modes}
        # each mode twice, interleaved: none gets all of the warmer process (the first run also compiles)
        for i, mode in enumerate(modes * max(1, args.repeats)):
            out = tmp / f"run-{i}-{mode}"
            flags = {"prefetch-off": ["--prefetch", "off"], "prefetch-on": ["--prefetch", "on"],
                     "cuda-graphs": ["--prefetch", "on", "--cuda-graphs"]}[mode]
            rc = cli_main(["pretrain", "--corpus", corpus, "--tokenizer", str(tmp / "tok"), "--config", config_name,
                           "--seq-len", str(args.seq_len), "--batch-size", str(batch), "--steps", str(steps),
                           "--log-every", str(args.log_every), "--eval-every", "0", "--save-every", str(steps),
                           "--no-progress", *flags, "--out", str(out), "--cache-dir", str(tmp / "cache"),
                           *(["--device", str(device)] if args.device else [])])
            if rc != 0:
                raise SystemExit(f"fastbert pretrain {' '.join(flags)} failed (exit {rc})")
            from fastbert.trainer import read_metrics
            rows = [r for r in read_metrics(str(out / "metrics.jsonl")) if r["step"] % args.log_every == 0]
            loops[mode] += [r["tokens_per_s"] for r in rows[1:]]
        config = BertConfig.from_pretrained(str(tmp / "run-0-prefetch-off"))  # the runs' own config
        _, batches, _, _ = build_batches([corpus], tokenizer_spec=str(tmp / "tok"), seq_len=args.seq_len,
                                            batch_size=batch, steps=min(steps, 40), cache_dir=str(tmp / "cache"),
                                            eval_examples=0, workers=1, log=lambda m: None)
        bare, n_bare = bare_step_tokens_per_s(config, batches, device=device,
                                              lr=SIZE_LR.get(config_name, 1e-4))
    rec.add(**common, impl="bare-step", n_steps=n_bare, real_tokens_per_s=bare, vs_bare=1.0)
    for mode, values in loops.items():
        tps = statistics.median(values)
        rec.add(**common, impl=f"loop-{mode}", n_steps=len(values) * args.log_every,
                real_tokens_per_s=tps, vs_bare=tps / bare)
    rec.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
