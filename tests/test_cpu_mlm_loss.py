"""The CPU fast path of K.mlm_loss (kernels/cpu_mlm_loss.py: vocabulary-chunked GEMMs, gradient
formed in the forward, reused workspace) against the float64 reference, by the shared tolerance rule."""
from __future__ import annotations

import pytest
import torch

import fastbert.kernels as K
from fastbert.kernels import cpu_mlm_loss as cml
from test_mlm_loss import (IGNORE, _check_against_reference, _inputs, _leaves, _run,
                           check_unvalidated_bad_label_gives_nan)
from tolerance import assert_close_to_reference

CPU = "cpu"


@pytest.fixture
def fast_path(monkeypatch):
    """Auto backend (the CPU path under test) and a count of the calls that took it."""
    monkeypatch.setenv("FASTBERT_KERNELS", "auto")
    calls = []
    real = cml._ChunkedMLMLoss.apply

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(cml._ChunkedMLMLoss, "apply", counted)
    return calls


@pytest.mark.parametrize("rows,h,vocab,cols", [
    (45, 37, 1031, None),   # one chunk (2048 columns at this width)
    (45, 37, 1031, 128),    # 8 chunks of 128 and a 7-column tail
    (33, 64, 1031, 1000),   # 1000 + 31
    (6, 64, 30522, None),   # BERT's vocabulary: 14 chunks of 2048 and a 1850-column tail
    (1, 16, 5, None),       # vocab smaller than a chunk, one row
])
def test_loss_and_grads(fast_path, monkeypatch, rows, h, vocab, cols):
    if cols is not None:
        monkeypatch.setattr(cml, "chunk_columns", lambda hidden_size: cols)
    c = cml.chunk_columns(h)
    # labels at the edges of the chunks: the last column, the first column of the second chunk, the
    # first column of the last (short) chunk; the rest random with half ignored
    labels = torch.randint(0, vocab, (rows,))
    labels[torch.rand(rows) < 0.5] = IGNORE
    for i, col in enumerate((vocab - 1, min(c, vocab - 1), (vocab - 1) // c * c)[:rows]):
        labels[i] = col
    _check_against_reference(rows, h, vocab, torch.float32, CPU, labels=labels)
    assert len(fast_path) == 1


def test_noncontiguous_hidden_mostly_labelled(fast_path, monkeypatch):
    monkeypatch.setattr(cml, "chunk_columns", lambda hidden_size: 256)
    _check_against_reference(40, 48, 1031, torch.float32, CPU, noncontiguous=True, ignored=0.1,
                             ignore_index=-1)
    assert len(fast_path) == 1


def test_chunk_columns_hold_about_one_mib_of_weight():
    assert [cml.chunk_columns(h) for h in (16, 256, 384, 768, 1024, 4096)] == [2048, 1024, 512, 256, 256, 128]


def test_all_ignored_and_no_rows_give_zeros(fast_path):
    hidden, weight, bias, labels = _inputs(9, 37, 1031, torch.float32, CPU)
    for h, lab in ((hidden, torch.full_like(labels, IGNORE)), (hidden[:0], labels[:0])):
        leaves = _leaves((h, weight, bias), torch.float32)
        loss, dh, dw, db = _run(K.mlm_loss, leaves, lab)
        assert loss.item() == 0.0 and dh.shape == h.shape
        for g in (dh, dw, db):
            assert torch.count_nonzero(g) == 0
    assert len(fast_path) == 2


def test_incoming_gradient_and_a_subset_of_gradients(fast_path):
    hidden, weight, bias, labels = _inputs(30, 37, 1031, torch.float32, CPU)
    ref = _leaves((hidden, weight, bias), torch.float64)
    (K.reference.mlm_loss(*ref, labels) * -2.5).backward()
    base = _leaves((hidden, weight, bias), torch.float32)
    (K.reference.mlm_loss(*base, labels) * -2.5).backward()
    for wanted in ((True, True, True), (False, True, False), (True, False, True)):
        leaves = [t.detach().float().requires_grad_(w) for t, w in zip((hidden, weight, bias), wanted)]
        (K.mlm_loss(*leaves, labels) * -2.5).backward()
        for t, w, b, r in zip(leaves, wanted, base, ref):
            assert (t.grad is not None) == w
            if w:
                assert_close_to_reference(t.grad, b.grad, r.grad, k=2, name=f"grad x -2.5 {wanted}")
    assert len(fast_path) == 3


def test_workspace_reused_across_steps_never_while_a_backward_holds_it(fast_path):
    hidden, weight, bias, labels = _inputs(20, 37, 1031, torch.float32, CPU)
    other = _inputs(20, 37, 1031, torch.float32, CPU)[0]
    first = _run(K.mlm_loss, _leaves((hidden, weight, bias), torch.float32), labels)
    buf = cml._workspace().buf
    again = _run(K.mlm_loss, _leaves((hidden, weight, bias), torch.float32), labels)
    assert cml._workspace().buf is buf  # the step after reused it ...
    for a, b in zip(first, again):  # ... and computes bitwise the same
        assert torch.equal(a, b)
    # Two forwards before either backward: the second must not overwrite the first's saved gradient.
    alone = _run(K.mlm_loss, _leaves((other, weight, bias), torch.float32), labels)
    la, lb = _leaves((hidden, weight, bias), torch.float32), _leaves((other, weight, bias), torch.float32)
    loss_a, loss_b = K.mlm_loss(*la, labels), K.mlm_loss(*lb, labels)
    loss_b.backward()
    loss_a.backward()
    for t, g in zip(la, first[1:]):
        assert torch.equal(t.grad, g)
    for t, g in zip(lb, alone[1:]):
        assert torch.equal(t.grad, g)
    with torch.no_grad():  # no gradient wanted: nothing is kept, and the loss is the same
        assert torch.equal(K.mlm_loss(*la, labels), first[0])
    from fastbert.kernels._workspace import sole_owner
    assert sole_owner(cml._workspace().buf)  # free for the next call
    assert len(fast_path) == 6


@pytest.mark.parametrize("bad", [1031, 1040, -1])
def test_unvalidated_bad_label_gives_nan(fast_path, bad):
    check_unvalidated_bad_label_gives_nan(bad, CPU)
    assert len(fast_path) == 1


def test_not_taken_for_other_backends_dtypes_or_out_dtypes(fast_path, monkeypatch):
    hidden, weight, bias, labels = _inputs(8, 37, 1031, torch.float32, CPU)
    K.mlm_loss(hidden, weight, bias, labels)  # float64: the reference (the oracle itself)
    K.mlm_loss(hidden.float(), weight.float(), bias.float(), labels, out_dtype=torch.float64)
    monkeypatch.setenv("FASTBERT_KERNELS", "reference")
    K.mlm_loss(hidden.float(), weight.float(), bias.float(), labels)
    assert fast_path == []


def test_each_thread_has_its_own_workspace(fast_path):
    import threading
    hidden, weight, bias, labels = _inputs(12, 37, 1031, torch.float32, CPU)
    here = _run(K.mlm_loss, _leaves((hidden, weight, bias), torch.float32), labels)
    seen = {}

    def other():
        seen["result"] = _run(K.mlm_loss, _leaves((hidden, weight, bias), torch.float32), labels)
        seen["buf"] = cml._workspace().buf
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["buf"] is not cml._workspace().buf
    for a, b in zip(here, seen["result"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rows,h,vocab,cols", [
    (45, 37, 1031, 128),   # 8 chunks and a 7-column tail
    (6, 64, 30522, None),  # BERT's vocabulary
    (1, 16, 5, None),
])
def test_bf16_hidden_as_under_autocast(fast_path, monkeypatch, rows, h, vocab, cols):
    """bf16 hidden with fp32 weight and bias (the MLM head under CPU autocast): the fp32 loss and the
    three gradients within 2x of the reference's own error under autocast (bf16 logits, then
    F.cross_entropy), against float64."""
    if cols is not None:
        monkeypatch.setattr(cml, "chunk_columns", lambda hidden_size: cols)
    hidden, weight, bias, labels = _inputs(rows, h, vocab, torch.float64, CPU)
    reference = _run(K.reference.mlm_loss, _leaves((hidden, weight, bias), torch.float64), labels)

    def under_autocast(fn):
        leaves = [hidden.to(torch.bfloat16).requires_grad_(), *_leaves((weight, bias), torch.float32)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(*leaves, labels, out_dtype=torch.float32)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    baseline = under_autocast(K.reference.mlm_loss)
    ours = under_autocast(K.mlm_loss)
    assert len(fast_path) == 1
    for name, a, b, r in zip(("loss", "d_hidden", "d_weight", "d_bias"), ours, baseline, reference):
        assert a.dtype == b.dtype, name
        assert_close_to_reference(a, b, r, k=2, name=f"{name} bf16 rows={rows} vocab={vocab}")
