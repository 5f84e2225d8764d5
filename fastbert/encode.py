"""`fastbert encode`: sentence embeddings for lines of text.

    fastbert encode --model DIR [--input FILE] [--output FILE] [--pooling mean|cls] [--normalize]

Reads one text per line (stdin when --input is absent; the newline is stripped, everything else is
kept, and an empty line still gets an embedding, so row i always belongs to line i). Pooling:
``mean`` = the mean of the last hidden layer over real tokens ([CLS] and [SEP] included, as
sentence-transformers does), ``cls`` = the last hidden state of [CLS] (not the pooler's tanh output).
``--normalize`` divides each vector by its L2 norm (a sentence-transformers folder whose modules.json
lists a Normalize module is said to want it). Output: a float32 ``.npy`` array (lines, hidden) when --output
ends in .npy (any case), otherwise JSONL rows ``{"text", "embedding"}`` with values rounded to 6
decimals (stdout by default). Texts longer than --max-length tokens are truncated, and the count is
printed to stderr; the default is sentence-transformers' max_seq_length where the folder has its
sentence_bert_config.json (all-MiniLM-L6-v2: 256), else the model's positions, at most 512. On a
CUDA device batches of up to 256 run as CUDA graph replays (``--cuda-graphs``, default auto;
fastbert.runtime.GRAPHS_AUTO_MAX_BATCH). ``--device`` / ``--precision`` as for `fastbert finetune`
(fastbert.runtime): default cuda when a GPU is visible, auto = bf16 autocast there; the pooling
itself and the output are always fp32.

The input is read and encoded --chunk-size lines at a time (length-sorted batches within each chunk),
so memory does not grow with the input: JSONL rows are written, in input order, as each chunk is
done; a ``.npy`` is filled chunk by chunk in a temporary file beside the output (a file --input is
counted first for its row count; stdin or a pipe is first copied to an anonymous temporary file
there) and renamed over the output only when complete. Ctrl-C exits 130 (SIGTERM: 143), saying how
many JSONL lines were written, or that the .npy was not (no partial .npy is left behind). An --output
that is the --input file, or a .npy --output that is a device or a pipe, is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import signal
import stat
import sys
import tempfile
import threading

import torch

from . import runtime as R
from . import tasks as T
from . import trainer as TR


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + weights + tokenizer)")
    p.add_argument("--input", help="text file, one text per line (default: stdin)")
    p.add_argument("--output", help="FILE.npy for a numpy array, any other name for JSONL (default: stdout)")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean",
                   help="mean over real tokens (default) or the last hidden state of [CLS]")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    p.add_argument("--batch-size", type=int, default=64, help="default 64")
    p.add_argument("--max-length", type=int, default=None,
                   help="longer texts are truncated (default: sentence_bert_config.json's max_seq_length, "
                        "else the model's positions, at most 512)")
    p.add_argument("--chunk-size", type=int, default=16384,
                   help="lines read, encoded and written at a time (default 16384; ~7.5 kB of tokenizer "
                        "output per line): memory is bounded by it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (on stderr)")
    R.add_cuda_graphs_argument(p, "replay each batch as a CUDA graph, one per length bucket of 32 tokens "
                                  "(CUDA only; the eager run of small batches is bound by the host)")
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


def read_rows(model, input_ids: torch.Tensor, pooling: str) -> dict:
    """Extra arguments of the forward: with cls pooling, a fastbert BertModel runs its last layer past
    the attention on the [CLS] rows only (output_rows; exact, and the other rows are never read);
    nothing for mean pooling or another model class."""
    from .modeling import BertModel, _pooler_rows
    if pooling != "cls" or not isinstance(model, BertModel):
        return {}
    return _pooler_rows(model, input_ids, None)


def length_buckets(max_length: int, step: int = 32) -> tuple:
    """Sequence-length buckets of the CUDA graphs: every `step` tokens up to max_length."""
    return tuple(range(step, max_length, step)) + (max_length,)


def iter_lines(path: str | None):
    """The texts of a file (stdin when path is None), one per line, read lazily: split at "\\n" only
    (a bare "\\r" inside a line stays there, so row i is line i as `wc -l` counts them), the line
    break ("\\n" or "\\r\\n") stripped, a UTF-8 byte-order mark at the start dropped."""
    if path is not None:
        with open(path, encoding="utf-8-sig", newline="\n") as f:
            for line in f:
                yield line.rstrip("\r\n")
        return
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (e.g. io.StringIO in tests)
        for line in sys.stdin:
            yield line.rstrip("\r\n")
        return
    stream = io.TextIOWrapper(buffer, encoding="utf-8-sig", newline="\n")
    try:
        for line in stream:
            yield line.rstrip("\r\n")
    finally:
        stream.detach()  # leave sys.stdin's buffer open


def _rereadable(path: str | None) -> bool:
    """A regular file, which can be read twice (counted, then encoded); not stdin, a pipe or a FIFO."""
    if path is None:
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # let the read report it


def embed(model, tok, texts, pooling="mean", normalize=False, batch_size=64, max_length=512,
          device=None, precision="fp32", cuda_graphs=False, progress=False):
    """(len(texts), hidden) float32 embeddings; batches are length-sorted and padded per batch.
    The model must already be on `device` (default: the CPU). cuda_graphs: replay each batch as a
    CUDA graph (fastbert.cuda_graphs.GraphedEncoder; the padded layout, one graph per 32-token bucket).
    progress: a tqdm bar on stderr counting texts."""
    device = torch.device("cpu") if device is None else torch.device(device)
    graphed = _graphed(model, cuda_graphs, batch_size, max_length, pooling, normalize, precision)
    from tqdm.auto import tqdm
    with tqdm(total=len(texts), unit="text", desc="encode", disable=not progress, dynamic_ncols=True) as bar:
        return embed_chunk(model, tok, texts, pooling, normalize, batch_size, max_length, device, precision,
                           graphed, bar)


def _graphed(model, cuda_graphs, batch_size, max_length, pooling, normalize, precision):
    if not cuda_graphs:
        return None
    from .cuda_graphs import GraphedEncoder
    return GraphedEncoder(model, batch_size=batch_size, seq_buckets=length_buckets(max_length),
                          pooling=pooling, normalize=normalize, autocast_dtype=R.autocast_dtype(precision))


def embed_chunk(model, tok, texts, pooling, normalize, batch_size, max_length, device, precision,
                graphed=None, bar=None):
    """embed() on one chunk of texts with what the caller keeps across chunks: `graphed` (a
    GraphedEncoder or None) and `bar` (a tqdm bar or None). Returns ((len(texts), hidden) float32
    array, how many texts were truncated). The batches are those of embed() on the same texts."""
    feats, info = T.build_features("classify", [{"text": t} for t in texts], tok, max_length)
    out = torch.empty(len(texts), model.config.hidden_size)
    model.eval()
    with torch.inference_mode():
        for idx in T.bucket_batches([T.length_of(f) for f in feats], batch_size, shuffle=False):
            if bar is not None:
                bar.update(len(idx))  # counted as the batch starts (the device runs ahead of the host)
            b = T.collate([feats[i] for i in idx])
            if graphed is not None:  # CPU tensors: padded to the bucket there, then one copy each
                out[idx] = graphed(b["input_ids"], b["attention_mask"], b["token_type_ids"]).cpu()
                continue
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            with R.autocast(precision, device):
                h = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], **R.PLAIN_OUTPUTS,
                          **read_rows(model, b["input_ids"], pooling)).last_hidden_state
            out[idx] = pool(h, b["attention_mask"], pooling, normalize).cpu()
    return out.numpy(), info["truncated"]


def _is_npy(path: str | None) -> bool:
    return bool(path) and path.lower().endswith(".npy")


def _check_output(path: str, source: str | None) -> None:
    # through a symlink the file written is its target (a .npy is made beside the target, then renamed
    # over it): the target's folder is the one that must exist and take the file
    folder = os.path.dirname(os.path.realpath(path))
    if os.path.isdir(path):
        raise ValueError(f"--output {path}: is a folder (give a file name: FILE.npy or FILE.jsonl)")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode) and _is_npy(path):
        # the renamed temporary file would replace the device or FIFO itself (as root even /dev/null)
        raise ValueError(f"--output {path}: not a regular file (a device or a pipe); a .npy is written whole "
                         f"and renamed into place: give a file name")
    if source is not None and os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
        raise ValueError(f"--output {path} is the --input file: it would be overwritten while it is read")
    if source is None and os.path.exists(path) and _same_file(_fd_stat(sys.stdin), os.stat(path)):
        raise ValueError(f"--output {path} is the file standard input reads: it would be overwritten while it "
                         f"is read")
    if not os.path.isdir(folder):
        raise ValueError(f"--output {path}: the folder {folder} does not exist")
    # a .npy is written to a temporary file in the folder, then renamed: the folder must be writable. JSONL
    # is written in place: an existing file (e.g. /dev/null, or a file in a read-only shared folder) must
    # be writable, the folder only when the file is new.
    if _is_npy(path) or not os.path.exists(path):
        ok = os.access(folder, os.W_OK | os.X_OK) and (not os.path.exists(path) or os.access(path, os.W_OK))
    else:
        ok = os.access(path, os.W_OK)
    if not ok:
        raise ValueError(f"--output {path}: cannot write there (permission denied)")


def _fd_stat(stream):
    """os.fstat of a stream's file descriptor, or None (a stream without one, as in tests)."""
    try:
        return os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _same_file(a, b) -> bool:
    return a is not None and b is not None and stat.S_ISREG(a.st_mode) and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _check_stdout(source: str | None) -> None:
    """JSONL to standard output that is the input file itself (`... --input f >> f`, `< f >> f`): it would
    read its own rows back without end."""
    out = _fd_stat(sys.stdout)
    if out is None or not stat.S_ISREG(out.st_mode):
        return
    if source is None:
        src = _fd_stat(sys.stdin)
    else:
        src = os.stat(source) if os.path.exists(source) else None
    if _same_file(out, src):
        raise ValueError("standard output is the input file: it would read its own rows back; give --output")


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`), handled as Ctrl-C is: nothing partial left behind; exit 143."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():  # signal handlers live there only
        yield
        return

    def stop(signum, frame):
        raise _Terminated()
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(e: KeyboardInterrupt) -> int:
    return 143 if isinstance(e, _Terminated) else 130


def main(args) -> int:
    with _sigterm_as_interrupt():
        try:
            return _main(args)
        except KeyboardInterrupt as e:  # while the model or tokenizer loaded
            print("fastbert encode: interrupted before encoding; nothing written", file=sys.stderr)
            return _stopped(e)


def _main(args) -> int:
    from .modeling import BertModel
    try:
        device = R.resolve_device(args.device)
        precision = R.resolve_precision(args.precision, device)
        if args.cuda_graphs == "on" and device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA device, not {device}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, not {args.batch_size}")
        if args.chunk_size < 1:
            raise ValueError(f"--chunk-size must be at least 1, not {args.chunk_size}")
        if args.output:  # checked before the work, not found after it
            _check_output(args.output, args.input)
        else:
            _check_stdout(args.input)
        if args.input == "":
            raise ValueError("--input is empty: give a file name (or leave --input out to read stdin)")
        if args.input and os.path.isdir(args.input):
            raise ValueError(f"--input {args.input}: is a folder; give a text file, one text per line")
        model = BertModel.from_pretrained(args.model).to(device)
        initial = TR.initial_model_warning(args.model)
        if initial:
            print(f"fastbert encode: {initial}", file=sys.stderr)
        tok = T.load_tokenizer(args.model, "encoding", model.get_input_embeddings().num_embeddings)
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
    max_length = args.max_length or _default_max_length(args.model, model.config.max_position_embeddings)
    if not args.normalize and _normalizes(args.model):
        print("fastbert encode: the model's modules.json lists a Normalize module (sentence-transformers "
              "L2-normalises its embeddings): add --normalize for the same vectors", file=sys.stderr)
    npy = _is_npy(args.output)
    spool = None
    try:
        try:
            if _rereadable(args.input) and (npy or not args.no_progress):
                # counted first: the .npy's row count, the progress bar's total (JSONL without a bar needs neither)
                total, source = sum(1 for _ in iter_lines(args.input)), args.input
            elif npy:  # stdin or a pipe: copied once to an anonymous file beside the output, then read from it
                spool = tempfile.TemporaryFile("w+", encoding="utf-8", newline="\n",
                                               dir=os.path.dirname(os.path.realpath(args.output)))
                total = 0
                for t in iter_lines(args.input):
                    spool.write(t + "\n")
                    total += 1
                spool.seek(0)
                source = None
            else:  # JSONL from stdin, a pipe, or a file read once: streamed, the total unknown
                total, source = None, args.input
        except (OSError, UnicodeDecodeError) as e:
            print(f"fastbert encode: error: {_input_why(args.input, e)}", file=sys.stderr)
            return 2
        if total == 0:
            print("fastbert encode: error: no input lines", file=sys.stderr)
            return 2
        lines = (t.rstrip("\n") for t in spool) if spool is not None else iter_lines(source)
        return _encode(args, model, tok, lines, total, npy, device, precision, max_length)
    except KeyboardInterrupt as e:  # while the input was counted or copied
        print("fastbert encode: interrupted before encoding; nothing written", file=sys.stderr)
        return _stopped(e)
    except OSError as e:  # the spool beside the output could not be made or written
        print(f"fastbert encode: error: cannot write beside {args.output}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if spool is not None:
            spool.close()


def _default_max_length(model_dir: str, positions: int) -> int:
    """sentence-transformers' max_seq_length where the folder has its sentence_bert_config.json (all-MiniLM-
    L6-v2's: 256), so that long texts are cut where it cuts them; else the model's positions, at most 512."""
    try:
        with open(os.path.join(model_dir, "sentence_bert_config.json"), encoding="utf-8") as f:
            length = json.load(f).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        length = None
    if isinstance(length, int) and not isinstance(length, bool) and length >= 8:
        return min(length, positions)
    return min(512, positions)


def _normalizes(model_dir: str) -> bool:
    """Whether the folder's sentence-transformers modules.json lists a Normalize module."""
    try:
        with open(os.path.join(model_dir, "modules.json"), encoding="utf-8") as f:
            modules = json.load(f)
        return any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _input_why(path, e) -> str:
    why = f"not UTF-8 text ({e.reason} at byte {e.start})" if isinstance(e, UnicodeDecodeError) else e.strerror or e
    return f"{path or 'stdin'}: {why}"


class _InputError(Exception):
    """Reading the input failed halfway (stdin or a pipe), or a file changed between count and read."""


def _chunks(lines, size: int, path):
    lines = iter(lines)
    while True:
        try:
            chunk = list(itertools.islice(lines, size))
        except (OSError, UnicodeDecodeError) as e:
            raise _InputError(_input_why(path, e)) from e
        if not chunk:
            return
        yield chunk


def _encode(args, model, tok, lines, total, npy, device, precision, max_length) -> int:
    """Encode `lines` (an iterator; `total` of them, None when unknown) chunk by chunk into args.output."""
    from tqdm.auto import tqdm
    graphs = R.use_cuda_graphs(args.cuda_graphs, device, args.batch_size)
    graphed = _graphed(model, graphs, args.batch_size, max_length, args.pooling, args.normalize, precision)
    bar = tqdm(total=total, unit="text", desc="encode", disable=args.no_progress, dynamic_ncols=True)
    n_lines = n_trunc = 0

    def encoded():  # (texts, embeddings) of each chunk in turn
        nonlocal n_lines, n_trunc
        for texts in _chunks(lines, args.chunk_size, args.input):
            emb, k = embed_chunk(model, tok, texts, args.pooling, args.normalize, args.batch_size, max_length,
                                 device, precision, graphed, bar)
            n_lines, n_trunc = n_lines + len(texts), n_trunc + k
            yield texts, emb

    if npy:
        from numpy.lib.format import open_memmap

        from .trainer import atomic_write_with

        def write(tmp):
            out = open_memmap(tmp, mode="w+", dtype="float32", shape=(total, model.config.hidden_size))
            for texts, emb in encoded():
                if n_lines > total:
                    raise _InputError(f"{args.input}: changed while being read (more than {total} lines)")
                out[n_lines - len(texts):n_lines] = emb
            if n_lines != total:
                raise _InputError(f"{args.input}: changed while being read ({n_lines} lines, not {total})")
            out.flush()
            del out

        try:
            with bar:
                # a symlinked --output is written through (as np.save did), not replaced by a file
                atomic_write_with(os.path.realpath(args.output), write, suffix=".npy")
        except KeyboardInterrupt as e:
            print(f"fastbert encode: interrupted after {n_lines} of {total} lines; {args.output} not written",
                  file=sys.stderr)
            return _stopped(e)
        except _InputError as e:
            print(f"fastbert encode: error: {e}; {args.output} not written", file=sys.stderr)
            return 2
        except OSError as e:  # a full disk, a folder that takes no new file
            print(f"fastbert encode: error: cannot write {args.output}: {e.strerror or e}; not written",
                  file=sys.stderr)
            return 1
        _report_truncated(n_trunc, n_lines, max_length)
        return 0

    f = None
    written = 0
    where = args.output or "stdout"
    try:
        with bar:
            for texts, emb in encoded():
                if f is None:  # opened once there is something to write: an input error leaves it alone
                    f = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
                # the chunk's rows are formatted first, then written at once: Ctrl-C while formatting
                # (the slow part) leaves none of them in the file's buffer, to be flushed at close or exit
                rows = [json.dumps({"text": t, "embedding": [round(float(x), 6) for x in v]},
                                   ensure_ascii=False) + "\n" for t, v in zip(texts, emb)]
                f.writelines(rows)
                f.flush()  # each chunk's lines are out as soon as it is done
                written += len(texts)
    except BrokenPipeError:  # `fastbert encode ... | head`: the reader has gone; no traceback
        if f is sys.stdout:  # and none from the interpreter's own flush of stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt as e:
        print(f"fastbert encode: interrupted; {written} lines written to {where}", file=sys.stderr)
        return _stopped(e)
    except OSError as e:  # a full disk (BrokenPipeError, also an OSError, is handled above)
        print(f"fastbert encode: error: cannot write {where}: {e.strerror or e} ({written} lines written before "
              f"it)", file=sys.stderr)
        return 1
    except _InputError as e:  # reading stdin or a pipe failed halfway
        print(f"fastbert encode: error: {e} ({written} lines written to {where} before it)", file=sys.stderr)
        return 2
    finally:
        if f is not None and f is not sys.stdout:
            with contextlib.suppress(OSError):  # a write error was said above; closing flushes the same bytes
                f.close()
    if written == 0:
        print("fastbert encode: error: no input lines", file=sys.stderr)
        return 2
    _report_truncated(n_trunc, n_lines, max_length)
    return 0


def _report_truncated(n_trunc: int, n: int, max_length: int) -> None:
    if n_trunc:
        print(f"fastbert encode: {n_trunc} of {n} texts truncated to {max_length} tokens", file=sys.stderr)
