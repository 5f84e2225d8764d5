"""A tiny BERT trained with the Triton kernels follows the reference's loss curve.

Same initial weights, same batches, same optimizer: FASTBERT_KERNELS=triton (every fused op runs its
Triton kernel: in the interpreter on the CPU, compiled on a CUDA run through the `device` fixture)
against FASTBERT_KERNELS=reference in fp32, and the reference in float64 as the oracle. The tolerance rule of DESIGN.md for a whole model: over the
curve, the Triton run's distance to the float64 run is at most 4 x the fp32 reference's distance
(plus a tiny floor). Dropout is off here (the two backends draw different masks); the kernels'
dropout is checked against the reference with the same mask in the kernel tests.

Which kernels the Triton run goes through is checked, not assumed: a run that fell back to the
reference would reproduce the fp32 reference's curve and pass the comparison. On the CPU, fp32
training takes the reference embeddings + LayerNorm by design (modeling.embed_ids: the word gradient
reuses its memory), and the fused feed-forward (K.feed_forward) is opt-in, off here: those two
kernels are checked in test_embedding.py, test_gemm_gelu.py and at model level in test_model_kernels.py.
"""
import collections
import copy

import torch

import fastbert
import fastbert.kernels as K
from tolerance import assert_close_to_reference

STEPS = 16
BATCH, SEQ, VOCAB = 2, 8, 100  # small: every kernel program is interpreted


def _config():
    return fastbert.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=32, type_vocab_size=2,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, hidden_act="gelu")


def _batches(steps, distinct=2):
    # A few batches seen over and over: the model can fit them, so the loss falls within few steps.
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(distinct):
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,), generator=g)
        lengths[0] = SEQ
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        ids = ids * mask  # padding id 0
        tt = (torch.arange(SEQ)[None, :] >= (lengths[:, None] // 2)).long() * mask
        masked = (torch.rand(BATCH, SEQ, generator=g) < 0.2) & mask.bool()
        masked[0, 1] = True
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        inputs = torch.where(masked, torch.full_like(ids, 3), ids)  # [MASK] = 3
        nsp = torch.randint(0, 2, (BATCH,), generator=g)
        out.append((inputs, mask, tt, labels, nsp))
    return [out[i % distinct] for i in range(steps)]


def _train(model, batches, monkeypatch, backend, dtype, device):
    monkeypatch.setenv("FASTBERT_KERNELS", backend)
    model = model.to(device=device, dtype=dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    losses = []
    for batch in batches:
        inputs, mask, tt, labels, nsp = (t.to(device) for t in batch)
        out = model(input_ids=inputs, attention_mask=mask, token_type_ids=tt, labels=labels,
                    next_sentence_label=nsp)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach().double())
    return torch.stack(losses)


def test_tiny_bert_loss_curve_matches_reference(monkeypatch, device):
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(_config())
    batches = _batches(STEPS)
    families = collections.Counter()  # the Triton kernel families the dispatcher handed each op to
    real_triton = K._triton
    monkeypatch.setattr(K, "_triton", lambda module: families.update([module]) or real_triton(module))
    ref64 = _train(copy.deepcopy(model), batches, monkeypatch, "reference", torch.float64, device)
    ref32 = _train(copy.deepcopy(model), batches, monkeypatch, "reference", torch.float32, device)
    assert not families, f"the reference runs used Triton kernels: {dict(families)}"
    ours = _train(copy.deepcopy(model), batches, monkeypatch, "triton", torch.float32, device)
    expected = {"flash_attention", "layer_norm", "gelu", "linear_cross_entropy"}
    if device == "cuda":
        expected.add("embedding")  # the CPU's fp32 training shortcut (modeling.embed_ids) is CPU-only
    assert expected <= set(families), f"the Triton run did not run every kernel family: {dict(families)}"
    assert_close_to_reference(ours, ref32, ref64, k=4, name="loss curve")
    assert ours[-4:].mean() < ours[:4].mean() - 0.5, f"the loss did not go down: {ours.tolist()}"
