"""K.embed_layer_norm's Triton kernels against float64, and the deterministic segment sum.

Tolerance rule (tests/tolerance.py): our error <= 2 x PyTorch's own error in the same dtype, for the
output, the three table gradients and the LayerNorm gradients. bf16 runs on CUDA only.
"""
import pytest
import torch
import torch.nn.functional as F

import fastbert.kernels as K
from fastbert.kernels import embedding as E
from fastbert.kernels import layer_norm as L
from fastbert.kernels import reference as R
from fastbert.kernels.philox_dropout import effective_dropout_p
from interpreter_bounds import BF16
from tolerance import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, BF16]
WIDTHS = [37, 384, 768, 1000, 3072]
EPS = 1e-5
VOCAB, MAX_POS, TYPES = 13, 9, 2


def _ids(batch, seq, device):
    ids = torch.randint(0, VOCAB - 3, (batch, seq), device=device)  # the last 3 rows never occur
    ids[0, :3] = 4  # a repeated id inside one sequence
    tt = torch.randint(0, TYPES, (batch, seq), device=device)
    pos = torch.arange(seq, device=device).expand(batch, seq)  # expanded: stride 0 along batch
    return ids, tt, pos


def _reference(ids, tt, pos, word, posw, typew, w, b, keep=None, p=0.0):
    h = F.embedding(ids, word) + F.embedding(pos, posw) + F.embedding(tt, typew)
    y = F.layer_norm(h, h.shape[-1:], w, b, EPS)
    return y if keep is None else y * keep.to(y.dtype) / (1.0 - effective_dropout_p(p))


def _check(n, dtype, device, batch=2, seq=5, p=0.0, seed=None, positions=None):
    ids, tt, pos = _ids(batch, seq, device)
    if positions is not None:
        pos = positions
    params = [torch.randn(VOCAB, n), torch.randn(MAX_POS, n), torch.randn(TYPES, n),
              1.0 + 0.3 * torch.randn(n), 0.5 * torch.randn(n)]
    ours = [t.to(device=device, dtype=dtype).requires_grad_() for t in params]
    base = [t.detach().clone().requires_grad_() for t in ours]
    ref = [t.detach().to(torch.float64).requires_grad_() for t in ours]
    keep = None
    if p > 0.0:
        torch.manual_seed(seed)
        keep = L.dropout_mask(L.draw_seed(device), batch * seq, n, p).view(batch, seq, n)
        torch.manual_seed(seed)
    y = K.embed_layer_norm(ids, tt, pos, *ours, eps=EPS, dropout_p=p)
    y_base = _reference(ids, tt, pos, *base, keep=keep, p=p)
    y_ref = _reference(ids, tt, pos, *ref, keep=keep, p=p)
    assert y.dtype == dtype
    dy = torch.randn(y.shape, device=device, dtype=torch.float64)
    for out in (y, y_base, y_ref):
        out.backward(dy.to(out.dtype))
    assert_close_to_reference(y, y_base, y_ref, name="out")
    for name, a, bb, r in zip(("word", "position", "type", "weight", "bias"), ours, base, ref):
        assert_close_to_reference(a.grad, bb.grad, r.grad, name=f"d{name}")
    assert not ours[0].grad[VOCAB - 3:].any(), "rows of absent ids must get zero gradient"
    return keep


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", WIDTHS)
def test_embed_layer_norm(triton_kernels, device, n, dtype):
    _check(n, dtype, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_embed_layer_norm_per_row_positions(triton_kernels, device, dtype):
    """Position ids that differ from one batch row to the next, as a packed pretraining batch has them
    (modeling._Packed.position_ids restarts them at every example), read through a non-zero batch
    stride, contiguous and as a transposed view: every other test passes an expanded arange (batch
    stride 0), so a kernel that ignored the position ids' batch stride passed them all."""
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 0, 1, 2, 3], [4, 3, 2, 1, 0]], device=device)
    _check(48, dtype, device, batch=3, seq=5, positions=pos)
    _check(48, dtype, device, batch=3, seq=5, positions=pos.t().contiguous().t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_embed_layer_norm_dropout_matches_reference_with_same_mask(triton_kernels, device, dtype):
    p = 0.2
    keep = _check(384, dtype, device, batch=3, seq=4, p=p, seed=99)
    frac = 1.0 - keep.float().mean().item()
    assert abs(frac - p) < 5 * (p * (1 - p) / keep.numel()) ** 0.5


def test_embed_layer_norm_dropout_repeatable(triton_kernels, device):
    ids, tt, pos = _ids(2, 4, device)
    tables = [torch.randn(VOCAB, 64, device=device), torch.randn(MAX_POS, 64, device=device),
              torch.randn(TYPES, 64, device=device), torch.ones(64, device=device), torch.zeros(64, device=device)]
    torch.manual_seed(3)
    y1 = K.embed_layer_norm(ids, tt, pos, *tables, dropout_p=0.5)
    torch.manual_seed(3)
    y2 = K.embed_layer_norm(ids, tt, pos, *tables, dropout_p=0.5)
    y3 = K.embed_layer_norm(ids, tt, pos, *tables, dropout_p=0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_embed_layer_norm_default_ids_and_int32(triton_kernels, device):
    # token_type_ids / position_ids left to the public op's defaults, and int32 input ids.
    n = 48
    ids = torch.randint(0, VOCAB, (2, 6), device=device, dtype=torch.int32)
    tables = [torch.randn(VOCAB, n), torch.randn(MAX_POS, n), torch.randn(TYPES, n), 1 + torch.randn(n),
              torch.randn(n)]
    ours = [t.to(device).clone().requires_grad_() for t in tables]
    base = [t.to(device).clone().requires_grad_() for t in tables]
    ref = [t.to(device, torch.float64).requires_grad_() for t in tables]
    y = K.embed_layer_norm(ids, None, None, *ours, eps=EPS)
    pos = torch.arange(6, device=device).expand(2, 6)
    y_base = _reference(ids.long(), torch.zeros_like(pos), pos, *base)
    y_ref = _reference(ids.long(), torch.zeros_like(pos), pos, *ref)
    dy = torch.randn(y_ref.shape, device=device, dtype=torch.float64)
    y.backward(dy.float())
    y_base.backward(dy.float())
    y_ref.backward(dy)
    assert_close_to_reference(y, y_base, y_ref, name="out")  # the tolerance rule, not a fixed 1e-5 band
    for name, a, b, r in zip(("word", "position", "type", "weight", "bias"), ours, base, ref):
        assert_close_to_reference(a.grad, b.grad, r.grad, name=f"d{name}")


def test_embed_layer_norm_backward_bitwise_repeatable(triton_kernels, device):
    ids, tt, pos = _ids(3, 5, device)
    tables = [torch.randn(VOCAB, 40, device=device).requires_grad_(), torch.randn(MAX_POS, 40, device=device),
              torch.randn(TYPES, 40, device=device).requires_grad_(), torch.ones(40, device=device),
              torch.zeros(40, device=device)]
    grads = []
    for _ in range(2):
        y = K.embed_layer_norm(ids, tt, pos, *tables)
        grads.append(torch.autograd.grad(y, [tables[0], tables[2]], torch.ones_like(y)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("tokens,vocab", [(1, 1), (7, 1), (13, 3), (40, 2), (40, 50), (33, 6)])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 16])
def test_segment_sum(device, tokens, vocab, chunk):
    # Runs that lie inside a chunk, cross one boundary, or span many chunks (vocab 1 and 2).
    ids = torch.randint(0, vocab, (tokens,), device=device)
    rows = torch.randn(tokens, 5, device=device)
    out = E.segment_sum(ids, rows, vocab + 2, torch.float32, chunk=chunk)
    ref = torch.zeros(vocab + 2, 5, dtype=torch.float64, device=device).index_add_(0, ids, rows.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert not out[vocab:].any()


@pytest.mark.parametrize("id_dtype", [torch.uint8, torch.int8, torch.int16])
def test_embed_layer_norm_small_integer_ids_on_the_cpu_path(id_dtype):
    # The checks take any integer id dtype (as the Triton kernels do); the CPU path (the reference)
    # must take them too, not fail in F.embedding, which indexes with int32 / int64 only.
    n = 16
    ids = torch.randint(0, VOCAB, (2, 5))
    tt = torch.randint(0, TYPES, (2, 5))
    pos = torch.arange(5).expand(2, 5)
    tables = [torch.randn(VOCAB, n), torch.randn(MAX_POS, n), torch.randn(TYPES, n), 1 + torch.randn(n),
              torch.randn(n)]
    want = K.embed_layer_norm(ids, tt, pos, *tables, eps=EPS)
    got = K.embed_layer_norm(ids.to(id_dtype), tt.to(id_dtype), pos.to(id_dtype), *tables, eps=EPS)
    assert torch.equal(got, want)
    got = K.embed_layer_norm(ids.to(id_dtype), None, None, *tables, eps=EPS)  # defaults made from the ids
    assert torch.equal(got, K.embed_layer_norm(ids, None, None, *tables, eps=EPS))


def test_bias_grad_not_rounded_through_the_weight_dtype(triton_kernels, device):
    # fp16 LayerNorm weight, fp32 bias: the bias gradient must keep fp32 precision
    n, vocab = 37, 11
    ids = torch.randint(0, vocab, (2, 3), device=device)
    tt = torch.randint(0, 2, (2, 3), device=device)
    pos = torch.arange(3, device=device).expand(2, 3)
    tables = (torch.randn(vocab, n), torch.randn(5, n), torch.randn(2, n))
    w, b, dy = (1 + 0.3 * torch.randn(n)).half(), 0.5 * torch.randn(n), 300 * torch.randn(2, 3, n)
    ours, base, ref = ([t.to(device=device, dtype=d).clone().requires_grad_() for t, d in zip((*tables, w, b), dts)]
                       for dts in ([None] * 5, [None, None, None, torch.float32, None], [torch.float64] * 5))

    def torch_ref(word, posw, typew, w, b):
        return F.layer_norm(word[ids] + posw[pos] + typew[tt], (n,), w, b, EPS)

    K.embed_layer_norm(ids, tt, pos, *ours, EPS).backward(dy.to(device))
    torch_ref(*base).backward(dy.to(device))
    torch_ref(*ref).backward(dy.to(device, torch.float64))
    assert ours[4].grad.dtype == torch.float32
    assert_close_to_reference(ours[4].grad, base[4].grad, ref[4].grad, name="dbias")


def test_reference_embed_layer_norm_takes_the_same_default_ids():
    """fastbert.kernels.reference has K's signature: None token types / positions are zeros / 0..seq-1."""
    n = 24
    ids = torch.randint(0, VOCAB, (3, 5))
    tables = [torch.randn(VOCAB, n), torch.randn(MAX_POS, n), torch.randn(TYPES, n), 1 + torch.randn(n),
              torch.randn(n)]
    pos = torch.arange(5).expand(3, 5)
    want = R.embed_layer_norm(ids, torch.zeros_like(ids), pos, *tables, eps=EPS)
    assert torch.equal(R.embed_layer_norm(ids, None, None, *tables, eps=EPS), want)
    shifted = R.embed_layer_norm(ids, None, pos + 1, *tables, eps=EPS)
    assert not torch.equal(shifted, want)  # the positions do count
