"""A short real pretraining race: fastbert vs transformers (BertForPreTraining, SDPA) on one corpus.

    python -m benchmarks.pretrain_race [CORPUS ...] --config base --batch-size 128 --seconds 60 --max-steps 1500
    python -m benchmarks.pretrain_race --config micro --seq-len 32 --batch-size 8 --steps 3    # CPU smoke

Same config, same initial weights, same seed, same batches in the same order. The batches are built
once, before either run, with the code `fastbert pretrain` uses: its WordPiece tokenizer trained on
the corpus (or --tokenizer), fastbert.pretraining_data's cached shards, held-out split,
BERT segment pairs and masking, and the CLI's order of examples (epoch after epoch), collated and padded
to each batch's longest example. Epochs are built in parallel processes (each epoch is seeded on its
own, so the result is the one the CLI's single process would see). Each competitor then trains from
the same start with the CLI's recipe (AdamW as fastbert.optim builds it, linear warm-up over 10% of
--max-steps then linear decay, gradient clipping at 1.0, dropout 0.1 (--dropout), bf16 autocast on CUDA, fp32 on
the CPU) for --seconds of wall-clock time or --steps steps, whichever ends first; fastbert's loss is the
CLI's (pretrain.PretrainingLoss: MLM head on the masked rows only), transformers' is what its
BertForPreTraining computes (cross-entropy over full (batch, seq, vocab) logits + NSP).

The clock runs over training steps only (batch to device, forward, backward, clipping, optimizer),
each step ending with the loss read back (the CLI does the same). A few untimed steps first compile
kernels and warm caches (startup_s), after which the weights, optimizer and RNG are reset.

Output under $OUT (or benchmarks/results/): pretrain_race.json (one summary row per competitor:
median step time, real tokens/s, loss reached at the equal time, held-out MLM/NSP figures),
pretrain_race.md, pretrain_race.png (loss vs wall-clock time, and vs step), and
pretrain_race_curves.json (every step: step, seconds, mlm_loss, nsp_loss).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.harness import Recorder, output_dir, pyplot, save_figure

DEFAULT_CORPUS = "/work/shared/data/pretrain/en.txt.gz"
IMPLS = ("fastbert", "transformers-sdpa", "transformers-eager")


# ------------------------------------------------------------------------------------------ data

_WORKER: dict = {}


def _epoch_examples(epoch: int) -> list[dict]:
    """Every example of one epoch (in a worker process, from the PretrainingData set before the fork)."""
    data = _WORKER["data"]
    return data.examples(epoch, range(len(data.epoch(epoch))))


def build_batches(corpus_paths, *, tokenizer_spec=None, vocab_size=8192, seq_len=128, batch_size=32, steps=100,
                  seed=0, mask_prob=0.15, cache_dir=None, eval_examples=256, workers=None, log=print):
    """(tokenizer, list of collated batches, held-out examples, info), as `fastbert pretrain` would draw them."""
    from fastbert.pretraining_data import (PretrainingData, collate, iter_sentences, split_documents,
                                           tokenize_corpus)
    from fastbert.tokenization import build_tokenizer
    t0 = time.perf_counter()
    for p in corpus_paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"corpus file {p!r} does not exist")
    spec = tokenizer_spec or "wordpiece"
    tokenizer = build_tokenizer(None if spec == "wordpiece" else spec,
                                iter_sentences(corpus_paths) if spec in ("wordpiece", "chinese") else None,
                                vocab_size=vocab_size, lowercase=True)
    corpus = tokenize_corpus(corpus_paths, tokenizer, cache_dir)
    train_docs, eval_docs = split_documents(corpus.num_documents, 0.05, seed)
    common = {"seq_len": seq_len, "mask_prob": mask_prob, "nsp": True, "whole_word_mask": False, "short_seq_prob": 0.1}
    data = PretrainingData(corpus, tokenizer, train_docs, seed=seed, **common)
    held_out = []
    if len(eval_docs) >= 2 and eval_examples:
        held_out = PretrainingData(corpus, tokenizer, eval_docs, seed=seed, **common).eval_examples(eval_examples)
    need = steps * batch_size
    per_epoch = len(data.epoch(0))
    n_epochs = 1
    # Epoch sizes vary a little (segment pairs are re-drawn); one spare epoch covers it, and more are
    # built below if not.
    if per_epoch < need:
        n_epochs = math.ceil(need / per_epoch) + 1
    examples = data.examples(0, range(min(per_epoch, need)))
    more = list(range(1, n_epochs))
    while len(examples) < need:
        n_proc = max(1, min(len(more), workers or os.cpu_count() or 1))
        if n_proc > 1 and "fork" in mp.get_all_start_methods():
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers never tokenize
            _WORKER["data"] = data
            with mp.get_context("fork").Pool(n_proc) as pool:
                chunks = pool.map(_epoch_examples, more)
            _WORKER.clear()
        else:
            chunks = [_epoch_examples_local(data, e) for e in more]
        for c in chunks:
            examples += c
        more = [more[-1] + 1] if more else [1]
    examples = examples[:need]
    pad_id = data.ids["pad"]
    batches = [collate(examples[i:i + batch_size], pad_id) for i in range(0, need, batch_size)]
    info = {"corpus": [str(p) for p in corpus_paths], "documents": corpus.num_documents,
            "corpus_tokens": corpus.num_tokens, "train_documents": len(train_docs), "held_out_documents": len(eval_docs),
            "examples_per_epoch": per_epoch, "epochs_used": round(need / per_epoch, 2),
            "vocab_size": tokenizer.get_vocab_size(), "pad_id": pad_id, "data_build_s": time.perf_counter() - t0}
    log(f"data: {corpus.num_documents} documents, {corpus.num_tokens:,} tokens, {len(batches)} batches of "
        f"{batch_size} ({info['epochs_used']} epochs) built in {info['data_build_s']:.1f} s")
    return tokenizer, batches, held_out, info


def _epoch_examples_local(data, epoch):
    return data.examples(epoch, range(len(data.epoch(epoch))))


# ------------------------------------------------------------------------------------------ models

class HFPretrainingLoss(torch.nn.Module):
    """transformers' BertForPreTraining losses, split: MLM over the full (B, S, V) logits, and NSP."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids, labels, next_sentence_label):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        logits = out.prediction_logits
        mlm = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        nsp = F.cross_entropy(out.seq_relationship_logits.view(-1, 2), next_sentence_label.view(-1))
        return mlm, nsp


def build_model(impl, config, state):
    """(model with `state` loaded, loss module returning (mlm, nsp))."""
    if impl == "fastbert":
        import fastbert
        from fastbert.pretrain import PretrainingLoss
        model = fastbert.BertForPreTraining(config)
        model.load_state_dict(state)
        return model, PretrainingLoss(model, nsp=True)
    if impl.startswith("transformers-"):
        import transformers
        attn = impl.split("-", 1)[1]
        known = transformers.BertConfig().to_dict()  # only fields transformers' BertConfig has
        hf_cfg = transformers.BertConfig(**{k: v for k, v in config.to_dict().items() if k in known
                                            and k not in ("id2label", "label2id", "model_type", "architectures",
                                                          "transformers_version")})
        hf_cfg._attn_implementation = attn  # read at construction by transformers 4.4x and 5.x
        model = transformers.BertForPreTraining(hf_cfg)
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)
        model.load_state_dict(state)
        return model, HFPretrainingLoss(model)
    raise ValueError(f"unknown competitor {impl!r}; choose from {', '.join(IMPLS)}")


# ------------------------------------------------------------------------------------------ the race

def race_one(impl, config, state, batches, held_out, *, device, lr, max_steps, seconds, seed, pad_id,
             warmup_steps_untimed=3, log=print):
    """Train one competitor; (curve [(step, seconds, mlm, nsp, real_tokens)], summary dict)."""
    from fastbert.optim import build_optimizer, warmup_linear_schedule
    from fastbert.pretrain import evaluate
    cuda = device.type == "cuda"
    model, loss_module = build_model(impl, config, state)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step_fn(batch, opt, sched):
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            mlm, nsp = loss_module(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"],
                                   b["next_sentence_label"])
        (mlm.float() + nsp.float()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return torch.stack([mlm.detach().float(), nsp.detach().float()]).tolist()  # the step's one sync

    warmup = max(1, max_steps // 10)
    # untimed: kernel compilation, cuBLAS heuristics, allocator; then back to the common start
    t0 = time.perf_counter()
    opt = build_optimizer(model, lr=lr, weight_decay=0.01)
    sched = warmup_linear_schedule(opt, warmup, max_steps)
    for batch in batches[:warmup_steps_untimed]:
        step_fn(batch, opt, sched)
    startup = time.perf_counter() - t0
    model.load_state_dict(state)
    opt = build_optimizer(model, lr=lr, weight_decay=0.01)
    sched = warmup_linear_schedule(opt, warmup, max_steps)
    torch.manual_seed(seed + 1)  # dropout stream, as the CLI seeds it
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    curve, step_times, diverged = [], [], False
    start = last = time.perf_counter()
    for i, batch in enumerate(batches[:max_steps]):
        if last - start >= seconds:
            break
        mlm, nsp = step_fn(batch, opt, sched)
        now = time.perf_counter()
        step_times.append(now - last)
        last = now
        curve.append((i + 1, now - start, mlm, nsp, int(batch["attention_mask"].sum())))
        if not (math.isfinite(mlm) and math.isfinite(nsp)):
            log(f"  {impl}: non-finite loss at step {i + 1}; stopping")
            diverged = True
            break
    wall = last - start
    stopped_by = ("non-finite loss" if diverged else "steps" if len(curve) >= max_steps
                  else "time" if wall >= seconds else "batches (raise --max-steps)")
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    ev = evaluate(model, held_out, batch_size=64, device=device, pad_id=pad_id, nsp=True,
                  autocast=autocast) if held_out else {}
    q = statistics.quantiles(step_times, n=10, method="inclusive") if len(step_times) > 1 else step_times * 9
    med = statistics.median(step_times)
    summary = {"steps": len(curve), "wall_s": wall, "startup_s": startup, "median_ms": med * 1e3,
               "p20_ms": q[1] * 1e3, "p80_ms": q[7] * 1e3, "repeats": len(step_times),
               "real_tokens_per_s": sum(c[4] for c in curve) / wall if wall > 0 else None,
               "peak_mem_gib": peak, "stopped_by": stopped_by,
               **{f"eval_{k}" if not k.startswith("eval_") else k: v for k, v in ev.items()}}
    log(f"  {impl}: {len(curve)} steps in {wall:.1f} s ({med * 1e3:.1f} ms/step median, "
        f"{summary['real_tokens_per_s'] or 0:,.0f} real tokens/s), final mlm {curve[-1][2] if curve else float('nan'):.3f}")
    model = loss_module = opt = sched = params = None  # free this competitor's memory before the next one
    if cuda:
        torch.cuda.empty_cache()
    return curve, summary


def smoothed(values, window):
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def loss_at(curve, t, window):
    """Smoothed (mlm, nsp) of the last step finished by time t."""
    idx = [i for i, c in enumerate(curve) if c[1] <= t + 1e-9]
    if not idx:
        return None, None
    i = idx[-1]
    lo = max(0, i + 1 - window)
    part = curve[lo:i + 1]
    return statistics.fmean(c[2] for c in part), statistics.fmean(c[3] for c in part)


def time_to(curve, target, window):
    """First time the smoothed mlm + nsp loss is at or below target, or None."""
    total = smoothed([c[2] + c[3] for c in curve], window)
    for c, v in zip(curve, total):
        if v <= target:
            return c[1]
    return None


def plot(curves, path, title, window):
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.2))
    for impl, curve in curves.items():
        if not curve:
            continue
        t = [c[1] for c in curve]
        total = [c[2] + c[3] for c in curve]
        line, = ax_t.plot(t, smoothed(total, window), label=f"{impl} ({len(curve)} steps)")
        ax_t.plot(t, total, color=line.get_color(), alpha=0.2, linewidth=0.7)
        ax_s.plot([c[0] for c in curve], smoothed(total, window), color=line.get_color(), label=impl)
    ax_t.set_xlabel("wall-clock seconds (training steps only)")
    ax_t.set_ylabel(f"train loss, MLM + NSP (moving mean of {window})")
    ax_t.legend()
    ax_t.grid(alpha=0.3)
    ax_s.set_xlabel("step (same batches for both)")
    ax_s.set_ylabel("train loss, MLM + NSP")
    ax_s.legend()
    ax_s.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", nargs="*", help=f"BERT-format corpus file(s) (default {DEFAULT_CORPUS})")
    ap.add_argument("--config", default=None, help="size name of fastbert.config.SIZES (default: base on CUDA, micro on the CPU)")
    ap.add_argument("--tokenizer", default=None, help="'wordpiece' (trained on the corpus, default) or a vocab/tokenizer path")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 8 on the CPU")
    ap.add_argument("--seconds", type=float, default=None, help="wall-clock budget per competitor (default 60; none with --steps)")
    ap.add_argument("--steps", type=int, default=None, help="a fixed number of steps per competitor instead of a time budget")
    ap.add_argument("--max-steps", type=int, default=1500,
                    help="batches built up front and the schedule's length with --seconds (default 1500)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the CLI's for the size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dropout", type=float, default=None,
                    help="hidden and attention dropout (default: the config's, 0.1; 0 makes the competitors' "
                         "steps comparable one by one: they draw different dropout masks)")
    ap.add_argument("--impl", action="append", choices=IMPLS, help="competitors (default fastbert, transformers-sdpa)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--cache-dir", default=None, help="tokenized shard cache (default: the CLI's)")
    ap.add_argument("--eval-examples", type=int, default=256, help="held-out examples evaluated at the end (0: none)")
    ap.add_argument("--workers", type=int, default=None, help="processes building epochs (default: every core)")
    ap.add_argument("--warmup-untimed", type=int, default=3, help="untimed steps before each timed run")
    args = ap.parse_args(argv)

    from fastbert.config import BertConfig
    from fastbert.pretrain import SIZE_LR

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    size = args.config or ("base" if cuda else "micro")
    batch = args.batch_size or (128 if cuda else 8)
    if args.steps is not None:
        max_steps, seconds = args.steps, float("inf") if args.seconds is None else args.seconds
    else:
        max_steps, seconds = args.max_steps, 60.0 if args.seconds is None else args.seconds
    impls = tuple(args.impl or ("fastbert", "transformers-sdpa"))
    corpus = args.corpus or [DEFAULT_CORPUS]
    log = lambda m: print(f"[pretrain_race] {m}", file=sys.stderr, flush=True)

    # Data first, before CUDA is touched: the epoch workers are forked.
    tokenizer, batches, held_out, info = build_batches(
        corpus, tokenizer_spec=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len, batch_size=batch,
        steps=max_steps, seed=args.seed, cache_dir=args.cache_dir, eval_examples=args.eval_examples,
        workers=args.workers, log=log)
    config = BertConfig.from_size(size, vocab_size=tokenizer.get_vocab_size())
    if args.dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = args.dropout
    if args.seq_len > config.max_position_embeddings:
        ap.error(f"--seq-len {args.seq_len} is above max_position_embeddings {config.max_position_embeddings}")
    lr = args.lr if args.lr is not None else SIZE_LR.get(size, 1e-4)
    torch.manual_seed(args.seed)
    import fastbert
    state = {k: v.clone() for k, v in fastbert.BertForPreTraining(config).state_dict().items()}
    precision = "bf16" if cuda else "fp32"
    log(f"{size} ({config.num_hidden_layers} layers, hidden {config.hidden_size}), seq {args.seq_len}, batch {batch}, "
        f"lr {lr:g}, {precision} on {device}; per competitor: {seconds:g} s or {max_steps} steps")

    curves, summaries = {}, {}
    for impl in impls:
        try:
            curves[impl], summaries[impl] = race_one(
                impl, config, state, batches, held_out, device=device, lr=lr, max_steps=max_steps,
                seconds=seconds, seed=args.seed, pad_id=info["pad_id"], warmup_steps_untimed=args.warmup_untimed,
                log=log)
        except Exception as e:  # one failing competitor must not cost the other's result
            import traceback
            traceback.print_exc()
            summaries[impl] = {"error": f"{type(e).__name__}: {e}"[:300]}
            curves[impl] = []

    ran = {k: c for k, c in curves.items() if c}
    window = max(1, min(len(c) for c in ran.values()) // 20) if ran else 1
    t_equal = min(c[-1][1] for c in ran.values()) if ran else None
    at_equal = {k: loss_at(c, t_equal, window) for k, c in ran.items()}
    finals = {k: v[0] + v[1] for k, v in at_equal.items() if v[0] is not None}
    target = max(finals.values()) if finals else None  # the loss the slower run reached by the equal time
    rec = Recorder("pretrain_race", corpus=info["corpus"], config=size, tokenizer=args.tokenizer or "wordpiece",
                   data=info, equal_time_s=t_equal, smoothing_window=window, lr=lr, seed=args.seed,
                   budget_s=None if math.isinf(seconds) else seconds, max_steps=max_steps)
    base = summaries.get("transformers-sdpa", {})
    for impl in impls:
        s = summaries[impl]
        row = {"bench": "pretrain_race", "impl": impl, "config": size, "batch": batch, "seq": args.seq_len,
               "precision": precision, "device": torch.cuda.get_device_name(device) if cuda else "cpu"}
        if "error" in s:
            rec.add(**row, error=s["error"])
            continue
        mlm_eq, nsp_eq = at_equal[impl]  # None: not one step finished by the equal time
        row.update(s)
        row.update(mlm_loss_at_equal_time=mlm_eq, nsp_loss_at_equal_time=nsp_eq,
                   time_to_slower_final_loss_s=time_to(curves[impl], target, window) if target is not None else None)
        if base.get("median_ms"):
            row["speedup_vs_sdpa"] = base["median_ms"] / s["median_ms"]
        rec.add(**row)
    out = output_dir()
    rec.save(out)
    (out / "pretrain_race_curves.json").write_text(json.dumps(
        {"columns": ["step", "seconds", "mlm_loss", "nsp_loss", "real_tokens"], "curves": curves}) + "\n")
    plot(curves, out / "pretrain_race.png",
         f"pretraining race: {size}, seq {args.seq_len}, batch {batch}, {precision}, "
         f"{Path(corpus[0]).name}", window)
    md = rec.markdown()
    if t_equal is not None:
        md += f"\nEqual time: {t_equal:.1f} s (the shorter run's end); losses there are moving means of {window} steps.\n"
    (out / "pretrain_race.md").write_text(md)
    print(md)
    return 0 if all("error" not in s for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
