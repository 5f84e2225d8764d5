"""fastbert.patch: a transformers Bert model, patched in place, against fastbert's own class.

Judged as tests/test_modeling.py judges fastbert's classes (and with its helpers): the patched
model in float32 against transformers in float64 within k = 4 of transformers' own float32 error;
the patched model in float64 against fastbert's class in float64 to ~1e-12 (the same kernels on the
same weights). Values at padding positions are unspecified (API.md): compared only at real
positions, and checked finite everywhere.
"""
import copy
import inspect
import io

import pytest
import torch
import torch.nn as nn

import fastbert
from test_modeling import (CLASSES, CONFIGS, NO_DROPOUT, check_last_layer_runs_on_the_rows_read, compare, config_for,
                           make_batch, make_pair, real_mask)
from tolerance import assert_close_to_reference

transformers = pytest.importorskip("transformers")


def patched_copy(hf, dtype=None):
    """A new transformers model with hf's weights, on hf's device, in hf's dtype (or `dtype`),
    patched; hf stays as it is."""
    like = next(hf.parameters())
    model = type(hf)(hf.config).to(like.device, dtype or like.dtype)
    model.load_state_dict(hf.state_dict(), strict=True)
    return fastbert.patch(model)


def hf_model(name, cfg, **extra):
    torch.manual_seed(0)
    return getattr(transformers, name)(transformers.BertConfig(**{**cfg, **extra}))


def grads(model):
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def assert_finite(out):
    for key, value in out.items():
        for t in (value if isinstance(value, tuple) else (value,)):
            assert t is None or torch.isfinite(t).all(), f"{key}: non-finite values (padding included)"


# ---------------------------------------------------------------------------------- numerics

def _models(name, cfg):
    """transformers in float64, fastbert's class, transformers in float32, and patched copies of the
    float32 model in float32 and float64 — all with the same weights."""
    hf64, ours = make_pair(name, cfg)
    base32 = type(hf64)(hf64.config)
    base32.load_state_dict(hf64.state_dict())
    return hf64, ours, base32, patched_copy(base32), patched_copy(base32, torch.float64)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("name", CLASSES)
def test_patched_outputs_match_in_eval(name, cfg_name):
    cfg = config_for(name, cfg_name)
    hf64, ours, base32, patched32, patched64 = _models(name, cfg)
    inputs, labels = make_batch(name, cfg)
    mask = real_mask(inputs)
    kwargs = dict(**inputs, **labels, output_hidden_states=True)
    for m in (hf64, base32, patched32, patched64, ours):
        m.eval()
    ours.double()
    with torch.no_grad():
        ref, base, out, out64, fb64 = (m(**kwargs) for m in (hf64, base32, patched32, patched64, ours))
    assert type(out) is type(ref)  # transformers' own output class
    assert set(ref.keys()) == set(out.keys()) == set(out64.keys())
    assert_finite(out)
    for key in ref.keys():
        compare(f"{name}.{key}", out[key], base[key], ref[key], mask)
        compare(f"{name}.{key} (float64 vs fastbert)", out64[key], fb64[key], fb64[key], mask, k=0.0)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("name", [c for c in CLASSES if c != "BertModel"])
def test_patched_loss_and_gradients_match_in_training(name, cfg_name):
    """Training mode (dropout off): loss and every parameter gradient, the MLM head on masked rows."""
    cfg = config_for(name, cfg_name)
    hf64, ours, base32, patched32, patched64 = _models(name, cfg)
    ours.double()
    inputs, labels = make_batch(name, cfg)
    results = []
    for model in (hf64, base32, patched32, patched64, ours):
        model.train()
        model.zero_grad()
        out = model(**inputs, **labels)
        out.loss.backward()
        results.append((out, grads(model)))
    (ref, ref_g), (base, base_g), (out, g), (out64, g64), (fb, fb_g) = results
    if name in ("BertForPreTraining", "BertForMaskedLM"):  # masked rows only: no full logits
        assert out.get("prediction_logits") is None and out.get("logits") is None
    assert_close_to_reference(out.loss, base.loss, ref.loss, k=4, name=f"{name}.loss")
    assert_close_to_reference(out64.loss, fb.loss, fb.loss, k=0, name=f"{name}.loss (float64 vs fastbert)")
    assert set(g) == set(ref_g) == set(g64) == set(fb_g)
    for pname in ref_g:
        assert_close_to_reference(g[pname], base_g[pname], ref_g[pname], k=4, name=f"{name} grad {pname}")
    for pname in fb_g:
        assert_close_to_reference(g64[pname], fb_g[pname], fb_g[pname], k=0, name=f"{name} grad {pname} (float64)")


def test_mlm_decoder_bias_untied_is_the_one_used():
    """With tie_word_embeddings=False transformers' decoder keeps its own bias (not the head's
    `bias`); the masked-rows loss must use the one transformers' forward adds."""
    cfg = {**CONFIGS["gelu-2types"], "tie_word_embeddings": False}
    hf64 = hf_model("BertForMaskedLM", cfg, **NO_DROPOUT).double()
    with torch.no_grad():
        hf64.cls.predictions.decoder.bias.normal_()
    assert hf64.cls.predictions.decoder.bias is not hf64.cls.predictions.bias
    patched = patched_copy(hf64, torch.float64)
    inputs, labels = make_batch("BertForMaskedLM", cfg)
    hf64.train(), patched.train()
    ref, out = hf64(**inputs, **labels).loss, patched(**inputs, **labels).loss
    assert_close_to_reference(out, ref, ref, k=0, atol=1e-10, name="loss")


# -------------------------------------------------------------------------- the same object

def test_patch_keeps_object_parameters_and_state_dict():
    cfg = CONFIGS["gelu-2types"]
    model = hf_model("BertForPreTraining", cfg)
    params = list(model.named_parameters())
    state = model.state_dict()
    buffers = list(model.named_buffers())
    signature = inspect.signature(model.forward)
    labels = transformers.utils.find_labels(type(model))
    assert fastbert.patch(model) is model
    assert isinstance(model, transformers.BertForPreTraining) and type(model).__name__ == "BertForPreTraining"
    assert isinstance(model.bert.encoder.layer[0].attention.self, transformers.models.bert.modeling_bert.BertSelfAttention)
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params]
    assert [(n, id(b)) for n, b in model.named_buffers()] == [(n, id(b)) for n, b in buffers]
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(after[k].data_ptr() == state[k].data_ptr() for k in state)
    # what Trainer inspects: the forward signature (dataset columns, **kwargs) and the label names
    assert inspect.signature(model.forward) == signature
    assert transformers.utils.find_labels(type(model)) == labels
    assert fastbert.patch(model) is model  # patching twice changes nothing
    assert fastbert.unpatch(model) is model and type(model) is transformers.BertForPreTraining


def test_optimizer_made_before_patching_trains_the_patched_model():
    cfg = CONFIGS["gelu-2types"]
    model = hf_model("BertForSequenceClassification", cfg, **NO_DROPOUT)
    inputs, labels = make_batch("BertForSequenceClassification", cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.classifier.weight.detach().clone()
    fastbert.patch(model).train()
    model(**inputs, **labels).loss.backward()
    opt.step()
    assert not torch.equal(model.classifier.weight, before)
    assert model.classifier.weight.grad is not None


def test_unpatch_and_context_manager_restore_outputs_bit_exactly():
    cfg = CONFIGS["gelu-2types"]
    model = hf_model("BertForMaskedLM", cfg).eval()
    inputs, labels = make_batch("BertForMaskedLM", cfg)
    with torch.no_grad():
        before = model(**inputs, **labels)
        with fastbert.patch(model) as same:
            assert same is model and type(model) is not transformers.BertForMaskedLM
            patched = model(**inputs, **labels)
        assert all(type(m).__module__.startswith(("transformers", "torch")) for m in model.modules())
        after_context = model(**inputs, **labels)
        fastbert.patch(model)
        fastbert.unpatch(model)
        after = model(**inputs, **labels)
    assert not torch.equal(patched.logits, before.logits)  # it did run something else
    for out in (after_context, after):
        assert torch.equal(out.logits, before.logits) and torch.equal(out.loss, before.loss)


def test_unpatch_drops_the_cpu_word_gradient_buffer():
    cfg = CONFIGS["gelu-2types"]
    model = hf_model("BertForSequenceClassification", cfg).train()
    inputs, labels = make_batch("BertForSequenceClassification", cfg)
    fastbert.patch(model)
    model(**inputs, **labels).loss.backward()
    emb = model.bert.embeddings
    assert emb._word_grad.buf.data_ptr() == emb.word_embeddings.weight.grad.data_ptr()
    fastbert.unpatch(model)
    assert "_word_grad" not in emb.__dict__


def test_head_whose_encoder_alone_was_unpatched_runs_transformers_forward():
    cfg = CONFIGS["tanh-1type"]
    hf64 = hf_model("BertForMaskedLM", cfg, **NO_DROPOUT).double().eval()
    model = patched_copy(hf64).eval()
    fastbert.unpatch(model.bert)
    assert type(model) is not transformers.BertForMaskedLM and type(model.bert) is transformers.BertModel
    inputs, labels = make_batch("BertForMaskedLM", cfg)
    with torch.no_grad():
        ref, out = hf64(**inputs, **labels), model(**inputs, **labels)
    for key in ref.keys():  # every position: transformers' encoder ran
        assert_close_to_reference(out[key], ref[key], ref[key], k=0, name=key)


def test_deepcopy_pickle_dtype_and_save_pretrained(tmp_path):
    cfg = CONFIGS["gelu-2types"]
    hf64 = hf_model("BertForTokenClassification", cfg).double().eval()
    inputs, _ = make_batch("BertForTokenClassification", cfg)
    mask = real_mask(inputs)
    with torch.no_grad():
        ref = hf64(**inputs).logits
    model = patched_copy(hf64, torch.float32).eval()  # float32 until .double() below
    clone = copy.deepcopy(model)
    assert type(clone) is type(model) and type(clone.bert.encoder) is type(model.bert.encoder)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    unpickled = torch.load(buf, weights_only=False)
    assert type(unpickled) is type(model)
    with torch.no_grad():
        for m in (clone.double(), unpickled.double(), model.double()):
            out = m(**inputs).logits
            assert out.dtype == torch.float64
            assert_close_to_reference(out[mask], ref[mask], ref[mask], k=0, atol=1e-10, name="logits")
    model.save_pretrained(tmp_path)
    loaded = transformers.BertForTokenClassification.from_pretrained(tmp_path)
    assert type(loaded) is transformers.BertForTokenClassification
    assert loaded.config.architectures == ["BertForTokenClassification"]
    saved, state = loaded.state_dict(), model.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k].double(), state[k]) for k in state)


@pytest.mark.parametrize("name", ["BertForPreTraining", "BertForMaskedLM"])
def test_patched_last_layer_runs_on_the_rows_read_only_when_training_with_labels(name):
    cfg = CONFIGS["tanh-1type"]
    check_last_layer_runs_on_the_rows_read(patched_copy(hf_model(name, cfg)), name, cfg)


def test_gradient_checkpointing_through_transformers_switch():
    cfg = CONFIGS["tanh-1type"]
    hf = hf_model("BertForMaskedLM", cfg, **NO_DROPOUT).double()
    plain, ckpt = patched_copy(hf), patched_copy(hf)
    # transformers 5.2x renamed the switch (the old name warns)
    (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)()
    assert ckpt.bert.encoder.layer[0].gradient_checkpointing
    inputs, labels = make_batch("BertForMaskedLM", cfg)
    for m in (plain, ckpt):
        m.train()
        m(**inputs, **labels).loss.backward()
    g, gc = grads(plain), grads(ckpt)
    for pname in g:
        assert_close_to_reference(gc[pname], g[pname], g[pname], k=0, name=pname)


# ------------------------------------------------------------------------ transformers' API

def test_return_dict_false_gives_transformers_tuple_order():
    cfg = config_for("BertForPreTraining", "gelu-2types")
    hf64 = hf_model("BertForPreTraining", cfg, **NO_DROPOUT).double().eval()
    model = patched_copy(hf64).eval()
    inputs, labels = make_batch("BertForPreTraining", cfg)
    mask = real_mask(inputs)
    with torch.no_grad():
        ref = hf64(**inputs, **labels, output_hidden_states=True, return_dict=False)
        out = model(**inputs, **labels, output_hidden_states=True, return_dict=False)
        # the config's return_dict=False too (the head then drives its encoder as an object)
        model.config.return_dict = hf64.config.return_dict = False
        ref_cfg, out_cfg = hf64(**inputs, **labels), model(**inputs, **labels)
        positional = model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    assert isinstance(out, tuple) and len(out) == len(ref) == 4  # loss, prediction, seq_relationship, hidden
    assert isinstance(out_cfg, tuple) and len(out_cfg) == len(ref_cfg) == 3
    assert isinstance(positional, tuple) and len(positional) == 2
    for o, r in ((out, ref), (out_cfg, ref_cfg)):
        for i, (a, b) in enumerate(zip(o, r)):
            compare(f"output[{i}]", a, b, b, mask, k=0.0)


def test_inputs_embeds():
    cfg = config_for("BertForMultipleChoice", "gelu-2types")
    for name in ("BertModel", "BertForMultipleChoice"):
        hf64 = hf_model(name, cfg, **NO_DROPOUT).double().eval()
        model = patched_copy(hf64).eval()
        inputs, _ = make_batch(name, cfg)
        mask = real_mask(inputs)
        embeds = hf64.get_input_embeddings()(inputs.pop("input_ids"))  # (B, S, D) or (B, C, S, D)
        with torch.no_grad():
            ref, out = hf64(inputs_embeds=embeds, **inputs), model(inputs_embeds=embeds, **inputs)
        for key in ref.keys():
            compare(f"{name}.{key}", out[key], ref[key], ref[key], mask, k=0.0)


def test_output_attentions_and_hidden_states():
    cfg = CONFIGS["gelu-2types"]
    hf64 = hf_model("BertForSequenceClassification", cfg, **NO_DROPOUT).double().eval()
    hf64.set_attn_implementation("eager")
    model = patched_copy(hf64).eval()
    inputs, labels = make_batch("BertForSequenceClassification", cfg)
    mask = real_mask(inputs)
    with torch.no_grad():
        ref = hf64(**inputs, **labels, output_attentions=True, output_hidden_states=True)
        out = model(**inputs, **labels, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == len(ref.attentions) == cfg["num_hidden_layers"]
    for i, (a, b) in enumerate(zip(out.attentions, ref.attentions)):
        rows = lambda t: t.transpose(1, 2)[mask]  # (B, nh, S, S) -> real query rows (T, nh, S)  # noqa: E731
        assert_close_to_reference(rows(a), rows(b), rows(b), k=0, atol=1e-10, name=f"attentions[{i}]")
    compare("hidden_states", out.hidden_states, ref.hidden_states, ref.hidden_states, mask, k=0.0)
    compare("logits", out.logits, ref.logits, ref.logits, mask, k=0.0)
    # transformers 5.2x selects hidden states by index (the others None): the same selection
    with torch.no_grad():
        picked = model(**inputs, output_hidden_states=[0, -1]).hidden_states
    assert len(picked) == cfg["num_hidden_layers"] + 1 and picked[1] is None
    compare("hidden_states[0, -1]", (picked[0], picked[-1]), (ref.hidden_states[0], ref.hidden_states[-1]),
            (ref.hidden_states[0], ref.hidden_states[-1]), mask, k=0.0)


def test_trainer_style_steps_give_fastbert_losses():
    """A few optimizer steps with dropout on: the patched transformers model and fastbert's class
    draw the same dropout masks from the same seed, so the losses agree step by step. The
    optimizer is made before patching; forward gets Trainer's extra num_items_in_batch."""
    cfg = {**CONFIGS["gelu-2types"], "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    name = "BertForPreTraining"
    hf = hf_model(name, cfg).double()
    ours = fastbert.BertForPreTraining(fastbert.BertConfig(**cfg)).double()
    ours.load_state_dict(hf.state_dict())
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-2)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    fastbert.patch(hf)
    losses = []
    inputs, labels = make_batch(name, cfg)
    for step in range(4):
        step_losses = []
        for model, opt in ((hf, opt_hf), (ours, opt_ours)):
            model.train()
            torch.manual_seed(100 + step)
            kwargs = dict(num_items_in_batch=torch.tensor(7)) if model is hf else {}
            loss = model(**inputs, **labels, **kwargs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            step_losses.append(loss.detach())
        losses.append(step_losses)
        assert_close_to_reference(step_losses[0], step_losses[1], step_losses[1], k=0, name=f"loss at step {step}")
    assert losses[-1][0] < losses[0][0]  # it trains


def test_transformers_trainer_runs_the_patched_model(tmp_path):
    """transformers.Trainer itself (it needs accelerate, a test extra; ~5 s): three SGD steps and an
    evaluation, the patched model and fastbert's own class against the unpatched one in float64. The
    optimizer is made before patching; training runs the masked-rows MLM head, evaluation gets full
    logits back. (Trainer saves fastbert's own classes only as a bare state dict, which safetensors
    refuses for the tied MLM weights: save_strategy "no" here, as the README says.)"""
    import accelerate  # noqa: F401  (a test extra: Trainer needs it)
    cfg = CONFIGS["gelu-2types"]
    name = "BertForMaskedLM"
    examples = []
    for seed in range(4):
        inputs, labels = make_batch(name, cfg, seed=seed)
        examples += [{k: v[i] for k, v in {**inputs, **labels}.items()} for i in range(len(inputs["input_ids"]))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True)
    results = []
    for arm in ("transformers", "patched", "fastbert"):
        model = hf_model(name, cfg, **NO_DROPOUT).double()
        if arm == "fastbert":
            ours = fastbert.BertForMaskedLM(fastbert.BertConfig(**cfg, **NO_DROPOUT)).double()
            ours.load_state_dict(model.state_dict())
            model = ours
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        if arm == "patched":
            fastbert.patch(model)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=examples, eval_dataset=examples,
                                       optimizers=(opt, None))
        trainer.train()
        prediction = trainer.predict(examples)
        assert (type(model) is transformers.BertForMaskedLM) == (arm == "transformers")
        results.append((dict(model.named_parameters()), prediction))
    (ref_params, ref_pred), *arms = results
    initial = hf_model(name, cfg, **NO_DROPOUT).double().state_dict()
    mask = torch.stack([e["attention_mask"] for e in examples]).bool()
    for arm, (params, pred) in zip(("patched", "fastbert"), arms):
        assert not torch.equal(params["bert.encoder.layer.0.attention.self.query.weight"],
                               initial["bert.encoder.layer.0.attention.self.query.weight"])  # it trained
        assert params.keys() == ref_params.keys()
        for pname, ref in ref_params.items():
            assert_close_to_reference(params[pname], ref, ref, k=0, name=f"{arm} {pname}")
        loss, ref_loss = torch.tensor(pred.metrics["test_loss"]), torch.tensor(ref_pred.metrics["test_loss"])
        assert_close_to_reference(loss, ref_loss, ref_loss, k=0, name=f"{arm} eval loss")
        logits, ref_logits = torch.as_tensor(pred.predictions), torch.as_tensor(ref_pred.predictions)
        assert logits.shape == ref_logits.shape == (len(examples), mask.shape[1], cfg["vocab_size"])
        assert_close_to_reference(logits[mask], ref_logits[mask], ref_logits[mask], k=0, name=f"{arm} eval logits")


@pytest.mark.parametrize("fused_ffn", [False, True], ids=["", "fused-ffn"])
def test_patched_model_on_triton_kernels(device, triton_kernels, monkeypatch, fused_ffn):
    """The patched model through the Triton kernels (interpreted on CPU, compiled on a GPU) against
    transformers in float64: training loss and every gradient. BertForPreTraining takes every
    kernel of the unpadded path (embeddings + LayerNorm, varlen attention, bias-GELU, add +
    LayerNorm, GELU + LayerNorm, the masked-rows MLM loss); fused-ffn: the feed-forward block on
    K.feed_forward (modeling.FUSED_FFN), which the patched layers take too."""
    from fastbert import modeling
    monkeypatch.setattr(modeling, "FUSED_FFN", fused_ffn)
    calls = []
    real = modeling.K.feed_forward
    monkeypatch.setattr(modeling.K, "feed_forward", lambda *a: calls.append(1) or real(*a))
    name = "BertForPreTraining"
    cfg = dict(vocab_size=67, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
               max_position_embeddings=16, **NO_DROPOUT)
    hf64 = hf_model(name, cfg).double()
    base32 = type(hf64)(hf64.config).to(device)
    base32.load_state_dict(hf64.state_dict())
    patched = patched_copy(base32)
    inputs, labels = make_batch(name, {**cfg, "type_vocab_size": 2}, batch=3, seq=7)
    results = []
    for model in (hf64, base32, patched):
        model.train()
        on = {k: v.to(next(model.parameters()).device) for k, v in {**inputs, **labels}.items()}
        loss = model(**on).loss
        loss.backward()
        results.append((loss.detach().cpu(), {n: g.cpu() for n, g in grads(model).items()}))
    assert len(calls) == (1 if fused_ffn else 0)  # one layer
    (rl, rg), (bl, bg), (ol, og) = results
    assert_close_to_reference(ol, bl, rl, k=4, name=f"{name}.loss")
    for pname in rg:
        assert_close_to_reference(og[pname], bg[pname], rg[pname], k=4, name=f"{name} grad {pname}")


# ------------------------------------------------------------------------------------ errors

def test_bad_call_arguments_raise_as_transformers_would():
    cfg = CONFIGS["gelu-2types"]
    model = fastbert.patch(hf_model("BertForSequenceClassification", cfg))
    inputs, _ = make_batch("BertForSequenceClassification", cfg)
    ids = inputs["input_ids"]
    with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
        model(ids, input_ids=ids)
    with pytest.raises(TypeError, match="positional arguments"):
        model(*([None] * 9))
    with pytest.raises(ValueError, match="is_causal=True"):
        model(ids, is_causal=True)
    with pytest.raises(ValueError, match="attention_mask has shape"):  # 4-D masks: fastbert takes (batch, seq)
        model(ids, attention_mask=inputs["attention_mask"][:, None, None, :])


class _LoRALinear(nn.Linear):
    """Stands in for an adapter that changes what a Linear computes."""


@pytest.mark.parametrize("case,error,match", [
    ("not_bert", TypeError, "supports transformers' BertModel"),
    ("fastbert_class", TypeError, "already fastbert's own class"),
    ("subclass", TypeError, "subclass of a transformers Bert class"),
    ("compiled", TypeError, "patch the model before wrapping it"),
    ("relu", ValueError, "hidden_act='relu'"),
    # one layer's activation swapped after loading: the config still says gelu, so the message names the module
    ("swapped_activation", ValueError,
     r"bert.encoder.layer.1.intermediate.intermediate_act_fn is ReLU, hidden_act='gelu'"),
    ("decoder", ValueError, "is_decoder=True"),
    ("cross_attention", ValueError, "add_cross_attention=True"),
    ("relative_positions", ValueError, "position_embedding_type='relative_key'"),
    ("adapter", TypeError, "bert.encoder.layer.0.attention.self.query is a .*_LoRALinear"),
    ("instance_forward", TypeError, "bert.pooler has its forward replaced on the instance"),
    # a class of transformers' name that is not transformers' class (a user's subclass): its forward would be lost
    ("same_name_subclass", TypeError, "subclass of a transformers Bert class"),
    # what the kernels do not compute: max_norm renormalises looked-up rows in place; a LayerNorm without bias
    ("embedding_max_norm", ValueError, "bert.embeddings.word_embeddings uses max_norm"),
    ("layer_norm_without_bias", ValueError, "bert.encoder.layer.0.output.LayerNorm has no affine weight or bias"),
])
def test_unsupported_models_raise_naming_the_reason(case, error, match):
    cfg = CONFIGS["gelu-2types"]
    name, extra = "BertForSequenceClassification", {}
    if case == "relu":
        extra = dict(hidden_act="relu")
    elif case == "decoder":
        name, extra = "BertForMaskedLM", dict(is_decoder=True)
    elif case == "cross_attention":
        name, extra = "BertModel", dict(is_decoder=True, add_cross_attention=True)
    elif case == "relative_positions":
        extra = dict(position_embedding_type="relative_key")
    model = hf_model(name, cfg, **extra)
    if case == "not_bert":
        model = transformers.RobertaModel(transformers.RobertaConfig(**cfg))
    elif case == "fastbert_class":
        model = fastbert.BertModel(fastbert.BertConfig(**cfg))
    elif case == "subclass":
        model = type("MyBert", (transformers.BertForSequenceClassification,), {})(model.config)
    elif case == "compiled":
        model = torch.compile(model)
    elif case == "adapter":
        model.bert.encoder.layer[0].attention.self.query = _LoRALinear(cfg["hidden_size"], cfg["hidden_size"])
    elif case == "instance_forward":
        model.bert.pooler.forward = lambda h: h[:, 0]
    elif case == "same_name_subclass":
        model = type(name, (transformers.BertForSequenceClassification,), {})(model.config)
    elif case == "swapped_activation":
        model.bert.encoder.layer[1].intermediate.intermediate_act_fn = nn.ReLU()
    elif case == "embedding_max_norm":
        model.bert.embeddings.word_embeddings.max_norm = 1.0
    elif case == "layer_norm_without_bias":
        model.bert.encoder.layer[0].output.LayerNorm = nn.LayerNorm(cfg["hidden_size"], bias=False)
    with pytest.raises(error, match=match):
        fastbert.patch(model)
    assert all(not type(m).__qualname__.startswith("_patched") for m in model.modules())  # left as it was


def test_enable_input_require_grads_reaches_the_patched_embeddings():
    """transformers' enable_input_require_grads (reentrant gradient checkpointing, PEFT) hooks the word
    embeddings: with them frozen, the encoder layers must still get gradients."""
    cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = fastbert.patch(hf_model("BertForSequenceClassification", cfg)).train()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = torch.randint(1, 50, (2, 6))
    model(ids, labels=torch.tensor([0, 1])).loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_bert_model_output_attentions_lists_cross_attentions_as_transformers_does():
    """transformers' BertModel returns cross_attentions=() with output_attentions=True (argument or
    config), so its return_dict=False tuple has one more element; the patched model must agree."""
    cfg = CONFIGS["gelu-2types"]
    hf = hf_model("BertModel", cfg, **NO_DROPOUT).eval()
    hf.set_attn_implementation("eager")
    model = patched_copy(hf).eval()
    inputs, _ = make_batch("BertModel", cfg)
    with torch.no_grad():
        ref, out = hf(**inputs, output_attentions=True), model(**inputs, output_attentions=True)
        assert list(out.keys()) == list(ref.keys()) and out.cross_attentions == ref.cross_attentions == ()
        ref_t, out_t = (m(**inputs, output_attentions=True, return_dict=False) for m in (hf, model))
        assert len(out_t) == len(ref_t) and out_t[-1] == ref_t[-1] == ()
        hf.config.output_attentions = model.config.output_attentions = True
        assert list(model(**inputs).keys()) == list(hf(**inputs).keys())


@pytest.mark.parametrize("name", ["BertForPreTraining", "BertForMaskedLM"])
def test_forward_hook_on_the_mlm_heads_module_fires_in_eval(name):
    """A forward hook on model.cls (transformers' BertPreTrainingHeads / BertOnlyMLMHead, a Bert* module)
    is called in eval mode as in transformers, with the same output."""
    cfg = CONFIGS["gelu-2types"]
    hf = hf_model(name, cfg, **NO_DROPOUT).double().eval()
    model = patched_copy(hf).eval()
    inputs, labels = make_batch(name, cfg)
    mask = real_mask(inputs)
    seen = {}
    for key, m in (("ref", hf), ("out", model)):
        m.cls.register_forward_hook(lambda mod, args, out, key=key: seen.setdefault(key, out))
    with torch.no_grad():
        ref, out = hf(**inputs, **labels), model(**inputs, **labels)
    assert "out" in seen, "the hook on model.cls was not called"
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    compare("hooked cls output", first(seen["out"]), first(seen["ref"]), first(seen["ref"]), mask, k=0.0)
    compare("loss", out.loss, ref.loss, ref.loss, mask, k=0.0)


# the modules a hook may sit on inside the fused paths: a Linear (its dense) and transformers' GELU modules
_HOOKED = {
    "transform dense": lambda m: m.cls.predictions.transform.dense,
    "intermediate_act_fn": lambda m: m.bert.encoder.layer[0].intermediate.intermediate_act_fn,
    "transform_act_fn": lambda m: m.cls.predictions.transform.transform_act_fn,
}


@pytest.mark.parametrize("where,hook", [("transform dense", "forward"), ("transform dense", "pre"),
                                        ("intermediate_act_fn", "forward"), ("transform_act_fn", "forward")])
def test_a_hook_inside_a_fused_path_is_called_as_in_transformers(where, hook):
    """The MLM transform's dense is a plain nn.Linear and transformers' activations are modules: a
    forward hook (or pre-hook) that changes what one computes must change the patched model's logits
    and loss as it changes transformers' (eval mode; the fused bias-GELU / GELU + LayerNorm kernels
    never called the activations)."""
    cfg = CONFIGS["gelu-2types"]
    name = "BertForMaskedLM"
    hf = hf_model(name, cfg, **NO_DROPOUT).double().eval()
    model = patched_copy(hf).eval()
    unhooked = patched_copy(hf).eval()
    inputs, labels = make_batch(name, cfg)
    mask = real_mask(inputs)
    calls = []
    for m in (hf, model):
        module = _HOOKED[where](m)
        if hook == "forward":
            module.register_forward_hook(lambda mod, args, out: calls.append(1) or out * 1.5 + 0.1)
        else:
            module.register_forward_pre_hook(lambda mod, args: calls.append(1) or (args[0] * 1.5,))
    with torch.no_grad():
        ref, out, plain = hf(**inputs, **labels), model(**inputs, **labels), unhooked(**inputs, **labels)
    assert len(calls) == 2, "the hook did not fire once per model"
    assert not torch.allclose(plain.logits, ref.logits), "the hook changed nothing: the test would not tell"
    compare("logits", out.logits, ref.logits, ref.logits, mask, k=0.0)
    compare("loss", out.loss, ref.loss, ref.loss, mask, k=0.0)


def test_return_dict_false_in_training_keeps_the_logits_slot():
    """Patched BertForPreTraining in training with labels: (loss, None, nsp logits), as transformers'
    tuple unpacks by position (its prediction scores are fastbert's masked-rows-only None)."""
    cfg = CONFIGS["gelu-2types"]
    hf = hf_model("BertForPreTraining", cfg, **NO_DROPOUT)
    model = patched_copy(hf)
    inputs, labels = make_batch("BertForPreTraining", cfg)
    ref = hf.train()(**inputs, **labels, return_dict=False)
    out = model.train()(**inputs, **labels, return_dict=False)
    assert len(out) == len(ref) == 3 and out[1] is None
    compare("loss", out[0], ref[0], ref[0], real_mask(inputs), k=0.0)
    compare("nsp logits", out[2], ref[2], ref[2], real_mask(inputs), k=0.0)


def test_attentions_in_training_are_the_dropped_out_probabilities_as_in_transformers():
    """transformers' eager attention returns the attention weights after dropout (what multiplies the
    values): in training mode each entry of layer 0's attentions is 0 or the eval probability / (1 - p)."""
    cfg = {**CONFIGS["gelu-2types"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.5}
    hf = hf_model("BertModel", cfg)
    hf.set_attn_implementation("eager")
    model = patched_copy(hf)
    inputs, _ = make_batch("BertModel", cfg)
    for m in (hf, model):
        with torch.no_grad():
            probs = m.eval()(**inputs, output_attentions=True).attentions[0]
            torch.manual_seed(0)
            dropped = m.train()(**inputs, output_attentions=True).attentions[0]
        kept = dropped != 0
        assert 0.3 < kept[probs > 0].float().mean() < 0.7, type(m).__module__  # dropout acted on what is returned
        assert torch.allclose(dropped[kept], probs[kept] / 0.5, rtol=1e-5, atol=1e-6), type(m).__module__


# ------------------------------------------------------------- mutation audit: pinned behaviours

def test_every_argument_given_positionally_as_transformers_takes_them():
    """transformers' forward takes all its named arguments positionally (labels last for the heads):
    a call giving every one of them positionally must run, and give transformers' loss and logits."""
    cfg = CONFIGS["gelu-2types"]
    hf64 = hf_model("BertForSequenceClassification", cfg, **NO_DROPOUT).double().eval()
    model = patched_copy(hf64).eval()
    inputs, labels = make_batch("BertForSequenceClassification", cfg)
    args = (inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"], None, None, labels["labels"])
    assert len(args) == len(type(model)._fastbert_positional)  # every positional slot filled
    with torch.no_grad():
        ref, out = hf64(*args), model(*args)
    compare("loss", out.loss, ref.loss, ref.loss, real_mask(inputs), k=0.0)
    compare("logits", out.logits, ref.logits, ref.logits, real_mask(inputs), k=0.0)


@pytest.mark.parametrize("selection", [-3, 2, -1, [-3], [0, 99], [-4], (1,)],
                         ids=["int-n", "int", "int-1", "list-n", "out-of-range", "below-n", "tuple"])
def test_hidden_states_selected_by_index_as_transformers_selects_them(selection):
    """transformers 5.2x's output_hidden_states as an index or indices (n = layers + 1 = 3 here): an int
    selects one, -n is index 0, out-of-range indices select nothing; the others come back None. The
    patched BertModel must give the same slots (and the same values) as transformers itself."""
    cfg = CONFIGS["gelu-2types"]
    hf64 = hf_model("BertModel", cfg, **NO_DROPOUT).double().eval()
    model = patched_copy(hf64).eval()
    inputs, _ = make_batch("BertModel", cfg)
    with torch.no_grad():
        ref = hf64(**inputs, output_hidden_states=selection).hidden_states
        out = model(**inputs, output_hidden_states=selection).hidden_states
    assert len(out) == len(ref) == cfg["num_hidden_layers"] + 1
    assert [h is None for h in out] == [h is None for h in ref]
    for i, (a, b) in enumerate(zip(out, ref)):
        if b is not None:
            compare(f"hidden_states[{i}]", a, b, b, real_mask(inputs), k=0.0)


@pytest.mark.parametrize("name", ["BertModel", "BertForSequenceClassification"])
@pytest.mark.parametrize("selection", [0, [], ()], ids=["zero", "empty-list", "empty-tuple"])
def test_a_falsy_hidden_state_selection_records_none_as_transformers_does(name, selection):
    """transformers records hidden states only for a truthy output_hidden_states: 0 (which as an index
    would select the embeddings) and an empty selection give hidden_states None, not a tuple of Nones."""
    cfg = CONFIGS["gelu-2types"]
    hf64 = hf_model(name, cfg, **NO_DROPOUT).double().eval()
    model = patched_copy(hf64).eval()
    inputs, _ = make_batch(name, cfg)
    with torch.no_grad():
        ref, out = hf64(**inputs, output_hidden_states=selection), model(**inputs, output_hidden_states=selection)
    assert ref.hidden_states is None
    assert out.hidden_states is None
    compare("first output", out[0], ref[0], ref[0], real_mask(inputs), k=0.0)


@pytest.mark.parametrize("num_labels,labels,preset,expected", [
    (3, torch.tensor([0, 2, 1, 1]), None, "single_label_classification"),  # class ids
    (1, torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64), None, "regression"),  # one output
    (3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.float64), None,
     "multi_label_classification"),  # float targets, several outputs
    (3, torch.tensor([[0.5, 0, 1], [0, 2, 1], [1, 1, 0], [0, 1, 3]], dtype=torch.float64), "regression",
     "regression"),  # a problem type already set stays (inferred, it would be multi-label)
], ids=["single-label", "regression", "multi-label", "preset-kept"])
def test_sequence_classification_problem_type_as_transformers_infers_and_keeps_it(num_labels, labels, preset,
                                                                                  expected):
    """transformers infers config.problem_type from the first labels (num_labels 1: regression; integer
    labels: single-label; else multi-label), records it (save_pretrained writes it; its pipeline reads it),
    and never overrides one already set: the patched model records the same and computes the same loss."""
    cfg = {**CONFIGS["gelu-2types"], "num_labels": num_labels, "problem_type": preset}
    hf64 = hf_model("BertForSequenceClassification", cfg, **NO_DROPOUT).double().eval()
    model = patched_copy(hf64, torch.float64).eval()
    model.config = copy.deepcopy(hf64.config)  # each model records into its own config
    inputs, _ = make_batch("BertForSequenceClassification", cfg)
    with torch.no_grad():
        ref, out = hf64(**inputs, labels=labels), model(**inputs, labels=labels)
    assert model.config.problem_type == hf64.config.problem_type == expected
    assert_close_to_reference(out.loss, ref.loss, ref.loss, k=0, name="loss")


def test_return_dict_false_in_the_config_does_not_leak_into_later_calls():
    """A head whose config says return_dict=False drives its encoder as an object (a context flag, set for
    that call only): afterwards the encoder called on its own with return_dict=False returns a tuple, as
    transformers' does."""
    cfg = CONFIGS["gelu-2types"]
    hf = hf_model("BertForSequenceClassification", cfg, **NO_DROPOUT).eval()
    model = patched_copy(hf).eval()
    model.config.return_dict = hf.config.return_dict = False
    inputs, _ = make_batch("BertForSequenceClassification", cfg)
    with torch.no_grad():
        assert isinstance(model(**inputs), tuple)
        ref, out = hf.bert(**inputs, return_dict=False), model.bert(**inputs, return_dict=False)
    assert isinstance(ref, tuple) and isinstance(out, tuple) and len(out) == len(ref) == 2


def test_context_manager_unpatches_and_lets_an_exception_through():
    """`with fastbert.patch(model):` around code that raises: the exception propagates (not swallowed)
    and the model has its transformers classes back."""
    model = hf_model("BertModel", CONFIGS["gelu-2types"])
    with pytest.raises(RuntimeError, match="inside the block"):
        with fastbert.patch(model):
            assert type(model) is not transformers.BertModel
            raise RuntimeError("inside the block")
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in model.modules())


@pytest.mark.parametrize("hidden_act", ["gelu_python", "gelu_pytorch_tanh", "gelu_python_tanh"])
def test_other_spellings_of_the_gelus_run_as_transformers_runs_them(hidden_act):
    """The module docstring's other GELU spellings: gelu_python is the exact GELU, gelu_pytorch_tanh and
    gelu_python_tanh the tanh form (two spellings of one transformers class); patched eval outputs (MLM
    logits: the encoder's and the head transform's activations) match transformers' in float64."""
    cfg = {**CONFIGS["gelu-2types"], "hidden_act": hidden_act}
    hf64 = hf_model("BertForMaskedLM", cfg, **NO_DROPOUT).double().eval()
    model = patched_copy(hf64).eval()
    inputs, _ = make_batch("BertForMaskedLM", cfg)
    with torch.no_grad():
        ref, out = hf64(**inputs).logits, model(**inputs).logits
    compare("logits", out, ref, ref, real_mask(inputs), k=0.0)


def test_head_whose_encoder_alone_was_unpatched_trains_as_transformers():
    """The encoder alone unpatched, in training mode with MLM labels: the head is transformers' own then
    (module docstring), so it returns transformers' full logits and loss, not fastbert's masked-rows-only
    None logits."""
    cfg = CONFIGS["tanh-1type"]
    hf64 = hf_model("BertForMaskedLM", cfg, **NO_DROPOUT).double().train()
    model = patched_copy(hf64).train()
    fastbert.unpatch(model.bert)
    inputs, labels = make_batch("BertForMaskedLM", cfg)
    ref, out = hf64(**inputs, **labels), model(**inputs, **labels)
    assert out.logits is not None, "fastbert's masked-rows head ran on transformers' encoder"
    for key in ref.keys():
        assert_close_to_reference(out[key], ref[key], ref[key], k=0, name=key)
