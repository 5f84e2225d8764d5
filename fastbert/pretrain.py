"""`fastbert pretrain`: BERT pretraining (masked LM + next-sentence prediction) from a text corpus.

With no arguments it pretrains a tiny BERT on the sample corpus shipped in the package (the first
chapters of Jane Austen's Emma) and writes ``runs/pretrain-<date>-<time>/``:

    config.json, model.safetensors     the latest model (transformers.BertForPreTraining loads it)
    vocab.txt, tokenizer.json, ...     the tokenizer (transformers.BertTokenizerFast loads it)
    metrics.jsonl                      one row per logged step: step, loss, mlm_loss, nsp_loss, lr,
                                       tokens_per_s, epoch; at evaluations also eval_mlm_loss,
                                       eval_nsp_loss, mlm_accuracy, nsp_accuracy (held-out documents)
    loss_curve.png                     the curves of metrics.jsonl
    run_args.json                      the settings of the run (what --resume continues with)
    corpus_sha256.json                 the corpus files' sha256 (--resume refuses files changed since)
    initial_model.json                 until the first checkpoint: the model is the step-0 one (random,
                                       or --init-from's); finetune and encode warn while it is there
    checkpoints/step-N/ + latest       resumable state: model, optimizer, schedule, RNG, data position

``--resume`` continues the run in ``--out`` from its last checkpoint with the settings saved in
run_args.json (it starts from the beginning if there is no checkpoint yet, and exits 0 at once when
the run is finished); --save-every and --keep-checkpoints may be given again to change them.
SIGINT (Ctrl-C) or SIGTERM stops a run at the end of its step with a checkpoint (under torchrun at
the next metrics row, where the processes agree) and exits 128 + the signal's number. Under
``torchrun --nproc-per-node N`` each process takes 1/N of every global batch (``--batch-size`` is the
global batch); the loss is the mean over all masked tokens of the global batch whatever N and
``--grad-accum`` are, so runs with the same seed train the same model.

``--pack`` fills each row of ``--seq-len`` tokens with several whole examples (best-fit, see
fastbert.pretraining_data) instead of one example and padding; the model keeps them apart (each
example attends only to itself, positions and token types restart, one NSP prediction per example).
``--batch-size`` then counts rows, so a step holds more examples; the losses stay means over the
masked tokens and over the sentence pairs of the global batch. The examples themselves are BERT's
(the same ``--short-seq-prob``): packing removes padding without changing what an example looks like.
How much that is depends on the corpus: on the sample corpus (long chapters) at --seq-len 128 the
real tokens per row go from 96.8% to 99.4%; with ``--short-seq-prob 1.0`` (shorter examples), where
padding would take 28% of every row, packing keeps 93.5% real. ``--max-example-len N`` makes every
example at most N tokens (more, shorter examples per row). Evaluation runs unpacked, so its figures
compare across packed and unpacked runs.

On a GPU the loop keeps the host ahead of the device: the next step's batches are built (sampled,
masked, padded, pinned) in a background thread while the step's backward runs (``--prefetch``, on by
default for CUDA), and the losses are summed on the device and read back only for a metrics row or a
checkpoint (under fp16 the GradScaler still reads its overflow flag every step). A non-finite loss
since the last row (fp32 / bf16: under fp16 the GradScaler skips overflowing steps itself) or a
non-finite weight at a checkpoint stops the run with an error (exit 1) before that checkpoint is
written, so the last one written is a good one.

``--cuda-graphs`` (GPU; one process, unpacked, --grad-accum 1, fp32 or bf16) replays each step —
forward, backward, clipping, AdamW — as one CUDA graph (fastbert.cuda_graphs.GraphedTrainStep):
batches are padded to --seq-len, the MLM head runs on a fixed bound of rows (batch x (round(mask_prob x
seq_len) + 1); unlabelled ones add nothing), and the host's launches leave the step. Without dropout it
trains as the eager loop does; with dropout it draws other random numbers. Checkpoints are
interchangeable between the two. It is the fast loop on a GPU (H200, BERT-base 128 x 128: 0.93 of the
bare training step's tokens/s, the eager loop 0.49-0.51 before this tree's data-path fix); opt-in until
its CLI tests have run on a GPU. The eager loop's MLM head also takes that bound of rows (unpacked
rows), which spares it a host sync mid-step.

``--init-from DIR`` starts a new run from the weights of an earlier one (continued pretraining: a
fresh optimizer, warm-up and schedule; DIR's tokenizer and config). Use it to train a finished run
further, or on another corpus; pass another ``--seed`` to see other examples and masks. Caution:
the seed also picks the held-out documents, so with another seed on the same corpus the new run's
evaluation set overlaps the documents the first run trained on (its held-out figures read higher
than they are); keep the seed to keep the held-out set, or continue on another corpus.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F

from . import trainer as T
from . import runtime as R
from .runtime import PLAIN_OUTPUTS
from .pretraining_data import (CorpusError, PretrainingData, collate, collate_packed, file_hashes,
                               iter_sentences, split_documents, tokenize_corpus, trained_vocab_path)
from .tokenization import (PAD, SPECIAL_TOKENS, TOKENIZER_FILES, UNK, TokenizerError, build_tokenizer,
                           load_tokenizer, save_tokenizer, vocab_list)

# Settings that define a run: fixed when it starts, read back from run_args.json on --resume.
RUN_DEFAULTS = {
    "corpus": None,            # None: the sample corpus in the package
    "init_from": None,         # a model folder whose weights, config and tokenizer the run starts from
    "config": "tiny",
    "tokenizer": "wordpiece",
    "vocab_size": 8192,
    "cased": False,
    "seq_len": 128,
    "batch_size": 32,
    "grad_accum": 1,
    "steps": 200,
    "lr": None,                # None: by model size (SIZE_LR)
    "warmup_steps": None,      # None: 10% of the steps
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "mask_prob": 0.15,
    "whole_word_mask": False,
    "no_nsp": False,
    "short_seq_prob": 0.1,
    "pack": False,
    "max_example_len": None,   # None: --seq-len
    "dropout": None,           # None: the config's (0.1 for the named sizes)
    "pad_to": "batch",
    "seed": 0,
    "eval_fraction": 0.05,
    "eval_examples": 256,
    "precision": "auto",
    "log_every": 10,
    "eval_every": None,        # None: 10 evaluations per run; 0: only at the end
    "save_every": None,        # None: a quarter of the run (may be changed on --resume)
    "keep_checkpoints": 1,     # (may be changed on --resume)
}
RESUME_OVERRIDABLE = {"save_every", "keep_checkpoints"}
# Peak learning rates that train the named sizes well in a short run (BERT-base used 1e-4).
SIZE_LR = {"micro": 2e-3, "tiny": 1e-3, "mini": 5e-4, "small": 3e-4, "medium": 2e-4, "base": 1e-4,
           "large": 5e-5}


def sample_corpus_path() -> str:
    return str(resources.files("fastbert.data").joinpath("sample_corpus.txt"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RUN_DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument("--corpus", action="append", metavar="PATH",
                   help="BERT-format text (one sentence per line, blank line between documents), plain or "
                        "gzip; repeat for several files (default: the sample corpus in the package)")
    g.add_argument("--tokenizer", metavar="SPEC",
                   help="'wordpiece' (train a WordPiece vocabulary on the corpus; default), 'chinese' "
                        "(character level, as BERT's Chinese models), or a vocab.txt / tokenizer.json / folder")
    g.add_argument("--vocab-size", type=int, help=f"size of a trained vocabulary (default {d['vocab_size']}; "
                   "--tokenizer chinese keeps every character of the corpus, which may be more)")
    g.add_argument("--cased", action="store_true", default=None, help="keep case (default: lower-case)")
    g.add_argument("--seq-len", type=int, help=f"tokens per example (default {d['seq_len']})")
    g.add_argument("--mask-prob", type=float, help=f"fraction of tokens to predict (default {d['mask_prob']})")
    g.add_argument("--whole-word-mask", action="store_true", default=None,
                   help="mask all pieces of a word together")
    g.add_argument("--no-nsp", action="store_true", default=None,
                   help="masked LM only: B is always the true continuation, no NSP loss")
    g.add_argument("--short-seq-prob", type=float, help="share of shorter target lengths (default 0.1)")
    g.add_argument("--pack", action="store_true", default=None,
                   help="pack several whole examples into each row of --seq-len tokens (kept apart in "
                        "attention; --batch-size counts rows); default off")
    g.add_argument("--max-example-len", type=int,
                   help="longest example in tokens (default --seq-len); with --pack, shorter examples "
                        "share rows")
    g.add_argument("--pad-to", choices=["batch", "max"],
                   help="pad each batch to its longest example (default) or always to --seq-len")
    g.add_argument("--eval-fraction", type=float,
                   help="share of documents held out for evaluation (default 0.05, at least 2)")
    g.add_argument("--eval-examples", type=int, help="held-out examples per evaluation (default 256; 0 = none)")
    g.add_argument("--cache-dir", help="where tokenized shards are cached (default ~/.cache/fastbert/corpora)")

    g = p.add_argument_group("model and optimisation")
    g.add_argument("--init-from", metavar="DIR",
                   help="start from the weights of this model folder (e.g. a finished run) with a fresh "
                        "optimizer and schedule; its tokenizer and config are used")
    g.add_argument("--config", help="size name (micro, tiny, mini, small, medium, base, large) or a "
                                    "config.json (default tiny)")
    g.add_argument("--dropout", type=float, help="hidden and attention dropout (default: the config's)")
    g.add_argument("--batch-size", type=int, help=f"global batch in examples (default {d['batch_size']})")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    g.add_argument("--steps", type=int, help=f"optimizer steps (default {d['steps']})")
    g.add_argument("--lr", type=float, help="peak learning rate (default by size: "
                   + ", ".join(f"{k} {v:.0e}".replace("e-0", "e-") for k, v in SIZE_LR.items()) + "; 1e-4 for a config.json or --init-from)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 10%% of --steps)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (default 1.0; 0 = off)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16 autocast on CUDA, fp32 on CPU; fp16 uses a GradScaler")
    g.add_argument("--seed", type=int, help="seed of initialisation, examples, masks and dropout (default 0); "
                   "a trained vocabulary is cached beside the tokenized corpus (--cache-dir) and reused by "
                   "later runs of the same files and settings (--tokenizer RUN_DIR reuses a run's)")

    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="run folder (default runs/pretrain-<date>-<time>)")
    g.add_argument("--save-every", type=int, default=None,
                   help="steps between checkpoints (default: a quarter of the run; the last step always)")
    g.add_argument("--keep-checkpoints", type=int, default=None,
                   help="checkpoints kept (default 1; --resume keeps the run's own unless given)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (from the start if none; "
                        "exit 0 if it is finished)")
    g.add_argument("--log-every", type=int, help="steps per metrics.jsonl row (default 10)")
    g.add_argument("--eval-every", type=int,
                   help="steps between held-out evaluations (default: 10 per run; 0 = only at the end)")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute encoder layers in the backward pass to save memory")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--cuda-graphs", nargs="?", const="on", default="off", choices=("on", "off"),
                   help="GPU (default off; the bare flag is on): replay each training step (forward, backward, "
                        "clipping, AdamW) as one CUDA graph "
                        "(fastbert.cuda_graphs.GraphedTrainStep; batches padded to --seq-len, the MLM head on a "
                        "fixed bound of rows); one process, unpacked, --grad-accum 1, fp32 or bf16")
    g.add_argument("--prefetch", choices=["auto", "on", "off"], default="auto",
                   help="build the next step's batches in a background thread while a step runs "
                        "(default auto: on for a GPU, off for the CPU, where it would take the step's cores)")


# ----------------------------------------------------------------------------------------------

@dataclass
class _StepBatches:
    """One optimizer step's data, built on the host (by the prefetch thread on a GPU)."""
    micro_batches: list  # this process's micro-batches: (batch of CPU tensors, masked tokens, pairs, real tokens)
    n_masked_total: float  # masked tokens in the global batch (all processes, all micro-batches)
    n_examples: int  # sentence pairs in the global batch
    next_position: tuple[int, int]  # data position of the step after this one


def _log(dist: T.Distributed, msg: str) -> None:
    if dist.is_main:
        print(f"[fastbert pretrain] {msg}", file=sys.stderr, flush=True)


def _resolve_settings(args, stored: dict | None, dist: T.Distributed) -> dict:
    settings = dict(RUN_DEFAULTS)
    given = {k: getattr(args, k) for k in RUN_DEFAULTS if getattr(args, k, None) is not None}
    if stored is not None:
        for k, v in given.items():
            if k in RESUME_OVERRIDABLE:
                continue
            if k in stored and stored[k] != v:
                _log(dist, f"warning: --{k.replace('_', '-')} {v} ignored on --resume; the run uses "
                           f"{'its size default' if stored[k] is None else stored[k]}")
        settings.update({k: v for k, v in stored.items() if k in RUN_DEFAULTS})
        if settings["save_every"] == 0:  # stored by a run started when --save-every 0 meant the default
            settings["save_every"] = None
        settings.update({k: v for k, v in given.items() if k in RESUME_OVERRIDABLE})
    else:
        settings.update(given)
        init = settings["init_from"]
        if init is not None:
            for k in ("tokenizer", "config", "vocab_size", "cased"):
                if k in given:
                    raise ValueError(f"--init-from takes the tokenizer and config of {init}; "
                                     f"do not pass --{k.replace('_', '-')}")
            for f in ("config.json", "model.safetensors", "tokenizer.json"):
                if not os.path.isfile(os.path.join(init, f)):
                    raise FileNotFoundError(f"--init-from {init}: no {f} there (expected a model folder "
                                            f"written by fastbert pretrain or save_pretrained)")
            settings["tokenizer"] = settings["config"] = init
    return settings


def _build_config(s: dict, vocab_size: int, pad_id: int):
    """The run's model config; its pad_token_id (the embeddings' padding_idx: a row kept at zero
    with no gradient) is the tokenizer's [PAD], whatever id that has."""
    from .config import SIZES, BertConfig
    spec = s["config"]
    if spec in SIZES:
        config = BertConfig.from_size(spec, vocab_size=vocab_size, pad_token_id=pad_id)
    elif os.path.isfile(spec) or os.path.isdir(spec):
        config = BertConfig.from_pretrained(spec)
        if config.vocab_size < vocab_size:
            raise ValueError(f"config {spec} has vocab_size {config.vocab_size}, smaller than the "
                             f"tokenizer's {vocab_size} tokens")
        if config.pad_token_id != pad_id:
            raise ValueError(f"config {spec} has pad_token_id {config.pad_token_id}, but the tokenizer's "
                             f"[PAD] is id {pad_id}: the model would keep another token's embedding at zero")
    else:
        raise ValueError(f"--config {spec!r} is neither a size name ({', '.join(SIZES)}) nor a config.json")
    if s["seq_len"] > config.max_position_embeddings:
        raise ValueError(f"--seq-len {s['seq_len']} is above the model's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    if s["dropout"] is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = float(s["dropout"])
    return config


MAX_VOCAB = 1 << 20


def _check_settings(s: dict, dist: T.Distributed) -> None:
    """Every setting checked before run_args.json is written (a resumed run would be stuck with it)."""
    for k in ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "save_every", "keep_checkpoints"):
        if s[k] is not None and int(s[k]) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be at least 1, got {s[k]}")
    # 0: no warm-up / evaluate at the end / no held-out evaluation / no decay / no clipping.
    # `not 0 <= x < inf` also refuses NaN.
    for k in ("warmup_steps", "eval_every", "eval_examples", "weight_decay", "max_grad_norm", "lr"):
        if s[k] is not None and not 0 <= s[k] < math.inf:
            raise ValueError(f"--{k.replace('_', '-')} must be a finite number at least 0, got {s[k]}")
    if s["vocab_size"] < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"--vocab-size must hold the {len(SPECIAL_TOKENS)} special tokens and more, got {s['vocab_size']}")
    if s["vocab_size"] > MAX_VOCAB:  # the tokenizers trainer allocates for it up front: 1e9 aborted the process
        raise ValueError(f"--vocab-size {s['vocab_size']} is above {MAX_VOCAB:,} (BERT's vocabularies hold 21k-120k)")
    if not 0 <= s["short_seq_prob"] <= 1:
        raise ValueError(f"--short-seq-prob must be in [0, 1], got {s['short_seq_prob']}")
    if not 0 <= s["eval_fraction"] < 1:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {s['eval_fraction']}")
    if s["seq_len"] < 8:
        raise ValueError(f"--seq-len {s['seq_len']} is too short (at least 8)")
    if s["max_example_len"] is not None and not 8 <= s["max_example_len"] <= s["seq_len"]:
        raise ValueError(f"--max-example-len must lie in [8, --seq-len {s['seq_len']}], got {s['max_example_len']}")
    if not 0 < s["mask_prob"] < 1:
        raise ValueError(f"--mask-prob must be in (0, 1), got {s['mask_prob']}")
    if s["dropout"] is not None and not 0 <= s["dropout"] < 1:  # the kernels' range: p = 1 zeroes every unit
        raise ValueError(f"--dropout must be in [0, 1), got {s['dropout']}")
    if s["batch_size"] % (dist.world_size * s["grad_accum"]):
        raise ValueError(f"--batch-size {s['batch_size']} must be a multiple of processes x --grad-accum "
                         f"= {dist.world_size} x {s['grad_accum']}")


def _graphs_on(args) -> bool:
    """--cuda-graphs on (the bare flag) / off; True / False from a caller's own namespace."""
    return getattr(args, "cuda_graphs", False) in (True, "on")


def _hash_corpus(paths, dist: T.Distributed) -> dict:
    """file_hashes, said first when it is a pass of its own worth waiting for (gigabytes)."""
    size = sum(os.path.getsize(p) for p in paths)
    if size > 256 << 20:
        _log(dist, f"hashing {size / 2**30:.1f} GiB of corpus files (the key of their cached vocabulary and "
                   f"tokenized shards)")
    return file_hashes(paths)


def _publish_model(checkpoint: str, out: str) -> None:
    """The checkpoint's model becomes the run folder's own (the step-0 model's note goes with it)."""
    for name in ("config.json", "model.safetensors"):
        T.atomic_copy(os.path.join(checkpoint, name), os.path.join(out, name))
    if os.path.exists(os.path.join(out, T.INITIAL_MODEL_FILE)):
        os.unlink(os.path.join(out, T.INITIAL_MODEL_FILE))


def _check_cuda_graphs(args, s: dict, dist: T.Distributed) -> None:
    why = None
    if s["pack"]:
        why = "does not run --pack: a packed row's example count changes the NSP shapes"
    elif s["grad_accum"] != 1:
        why = "needs --grad-accum 1 (one graph is one whole step)"
    elif s["precision"] == "fp16":
        why = "does not run fp16: GradScaler decides on the host whether a step is applied (use bf16)"
    elif args.compile or args.activation_checkpointing:
        why = "does not combine with --compile or --activation-checkpointing"
    elif dist.enabled:
        why = "runs one process (not under torchrun)"
    elif dist.device.type != "cuda":
        why = f"needs a CUDA device, not {dist.device}"
    if why:
        raise ValueError(f"--cuda-graphs {why}")


def _schedule_lrs(scheduler) -> list[float]:
    """Each group's learning rate of this step, as the schedule computes it: get_last_lr() would hand
    back the (fp32) device tensors a CUDA-graphed optimizer reads, and reading them is a host sync."""
    return [float(base) * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]


def _current_lr(scheduler) -> float:
    return _schedule_lrs(scheduler)[0]


class PretrainingLoss(torch.nn.Module):
    """Wraps BertForPreTraining so DDP sees one forward: returns (mlm_loss, nsp_loss, nsp_correct).
    The MLM head runs on the masked rows only."""

    def __init__(self, model, nsp: bool):
        super().__init__()
        self.model, self.nsp = model, nsp

    def forward(self, input_ids, attention_mask, token_type_ids, labels, next_sentence_label, position_ids=None):
        from .modeling import _mlm_rows
        # as BertForPreTraining does with labels: past its attention the last layer runs only the rows
        # the heads read (the masked ones, and each example's first token for NSP)
        rows = _mlm_rows(self.model.cls.predictions, labels, self.model.training, input_ids, None,
                         self.model.bert)
        out = self.model.bert(input_ids, attention_mask, token_type_ids, position_ids, **PLAIN_OUTPUTS, **rows)
        mlm = self.model.cls.predictions.masked_loss(out.last_hidden_state, labels)
        if not self.nsp:
            return mlm, None
        logits = self.model.cls.seq_relationship(out.pooler_output).float()  # (B, 2); packed (B, E, 2)
        # packed rows: labels (B, E), -100 in the empty slots (ignored)
        return mlm, F.cross_entropy(logits.reshape(-1, 2), next_sentence_label.reshape(-1))


def _ddp(loss_module, model, nsp: bool, device):
    """loss_module under DistributedDataParallel, told whether some trainable parameter gets no
    gradient (DDP then fails at the second step unless it looks for them): the NSP head without NSP,
    and cls.predictions.bias of an untied model (tie_word_embeddings=False), whose decoder adds its
    own bias as in transformers 5."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    unused = not nsp or not model.config.tie_word_embeddings
    return DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=unused)


@torch.no_grad()
def evaluate(model, examples, *, batch_size, device, pad_id, nsp, autocast) -> dict:
    """MLM accuracy/loss over the masked tokens and NSP accuracy/loss over held-out examples."""
    was_training = model.training
    model.eval()
    mlm_loss = mlm_correct = n_masked = 0.0
    nsp_loss = nsp_correct = n_seq = 0.0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        with autocast():
            out = model.bert(b["input_ids"], b["attention_mask"], b["token_type_ids"], **PLAIN_OUTPUTS)
            sel = b["labels"] != -100
            logits = model.cls.predictions(out.last_hidden_state[sel]).float()
            nsp_logits = model.cls.seq_relationship(out.pooler_output).float()
        targets = b["labels"][sel]
        mlm_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        mlm_correct += (logits.argmax(-1) == targets).sum().item()
        n_masked += targets.numel()
        if nsp:
            nsp_loss += F.cross_entropy(nsp_logits, b["next_sentence_label"], reduction="sum").item()
            nsp_correct += (nsp_logits.argmax(-1) == b["next_sentence_label"]).sum().item()
            n_seq += len(nsp_logits)
    model.train(was_training)
    row = {"eval_mlm_loss": mlm_loss / max(n_masked, 1), "mlm_accuracy": mlm_correct / max(n_masked, 1)}
    if nsp:
        row.update(eval_nsp_loss=nsp_loss / max(n_seq, 1), nsp_accuracy=nsp_correct / max(n_seq, 1))
    return row


def main(args) -> int:
    try:
        dist = T.setup_distributed(args.device)
    except ValueError as e:
        print(f"fastbert pretrain: error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, dist)
    except (CorpusError, TokenizerError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"fastbert pretrain: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"fastbert pretrain: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the training loop, or a second Ctrl-C inside it
        print("fastbert pretrain: interrupted (the last checkpoint, if any, is intact; --resume continues)",
              file=sys.stderr)
        return 130
    finally:
        dist.shutdown()


# The sha256 of each corpus file when the run started: --resume refuses files that changed since (its
# data position and held-out split would point at other documents, held-out ones perhaps trained on).
CORPUS_FILE = "corpus_sha256.json"


def _corpus_changed(out: str, hashes: dict) -> str | None:
    """Why a resumed run's corpus is not the one it started with (None: the same, or a run from before
    CORPUS_FILE was written)."""
    try:
        with open(os.path.join(out, CORPUS_FILE), encoding="utf-8") as f:
            started = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return f"{os.path.join(out, CORPUS_FILE)}: unreadable ({e})"
    for path, digest in hashes.items():
        if started.get(path) != digest:
            return (f"corpus file {path!r} is not the one this run started with (its sha256 differs from "
                    f"{CORPUS_FILE}): the run's data position and held-out split would point at other documents; "
                    f"restore the file, or start a new run (--init-from {out} keeps the weights)")
    return None


def _check_folder_arg(flag: str, path: str) -> None:
    """`path` is, or can be made, a folder: not a file, and not under one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file; give a folder (it is made if missing)")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, so no folder can be made there")


def _run(args, dist: T.Distributed) -> int:
    # ---- the run folder and its settings -----------------------------------------------------
    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR (the run to continue)")
    out = args.out or dist.broadcast(os.path.join("runs", time.strftime("pretrain-%Y%m%d-%H%M%S")))
    _check_folder_arg("--out", out)  # before a vocabulary is trained and a corpus tokenized, not after
    if args.cache_dir:
        _check_folder_arg("--cache-dir", args.cache_dir)
    ckpts = T.CheckpointManager(out)  # its keep count is the run's, known once run_args.json is read
    stored = None
    is_run = os.path.isdir(out) and (os.path.exists(os.path.join(out, "run_args.json")) or ckpts.latest() is not None)
    if is_run and not args.resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
    weights = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(out, n))]
    if weights and not is_run:
        # a model this command did not write (a checkpoint to start from, a fine-tuned model): never
        # overwritten, --resume or not. A config.json alone is fine: `--config DIR --out DIR` reads it.
        raise FileExistsError(f"{out} holds a model ({weights[0]}) that is not a pretraining run; "
                              f"choose another --out")
    if args.resume and not is_run:  # API.md: --resume starts from the start when there is no run
        _log(dist, f"{out} holds no run to resume (no run_args.json, no checkpoint): starting a new one")
    if args.resume and os.path.isfile(os.path.join(out, "run_args.json")):
        with open(os.path.join(out, "run_args.json")) as f:
            stored = json.load(f)
    s = _resolve_settings(args, stored, dist)
    _check_settings(s, dist)
    ckpts.keep = s["keep_checkpoints"]
    if _graphs_on(args):
        _check_cuda_graphs(args, s, dist)
    latest = ckpts.latest() if args.resume else None
    resume_state = T.load_state(os.path.join(latest, T.STATE_FILE)) if latest else None
    if resume_state is not None and resume_state["step"] >= s["steps"]:
        if dist.is_main:  # a stop between publishing the last checkpoint and copying its model up left it stale
            _publish_model(latest, out)
        _log(dist, f"{out} is finished (step {resume_state['step']} of {s['steps']}); nothing to do")
        return 0

    nsp = not s["no_nsp"]
    corpus_paths = s["corpus"] or [sample_corpus_path()]
    seen = {}
    for p in corpus_paths:
        if os.path.isdir(p):
            raise CorpusError(f"corpus {p!r} is a folder; give the text files themselves (--corpus repeats)")
        if not os.path.isfile(p):
            hint = (" (run_args.json keeps the path as given when the run started: --resume from the folder "
                    "it started in)" if stored is not None and not os.path.isabs(p) else "")
            raise CorpusError(f"corpus file {p!r} does not exist{hint}")
        real = os.path.realpath(p)
        if real in seen:  # its documents twice: copies of held-out documents would be trained on
            raise CorpusError(f"corpus file {p!r} is given twice" + (f" (as {seen[real]!r})" if seen[real] != p else ""))
        seen[real] = p

    # ---- tokenizer (the first process builds it; the others load what it saved) ---------------
    tok_dir = out if (stored is not None and os.path.isfile(os.path.join(out, "tokenizer.json"))) else None
    hashes = None  # the corpus files' sha256, read once for the vocabulary cache and the shard cache
    if tok_dir:
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = None
        if dist.is_main:
            counted = {"n": 0}

            def sentences():
                for line in iter_sentences(corpus_paths):
                    counted["n"] += 1
                    yield line
            spec = s["tokenizer"]
            trained = spec in ("wordpiece", "chinese")
            if not trained:  # a loaded vocabulary has its size; a tokenizer.json also its normaliser
                loads_json = spec.endswith(".json") or os.path.isfile(os.path.join(spec, "tokenizer.json"))
                ignored = [flag for flag, given in (("--vocab-size", args.vocab_size is not None),
                                                    ("--cased", bool(args.cased) and loads_json)) if given]
                if ignored:
                    _log(dist, f"warning: {' and '.join(ignored)} ignored: the vocabulary is loaded from {spec}")
            if trained:
                hashes = _hash_corpus(corpus_paths, dist)
            cached = (trained_vocab_path(corpus_paths, spec, s["vocab_size"], not s["cased"], args.cache_dir,
                                         hashes) if trained else None)
            if cached and os.path.isfile(cached):
                tokenizer = load_tokenizer(cached)
                _log(dist, f"vocabulary: the one trained on these corpus files with these settings before ({cached})")
            else:
                try:
                    # a loaded vocab.txt keeps its own tokenizer_config.json's do_lower_case unless
                    # --cased says otherwise (the setting's default, False, would lower-case a cased one)
                    lowercase = not s["cased"] if trained else (False if s["cased"] else None)
                    if trained:  # one pass over the corpus with no output of its own: minutes on gigabytes
                        _log(dist, f"training a {spec} vocabulary of {s['vocab_size']} tokens on "
                                   f"{', '.join(corpus_paths)} (one pass; kept for later runs of these files)")
                    tokenizer = build_tokenizer(None if spec == "wordpiece" else spec, sentences(),
                                                vocab_size=s["vocab_size"], lowercase=lowercase)
                except TokenizerError:
                    if trained and counted["n"] == 0:
                        raise CorpusError(f"the corpus ({', '.join(corpus_paths)}) is empty") from None
                    raise
                if cached:  # later runs of the same corpus reuse it (and its tokenized shards)
                    os.makedirs(os.path.dirname(cached), exist_ok=True)
                    T.atomic_write_text(cached, tokenizer.to_str())
            vocab_list(tokenizer)  # a vocab.txt with a repeated token: refused now, not after tokenizing the corpus
        tok_json = dist.broadcast(tokenizer.to_str() if dist.is_main else None)
        if not dist.is_main:
            from tokenizers import Tokenizer
            tokenizer = Tokenizer.from_str(tok_json)

    config = _build_config(s, tokenizer.get_vocab_size(), tokenizer.token_to_id(PAD))

    # ---- corpus shards (the first process writes the cache, the others read it) ---------------
    changed = None
    if dist.is_main:
        hashes = hashes or _hash_corpus(corpus_paths, dist)  # the shard cache's keys need them anyway
        changed = _corpus_changed(out, hashes) if stored is not None else None
    changed = dist.broadcast(changed)
    if changed:  # every process stops alike
        raise CorpusError(changed)
    if dist.is_main:
        corpus = tokenize_corpus(corpus_paths, tokenizer, args.cache_dir, log=lambda m: _log(dist, m), hashes=hashes)
    dist.barrier()
    if not dist.is_main:
        corpus = tokenize_corpus(corpus_paths, tokenizer, args.cache_dir)
    train_docs, eval_docs = split_documents(corpus.num_documents, s["eval_fraction"], s["seed"])
    common = dict(seq_len=s["seq_len"], mask_prob=s["mask_prob"], nsp=nsp, whole_word_mask=s["whole_word_mask"],
                  short_seq_prob=s["short_seq_prob"], max_example_len=s["max_example_len"])
    pack = bool(s["pack"])
    train_data = PretrainingData(corpus, tokenizer, train_docs, seed=s["seed"], pack=pack, **common)
    n_epoch0 = len(train_data.epoch(0))  # raises CorpusError early for a corpus too small for NSP
    if nsp:  # a one-sentence chunk must take a random B (as BERT's script): short --seq-len skews NSP far from 50/50
        inst0 = train_data.epoch(0)
        _log(dist, f"NSP: {float(inst0.nsp_labels.mean()):.1%} of epoch 0's pairs have a random B "
                   f"({inst0.forced_random / max(n_epoch0, 1):.1%} forced: chunks of one sentence)")
    eval_examples = []
    if len(eval_docs) >= (2 if nsp else 1):
        eval_examples = PretrainingData(corpus, tokenizer, eval_docs, seed=s["seed"], **common).eval_examples(
            s["eval_examples"])
    _log(dist, f"corpus: {R.count(corpus.num_documents, 'document')}, {R.count(corpus.num_tokens, 'token')}; "
               f"{R.count(len(train_docs), 'training document')} ({n_epoch0:,} examples per epoch), "
               f"{len(eval_docs):,} held out ({R.count(len(eval_examples), 'evaluation example')})")
    unk_share = corpus.token_share(tokenizer.token_to_id(UNK))
    if unk_share > 0.05:  # [UNK] is never masked: such a corpus teaches little, and none at all when all [UNK]
        _log(dist, f"warning: {unk_share:.0%} of the corpus' tokens are [UNK] (not in the vocabulary; never masked); "
                   f"is --tokenizer right for this text (Chinese: --tokenizer chinese)?")
    if pack:
        inst0, rows0 = train_data.epoch(0), train_data.rows(0)
        _log(dist, f"packing: {len(rows0)} rows of {s['seq_len']} per epoch ({n_epoch0 / len(rows0):.2f} examples "
                   f"per row), {int(inst0.offsets[-1]) / (len(rows0) * s['seq_len']):.1%} real tokens "
                   f"(unpacked {int(inst0.offsets[-1]) / (n_epoch0 * s['seq_len']):.1%})")

    # ---- the run folder (written only now that every input checked out) ----------------------
    if dist.is_main:
        os.makedirs(out, exist_ok=True)
        ckpts.clean_partial()
        if stored is None:
            save_tokenizer(tokenizer, out, model_max_length=config.max_position_embeddings)
            T.atomic_write_json(os.path.join(out, CORPUS_FILE), hashes)
            T.atomic_write_json(os.path.join(out, "run_args.json"), s)
    dist.barrier()

    # ---- model, optimizer, schedule -----------------------------------------------------------
    from .modeling import BertForPreTraining
    from .optim import build_optimizer, optimizer_step, warmup_linear_schedule
    device = dist.device
    torch.manual_seed(s["seed"])
    if latest:
        model = BertForPreTraining.from_pretrained(latest)
        _log(dist, f"resuming from {latest} (step {resume_state['step']})")
    elif s["init_from"] is not None:
        model = BertForPreTraining.from_pretrained(s["init_from"])
        _log(dist, f"starting from the weights of {s['init_from']}")
    else:
        model = BertForPreTraining(config)
    if s["dropout"] is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = float(s["dropout"])
        # and in the config it saves (--init-from's model came with its own folder's dropout)
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = float(s["dropout"])
    model.to(device).train()
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    lr = s["lr"] if s["lr"] is not None else SIZE_LR.get(s["config"], 1e-4)
    steps = s["steps"]
    warmup = s["warmup_steps"] if s["warmup_steps"] is not None else max(1, steps // 10)
    graphs = _graphs_on(args)
    optimizer = build_optimizer(model, lr=lr, weight_decay=s["weight_decay"], capturable=graphs)
    scheduler = warmup_linear_schedule(optimizer, warmup, steps)

    precision = s["precision"]
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    loss_module = PretrainingLoss(model, nsp)
    if args.compile:
        loss_module = torch.compile(loss_module)
    if dist.enabled:
        loss_module = _ddp(loss_module, model, nsp, device)

    # ---- state --------------------------------------------------------------------------------
    step, position = 0, (0, 0)
    acc = {"mlm": 0.0, "nsp": 0.0, "n": 0}
    if resume_state is not None:
        step = int(resume_state["step"])
        position = (int(resume_state["epoch"]), int(resume_state["index"]))
        optimizer.load_state_dict(resume_state["optimizer"])
        for group in optimizer.param_groups:  # the saved groups' flags win in load_state_dict: this run's apply
            group["capturable"] = graphs
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler is not None and "scaler" in resume_state:
            scaler.load_state_dict(resume_state["scaler"])
        acc = dict(resume_state["log_acc"])
        rngs = resume_state["rng"]
        if len(rngs) != dist.world_size:
            _log(dist, f"warning: the checkpoint has {len(rngs)} processes' RNG states, this run "
                       f"{dist.world_size}; dropout draws will differ from an uninterrupted run")
        T.set_rng_state(rngs[dist.rank % len(rngs)])
    else:
        torch.manual_seed(s["seed"] + 1 + dist.rank)  # dropout: a different stream per process
    metrics = T.MetricsLog(os.path.join(out, "metrics.jsonl"), enabled=dist.is_main)
    metrics.truncate_after(step)

    save_every = s["save_every"] or max(1, steps // 4)
    eval_every = s["eval_every"] if s["eval_every"] is not None else max(1, steps // 10)
    log_every = max(1, s["log_every"])
    global_batch = s["batch_size"]
    per_rank = global_batch // dist.world_size
    micro = per_rank // s["grad_accum"]
    pad_id = train_data.ids["pad"]
    pad_to = s["seq_len"] if s["pad_to"] == "max" or graphs else None  # (a graph has one shape: pad now, pinned)
    params = [p for p in model.parameters() if p.requires_grad]

    _log(dist, f"model: {s['config']} ({n_params / 1e6:.2f} M parameters), seq {s['seq_len']}, global batch "
               f"{global_batch} ({R.count(dist.world_size, 'process', 'processes')} x "
               f"{R.count(s['grad_accum'], 'micro-batch')} of {micro}), "
               f"{R.count(steps, 'step')}, lr {lr:g}, {precision} on {device}; run folder {out}")

    def save(step_now: int) -> None:
        rngs = dist.gather(T.rng_state())
        if not dist.is_main:
            dist.barrier()
            return
        # a graphed run's learning rates are fp32 device tensors: store the schedule's numbers
        lrs = _schedule_lrs(scheduler)
        opt_state = optimizer.state_dict()
        for group, lr_now in zip(opt_state["param_groups"], lrs):
            group["lr"] = lr_now
        sched_state = scheduler.state_dict()
        sched_state["_last_lr"] = lrs
        state = {"step": step_now, "epoch": position[0], "index": position[1],
                 "optimizer": opt_state, "scheduler": sched_state,
                 "log_acc": dict(acc), "rng": rngs, "world_size": dist.world_size}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()

        def write(folder):
            model.save_pretrained(folder)
            for name in TOKENIZER_FILES:
                T.atomic_copy(os.path.join(out, name), os.path.join(folder, name))
            T.save_state(os.path.join(folder, T.STATE_FILE), state)
        _publish_model(ckpts.save(step_now, write), out)
        T.plot_metrics(metrics.path, os.path.join(out, "loss_curve.png"),
                       title=f"fastbert pretrain: {s['config']}, {os.path.basename(os.path.abspath(out))}")
        dist.barrier()

    if step == 0 and resume_state is None and dist.is_main:
        # the run folder holds a loadable model from the first moment on; the note says what it is
        # until the first checkpoint replaces it (finetune and encode warn while it is there)
        model.save_pretrained(out)
        T.atomic_write_json(os.path.join(out, T.INITIAL_MODEL_FILE), {"init_from": s["init_from"]})

    def prepare(at: tuple[int, int]) -> _StepBatches:
        """The batches of the step that starts at data position ``at`` (host tensors)."""
        if pack:
            items, next_at = train_data.take_rows(at, global_batch)
            examples = [e for row in items for e in row]
        else:
            items, next_at = train_data.take(at, global_batch)
            examples = items
        n_masked_total = float(sum(int((e["labels"] != -100).sum()) for e in examples))
        mine = items[dist.rank * per_rank:(dist.rank + 1) * per_rank]
        micro_batches = []
        for k in range(s["grad_accum"]):
            chunk = mine[k * micro:(k + 1) * micro]
            batch = (collate_packed if pack else collate)(chunk, pad_id, pad_to)
            # counted here, on the host tensors: the same figures read from the device would each be a sync
            counts = (float((batch["labels"] != -100).sum()), sum(len(row) for row in chunk) if pack else len(chunk),
                      int((batch["attention_mask"] != 0).sum()))
            if pin:
                batch = {key: v.pin_memory() for key, v in batch.items()}  # lets the copy to the GPU run async
            micro_batches.append((batch, *counts))
        return _StepBatches(micro_batches, n_masked_total, len(examples), next_at)

    # The loop leaves the host ahead of the device: the step's losses stay on the device (summed there,
    # over processes too) and are read back only for a metrics row or a checkpoint, so a GPU step costs
    # no host sync of its own (the model's input check and layout stats remain, at the step's start),
    # and the next step's batches are built while this one runs (--prefetch).
    pin = device.type == "cuda"
    # The MLM head runs on a fixed K rows, as in a CUDA graph, instead of finding the masked rows with
    # nonzero(): that sync came mid-step, after the encoder, where the host lost all its lead on the
    # device. fastbert's masking labels at most round(mask_prob * n) + 1 of a row's tokens, and the
    # host counts each micro-batch's (a batch over K takes the exact path); packed rows hold several
    # examples' worth, so they keep nonzero(). The mean loss is the same; K - M padding rows add ~0.2%.
    max_masked = None if pack else micro * (round(s["mask_prob"] * s["seq_len"]) + 1)
    mlm_head = model.cls.predictions
    graphed = None
    if graphs:
        from .cuda_graphs import GraphedTrainStep

        def graph_losses(m, b):  # PretrainingLoss's terms: the graph trains on their sum, returns each
            terms = PretrainingLoss(m, nsp)(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"],
                                            b["next_sentence_label"])
            return [t for t in terms if t is not None]
        # the MLM head runs on max_masked rows in the graph (GraphedTrainStep checks every batch against it)
        graphed = GraphedTrainStep(model, optimizer, batch_size=micro, seq_buckets=(s["seq_len"],),
                                   max_grad_norm=s["max_grad_norm"], autocast_dtype=amp_dtype,
                                   max_masked_rows=max_masked,
                                   loss_fn=graph_losses)
    prefetch = T.Prefetcher(prepare, enabled=args.prefetch == "on" or (args.prefetch == "auto" and device.type == "cuda"),
                            device=device)
    losses = torch.tensor([acc["mlm"], acc["nsp"]], dtype=torch.float64, device=device)  # Σ since the last row
    n_logged, tokens_since, time_since = acc["n"], 0.0, 0.0
    bar = T.progress_bar(steps, step, enabled=dist.is_main and not args.no_progress)
    stop, stopped = T.StopSignals(), None
    with stop, contextlib.closing(prefetch):
        while step < steps:
            t0 = time.perf_counter()
            prepared = prefetch.get(position)
            lr_now = _current_lr(scheduler)  # this step's, before the schedule advances
            if graphed is not None:
                cpu_batch, _, _, real_tokens = prepared.micro_batches[0]
                # forward, backward, clipping and AdamW: one replay (the batch is already padded to its shape)
                parts = graphed(cpu_batch).double()  # (mlm, nsp) or (mlm,)
                if step + 1 < steps:
                    prefetch.start(prepared.next_position)
                scheduler.step()  # fills the device-tensor learning rate the graph reads
                mlm_part = parts[0]
                nsp_part = parts[1] if nsp else torch.zeros((), dtype=torch.float64, device=device)
            else:
                mlm_part = nsp_part = torch.zeros((), dtype=torch.float64, device=device)
                real_tokens = 0
                for k, (cpu_batch, n_masked, n_pairs, n_real) in enumerate(prepared.micro_batches):
                    batch = {key: v.to(device, non_blocking=True) for key, v in cpu_batch.items()}
                    real_tokens += n_real
                    # Weights that make the summed gradient that of the mean over the whole global batch
                    # (MLM: over its masked tokens; NSP: over its sentence pairs); DDP divides by world_size.
                    # (a global batch with no maskable token, e.g. all [UNK]: its MLM loss is 0.0, by DESIGN)
                    mlm_share = n_masked / prepared.n_masked_total if prepared.n_masked_total else 0.0
                    w_mlm = mlm_share * dist.world_size
                    w_nsp = n_pairs / prepared.n_examples * dist.world_size
                    last = k == s["grad_accum"] - 1
                    sync = contextlib.nullcontext() if (last or not dist.enabled) else loss_module.no_sync()
                    mlm_head.static_rows = max_masked if max_masked is not None and n_masked <= max_masked else None
                    with sync:
                        with autocast():
                            mlm, nsp_loss = loss_module(batch["input_ids"], batch["attention_mask"],
                                                        batch["token_type_ids"], batch["labels"],
                                                        batch["next_sentence_label"], batch.get("position_ids"))
                        loss = mlm.float() * w_mlm
                        if nsp_loss is not None:
                            loss = loss + nsp_loss * w_nsp
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    mlm_part = mlm_part + mlm.detach().double() * mlm_share
                    if nsp_loss is not None:
                        nsp_part = nsp_part + nsp_loss.detach().double() * (n_pairs / prepared.n_examples)
                if step + 1 < steps:
                    prefetch.start(prepared.next_position)  # now: the backward is queued, little is left to launch
                optimizer_step(optimizer, scheduler, params, s["max_grad_norm"], scaler)
            losses += dist.all_reduce_(torch.stack([mlm_part, nsp_part]))
            step += 1
            n_logged += 1
            tokens_since += real_tokens
            position = prepared.next_position
            logging = step % log_every == 0 or step == steps or bool(eval_every and step % eval_every == 0)
            # SIGINT / SIGTERM: stop here with a checkpoint. Processes agree at metrics rows (a collective
            # every step would cost a sync); one process stops at the step the signal arrives in.
            if logging:  # one collective per metrics row: the stop vote and the row's token count
                votes, tokens = dist.sum_floats([float(stop.signal is not None), tokens_since])
            stopping = (logging and votes > 0) if dist.enabled else stop.signal is not None
            saving = step % save_every == 0 or step == steps or stopping
            if logging or saving:
                # The host waits for the device here, and only here: the losses since the last row and,
                # before a checkpoint, whether every weight is finite (the last update may have broken them).
                read = losses
                if saving:
                    finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
                    read = torch.cat([losses, finite.to(losses.dtype)[None]])
                read = read.tolist()
                mlm_sum, nsp_sum = read[:2]
                # (fp16: GradScaler skips the steps whose gradients overflow, so only the weights are checked)
                bad_loss = scaler is None and not math.isfinite(mlm_sum + nsp_sum)
                if bad_loss or (saving and read[2] != 1.0):
                    last_ckpt = ckpts.latest()
                    what = (f"non-finite training loss in steps {step - n_logged + 1}..{step}" if bad_loss
                            else f"non-finite weights after step {step}")
                    raise FloatingPointError(
                        f"{what}; stopped without writing a checkpoint ("
                        f"{'the last one, ' + last_ckpt + ', is intact' if last_ckpt else 'none written yet'}); "
                        f"a lower --lr or a longer --warmup-steps may help: in a new run (--resume keeps "
                        f"the run's own), or one that starts from the checkpoint with --init-from")
            time_since += time.perf_counter() - t0
            bar.update(1)

            if logging:
                tps = tokens / max(time_since, 1e-9)
                row = {"step": step, "loss": (mlm_sum + nsp_sum) / n_logged, "mlm_loss": mlm_sum / n_logged}
                if nsp:
                    row["nsp_loss"] = nsp_sum / n_logged
                row.update(lr=lr_now, tokens_per_s=round(tps, 1), epoch=position[0])
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                if eval_examples and ((eval_every and step % eval_every == 0) or step == steps) and dist.is_main:
                    row.update(evaluate(model, eval_examples, batch_size=max(micro, 32), device=device,
                                        pad_id=pad_id, nsp=nsp, autocast=autocast))
                metrics.write(row)
                losses.zero_()
                n_logged, tokens_since, time_since = 0, 0.0, 0.0
            if saving:
                acc = {"mlm": 0.0, "nsp": 0.0, "n": 0} if logging else {"mlm": mlm_sum, "nsp": nsp_sum, "n": n_logged}
                save(step)
            if stopping and step < steps:
                stopped = stop.signal or signal.SIGTERM  # (another process received it)
                break
    bar.close()
    mlm_head.__dict__.pop("static_rows", None)  # back to the class default (exact rows) for later users
    if stopped is not None:
        _log(dist, f"stopped by {stopped.name} at step {step} of {steps}: checkpoint {ckpts.latest()} written; "
                   f"`fastbert pretrain --out {out} --resume` continues the run")
        return 128 + stopped.value  # the shell's code for a process ended by that signal
    if dist.is_main:
        rows = T.read_metrics(metrics.path)
        last_eval = next((r for r in reversed(rows) if "mlm_accuracy" in r), None)
        summary = f"done: step {step}, mlm_loss {rows[-1]['mlm_loss']:.4f}" if rows else f"done: step {step}"
        if last_eval:
            summary += f", held-out MLM accuracy {last_eval['mlm_accuracy']:.3f}"
            if "nsp_accuracy" in last_eval:
                summary += f", NSP accuracy {last_eval['nsp_accuracy']:.3f}"
        _log(dist, f"{summary}; run folder {out}")
    return 0
