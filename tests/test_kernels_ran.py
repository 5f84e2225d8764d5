"""With FASTBERT_KERNELS=triton, every public op runs its Triton kernels, forward and backward.

The accuracy tests of each family compare the op with float64 by the tolerance rule, which the
PyTorch reference passes as well: a dispatch that quietly sent an op to the reference (a size or
dtype condition, a changed flag) would leave them green. Here the kernels' launches are counted
(each module's kernel is wrapped where its launcher looks it up), so a fallback is a failure.
Without this file, sending bias_gelu or gelu_layer_norm (or embed_layer_norm without dropout) to the
reference failed no test at all.
"""
import pytest
import torch

import fastbert.kernels as K
from fastbert.kernels import embedding as E
from fastbert.kernels import flash_attention as FA
from fastbert.kernels import gelu as G
from fastbert.kernels import gemm_gelu as GG
from fastbert.kernels import layer_norm as L
from fastbert.kernels import linear_cross_entropy as LCE


class _Counted:
    """A Triton kernel whose launches (kernel[grid](...)) are counted in `log`."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


def _leaves(*shapes, device):
    return [torch.randn(*s, device=device, requires_grad=True) for s in shapes]


def _bias_gelu(device):
    x, b = _leaves((3, 5, 37), (37,), device=device)
    return K.bias_gelu(x, b)


def _add_layer_norm(device):
    x, r, w, b = _leaves((7, 37), (7, 37), (37,), (37,), device=device)
    return K.add_layer_norm(x, r, w, b)


def _gelu_layer_norm(device):
    x, c, w, b = _leaves((7, 37), (37,), (37,), (37,), device=device)
    return K.gelu_layer_norm(x, c, w, b)


def _embed_layer_norm(device):
    word, pos, typ, w, b = _leaves((13, 24), (9, 24), (2, 24), (24,), (24,), device=device)
    ids = torch.randint(0, 13, (2, 5), device=device)
    return K.embed_layer_norm(ids, None, None, word, pos, typ, w, b)


def _feed_forward(device):
    x, w1, b1, w2 = _leaves((9, 24), (40, 24), (40,), (16, 40), device=device)
    return K.feed_forward(x, w1, b1, w2)


def _attention(device):
    q, k, v = _leaves((2, 2, 17, 32), (2, 2, 17, 32), (2, 2, 17, 32), device=device)
    return K.attention(q, k, v, torch.rand(2, 17, device=device) > 0.3)


def _varlen_attention(device):
    q, k, v = _leaves((20, 2, 32), (20, 2, 32), (20, 2, 32), device=device)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
    return K.varlen_attention(q, k, v, cu, 13)


def _mlm_loss(device):
    h, w, b = _leaves((11, 16), (37, 16), (37,), device=device)
    labels = torch.randint(0, 37, (11,), device=device)
    return K.mlm_loss(h, w, b, labels)


BWD_ATTN = ({"_attn_bwd_fused"}, {"_attn_bwd_dq", "_attn_bwd_dkdv"})  # one launch, or the split pair
CASES = [  # op, the module holding its kernels, the kernels its forward launches, those its backward may
    (_bias_gelu, G, {"_bias_gelu_fwd"}, ({"_bias_gelu_bwd"},)),
    (_add_layer_norm, L, {"_add_ln_fwd"}, ({"_add_ln_bwd"},)),
    (_gelu_layer_norm, L, {"_gelu_ln_fwd"}, ({"_gelu_ln_bwd"},)),
    (_embed_layer_norm, E, {"_embed_ln_fwd"}, ({"_embed_ln_bwd"},)),
    (_feed_forward, GG, {"_gemm_gelu"}, ({"_gemm_gelu"},)),  # one kernel: both epilogues
    (_attention, FA, {"_attn_fwd"}, BWD_ATTN),
    (_varlen_attention, FA, {"_attn_fwd"}, BWD_ATTN),
    # the loss's gradients are computed in its forward; the backward scales them by the incoming gradient
    (_mlm_loss, LCE, {"_ce_rows_lse_kernel", "_ce_rows_grad_kernel"}, ({"_mlm_scale_cast_kernel"},)),
]


@pytest.mark.parametrize("op,module,forward,backward", CASES, ids=[c[0].__name__[1:] for c in CASES])
def test_op_runs_its_triton_kernels(triton_kernels, device, monkeypatch, op, module, forward, backward):
    launched = []
    for name in forward.union(*backward):
        monkeypatch.setattr(module, name, _Counted(getattr(module, name), name, launched))
    out = op(device)
    fwd = list(launched)
    assert set(fwd) == forward, f"the forward launched {fwd}, not {sorted(forward)}"
    out.float().square().sum().backward()
    bwd = set(launched[len(fwd):])
    assert bwd in backward, f"the backward launched {sorted(bwd)}, not one of {[sorted(b) for b in backward]}"


def test_launchers_call_no_triton_constexpr_function_from_the_host(triton_kernels, device, monkeypatch):
    """triton.cdiv and triton.next_power_of_2 are ConstexprFunctions: a call from host code goes through
    Triton's JIT call machinery (~2 µs, against ~0.03 µs for kernels/_host.py's plain twins). The
    launchers made 343 such calls per BERT-base training step (session 17), on the thread that launches
    the step's kernels. Counted here over a small pretraining step (MLM + NSP, dropout on, every
    fused kernel), with the launches themselves stubbed out: only host code runs."""
    if device != "cpu":
        pytest.skip("counts host calls around the interpreter's launches")
    from triton.runtime import interpreter, jit

    from fastbert import BertConfig, BertForPreTraining

    calls = []
    original = jit.ConstexprFunction.__call__

    def counted(self, *args, **kwargs):
        calls.append(getattr(self, "__name__", repr(self)))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(jit.ConstexprFunction, "__call__", counted)
    monkeypatch.setattr(interpreter.InterpretedFunction, "__getitem__", lambda self, grid: (lambda *a, **k: None))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    model = BertForPreTraining(config).train()
    ids = torch.randint(5, 101, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # padding: the unpadded (varlen) layout
    labels = torch.full((2, 12), -100)
    labels[:, 4] = ids[:, 4]
    def step():
        model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), labels=labels,
              next_sentence_label=torch.tensor([0, 1])).loss.backward()
    step()
    calls.clear()  # the first step may warm caches; count a second one
    step()
    assert calls == [], f"{len(calls)} host calls of Triton ConstexprFunctions: {sorted(set(calls))}"


def test_eager_layer_norm_backwards_reduce_their_partial_sums_in_one_launch(triton_kernels, device):
    """add_layer_norm's and gelu_layer_norm's backward kernels leave per-program partial sums of the
    parameter gradients (2-3 rows of fp32); the eager autograd path reduces them with one torch.sum
    (each of the 24 add + LayerNorms of a BERT-base step used to run three: 48 launches per step).
    Counted at the dispatcher; the gradients' values are the accuracy tests' business."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSums(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sums = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.sums += func.overloadpacket == torch.ops.aten.sum
            return func(*args, **(kwargs or {}))

    x, r, w, b, xb = _leaves((6, 40), (6, 40), (40,), (40,), (40,), device=device)
    y = K.add_layer_norm(x, r, w, b, 1e-12, 0.1, x_bias=xb)
    g = _leaves((6, 40), (40,), (40,), (40,), device=device)
    y2 = K.gelu_layer_norm(*g)
    for out in (y, y2):
        loss = out.sum()
        with CountSums() as counter:
            loss.backward()
        assert counter.sums == 1, counter.sums


def test_parameter_gradients_from_one_reduction_accumulate_independently(triton_kernels, device):
    """The eager LayerNorm backwards return the weight, bias and dense-bias gradients as rows of one
    tensor (one reduction launch). AccumulateGrad may keep those rows as the parameters' .grad; a
    second backward then adds into them in place. Each must still end as the sum of its own two
    gradients (bitwise: the kernels are deterministic), and zeroing one must leave the others."""
    x, r, w, b, xb = _leaves((6, 40), (6, 40), (40,), (40,), (40,), device=device)

    def backward():
        K.add_layer_norm(x, r, w, b, 1e-12, 0.1, x_bias=xb).pow(2).sum().backward()

    torch.manual_seed(3)
    backward()
    once = [t.grad.clone() for t in (w, b, xb)]
    torch.manual_seed(3)  # the same dropout mask again
    backward()
    for t, g in zip((w, b, xb), once):
        assert torch.equal(t.grad, 2 * g)
    w.grad.zero_()
    assert torch.equal(b.grad, 2 * once[1]) and torch.equal(xb.grad, 2 * once[2])
