"""The whole model running the Triton kernels (interpreted on CPU, compiled on a GPU) against
transformers in float64: outputs, losses and every parameter gradient, by the tolerance rule.

Complements test_modeling.py (which checks the model structure on the reference ops): here every
hot path goes through fastbert.kernels' Triton implementation — embeddings + LayerNorm, varlen
attention (unpadded classes) and padded attention with a key mask (QA), bias-GELU, add + LayerNorm,
GELU + LayerNorm and the fused MLM loss.
"""
import contextlib

import pytest
import torch

import fastbert
from interpreter_bounds import BF16_COMPUTED
from tolerance import assert_close_to_reference

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=131, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
           max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch(device, name):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, CFG["vocab_size"], (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 1:] = 0
    tt = torch.randint(0, 2, ids.shape, generator=g)
    labels = {
        "BertForPreTraining": dict(
            labels=torch.where((torch.rand(ids.shape, generator=g) < 0.3) & mask.bool(), ids, -100),
            next_sentence_label=torch.tensor([0, 1, 1])),
        "BertForQuestionAnswering": dict(start_positions=torch.tensor([2, 0, 0]), end_positions=torch.tensor([4, 5, 0])),
        "BertForSequenceClassification": dict(labels=torch.tensor([1, 0, 1])),
    }[name]
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=mask, token_type_ids=tt, **labels).items()}



def _same_weights(name, device, random_biases=False, **overrides):
    """transformers' model `name` in float64 on the CPU, the same on `device` in fp32, and fastbert's on
    `device`, all with the float64 model's weights (seeded; modules in training mode, as constructed).
    overrides: config fields; random_biases: every bias drawn N(0, 0.1) instead of transformers' zeros
    (a bias the model dropped would then show in the outputs, not only in its gradient)."""
    cfg = {**CFG, **overrides}
    torch.manual_seed(0)
    hf64 = getattr(transformers, name)(transformers.BertConfig(**cfg)).double()
    if random_biases:
        with torch.no_grad():
            for pname, param in hf64.named_parameters():
                if pname.endswith(".bias") and "LayerNorm" not in pname:
                    param.normal_(0.0, 0.1)
    hf = getattr(transformers, name)(transformers.BertConfig(**cfg)).to(device)
    hf.load_state_dict(hf64.state_dict())
    ours = getattr(fastbert, name)(fastbert.BertConfig(**cfg)).to(device)
    ours.load_state_dict(hf64.state_dict())
    return hf64, hf, ours

@pytest.mark.parametrize("name", ["BertForPreTraining", "BertForQuestionAnswering", "BertForSequenceClassification"])
def test_model_on_triton_kernels_matches_transformers(name, device, triton_kernels):
    hf64, hf32, ours = _same_weights(name, device)
    batch = _batch(device, name)
    batch64 = {k: v.cpu() for k, v in batch.items()}
    real = batch64["attention_mask"].bool()

    # eval: every output at real positions
    outs = []
    for model, b in ((hf64, batch64), (hf32, batch), (ours, batch)):
        model.eval()
        with torch.no_grad():
            outs.append(model(**b))
    ref, base, out = outs
    for key in ref.keys():
        r, b_, o = ref[key], base[key].cpu(), out[key].cpu()
        if r.dim() >= 2 and tuple(r.shape[:2]) == tuple(real.shape):
            r, b_, o = r[real], b_[real], o[real]
        assert_close_to_reference(o, b_, r, k=4, name=f"{name}.{key}")

    # training (dropout off): loss and every gradient; the MLM head runs on masked rows only
    results = []
    for model, b in ((hf64, batch64), (hf32, batch), (ours, batch)):
        model.train()
        model.zero_grad()
        loss = model(**b).loss
        loss.backward()
        results.append((loss.detach().cpu(), {n: (p.grad if p.grad is not None else torch.zeros_like(p)).cpu()
                                              for n, p in model.named_parameters()}))
    (rl, rg), (bl, bg), (ol, og) = results
    assert_close_to_reference(ol, bl, rl, k=4, name=f"{name}.loss")
    for pname in rg:
        assert_close_to_reference(og[pname], bg[pname], rg[pname], k=4, name=f"{name} grad {pname}")


def test_training_with_dropout_is_finite_and_seeded(device, triton_kernels):
    cfg = {**CFG, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    model = fastbert.BertForPreTraining(fastbert.BertConfig(**cfg)).to(device).train()
    batch = _batch(device, "BertForPreTraining")
    losses = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        losses.append(model(**batch).loss.item())
    assert all(map(lambda x: x == x and abs(x) < 1e4, losses))
    assert losses[0] == losses[1] != losses[2]


@pytest.mark.skipif(not BF16_COMPUTED, reason="Triton's own interpreter computes bf16 wrongly")
def test_bf16_autocast_training_step_matches_transformers(device, triton_kernels):
    """bf16 autocast (the GPU training recipe): loss and gradients against transformers float64,
    judged against transformers' own bf16-autocast error (on the CPU: CPU autocast, the kernels
    interpreted with bf16 computed as on a GPU)."""
    name = "BertForPreTraining"
    hf64, hf16, ours = _same_weights(name, device)
    batch = _batch(device, name)
    batch64 = {k: v.cpu() for k, v in batch.items()}
    results = []
    for model, b, amp in ((hf64, batch64, False), (hf16, batch, True), (ours, batch, True)):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = model(**b).loss
        loss.backward()
        results.append((loss.detach().float().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters()
                                                      if p.grad is not None}))
    (rl, rg), (bl, bg), (ol, og) = results
    assert_close_to_reference(ol, bl, rl.float(), k=4, name="bf16 loss", atol=1e-3)
    for pname in ("bert.encoder.layer.0.attention.self.query.weight", "bert.embeddings.word_embeddings.weight",
                  "cls.predictions.transform.dense.weight", "bert.encoder.layer.1.output.LayerNorm.weight"):
        assert_close_to_reference(og[pname], bg[pname], rg[pname].float(), k=4, name=f"bf16 grad {pname}", atol=1e-3)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_autocast_low_copy_changes_no_bit(device, triton_kernels, monkeypatch, add_layer_norm_calls, dropout):
    """Under autocast every LayerNorm that makes the fp32 residual stream also writes its copy in the
    autocast dtype for the next matmul, and takes that copy's gradient in its backward kernel
    (K.add_layer_norm(low_dtype=...)). That is the same arithmetic as autocast's cast and autograd's
    add: loss and every gradient equal the unfused model's bit for bit."""
    from fastbert import modeling
    low = _low_dtype(device)
    name = "BertForPreTraining"
    cfg = dict(CFG, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    model = getattr(fastbert, name)(fastbert.BertConfig(**cfg)).to(device).train()
    batch = _batch(device, name)
    # the copies are what the matmuls read: the feed-forward's and the second QKV's input dtypes
    seen = []
    for module in (model.bert.encoder.layer[0].intermediate, model.bert.encoder.layer[1].attention.self):
        module.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))

    def step(fused):
        if not fused:
            monkeypatch.setattr(modeling, "_matmul_copy_dtype", lambda residual: None)
        model.zero_grad(set_to_none=True)
        add_layer_norm_calls.clear()
        seen.clear()
        torch.manual_seed(1)  # the same dropout masks in both runs
        with torch.autocast(device, dtype=low):
            loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, [c.get("low_dtype") for c in add_layer_norm_calls], list(seen)

    loss_f, grads_f, calls_f, seen_f = step(True)
    loss_u, grads_u, calls_u, seen_u = step(False)
    # 2 layers x (attention, feed-forward); the last layer's output feeds no QKV matmul: no copy there
    assert calls_f == [low, low, low, None] and calls_u == [None] * 4
    assert seen_f == [low, low] and seen_u == [torch.float32, torch.float32]
    assert torch.isfinite(loss_f) and torch.equal(loss_f, loss_u)
    assert grads_f.keys() == grads_u.keys() and len(grads_f) > 20
    for n in grads_f:
        assert torch.equal(grads_f[n], grads_u[n]), n


def _low_dtype(device):
    # autocast's dtype in the model tests: bf16, as on a GPU; fp16 stands in only under Triton's own
    # interpreter (it computes bf16 wrongly; tests/interpreter_gpu_like.py makes it compute bf16)
    return torch.bfloat16 if BF16_COMPUTED else torch.float16


def _without_matmul_copy(fn):
    """fn() with the model's matmul copy turned off (autocast then casts the stream itself)."""
    from fastbert import modeling
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling, "_matmul_copy_dtype", lambda residual: None)
        return fn()


def _fastbert_or_patched(name, patched, device):
    """fastbert's class `name`, or transformers' with fastbert.patch, seeded the same way."""
    torch.manual_seed(0)
    if patched:
        return fastbert.patch(getattr(transformers, name)(transformers.BertConfig(**CFG)).to(device))
    return getattr(fastbert, name)(fastbert.BertConfig(**CFG)).to(device)


@pytest.mark.parametrize("patched", [False, True], ids=["fastbert", "patched-transformers"])
def test_autocast_low_copy_keeps_module_outputs_for_hooks(device, triton_kernels, patched):
    """Under autocast, forward hooks on BertSelfOutput / BertOutput / BertAttention see what
    transformers' modules return (a tensor; (tensor, weights)), and a hook's replacement takes effect:
    a hooked module is called as a module and its output cast by the next matmul, unhooked ones write
    the copy (fastbert's class and a fastbert.patch'ed transformers model alike)."""
    low = _low_dtype(device)
    model = _fastbert_or_patched("BertModel", patched, device).eval()
    batch = {k: v for k, v in _batch(device, "BertForSequenceClassification").items() if k != "labels"}
    layer = model.encoder.layer[0]

    def run():
        with torch.no_grad(), torch.autocast(device, dtype=low):
            return model(**batch).last_hidden_state.float()

    plain = run()
    seen = {}
    hooks = [layer.output.register_forward_hook(lambda m, a, out: seen.setdefault("output", out)),
             layer.attention.register_forward_hook(lambda m, a, out: seen.setdefault("attention", out)),
             layer.attention.output.register_forward_hook(lambda m, a, out: seen.setdefault("attn_output", out))]
    assert torch.equal(run(), plain)  # observing hooks change nothing
    assert isinstance(seen["output"], torch.Tensor) and isinstance(seen["attn_output"], torch.Tensor)
    assert isinstance(seen["attention"], tuple) and len(seen["attention"]) == 2
    assert isinstance(seen["attention"][0], torch.Tensor) and seen["attention"][0].dtype == torch.float32
    for h in hooks:
        h.remove()
    hook = layer.output.register_forward_hook(lambda m, a, out: out.roll(1, -1))  # a replacing hook (LayerNorm would undo a scale or a shift)
    changed = run()
    hook.remove()
    assert torch.isfinite(changed).all() and not torch.allclose(changed, plain, atol=1e-2)
    assert torch.equal(run(), plain)


@pytest.mark.parametrize("patched", [False, True], ids=["fastbert", "patched-transformers"])
def test_autocast_low_copy_is_not_kept_across_checkpoints(device, triton_kernels, patched):
    """With gradient checkpointing, layers do not pass the copy to each other (a checkpoint keeps its
    inputs until backward: it would hold a second activation per layer), and gradients are those of
    the unfused model bit for bit."""
    low = _low_dtype(device)
    model = _fastbert_or_patched("BertForPreTraining", patched, device).train()
    model.gradient_checkpointing_enable()
    batch = _batch(device, "BertForPreTraining")
    qkv_inputs = []
    hook = model.bert.encoder.layer[1].attention.self.register_forward_hook(
        lambda m, args, out: qkv_inputs.append(args[0].dtype))

    def grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=low):
            model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused = grads()
    assert qkv_inputs and set(qkv_inputs) == {torch.float32}  # layer 1 got the stream, not a kept copy
    # the hook stays for the second run: a hook on the last layer makes it run every row (_watched),
    # so both runs compute the same rows
    unfused = _without_matmul_copy(grads)
    hook.remove()
    assert fused.keys() == unfused.keys()
    for n in fused:
        assert torch.equal(fused[n], unfused[n]), n


@pytest.mark.parametrize("patched", [False, True], ids=["fastbert", "patched-transformers"])
def test_autocast_low_copy_with_stream_changing_hooks(device, triton_kernels, patched):
    """Under autocast, a hook replacing a layer's output and a pre-hook changing an attention's input
    give the same bits as the model without any matmul copy: no copy is passed around them."""
    low = _low_dtype(device)
    model = _fastbert_or_patched("BertModel", patched, device).eval()
    batch = {k: v for k, v in _batch(device, "BertForSequenceClassification").items() if k != "labels"}
    layers = model.encoder.layer
    layers[0].register_forward_hook(
        lambda m, a, out: (out[0].roll(1, -1), *out[1:]) if isinstance(out, tuple) else out.roll(1, -1))
    layers[1].attention.register_forward_pre_hook(lambda m, args: (args[0] * 1.5, *args[1:]))

    def run():
        with torch.no_grad(), torch.autocast(device, dtype=low):
            return model(**batch).last_hidden_state

    fused = run()
    unfused = _without_matmul_copy(run)
    assert torch.equal(fused, unfused)


# --------------------------------------- the dense bias of BertSelfOutput / BertOutput in the LayerNorm

def test_dense_bias_is_added_and_differentiated_by_the_layer_norm_kernel(device, triton_kernels, monkeypatch,
                                                                          add_layer_norm_calls):
    """On the Triton kernels the attention-output and FFN-output denses run without their bias
    (F.linear(h, W)), and add_layer_norm adds it (x_bias) and returns its gradient: the dense modules
    are never called (calling one raises here), each add_layer_norm gets its dense's bias, and the
    model still gives transformers' float64 loss and gradients (dense biases included) by the rule."""
    name = "BertForPreTraining"
    hf64, hf32, ours = _same_weights(name, device)
    assert ours.state_dict().keys() == hf64.state_dict().keys()
    denses = [m for layer in ours.bert.encoder.layer for m in (layer.attention.output.dense, layer.output.dense)]

    def forbidden(*args, **kwargs):
        raise AssertionError("the dense module ran: its bias was not fused")

    for dense in denses:
        monkeypatch.setattr(dense, "forward", forbidden)  # an instance attribute: no hook, _hooked stays False
    batch = _batch(device, name)
    batch64 = {k: v.cpu() for k, v in batch.items()}
    results = []
    for model, b in ((hf64, batch64), (hf32, batch), (ours, batch)):
        model.zero_grad()
        loss = model(**b).loss
        loss.backward()
        results.append((loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()
                                              if p.grad is not None}))
    seen = [c.get("x_bias") for c in add_layer_norm_calls]
    assert len(seen) == len(denses) and all(s is d.bias for s, d in zip(seen, denses))
    (rl, rg), (bl, bg), (ol, og) = results
    assert_close_to_reference(ol, bl, rl, k=4, name="loss")
    dense_biases = [n for n in rg if n.endswith("output.dense.bias")]
    assert len(dense_biases) == len(denses) and og.keys() == rg.keys()
    for pname in rg:
        assert_close_to_reference(og[pname], bg[pname], rg[pname], k=4, name=f"grad {pname}")


_HOOKED_DENSE = {"attention": "attention.output.dense", "intermediate": "intermediate.dense", "ffn": "output.dense"}


@pytest.mark.parametrize("hooked", list(_HOOKED_DENSE))
def test_forward_hook_on_a_dense_still_sees_its_call_and_its_output_is_used(device, triton_kernels, hooked):
    """A forward hook on a BertSelfOutput / BertOutput / BertIntermediate dense: that dense runs as a
    module (bias inside), the hook fires once per call and its replacement output is what the LayerNorm
    (or GELU) takes (transformers' model with the same hook agrees in float64 by the rule); the other
    denses stay fused."""
    name = "BertForSequenceClassification"
    hf64, hf32, ours = _same_weights(name, device)
    batch = _batch(device, name)
    batch64 = {k: v.cpu() for k, v in batch.items()}
    calls = []

    def hook(module, args, out):
        calls.append(out.shape)
        return out.roll(1, -1) * 1.5  # LayerNorm would undo a plain scale or shift, not a permutation

    results = []
    for model, b in ((hf64, batch64), (hf32, batch), (ours, batch)):
        dense = model.bert.encoder.layer[0].get_submodule(_HOOKED_DENSE[hooked])
        handle = dense.register_forward_hook(hook)
        calls.clear()
        loss = model(**b).loss
        loss.backward()
        handle.remove()
        assert len(calls) == 1
        results.append((loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()
                                              if p.grad is not None}))
    (rl, rg), (bl, bg), (ol, og) = results
    assert_close_to_reference(ol, bl, rl, k=4, name="loss")
    for pname in rg:
        assert_close_to_reference(og[pname], bg[pname], rg[pname], k=4, name=f"grad {pname}")
    # the hook's output was used: the encoder's output moves by O(1) without it
    dense = ours.bert.encoder.layer[0].get_submodule(_HOOKED_DENSE[hooked])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        handle = dense.register_forward_hook(hook)
        with_hook = ours.bert(**inputs).last_hidden_state
        handle.remove()
        without = ours.bert(**inputs).last_hidden_state
    assert (with_hook - without).abs().max() > 0.1


def test_cpu_reference_path_keeps_the_bias_in_the_dense(monkeypatch, add_layer_norm_calls):
    """On the CPU reference path (FASTBERT_KERNELS=auto, CPU tensors) nothing changes: the denses run
    as modules with their bias inside the matmul, and add_layer_norm gets no x_bias."""
    monkeypatch.setenv("FASTBERT_KERNELS", "auto")
    model = fastbert.BertForPreTraining(fastbert.BertConfig(**CFG)).train()
    calls = []
    for layer in model.bert.encoder.layer:
        for dense in (layer.attention.output.dense, layer.output.dense):
            real_forward = dense.forward
            monkeypatch.setattr(dense, "forward", lambda x, f=real_forward: calls.append(1) or f(x))
    model(**_batch("cpu", "BertForPreTraining")).loss.backward()
    seen = [c.get("x_bias") for c in add_layer_norm_calls]
    assert len(calls) == 2 * CFG["num_hidden_layers"] and seen == [None] * len(calls)


# ------------------------------------------------- the feed-forward block on K.feed_forward (opt-in)

def _spy(monkeypatch, owner, name):
    """Calls of owner.name from here on (positional arguments), the calls still run."""
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


@pytest.mark.parametrize("name,act", [("BertForPreTraining", "gelu"), ("BertForQuestionAnswering", "gelu_new")])
def test_fused_feed_forward_matches_transformers(name, act, device, triton_kernels, monkeypatch, add_layer_norm_calls):
    """With modeling.FUSED_FFN (fastbert.bench.fused_ffn), every layer's feed-forward block runs as one
    K.feed_forward call (the intermediate and output dense modules are never called: calling one raises)
    with the config's GELU form, and its output dense's bias goes to add_layer_norm; loss and every
    gradient (both denses' weights and biases included, the biases random) match transformers in float64
    by the rule — the unpadded encoder with the last layer on the read rows (pretraining, erf GELU) and
    the padded one (QA, tanh GELU). The switch is restored afterwards."""
    from fastbert import bench, modeling
    hf64, hf32, ours = _same_weights(name, device, random_biases=True, hidden_act=act)
    layers = ours.bert.encoder.layer

    def forbidden(*args, **kwargs):
        raise AssertionError("a feed-forward module ran: the block was not fused")

    for layer in layers:
        for module in (layer.intermediate, layer.intermediate.dense, layer.output.dense):
            monkeypatch.setattr(module, "forward", forbidden)
    ff_calls = _spy(monkeypatch, modeling.K, "feed_forward")
    batch = _batch(device, name)
    batch64 = {k: v.cpu() for k, v in batch.items()}
    results = []
    for model, b in ((hf64, batch64), (hf32, batch), (ours, batch)):
        model.zero_grad()
        with bench.fused_ffn() if model is ours else contextlib.nullcontext():
            loss = model(**b).loss
        loss.backward()
        results.append((loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()
                                              if p.grad is not None}))
    assert modeling.FUSED_FFN is False
    assert len(ff_calls) == len(layers)
    assert all(a[1] is layer.intermediate.dense.weight and a[2] is layer.intermediate.dense.bias
               and a[3] is layer.output.dense.weight and a[4] == ("tanh" if act == "gelu_new" else "none")
               for a, layer in zip(ff_calls, layers))
    ffn_biases = [c.get("x_bias") for c in add_layer_norm_calls][1::2]  # attention output, then FFN output
    assert all(b is layer.output.dense.bias for b, layer in zip(ffn_biases, layers))
    (rl, rg), (bl, bg), (ol, og) = results
    assert_close_to_reference(ol, bl, rl, k=4, name="loss")
    assert og.keys() == rg.keys()
    for pname in rg:
        assert_close_to_reference(og[pname], bg[pname], rg[pname], k=4, name=f"grad {pname}")


def test_fused_feed_forward_keeps_dropout(device, triton_kernels):
    """Hidden dropout after the fused block: under the same seed the fused and unfused models draw the
    same masks (the same calls in the same order), so loss and every gradient agree to fp32 rounding;
    a fused block that skipped its dropout would differ by O(1)."""
    from fastbert import bench
    cfg = dict(CFG, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(fastbert.BertConfig(**cfg)).to(device).train()
    batch = _batch(device, "BertForPreTraining")
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with bench.fused_ffn() if fused else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (lu, gu), (lf, gf) = results
    torch.testing.assert_close(lf, lu, rtol=1e-5, atol=1e-6)
    assert gf.keys() == gu.keys() and len(gf) > 20
    for n in gf:
        torch.testing.assert_close(gf[n], gu[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("hooked_attention", [False, True], ids=["", "hooked-attention"])
def test_fused_feed_forward_under_autocast(device, triton_kernels, monkeypatch, hooked_attention):
    """Under autocast the fused block gets its input and both weights in the autocast dtype (cast here as
    F.linear's autocast would; also when a hook on the attention leaves the block an fp32 input), the
    fp32 bias as it is; loss and gradients are as close to float64 as the unfused model's under the same
    autocast (the rule, k=2). fp16 stands in for bf16 on the CPU."""
    from fastbert import bench, modeling
    low = _low_dtype(device)
    name = "BertForPreTraining"
    hf64, _, ours = _same_weights(name, device, random_biases=True)
    if hooked_attention:
        ours.bert.encoder.layer[0].attention.register_forward_hook(lambda m, args, out: None)
    ff_calls = _spy(monkeypatch, modeling.K, "feed_forward")
    batch = _batch(device, name)
    runs = []
    for fused in (False, True):
        ours.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=low), bench.fused_ffn() if fused else contextlib.nullcontext():
            loss = ours(**batch).loss
        loss.backward()
        runs.append((loss.detach().float().cpu(), {n: p.grad.cpu() for n, p in ours.named_parameters()
                                                   if p.grad is not None}))
    hf64.zero_grad()
    ref_loss = hf64(**{k: v.cpu() for k, v in batch.items()}).loss
    ref_loss.backward()
    ref = {n: p.grad for n, p in hf64.named_parameters() if p.grad is not None}
    assert len(ff_calls) == 2 and all(a[0].dtype == a[1].dtype == a[3].dtype == low and a[2].dtype == torch.float32
                                      for a in ff_calls)
    (lu, gu), (lf, gf) = runs
    assert_close_to_reference(lf, lu, ref_loss.detach(), name="autocast loss")
    for n in ref:
        assert_close_to_reference(gf[n], gu[n], ref[n], name=f"autocast grad {n}")


@pytest.mark.parametrize("module", ["intermediate", "intermediate.dense", "output", "output.dense"])
def test_fused_feed_forward_leaves_hooked_blocks_alone(device, triton_kernels, monkeypatch, module):
    """A forward hook on any of a layer's feed-forward modules keeps that layer's block on its modules
    (the hook sees the call); the other layer still takes K.feed_forward."""
    from fastbert import modeling
    _, _, ours = _same_weights("BertForSequenceClassification", device)
    monkeypatch.setattr(modeling, "FUSED_FFN", True)
    ff_calls, hook_calls = _spy(monkeypatch, modeling.K, "feed_forward"), []
    target = ours.bert.encoder.layer[0].get_submodule(module)
    handle = target.register_forward_hook(lambda m, a, o: hook_calls.append(1))
    ours(**_batch(device, "BertForSequenceClassification")).loss.backward()
    handle.remove()
    assert len(hook_calls) == 1 and len(ff_calls) == 1
    assert ff_calls[0][1] is ours.bert.encoder.layer[1].intermediate.dense.weight


def test_mlm_label_check_is_read_before_the_head_is_queued(triton_kernels, device, monkeypatch):
    """Training with labels, the masked-rows head syncs once for its row count (nonzero); the label
    range check is computed before that sync and read right after it, before the head's first kernel
    is launched, so that read waits on nothing (K.mlm_loss's own check read it after the head's kernels
    were queued: a second wait in the step's middle). A bad label still raises mlm_loss's error."""
    import collections

    from fastbert import BertConfig, BertForPreTraining
    from fastbert.kernels import layer_norm

    events = []
    head_kernel = layer_norm._gelu_ln_fwd

    class Launch:  # the head's first kernel, wrapped where its launcher looks it up (interpreted or compiled)
        def __getitem__(self, grid):
            events.append(("launch", "_gelu_ln_fwd"))
            return head_kernel[grid]
    monkeypatch.setattr(layer_norm, "_gelu_ln_fwd", Launch())
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: events.append(("read", "bool")) or real_bool(t))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    model = BertForPreTraining(config).to(device).train()
    ids = torch.randint(5, 97, (2, 12), device=device)
    labels = torch.full((2, 12), -100, device=device)
    labels[:, 3] = ids[:, 3]
    model(input_ids=ids, labels=labels, next_sentence_label=torch.tensor([0, 1], device=device)).loss.backward()
    head = [i for i, e in enumerate(events) if e == ("launch", "_gelu_ln_fwd")]
    assert len(head) == 1, collections.Counter(events)
    assert not [e for e in events[head[0]:] if e[0] == "read"], events[head[0]:]
    labels[1, 5] = 97  # outside the vocabulary
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 97\) or equal ignore_index=-100; found \[97\]"):
        model(input_ids=ids, labels=labels, next_sentence_label=torch.tensor([0, 1], device=device))


class _Adapted(torch.nn.Module):
    """A LoRA-style adapter around a layer, as peft wraps one: its forward adds a low-rank delta, while
    `weight` / `bias` still name the base layer's (peft exposes them so), so a model that read those
    and ran them in a fused kernel would silently drop the adapter."""

    def __init__(self, base, delta):
        super().__init__()
        self.base_layer, self.delta = base, delta

    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x):
        return self.base_layer(x) + self.delta(x)


def _delta_for(base):
    if isinstance(base, torch.nn.Embedding):
        first = torch.nn.Embedding(base.num_embeddings, 2)
        width = base.embedding_dim
    else:
        width_in = base.in_features if isinstance(base, torch.nn.Linear) else base.normalized_shape[0]
        first = torch.nn.Linear(width_in, 2, bias=False)
        width = base.out_features if isinstance(base, torch.nn.Linear) else base.normalized_shape[0]
    second = torch.nn.Linear(2, width, bias=False)
    torch.nn.init.normal_(second.weight, std=0.5)
    return torch.nn.Sequential(first, second)


_ADAPTED = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value",
            "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.intermediate.dense",
            "bert.encoder.layer.1.output.dense", "bert.encoder.layer.0.output.LayerNorm",
            "bert.embeddings.word_embeddings", "bert.embeddings.LayerNorm",
            "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.decoder"]


@pytest.mark.parametrize("patched", [False, True], ids=["fastbert", "patched-transformers"])
@pytest.mark.parametrize("path", _ADAPTED)
def test_adapted_submodules_run_as_their_own_calls(device, triton_kernels, path, patched):
    """A wrapped (adapter) Linear, Embedding or LayerNorm anywhere in the model is called, not bypassed
    by a fused kernel that reads its base weights: loss and every gradient match transformers' model
    with the same adapter in float64 by the rule, and the adapter's own parameters get gradients.
    Before, adapters on query / key / value, the feed-forward denses, the LayerNorms, the embeddings
    and the MLM head were silently ignored on the Triton path."""
    _check_adapted(device, path, patched, _Adapted)


class _Opaque(torch.nn.Module):
    """A wrapper that exposes no `weight` / `bias` of its own (a quantised layer, a custom adapter)."""

    def __init__(self, base, delta):
        super().__init__()
        self.base_layer, self.delta = base, delta

    def forward(self, x):
        return self.base_layer(x) + self.delta(x)


@pytest.mark.parametrize("path", ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.output.dense",
                                  "cls.predictions.decoder"])
@pytest.mark.parametrize("patched", [False, True], ids=["fastbert", "patched-transformers"])
def test_wrappers_without_weight_attributes_run(device, triton_kernels, path, patched):
    """Only a plain module's weight and bias are read: a wrapper without them runs as its own call
    (it was an AttributeError in the MLM head and the residual blocks), and out-of-vocabulary labels
    are still a ValueError behind a wrapped decoder."""
    _check_adapted(device, path, patched, _Opaque)
    if path == "cls.predictions.decoder":
        _, _, ours = _same_weights("BertForPreTraining", device)
        if patched:
            ours = fastbert.patch(transformers.BertForPreTraining(transformers.BertConfig(**CFG)).to(device))
        ours.cls.predictions.decoder = _Opaque(ours.cls.predictions.decoder, _delta_for(ours.cls.predictions.decoder))
        batch = _batch(device, "BertForPreTraining")
        batch["labels"] = batch["labels"].clone()
        batch["labels"][0, 1] = CFG["vocab_size"]
        with pytest.raises(ValueError, match="labels must lie in"):
            ours(**batch)


def _check_adapted(device, path, patched, wrapper):
    name = "BertForPreTraining"
    hf64, hf32, ours = _same_weights(name, device)
    if patched:  # transformers' own model on fastbert's kernels (fastbert.patch), the same weights
        ours = fastbert.patch(getattr(transformers, name)(transformers.BertConfig(**CFG)).to(device))
        ours.load_state_dict(hf64.state_dict())
    batch = _batch(device, name)
    batch64 = {k: v.cpu() for k, v in batch.items()}
    with torch.no_grad():
        plain = ours(**batch).loss
    torch.manual_seed(7)
    delta64 = _delta_for(hf64.get_submodule(path)).double()
    results = []
    for model, b in ((hf64, batch64), (hf32, batch), (ours, batch)):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        delta = _delta_for(getattr(parent, child)).to(device=next(model.parameters()).device,
                                                     dtype=next(model.parameters()).dtype)
        delta.load_state_dict(delta64.state_dict())
        setattr(parent, child, wrapper(getattr(parent, child), delta))
        loss = model(**b).loss
        loss.backward()
        results.append((loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()
                                              if p.grad is not None}))
    (rl, rg), (bl, bg), (ol, og) = results
    assert_close_to_reference(ol, bl, rl, k=4, name="loss")
    # the adapter ran: its own parameters have gradients (a bypassed one's would have none)
    assert og.keys() == rg.keys() and any("delta" in n for n in og)
    for pname in rg:
        assert_close_to_reference(og[pname], bg[pname], rg[pname], k=4, name=f"grad {pname}")
    assert ol.item() != plain.item()
