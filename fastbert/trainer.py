"""Training-loop pieces shared by pretraining and fine-tuning.

- ``setup_distributed`` / ``Distributed``: one process, or several under ``torchrun`` (NCCL on GPUs,
  gloo on CPUs), with the helpers a loop needs (barrier, all-reduce of a few floats, broadcast).
- Atomic files: ``atomic_write_text`` / ``atomic_write_json`` / ``atomic_copy`` write a temporary file
  in the same folder, fsync it, then ``os.replace`` it over the target, so a crash at any moment
  leaves either the old or the new file, never a half-written one.
- ``CheckpointManager``: resumable checkpoints under ``RUN/checkpoints/step-NNNNNNNN/`` (the model in
  HF format + ``training_state.pt``), each written into a temporary folder and renamed into place,
  then published by rewriting ``RUN/checkpoints/latest``. Training state holds only tensors and plain
  Python values, so it loads with ``torch.load(weights_only=True)`` (no pickle of code).
- ``MetricsLog``: ``metrics.jsonl`` (one JSON row per logged step; on resume, rows past the checkpoint
  and a torn last line are dropped) and ``plot_metrics`` (loss / accuracy PNG, matplotlib Agg).
- ``progress_bar``: tqdm on the first process only.
- ``Prefetcher``: builds the next step's batches in a background thread while the current step runs.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from . import runtime as R


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

def destroy_process_group(drain_s: float = 0.1) -> None:
    """torch.distributed.destroy_process_group, safe from a deadlock of gloo's: torch's
    ProcessGroupGloo destructor joins its work thread with the GIL held, and that thread may still need
    the GIL to free its last work's thread-local state (gdb-confirmed in tests/test_pretrain_cli.py's
    DDP test, torch 2.13). Free what still holds the group (a DDP module should be gone before this is
    called), let the work thread drain, then destroy the group."""
    if torch.distributed.get_backend() == "gloo":
        gc.collect()
        time.sleep(drain_s)
    torch.distributed.destroy_process_group()


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum_floats(self, values: list[float]) -> list[float]:
        """Sum a few floats over processes (float64, so the sum does not depend on dtype)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def shutdown(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            destroy_process_group()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over processes in place. With NCCL the sum is queued on the device's stream and
        the host does not wait for it (no sync), unlike ``sum_floats``."""
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t


def setup_distributed(device: str | None = None) -> Distributed:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); start the process group when there
    are several processes: NCCL when each process has a GPU, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = R.resolve_device(device)  # the same checks and messages as finetune's and encode's --device
    if dev.type == "cuda" and (device is None or torch.device(device).index is None):
        # torchrun starts one process per GPU: a bare "cuda" means this process's own, LOCAL_RANK
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} GPU(s) visible")
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=30))
    return Distributed(rank, world, local_rank, dev)


# ----------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    # Linux reports it without changing it; os.umask reads it only by setting it, and for that moment
    # another thread's new files would get 0666 (the prefetch thread runs beside these writes)
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    return 0o666 & ~_umask()


def _mkstemp(folder: str, suffix: str = "") -> tuple[int, str]:
    """mkstemp (mode 0600), then the mode an ordinary new file would get."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.chmod(tmp, _umask_mode())
    return fd, tmp


def atomic_write_with(path: str, write, suffix: str = "") -> None:
    """``write(tmp)`` fills a temporary file in path's folder (suffix: an extension a writer reads the
    format from); it is fsynced and renamed over path, or removed if anything fails on the way."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = _mkstemp(folder, suffix)
    os.close(fd)
    try:
        write(tmp)
        # again: a writer may replace tmp with a file of its own (safetensors >= 0.7 saves through its own
        # mkstemp-like temporary and rename: mode 0600)
        os.chmod(tmp, _umask_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write_with(path, write)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_copy(src: str, dst: str) -> None:
    atomic_write_with(dst, lambda tmp: shutil.copyfile(src, tmp))


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

STATE_FILE = "training_state.pt"


# Beside the step-0 model a pretraining run writes (so that its folder loads from the start); the
# first checkpoint's model replaces that model and removes this file.
INITIAL_MODEL_FILE = "initial_model.json"


def initial_model_note(folder: str) -> str | None:
    """For a `fastbert pretrain` run that has not reached its first checkpoint, what its model is (a
    phrase: "the run's random initialisation" or "the weights it started from (--init-from DIR)"),
    which a caller fine-tuning or encoding from it should say; None for any other folder."""
    path = os.path.join(folder, INITIAL_MODEL_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            init_from = json.load(f).get("init_from")
    except (OSError, ValueError, AttributeError):
        init_from = None
    return (f"the weights it started from (--init-from {init_from})" if init_from
            else "the run's random initialisation")


def initial_model_warning(folder: str) -> str | None:
    """The warning finetune and encode give for such a folder (None for any other)."""
    note = initial_model_note(folder)
    return note and (f"warning: {folder} is a pretraining run that has not reached its first checkpoint: "
                     f"its model is {note}")


class CheckpointManager:
    """``RUN/checkpoints/step-NNNNNNNN/`` folders + ``RUN/checkpoints/latest`` naming the newest
    complete one. ``save`` writes a folder under a temporary name, renames it, then rewrites
    ``latest``; older folders beyond ``keep`` are deleted only after that, so at every instant
    ``latest`` names a complete checkpoint."""

    def __init__(self, run_dir: str, keep: int = 1):
        self.run_dir = run_dir
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep = max(1, keep)

    def _complete(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name, STATE_FILE))

    def latest(self) -> str | None:
        """Path of the newest complete checkpoint, or None."""
        pointer = os.path.join(self.root, "latest")
        if os.path.isfile(pointer):
            with open(pointer) as f:
                name = f.read().strip()
            if name and self._complete(name):
                return os.path.join(self.root, name)
        if not os.path.isdir(self.root):
            return None
        names = sorted(n for n in os.listdir(self.root) if n.startswith("step-") and self._complete(n))
        return os.path.join(self.root, names[-1]) if names else None

    def clean_partial(self) -> None:
        """Remove temporary files and folders a killed run left behind."""
        if os.path.isdir(self.run_dir):
            for n in os.listdir(self.run_dir):
                if n.startswith(".tmp-") or n.endswith(".safetensors.tmp"):
                    path = os.path.join(self.run_dir, n)
                    if os.path.isfile(path):
                        os.unlink(path)
        if os.path.isdir(self.root):
            for n in os.listdir(self.root):
                if n.startswith(".tmp-"):  # a checkpoint folder, or atomic_write_text's file for `latest`
                    path = os.path.join(self.root, n)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)

    def save(self, step: int, write_files) -> str:
        """``write_files(folder)`` writes the checkpoint's files into a fresh folder."""
        os.makedirs(self.root, exist_ok=True)
        name = f"step-{step:08d}"
        final = os.path.join(self.root, name)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        try:
            write_files(tmp)
            for f in os.listdir(tmp):
                with open(os.path.join(tmp, f), "rb+") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if os.path.exists(final):  # re-saving the same step (e.g. the last one): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(os.path.join(self.root, "latest"), name + "\n")
        steps = sorted(n for n in os.listdir(self.root) if n.startswith("step-") and n != name)
        for old in steps[:max(0, len(steps) - (self.keep - 1))]:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
        return final


def save_state(path: str, state: dict) -> None:
    torch.save(state, path)


def load_state(path: str) -> dict:
    # weights_only: the state holds tensors and plain values only; never unpickle code
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def read_metrics(path: str) -> list[dict]:
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill: everything after it is dropped
                break
    return rows


class MetricsLog:
    """Append-only ``metrics.jsonl``; each row is flushed and fsynced as it is written."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Keep the rows up to ``step`` (the checkpoint a resumed run starts from)."""
        if not self.enabled:
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


PRETRAIN_SCORES = (("mlm_accuracy", "held-out MLM accuracy"), ("nsp_accuracy", "held-out NSP accuracy"))


def plot_metrics(metrics_path: str, png_path: str, title: str = "", scores=PRETRAIN_SCORES) -> None:
    """Loss curves (left) and held-out scores in [0, 1] (right: the (key, label) pairs of ``scores``)
    from a metrics.jsonl, written atomically. The runs draw it at every checkpoint or epoch: a curve
    that cannot be drawn (a broken matplotlib, a full disk) is a warning, never the end of a run."""
    try:
        _plot_metrics(metrics_path, png_path, title, scores)
    except Exception as e:  # noqa: BLE001 (KeyboardInterrupt and SystemExit still pass)
        warnings.warn(f"{png_path} not drawn: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)


def _plot_metrics(metrics_path: str, png_path: str, title: str, scores) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "train loss"), ("mlm_loss", "train MLM loss"), ("nsp_loss", "train NSP loss"),
                       ("eval_mlm_loss", "held-out MLM loss")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax_loss.plot(*zip(*pts), label=label, marker="o" if key.startswith("eval") else None)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for key, label in scores:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax_acc.plot(*zip(*pts), label=label, marker="o")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy" if scores is PRETRAIN_SCORES else "score")
    ax_acc.set_ylim(0, 1)
    ax_acc.grid(alpha=0.3)
    if ax_acc.lines:
        ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write_with(png_path, lambda tmp: fig.savefig(tmp, dpi=100), suffix=".png")
    finally:
        plt.close(fig)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (what schedulers send before they preempt a job) ask a training
    loop to stop at its next step boundary, where it can write a checkpoint, instead of dying with
    the work since the last one. A second Ctrl-C interrupts at once (KeyboardInterrupt).

        with StopSignals() as stop:
            while ...:
                train_step()
                if stop.signal: save(); break

    Handlers are installed only from the main thread (Python delivers signals there) and put back on exit.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal = None  # the first signal received (signal.Signals), None while running
        self._previous = {}

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal = signal.Signals(signum)
            # os.write, not print: the handler may run while the main thread is inside a write to
            # sys.stderr (tqdm), and a buffered stream re-entered from a handler raises RuntimeError
            os.write(2, f"\n{self.signal.name}: stopping after this step and writing a checkpoint "
                        f"(Ctrl-C again to stop at once)\n".encode())
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "pretrain"):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                smoothing=0.1)


class Prefetcher:
    """Runs ``prepare(position)`` for the next step in a background thread while this step trains.

    ``prepare`` must be a deterministic function of ``position``; while a call is pending the thread
    is the only caller, so the data objects it reads need no lock. ``start(position)`` begins
    preparing, ``get(position)`` returns the result (preparing it in the caller's thread if nothing
    was started for that position); errors raised in the thread are raised again by ``get``.

    Why: on a GPU the host's batch building (sampling, masking, padding, pinning) otherwise runs while
    the device sits idle between steps. Caution: the thread's Python work holds the GIL, so a thread
    running while the main thread launches kernels delays those launches (up to the interpreter's
    switch interval each time); the loop therefore starts it once a step's last backward is queued,
    when the main thread has little left to launch and soon waits on ``get``. On a CPU the thread
    would compete with the step for the same cores, so the loops enable it for CUDA devices by default.
    """

    def __init__(self, prepare, enabled: bool = True, device: torch.device | None = None):
        self._prepare = prepare
        self._pool = None
        if enabled:
            # the thread pins host memory: let it see the loop's GPU as its current device
            init = (lambda: torch.cuda.set_device(device)) if device is not None and device.type == "cuda" else None
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastbert-prefetch", initializer=init)
        self._pending = None  # (position, Future)

    def start(self, position) -> None:
        """Begin preparing ``position`` in the background (nothing when disabled)."""
        if self._pool is None:
            return
        self._drop_pending()
        self._pending = (position, self._pool.submit(self._prepare, position))

    def get(self, position):
        """What ``prepare(position)`` returns."""
        if self._pending is not None and self._pending[0] == position:
            future = self._pending[1]
            self._pending = None
            return future.result()
        self._drop_pending()
        return self._prepare(position)

    def _drop_pending(self) -> None:
        if self._pending is not None:
            wait([self._pending[1]])  # never two callers of prepare at once; its result (or error) is not wanted
            self._pending = None

    def close(self) -> None:
        if self._pool is not None:
            self._pending = None
            self._pool.shutdown(wait=False, cancel_futures=True)
