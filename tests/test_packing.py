"""Packed rows: several examples per row, numbered in the attention mask (a fastbert extension).

A packed batch must give every example what it gets when run alone, unpacked: hidden states, MLM
logits and NSP logits, and the gradients of the summed, matching-normalised losses. In float64 the
two differ only by summation order (~1e-16), so they are held to the float64 floor of the tolerance
rule (k = 0). A 0/1 mask must keep the layout, and so the outputs, of before packing existed: the
old layout is kept here as the oracle. The Triton varlen kernel runs the packed model in the
interpreter (compiled on a GPU run). Then the data side end to end: a `fastbert pretrain --pack` run.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import fastbert
import fastbert.modeling as modeling
from tolerance import assert_close_to_reference

CFG = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
           max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SEQ = 16
# rows of example lengths: two examples with padding; three (one of length 1); a full row; one example
ROWS = [[5, 9], [1, 7, 3], [12, 4], [6]]


def make_examples(seed=1, rows=ROWS, vocab=CFG["vocab_size"]):
    """Examples as the collator sees them: ids, token types (A then B), MLM labels (at least one)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in rows:
        for n in row:
            ids = torch.randint(1, vocab, (n,), generator=g)
            tt = (torch.arange(n) >= int(torch.randint(0, n + 1, (1,), generator=g))).long()
            labels = torch.full((n,), -100)
            pick = torch.rand(n, generator=g) < 0.3
            pick[int(torch.randint(0, n, (1,), generator=g))] = True
            labels[pick] = torch.randint(0, vocab, (int(pick.sum()),), generator=g)
            out.append(dict(input_ids=ids, token_type_ids=tt, labels=labels,
                            nsp=int(torch.randint(0, 2, (1,), generator=g))))
    return out


def pack(examples, rows=ROWS, seq=SEQ):
    """The packed batch (the layout collate_packed makes) and, per example, (row, start, slot)."""
    b, e = len(rows), max(len(r) for r in rows)
    batch = dict(input_ids=torch.zeros(b, seq, dtype=torch.long), attention_mask=torch.zeros(b, seq, dtype=torch.long),
                 token_type_ids=torch.zeros(b, seq, dtype=torch.long), position_ids=torch.zeros(b, seq, dtype=torch.long),
                 labels=torch.full((b, seq), -100), next_sentence_label=torch.full((b, e), -100))
    where, k = [], 0
    for r, row in enumerate(rows):
        at = 0
        for j, n in enumerate(row):
            ex = examples[k]
            for key in ("input_ids", "token_type_ids", "labels"):
                batch[key][r, at:at + n] = ex[key]
            batch["attention_mask"][r, at:at + n] = j + 1
            batch["position_ids"][r, at:at + n] = torch.arange(n)
            batch["next_sentence_label"][r, j] = ex["nsp"]
            where.append((r, at, j))
            at += n
            k += 1
    return batch, where


def model_pair(name="BertForPreTraining", seed=0):
    torch.manual_seed(seed)
    m64 = getattr(fastbert, name)(fastbert.BertConfig(**CFG)).double()
    m32 = getattr(fastbert, name)(fastbert.BertConfig(**CFG))
    m32.load_state_dict(m64.state_dict())
    return m64, m32


def alone(model, ex, **kw):
    return model(ex["input_ids"][None], token_type_ids=ex["token_type_ids"][None], **kw)


@pytest.mark.parametrize("positions", ["given", "derived"])
def test_packed_outputs_equal_each_example_alone(positions):
    m64, m32 = model_pair()
    examples = make_examples()
    batch, where = pack(examples)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              token_type_ids=batch["token_type_ids"], output_hidden_states=True)
    if positions == "given":
        kw["position_ids"] = batch["position_ids"]
    outs = {}
    with torch.no_grad():
        for dt, m in (("64", m64), ("32", m32)):
            m.eval()
            outs[dt] = m(**kw)
            outs["alone" + dt] = [alone(m, ex, output_hidden_states=True) for ex in examples]
    assert outs["64"].seq_relationship_logits.shape == (len(ROWS), 3, 2)
    for i, (ex, (r, at, j)) in enumerate(zip(examples, where)):
        n = len(ex["input_ids"])
        for key in ("prediction_logits", "hidden_states"):
            def mine(t):  # this example's tokens in the packed output
                return torch.stack(t)[:, r, at:at + n] if key == "hidden_states" else t[r, at:at + n]

            def solo(t):  # the output of the example run alone
                return torch.stack(t)[:, 0] if key == "hidden_states" else t[0]
            ref = solo(outs["alone64"][i][key])
            assert_close_to_reference(mine(outs["64"][key]), ref, ref, k=0, name=f"example {i} {key} (float64)")
            assert_close_to_reference(mine(outs["32"][key]), solo(outs["alone32"][i][key]), ref, k=4,
                                      name=f"example {i} {key} (float32)")
        nsp64, nsp32 = outs["alone64"][i].seq_relationship_logits[0], outs["alone32"][i].seq_relationship_logits[0]
        assert_close_to_reference(outs["64"].seq_relationship_logits[r, j], nsp64, nsp64, k=0, name=f"NSP {i}")
        assert_close_to_reference(outs["32"].seq_relationship_logits[r, j], nsp32, nsp64, k=4, name=f"NSP {i} f32")
    # slots past a row's last example are empty: zero pooled output
    pooled = m64.eval().bert(**{k: v for k, v in kw.items() if k != "output_hidden_states"}).pooler_output
    assert pooled.shape == (len(ROWS), 3, CFG["hidden_size"])
    assert (pooled[0, 2] == 0).all() and (pooled[3, 1:] == 0).all() and (pooled[1, 2] != 0).any()


def test_derived_positions_restart_per_example():
    batch, _ = pack(make_examples())
    layout = modeling._Packed(batch["attention_mask"])
    assert layout.packed and layout.max_examples == 3
    real = batch["attention_mask"] != 0
    assert torch.equal(layout.position_ids()[real], batch["position_ids"][real])
    lengths = [n for row in ROWS for n in row]
    assert layout.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert layout.max_seqlen == max(lengths) and layout.total == sum(lengths)


def test_packed_loss_and_gradients_equal_the_sum_over_examples():
    """Training mode (dropout 0): packed MLM is the mean over every masked token of the batch and NSP
    the mean over the examples; so its gradient is sum_i (n_i / N) grad mlm_i + (1 / E) grad nsp_i."""
    m64, _ = model_pair()
    m64.train()
    examples = make_examples(seed=3)
    batch, _ = pack(examples)
    loss = m64(**batch).loss
    loss.backward()
    packed = {n: p.grad.clone() for n, p in m64.named_parameters() if p.grad is not None}
    m64.zero_grad()
    n_masked = sum(int((ex["labels"] != -100).sum()) for ex in examples)
    total = 0.0
    for ex in examples:
        out = alone(m64, ex, labels=ex["labels"][None], next_sentence_label=torch.tensor([ex["nsp"]]))
        nsp = F.cross_entropy(out.seq_relationship_logits, torch.tensor([ex["nsp"]]))
        mlm = out.loss - nsp
        part = mlm * int((ex["labels"] != -100).sum()) / n_masked + nsp / len(examples)
        part.backward()
        total += part.detach()
    assert_close_to_reference(loss.detach(), total, total, k=0, name="loss")
    named = dict(m64.named_parameters())
    assert packed.keys() == {n for n, p in named.items() if p.grad is not None}
    for n, g in packed.items():
        assert_close_to_reference(g, named[n].grad, named[n].grad, k=0, name=f"grad {n}")


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForTokenClassification", "BertForNextSentencePrediction"])
def test_other_heads_that_take_packed_rows(name):
    m64, _ = model_pair(name)
    m64.eval()
    examples = make_examples(seed=4)
    batch, where = pack(examples)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        logits = m64(**inputs).logits
        for ex, (r, at, j) in zip(examples, where):
            ref = alone(m64, ex).logits[0]
            got = logits[r, j] if name == "BertForNextSentencePrediction" else logits[r, at:at + len(ex["input_ids"])]
            assert_close_to_reference(got, ref, ref, k=0, name=name)
    if name == "BertForNextSentencePrediction":
        loss = m64(**inputs, labels=batch["next_sentence_label"]).loss
        want = torch.stack([F.cross_entropy(alone(m64, ex).logits, torch.tensor([ex["nsp"]])) for ex in examples]).mean()
        assert_close_to_reference(loss, want, want, k=0, name="NSP loss")


class _LayoutBeforePacking:
    """fastbert's unpadded layout as it was before packed rows (the oracle of the 0/1 case)."""

    packed = False
    rows = None  # output_rows came later (every row is computed)
    lead_padding = False  # as was the pooler's padded layout for left-padded rows

    def __init__(self, attention_mask, output_rows=None, pending=None):
        if pending is not None:  # the model's deferred input checks (merged into _Packed's sync since)
            pending[1](pending[0].tolist())
        self.batch, self.seq = attention_mask.shape
        attention_mask = attention_mask.bool()
        lengths = attention_mask.sum(dim=1, dtype=torch.int32)
        self.cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        host = lengths.tolist()
        self.max_seqlen, self.total = max(host, default=0), sum(host)
        self.indices = (None if self.total == self.batch * self.seq else
                        torch.nonzero_static(attention_mask.flatten(), size=self.total).squeeze(1))

    pack = modeling._Packed.pack
    unpack = modeling._Packed.unpack


def test_zero_one_masks_keep_the_layout_and_outputs_bit_for_bit(monkeypatch):
    g = torch.Generator().manual_seed(7)
    masks = [torch.ones(3, 9, dtype=torch.long)]
    for _ in range(20):  # right and left padding, holes, rows of padding only
        masks.append((torch.rand(int(torch.randint(1, 6, (1,), generator=g)), 9, generator=g) < 0.7).long())
    masks.append(torch.tensor([[0, 0, 1, 1, 1, 0, 1, 0, 0], [0] * 9, [1] * 9]))
    for mask in masks:
        for m in (mask, mask.bool(), mask.float(), mask.int()):
            new, old = modeling._Packed(m), _LayoutBeforePacking(mask)
            assert not new.packed
            assert torch.equal(new.cu_seqlens, old.cu_seqlens), (mask, new.cu_seqlens, old.cu_seqlens)
            assert (new.max_seqlen, new.total) == (old.max_seqlen, old.total)
            assert (new.indices is None) == (old.indices is None)
            assert new.indices is None or torch.equal(new.indices, old.indices)
    # the whole model, in training mode with gradients: identical bits with the old layout. With a
    # pooler, rows start with a real token (a left-padded row runs the padded layout for the pooler).
    for name, mask in (("BertForMaskedLM", masks[-1]),
                       ("BertForPreTraining", torch.tensor([[1, 0, 1, 1, 1, 0, 1, 0, 0], [1] + [0] * 8, [1] * 9]))):
        model = getattr(fastbert, name)(fastbert.BertConfig(**CFG)).train()
        ids = torch.randint(1, CFG["vocab_size"], mask.shape, generator=g)
        labels = torch.where(mask.bool() & (torch.rand(ids.shape, generator=g) < 0.5), ids, -100)
        labels[0, 2] = 7
        nsp = dict(next_sentence_label=torch.tensor([0, 1, 1])) if name == "BertForPreTraining" else {}
        runs = []
        for layout in (modeling._Packed, _LayoutBeforePacking):
            monkeypatch.setattr(modeling, "_Packed", layout)
            model.zero_grad()
            out = model(ids, mask, labels=labels, output_hidden_states=True, **nsp)
            out.loss.backward()
            runs.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (new, new_grads), (old, old_grads) = runs
        if nsp:
            assert new.seq_relationship_logits.shape == (3, 2)
            assert torch.equal(new.seq_relationship_logits, old.seq_relationship_logits)
        assert torch.equal(new.loss, old.loss)
        assert all(torch.equal(a, b) for a, b in zip(new.hidden_states, old.hidden_states))
        assert len(new_grads) == len(old_grads) and all(torch.equal(a, b) for a, b in zip(new_grads, old_grads))


@pytest.mark.parametrize("row, message", [
    ([1, 1, 2, 2, 1, 0], "numbering"),   # example 1 again after example 2: split around it
    ([1, 1, 3, 3, 0, 0], "numbering"),   # a number skipped
    ([2, 2, 2, 0, 0, 0], "numbering"),   # not starting at 1
    ([1, 2, 2, 1, 2, 0], "numbering"),
    ([1, 1, -1, 0, 0, 0], "example number"),
])
def test_bad_packed_masks_are_refused(row, message):
    model = fastbert.BertModel(fastbert.BertConfig(**CFG))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], row])
    with pytest.raises(ValueError, match=message):
        model(torch.randint(1, 50, (2, 6)), mask)


def test_packed_masks_refused_where_they_cannot_work():
    batch, _ = pack(make_examples())
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with pytest.raises(ValueError, match="unpadded layout only"):
        fastbert.BertModel(fastbert.BertConfig(**CFG))(**inputs, output_attentions=True)
    with pytest.raises(ValueError, match="unpadded layout only"):
        fastbert.BertForQuestionAnswering(fastbert.BertConfig(**CFG))(**inputs)
    for name in ("BertForSequenceClassification",):
        with pytest.raises(ValueError, match="packed rows"):
            getattr(fastbert, name)(fastbert.BertConfig(**CFG))(**inputs)
    choice = {k: torch.stack([v, v], 1) for k, v in inputs.items()}
    with pytest.raises(ValueError, match="packed rows"):
        fastbert.BertForMultipleChoice(fastbert.BertConfig(**CFG))(**choice)
    with pytest.raises(ValueError, match="next_sentence_label has shape"):
        fastbert.BertForPreTraining(fastbert.BertConfig(**CFG))(
            **inputs, labels=batch["labels"], next_sentence_label=torch.zeros(len(ROWS), dtype=torch.long))


# ---- the Triton varlen kernel through the model ------------------------------------------------

KCFG = dict(vocab_size=67, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_packed_model_on_triton_kernels(device, triton_kernels, monkeypatch):
    """fp32 on the Triton kernels (varlen attention over per-example sequences, fused MLM loss...)
    against float64 on each example alone; baseline: the same packed batch on the reference ops.
    Loss and every gradient (the NSP head's included, so each example's NSP logits)."""
    rows = [[5, 9], [1, 13], [6]]
    torch.manual_seed(0)
    m64 = fastbert.BertForPreTraining(fastbert.BertConfig(**KCFG)).double()
    ours = fastbert.BertForPreTraining(fastbert.BertConfig(**KCFG))
    ours.load_state_dict(m64.state_dict())
    ours.to(device)
    examples = make_examples(seed=5, rows=rows, vocab=KCFG["vocab_size"])
    batch, _ = pack(examples, rows=rows, seq=14)
    batch_dev = {k: v.to(device) for k, v in batch.items()}

    def run(backend, model, b):
        monkeypatch.setenv("FASTBERT_KERNELS", backend)
        model.train()
        model.zero_grad()
        out = model(**b)
        out.loss.backward()
        return out.loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run("triton", ours, batch_dev)
    base_loss, base_grads = run("reference", ours, batch_dev)
    monkeypatch.setenv("FASTBERT_KERNELS", "reference")
    m64.train()
    n_masked = sum(int((ex["labels"] != -100).sum()) for ex in examples)
    ref_loss = 0.0
    for ex in examples:
        out = alone(m64, ex, labels=ex["labels"][None], next_sentence_label=torch.tensor([ex["nsp"]]))
        nsp = F.cross_entropy(out.seq_relationship_logits, torch.tensor([ex["nsp"]]))
        part = (out.loss - nsp) * int((ex["labels"] != -100).sum()) / n_masked + nsp / len(examples)
        part.backward()
        ref_loss += part.detach()
    assert_close_to_reference(loss, base_loss, ref_loss, k=4, name="loss")
    ref_grads = {n: p.grad for n, p in m64.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert_close_to_reference(grads[n], base_grads[n], ref_grads[n], k=4, name=f"grad {n}")


# ---- `fastbert pretrain --pack` ------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    """20 steps of `fastbert pretrain --pack` (micro) on twelve short documents of the sample corpus,
    checkpoints at steps 10 and 20; returns (run folder, argv)."""
    from fastbert.cli import main as cli_main
    from fastbert.pretrain import sample_corpus_path
    tmp = tmp_path_factory.mktemp("packed_run")
    with open(sample_corpus_path(), encoding="utf-8") as f:
        lines = [line.strip() for _, line in zip(range(400), f) if line.strip()]
    docs = ["\n".join(lines[i:i + 15]) for i in range(0, 180, 15)]
    corpus = tmp / "c.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = tmp / "run"
    argv = ["pretrain", "--corpus", str(corpus), "--out", str(out), "--config", "micro", "--seq-len", "64",
            "--batch-size", "4", "--vocab-size", "300", "--eval-examples", "8", "--no-progress", "--pack",
            "--max-example-len", "32", "--steps", "20", "--log-every", "5", "--eval-every", "0",
            "--save-every", "10", "--keep-checkpoints", "2", "--cache-dir", str(tmp / "cache")]
    assert cli_main(argv) == 0
    return out, argv


def test_pretrain_cli_with_packing_trains(packed_run):
    from fastbert.trainer import read_metrics
    out, _ = packed_run
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    # 20 micro steps: NSP learns fast, MLM slowly (a few dozen masked tokens per step)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2 and rows[-1]["mlm_loss"] < rows[0]["mlm_loss"], rows
    assert all(0 < r["nsp_loss"] < 1.5 for r in rows) and "mlm_accuracy" in rows[-1]
    with open(out / "run_args.json") as f:
        assert '"pack": true' in f.read()
    fastbert.BertForPreTraining.from_pretrained(str(out))


def test_packed_run_resumes_bit_for_bit(packed_run, tmp_path):
    """Rewound to its step-10 checkpoint, the run continues over the same packed rows (the data
    position is (epoch, row)) to the same weights."""
    import shutil

    from fastbert.cli import main as cli_main
    out, argv = packed_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step-00000020")
    (again / "checkpoints" / "latest").write_text("step-00000010\n")
    (again / "model.safetensors").unlink()  # only the resumed steps may write it back
    assert cli_main(["pretrain", "--out", str(again), "--resume", "--no-progress",
                     "--cache-dir", argv[argv.index("--cache-dir") + 1]]) == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    from fastbert.trainer import read_metrics

    def rows(run):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(run / "metrics.jsonl")]
    assert rows(again) == rows(out) and [r["step"] for r in rows(again)] == [5, 10, 15, 20]


def test_an_unpadded_forward_reads_the_device_once(monkeypatch):
    """The input checks (ids in range, mask values) and the unpadded layout (row lengths, packing) each
    need values on the host; an eager forward reads them in one sync (a GPU waits on every one, with
    nothing queued behind it). Counted as host reads of tensors during BertModel's forward on a padded
    0/1 mask; the padded layout (output_attentions) has no layout sync, so its count is the checks' one."""
    reads = []
    for method in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy", "nonzero"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            reads.append(_method)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, counted)
    model = fastbert.BertModel(fastbert.BertConfig(**CFG)).eval()
    ids = torch.randint(1, 50, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    batch, _ = pack(make_examples())
    reads.clear()  # (building the batch read tensors on the host)
    with torch.no_grad():
        unpadded = model(ids, mask).last_hidden_state
        assert reads == ["tolist"], reads
        reads.clear()
        padded = model(ids, mask, output_attentions=True).last_hidden_state
        assert reads == ["tolist"], reads
        reads.clear()
        # packed rows, and the rows a head reads (output_rows: the layout's extra count)
        model(batch["input_ids"], batch["attention_mask"], output_rows=batch["labels"] != -100)
        assert reads == ["tolist"], reads
    torch.testing.assert_close(unpadded[mask.bool()], padded[mask.bool()])


def test_value_errors_come_before_the_output_rows_shape_error():
    """The input checks' values are read in the layout's sync; an error found before it (a wrong
    output_rows shape) still reports an out-of-range id first, as when the checks read on their own."""
    model = fastbert.BertModel(fastbert.BertConfig(**CFG))
    ids = torch.randint(1, 50, (2, 6))
    ids[1, 2] = CFG["vocab_size"] + 5
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(ids, torch.ones(2, 6, dtype=torch.long), output_rows=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="output_rows has shape"):
        model(ids.clamp(max=50), torch.ones(2, 6, dtype=torch.long), output_rows=torch.ones(2, 5, dtype=torch.bool))
