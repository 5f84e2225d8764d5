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
