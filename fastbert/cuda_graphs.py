"""Whole training steps (GraphedTrainStep) and inference batches (GraphedEncoder) captured as CUDA
graphs, one graph per bucket of input shapes.

Fine-tuning batches are small (BERT-base on 32 sentences of ~60 tokens is ~1 GFLOP per layer),
so an eager step is bound by the host: hundreds of kernel launches, each paying Python and driver
time. A CUDA graph replays the whole step — forward, backward, gradient clipping and the
optimizer — as one launch. Graphs need static shapes, so every batch is padded up to a bucket
(rows x sequence length); the encoder then runs its padded layout (fastbert/modeling.py: inside
capture it cannot unpad, which needs a host sync), and padding rows carry ignored labels.

    step = GraphedTrainStep(model, optimizer, batch_size=32, seq_buckets=(32, 64, 96, 128))
    for batch in loader:           # dicts of (B, S) tensors, S <= 128, B <= 32
        loss = step(batch)         # a device tensor; .item() only when logging
        scheduler.step()           # a tensor learning rate is updated in place, so graphs see it

Pretraining (BertForPreTraining, BertForMaskedLM) needs ``max_masked_rows=K``: the masked-LM head
normally runs on exactly the labelled rows, which nonzero() finds with a host sync; in a graph it
runs on K rows instead — every labelled row, then unlabelled ones whose -100 labels add nothing —
so K must bound the labelled tokens of any batch (fastbert's masking labels at most
max(1, round(mask_prob · n)) of a row's n candidate tokens: rows × (round(mask_prob · seq) + 1) is safe).
A batch whose labels are on the CPU is checked before it is copied (a clear error for more than K
labelled tokens or a label outside the vocabulary). One already on the GPU cannot be checked without
a sync: if it holds more than K labelled tokens or a label outside the vocabulary, its masked-LM
term is dropped — that step trains on the next-sentence loss alone — and the returned loss is NaN,
so check the loss when you log it (or keep labels on the CPU).

    step = GraphedTrainStep(model, optimizer, batch_size=256, seq_buckets=(128,),
                            max_masked_rows=256 * (round(0.15 * 128) + 1), autocast_dtype=torch.bfloat16)

``loss_fn(model, batch) -> sequence of scalar tensors`` replaces ``model(**batch).loss``: the graph
trains on their sum and returns them stacked (fp32), e.g. masked-LM and next-sentence losses apart
(``fastbert pretrain --cuda-graphs``).

Supports: any fastbert model whose loss ignores label -100 (sequence classification with
num_labels > 1, token classification, multiple choice, masked LM + next-sentence prediction) in fp32
or under bf16/fp16 autocast;
torch.optim.Adam / AdamW with capturable=True (fused=True too, if wanted), whose learning rate this class turns
into a device tensor so that schedulers keep working.
Not supported: packed pretraining rows (position_ids and per-example NSP labels), float labels (regression, multi-label: padding rows cannot be marked
ignored), question answering (its span loss counts every position), gradient accumulation.
Caution: capturing a bucket runs the step twice eagerly first (kernel compilation, cuBLAS and
allocator warm-up), in the layout and shapes the capture will use (modeling.graph_layout()); the
first of those warm-ups also creates the optimizer state. Parameters and
optimizer state are restored afterwards, so the graphs train exactly as eager steps would,
apart from the dropout random numbers (the warm-ups and captures leave the random state as they
found it, so a run resumed from a checkpoint replays the numbers the uninterrupted run did). All
buckets share one activation memory pool (graphs replay one after another and every tensor that
outlives a replay — inputs, parameters, gradients, optimizer state, the returned loss, a copy —
lives outside it), so memory does not grow with the bucket count.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

import fastbert.kernels as K
from .modeling import graph_layout
from .runtime import PLAIN_OUTPUTS

PAD_LABEL = -100
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_ROW_LABELS = ("next_sentence_label",)  # one label per row: padding rows get -100


class GraphedTrainStep:
    """Callable running one training step per batch, replaying a CUDA graph per (rows, seq) bucket."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, batch_size: int,
                 seq_buckets: Sequence[int], max_grad_norm: Optional[float] = None,
                 autocast_dtype: Optional[torch.dtype] = None, warmup_steps: int = 2,
                 max_masked_rows: Optional[int] = None, loss_fn: Optional[Callable] = None):
        self.mlm_heads = [m for m in model.modules() if hasattr(m, "masked_loss")]
        if self.mlm_heads and max_masked_rows is None:
            raise ValueError("a masked-LM model needs max_masked_rows (a bound on the labelled tokens of a "
                             "batch): the head runs on that many rows inside the graph")
        if max_masked_rows is not None and int(max_masked_rows) < 1:
            raise ValueError(f"max_masked_rows must be positive, got {max_masked_rows}")
        self.max_masked_rows = None if max_masked_rows is None else int(max_masked_rows)
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {device}")
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"GraphedTrainStep supports Adam and AdamW, got {type(optimizer).__name__}")
        for group in optimizer.param_groups:
            # fused=True alone keeps the step counter on the host, which a captured step cannot read
            if not group.get("capturable"):
                raise ValueError("the optimizer must be built with capturable=True (fused=True may be added)")
        if getattr(getattr(model, "config", None), "num_labels", 2) == 1 and hasattr(model, "classifier"):
            raise ValueError("regression heads (num_labels == 1) cannot ignore padding rows; run them eagerly")
        _check_buckets(batch_size, seq_buckets)
        self.model, self.optimizer, self.device = model, optimizer, device
        self.batch_size, self.seq_buckets = int(batch_size), tuple(int(s) for s in seq_buckets)
        self.max_grad_norm, self.autocast_dtype, self.warmup_steps = max_grad_norm, autocast_dtype, warmup_steps
        self.loss_fn = loss_fn
        # A float learning rate would be baked into the captured kernels; a device tensor is read at
        # every replay, and LRScheduler fills tensors in place (torch >= 2.4).
        for group in optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.graphs: Dict[Tuple[int, int], Tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.pool = None  # one memory pool for every bucket's graph, made at the first capture
        self.capture_seconds = 0.0  # warm-ups and captures so far (host wall time, device synchronised)

    # ----------------------------------------------------------------------------------- batches

    def bucket(self, rows: int, seq: int) -> Tuple[int, int]:
        return _bucket(rows, seq, self.batch_size, self.seq_buckets)

    # ------------------------------------------------------------------------------------- steps

    @contextlib.contextmanager
    def _static_mlm_rows(self):
        before = [head.__dict__.get("static_rows") for head in self.mlm_heads]
        for head in self.mlm_heads:
            head.static_rows = self.max_masked_rows
        try:
            yield
        finally:
            for head, value in zip(self.mlm_heads, before):
                if value is None:
                    head.__dict__.pop("static_rows", None)  # back to the class default (None)
                else:
                    head.static_rows = value

    def _step(self, static: dict) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=False)
        with graph_autocast("cuda", self.autocast_dtype), self._static_mlm_rows():
            if self.loss_fn is None:
                loss = parts = self.model(**static, **PLAIN_OUTPUTS).loss
            else:  # several terms: their sum trains, each is returned (fp32, stacked)
                parts = torch.stack([t.float() for t in self.loss_fn(self.model, static)])
                loss = parts.sum()
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return parts.detach()

    def _capture(self, padded: dict):
        t0 = time.perf_counter()
        static = {k: v.to(self.device, copy=True) for k, v in padded.items()}
        params = list(self.model.parameters())
        saved_params = [p.detach().clone() for p in params]
        saved_state = {p: {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
                       for p, s in self.optimizer.state.items()}
        # the warm-up's dropout draws must not shift the run's random numbers: a run resumed from a
        # checkpoint captures again, and should then replay what the uninterrupted run replayed
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(self.device)
        # compiles kernels; the first time, creates grads and optimizer state
        _warm_up(lambda: self._step(static), self.warmup_steps)
        # Undo the warm-up: parameters back; optimizer state back, or zero where the warm-up created
        # it (Adam's step and moments all start at 0).
        with torch.no_grad():
            for p, s in zip(params, saved_params):
                p.copy_(s)
            for p, state in self.optimizer.state.items():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor):
                        v.copy_(saved_state[p][k]) if p in saved_state else v.zero_()
        del saved_params, saved_state
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = self._step(static)
        torch.cuda.synchronize(self.device)
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], self.device)
        self.capture_seconds += time.perf_counter() - t0
        return graph, static, loss

    def __call__(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        rows, seq = ids.shape[0], ids.shape[-1]  # (B, S), or (B, choices, S) for multiple choice
        shape = self.bucket(rows, seq)
        padded = pad_batch(batch, shape)
        labels = padded.get("labels")
        if self.mlm_heads and labels is not None and labels.device.type == "cpu":
            masked = int((labels != PAD_LABEL).sum())
            if masked > self.max_masked_rows:
                raise ValueError(f"batch has {masked} labelled tokens, more than max_masked_rows="
                                 f"{self.max_masked_rows}")
            vocab = getattr(self.mlm_heads[0].decoder, "out_features", None)
            if vocab is not None and K.mlm_labels_bad(labels, vocab, PAD_LABEL):
                K.raise_bad_mlm_labels(labels, vocab, PAD_LABEL)
        # a copy: the graph's own output tensor may share memory with another bucket's activations
        # (one pool), so it is only valid until the next replay of any graph
        return _replay(self.graphs, shape, padded, self._capture, self.device).clone()


class GraphedEncoder:
    """Sentence embeddings from a BertModel, one CUDA-graph replay per batch (inference).

    What `fastbert encode` computes per batch — the last hidden layer, pooled (mean over real tokens
    or [CLS]), optionally L2-normalised, fp32 — captured per (rows, seq) bucket. Small inference
    batches are bound by the host (an eager MiniLM batch of 128 sentences is a few hundred launches
    and two host syncs for a millisecond of GPU work); a replay is one launch. Inside the graph the
    encoder runs its padded layout over the bucket's shape, so it computes on the padding too: at
    large batches the eager unpadded path can be the faster one.

        enc = GraphedEncoder(model, batch_size=128, seq_buckets=(32, 64, 128), autocast_dtype=torch.bfloat16)
        vectors = enc(input_ids, attention_mask)          # (B, hidden) fp32 on the GPU, B <= 128

    Supports: fastbert's BertModel in fp32 or under bf16/fp16 autocast, on any CUDA device; inputs
    on the CPU (padded there, copied once) or on the GPU; batches of any rows up to batch_size and any
    length up to the largest bucket.
    Not supported: packed rows (example numbers in the mask); outputs other than the pooled vector.
    Caution: the returned tensor is a fresh copy. All buckets share one memory pool (graphs replay
    one after another, and a graph's output is read only right after its own replay), so memory is
    that of the largest bucket, not their sum. Capturing a bucket first runs it eagerly twice.
    """

    def __init__(self, model: torch.nn.Module, *, batch_size: int, seq_buckets: Sequence[int],
                 pooling: str = "mean", normalize: bool = False,
                 autocast_dtype: Optional[torch.dtype] = None, warmup_steps: int = 2):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {device}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        _check_buckets(batch_size, seq_buckets)
        self.model, self.device = model.eval(), device
        self.batch_size, self.seq_buckets = int(batch_size), tuple(int(s) for s in seq_buckets)
        self.pooling, self.normalize = pooling, normalize
        self.autocast_dtype, self.warmup_steps = autocast_dtype, warmup_steps
        self.graphs: Dict[Tuple[int, int], Tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.pool = None  # one memory pool for every bucket's graph, made at the first capture

    def bucket(self, rows: int, seq: int) -> Tuple[int, int]:
        return _bucket(rows, seq, self.batch_size, self.seq_buckets)

    def _capture(self, padded: dict):
        # Outside inference mode: the capture registers CUDA RNG state tensors once per process, and
        # inference tensors there would break a later capture outside inference mode (torch < 2.11).
        with torch.inference_mode(False), torch.no_grad():
            static = {k: v.to(self.device, copy=True) for k, v in padded.items()}
            _warm_up(lambda: padded_embeddings(self.model, static, self.pooling, self.normalize,
                                               self.autocast_dtype), self.warmup_steps)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = padded_embeddings(self.model, static, self.pooling, self.normalize, self.autocast_dtype)
        return graph, static, out

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, hidden) fp32 embeddings of a (B, S) batch, on the model's device."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        if (attention_mask.device.type == "cpu" and attention_mask.numel() and attention_mask.dtype != torch.bool
                and not attention_mask.is_floating_point() and int(attention_mask.max()) > 1):
            # (a mask already on the GPU is not checked: that would cost the host sync graphs avoid)
            raise ValueError("GraphedEncoder takes 0/1 attention masks (packed rows are not supported)")
        rows = input_ids.shape[0]
        shape = self.bucket(rows, input_ids.shape[-1])
        padded = pad_batch(batch, shape)
        out = _replay(self.graphs, shape, padded, self._capture, self.device)
        return out[:rows].clone()  # before any other bucket's replay, which may reuse this memory


def padded_embeddings(model, static: dict, pooling: str, normalize: bool,
                      autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """What GraphedEncoder captures: the model on a padded (rows, seq) batch, pooled (fp32, (rows, hidden)).
    Run it under modeling.graph_layout() to get the captured layout eagerly (its tests do, on the CPU)."""
    from .encode import pool, read_rows
    with graph_autocast(static["input_ids"].device.type, autocast_dtype):
        hidden = model(static["input_ids"], static["attention_mask"], static.get("token_type_ids"),
                       **PLAIN_OUTPUTS, **read_rows(model, static["input_ids"], pooling)).last_hidden_state
    return pool(hidden, static["attention_mask"], pooling, normalize)


def graph_autocast(device_type: str, dtype: Optional[torch.dtype]):
    """Autocast for a graphed forward: `dtype`, or fp32 (None) even inside a caller's autocast. The
    weight-cast cache stays off: cached casts would be freed between replays."""
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def _warm_up(fn, steps: int) -> None:
    """Run fn `steps` times on a side stream in the captured layout: kernel compilation, cuBLAS
    heuristics and allocator growth happen there, outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), graph_layout():
        for _ in range(steps):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def _replay(graphs: dict, shape, padded: dict, capture, device):
    """Replay the graph of `shape` (capturing it first, from `padded`) on `padded`'s values; returns
    the graph's output tensor (overwritten by the next replay of this graph)."""
    with torch.cuda.device(device):  # streams, capture and Triton launches on the model's GPU
        if shape not in graphs:
            graphs[shape] = capture(padded)
        graph, static, out = graphs[shape]
        if padded.keys() != static.keys():
            raise ValueError(f"every batch must carry the same inputs: captured with {sorted(static)}, "
                             f"got {sorted(padded)}")
        for name, value in padded.items():
            static[name].copy_(value, non_blocking=True)
        graph.replay()
        return out


def _check_buckets(batch_size: int, seq_buckets: Sequence[int]) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not seq_buckets or sorted(seq_buckets) != list(seq_buckets) or min(seq_buckets) < 1:
        raise ValueError(f"seq_buckets must be increasing positive lengths, got {seq_buckets}")


def _bucket(rows: int, seq: int, batch_size: int, seq_buckets: Sequence[int]) -> Tuple[int, int]:
    """(rows, seq) of the graph a batch runs in: batch_size rows, the shortest bucket that holds seq."""
    if rows > batch_size:
        raise ValueError(f"batch has {rows} rows, more than batch_size={batch_size}")
    for s in seq_buckets:
        if seq <= s:
            return batch_size, s
    raise ValueError(f"sequence length {seq} exceeds the largest bucket {seq_buckets[-1]}")


def pad_batch(batch: dict, shape: Tuple[int, int]) -> dict:
    """Pad (B, S) inputs and labels to (rows, seq) = shape; multiple-choice (B, C, S) pads B and S.

    Inputs pad with 0 (attention_mask 0: a padding row attends to nothing and gives zeros),
    labels with -100, which every supported loss ignores.
    """
    rows, seq = shape
    labels = batch.get("labels")
    if labels is not None and labels.is_floating_point():
        raise ValueError("float labels (regression, multi-label) cannot mark padding rows as ignored; "
                         "run those heads eagerly")
    if batch.get("attention_mask") is None and batch.get("input_ids") is not None:
        # no mask means every position attends: once padded, the padding must not be attended to
        batch = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    out = {}
    for name, t in batch.items():
        if t is None:
            continue
        if name in _INPUTS or (name == "labels" and t.dim() == batch["input_ids"].dim()):
            fill = PAD_LABEL if name == "labels" else 0
            pad_seq = seq - t.shape[-1]
            if pad_seq < 0:
                raise ValueError(f"{name} is longer ({t.shape[-1]}) than the bucket ({seq})")
            if pad_seq:  # (unpadded, a pinned batch stays pinned: its copy into the graph runs async)
                t = torch.nn.functional.pad(t, (0, pad_seq), value=fill)
        elif name in _ROW_LABELS:
            if t.dim() != 1:
                raise ValueError(f"{name} must be one label per row (packed rows are not supported)")
        elif name != "labels":
            raise ValueError(f"GraphedTrainStep does not know how to pad the input {name!r}")
        if t.shape[0] > rows:
            raise ValueError(f"{name} has {t.shape[0]} rows, more than the bucket's {rows}")
        if t.shape[0] < rows:
            fill = PAD_LABEL if name == "labels" or name in _ROW_LABELS else 0
            t = torch.cat([t, t.new_full((rows - t.shape[0], *t.shape[1:]), fill)])
        out[name] = t
    return out
