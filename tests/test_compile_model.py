"""torch.compile of the model: the encoder traces into one graph (no graph breaks) through the
custom ops, in both layouts, and gives eager's outputs and gradients.

aot_eager compiles the trace without inductor's code generation: the property under test is the
trace (fullgraph through fastbert's custom ops and their autograd), which is what a GPU compile
builds on. The Triton kernels run in the interpreter here (compiled on a GPU run).
"""
import os
import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert.modeling import _Packed, _Padded


@pytest.fixture
def fresh_process(request):
    """Run the test in a new interpreter, return True in the parent (which then only checks the child).

    Dynamo's fake-tensor call of a fastbert custom op once failed inside PyTorch's dispatcher
    ("schema_.has_value() INTERNAL ASSERT ... no schema registered") after other test modules had
    run in the same process; it never failed alone. A fresh process keeps the check exact.
    """
    if os.environ.get("FASTBERT_COMPILE_CHILD") == "1":
        return False
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                           cwd=str(request.config.rootpath), env={**os.environ, "FASTBERT_COMPILE_CHILD": "1"},
                           capture_output=True, text=True)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
    return True


def _model(device):
    cfg = fastbert.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return fastbert.BertModel(cfg).to(device).train()


@pytest.mark.parametrize("rows", [False, True], ids=["all-rows", "read-rows"])
@pytest.mark.parametrize("layout_name", ["packed", "padded"])
def test_encoder_compiles_fullgraph(triton_kernels, device, layout_name, rows, fresh_process):
    """read-rows: the last layer past its attention on some rows only (BertModel's output_rows; in the
    padded layout a fixed count, as under CUDA-graph capture)."""
    if fresh_process:
        return
    _check_encoder_compiles(device, layout_name, rows)


def test_encoder_with_fused_feed_forward_compiles_fullgraph(triton_kernels, device, fresh_process, monkeypatch):
    """The opt-in feed-forward block (K.feed_forward, modeling.FUSED_FFN) traces too: packed, last layer
    on the read rows."""
    if fresh_process:
        return
    from fastbert import modeling
    from fastbert.kernels import gemm_gelu as GG
    monkeypatch.setattr(modeling, "FUSED_FFN", True)
    calls = []
    for name in ("dense_gelu", "gelu_dgrad"):  # the compiled run's Triton epilogue kernels, counted alone
        real = getattr(GG, name)
        monkeypatch.setattr(GG, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    _check_encoder_compiles(device, "packed", True, between=calls.clear)
    assert calls.count("dense_gelu") == 2 and calls.count("gelu_dgrad") == 2, calls  # both layers, both ways


def _check_encoder_compiles(device, layout_name, rows, between=lambda: None):
    """between(): called after the eager run, before the compiled one."""
    torch._dynamo.reset()
    model = _model(device)
    mask = torch.ones(3, 9, dtype=torch.long, device=device)
    mask[1, 5:] = 0
    mask[2, 1:] = 0  # a length-1 row
    h = torch.randn(3, 9, 32, device=device)
    read = (torch.arange(27, device=device).view(3, 9) % 4 == 1) if rows else None
    layout = (_Packed(mask, read) if layout_name == "packed"
              else _Padded(mask.bool(), h.dtype, output_rows=read, max_rows=12 if rows else None))
    assert (layout.rows is not None) == rows
    x = layout.pack(h)

    def run(fn):
        xi = x.detach().clone().requires_grad_()
        out = fn(xi, layout)[0]
        loss = (out * torch.linspace(-1, 1, out.shape[-1], device=device)).square().sum()
        grads = torch.autograd.grad(loss, [xi, *model.parameters()], allow_unused=True)
        return out.detach(), grads

    want_out, want_grads = run(model.encoder)
    between()
    got_out, got_grads = run(torch.compile(model.encoder, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_pretraining_model_compiles_and_gives_eager_loss_and_gradients(reference_kernels, fresh_process):
    """BertForPreTraining training with MLM labels (the last layer on the read rows, the MLM head on the
    masked rows): compiled with graph breaks at the host syncs, it gives eager's loss and gradients."""
    if fresh_process:
        return
    torch._dynamo.reset()
    cfg = fastbert.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = fastbert.BertForPreTraining(cfg).train()
    ids = torch.randint(1, 101, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    labels = torch.where(torch.rand(3, 7) < 0.3, ids, -100)
    labels[0, 2] = 5
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, next_sentence_label=torch.tensor([0, 1, 1]))
    results = []
    for fn in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad()
        loss = fn(**kw).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert len(got_g) == len(want_g)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_whole_model_compiles_with_breaks_only_at_the_layout(reference_kernels, fresh_process):
    """Outside the encoder, unpadding reads the row lengths back (one host sync): that is the only
    place Dynamo may split the graph; the compiled model gives eager's loss."""
    if fresh_process:
        return
    torch._dynamo.reset()
    cfg = fastbert.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              num_labels=3)
    model = fastbert.BertForSequenceClassification(cfg).train()
    ids = torch.randint(1, 101, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    labels = torch.tensor([0, 1, 2])
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    explained = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, labels=labels)
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert reasons, "expected the one host sync of unpadding to split the graph"
    assert all("_local_scalar_dense" in r or "data-dependent" in r.lower() or "Data dependent" in r
               for r in reasons), reasons
    user_frames = {f.filename.rsplit("/", 1)[-1] + ":" + f.name for r in explained.break_reasons
                   for f in r.user_stack[-1:]}
    assert all(frame.startswith("modeling.py:__init__") for frame in user_frames), user_frames
    torch._dynamo.reset()
    got = torch.compile(model, backend="aot_eager")(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
