"""fastbert/bench.py's model-step competitors compute what they claim to (the timing itself lives in
benchmarks/, not in tests)."""
import pytest
import torch

from fastbert import bench


def test_masked_head_floor_gives_the_transformers_model_loss_and_gradients():
    """The floor competitor (transformers' modules, MLM head on masked rows) computes transformers'
    own pretraining loss and gradients, only cheaper (dropout off, float64)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1301, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForPreTraining(cfg).double().train()
    kw = bench.make_batches("pretrain", 1, 3, 17, 1301, 5, "cpu")[0][0]
    results = []
    for step in (model, bench.MaskedHeadPretraining(model)):
        model.zero_grad()
        loss = step(**kw).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_useful_flops_by_hand():
    """hidden 2, one layer, intermediate 4, vocab 3, one sequence of 2 tokens, 1 masked, 1 row:
    linear 6 (4·4 + 2·2·4) = 192 per token, attention 12·2·2² = 96, MLM head 6 (4 + 6) = 60, pooler 24;
    a token nothing reads keeps only its key and value projections in the last layer (6·2·4 = 48)
    and drops its share (1/2) of that layer's attention."""
    assert bench.training_flops(2, 1, 4, 3, [2], 1, 1) == 192 * 2 + 96 + 60 + 24
    assert bench.training_flops(2, 1, 4, 3, [2], 1, 1, read_rows=1) == 192 + 48 + 96 / 2 + 60 + 24
    assert bench.training_flops(2, 1, 4, 3, [2], 1, 1, read_rows=2) == 192 * 2 + 96 + 60 + 24
