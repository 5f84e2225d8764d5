"""fastbert.optim: BERT's AdamW groups, the warm-up + linear-decay schedule, and one optimizer step
(unscale, clip, step, schedule, free the gradients), each checked on numbers worked out by hand."""
import pytest
import torch

import fastbert
from fastbert.optim import build_optimizer, optimizer_step, param_groups, warmup_linear_schedule

CFG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
           max_position_embeddings=16)


@pytest.mark.parametrize("tied", [True, False])
def test_weight_decay_skips_biases_and_layer_norms_only(tied):
    """Decay on every weight matrix (embeddings included), none on any bias or LayerNorm parameter
    (cls.predictions.bias too); a frozen parameter is in no group; each parameter is in one group once."""
    model = fastbert.BertForPreTraining(fastbert.BertConfig(**CFG, tie_word_embeddings=tied))
    model.bert.embeddings.token_type_embeddings.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # one name per Parameter (tied: the first)
    got_decay = {names[id(p)] for p in decay["params"]}
    got_no = {names[id(p)] for p in no_decay["params"]}
    want_no = {n for n in names.values() if n.endswith(".bias") or "LayerNorm" in n}
    want_decay = set(names.values()) - want_no - {"bert.embeddings.token_type_embeddings.weight"}
    assert got_no == want_no and got_decay == want_decay
    assert len(decay["params"]) + len(no_decay["params"]) == len(want_no | want_decay)
    assert any("LayerNorm.weight" in n for n in got_no) and "bert.embeddings.word_embeddings.weight" in got_decay


def test_build_optimizer_is_bert_adamw():
    model = fastbert.BertForMaskedLM(fastbert.BertConfig(**CFG))
    opt = build_optimizer(model, lr=3e-4, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and g["eps"] == 1e-6 and tuple(g["betas"]) == (0.9, 0.999)


@pytest.mark.parametrize("warmup, total, want", [
    (4, 10, [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0, 0.0]),
    (0, 4, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
    (1, 3, [1.0, 1.0, 0.5, 0.0]),
    (2, 2, [0.5, 1.0, 0.0, 0.0]),  # all warm-up (finetune --warmup 1.0): no decay span, no division by zero
])
def test_schedule_warms_up_linearly_then_decays_to_zero(warmup, total, want):
    """Step s of warm-up runs at (s + 1) / warmup of the peak (the first step is not wasted at 0), the
    peak is reached at the last warm-up step, then the rate falls linearly to 0 at total_steps and
    stays 0 (never negative) past it."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_linear_schedule(opt, warmup, total)
    got = []
    for _ in want:
        got.append(opt.param_groups[0]["lr"] / 2.0)
        opt.step()
        sched.step()
    assert got == pytest.approx(want, abs=1e-12)


class _RecordingScaler:
    """GradScaler's interface, recording the order of calls and what the gradient was at each."""

    def __init__(self, params):
        self.params, self.calls = params, []

    def unscale_(self, optimizer):
        for p in self.params:
            p.grad /= 4.0  # the scale
        self.calls.append("unscale")

    def step(self, optimizer):
        self.calls.append(("step", [p.grad.clone() for p in self.params]))
        optimizer.step()

    def update(self):
        self.calls.append("update")


@pytest.mark.parametrize("max_grad_norm, scale", [(None, 1.0), (0.0, 1.0), (100.0, 1.0), (2.5, 0.5)])
@pytest.mark.parametrize("with_scaler", [False, True])
def test_optimizer_step_clips_the_true_gradient_steps_and_frees_it(max_grad_norm, scale, with_scaler):
    """The global gradient norm (5 here) is clipped to max_grad_norm when above it (None or 0: no
    clipping), after unscaling under fp16 (the true gradient, not the scaled one); then the update,
    the schedule advances one step, and the gradients are freed (None)."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([a, b], lr=1.0)
    sched = warmup_linear_schedule(opt, 0, 10)
    factor = 4.0 if with_scaler else 1.0
    a.grad = torch.tensor([3.0, 0.0]) * factor
    b.grad = torch.tensor([4.0]) * factor
    scaler = _RecordingScaler([a, b]) if with_scaler else None
    optimizer_step(opt, sched, [a, b], max_grad_norm, scaler)
    torch.testing.assert_close(a.detach(), torch.tensor([-3.0, 0.0]) * scale)
    torch.testing.assert_close(b.detach(), torch.tensor([-4.0]) * scale)
    assert a.grad is None and b.grad is None
    assert sched.last_epoch == 1 and opt.param_groups[0]["lr"] == pytest.approx(0.9)
    if with_scaler:
        assert scaler.calls[0] == "unscale" and scaler.calls[-1] == "update"
        torch.testing.assert_close(torch.cat(scaler.calls[1][1]), torch.tensor([3.0, 0.0, 4.0]) * scale)


# ------------------------------------------------------------------- mutation audit (session 27)

def test_weight_decay_skips_every_vector_and_scalar_parameter():
    """A 1-D or 0-D parameter that is neither a bias nor in a LayerNorm (LayerMixModel's scalar mix: its
    softmax weights and gamma) gets no decay either: decaying gamma would pull the mixed features to 0.
    Only the matrix is decayed."""
    from fastbert.layer_mix import ScalarMix
    model = torch.nn.ModuleDict({"mix": ScalarMix(3), "proj": torch.nn.Linear(4, 2)})
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in decay["params"]] == ["proj.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["mix.gamma", "mix.weights", "proj.bias"]


def test_build_optimizer_defaults_and_options_reach_adamw():
    """Without weight_decay= it is BERT's 0.01 (the paper's L2 decay); capturable=True (CUDA-graph
    capture of the step) reaches every group and is off by default; the fused kernel is used wherever
    torch has one for the device (the 267 -> 72 ms step the docstring records)."""
    model = fastbert.BertForMaskedLM(fastbert.BertConfig(**CFG))
    opt = build_optimizer(model, lr=1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert not any(g["capturable"] for g in opt.param_groups)
    assert all(g["capturable"] for g in build_optimizer(model, lr=1e-4, capturable=True).param_groups)
    try:  # does this torch have a fused AdamW for CPU float32?
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True)
    except (RuntimeError, ValueError, TypeError):
        pytest.skip("this torch has no fused AdamW on CPU")
    assert all(g["fused"] for g in opt.param_groups)
