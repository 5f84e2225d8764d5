"""`fastbert encode`: sentence embeddings for lines of text.

    fastbert encode --model DIR [--input FILE] [--output FILE] [--pooling mean|cls] [--normalize]

Reads one text per line (stdin when --input is absent; the newline is stripped, everything else is
kept, and an empty line still gets an embedding, so row i always belongs to line i). Pooling:
``mean`` = the mean of the last hidden layer over real tokens ([CLS] and [SEP] included, as
sentence-transformers does), ``cls`` = the last hidden state of [CLS] (not the pooler's tanh output).
``--normalize`` divides each vector by its L2 norm. Output: a float32 ``.npy`` array (lines, hidden)
when --output ends in .npy, otherwise JSONL rows ``{"text", "embedding"}`` (stdout by default).
Texts longer than --max-length tokens (default: the model's maximum positions, at most 512) are
truncated, and the count is printed to stderr. ``--device`` / ``--precision`` as for `fastbert
finetune` (fastbert.runtime): default cuda when a GPU is visible, auto = bf16 autocast there; the
pooling itself and the output are always fp32.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import torch

from . import runtime as R
from . import tasks as T


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + weights + tokenizer)")
    p.add_argument("--input", help="text file, one text per line (default: stdin)")
    p.add_argument("--output", help="FILE.npy for a numpy array, any other name for JSONL (default: stdout)")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                   help="mean over real tokens (default) or the last hidden state of [CLS]")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    p.add_argument("--batch-size", type=int, default=64, help="default 64")
    p.add_argument("--max-length", type=int, default=None,
                   help="longer texts are truncated (default: the model's positions, at most 512)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: replay each batch as a CUDA graph (one per length bucket of 32 tokens; "
                        "fastest for small batches, whose eager run is bound by the host)")
    R.add_device_arguments(p, training=False)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean",
         normalize: bool = False) -> torch.Tensor:
    """(B, H) fp32 sentence vectors from the last hidden layer (B, S, H): the mean over real tokens, or
    [CLS]'s state; optionally L2-normalised. A row without real tokens (a padding row) gives zeros."""
    h = hidden.float()
    if pooling == "cls":
        v = h[:, 0]
    else:
        m = attention_mask.unsqueeze(-1).float()  # (B, S, 1)
        v = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(v, dim=-1) if normalize else v


def length_buckets(max_length: int, step: int = 32) -> tuple:
    """Sequence-length buckets of the CUDA graphs: every `step` tokens up to max_length."""
    return tuple(range(step, max_length, step)) + (max_length,)


def read_lines(path: str | None) -> list[str]:
    """The texts of a file (stdin when path is None), one per line: split at "\\n" only (a bare "\\r"
    inside a line stays there, so row i is line i as `wc -l` counts them), the line break ("\\n" or
    "\\r\\n") stripped, a UTF-8 byte-order mark at the start dropped."""
    if path is not None:
        with open(path, encoding="utf-8-sig", newline="\n") as f:
            return [line.rstrip("\r\n") for line in f]
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (e.g. io.StringIO in tests)
        return [line.rstrip("\r\n") for line in sys.stdin]
    stream = io.TextIOWrapper(buffer, encoding="utf-8-sig", newline="\n")
    try:
        return [line.rstrip("\r\n") for line in stream]
    finally:
        stream.detach()  # leave sys.stdin's buffer open


def embed(model, tok, texts, pooling="mean", normalize=False, batch_size=64, max_length=512,
          device=None, precision="fp32", cuda_graphs=False, progress=False):
    """(len(texts), hidden) float32 embeddings; batches are length-sorted and padded per batch.
    The model must already be on `device` (default: the CPU). cuda_graphs: replay each batch as a
    CUDA graph (fastbert.cuda_graphs.GraphedEncoder; the padded layout, one graph per 32-token bucket).
    progress: a tqdm bar on stderr counting texts."""
    device = torch.device("cpu") if device is None else torch.device(device)
    feats, info = T.build_features("classify", [{"text": t} for t in texts], tok, max_length)
    out = torch.empty(len(texts), model.config.hidden_size)
    model.eval()
    graphed = None
    if cuda_graphs:
        from .cuda_graphs import GraphedEncoder
        graphed = GraphedEncoder(model, batch_size=batch_size, seq_buckets=length_buckets(max_length),
                                 pooling=pooling, normalize=normalize, autocast_dtype=R.autocast_dtype(precision))
    from tqdm.auto import tqdm
    bar = tqdm(total=len(texts), unit="text", desc="encode", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), bar:
        for idx in T.bucket_batches([T.length_of(f) for f in feats], batch_size, shuffle=False):
            bar.update(len(idx))  # counted as the batch starts (the device runs ahead of the host)
            b = T.collate([feats[i] for i in idx])
            if graphed is not None:  # CPU tensors: padded to the bucket there, then one copy each
                out[idx] = graphed(b["input_ids"], b["attention_mask"], b["token_type_ids"]).cpu()
                continue
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            with R.autocast(precision, device):
                h = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], **R.PLAIN_OUTPUTS).last_hidden_state
            out[idx] = pool(h, b["attention_mask"], pooling, normalize).cpu()
    return out.numpy(), info["truncated"]


def _check_output(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--output {path}: is a folder (give a file name: FILE.npy or FILE.jsonl)")
    if not os.path.isdir(folder):
        raise ValueError(f"--output {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"--output {path}: cannot write there (permission denied)")


def main(args) -> int:
    from .modeling import BertModel
    try:
        device = R.resolve_device(args.device)
        precision = R.resolve_precision(args.precision, device)
        if args.cuda_graphs and device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA device, not {device}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, not {args.batch_size}")
        if args.output:  # checked before the work, not found after it
            _check_output(args.output)
        model = BertModel.from_pretrained(args.model).to(device)
        tok = T.load_tokenizer(args.model)
        positions = model.config.max_position_embeddings
        if args.max_length is not None and args.max_length > positions:  # as `fastbert finetune` does
            print(f"fastbert encode: --max-length {args.max_length} is above the model's {positions} positions; "
                  f"using {positions}", file=sys.stderr)
            args.max_length = positions
        if args.max_length is not None and args.max_length < 8:
            raise ValueError(f"--max-length {args.max_length} is too small (at least 8)")
    except (FileNotFoundError, ValueError) as e:
        print(f"fastbert encode: error: {e}", file=sys.stderr)
        return 2
    max_length = args.max_length or min(512, model.config.max_position_embeddings)
    try:
        texts = read_lines(args.input)
    except (OSError, UnicodeDecodeError) as e:
        why = f"not UTF-8 text ({e.reason} at byte {e.start})" if isinstance(e, UnicodeDecodeError) else e.strerror or e
        print(f"fastbert encode: error: {args.input or 'stdin'}: {why}", file=sys.stderr)
        return 2
    if not texts:
        print("fastbert encode: error: no input lines", file=sys.stderr)
        return 2
    emb, n_trunc = embed(model, tok, texts, args.pooling, args.normalize, args.batch_size, max_length,
                         device, precision, cuda_graphs=args.cuda_graphs, progress=not args.no_progress)
    if n_trunc:
        print(f"fastbert encode: {n_trunc} of {len(texts)} texts truncated to {max_length} tokens",
              file=sys.stderr)
    if args.output and args.output.endswith(".npy"):
        import numpy as np
        np.save(args.output, emb.astype("float32"))
        return 0
    f = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for t, v in zip(texts, emb):
            f.write(json.dumps({"text": t, "embedding": [round(float(x), 6) for x in v]},
                               ensure_ascii=False) + "\n")
        if f is sys.stdout:
            f.flush()
    except BrokenPipeError:  # `fastbert encode ... | head`: the reader has gone; no traceback
        if f is sys.stdout:  # and none from the interpreter's own flush of stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if f is not sys.stdout:
            f.close()
    return 0
