"""fastbert's eight Bert classes against transformers': outputs, losses and every parameter gradient.

Judged by the tolerance rule (tests/tolerance.py): fastbert in float32 against transformers in
float64 must be within k = 4 of transformers' own float32 error. fastbert in float64 must match
transformers in float64 to ~1e-10 (same maths, different association). Batches mix a length-1 row,
full rows and padded rows; values at padding positions are unspecified (API.md) and not compared.
"""

import contextlib
import copy

import pytest
import torch

import fastbert
from tolerance import assert_close_to_reference

transformers = pytest.importorskip("transformers")

CLASSES = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "BertForMultipleChoice"]

CONFIGS = {
    "gelu-2types": dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu"),
    "tanh-1type": dict(vocab_size=67, hidden_size=24, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=50, max_position_embeddings=24, type_vocab_size=1, hidden_act="gelu_new",
                       num_labels=3),
}
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def config_for(name, cfg_name):
    cfg = dict(CONFIGS[cfg_name])
    if name == "BertForQuestionAnswering":
        cfg["num_labels"] = 2  # start and end logits
    return cfg


def make_pair(name, cfg, seed=0):
    """A transformers model (float64, the reference) and fastbert's twin holding the same weights."""
    torch.manual_seed(seed)
    hf = getattr(transformers, name)(transformers.BertConfig(**cfg, **NO_DROPOUT)).double()
    ours = getattr(fastbert, name)(fastbert.BertConfig(**cfg, **NO_DROPOUT))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def make_triple(name, cfg):
    """make_pair's float64 reference and fastbert model, plus transformers in float32 on the same
    weights (the rounding a float32 model may show: DESIGN.md's tolerance rule)."""
    hf64, ours = make_pair(name, cfg)
    hf32 = getattr(transformers, name)(transformers.BertConfig(**cfg, **NO_DROPOUT))
    hf32.load_state_dict(hf64.state_dict())
    return hf64, hf32, ours


def make_batch(name, cfg, batch=4, seq=11, choices=2, seed=1):
    """Rows: full, padded, length 1, padded; labels for every head."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, length in zip(range(1, batch), (7, 1, 4)):
        mask[row, length:] = 0
    tt = torch.randint(0, cfg["type_vocab_size"], (batch, seq), generator=g)
    num_labels = cfg.get("num_labels", 2)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    mlm = torch.full((batch, seq), -100)
    pick = (torch.rand(batch, seq, generator=g) < 0.3) & mask.bool()
    pick[0, 0] = pick[2, 0] = True
    mlm[pick] = torch.randint(0, cfg["vocab_size"], (int(pick.sum()),), generator=g)
    labels = {
        "BertModel": {},
        "BertForPreTraining": dict(labels=mlm, next_sentence_label=torch.randint(0, 2, (batch,), generator=g)),
        "BertForMaskedLM": dict(labels=mlm),
        "BertForNextSentencePrediction": dict(labels=torch.randint(0, 2, (batch,), generator=g)),
        "BertForSequenceClassification": dict(labels=torch.randint(0, num_labels, (batch,), generator=g)),
        "BertForTokenClassification": dict(labels=torch.randint(0, num_labels, (batch, seq), generator=g)
                                           .masked_fill(mask == 0, -100)),
        "BertForQuestionAnswering": dict(start_positions=torch.tensor([0, 3, 0, 2]),
                                         end_positions=torch.tensor([5, 6, 0, 50])),  # 50: outside, ignored
        "BertForMultipleChoice": dict(labels=torch.randint(0, choices, (batch,), generator=g)),
    }[name]
    if name == "BertForMultipleChoice":  # (batch, choices, seq): each choice its own lengths
        inputs = {k: torch.stack([v, v.roll(1, dims=0)], dim=1) for k, v in inputs.items()}
    return inputs, labels


def real_mask(inputs):
    return inputs["attention_mask"].reshape(-1, inputs["attention_mask"].shape[-1]).bool()


def compare(name, ours, base32, ref64, mask, k=4.0):
    """Compare one output; sequence-shaped tensors only at real positions."""
    if isinstance(ref64, tuple):
        for i, (a, b, r) in enumerate(zip(ours, base32, ref64)):
            compare(f"{name}[{i}]", a, b, r, mask, k)
        return
    if ref64.dim() >= 2 and tuple(ref64.shape[:2]) == tuple(mask.shape):
        ours, base32, ref64 = ours[mask], base32[mask], ref64[mask]
    elif ref64.dim() >= 3 and ref64.shape[:3] == (mask.shape[0] // ref64.shape[1], ref64.shape[1], mask.shape[1]):
        flat = lambda t: t.reshape(mask.shape[0], mask.shape[1], *t.shape[3:])[mask]  # noqa: E731
        ours, base32, ref64 = flat(ours), flat(base32), flat(ref64)
    assert_close_to_reference(ours, base32, ref64, k=k, name=name)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("name", CLASSES)
def test_outputs_match_transformers_in_eval(name, cfg_name):
    cfg = config_for(name, cfg_name)
    hf64, hf32, ours = make_triple(name, cfg)
    inputs, labels = make_batch(name, cfg)
    mask = real_mask(inputs)
    hf64.eval(), hf32.eval(), ours.eval()
    kwargs = dict(**inputs, **labels, output_hidden_states=True)
    with torch.no_grad():
        ref, base, out = hf64(**kwargs), hf32(**kwargs), ours(**kwargs)
        out64 = ours.double()(**kwargs)
    assert set(ref.keys()) == {k for k, v in out.items() if v is not None}, (ref.keys(), out.keys())
    for key in ref.keys():
        compare(f"{name}.{key}", out[key], base[key], ref[key], mask)
        compare(f"{name}.{key} (float64)", out64[key], ref[key], ref[key], mask, k=0.0)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("name", [c for c in CLASSES if c != "BertModel"])
def test_loss_and_gradients_match_transformers_in_training(name, cfg_name):
    """Training mode (dropout off): the masked-rows MLM head must give transformers' loss and grads."""
    cfg = config_for(name, cfg_name)
    hf64, hf32, ours = make_triple(name, cfg)
    inputs, labels = make_batch(name, cfg)
    results = []
    for model in (hf64, hf32, ours):
        model.train()
        model.zero_grad()
        loss = model(**inputs, **labels).loss
        loss.backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                 for n, p in model.named_parameters()}
        results.append((loss.detach(), grads))
    (ref_loss, ref_g), (base_loss, base_g), (loss, g) = results
    assert_close_to_reference(loss, base_loss, ref_loss, k=4, name=f"{name}.loss")
    assert set(g) == set(ref_g)
    for pname in ref_g:
        assert_close_to_reference(g[pname], base_g[pname], ref_g[pname], k=4, name=f"{name} grad {pname}")


def test_mlm_head_runs_on_masked_rows_only_in_training():
    cfg = CONFIGS["gelu-2types"]
    _, ours = make_pair("BertForPreTraining", cfg)
    inputs, labels = make_batch("BertForPreTraining", cfg)
    ours.train()
    out = ours(**inputs, **labels)
    assert out.prediction_logits is None and out.loss is not None
    ours.eval()
    out = ours(**inputs, **labels)
    assert out.prediction_logits.shape == (*inputs["input_ids"].shape, cfg["vocab_size"])


def rows_through_last_feed_forward(model, **kwargs) -> int:
    """How many rows the last encoder layer's feed-forward ran on in one forward of `model` (a head
    class or BertModel)."""
    seen = []
    hook = getattr(model, "bert", model).encoder.layer[-1].intermediate.register_forward_hook(
        lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        model(**kwargs)
    finally:
        hook.remove()
    assert len(seen) == 1
    return seen[0]


def check_last_layer_runs_on_the_rows_read(model, name, cfg):
    """Training with MLM labels, the last layer runs past its attention on the labelled tokens and each
    row's first token only (the loss and gradients are those of the full layer: the training-mode
    parity tests judge them); with hidden states asked for, in eval mode, or without labels, on
    every real token."""
    inputs, labels = make_batch(name, cfg)
    real = inputs["attention_mask"].bool()
    read = (labels["labels"] != -100) & real
    read[:, 0] |= real[:, 0]
    model.train()
    assert last_layer_rows(model, **inputs, **labels) == int(read.sum()) < int(real.sum())
    assert last_layer_rows(model, **inputs, **labels, output_hidden_states=True) == "all"
    assert last_layer_rows(model, **inputs) == "all"
    model.eval()
    assert last_layer_rows(model, **inputs, **labels) == "all"


@pytest.mark.parametrize("name", ["BertForPreTraining", "BertForMaskedLM"])
def test_last_layer_runs_on_the_rows_read_only_when_training_with_labels(name):
    cfg = CONFIGS["tanh-1type"]
    check_last_layer_runs_on_the_rows_read(make_pair(name, cfg)[1], name, cfg)


@contextlib.contextmanager
def last_layer_row_counts():
    """Yields a list that gets, for every forward of a fastbert encoder inside the block, the rows its
    last layer computes past the attention: their count, or "all". Counted inside the encoder loop,
    not by a hook (a hook turns the short path off), and checked against the rows the loop returns:
    R for a count, every packed token (or every position, padded) for "all"."""
    from fastbert import modeling
    seen, originals = [], (modeling._last_layer_rows, modeling.run_layers)

    def counting(layout, i, n_layers):
        rows = originals[0](layout, i, n_layers)
        if i == n_layers - 1:
            seen.append("all" if rows is None else int(rows.shape[0]))
        return rows

    def checked(layers, x, layout, *args):
        out = originals[1](layers, x, layout, *args)
        if layers:
            want = seen[-1] if seen[-1] != "all" else getattr(layout, "total", layout.batch * layout.seq)
            assert out[0].shape[0] == want, f"the last layer returned {out[0].shape[0]} rows, not {want}"
        return out

    modeling._last_layer_rows, modeling.run_layers = counting, checked
    try:
        yield seen
    finally:
        modeling._last_layer_rows, modeling.run_layers = originals


def last_layer_rows(model, **kwargs):
    """last_layer_row_counts of one forward of `model`."""
    with last_layer_row_counts() as seen:
        model(**kwargs)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("name", ["BertForSequenceClassification", "BertForNextSentencePrediction",
                                  "BertForMultipleChoice"])
def test_pooler_heads_run_the_last_layer_on_one_row_per_example(name):
    """A head that reads pooler_output only runs the last layer past its attention on each example's
    first token (train and eval; a patched transformers model too); asked for hidden states, on every
    token. The outputs of the short path equal transformers' in the parity tests; here also on a
    left-padded batch (the padded layout, whose row count is fixed), against transformers."""
    cfg = CONFIGS["gelu-2types"]
    hf64, ours = make_pair(name, cfg)
    inputs, labels = make_batch(name, cfg)
    batch = real_mask(inputs).shape[0]
    for train in (True, False):
        ours.train(train)
        assert last_layer_rows(ours, **inputs, **labels) == batch
    assert last_layer_rows(ours, **inputs, **labels, output_hidden_states=True) == "all"
    patched = fastbert.patch(copy.deepcopy(hf64).float())  # a transformers model runs fastbert's heads
    assert last_layer_rows(patched, **inputs, **labels) == batch
    if name == "BertForMultipleChoice":
        return
    ours.eval()
    left = {k: v.flip(-1) for k, v in inputs.items()}  # right-padded rows become left-padded ...
    pos = (left["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # ... with positions counted from the first real token
    left["input_ids"] = torch.where(left["attention_mask"].bool(), left["input_ids"], 0)
    hf64.eval()
    hf32 = copy.deepcopy(hf64).float()
    with torch.no_grad():
        ref, base = (m(**left, position_ids=pos).logits for m in (hf64, hf32))
        got = ours(**left, position_ids=pos).logits
    assert last_layer_rows(ours, **left, position_ids=pos) == batch
    assert_close_to_reference(got, base, ref, name="logits")


@pytest.mark.parametrize("name, where", [
    ("BertForSequenceClassification", "bert"), ("BertForSequenceClassification", "encoder"),
    ("BertForSequenceClassification", "last layer"), ("BertForSequenceClassification", "last feed-forward"),
    ("BertForSequenceClassification", "pooler"),
    ("BertForPreTraining", "bert"), ("BertForPreTraining", "last feed-forward")])
def test_a_hook_watching_the_encoder_keeps_every_row(name, where):
    """Features read by a forward hook (a common way to take embeddings out of a classifier) stay
    whole: with a hook on the encoder model, the encoder or the last layer, the classification head
    (eval) and the pretraining heads (training with labels) run every row, and the hook on bert sees
    transformers' last_hidden_state."""
    cfg = CONFIGS["gelu-2types"]
    hf64, ours = make_pair(name, cfg)
    inputs, labels = make_batch(name, cfg)
    real = real_mask(inputs)
    if name == "BertForPreTraining":
        ours.train()  # dropout is off (make_pair): the features still equal transformers'
        read = (labels["labels"] != -100) & real
        read[:, 0] |= real[:, 0]
        unhooked = int(read.sum())
    else:
        ours.eval()
        unhooked = real.shape[0]
    hf64.eval()
    module = {"bert": ours.bert, "encoder": ours.bert.encoder, "last layer": ours.bert.encoder.layer[-1],
              "last feed-forward": ours.bert.encoder.layer[-1].output.dense, "pooler": ours.bert.pooler}[where]
    seen = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        assert last_layer_rows(ours, **inputs, **labels) == "all"
    finally:
        handle.remove()
    assert last_layer_rows(ours, **inputs, **labels) == unhooked < int(real.sum())  # unhooked again
    if where == "bert":
        with torch.no_grad():
            ref = hf64.bert(**inputs).last_hidden_state
        base = copy.deepcopy(hf64.bert).float()(**inputs).last_hidden_state.detach()
        assert_close_to_reference(seen[0].last_hidden_state[real], base[real], ref[real], name="hooked features")


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = CONFIGS["gelu-2types"]
    hf64, plain = make_pair("BertForPreTraining", cfg)
    plain.double()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable()
    inputs, labels = make_batch("BertForPreTraining", cfg)
    for m, forwards in ((plain, 1), (ckpt, 2)):  # checkpointing runs each layer again in the backward
        calls = []
        hook = m.bert.encoder.layer[-1].register_forward_pre_hook(lambda *args: calls.append(1))
        m.train()
        m(**inputs, **labels).loss.backward()
        hook.remove()
        assert len(calls) == forwards
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert_close_to_reference(q.grad, p.grad, p.grad, k=0, name=name)


@pytest.mark.parametrize("reentrant", [True, None, False])  # None: torch's default, reentrant
def test_checkpointed_layers_of_a_model_with_frozen_embeddings_still_learn(reentrant):
    """A reentrant checkpoint passes gradients only to inputs that need one: with the embeddings frozen
    (adapters, a frozen lower model) the layers got none, silently. transformers marks the embeddings'
    output (enable_input_require_grads, from activation_checkpointing_enable); fastbert's encoder marks
    its input. Every layer's gradient must equal the unCheckpointed run's, as in transformers."""
    cfg = CONFIGS["gelu-2types"]
    hf64, plain = make_pair("BertForSequenceClassification", cfg)
    plain.double().train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    inputs, labels = make_batch("BertForSequenceClassification", cfg)
    for m in (plain, ckpt):
        for p in m.bert.embeddings.parameters():
            p.requires_grad_(False)
        m(**inputs, **labels).loss.backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.requires_grad:
            assert q.grad is not None, name
            assert_close_to_reference(q.grad, p.grad, p.grad, k=0, name=name)
    # a wholly frozen encoder (only the head trains): nothing to mark, so no backward through the layers
    for p in ckpt.bert.encoder.parameters():
        p.requires_grad_(False)
    calls = []
    hook = ckpt.bert.encoder.layer[-1].register_forward_pre_hook(lambda *args: calls.append(1))
    ckpt.zero_grad(set_to_none=True)
    ckpt(**inputs, **labels).loss.backward()
    hook.remove()
    assert len(calls) == 1 and ckpt.classifier.weight.grad is not None  # no recomputation in a backward


def test_transformers_helpers_trainer_and_peft_call():
    """main_input_name, base_model, num_parameters (Trainer's FLOPs: 6 x tokens x non-embedding
    parameters) and enable / disable_input_require_grads (PEFT) as transformers' models have them."""
    cfg = CONFIGS["gelu-2types"]
    hf, ours = make_pair("BertForMaskedLM", cfg)
    assert ours.main_input_name == "input_ids" and ours.base_model is ours.bert
    for only_trainable, exclude_embeddings in ((False, False), (False, True), (True, False)):
        assert ours.num_parameters(only_trainable, exclude_embeddings) == hf.num_parameters(
            only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    for p in ours.bert.embeddings.parameters():
        p.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == sum(p.numel() for p in ours.parameters() if p.requires_grad)
    inputs, _ = make_batch("BertForMaskedLM", cfg)
    for p in ours.parameters():  # a wholly frozen model: only the hook can make its output need a gradient
        p.requires_grad_(False)
    assert not ours.bert(**inputs).last_hidden_state.requires_grad
    ours.enable_input_require_grads()
    ours.enable_input_require_grads()  # twice: still one hook
    assert ours.bert(**inputs).last_hidden_state.requires_grad
    assert len(ours.get_input_embeddings()._forward_hooks) == 1
    ours.disable_input_require_grads()
    assert not ours.bert(**inputs).last_hidden_state.requires_grad


def test_an_output_rebuilt_from_its_items_as_accelerate_does_reads_like_the_original():
    """accelerate's mixed precision (Trainer with bf16 / fp16) rebuilds a model's output as
    type(output)(mapping) of its items; the None fields are gone from the mapping but still read as None.
    Also flattened and rebuilt as a pytree (torch.export, as transformers registers its outputs)."""
    import torch.utils._pytree as pytree
    cfg = CONFIGS["gelu-2types"]
    _, ours = make_pair("BertForSequenceClassification", cfg)
    inputs, labels = make_batch("BertForSequenceClassification", cfg)
    out = ours.eval()(**inputs, **labels)
    rebuilt = type(out)({k: v.double() for k, v in out.items()})
    assert list(rebuilt.keys()) == ["loss", "logits"] and rebuilt.hidden_states is None and rebuilt.attentions is None
    assert torch.equal(rebuilt[1], out.logits.double())
    with pytest.raises(AttributeError):
        rebuilt.no_such_field
    copied = type(out)(out)  # a copy keeps the output's own fields: a classifier's has no last_hidden_state
    assert copied.fields() == out.fields()
    with pytest.raises(AttributeError):
        copied.last_hidden_state
    import accelerate  # a test extra
    converted = accelerate.utils.convert_to_fp32(type(out)(loss=out.loss.half(), logits=out.logits.bfloat16()))
    assert converted.logits.dtype == torch.float32 and converted.hidden_states is None
    leaves, spec = pytree.tree_flatten(out)
    assert len(leaves) == 2 and all(a is b for a, b in zip(leaves, out.values()))
    back = pytree.tree_unflatten(leaves, spec)
    assert type(back) is type(out) and list(back.keys()) == list(out.keys()) and back.hidden_states is None


@pytest.mark.parametrize("name", ["BertModel", "BertForSequenceClassification"])
def test_torch_export_traces_the_padded_layout_and_gives_eager_outputs(name):
    """torch.export needs one graph without data-dependent shapes: exported, the model runs the padded
    layout (the unpadded one needs the row lengths on the host) and gives the eager model's outputs."""
    cfg = CONFIGS["gelu-2types"]
    hf64, ours = make_pair(name, cfg)
    ours.eval()
    inputs, _ = make_batch(name, cfg)
    args = (inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"])
    exported = torch.export.export(ours, args)
    with torch.no_grad():
        got, want, ref = exported.module()(*args), ours(*args), hf64.eval()(*args)
    assert type(got) is type(want) and list(got.keys()) == list(want.keys())
    real = inputs["attention_mask"].bool()
    for key in want.keys():
        g, w, r = got[key], want[key], ref[key]
        if key == "last_hidden_state":
            g, w, r = g[real], w[real], r[real]  # padding positions are unspecified
        assert_close_to_reference(g, w, r, name=f"exported {key}")


def test_gradient_checkpointing_switches_take_transformers_arguments():
    """transformers' Trainer(activation_checkpointing=True) calls activation_checkpointing_enable (or the
    older gradient_checkpointing_enable) with keywords; a user script may call gradient_checkpointing_disable
    and read is_gradient_checkpointing. fastbert's models take the same calls."""
    cfg = CONFIGS["gelu-2types"]
    _, model = make_pair("BertForSequenceClassification", cfg)
    inputs, labels = make_batch("BertForSequenceClassification", cfg)
    model.train()

    def forwards_of_last_layer():
        calls = []
        hook = model.bert.encoder.layer[-1].register_forward_pre_hook(lambda *args: calls.append(1))
        model(**inputs, **labels).loss.backward()
        hook.remove()
        return len(calls)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                        every_n_layers=1, offload=False)
    assert model.is_gradient_checkpointing and forwards_of_last_layer() == 2
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing and forwards_of_last_layer() == 1
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False)
    assert model.is_gradient_checkpointing and forwards_of_last_layer() == 2
    model.gradient_checkpointing_disable()
    for unsupported in (dict(every_n_layers=2), dict(offload=True)):  # refused, not silently ignored
        with pytest.raises(ValueError, match="every_n_layers=1, offload=False"):
            model.gradient_checkpointing_enable(**unsupported)
        assert not model.is_gradient_checkpointing


def test_output_rows_of_the_wrong_shape_are_refused():
    cfg = CONFIGS["gelu-2types"]
    _, ours = make_pair("BertModel", cfg)
    inputs, _ = make_batch("BertModel", cfg)
    with pytest.raises(ValueError, match="output_rows has shape"):
        ours(**inputs, output_rows=torch.ones(2, 3, dtype=torch.bool))


def test_no_masked_token_gives_zero_mlm_loss_and_grads():
    cfg = CONFIGS["gelu-2types"]
    _, ours = make_pair("BertForMaskedLM", cfg)
    inputs, _ = make_batch("BertForMaskedLM", cfg)
    ours.train()
    loss = ours(**inputs, labels=torch.full_like(inputs["input_ids"], -100)).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in ours.parameters())
    hf, ours = make_pair("BertForMaskedLM", cfg)  # eval mode: the full logits, transformers' nan
    hf.eval(), ours.eval()
    labels = torch.full_like(inputs["input_ids"], -100)
    assert hf(**inputs, labels=labels).loss.isnan() and ours(**inputs, labels=labels).loss.isnan()


def test_return_dict_false_gives_transformers_tuple_order():
    cfg = CONFIGS["gelu-2types"]
    hf, ours = make_pair("BertForQuestionAnswering", cfg)
    inputs, labels = make_batch("BertForQuestionAnswering", cfg)
    hf.eval(), ours.double().eval()
    ref = hf(**inputs, **labels, return_dict=False)
    out = ours(**inputs, **labels, return_dict=False)
    assert isinstance(out, tuple) and len(out) == len(ref) == 3
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, atol=1e-10)



@pytest.mark.parametrize("name", ["BertForPreTraining", "BertForMaskedLM"])
def test_return_dict_false_in_training_keeps_the_logits_slot(name):
    """In training with MLM labels the head runs on the masked rows and its logits are None: the tuple
    keeps their slot (None) so it unpacks by position as transformers' (loss, logits[, nsp]) does."""
    cfg = CONFIGS["gelu-2types"]
    hf, ours = make_pair(name, cfg)
    inputs, labels = make_batch(name, cfg)
    hf.train(), ours.train()
    ref = hf(**inputs, **labels, return_dict=False)
    out = ours(**inputs, **labels, return_dict=False)
    assert len(out) == len(ref) and out[1] is None and ref[1] is not None
    assert all(torch.is_tensor(a) == torch.is_tensor(b) for a, b in zip(out[2:], ref[2:]))
    with_hidden = ours(**inputs, **labels, return_dict=False, output_hidden_states=True)
    assert len(with_hidden) == len(out) + 1 and with_hidden[1] is None


@pytest.mark.parametrize("name", ["BertModel", "BertForSequenceClassification"])
def test_return_dict_false_with_every_output_has_the_installed_transformers_layout(name):
    """hidden states and attentions asked for: the tuple has transformers' length and the type of each
    slot (transformers 5's BertModel ends it with an empty cross-attentions tuple, 4.x's does not)."""
    cfg = config_for(name, "gelu-2types")
    hf, ours = make_pair(name, cfg)
    inputs, _ = make_batch(name, cfg)
    hf.eval().set_attn_implementation("eager")
    ours.double().eval()
    for flags in ({"output_attentions": True}, {"output_attentions": True, "output_hidden_states": True}):
        ref = hf(**inputs, return_dict=False, **flags)
        out = ours(**inputs, return_dict=False, **flags)
        assert [type(a) for a in out] == [type(b) for b in ref]
        assert [len(a) if isinstance(a, tuple) else a.shape for a in out] == \
            [len(b) if isinstance(b, tuple) else b.shape for b in ref]


@pytest.mark.parametrize("name", CLASSES)
def test_output_flags_in_the_config_are_the_forward_defaults(name, tmp_path):
    """As in transformers, output_hidden_states, output_attentions and return_dict set in the config (as
    from_pretrained(dir, output_hidden_states=True) does) are forward's defaults; an argument wins."""
    cfg = config_for(name, "gelu-2types")
    hf, ours = make_pair(name, cfg)
    ours.save_pretrained(tmp_path)
    ours = getattr(fastbert, name).from_pretrained(tmp_path, output_hidden_states=True, output_attentions=True)
    hf.eval().set_attn_implementation("eager")
    hf.config.output_hidden_states = hf.config.output_attentions = True
    inputs, labels = make_batch(name, cfg)
    ref, out = hf(**inputs, **labels), ours(**inputs, **labels)
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg["num_hidden_layers"] + 1
    assert len(out.attentions) == len(ref.attentions) == cfg["num_hidden_layers"]
    out = ours(**inputs, **labels, output_hidden_states=False, output_attentions=False)
    assert out.hidden_states is None and out.attentions is None
    for model in (hf, ours):
        model.config.return_dict = model.config.output_attentions = False
    ref, out = hf(**inputs, **labels), ours(**inputs, **labels)
    assert isinstance(out, tuple) and [t.shape for t in out[:2]] == [t.shape for t in ref[:2]]
    assert len(out) == len(ref) and len(out[-1]) == cfg["num_hidden_layers"] + 1  # the hidden states, last
    assert isinstance(ours(**inputs, return_dict=True), dict)

@pytest.mark.parametrize("name", ["BertForSequenceClassification", "BertForPreTraining"])
def test_outputs_list_what_transformers_lists(name):
    """A field that is None is not a key (keys, items, integer index), as in transformers: Trainer's
    evaluation collects logits from items(), and a None there breaks its concatenation. Attribute
    access still reads None, an undeclared name raises."""
    import copy
    cfg = CONFIGS["gelu-2types"]
    hf, ours = make_pair(name, cfg)
    inputs, labels = make_batch(name, cfg)
    hf.eval(), ours.double().eval()
    for kwargs in ({}, labels, dict(labels, output_hidden_states=True)):
        ref, out = hf(**inputs, **kwargs), ours(**inputs, **kwargs)
        assert list(out.keys()) == list(ref.keys()), kwargs
        assert all(v is not None for _, v in out.items())
        assert out[0].shape == ref[0].shape  # values: the parity tests above (padding positions differ)
        assert len(out[1:]) == len(ref[1:]) and all(a is b for a, b in zip(out[1:], out.to_tuple()[1:]))
    assert out.attentions is None and "attentions" not in out
    with pytest.raises(AttributeError):
        out.no_such_field
    assert copy.copy(out).attentions is None and list(copy.copy(out).keys()) == list(out.keys())
    out.attentions = (torch.zeros(1),)  # setting a field sets its key, as in transformers; None removes it
    assert "attentions" in out and out["attentions"] is out.attentions
    out.attentions = None
    assert "attentions" not in out and out.attentions is None


@pytest.mark.parametrize("patched", [False, True], ids=["fastbert", "patched-transformers"])
def test_hooks_that_change_the_stream_reach_every_matmul(patched):
    """A forward hook replacing a BertLayer's output and a pre-hook changing BertAttention's input
    reach the next QKV matmul as in transformers (the layers pass no stale matmul copy around them)."""
    cfg = CONFIGS["tanh-1type"]
    hf, ours = make_pair("BertModel", cfg)
    if patched:
        ours = fastbert.patch(make_pair("BertModel", cfg)[0])
    inputs, _ = make_batch("BertModel", cfg)
    hf.eval(), ours.double().eval()
    hooks = []
    for model in (hf, ours):
        layers = model.encoder.layer
        hooks.append(layers[0].register_forward_hook(  # transformers' layer returns a tensor, fastbert's a tuple
            lambda m, a, out: (out[0].roll(1, -1), *out[1:]) if isinstance(out, tuple) else out.roll(1, -1)))
        hooks.append(layers[1].attention.register_forward_pre_hook(lambda m, args: (args[0] * 1.5, *args[1:])))
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        want, got = hf(**inputs).last_hidden_state, ours(**inputs).last_hidden_state
    assert torch.allclose(got[real], want[real], atol=1e-9)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        assert not torch.allclose(ours(**inputs).last_hidden_state[real], want[real], atol=1e-3)  # the hooks mattered


def test_output_attentions_and_inputs_embeds():
    cfg = CONFIGS["gelu-2types"]
    hf, ours = make_pair("BertModel", cfg)
    hf.eval(), ours.double().eval()
    hf.set_attn_implementation("eager")
    inputs, _ = make_batch("BertModel", cfg)
    mask = real_mask(inputs)
    ref = hf(**inputs, output_attentions=True)
    out = ours(**inputs, output_attentions=True)
    assert len(out.attentions) == cfg["num_hidden_layers"]
    for a, b in zip(out.attentions, ref.attentions):
        rows = lambda t: t.transpose(1, 2)[mask]  # (B, nh, S, S) -> real query rows (T, nh, S)  # noqa: E731
        assert torch.allclose(rows(a), rows(b), atol=1e-10)
    embeds = hf.embeddings.word_embeddings(inputs["input_ids"])
    ref = hf(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], token_type_ids=inputs["token_type_ids"])
    out = ours(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], token_type_ids=inputs["token_type_ids"])
    assert torch.allclose(out.last_hidden_state[mask], ref.last_hidden_state[mask], atol=1e-10)


def test_tied_weights_are_one_parameter_listed_under_both_names():
    ours = fastbert.BertForPreTraining(fastbert.BertConfig(**CONFIGS["gelu-2types"]))
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert ours.cls.predictions.decoder.bias is ours.cls.predictions.bias
    keys = ours.state_dict().keys()
    assert "cls.predictions.decoder.weight" in keys and "cls.predictions.bias" in keys
    assert "cls.predictions.decoder.bias" in keys


def test_word_embedding_gradient_reuses_its_memory_only_when_no_one_holds_it():
    """On the CPU the word table's gradient is written into one buffer, step after step (see
    fastbert.kernels._workspace.ReusedBuffer): it must be the gradient transformers gets, adopted as .grad
    without a copy, never overwrite a gradient the caller kept, and accumulate when .grad is kept."""
    name = "BertForTokenClassification"
    cfg = config_for(name, "gelu-2types")
    hf64, ours = make_pair(name, cfg, seed=3)
    hf32 = copy.deepcopy(hf64).float()
    inputs, labels = make_batch(name, cfg)
    inputs["input_ids"] = inputs["input_ids"] * inputs["attention_mask"]  # padding id 0: its row gets no gradient
    word = ours.bert.embeddings.word_embeddings.weight

    def backward():
        ours(**inputs, **labels).loss.backward()

    backward()
    first = word.grad.clone()
    for hf in (hf32, hf64):
        hf(**inputs, **labels).loss.backward()
    assert_close_to_reference(first, hf32.bert.embeddings.word_embeddings.weight.grad,
                              hf64.bert.embeddings.word_embeddings.weight.grad, name="word grad")
    assert first[0].abs().sum() == 0 and first.abs().sum() > 0
    buffer = ours.bert.embeddings._word_grad.buf
    assert word.grad.data_ptr() == buffer.data_ptr()  # adopted, not copied
    ours.zero_grad(set_to_none=True)
    backward()
    assert word.grad.data_ptr() == buffer.data_ptr() and torch.equal(word.grad, first)  # reused, same values
    kept = word.grad
    ours.zero_grad(set_to_none=True)
    backward()
    assert word.grad.data_ptr() != kept.data_ptr() and torch.equal(kept, first)  # the kept one untouched
    ours.zero_grad(set_to_none=False)
    backward()
    backward()
    torch.testing.assert_close(word.grad, 2 * first, rtol=1e-6, atol=1e-7)  # accumulated into the kept .grad


# ---------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case,match", [
    ("id_out_of_range", "input_ids must lie in"),
    ("negative_id", "input_ids must lie in"),
    ("type_out_of_range", "token_type_ids must lie in"),
    ("too_long", "exceeds max_position_embeddings"),
    ("mask_shape", "attention_mask has shape"),
    ("types_shape", "token_type_ids has shape"),
    ("float_ids", "integer tensor"),
    ("one_dim", r"\(batch, seq\)"),
    ("negative_mask", "attention_mask must be 0"),
    ("position_row_length", "position_ids has shape"),
    ("empty_seq", r"an empty batch: the input is \(2, 0\)"),
    ("empty_batch", r"an empty batch: the input is \(0, 5\)"),
])
def test_bad_input_raises_clear_error(case, match):
    cfg = CONFIGS["gelu-2types"]
    model = fastbert.BertModel(fastbert.BertConfig(**cfg)).eval()
    ids = torch.randint(0, cfg["vocab_size"], (2, 5))
    kw = dict(input_ids=ids)
    if case == "id_out_of_range":
        kw["input_ids"] = ids.clone().fill_(cfg["vocab_size"])
    elif case == "negative_id":
        kw["input_ids"] = ids.clone().fill_(-1)
    elif case == "type_out_of_range":
        kw["token_type_ids"] = torch.full_like(ids, 2)
    elif case == "too_long":
        kw["input_ids"] = torch.zeros(1, cfg["max_position_embeddings"] + 1, dtype=torch.long)
    elif case == "mask_shape":
        kw["attention_mask"] = torch.ones(2, 6)
    elif case == "types_shape":
        kw["token_type_ids"] = torch.zeros(1, 5, dtype=torch.long)
    elif case == "float_ids":
        kw["input_ids"] = ids.float()
    elif case == "one_dim":
        kw["input_ids"] = ids[0]
    elif case == "negative_mask":
        kw["attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, -1, 0, 0]])
    elif case == "position_row_length":  # one (1, S) row for all takes S positions, not S + 1
        kw["position_ids"] = torch.arange(6)[None]
    elif case == "empty_seq":
        kw["input_ids"] = ids[:, :0]
    elif case == "empty_batch":
        kw["input_ids"] = ids[:0]
    with pytest.raises(ValueError, match=match):
        model(**kw)


@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 5), (2, 3, 0)])
def test_multiple_choice_names_an_empty_input_by_its_own_shape(shape):
    model = fastbert.BertForMultipleChoice(fastbert.BertConfig(**CONFIGS["gelu-2types"])).eval()
    with pytest.raises(ValueError, match=rf"an empty batch: the input is \({shape[0]}, {shape[1]}, {shape[2]}\)"):
        model(torch.zeros(shape, dtype=torch.long))


def test_unsupported_activation_is_named():
    with pytest.raises(ValueError, match="relu"):
        fastbert.BertConfig(hidden_act="relu")


@pytest.mark.parametrize("num_labels, labels, problem", [
    (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), "multi_label_classification"),
    (3, torch.tensor([2, 0]), "single_label_classification"),
    (1, torch.tensor([0.5, -1.0]), "regression"),
])
def test_sequence_classification_records_the_problem_type_it_infers(num_labels, labels, problem, tmp_path):
    """transformers writes the problem type inferred from the first labels into the config, so that
    save_pretrained keeps it (its text-classification pipeline picks sigmoid or softmax by it)."""
    cfg = dict(CONFIGS["gelu-2types"], num_labels=num_labels)
    hf, ours = make_pair("BertForSequenceClassification", cfg)
    ids = torch.randint(1, cfg["vocab_size"], (2, 5))
    hf(input_ids=ids, labels=labels.double() if labels.is_floating_point() else labels)
    ours(input_ids=ids, labels=labels)
    assert ours.config.problem_type == hf.config.problem_type == problem
    ours.save_pretrained(tmp_path)
    assert transformers.BertConfig.from_pretrained(tmp_path).problem_type == problem


def test_dropout_modules_set_the_training_dropout_as_in_transformers():
    """As in transformers, the model's nn.Dropout modules decide its dropout (`fastbert pretrain --dropout`
    sets them on a loaded checkpoint): with every one at p = 0, training mode gives eval's outputs, on
    both layouts, and the attention and embedding dropout follow their modules too."""
    cfg = dict(CONFIGS["gelu-2types"], hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    torch.manual_seed(0)
    model = fastbert.BertModel(fastbert.BertConfig(**cfg)).double()
    inputs, _ = make_batch("BertModel", cfg)
    mask = real_mask(inputs)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        # each layout against its own eval output: the padded and packed GEMMs have different row counts,
        # and a BLAS may round a row differently by the count (1 ulp in float64 on this project's CPU)
        want = {unpad: model.eval()(**inputs, unpad=unpad).last_hidden_state[mask] for unpad in (True, False)}
        model.train()
        for unpad in (True, False):
            got = model(**inputs, unpad=unpad).last_hidden_state[mask]
            assert torch.equal(got, want[unpad]), unpad
        model.encoder.layer[0].attention.self.dropout.p = 0.3  # attention dropout alone: training now differs
        assert not torch.equal(model(**inputs).last_hidden_state[mask], want[True])


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("new, multiple", [(109, None), (101, 16), (90, None), (95, None), (None, 64)])
@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification"])
def test_resize_token_embeddings_matches_transformers(name, new, multiple, tied, tmp_path):
    cfg = dict(CONFIGS["gelu-2types"], tie_word_embeddings=tied, pad_token_id=95)
    hf, ours = make_pair(name, cfg)
    hf.float()
    if hasattr(hf, "cls"):  # a bias that is not all zeros, so its added entries are checked too
        with torch.no_grad():
            hf.cls.predictions.bias.normal_(0.5, 1.0)
        ours.load_state_dict(hf.state_dict())
    got = ours.resize_token_embeddings(new, pad_to_multiple_of=multiple)
    want = hf.resize_token_embeddings(new, pad_to_multiple_of=multiple)
    n = want.weight.shape[0]
    assert got is ours.get_input_embeddings() and got.weight.shape == (n, 32) and ours.config.vocab_size == n
    assert got.padding_idx == want.padding_idx  # None once the padding row (95) is cut off
    assert ours.config.pad_token_id == got.padding_idx  # so that the saved config loads
    theirs = hf.state_dict()
    mine = ours.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        # added rows: transformers draws them around the old mean with covariance 1e-9 x the old one
        torch.testing.assert_close(mine[key], value, atol=1e-5, rtol=0, msg=key)
    decoder = ours.get_output_embeddings()
    if decoder is not None:
        assert decoder.out_features == n and (decoder.bias is ours.cls.predictions.bias) == tied
        assert torch.equal(decoder.bias, ours.cls.predictions.bias)  # untied: an unused copy, as transformers'
        assert (decoder.weight is got.weight) == tied
    # the resized model runs on the new ids, and transformers loads its checkpoint
    ids = torch.tensor([[2, n - 1, 5, n - 2]])
    with torch.no_grad():
        a, b = ours.eval()(ids), hf.eval()(ids)
    key = "prediction_logits" if name == "BertForPreTraining" else "logits"
    torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
    ours.save_pretrained(tmp_path)
    back = getattr(transformers, name).from_pretrained(tmp_path)
    assert back.get_input_embeddings().weight.shape == (n, 32)


def test_resized_rows_train_and_bad_sizes_are_refused():
    cfg = dict(CONFIGS["gelu-2types"])
    model = fastbert.BertForMaskedLM(fastbert.BertConfig(**cfg)).train()
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(104, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb[:101].detach(), old, rtol=0, atol=0)
    assert 0 < emb[101:].detach().std() < 0.1  # drawn as at initialisation (std initializer_range)
    labels = torch.tensor([[103, -100, 102]])
    model(torch.tensor([[103, 5, 102]]), labels=labels).loss.backward()
    assert emb.grad is not None and emb.grad[101:].abs().sum() > 0  # the new rows learn
    assert model.resize_token_embeddings() is model.get_input_embeddings()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            model.resize_token_embeddings(bad)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        model.resize_token_embeddings(110, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 104\)"):
        model(torch.tensor([[104]]))
    # a frozen table stays frozen (fine-tuning with frozen embeddings, then adding tokens)
    model.get_input_embeddings().weight.requires_grad_(False)
    model.resize_token_embeddings(112)
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.get_output_embeddings().bias.requires_grad  # the decoder's bias was not frozen


def test_set_input_and_output_embeddings():
    model = fastbert.BertForMaskedLM(fastbert.BertConfig(**CONFIGS["gelu-2types"]))
    emb = torch.nn.Embedding(101, 32)
    model.set_input_embeddings(emb)
    assert model.get_input_embeddings() is emb and model.bert.embeddings.word_embeddings is emb
    decoder = torch.nn.Linear(32, 101)
    model.set_output_embeddings(decoder)
    assert model.get_output_embeddings() is decoder and model.cls.predictions.bias is decoder.bias
    base = fastbert.BertModel(fastbert.BertConfig(**CONFIGS["gelu-2types"]))
    base.set_input_embeddings(emb)
    assert base.get_input_embeddings() is emb
    with pytest.raises(AttributeError, match="no MLM decoder"):
        base.set_output_embeddings(decoder)


@pytest.mark.parametrize("shape", ["(B, C, S)", "(1, S)"])
def test_multiple_choice_takes_position_ids_as_transformers_does(shape):
    cfg = config_for("BertForMultipleChoice", "gelu-2types")
    hf, ours = make_pair("BertForMultipleChoice", cfg)
    inputs, labels = make_batch("BertForMultipleChoice", cfg)
    b, c, s = inputs["input_ids"].shape
    pos = torch.randint(0, cfg["max_position_embeddings"], (b, c, s) if shape == "(B, C, S)" else (1, s))
    with torch.no_grad():
        got = ours.eval()(**inputs, **labels, position_ids=pos)
        want = hf.eval()(**inputs, **labels, position_ids=pos)
        base = hf.float()(**inputs, **labels, position_ids=pos)
    assert_close_to_reference(got.logits, base.logits, want.logits, k=4.0, name="logits")
    assert_close_to_reference(got.loss, base.loss, want.loss, k=4.0, name="loss")


@pytest.mark.parametrize("name", ["BertModel", "BertForSequenceClassification", "BertForNextSentencePrediction",
                                  "BertForMultipleChoice"])
def test_left_padding_gives_transformers_pooled_output(name):
    """The pooler reads column 0, a padding position in a left-padded row: transformers computes a
    hidden state there (a query over the row's real keys), and so must fastbert for pooler_output
    and every head that reads it."""
    cfg = config_for(name, "gelu-2types")
    hf, ours = make_pair(name, cfg)
    inputs, labels = make_batch(name, cfg)
    inputs = {k: v.flip(-1) for k, v in inputs.items()}  # right padding becomes left padding
    with torch.no_grad():
        got = ours.eval()(**inputs, **labels)
        want = hf.eval()(**inputs, **labels)
        base = copy.deepcopy(hf).float()(**inputs, **labels)
    key = "pooler_output" if name == "BertModel" else "logits"
    assert_close_to_reference(got[key], base[key], want[key], k=4.0, name=key)
    if name != "BertModel":
        assert_close_to_reference(got.loss, base.loss, want.loss, k=4.0, name="loss")


@pytest.mark.parametrize("name", ["BertForPreTraining", "BertForMaskedLM"])
def test_untied_decoder_has_its_own_bias_as_in_transformers(name, monkeypatch, tmp_path):
    """With tie_word_embeddings=False transformers unties the decoder's bias from cls.predictions.bias
    as well (the decoder adds its own): the same Parameters, gradients and checkpoint here, so that
    transformers loads fastbert's checkpoint with nothing missing and the same logits."""
    monkeypatch.setitem(CONFIGS, "untied", dict(CONFIGS["gelu-2types"], tie_word_embeddings=False))
    hf, ours = make_pair(name, CONFIGS["untied"])
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in hf.named_parameters()]
    test_loss_and_gradients_match_transformers_in_training(name, "untied")
    with torch.no_grad():
        ours.cls.predictions.decoder.bias.normal_()
    ours.save_pretrained(tmp_path)
    loaded, info = getattr(transformers, name).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info
    inputs, _ = make_batch(name, CONFIGS["untied"])
    mask = real_mask(inputs)
    with torch.no_grad():
        want, got = loaded.eval()(**inputs)[0][mask], ours.eval()(**inputs)[0][mask]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_input_ids_are_checked_against_the_word_embedding_table_in_use():
    # set_input_embeddings does not touch config.vocab_size (nor does transformers'): the ids must fit
    # the table the model reads, not the config (a smaller table was read out of bounds by the kernels)
    cfg = dict(CONFIGS["gelu-2types"])
    hf, ours = make_pair("BertModel", cfg)
    hf.float()
    torch.manual_seed(3)
    bigger = torch.nn.Embedding(150, 32)
    hf.set_input_embeddings(bigger)
    ours.set_input_embeddings(bigger)
    ids = torch.tensor([[2, 149, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).last_hidden_state, hf.eval()(ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
    ours.set_input_embeddings(torch.nn.Embedding(50, 32))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 50\)"):
        ours(torch.tensor([[2, 90, 3]]))


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForPreTraining"])
def test_a_decoder_without_bias_trains_as_in_transformers(name):
    # set_output_embeddings(nn.Linear(..., bias=False)) makes cls.predictions.bias None, as in transformers;
    # the training-mode (masked rows) loss raised TypeError on the missing bias
    cfg = dict(CONFIGS["gelu-2types"])
    hf, ours = make_pair(name, cfg)
    ours.double()  # float64 both: the same maths to rounding
    torch.manual_seed(1)
    decoder = torch.nn.Linear(32, cfg["vocab_size"], bias=False).double()
    hf.set_output_embeddings(decoder)
    ours.set_output_embeddings(decoder)
    inputs, labels = make_batch(name, cfg)
    for mode in ("train", "eval"):
        got = getattr(ours, mode)()(**inputs, **labels).loss
        want = getattr(hf, mode)()(**inputs, **labels).loss
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=mode)


@pytest.mark.parametrize("mean_resizing", [True, False])
@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForPreTraining"])
def test_resizing_an_untied_decoder_keeps_its_bias_as_transformers_does(name, mean_resizing, tmp_path):
    # tie_word_embeddings=False: the decoder adds its own bias. transformers starts its added entries at
    # the old entries' mean (with mean_resizing), and the checkpoint must still give transformers that bias
    cfg = dict(CONFIGS["gelu-2types"], tie_word_embeddings=False)
    hf, ours = make_pair(name, cfg)
    hf.float()
    with torch.no_grad():
        hf.cls.predictions.decoder.bias.normal_(0.5, 1.0)
    ours.load_state_dict(hf.state_dict())
    ours.resize_token_embeddings(120, mean_resizing=mean_resizing)
    hf.resize_token_embeddings(120, mean_resizing=mean_resizing)
    theirs = hf.state_dict()
    for key, value in ours.state_dict().items():
        if "word_embeddings" not in key and "decoder.weight" not in key or mean_resizing:
            torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=0, msg=key)
    ours.save_pretrained(tmp_path)
    back = getattr(transformers, name).from_pretrained(tmp_path).eval()
    ids = torch.tensor([[2, 115, 5, 119]])
    key = "prediction_logits" if name == "BertForPreTraining" else "logits"
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[key], ours.eval()(ids)[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForPreTraining"])
def test_set_output_embeddings_on_an_untied_model_saves_the_decoder_bias(name, tmp_path):
    # tie_word_embeddings=False: the decoder adds its own bias. A new decoder's bias must reach the
    # checkpoint as cls.predictions.decoder.bias, the name transformers reads for an untied model
    # (aliased to cls.predictions.bias, it was saved under that name only and transformers started
    # the decoder bias afresh: other logits)
    cfg = dict(CONFIGS["gelu-2types"], tie_word_embeddings=False)
    ours = getattr(fastbert, name)(fastbert.BertConfig(**cfg))
    decoder = torch.nn.Linear(cfg["hidden_size"], cfg["vocab_size"])
    with torch.no_grad():
        decoder.bias.normal_(0.5, 1.0)
    ours.set_output_embeddings(decoder)
    assert ours.get_output_embeddings() is decoder
    ours.save_pretrained(tmp_path)
    back, info = getattr(transformers, name).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"], info
    ids = torch.tensor([[2, 15, 5, 19]])
    key = "prediction_logits" if name == "BertForPreTraining" else "logits"
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids)[key], ours.eval()(ids)[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, num_labels, problem, labels", [
    ("BertForSequenceClassification", 1, None, dict(labels=torch.tensor([0.5, -1.0, 2.0, 0.0]))),
    ("BertForSequenceClassification", 1, None, dict(labels=torch.tensor([[0.5], [-1.0], [2.0], [0.0]]))),
    ("BertForSequenceClassification", 3, "regression", dict(labels=torch.randn(4, 3))),
    ("BertForQuestionAnswering", 2, None, dict(start_positions=torch.tensor([0, 30, 11, 2]),
                                               end_positions=torch.tensor([5, 6, 0, 11]))),
    ("BertForQuestionAnswering", 2, None, dict(start_positions=torch.tensor([[1], [3], [0], [-4]]),
                                               end_positions=torch.tensor([[4], [12], [2], [3]]))),
], ids=["regression-1d", "regression-2d", "regression-3-outputs", "qa-start-outside",
        "qa-column-and-negative"])
def test_head_losses_match_transformers_on_edge_labels(name, num_labels, problem, labels):
    """The losses transformers computes for labels the standard batch does not hold: one regression
    output with (B,) or (B, 1) targets (no (B, B) broadcast), regression with several outputs, and QA positions at or past the sequence length
    (ignored, not clamped to the last token) or negative (clamped to 0), given as (B,) or (B, 1)."""
    cfg = dict(CONFIGS["gelu-2types"], num_labels=num_labels, problem_type=problem)
    hf64, hf32, ours = make_triple(name, cfg)
    inputs, _ = make_batch(name, cfg)
    losses = []
    for model in (hf64, hf32, ours):
        model.eval()
        as_model = {k: v.double() if v.is_floating_point() and model is hf64 else v for k, v in labels.items()}
        with torch.no_grad():
            losses.append(model(**inputs, **as_model).loss)
    ref, base, loss = losses
    assert_close_to_reference(loss, base, ref, k=4, name=f"{name}.loss")
    assert ours.config.problem_type == hf64.config.problem_type


@pytest.mark.parametrize("name", CLASSES)
def test_initialisation_follows_transformers_scheme(name):
    """A freshly built model starts as transformers' does: Linear and Embedding weights N(0,
    initializer_range), biases 0, LayerNorms (1, 0), and the word embedding's padding row zero
    (its padding_idx row gets no gradient, so a nonzero start would stay there for good)."""
    cfg = dict(CONFIGS["gelu-2types"], pad_token_id=7, initializer_range=0.05, hidden_size=64,
               num_attention_heads=4, intermediate_size=96)
    torch.manual_seed(0)
    model = getattr(fastbert, name)(fastbert.BertConfig(**cfg))
    word = model.get_input_embeddings()
    assert word.padding_idx == 7 and not word.weight[7].any()
    for pname, p in model.named_parameters():
        if "LayerNorm" in pname:
            assert torch.all(p == (1.0 if pname.endswith("weight") else 0.0)), pname
        elif pname.endswith("bias"):
            assert not p.any(), pname
        elif p.numel() >= 1000:  # a weight matrix: std initializer_range, mean 0
            rows = p[torch.arange(p.shape[0]) != 7] if p is word.weight else p
            assert abs(rows.std().item() - 0.05) < 0.01 and abs(rows.mean().item()) < 0.01, pname


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForPreTraining"])
def test_mlm_label_zero_counts_in_the_masked_rows_loss(name):
    """A masked token whose label is id 0 (any id but -100 is a target) enters the training loss, as in
    transformers: the masked-rows head must not pick rows by label > 0."""
    cfg = CONFIGS["gelu-2types"]
    hf, ours = make_pair(name, cfg)
    inputs, labels = make_batch(name, cfg)
    mlm = torch.full_like(inputs["input_ids"], -100)
    mlm[0, 1] = mlm[0, 4] = 0
    mlm[1, 2] = 5
    labels = dict(labels, labels=mlm)
    hf.train(), ours.double().train()
    ref, out = hf(**inputs, **labels).loss, ours(**inputs, **labels).loss
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
