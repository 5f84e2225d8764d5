"""fastbert.cuda_graphs: bucketing and padding on the CPU; the captured step itself on a GPU."""
import os

import pytest
import torch

import fastbert
from fastbert.cuda_graphs import GraphedEncoder, GraphedTrainStep, pad_batch, padded_embeddings
from interpreter_bounds import INTERPRETED


def test_pad_batch_rows_and_sequence():
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "labels": torch.tensor([1, 0])}
    out = pad_batch(batch, (4, 5))
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [0] * 5, [0] * 5]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0] * 5, [0] * 5]
    assert out["labels"].tolist() == [1, 0, -100, -100]


def test_pad_batch_token_labels_and_choices():
    tok = pad_batch({"input_ids": torch.ones(1, 2, dtype=torch.long), "labels": torch.tensor([[3, -100]])}, (2, 3))
    assert tok["labels"].tolist() == [[3, -100, -100], [-100, -100, -100]]
    mc = pad_batch({"input_ids": torch.ones(1, 2, 3, dtype=torch.long), "labels": torch.tensor([1])}, (2, 4))
    assert mc["input_ids"].shape == (2, 2, 4) and mc["input_ids"][1].sum() == 0 and mc["input_ids"][0, :, 3].sum() == 0
    assert mc["labels"].tolist() == [1, -100]


@pytest.mark.parametrize("bad, message", [
    ({"input_ids": torch.ones(1, 6, dtype=torch.long)}, "longer"),
    ({"input_ids": torch.ones(3, 2, dtype=torch.long)}, "rows"),
    ({"input_ids": torch.ones(1, 2, dtype=torch.long), "labels": torch.tensor([0.5])}, "float labels"),
    ({"input_ids": torch.ones(1, 2, dtype=torch.long), "inputs_embeds": torch.ones(1, 2, 4)}, "inputs_embeds"),
])
def test_pad_batch_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        pad_batch(bad, (2, 5))


def _tiny(name):
    """A one-layer fastbert model of class `name` (vocabulary 50, hidden 16)."""
    return getattr(fastbert, name)(fastbert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32))


def test_rejects_cpu_models_and_plain_optimizers():
    model = _tiny("BertForSequenceClassification")
    with pytest.raises(ValueError, match="CUDA"):
        GraphedTrainStep(model, torch.optim.AdamW(model.parameters()), batch_size=2, seq_buckets=(8,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_steps_train_like_eager_steps():
    """Dropout off, fp32: the graphed steps (padded to buckets, two buckets interleaved, a
    scheduler changing the learning rate) give the eager steps' losses and parameters."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = fastbert.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              num_labels=3)
    torch.manual_seed(0)
    eager = fastbert.BertForSequenceClassification(cfg).cuda().train()
    graphed = fastbert.BertForSequenceClassification(cfg).cuda().train()
    graphed.load_state_dict(eager.state_dict())
    init = [p.detach().clone() for p in eager.parameters()]
    g = torch.Generator().manual_seed(1)
    batches = []
    for rows, width in [(5, 9), (8, 20), (3, 14), (8, 7), (6, 30), (8, 16)]:
        lengths = torch.randint(1, width + 1, (rows,), generator=g)
        lengths[0] = width
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        batches.append({"input_ids": torch.randint(1, 97, (rows, width), generator=g) * mask,
                        "attention_mask": mask, "token_type_ids": torch.zeros_like(mask),
                        "labels": torch.randint(0, 3, (rows,), generator=g)})
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, capturable=True)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-3, capturable=True)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (opt_e, opt_g)]
    step = GraphedTrainStep(graphed, opt_g, batch_size=8, seq_buckets=(16, 32), max_grad_norm=1.0)
    _train_side_by_side(eager, opt_e, step, batches, after_step=lambda: [s.step() for s in sched])
    assert len(step.graphs) == 2
    _assert_same_update(eager, graphed, init)


def _train_side_by_side(eager, opt_e, step, batches, after_step=None):
    """Each batch: one eager step (clipping at 1.0) and one graphed step; the losses must agree."""
    for batch in batches:
        loss_e = eager(**{k: v.cuda() for k, v in batch.items()}).loss
        loss_e.backward()
        torch.nn.utils.clip_grad_norm_(eager.parameters(), 1.0)
        opt_e.step()
        opt_e.zero_grad()
        loss_g = step(batch)
        if after_step is not None:
            after_step()
        torch.testing.assert_close(loss_g, loss_e.detach(), rtol=1e-4, atol=1e-5)


def _assert_same_update(eager, graphed, init):
    # The two sides differ only by fp32 rounding (padded vs varlen attention kernels), which Adam
    # can magnify on elements whose gradient is ~0; so compare the whole update, not each element.
    d_e = torch.cat([(p - p0).flatten() for p, p0 in zip(eager.parameters(), init)])
    d_g = torch.cat([(p - p0).flatten() for p, p0 in zip(graphed.parameters(), init)])
    assert d_e.norm() > 0
    assert (d_g - d_e).norm() <= 1e-3 * d_e.norm(), ((d_g - d_e).norm() / d_e.norm()).item()


# ------------------------------------------------------------------ pretraining: a fixed count of MLM rows

def _pretraining_batch(rows=4, seq=12, vocab=97, seed=2, masked=0.3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one padded row
    labels = torch.where((torch.rand(rows, seq, generator=g) < masked) & mask.bool(), ids, -100)
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": labels, "next_sentence_label": torch.randint(0, 2, (rows,), generator=g)}


def test_static_label_rows_keep_every_labelled_row_in_order():
    from fastbert.modeling import _static_label_rows
    labels = torch.tensor([-100, 7, -100, 3, 9, -100, -100, 2])
    rows, overflow = _static_label_rows(labels, 6)
    assert rows.tolist() == [1, 3, 4, 7, 0, 2] and not overflow
    rows, overflow = _static_label_rows(labels, 3)  # 4 labelled rows, room for 3
    assert rows.tolist() == [1, 3, 4] and overflow
    assert _static_label_rows(labels, 100)[0].tolist() == [1, 3, 4, 7, 0, 2, 5, 6]
    assert not _static_label_rows(labels, 4)[1]  # exactly K labelled rows is no overflow
    # long enough for an unstable sort to reorder: the labelled rows come in nonzero()'s order
    many = torch.where(torch.rand(5000, generator=torch.Generator().manual_seed(0)) < 0.15, 1, -100)
    want = (many != -100).nonzero().squeeze(1)
    rows, overflow = _static_label_rows(many, len(want) + 50)
    assert torch.equal(rows[:len(want)], want) and not overflow
    assert torch.equal(rows[len(want):], (many == -100).nonzero().squeeze(1)[:50])


@pytest.mark.parametrize("capture_layout", [False, True], ids=["unpadded", "capture-layout"])
@pytest.mark.parametrize("impl", ["fastbert", "transformers-patched"])
def test_static_mlm_rows_give_the_labelled_rows_loss_and_gradients(impl, capture_layout, monkeypatch):
    """The graph's MLM head (K rows: the labelled ones, then -100 rows) gives the loss and gradients
    of the eager head (exactly the labelled rows), by the shared tolerance rule against float64;
    more labelled rows than K poisons the loss with NaN instead of dropping some silently.
    capture-layout: the model believes it is being captured (as in GraphedTrainStep), so it runs the
    padded layout and its last layer on exactly K + batch rows (max_output_rows)."""
    import transformers

    from fastbert import modeling
    from test_modeling import last_layer_rows

    from tolerance import assert_close_to_reference
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ours = fastbert.BertForPreTraining(fastbert.BertConfig(**cfg)).train()
    if impl == "transformers-patched":
        hf = transformers.BertForPreTraining(transformers.BertConfig(**cfg)).train()
        hf.load_state_dict(ours.state_dict())
        ours = fastbert.patch(hf)
    batch = _pretraining_batch()
    n_labelled = int((batch["labels"] != -100).sum())
    head = ours.cls.predictions

    def run(model, dtype, static):
        m = model.to(dtype)
        m.zero_grad(set_to_none=True)
        head.static_rows = static
        try:
            loss = m(**batch).loss
        finally:
            head.static_rows = None
        loss.backward()
        return [loss.detach()] + [p.grad.detach().clone() for p in m.parameters() if p.grad is not None]

    reference = run(ours, torch.float64, None)
    dynamic = run(ours, torch.float32, None)
    if capture_layout:  # what GraphedTrainStep's warm-up runs (and the capture, which a CPU cannot)
        monkeypatch.setattr(modeling, "_GRAPH_LAYOUT", True)
        head.static_rows = n_labelled + 9
        assert last_layer_rows(ours, **batch) == n_labelled + 9 + len(batch["input_ids"])
    static = run(ours, torch.float32, n_labelled + 9)
    assert len(static) == len(dynamic) == len(reference)
    for i, (a, b, r) in enumerate(zip(static, dynamic, reference)):
        assert_close_to_reference(a, b, r, k=2, name=f"{impl} tensor {i}")
    head.static_rows = n_labelled  # exactly full: a finite loss, the eager one
    assert_close_to_reference(ours(**batch).loss.detach(), dynamic[0], reference[0], k=2, name="K = labelled")
    head.static_rows = n_labelled - 1
    assert torch.isnan(ours(**batch).loss)
    head.static_rows = None


@pytest.mark.parametrize("decoder", ["plain", "hooked"])
@pytest.mark.parametrize("impl", ["fastbert", "transformers-patched"])
def test_static_mlm_rows_read_nothing_on_the_host_and_a_bad_label_gives_nan(impl, decoder, monkeypatch):
    """With static rows (a CUDA graph, the eager pretraining loop) the MLM head never reads a device
    value on the host (K.mlm_loss's label check used to: a sync in the step's middle); a label outside
    the vocabulary then makes the loss NaN, as too many labelled rows do, instead of raising, and the
    other rows' gradients stay finite (it reached no cross-entropy). A hooked decoder (its own call)
    alike."""
    import transformers

    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(fastbert.BertConfig(**cfg)).train()
    if impl == "transformers-patched":
        model = fastbert.patch(transformers.BertForPreTraining(transformers.BertConfig(**cfg)).train())
    head = model.cls.predictions
    if decoder == "hooked":
        head.decoder.register_forward_hook(lambda m, a, o: None)
    batch = _pretraining_batch()
    out = model.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    seq = out.last_hidden_state.detach().requires_grad_()
    n_labelled = int((batch["labels"] != -100).sum())
    head.static_rows = n_labelled + 3
    reads = []
    for name in ("__bool__", "item", "__int__", "__float__", "__index__", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _name=name: reads.append(_name) or _real(t, *a))
    good = head.masked_loss(seq, batch["labels"])
    labels = batch["labels"].clone()
    labelled = (labels != -100).nonzero()
    labels[tuple(labelled[0])] = 97  # outside the vocabulary
    labels[tuple(labelled[1])] = -5
    bad = head.masked_loss(seq, labels)
    monkeypatch.undo()
    assert reads == []
    assert torch.isfinite(good) and torch.isnan(bad)
    bad.backward()
    assert torch.isfinite(seq.grad).all() and torch.isfinite(head.transform.dense.weight.grad).all()
    head.static_rows = None  # the exact rows: the error, as before
    with pytest.raises(ValueError, match="labels must lie in"):
        head.masked_loss(seq, labels)


def test_graphed_step_checks_cpu_labels_before_the_copy(monkeypatch):
    """Labels still on the CPU are checked before anything reaches the graph: more labelled tokens
    than max_masked_rows, or a label outside the vocabulary, is a clear error (in the graph either
    would only make the loss NaN). The step is built without a GPU: the check runs before any replay."""
    model = fastbert.BertForPreTraining(fastbert.BertConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1,
                                                            num_attention_heads=2, intermediate_size=32))
    step = GraphedTrainStep.__new__(GraphedTrainStep)
    step.mlm_heads, step.max_masked_rows, step.batch_size, step.seq_buckets = [model.cls.predictions], 8, 2, (5,)
    batch = _pretraining_batch(rows=2, seq=5)
    step.graphs, step._capture, step.device = {}, None, torch.device("cpu")
    from fastbert import cuda_graphs
    monkeypatch.setattr(cuda_graphs, "_replay", lambda *a: pytest.fail("the bad batch reached the graph"))
    for label, message in ((97, r"labels must lie in \[0, 97\) or equal ignore_index=-100; found \[97\]"),
                           (-3, r"found \[-3\]")):
        bad = {k: v.clone() for k, v in batch.items()}
        bad["labels"][tuple((bad["labels"] != -100).nonzero()[0])] = label
        with pytest.raises(ValueError, match=message):
            step(bad)
    step.max_masked_rows = int((batch["labels"] != -100).sum()) - 1
    with pytest.raises(ValueError, match="more than max_masked_rows"):
        step(batch)


def test_pad_batch_next_sentence_label_and_masked_lm_needs_a_row_bound():
    batch = _pretraining_batch(rows=2, seq=5)
    out = pad_batch(batch, (3, 8))
    assert out["next_sentence_label"].tolist() == batch["next_sentence_label"].tolist() + [-100]
    assert (out["labels"][2] == -100).all() and (out["labels"][:, 5:] == -100).all()
    with pytest.raises(ValueError, match="one label per row"):
        pad_batch({**batch, "next_sentence_label": torch.zeros(2, 2, dtype=torch.long)}, (3, 8))
    model = _tiny("BertForPreTraining")
    with pytest.raises(ValueError, match="max_masked_rows"):
        GraphedTrainStep(model, torch.optim.AdamW(model.parameters()), batch_size=2, seq_buckets=(8,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["fastbert", "transformers-patched"])
def test_graphed_pretraining_steps_train_like_eager_steps(monkeypatch, impl):
    """MLM + NSP, dropout off, fp32, clipping: graphed steps (K MLM rows, padded rows, a padded batch)
    give the eager steps' losses and update; a CPU batch with more labelled tokens than K is refused,
    and a GPU one (which cannot be checked without a sync) gives a NaN loss and finite weights."""
    import transformers
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=96, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    eager = fastbert.BertForPreTraining(fastbert.BertConfig(**cfg)).cuda().train()
    if impl == "fastbert":
        graphed = fastbert.BertForPreTraining(fastbert.BertConfig(**cfg))
    else:
        graphed = fastbert.patch(transformers.BertForPreTraining(transformers.BertConfig(**cfg)))
    graphed.load_state_dict(eager.state_dict())
    graphed.cuda().train()
    init = [p.detach().clone() for p in eager.parameters()]
    batches = [_pretraining_batch(rows=r, seq=16, seed=s) for s, r in enumerate([4, 3, 4, 4, 2, 4])]
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, capturable=True)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-3, capturable=True)
    step = GraphedTrainStep(graphed, opt_g, batch_size=4, seq_buckets=(16,), max_masked_rows=4 * 16 // 2,
                            max_grad_norm=1.0)
    _train_side_by_side(eager, opt_e, step, batches)
    assert len(step.graphs) == 1 and getattr(graphed.cls.predictions, "static_rows", None) is None
    _assert_same_update(eager, graphed, init)
    over = _pretraining_batch(rows=4, seq=16, masked=0.9)
    with pytest.raises(ValueError, match="max_masked_rows"):
        step(over)
    assert torch.isnan(step({k: v.cuda() for k, v in over.items()}))
    assert all(torch.isfinite(p).all() for p in graphed.parameters())
    outside = _pretraining_batch(rows=4, seq=16, seed=9)
    outside["labels"][tuple((outside["labels"] != -100).nonzero()[0])] = 97  # past the vocabulary
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 97\)"):
        step(outside)
    assert torch.isnan(step({k: v.cuda() for k, v in outside.items()}))  # in the graph: NaN, no device assert
    assert all(torch.isfinite(p).all() for p in graphed.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_static_label_rows_replay_at_bert_base_size():
    """The argsort that picks the MLM rows, captured at a BERT-base bucket (32768 labels: PyTorch's
    large-sort path, not the small in-place one) and replayed on new labels, matches nonzero()."""
    from fastbert.modeling import _static_label_rows
    g = torch.Generator().manual_seed(3)

    def labels():
        return torch.where(torch.rand(256 * 128, generator=g) < 0.15, 7, -100).cuda()
    static = labels()
    for _ in range(2):  # warm-up off the capture stream
        _static_label_rows(static, 5120)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rows, overflow = _static_label_rows(static, 5120)
    for _ in range(3):
        static.copy_(labels())
        graph.replay()
        want = (static != -100).nonzero().squeeze(1)
        assert not overflow.item()
        assert torch.equal(rows[:len(want)], want) and (static[rows[len(want):]] == -100).all()


def test_graph_layout_runs_eager_steps_as_the_capture_will():
    """GraphedTrainStep warms up inside modeling.graph_layout(): the padded layout (every position
    through the encoder, as in the captured graph), restored on exit, errors included."""
    from fastbert import modeling
    from test_modeling import rows_through_last_feed_forward
    model = _tiny("BertModel").eval()
    ids = torch.randint(5, 50, (3, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0

    def rows():
        return rows_through_last_feed_forward(model, input_ids=ids, attention_mask=mask)

    assert rows() == int(mask.sum()) == 21
    with modeling.graph_layout():
        assert rows() == 24
    assert rows() == 21
    with pytest.raises(RuntimeError):
        with modeling.graph_layout():
            raise RuntimeError("inside")
    assert not modeling._GRAPH_LAYOUT


def _ragged_batch(rows, seq, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, seq), generator=g)
    lengths = torch.randint(2, seq + 1, (rows,), generator=g)
    lengths[0] = seq  # the longest row sets the batch's width, as encode's batches do
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    types = (torch.arange(seq)[None] >= lengths[:, None] // 2).long() * mask
    return ids * mask, mask, types


@pytest.mark.parametrize("pooling, normalize, kernels", [
    ("mean", False, "reference"), ("mean", True, "reference"), ("cls", False, "reference"),
    pytest.param("mean", False, "triton", marks=pytest.mark.skipif(
        not INTERPRETED, reason="CPU tensors through the Triton kernels need the interpreter (the GPU run covers "
                                 "the compiled kernels in test_graphed_encoder_*)"))])
def test_padded_embeddings_equal_the_eager_encoder(pooling, normalize, kernels, monkeypatch):
    """What GraphedEncoder captures — the padded layout over a bucket with padding rows and columns —
    gives encode's eager vectors (unpadded encoder) for the real rows, on the CPU: float64 on the
    reference ops; fp32 on the Triton kernels (interpreted), whose padded attention then meets rows
    that are all padding."""
    from fastbert import modeling
    from fastbert.encode import pool
    from test_modeling import last_layer_row_counts, rows_through_last_feed_forward
    monkeypatch.setenv("FASTBERT_KERNELS", kernels)
    model = _tiny("BertModel").eval()
    model = model.double() if kernels == "reference" else model
    ids, mask, types = _ragged_batch(5, 11)
    with torch.no_grad():
        want = pool(model(ids, mask, types).last_hidden_state, mask, pooling, normalize)
        static = pad_batch({"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, (8, 16))
        with modeling.graph_layout(), last_layer_row_counts() as rows:
            got = padded_embeddings(model, static, pooling, normalize)
            # cls pooling reads one row per bucket row: the last layer computes those only
            assert rows == [8 if pooling == "cls" else "all"]
            # the layout the graph runs: every position of the bucket through the encoder
            assert rows_through_last_feed_forward(model, input_ids=static["input_ids"],
                                                  attention_mask=static["attention_mask"]) == 8 * 16
    assert got.shape == (8, 16) and got.dtype == torch.float32
    tol = 1e-6 if kernels == "reference" else 1e-5
    torch.testing.assert_close(got[:5], want.float(), rtol=tol, atol=tol)
    assert (got[5:] == 0).all() if pooling == "mean" else torch.isfinite(got[5:]).all()


def test_graphed_encoder_argument_errors():
    model = _tiny("BertModel")
    with pytest.raises(ValueError, match="CUDA"):
        GraphedEncoder(model, batch_size=4, seq_buckets=(8,))
    if torch.cuda.is_available():
        model = model.cuda()
        for kw, message in ((dict(pooling="max"), "pooling"), (dict(seq_buckets=(16, 8)), "increasing"),
                            (dict(batch_size=0), "positive")):
            with pytest.raises(ValueError, match=message):
                GraphedEncoder(model, **{"batch_size": 4, "seq_buckets": (8,), **kw})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast_dtype, pooling", [(None, "mean"), (None, "cls"), (torch.bfloat16, "mean")])
def test_graphed_encoder_gives_the_eager_embeddings(autocast_dtype, pooling):
    """Replays (two buckets interleaved, short batches, inputs on the GPU and on the CPU) give the
    eager unpadded encoder's vectors; a returned tensor survives later replays; one graph per
    bucket; a batch longer than any bucket is refused."""
    from fastbert.encode import pool
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = fastbert.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=96)
    torch.manual_seed(0)
    model = fastbert.BertModel(cfg).cuda().eval()
    normalize = pooling == "mean"
    # The dtype the feed-forward computes in while the graphs are warmed up and captured (hooks run
    # then, not on replay): bf16 under the requested autocast, fp32 otherwise. Checked directly, since
    # the vectors of this small model barely tell bf16 from fp32.
    seen = []
    hook = model.encoder.layer[0].intermediate.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    enc = GraphedEncoder(model, batch_size=8, seq_buckets=(16, 32), pooling=pooling, normalize=normalize,
                         autocast_dtype=autocast_dtype)

    def eager(ids, mask, types):
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return pool(model(ids, mask, types).last_hidden_state, mask, pooling, normalize)

    kept = []
    with torch.inference_mode():
        for i, (rows, seq) in enumerate([(8, 12), (8, 30), (5, 9), (8, 16), (3, 32)]):
            batch = _ragged_batch(rows, seq, vocab=97, seed=i)
            on_gpu = [t.cuda() for t in batch]
            got = enc(*(on_gpu if i % 2 == 0 else batch))  # CPU inputs are padded there, then copied
            want = eager(*on_gpu)
            assert got.shape == (rows, 64) and got.is_cuda and got.dtype == torch.float32
            if autocast_dtype is None:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            else:  # bf16 autocast in both: the padded and unpadded layouts round differently
                assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.999
            kept.append((got, want))
        # the first result, after four more replays (two of them in its own bucket), is still its batch's
        first, first_want = kept[0]
        if autocast_dtype is None:
            torch.testing.assert_close(first, first_want, rtol=1e-4, atol=1e-5)
        else:
            assert torch.nn.functional.cosine_similarity(first, first_want, dim=-1).min() > 0.999
        assert sorted(enc.graphs) == [(8, 16), (8, 32)]
        with pytest.raises(ValueError, match="exceeds the largest bucket"):
            enc(*(t.cuda() for t in _ragged_batch(2, 33, vocab=97)))
    hook.remove()
    # the eager reference calls ran the hook too, under the same autocast: every record is that dtype
    assert seen and set(seen) == {autocast_dtype or torch.float32}


# A fresh process (the order matters and capture state is process-wide): an inference-graph capture
# made from inside inference mode, then a training-graph capture. Before torch 2.11, a capture made in
# inference mode broke every later capture; GraphedEncoder captures outside it for that reason.
_CAPTURE_ORDER = r"""
import torch, fastbert
from fastbert.cuda_graphs import GraphedEncoder, GraphedTrainStep
cfg = fastbert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
torch.manual_seed(0)
model = fastbert.BertForSequenceClassification(cfg).cuda()
ids = torch.randint(1, 50, (3, 10))
mask = torch.ones_like(ids)
with torch.inference_mode():
    emb = GraphedEncoder(model.bert.eval(), batch_size=4, seq_buckets=(16,))(ids, mask)
assert emb.shape == (3, 32) and torch.isfinite(emb).all()
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
step = GraphedTrainStep(model, opt, batch_size=4, seq_buckets=(16,))
losses = [float(step({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0])})) for _ in range(3)]
assert all(l == l for l in losses) and losses[-1] < losses[0], losses
print("ok", losses)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_inference_capture_does_not_break_a_later_training_capture():
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _CAPTURE_ORDER], capture_output=True, text=True, timeout=300,
                         env={**os.environ})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_pad_batch_without_attention_mask_keeps_padding_out_of_attention():
    """A batch without attention_mask (the model then attends to every position) padded to a longer
    bucket must not let the real tokens attend to the padding: the graphed step's loss is the eager one."""
    from fastbert import modeling
    torch.manual_seed(0)
    model = fastbert.BertForSequenceClassification(fastbert.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)).eval()
    batch = {"input_ids": torch.randint(1, 50, (2, 5)), "labels": torch.tensor([0, 2])}
    padded = pad_batch(batch, (4, 16))
    assert padded["attention_mask"].tolist() == [[1] * 5 + [0] * 11] * 2 + [[0] * 16] * 2
    with torch.no_grad(), modeling.graph_layout():
        torch.testing.assert_close(model(**padded).loss, model(**batch).loss, rtol=0, atol=1e-6)


def test_buckets_and_their_checks():
    """A batch runs in the graph of batch_size rows and the shortest bucket holding its length (a length
    equal to a bucket fits it); more rows or a longer batch is refused, as are buckets that are empty,
    unordered or not positive, and batch_size < 1 (host-side checks, before any GPU work)."""
    from fastbert.cuda_graphs import _bucket, _check_buckets
    assert _bucket(3, 16, 8, (16, 32)) == (8, 16)
    assert _bucket(8, 17, 8, (16, 32)) == (8, 32)
    assert _bucket(1, 1, 8, (16, 32)) == (8, 16) and _bucket(8, 32, 8, (16, 32)) == (8, 32)
    with pytest.raises(ValueError, match="batch has 9 rows, more than batch_size=8"):
        _bucket(9, 4, 8, (16, 32))
    with pytest.raises(ValueError, match="sequence length 33 exceeds the largest bucket 32"):
        _bucket(1, 33, 8, (16, 32))
    _check_buckets(1, (1,))
    _check_buckets(4, [8, 16, 128])
    for batch_size, buckets, message in ((0, (8,), "batch_size must be positive, got 0"),
                                         (4, (), "seq_buckets must be increasing positive lengths"),
                                         (4, (16, 8), "increasing"), (4, (0, 8), "positive lengths")):
        with pytest.raises(ValueError, match=message):
            _check_buckets(batch_size, buckets)


def test_pad_batch_skips_absent_inputs():
    out = pad_batch({"input_ids": torch.ones(1, 2, dtype=torch.long), "token_type_ids": None,
                     "labels": torch.tensor([1])}, (2, 4))
    assert sorted(out) == ["attention_mask", "input_ids", "labels"]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]


def test_masked_row_bound_is_checked_before_the_device(monkeypatch):
    """max_masked_rows < 1 is refused before anything else (a CPU model shows it); a CPU batch with
    exactly max_masked_rows labelled tokens is accepted and reaches the graph."""
    model = _tiny("BertForPreTraining")
    with pytest.raises(ValueError, match="max_masked_rows must be positive, got 0"):
        GraphedTrainStep(model, torch.optim.AdamW(model.parameters()), batch_size=2, seq_buckets=(8,),
                         max_masked_rows=0)
    step = GraphedTrainStep.__new__(GraphedTrainStep)
    batch = _pretraining_batch(rows=2, seq=5, vocab=50)
    n = int((batch["labels"] != -100).sum())
    assert n > 0
    step.mlm_heads, step.max_masked_rows, step.batch_size, step.seq_buckets = [model.cls.predictions], n, 2, (5,)
    step.graphs, step._capture, step.device = {}, None, torch.device("cpu")
    from fastbert import cuda_graphs
    replayed = []
    monkeypatch.setattr(cuda_graphs, "_replay", lambda graphs, shape, padded, *a: replayed.append(shape) or torch.zeros(2))
    assert step(batch).tolist() == [0.0, 0.0] and replayed == [(2, 5)]


def test_graphed_encoder_refuses_packed_masks_before_the_graph(monkeypatch):
    """A CPU attention mask holding example numbers (packed rows: 2, 3, ...) is refused before any
    copy or replay; a 0/1 mask of any integer dtype (or bool) goes on to the graph."""
    from fastbert import cuda_graphs
    enc = GraphedEncoder.__new__(GraphedEncoder)
    enc.batch_size, enc.seq_buckets, enc.graphs, enc._capture, enc.device = 4, (8,), {}, None, torch.device("cpu")
    replayed = []
    monkeypatch.setattr(cuda_graphs, "_replay", lambda graphs, shape, padded, *a: replayed.append(
        (shape, padded["attention_mask"].tolist())) or torch.arange(4.0)[:, None])
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="0/1 attention masks"):
        enc(ids, torch.tensor([[1, 1, 2], [1, 1, 1]]))
    assert replayed == []
    assert enc(ids, torch.tensor([[1, 1, 0], [1, 1, 1]])).tolist() == [[0.0], [1.0]]
    assert enc(ids, torch.tensor([[True, False, False], [True, True, True]])).shape == (2, 1)
    assert replayed[0] == ((4, 8), [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [0] * 8, [0] * 8])
