"""The reference ops (the CPU path and the oracle of the kernel tests) against torch.nn.functional
in float64, plus the input checks every backend shares."""

import pytest
import torch
import torch.nn.functional as F

import fastbert.kernels as K


@pytest.fixture(autouse=True)
def _reference(monkeypatch):
    monkeypatch.setenv("FASTBERT_KERNELS", "reference")


def _sdpa(q, k, v, mask=None, causal=False):
    attn_mask = None
    if mask is not None:
        attn_mask = mask[:, None, None, :]
        if causal:
            attn_mask = attn_mask & torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 7, 16), (1, 2, 1, 8), (3, 1, 33, 24)])
def test_attention_matches_sdpa_float64(shape, causal):
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(shape[0], shape[2], dtype=torch.bool)
    mask[0, shape[2] // 2 + 1:] = False
    out = K.attention(q, k, v, mask, causal=causal)
    torch.testing.assert_close(out, _sdpa(q, k, v, mask, causal), rtol=1e-12, atol=1e-12)


def test_attention_fully_masked_row_gives_zero_output_and_grads():
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    out = K.attention(q, k, v, mask)
    assert torch.isfinite(out).all() and not out[1].any()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and not t.grad[1].any()


@pytest.mark.parametrize("lengths", [[1, 5, 3, 0, 7], [4, 4, 4]])
def test_varlen_matches_per_sequence_attention(lengths):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    q, k, v = (torch.randn(int(cu[-1]), 3, 16, dtype=torch.float64) for _ in range(3))
    out = K.varlen_attention(q, k, v, cu, max(lengths), causal=True)
    for i, n in enumerate(lengths):
        s, e = int(cu[i]), int(cu[i + 1])
        if n == 0:
            continue
        ref = _sdpa(*(t[s:e].transpose(0, 1)[None] for t in (q, k, v)), causal=True)[0].transpose(0, 1)
        torch.testing.assert_close(out[s:e], ref, rtol=1e-12, atol=1e-12)


def test_attention_dropout_follows_torch_seed():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    torch.manual_seed(3)
    a = K.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    b = K.attention(q, k, v, dropout_p=0.5)
    c = K.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_elementwise_ops_match_functional_float64(approximate):
    x, r = torch.randn(3, 5, 37, dtype=torch.float64), torch.randn(3, 5, 37, dtype=torch.float64)
    b, w, lb = (torch.randn(37, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(K.bias_gelu(x, b, approximate), F.gelu(x + b, approximate=approximate))
    torch.testing.assert_close(K.add_layer_norm(x, r, w, lb, 1e-5), F.layer_norm(x + r, (37,), w, lb, 1e-5))
    torch.testing.assert_close(K.gelu_layer_norm(x, b, w, lb, 1e-5, approximate),
                               F.layer_norm(F.gelu(x + b, approximate=approximate), (37,), w, lb, 1e-5))


def test_embed_layer_norm_matches_functional_float64():
    word, pos, typ = (torch.randn(n, 24, dtype=torch.float64) for n in (50, 16, 2))
    w, b = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    ids, tt = torch.randint(0, 50, (3, 11)), torch.randint(0, 2, (3, 11))
    pos_ids = torch.arange(11).expand(3, 11)
    out = K.embed_layer_norm(ids, tt, pos_ids, word, pos, typ, w, b, 1e-12)
    ref = F.layer_norm(word[ids] + pos[pos_ids] + typ[tt], (24,), w, b, 1e-12)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(K.embed_layer_norm(ids, None, None, word, pos, typ, w, b, 1e-12),
                               F.layer_norm(word[ids] + pos[:11] + typ[0], (24,), w, b, 1e-12))


def test_mlm_loss_matches_cross_entropy_float64():
    h, W, b = torch.randn(20, 16, dtype=torch.float64), torch.randn(73, 16, dtype=torch.float64), torch.randn(73, dtype=torch.float64)
    labels = torch.randint(0, 73, (20,))
    labels[::3] = -100
    torch.testing.assert_close(K.mlm_loss(h, W, b, labels), F.cross_entropy(h @ W.T + b, labels))
    none = torch.full((20,), -100)
    hg = h.clone().requires_grad_()
    loss = K.mlm_loss(hg, W, b, none)
    loss.backward()
    assert loss.item() == 0.0 and not hg.grad.any()


def test_backend_switch_validates(monkeypatch):
    monkeypatch.setenv("FASTBERT_KERNELS", "fast")
    with pytest.raises(ValueError, match="FASTBERT_KERNELS"):
        K.bias_gelu(torch.randn(2, 4), torch.randn(4))


# ---------------------------------------------------------------------------- shared input checks

@pytest.mark.parametrize("call,exc,match", [
    (lambda: K.attention(torch.randn(2, 8, 4), torch.randn(2, 8, 4), torch.randn(2, 8, 4)), ValueError, "4 dimensions"),
    (lambda: K.attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 4, 8)), ValueError, "same shape"),
    (lambda: K.attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8).half(), torch.randn(1, 2, 3, 8)), ValueError, "dtype"),
    (lambda: K.attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8),
                         torch.ones(1, 4, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (lambda: K.attention(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8),
                         torch.ones(1, 3)), TypeError, "key_padding_mask"),
    (lambda: K.attention(torch.randn(1, 2, 3, 8).long(), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)), TypeError, "q"),
    (lambda: K.varlen_attention(*(torch.randn(5, 2, 8) for _ in range(3)), torch.tensor([0, 2, 5]), 3), TypeError, "int32"),
    (lambda: K.varlen_attention(*(torch.randn(5, 2, 8) for _ in range(3)), torch.tensor([1, 2, 5], dtype=torch.int32), 3),
     ValueError, "start at 0"),
    (lambda: K.varlen_attention(*(torch.randn(5, 2, 8) for _ in range(3)), torch.tensor([0, 4, 3, 5], dtype=torch.int32), 4),
     ValueError, "non-decreasing"),
    (lambda: K.varlen_attention(*(torch.randn(5, 2, 8) for _ in range(3)), torch.tensor([0, 2, 4], dtype=torch.int32), 3),
     ValueError, "ends at 4"),
    (lambda: K.varlen_attention(*(torch.randn(5, 2, 8) for _ in range(3)), torch.tensor([0, 1, 5], dtype=torch.int32), 3),
     ValueError, "max_seqlen"),
    (lambda: K.attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)), dropout_p=1.0), ValueError, "dropout_p"),
    (lambda: K.bias_gelu(torch.randn(3, 5), torch.randn(4)), ValueError, "bias"),
    (lambda: K.bias_gelu(torch.randn(3, 5), torch.randn(5), approximate="fast"), ValueError, "approximate"),
    (lambda: K.add_layer_norm(torch.randn(3, 5), torch.randn(3, 4), torch.ones(5), torch.zeros(5)), ValueError, "same shape"),
    (lambda: K.gelu_layer_norm(torch.randn(3, 5), torch.randn(5), torch.ones(4), torch.zeros(5)), ValueError, "weight"),
    (lambda: K.embed_layer_norm(torch.tensor([[1, 9]]), None, None, torch.randn(9, 4), torch.randn(4, 4),
                                torch.randn(2, 4), torch.ones(4), torch.zeros(4)), ValueError, r"input_ids.*\[0, 9\)"),
    (lambda: K.embed_layer_norm(torch.tensor([[1, 2]]), torch.tensor([[0, 2]]), None, torch.randn(9, 4),
                                torch.randn(4, 4), torch.randn(2, 4), torch.ones(4), torch.zeros(4)), ValueError,
     "token_type_ids"),
    (lambda: K.embed_layer_norm(torch.tensor([[1.0, 2.0]]), None, None, torch.randn(9, 4), torch.randn(4, 4),
                                torch.randn(2, 4), torch.ones(4), torch.zeros(4)), TypeError, "integer"),
    (lambda: K.mlm_loss(torch.randn(4, 8), torch.randn(10, 8), torch.randn(10), torch.tensor([1, 2, 10, -100])),
     ValueError, "labels must lie in"),
    (lambda: K.mlm_loss(torch.randn(4, 8), torch.randn(10, 7), torch.randn(10), torch.tensor([1, 2, 3, 4])),
     ValueError, "weight"),
    (lambda: K.mlm_loss(torch.randn(4, 8), torch.randn(10, 8), torch.randn(10), torch.tensor([1, 2, 3])),
     ValueError, "rows"),
    # from a mutation audit of the checks: each of these passed silently (or failed obscurely) without its check
    (lambda: K.varlen_attention(*(torch.randn(5, 2, 8) for _ in range(3)), torch.tensor([0, 2, 6], dtype=torch.int32), 4),
     ValueError, "ends at 6"),
    (lambda: K.varlen_attention(*(torch.randn(0, 2, 8) for _ in range(3)), torch.tensor([0], dtype=torch.int32), 4),
     ValueError, "at least two"),
    (lambda: K.varlen_attention(*(torch.randn(5, 2, 8) for _ in range(3)),
                                torch.tensor([0, 2, 5], dtype=torch.int32, device="meta"), 3), ValueError, "device meta"),
    (lambda: K.attention(torch.randn(2, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)), ValueError, "agree"),
    (lambda: K.attention(*(torch.randn(1, 2, 3, 8) for _ in range(3)),
                         key_padding_mask=torch.ones(1, 3, dtype=torch.bool, device="meta")), ValueError, "device meta"),
    (lambda: K.attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)), dropout_p=-0.5), ValueError, "dropout_p"),
    (lambda: K.embed_layer_norm(torch.tensor([[1, -1]]), None, None, torch.randn(9, 4), torch.randn(4, 4),
                                torch.randn(2, 4), torch.ones(4), torch.zeros(4)), ValueError, r"input_ids.*min -1"),
    (lambda: K.embed_layer_norm(torch.tensor([[1, 2]]), None, torch.tensor([[0, 6]]), torch.randn(9, 4),
                                torch.randn(4, 4), torch.randn(2, 4), torch.ones(4), torch.zeros(4)), ValueError,
     r"position_ids.*\[0, 4\)"),
    (lambda: K.mlm_loss(torch.randn(4, 8), torch.randn(10, 8), torch.randn(10), torch.tensor([1, 2, 3, 4]),
                        out_dtype=torch.int32), TypeError, "out_dtype"),
])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bad_input_raises_clear_error(call, exc, match, backend, monkeypatch):
    monkeypatch.setenv("FASTBERT_KERNELS", backend)  # the checks run before either path
    with pytest.raises(exc, match=match):
        call()


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    """What counts is TRITON_INTERPRET when the kernels were defined (import), as for Triton itself:
    unset then, the op says so, and says "too late" when it was set afterwards."""
    from fastbert.kernels import _dispatch
    monkeypatch.setenv("FASTBERT_KERNELS", "triton")
    monkeypatch.setattr(_dispatch, "_INTERPRETING_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1") as info:
        K.bias_gelu(torch.randn(2, 4), torch.randn(4))
    assert "too late" not in str(info.value)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="set after fastbert.kernels was imported"):
        K.bias_gelu(torch.randn(2, 4), torch.randn(4))
