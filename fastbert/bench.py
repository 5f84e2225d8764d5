"""Model-level benchmark: one training step of fastbert beside transformers, in one process.

Cases
  pretrain   BertForPreTraining, MLM (15% of real tokens labelled) + NSP, AdamW; every row full length.
  finetune   BertForSequenceClassification on batches drawn from the real length distribution of
             sentiment_en (fastbert/data/sentiment_en_lengths.json), padded to the batch's longest row.
Competitors (same weights, same batches): fastbert; transformers with eager attention; transformers
with SDPA; optionally (--compile) transformers SDPA + torch.compile and fastbert + torch.compile; and
for finetune, fastbert-padded: fastbert with padding run through the encoder (BertModel's unpad=False),
which shows what unpadding alone is worth on real lengths; for pretrain on the CPU,
transformers-sdpa-masked-head: transformers' own modules with the MLM head applied to the masked rows
only (MaskedHeadPretraining), the floor that foundation issue 2 names for its CPU goal.
Each row's median_ms is the median over the timed steps (p20/p80 beside it, `repeats` = their count).

Timing: every competitor first runs each batch shape once untimed, alone (caches, compilation,
CUDA-graph capture; its peak memory is taken there, less what the other resident models hold);
then the timed steps go round robin, step i of every competitor before step i + 1 of any.

Useful FLOPs (for MFU, DESIGN.md): only real tokens count, and the MLM head only on masked rows.
Per real token and layer, training (fwd + bwd = 3 x fwd) costs 6 * (4 D^2 + 2 D I) for the linear
layers plus 12 * L * D for attention scores and values (L = its sequence's length); the MLM head
costs 6 * (D^2 + D V) per masked row; pooler + classifiers are counted too (6 * D^2 per row). Nothing
reads the last layer's output at a token that is neither masked (pretraining) nor a row's first, so
there such a token counts only its key and value projections (6 * 2 D^2) and is no query (fine-tuning
a classifier: one read token per row).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import statistics
import sys
import time
import types
from importlib import resources

import torch
import torch.nn.functional as F

from . import runtime

SIZES = {
    # name: (hidden, layers, heads, intermediate)
    "cpu-small": (256, 4, 4, 1024),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
}


def length_distribution() -> list[int]:
    """Token lengths of sentiment_en's training texts (histogram shipped with the package)."""
    data = json.loads(resources.files("fastbert.data").joinpath("sentiment_en_lengths.json").read_text())
    return [int(k) for k, v in data["histogram"].items() for _ in range(v)]


def training_flops(hidden, layers, intermediate, vocab, lengths, masked_rows, batch_rows, read_rows=None) -> float:
    """lengths: each sequence's real tokens; read_rows: per sequence, how many of its tokens' last-layer
    outputs something reads (None: all). In the last layer an unread token keeps only its key and
    value projections, and only the read tokens are queries (12 D n_i per read token of a length-n_i
    sequence)."""
    tokens = sum(lengths)
    per_token = 6 * (4 * hidden * hidden + 2 * hidden * intermediate)
    per_layer_attention = 12 * hidden * sum(n * n for n in lengths)
    linear = per_token * tokens * layers
    attention = per_layer_attention * layers
    if read_rows is not None:
        if len(read_rows) != len(lengths) or any(not 0 <= r <= n for r, n in zip(read_rows, lengths)):
            raise ValueError(f"read_rows {read_rows} does not fit the sequence lengths {lengths}")
        unread = tokens - sum(read_rows)  # last layer: key and value projections only
        linear -= unread * (per_token - 6 * 2 * hidden * hidden)
        attention -= per_layer_attention - 12 * hidden * sum(n * r for n, r in zip(lengths, read_rows))
    mlm = 6 * (hidden * hidden + hidden * vocab) * masked_rows
    heads = 6 * hidden * hidden * batch_rows
    return float(linear + attention + mlm + heads)


def make_batches(case, n, batch, seq, vocab, seed, device):
    """n batches: (kwargs for the model, list of real lengths, masked rows)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    dist = length_distribution() if case == "finetune" else None
    out = []
    for _ in range(n):
        lengths = [seq] * batch if dist is None else [min(seq, rng.choice(dist)) for _ in range(batch)]
        width = max(lengths)
        ids = torch.randint(1000, vocab, (batch, width), generator=g)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        ids = ids * mask  # [PAD] = 0 at padding
        tt = torch.zeros_like(ids)
        kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        masked = 0
        if case == "pretrain":
            labels = torch.full_like(ids, -100)
            pick = (torch.rand(ids.shape, generator=g) < 0.15) & mask.bool()
            labels[pick] = ids[pick]
            masked = int(pick.sum())
            tt[:, width // 2:] = 1
            kw.update(labels=labels, next_sentence_label=torch.randint(0, 2, (batch,), generator=g))
        else:
            kw.update(labels=torch.randint(0, 2, (batch,), generator=g))
        out.append(({k: v.to(device) for k, v in kw.items()}, lengths, masked))
    return out


class MaskedHeadPretraining(torch.nn.Module):
    """transformers' BertForPreTraining with its MLM head (transform, 30522-wide decoder, loss) applied
    to the masked rows only: transformers' own modules in fastbert's head structure, nothing else of
    fastbert's. The step returns the model's loss (MLM + NSP), as BertForPreTraining does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids, labels, next_sentence_label, **plain_outputs):
        # plain_outputs: the runtime.PLAIN_OUTPUTS that step() passes every competitor; this step
        # always asks for them itself
        out = self.model.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              **runtime.PLAIN_OUTPUTS)
        rows = (labels.flatten() != -100).nonzero().squeeze(1)  # (M,)
        h = out.last_hidden_state.flatten(0, 1).index_select(0, rows)  # (M, D)
        logits = self.model.cls.predictions(h)  # (M, V)
        mlm = F.cross_entropy(logits, labels.flatten().index_select(0, rows))
        nsp = F.cross_entropy(self.model.cls.seq_relationship(out.pooler_output), next_sentence_label)
        return types.SimpleNamespace(loss=mlm + nsp)


@contextlib.contextmanager
def copies_unfused():
    """fastbert's model as it ran before two copy removals, for an A/B in one run: autocast casts the
    residual stream for each matmul (no K.add_layer_norm(low_dtype=) copy), and attention takes q/k/v
    views of the fused projection (unbind's stack / permute copies) instead of the qkv-packed ops."""
    import fastbert.kernels as K

    from . import modeling

    def attention_qkvpacked(qkv, key_padding_mask=None, **kw):  # (B, S, 3, H, D) -> (B, S, H, D)
        return K.attention(*K.reference.split_qkv(qkv), key_padding_mask, **kw).transpose(1, 2)

    def varlen_attention_qkvpacked(qkv, cu_seqlens, max_seqlen, **kw):  # (T, 3, H, D) -> (T, H, D)
        return K.varlen_attention(*qkv.unbind(1), cu_seqlens, max_seqlen, **kw)

    saved = (modeling._matmul_copy_dtype, modeling.K.attention_qkvpacked, modeling.K.varlen_attention_qkvpacked)
    modeling._matmul_copy_dtype = lambda residual: None
    modeling.K.attention_qkvpacked, modeling.K.varlen_attention_qkvpacked = attention_qkvpacked, varlen_attention_qkvpacked
    try:
        yield
    finally:
        modeling._matmul_copy_dtype, modeling.K.attention_qkvpacked, modeling.K.varlen_attention_qkvpacked = saved


@contextlib.contextmanager
def changes_off(hidden_size: int):
    """fastbert's model with every kernel change made after the last GPU measurement (H100 run 9)
    turned off, for the total A/B in one run: the two copy removals (copies_unfused), the one-launch
    attention backward (the split dQ + dK/dV pair instead), the LayerNorm kernels' tiles (their
    one-row launches), the dense biases inside the add + LayerNorm kernels (back in the matmuls),
    mlm_loss's 128 MiB logits blocks (64 MiB) and the fused feed-forward block, were it turned on.
    Must cover the backward too: the attention's launch is chosen when it runs."""
    from . import modeling
    from .kernels import flash_attention, layer_norm, linear_cross_entropy

    one_row = {kind: list(layer_norm.one_row_config(hidden_size, kind))[:4 if kind.endswith("_bwd") else 2]
               for kind in layer_norm.LN_KINDS}  # a forward's override is [BLOCK_M, num_warps]
    chunk_bytes, fuse_dense_bias = linear_cross_entropy.CHUNK_BYTES, modeling._fuse_dense_bias
    fused_ffn = modeling.FUSED_FFN
    flash_attention.set_config_override({"fused": []})
    modeling.FUSED_FFN = False  # opt-in (FASTBERT_FUSED_FFN=1) and built after the last GPU run too
    layer_norm.set_ln_config_override(one_row)
    linear_cross_entropy.CHUNK_BYTES = 64 << 20
    modeling._fuse_dense_bias = lambda dense, residual: False
    try:
        with copies_unfused():
            yield
    finally:
        flash_attention.set_config_override(None)
        layer_norm.set_ln_config_override(None)
        linear_cross_entropy.CHUNK_BYTES, modeling._fuse_dense_bias = chunk_bytes, fuse_dense_bias
        modeling.FUSED_FFN = fused_ffn


@contextlib.contextmanager
def fused_ffn():
    """fastbert's model with the feed-forward block on K.feed_forward (GELU in the matmul epilogues;
    modeling.FUSED_FFN, off by default until measured): the fastbert-ffn competitor, for its A/B against
    the default fastbert in the same run. The choice is made in the forward; the backward follows it."""
    from . import modeling

    before, modeling.FUSED_FFN = modeling.FUSED_FFN, True
    try:
        yield
    finally:
        modeling.FUSED_FFN = before


def build_models(case, size, vocab, max_len, device, competitors, dtype_note=""):
    import transformers

    import fastbert
    hidden, layers, heads, inter = SIZES[size]
    cfg = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               intermediate_size=inter, max_position_embeddings=max(512, max_len))
    name = "BertForPreTraining" if case == "pretrain" else "BertForSequenceClassification"
    torch.manual_seed(0)
    ours = getattr(fastbert, name)(fastbert.BertConfig(**cfg))
    models = {}
    for comp in competitors:
        if comp.startswith("fastbert"):
            m = getattr(fastbert, name)(fastbert.BertConfig(**cfg))
            m.load_state_dict(ours.state_dict())
            if comp.startswith("fastbert-padded"):
                # the heads do not take unpad=, so the encoder's forward gets it bound (this instance only)
                m.bert.forward = functools.partial(m.bert.forward, unpad=False)
        else:
            attn = "eager" if "eager" in comp else "sdpa"
            hf_cfg = transformers.BertConfig(**cfg)
            hf_cfg._attn_implementation = attn  # read at construction by transformers 4.4x and 5.x
            m = getattr(transformers, name)(hf_cfg)
            if hasattr(m, "set_attn_implementation"):
                m.set_attn_implementation(attn)
            m.load_state_dict(ours.state_dict())
            if comp == "transformers-patched":  # the same transformers model after one fastbert.patch(model)
                fastbert.patch(m)
        m.to(device).train()
        step_model = torch.compile(m) if comp.endswith("compile") else m
        if comp.endswith("masked-head"):
            step_model = MaskedHeadPretraining(m)
        models[comp] = (m, step_model)
    return models, (hidden, layers, inter)


def run(case="pretrain", size="cpu-small", batch=16, seq=128, steps=5, warmup=2, vocab=30522, competitors=None,
        device=None, precision=None, seed=0, progress=True):
    """Median step time per competitor, with tokens/s, MFU (GPU, given a ceiling) and peak memory."""
    # "cuda:1" is a CUDA device as "cuda" is: synchronised around steps, bf16, its peak memory read
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)  # synchronize() and the memory statistics read the current device
    competitors = competitors or ["fastbert", "transformers-eager", "transformers-sdpa"]
    precision = precision or ("bf16" if cuda else "fp32")
    models, (hidden, layers, inter) = build_models(case, size, vocab, seq, device, competitors)
    batches = make_batches(case, steps + warmup, batch, seq, vocab, seed, device)
    # bf16: autocast for every competitor alike (on the CPU too: avx512_bf16 / AMX machines)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    results = {}
    # fused AdamW for everyone (one pass per tensor; CPU and CUDA): the optimizer is a cost every
    # competitor pays alike, so the cheapest one keeps the ratios about the models
    # (the CUDA-graph competitor's optimizer must also be capturable: its step counter lives on the GPU)
    opts = {c: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True, **({"capturable": True} if c == "fastbert-graphs"
                                                                         else {}))
            for c, (m, _) in models.items()}
    graphed = {}
    for comp, (m, _) in models.items():
        if comp == "fastbert-graphs":
            from .cuda_graphs import GraphedTrainStep
            # pretraining: the MLM head runs on a fixed K rows in the graph; K is the bound fastbert's
            # own masking guarantees (round(0.15 seq) + 1 per row), or more if these random batches need it
            k = (max(batch * (round(0.15 * seq) + 1), max(m_ for _, _, m_ in batches)) if case == "pretrain"
                 else None)
            graphed[comp] = GraphedTrainStep(
                m, opts[comp], batch_size=batch, seq_buckets=tuple(b for b in (32, 64, 96, 128, 256, 384, 512)
                                                                   if b < seq) + (seq,),
                autocast_dtype=torch.bfloat16 if precision == "bf16" else None, max_masked_rows=k)
    times = {c: [] for c in models}
    peak, failed = {}, {}

    def step(comp, kw):
        if comp in graphed:  # forward, backward and optimizer replayed as one CUDA graph
            graphed[comp](kw)
            return
        with (changes_off(hidden) if comp == "fastbert-before" else fused_ffn() if comp == "fastbert-ffn"
              else contextlib.nullcontext()):
            with autocast, (copies_unfused() if comp == "fastbert-unfused" else contextlib.nullcontext()):
                loss = models[comp][1](**kw, **runtime.PLAIN_OUTPUTS).loss
            loss.backward()
        opts[comp].step()
        opts[comp].zero_grad(set_to_none=True)

    # Phase 1, one competitor at a time, untimed: every batch shape once (allocator, cuBLAS, Triton
    # and compile caches, CUDA-graph capture), and its peak memory. Every model stays resident in
    # this process, so a peak counts only what this competitor holds: the memory in use before its
    # phase, less its own weights, is the others' and is subtracted.
    # On CUDA every batch is warmed for every competitor: a new masked-row count is a new shape for
    # the MLM head (Triton specialisation, cuBLAS heuristics), and whoever met it first in the timed
    # phase paid for all (suspected in run 5's own-class vs patched gap, benchmarks/profile_both.py).
    warm = (batches if cuda or case == "finetune" or any(c.endswith("compile") for c in models)
            else batches[:warmup])
    from tqdm.auto import tqdm
    bar = tqdm(total=len(models) * (len(warm) + len(batches) - warmup), unit="step", desc=f"bench {case}/{size}",
               disable=None if progress else True,  # None: shown on a terminal only (logs stay clean)
               dynamic_ncols=True, leave=False)
    for comp, (model, _) in models.items():
        bar.set_postfix_str(f"warm-up {comp}", refresh=False)
        own = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            others = torch.cuda.memory_allocated() - own
        done = 0
        try:
            for kw, _, _ in warm:
                step(comp, kw)
                done += 1
                bar.update(1)
        except Exception as exc:  # one failing competitor must not cost the others' rows
            failed[comp] = f"{type(exc).__name__}: {str(exc)[:300]}"
            bar.write(f"  {case}/{size} {comp}: FAILED {failed[comp]}", file=sys.stderr)
            bar.total -= len(warm) - done + len(batches) - warmup  # the steps it will not run
            continue
        if cuda:
            torch.cuda.synchronize()
            peak[comp] = (torch.cuda.max_memory_allocated() - others) / 2 ** 30
    # Phase 2, timed, round robin: step i of every competitor before step i + 1 of any, so that
    # clocks, temperature and the machine's other load drift alike for all; the order rotates each
    # round, so no competitor always runs first (right after another model's optimizer step).
    order = list(models)
    bar.set_postfix_str("timed, round robin", refresh=False)
    for i, (kw, _, _) in enumerate(batches[warmup:]):
        for comp in order[i % len(order):] + order[:i % len(order)]:
            if comp in failed:
                continue
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                step(comp, kw)
            except Exception as exc:
                failed[comp] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            if cuda:
                torch.cuda.synchronize()
            times[comp].append(time.perf_counter() - t0)
            bar.update(1)
    bar.close()
    if progress:
        for comp in models:
            if comp not in failed:
                print(f"  {case}/{size} {comp}: {statistics.median(times[comp]) * 1e3:.1f} ms/step", file=sys.stderr,
                      flush=True)
    measured = batches[warmup:]
    real_tokens = sum(sum(lengths) for _, lengths, _ in measured) / len(measured)
    def read_rows(kw, lengths):  # per row: the labelled tokens and its first (the pooler's)
        if case != "pretrain":
            return [1] * len(lengths)  # the classifier reads the pooler only
        labels = kw["labels"]
        first = torch.arange(labels.shape[1], device=labels.device) == 0
        return ((labels != -100) | first).sum(dim=1).tolist()

    flops = statistics.mean(training_flops(hidden, layers, inter, vocab, lengths, masked, batch,
                                           read_rows=read_rows(kw, lengths))
                            for kw, lengths, masked in measured)
    for comp in models:
        if comp in failed:
            results[comp] = {"case": case, "size": size, "impl": comp, "error": failed[comp]}
            continue
        med = statistics.median(times[comp])
        q = statistics.quantiles(times[comp], n=10, method="inclusive") if len(times[comp]) > 1 else [med] * 9
        results[comp] = {"case": case, "size": size, "impl": comp, "batch": batch, "seq": seq, "precision": precision,
                         "device": torch.cuda.get_device_name() if cuda else "cpu",
                         "median_ms": med * 1e3, "p20_ms": q[1] * 1e3, "p80_ms": q[7] * 1e3,
                         "min_ms": min(times[comp]) * 1e3, "repeats": len(times[comp]),
                         "real_tokens_per_s": real_tokens / med, "useful_tflops": flops / med / 1e12,
                         "peak_mem_gib": peak.get(comp)}
    base = results.get("transformers-sdpa")
    for r in results.values():
        if "median_ms" in r:
            r["speedup_vs_sdpa"] = base["median_ms"] / r["median_ms"] if base and "median_ms" in base else None
    return list(results.values())


def competitor_list(compile_: bool = False, case: str = "pretrain", device: str = "cpu") -> list[str]:
    """The competitors of a run; with compile_, torch.compile'd fastbert and transformers SDPA too;
    CUDA adds fastbert with the whole step as CUDA graphs (fastbert/cuda_graphs.py) and fastbert with
    its copy removals turned off (copies_unfused: their A/B, in the same run), fastbert with every
    change since the last GPU measurement turned off (changes_off) and fastbert with the feed-forward
    GELU in the matmul epilogues (fused_ffn)."""
    comps = ["fastbert", "transformers-eager", "transformers-sdpa"]
    if str(device).startswith("cuda"):
        comps += ["transformers-patched", "fastbert-graphs", "fastbert-unfused", "fastbert-before", "fastbert-ffn"]
    elif case == "pretrain":
        comps += ["transformers-sdpa-masked-head"]
    if compile_:
        comps += ["transformers-sdpa-compile", "fastbert-compile"]
    return comps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--case", choices=["pretrain", "finetune", "all"], default="all", help="default all")
    parser.add_argument("--size", choices=list(SIZES), default=None,
                        help="model size (default: cpu-small on the CPU, base on a GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 for pretrain, 32 for finetune")
    parser.add_argument("--seq-len", type=int, default=128, help="default 128")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per competitor (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd competitors")
    parser.add_argument("--padded", action="store_true",
                        help="finetune: add fastbert-padded (padding run through the encoder) beside unpadded fastbert")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", default=None, help="write the result rows to this file")
    runtime.add_malloc_argument(parser)


def main(args) -> int:
    # 0 is not "the default" (--batch-size 0 ran batches of 32), and no timed step has no median
    for name, least in (("batch_size", 1), ("seq_len", 1), ("steps", 1), ("warmup", 0)):
        value = getattr(args, name)
        if value is not None and value < least:
            print(f"fastbert bench: --{name.replace('_', '-')} must be at least {least}, not {value}", file=sys.stderr)
            return 2
    malloc = runtime.apply_malloc_flag(args.tuned_malloc)
    try:  # the same check and message as the other commands' --device
        device = runtime.resolve_device(args.device)
    except ValueError as e:
        print(f"fastbert bench: {e}", file=sys.stderr)
        return 2
    if args.json:  # found before the run, not after it: the file is opened (and its folder made) now
        existed = os.path.exists(args.json)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "a"):
                pass
        except OSError as e:
            print(f"fastbert bench: --json {args.json}: cannot write there ({e.strerror or e})", file=sys.stderr)
            return 2
        if not existed:
            os.unlink(args.json)
    size = args.size or ("base" if device.type == "cuda" else "cpu-small")
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("fastbert bench needs transformers (pip install 'fastbert[bench]')", file=sys.stderr)
        return 2
    rows = []
    cases = ["pretrain", "finetune"] if args.case == "all" else [args.case]
    for case in cases:
        batch = args.batch_size or (16 if case == "pretrain" else 32)
        comps = competitor_list(args.compile, case, device) + (["fastbert-padded"] if case == "finetune" and args.padded
                                                               else [])
        rows += run(case, size, batch, args.seq_len, args.steps, args.warmup, competitors=comps, device=device)
    for r in rows:
        r["malloc"] = malloc
    cols = ["case", "impl", "median_ms", "real_tokens_per_s", "speedup_vs_sdpa", "peak_mem_gib"]
    print(" | ".join(cols))
    for r in rows:
        cells = (r.get(c, r.get("error", "") if c == "median_ms" else "") for c in cols)
        print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells))
    if device.type == "cpu":
        # the CPU ratios depend on it: transformers' pretraining step re-faults ~250 MB of logits per step
        print("malloc: " + ("tuned for every competitor (fastbert.runtime.tune_cpu_allocator)" if malloc == "tuned" else
                            "glibc defaults for every competitor (--tuned-malloc: as the fastbert commands run)"))
    if args.json:  # as benchmarks/harness.py's Recorder writes: the machine names the card for compare.py
        try:
            with open(args.json, "w") as f:
                # no "name": compare.py then names the benchmark by the file, so runs of each --case kept
                # in files of their own are told apart
                json.dump({"machine": _machine(device), "rows": rows}, f, indent=1)
        except OSError as e:  # a full disk: the table above is the run's record
            print(f"fastbert bench: --json {args.json}: {e.strerror or e}", file=sys.stderr)
            return 1
    return 0


def _machine(device: torch.device) -> dict:
    """When and where the rows were measured: the date, versions, the CPU model and core count, and the
    GPU's name on a CUDA device (benchmarks.compare compares timings of one card only)."""
    import datetime
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "torch": torch.__version__, "cpu_model": runtime.cpu_model(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
