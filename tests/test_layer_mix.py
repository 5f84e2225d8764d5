"""fastbert.layer_mix on hand-checked cases: the scalar mix, what is frozen, save and load."""
import json

import pytest
import torch

from fastbert.config import BertConfig
from fastbert.layer_mix import LayerMixModel, ScalarMix, freeze_lowest
from fastbert.modeling import BertForSequenceClassification, BertModel


def tiny_bert(**kw):
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=16, **kw))


def test_scalar_mix_starts_as_the_mean_of_the_layers():
    """w starts equal and gamma at 1: the mix of L + 1 layers starts as their mean."""
    layers = [torch.randn(2, 3, 4) for _ in range(4)]
    mix = ScalarMix(4)
    torch.testing.assert_close(mix(layers), torch.stack(layers).mean(0))


def test_scalar_mix_is_gamma_times_a_softmax_weighted_sum():
    layers = [torch.randn(2, 3, 4, dtype=torch.float64) for _ in range(3)]
    mix = ScalarMix(3).double()
    with torch.no_grad():
        mix.weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
        mix.gamma.fill_(2.5)
    w = torch.softmax(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0)
    want = 2.5 * sum(wj * h for wj, h in zip(w, layers))
    torch.testing.assert_close(mix(layers), want)
    with pytest.raises(ValueError, match="3 layers"):
        mix(layers[:2])


def test_layer_mix_reads_every_hidden_layer_in_order():
    """The mix weights index the encoder's hidden states: embeddings first, then layers 1..L."""
    bert = tiny_bert().eval()
    model = LayerMixModel(bert, "ner", num_labels=3).eval()
    ids = torch.tensor([[2, 7, 9, 11, 3]])
    hidden = bert(ids, torch.ones_like(ids), output_hidden_states=True, return_dict=True).hidden_states
    for j in range(len(hidden)):
        with torch.no_grad():
            model.mix.weights.fill_(-1e4)
            model.mix.weights[j] = 0.0
        torch.testing.assert_close(model.features(ids, torch.ones_like(ids), None), hidden[j])


def test_layer_mix_trains_only_the_mix_and_the_head():
    model = LayerMixModel(tiny_bert(hidden_dropout_prob=0.5), "classify", num_labels=2).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mix.weights", "mix.gamma", "head.weight", "head.bias"}
    assert not model.encoder.training  # no dropout inside the frozen encoder, even in train mode


def test_layer_mix_save_and_load_keep_the_learned_mix(tmp_path):
    torch.manual_seed(1)
    model = LayerMixModel(tiny_bert(), "classify", num_labels=2)
    with torch.no_grad():
        model.mix.weights.copy_(torch.tensor([1.0, 0.0, -1.0, 2.0]))
        model.mix.gamma.fill_(0.5)
        model.head.weight.normal_()
    model.save_pretrained(str(tmp_path))
    meta = json.loads((tmp_path / "layer_mix.json").read_text())
    assert meta["layer_weights"] == pytest.approx(torch.softmax(torch.tensor([1.0, 0.0, -1.0, 2.0]), 0).tolist())
    assert sum(meta["layer_weights"]) == pytest.approx(1.0) and meta["gamma"] == 0.5
    back = LayerMixModel.from_pretrained(str(tmp_path))
    torch.testing.assert_close(back.mix.weights, model.mix.weights)
    torch.testing.assert_close(back.mix.gamma, model.mix.gamma)
    ids = torch.tensor([[2, 7, 9, 3]])
    torch.testing.assert_close(back(ids).logits, model.eval()(ids).logits)


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_freeze_lowest_freezes_embeddings_and_the_lowest_n_layers(n):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert().config)
    freeze_lowest(model, n)
    for name, p in model.named_parameters():
        frozen = (n > 0 and name.startswith("bert.embeddings.")) or any(
            name.startswith(f"bert.encoder.layer.{k}.") for k in range(n))
        assert p.requires_grad != frozen, name
    with pytest.raises(ValueError, match="3 layers"):
        freeze_lowest(model, 4)


# ------------------------------------------------------------------- mutation audit (second pass)

def _hidden64(bert, ids):
    """The encoder's L + 1 hidden states of one unpadded sequence, float64 (the encoder is not under test)."""
    with torch.no_grad():
        out = bert(ids, torch.ones_like(ids), output_hidden_states=True, return_dict=True)
    return [h.double() for h in out.hidden_states]


def _mix64(model, hidden):
    w = torch.softmax(model.mix.weights.detach().double(), 0)
    return float(model.mix.gamma.detach()) * sum(wj * h for wj, h in zip(w, hidden))


def _head64(model, x):
    return x @ model.head.weight.detach().double().T + model.head.bias.detach().double()


def _set_mix(model):
    with torch.no_grad():
        model.mix.weights.copy_(torch.tensor([0.3, -0.2, 1.0, 0.1]))
        model.mix.gamma.fill_(1.7)
        model.head.weight.normal_()
        model.head.bias.normal_()


def test_classify_head_reads_the_mean_over_real_tokens_only():
    """classify / pair: logits = head(mean of the mix over the tokens the mask keeps); padding added
    to a sequence changes nothing (float64 recomputation from the encoder's own hidden states)."""
    bert = tiny_bert().double().eval()
    model = LayerMixModel(bert, "classify", num_labels=3).double().eval()
    _set_mix(model)
    a, b = torch.tensor([[2, 7, 9, 11, 3]]), torch.tensor([[2, 8, 3]])
    want = torch.cat([_head64(model, _mix64(model, _hidden64(bert, x)).mean(1)) for x in (a, b)])
    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 8, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        got = model(ids, mask).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_choice_head_scores_each_choice_over_its_own_tokens():
    """choice: one score per choice (a 1-output head), each from the masked mean of that choice's own
    tokens, so (batch, choices) logits and a cross-entropy over the choices."""
    bert = tiny_bert().double().eval()
    model = LayerMixModel(bert, "choice").double().eval()
    _set_mix(model)
    choices = [[[2, 7, 3, 9, 3], [2, 7, 3, 11, 12]], [[2, 5, 3, 6, 3], [2, 5, 3, 8, 0]]]
    lens = [[5, 5], [5, 4]]
    ids = torch.tensor(choices)
    mask = torch.tensor([[[1] * n + [0] * (5 - n) for n in row] for row in lens])
    want = torch.tensor([[_head64(model, _mix64(model, _hidden64(bert, torch.tensor([c[:n]]))).mean(1)).item()
                          for c, n in zip(row, nrow)] for row, nrow in zip(choices, lens)], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        out = model(ids, mask, labels=labels)
    assert out.logits.shape == (2, 2)
    torch.testing.assert_close(out.logits, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(want, labels), rtol=1e-9, atol=1e-9)


def test_qa_logits_are_the_heads_two_outputs_and_the_loss_their_mean():
    """qa: start logits are the head's output 0 and end logits its output 1 at every token; the loss is
    (CE(start) + CE(end)) / 2, as BertForQuestionAnswering's."""
    bert = tiny_bert().double().eval()
    model = LayerMixModel(bert, "qa").double().eval()
    _set_mix(model)
    ids = torch.tensor([[2, 7, 9, 11, 3, 12], [2, 8, 3, 5, 6, 3]])
    logits = torch.cat([_head64(model, _mix64(model, _hidden64(bert, x[None]))) for x in ids])  # (2, 6, 2)
    sp, ep = torch.tensor([3, 4]), torch.tensor([4, 5])
    with torch.no_grad():
        out = model(ids, start_positions=sp, end_positions=ep)
    torch.testing.assert_close(out.start_logits, logits[..., 0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.end_logits, logits[..., 1], rtol=1e-9, atol=1e-9)
    ls = -torch.log_softmax(logits[..., 0], -1)[torch.arange(2), sp].mean()
    le = -torch.log_softmax(logits[..., 1], -1)[torch.arange(2), ep].mean()
    torch.testing.assert_close(out.loss, (ls + le) / 2, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("task", ["classify", "ner", "qa", "choice"])
def test_dropout_applies_to_the_heads_input_in_training_only(task):
    """The `dropout` argument drops the head's input in train mode: with p = 1 every feature is zeroed,
    so each output is the head's bias; in eval mode nothing is dropped."""
    model = LayerMixModel(tiny_bert(), task, num_labels=3, dropout=1.0)
    with torch.no_grad():
        model.head.bias.copy_(torch.arange(model.head.out_features, dtype=torch.float32) + 0.5)
    ids = torch.tensor([[2, 7, 9, 3]])
    if task == "choice":
        ids = ids[:, None].repeat(1, 2, 1)
    with torch.no_grad():
        train, evals = model.train()(ids), model.eval()(ids)
    key = "start_logits" if task == "qa" else "logits"
    bias = model.head.bias
    want = {"classify": lambda: bias.expand(1, 3), "ner": lambda: bias.expand(1, 4, 3),
            "qa": lambda: bias[0].expand(1, 4), "choice": lambda: bias.expand(1, 2)}[task]()
    torch.testing.assert_close(train[key], want, rtol=0, atol=0)
    assert not torch.equal(evals[key], want)


def test_head_starts_as_bert_initialises_its_heads():
    """normal(0, initializer_range) weights and zero bias, as BertFor* heads start (3,200 weights: the
    sample std lies within a few percent of 0.05)."""
    model = LayerMixModel(tiny_bert(initializer_range=0.05), "ner", num_labels=200)
    assert model.head.weight.shape == (200, 16)
    assert 0.045 < float(model.head.weight.detach().std()) < 0.055
    assert torch.count_nonzero(model.head.bias) == 0


def test_scalar_mix_of_bfloat16_layers_keeps_their_dtype():
    """The float32 mix weights are cast to the layers' dtype (a bfloat16 encoder's hidden states)."""
    torch.manual_seed(0)
    layers = [torch.randn(2, 3, 4).bfloat16() for _ in range(3)]
    mix = ScalarMix(3)
    with torch.no_grad():
        mix.weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
    got = mix(layers)
    assert got.dtype == torch.bfloat16
    w = torch.softmax(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0)
    want = sum(wj * h.double() for wj, h in zip(w, layers))
    # bfloat16 keeps 8 significant bits: each of the 3 products and 2 sums and the result is rounded to
    # within 2^-8 of its size, so the error stays below 6 * 2^-8 * sum_j |w_j h_j|
    bound = 6 * 2.0 ** -8 * sum(wj * h.double().abs() for wj, h in zip(w, layers))
    assert bool(((got.double() - want).abs() <= bound).all())


def test_masked_mean_of_a_row_with_no_tokens_is_zero():
    """A row whose mask keeps nothing averages to 0 (the count is clamped at 1, as sentence-transformers'
    mean pooling clamps it), not 0 / 0 = nan."""
    from fastbert.layer_mix import _masked_mean
    x = torch.arange(12, dtype=torch.float64).reshape(2, 3, 2)
    got = _masked_mean(x, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("task, num_labels", [("ner", 3), ("qa", 2)])
def test_layer_mix_save_and_load_keep_task_and_label_count(tmp_path, task, num_labels):
    """from_pretrained rebuilds the saved task's head (ner with 3 labels, qa), not a default classifier."""
    torch.manual_seed(1)
    model = LayerMixModel(tiny_bert(), task, num_labels=num_labels).eval()
    with torch.no_grad():
        model.head.weight.normal_()
    model.save_pretrained(str(tmp_path))
    back = LayerMixModel.from_pretrained(str(tmp_path))
    assert (back.task, back.num_labels, back.head.out_features) == (task, num_labels, 2 if task == "qa" else 3)
    ids = torch.tensor([[2, 7, 9, 3]])
    key = "start_logits" if task == "qa" else "logits"
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[key], model(ids)[key])


def test_freeze_lowest_takes_a_bare_bert_model_and_refuses_negative_counts():
    """A BertModel is frozen as the encoder of a BertFor* model; n = -1 is refused (layers[:-1] would
    freeze all layers but the last)."""
    bert = tiny_bert()
    freeze_lowest(bert, 1)
    frozen = {n for n, p in bert.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in bert.named_parameters()
                      if n.startswith("embeddings.") or n.startswith("encoder.layer.0.")}
    with pytest.raises(ValueError, match="--freeze -1"):
        freeze_lowest(tiny_bert(), -1)
