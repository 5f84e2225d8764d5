"""Triton attention (kernels/flash_attention.py) against a float64 reference.

The kernels run themselves: in Triton's interpreter on CPU tensors here (fp32, fp16), compiled on a
GPU under FASTBERT_TEST_GPU=1 (the gpu-marked tests add bf16 and realistic sizes). Every comparison
follows the rule of tests/tolerance.py: our error against float64 is at most 2x the error of the same
attention written in plain PyTorch in the same dtype (``torch_attention`` below), forward and all
three gradients.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import fastbert.kernels as K
from fastbert.kernels import flash_attention  # noqa: F401  (registers the fastbert::*attention* ops)
from fastbert.kernels import philox_dropout, reference
from aot import compile_in_subprocess
from philox_mask import philox_keep_mask
from interpreter_bounds import BF16, interpreted
from tolerance import assert_close_to_reference

INTERPRETED_DTYPES = (torch.float32, torch.float16, BF16)
ON_GPU = bool(os.environ.get("FASTBERT_TEST_GPU")) and torch.cuda.is_available()
# The interpreter matrices below would cost a GPU run dozens of kernel compilations for little news:
# there the gpu-marked tests (bf16 included, realistic sizes) and the single cases cover CUDA.
interpreter_matrix = pytest.mark.skipif(ON_GPU, reason="interpreter matrix; CUDA runs the gpu-marked tests")


# ------------------------------------------------------------------------------------------ helpers

def torch_attention(q, k, v, key_padding_mask=None, causal=False, scale=None, keep=None, dropout_p=0.0):
    """Attention in plain PyTorch, every op in the dtype of q (the "PyTorch in the same dtype" baseline;
    in float64 it is also the oracle for an explicit dropout mask `keep` (B, H, Sq, Sk) bool)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    sq, sk = q.shape[-2], k.shape[-2]
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    visible = visible.expand(q.shape[0], 1, sq, sk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~visible, torch.finfo(q.dtype).min)
    probs = torch.softmax(scores, dim=-1) * visible.any(-1, keepdim=True)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return torch.matmul(probs, v)


def _leaves(*tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def check_against_reference(ours_fn, baseline_fn, reference_fn, inputs, dtype, names=("out", "dq", "dk", "dv")):
    """Run ours (dtype), baseline (dtype) and reference (float64) forward + backward on the same inputs."""
    ours_in, base_in, ref_in = (_leaves(*inputs, dtype=d) for d in (dtype, dtype, torch.float64))
    ours, base, ref = ours_fn(*ours_in), baseline_fn(*base_in), reference_fn(*ref_in)
    grad = torch.randn(ref.shape, dtype=torch.float64)
    results = []
    for out, leaves in ((ours, ours_in), (base, base_in), (ref, ref_in)):
        grads = torch.autograd.grad(out, leaves, grad.to(device=out.device, dtype=out.dtype))
        results.append((out, *grads))
    for name, a, b, r in zip(names, *results):
        assert a.dtype == dtype, name
        assert_close_to_reference(a.cpu(), b.cpu(), r.cpu(), name=f"{name} {dtype}")
    return results[0]


def random_mask(batch, seq, empty_row=True):
    mask = torch.rand(batch, seq) > 0.3
    mask[:, 0] = True
    if empty_row:
        mask[-1] = False  # a batch row with no real key at all
    return mask


def to_device(device, *tensors):
    return [t.to(device) if t is not None else None for t in tensors]


# ------------------------------------------------------------------------------ padded layout

PADDED_CASES = [
    # batch, heads, seq_q, seq_k, head_dim, mask, causal
    (1, 1, 1, 1, 16, False, False),     # sequence length 1
    (2, 2, 17, 17, 32, True, False),    # odd length, a row with no real key
    (2, 2, 17, 17, 32, True, True),
    (2, 1, 129, 129, 64, True, False),  # one past two blocks
    (1, 1, 65, 33, 24, False, True),    # seq_q != seq_k, head_dim not a power of two
    (1, 2, 31, 31, 128, True, False),   # the largest head_dim
    (2, 1, 9, 9, 8, True, True),        # head_dim below tl.dot's minimum of 16
    (2, 1, 3, 1100, 16, True, False),   # a mask row longer than one 1024-wide scan for its last real key
]


@interpreter_matrix
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("case", PADDED_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-m{int(c[5])}c{int(c[6])}")
def test_attention_matches_reference(triton_kernels, device, case, dtype):
    batch, heads, sq, sk, dim, has_mask, causal = case
    q = torch.randn(batch, heads, sq, dim)
    k, v = torch.randn(batch, heads, sk, dim), torch.randn(batch, heads, sk, dim)
    mask = random_mask(batch, sk) if has_mask else None
    q, k, v, mask = to_device(device, q, k, v, mask)
    scale = 0.3  # not the default, to check it is applied in forward and backward

    out, dq, dk, dv = check_against_reference(
        lambda q, k, v: K.attention(q, k, v, mask, causal=causal, softmax_scale=scale),
        lambda q, k, v: torch_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu() if has_mask else None, causal, scale),
        lambda q, k, v: reference.attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu() if has_mask else None,
                                            causal=causal, softmax_scale=scale),
        (q, k, v), dtype)
    if has_mask:  # the batch row without real keys: exact zeros, zero gradients
        for t in (out, dq, dk, dv):
            assert torch.count_nonzero(t[-1]) == 0


def test_attention_long_odd_length(triton_kernels, device):
    """513 = 8 blocks of 64 + 1 in every kernel loop, causal and padded, fp16."""
    q, k, v = (torch.randn(1, 1, 513, 64) for _ in range(3))
    mask = torch.arange(513)[None, :] < 500
    q, k, v, mask = to_device(device, q, k, v, mask)
    check_against_reference(
        lambda q, k, v: K.attention(q, k, v, mask, causal=True),
        lambda q, k, v: torch_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), True),
        lambda q, k, v: reference.attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), causal=True),
        (q, k, v), torch.float16)


def test_attention_strided_inputs(triton_kernels, device, bwd_path):
    """(B, S, H, D) tensors seen as (B, H, S, D) through transpose: no copy needed, same answer; and
    a key padding mask that is a transposed view (its last dimension not contiguous)."""
    q, k, v = (torch.randn(2, 19, 3, 32, device=device).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    mask = random_mask(2, 19, empty_row=False).t().contiguous().t().to(device)
    assert mask.stride(-1) != 1
    check_against_reference(
        lambda q, k, v: K.attention(q, k, v, mask),
        lambda q, k, v: torch_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu()),
        lambda q, k, v: reference.attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu()),
        (q, k, v), torch.float32)


# ------------------------------------------------------------------------------ packed layout

def packed_qkv(lengths, heads, dim, device, dtype):
    """q, k, v as strided views of one fused projection (total, 3 * heads * dim), as the model has them."""
    total = sum(lengths)
    fused = torch.randn(total, 3 * heads * dim, device=device, dtype=dtype)
    qkv = fused.view(total, 3, heads, dim)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2], cu


def padded_view(x, lengths):
    """(total, H, D) -> (B, H, max_len, D) with zero padding, and the key padding mask."""
    width = max(lengths)
    rows, mask = [], torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, piece in enumerate(torch.split(x, lengths)):
        rows.append(torch.nn.functional.pad(piece, (0, 0, 0, 0, 0, width - len(piece))).transpose(0, 1))
        mask[i, :len(piece)] = True
    return torch.stack(rows), mask


def unpadded_view(x, lengths):
    return torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])


def packed_torch_attention(lengths, causal=False, keep=None, dropout_p=0.0):
    """torch_attention over packed (total, H, D) q/k/v of these sequence lengths (empty ones hold no
    rows), as a (q, k, v) -> out function: the packed tests' PyTorch baseline, and their float64
    oracle with an explicit keep mask (B, H, S, S) of the non-empty sequences."""
    real = [n for n in lengths if n]

    def run(q, k, v):
        (qp, mask), (kp, _), (vp, _) = (padded_view(t.cpu(), real) for t in (q, k, v))
        return unpadded_view(torch_attention(qp, kp, vp, mask, causal, keep=keep, dropout_p=dropout_p), real)
    return run


@interpreter_matrix
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths,heads,dim", [([1, 17, 64, 5, 129], 2, 32), ([3, 1, 65], 3, 64)])
def test_varlen_matches_reference(triton_kernels, device, lengths, heads, dim, causal, dtype):
    q = check_packed_varlen(lengths, heads, dim, causal, dtype, device)
    assert q.stride(0) == 3 * heads * dim  # strided views, not copies


def check_packed_varlen(lengths, heads, dim, causal, dtype, device):
    """K.varlen_attention on packed sequences of these lengths, q / k / v strided views of one fused
    projection (packed_qkv), against float64 by the rule, forward and gradients; returns q."""
    q, k, v, cu = packed_qkv(lengths, heads, dim, device, torch.float32)
    max_len = max(lengths)
    check_against_reference(
        lambda q, k, v: K.varlen_attention(q, k, v, cu, max_len, causal=causal),
        packed_torch_attention(lengths, causal),
        lambda q, k, v: reference.varlen_attention(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), max_len, causal=causal),
        (q, k, v), dtype)
    return q


def test_varlen_strided_views_need_no_copy(triton_kernels, device):
    """The fused-QKV views give the same bits as contiguous copies of them."""
    q, k, v, cu = packed_qkv([7, 20], 2, 32, device, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    copies = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    outs = [K.varlen_attention(*ts, cu, 20) for ts in (leaves, copies)]
    assert torch.equal(outs[0], outs[1])
    grad = torch.randn_like(outs[0])
    for a, b in zip(torch.autograd.grad(outs[0], leaves, grad), torch.autograd.grad(outs[1], copies, grad)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- dropout

def _one_hot_values(batch, heads, seq, dim, device):
    """v whose key j is the unit vector e_j: the output row i is then the dropped probabilities P_i· Z_i·."""
    assert seq <= dim
    eye = torch.eye(seq, dim)
    return eye.expand(batch, heads, seq, dim).contiguous().to(device)


def _dropout_keep_mask(run, v_one_hot, visible):
    kept = run(v_one_hot)[..., :visible.shape[-1]].detach().cpu() != 0
    return kept | ~visible  # masked-out keys have probability 0, their keep bit does not matter


def _seed_of(torch_seed, q, p):
    """The Philox seed an attention call draws right after torch.manual_seed(torch_seed)."""
    torch.manual_seed(torch_seed)
    return int(flash_attention._draw_seed(q, p))


@interpreter_matrix
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_backward_consistent(triton_kernels, device, bwd_path, dtype, causal):
    """The mask the forward applied (read back through one-hot values) is the documented Philox mask,
    and it is the mask both backward kernels used: forward and gradients match the float64 oracle
    with that explicit mask and the effective (16-bit) drop probability."""
    batch, heads, seq, dim, p = 2, 2, 40, 64, 0.3
    q, k = torch.randn(batch, heads, seq, dim), torch.randn(batch, heads, seq, dim)
    mask = random_mask(batch, seq, empty_row=False)
    q, k, mask = to_device(device, q, k, mask)
    visible = mask.cpu()[:, None, None, :].expand(batch, heads, seq, seq)
    if causal:
        visible = visible & torch.ones(seq, seq, dtype=torch.bool).tril()

    def run(v, q=q, k=k):
        torch.manual_seed(1234)
        return K.attention(q, k, v, mask, causal=causal, dropout_p=p)

    keep = _dropout_keep_mask(lambda v: run(v.to(dtype), q.to(dtype), k.to(dtype)),
                              _one_hot_values(batch, heads, seq, dim, device), visible)
    documented = philox_keep_mask(_seed_of(1234, q, p), batch, heads, seq, seq, p)
    assert torch.equal(keep[visible], documented[visible])
    p_eff = flash_attention.effective_dropout_p(p)
    v = torch.randn(batch, heads, seq, dim, device=device)
    check_against_reference(
        lambda q, k, v: run(v, q, k),
        lambda q, k, v: torch_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), causal, keep=keep, dropout_p=p_eff),
        lambda q, k, v: torch_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), causal, keep=keep, dropout_p=p_eff),
        (q, k, v), dtype)


def test_dropout_multiblock_against_documented_mask(triton_kernels, device):
    """Several key and query blocks in every kernel (the dK/dV kernel's transposed tiles included), an
    odd length, a padded row: out, dQ, dK, dV against float64 with the documented mask."""
    batch, heads, seq, dim, p = 2, 1, 137, 16, 0.2
    q, k, v = (torch.randn(batch, heads, seq, dim, device=device) for _ in range(3))
    mask = (torch.arange(seq)[None, :] < torch.tensor([[seq], [100]])).to(device)
    _check_padded_dropout(q, k, v, mask, p, 77, torch.float32)


def _check_padded_dropout(q, k, v, mask, p, seed, dtype):
    """out, dQ, dK, dV of K.attention with dropout, seeded, against float64 with the documented mask."""
    keep = philox_keep_mask(_seed_of(seed, q, p), *q.shape[:3], k.shape[2], p)
    p_eff = flash_attention.effective_dropout_p(p)

    def run(q, k, v):
        torch.manual_seed(seed)
        return K.attention(q, k, v, mask, dropout_p=p)

    def reference(q, k, v):
        return torch_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), keep=keep, dropout_p=p_eff)

    check_against_reference(run, reference, reference, (q, k, v), dtype)


def test_varlen_dropout_forward_backward_consistent(triton_kernels, device):
    lengths, heads, dim, p = [5, 33, 1, 20], 2, 64, 0.25
    q, k, _, cu = packed_qkv(lengths, heads, dim, device, torch.float32)
    total, width = sum(lengths), max(lengths)
    # one-hot values by position inside each sequence
    pos = torch.cat([torch.arange(n) for n in lengths])
    v_one_hot = torch.zeros(total, heads, dim)
    v_one_hot[torch.arange(total), :, pos] = 1.0

    def run(v, q=q, k=k):
        torch.manual_seed(99)
        return K.varlen_attention(q, k, v, cu, width, dropout_p=p)

    kept_rows = padded_view(run(v_one_hot.to(device)).detach().cpu(), lengths)[0][..., :width] != 0
    _, mask = padded_view(q.detach().cpu(), lengths)
    visible = (mask[:, None, None, :] & mask[:, None, :, None]).expand(len(lengths), heads, width, width)
    keep = kept_rows | ~visible
    # positions inside each sequence; the counter's row stride comes from max_seqlen
    documented = philox_keep_mask(_seed_of(99, q, p), len(lengths), heads, width, width, p, rng_seq_k=width)
    assert torch.equal(keep[visible], documented[visible])
    p_eff = flash_attention.effective_dropout_p(p)
    baseline = packed_torch_attention(lengths, keep=keep, dropout_p=p_eff)
    v = torch.randn(total, heads, dim, device=device)
    check_against_reference(lambda q, k, v: run(v, q, k), baseline, baseline, (q, k, v), torch.float32)


def test_dropout_mask_statistics():
    """The documented mask (which the tests above show the kernels apply bit for bit) over 1M
    elements: keep rate 1 - p at every position of an 8-key Philox group, and no repetition across
    heads or batch rows, nor between neighbouring keys or rows: each within 5 sigma of a fair coin."""
    p = 0.1
    masks = philox_keep_mask(2 ** 61 + 12345, 2, 4, 256, 512, p).double()  # 8 (batch, head) pairs
    p_eff = flash_attention.effective_dropout_p(p)
    assert abs(p_eff - p) <= 2 ** -17

    def within_5_sigma(fraction, expected, n):
        sigma = math.sqrt(expected * (1 - expected) / n)
        assert abs(fraction - expected) < 5 * sigma, (fraction, expected, sigma)

    within_5_sigma(masks.mean().item(), 1 - p_eff, masks.numel())
    per_position = masks.view(2, 4, 256, 64, 8).mean((0, 1, 2, 3))
    for fraction in per_position.tolist():
        within_5_sigma(fraction, 1 - p_eff, masks.numel() // 8)
    agree = (1 - p_eff) ** 2 + p_eff ** 2  # P(two independent bits agree)
    flat = masks.view(8, -1)
    for i in range(8):
        for j in range(i + 1, 8):
            within_5_sigma((flat[i] == flat[j]).double().mean().item(), agree, flat.shape[1])
    within_5_sigma((masks[..., 1:] == masks[..., :-1]).double().mean().item(), agree, masks[..., 1:].numel())
    within_5_sigma((masks[..., 1:, :] == masks[..., :-1, :]).double().mean().item(), agree,
                   masks[..., 1:, :].numel())


def test_dropout_repeatable_under_seed(triton_kernels, device):
    q, k, v = (torch.randn(2, 2, 23, 32, device=device, requires_grad=True) for _ in range(3))
    results = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        out = K.attention(q, k, v, dropout_p=0.5)
        results.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    assert not torch.equal(results[0][0], results[2][0])


def test_dropout_quantisation():
    fa = flash_attention
    assert fa.effective_dropout_p(0.0) == 0.0
    assert fa.effective_dropout_p(0.5) == 0.5
    assert fa.effective_dropout_p(0.1) == 6554 / 65536
    assert fa.effective_dropout_p(0.9999999) == 65535 / 65536  # never drops everything
    for p in (1e-6, 0.1, 0.3, 0.999):
        threshold, scale = philox_dropout.dropout_args(p)
        assert abs(fa.effective_dropout_p(p) - p) <= 2 ** -17
        assert scale == 1.0 / (1.0 - fa.effective_dropout_p(p))
    with pytest.raises(ValueError, match="2\\*\\*31"):
        fa._check_dropout_counter(2 ** 17, 2 ** 17 + 1)
    fa._check_dropout_counter(2 ** 16, 2 ** 16)


# ------------------------------------------------------------------- fused one-launch backward

class _Forbidden:
    """Stands in for a kernel the path under test must not launch."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} was launched")


@pytest.fixture(params=["fused", "split"])
def bwd_path(request, monkeypatch):
    """Runs a test once through the one-launch backward (the split kernels forbidden) and once through
    the dQ + dK/dV kernels (the fused kernel turned off by the config override, and forbidden)."""
    fa = flash_attention
    if request.param == "fused":
        for name in ("_attn_bwd_dq", "_attn_bwd_dkdv"):
            monkeypatch.setattr(fa, name, _Forbidden(name))
    else:
        fa.set_config_override({"fused": []})
        monkeypatch.setattr(fa, "_attn_bwd_fused", _Forbidden("_attn_bwd_fused"))
    yield request.param
    fa.set_config_override(None)


FUSED_CASES = [
    # batch, heads, seq_q, seq_k, head_dim, mask, causal: within the interpreter's fused key block (64),
    # several of its 16-row query steps, a ragged last step
    (2, 2, 37, 37, 24, True, False),    # odd head_dim, a batch row without real keys
    (2, 1, 64, 64, 32, True, True),     # exactly one key block, causal
    (1, 2, 50, 19, 16, False, False),   # seq_q != seq_k
    (3, 1, 1, 1, 8, False, True),       # one token, head_dim below tl.dot's minimum
]


@interpreter_matrix
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-m{int(c[5])}c{int(c[6])}")
def test_fused_and_split_backward_match_float64(triton_kernels, device, bwd_path, case, dtype):
    batch, heads, sq, sk, dim, has_mask, causal = case
    q = torch.randn(batch, heads, sq, dim)
    k, v = torch.randn(batch, heads, sk, dim), torch.randn(batch, heads, sk, dim)
    mask = random_mask(batch, sk) if has_mask else None
    q, k, v, mask = to_device(device, q, k, v, mask)
    cpu_mask = mask.cpu() if has_mask else None
    out, dq, dk, dv = check_against_reference(
        lambda q, k, v: K.attention(q, k, v, mask, causal=causal, softmax_scale=0.3),
        lambda q, k, v: torch_attention(q.cpu(), k.cpu(), v.cpu(), cpu_mask, causal, 0.3),
        lambda q, k, v: reference.attention(q.cpu(), k.cpu(), v.cpu(), cpu_mask, causal=causal, softmax_scale=0.3),
        (q, k, v), dtype)
    if has_mask:
        for t in (dq, dk, dv):
            assert torch.count_nonzero(t[-1]) == 0


@interpreter_matrix
@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_fused_and_split_backward_packed_views(triton_kernels, device, bwd_path, dtype, causal):
    """The BERT launch: packed sequences (one of a single token, an empty one, one filling the block)
    as strided views of one fused projection."""
    check_packed_varlen([1, 17, 0, 64, 30], 2, 32, causal, dtype, device)


@interpreter_matrix
@pytest.mark.parametrize("case", ["padded", "padded-causal-dropout", "packed-causal"])
def test_fused_backward_at_its_gpu_tile(triton_kernels, device, case):
    """The one-launch backward at its GPU tile (32-row steps over 128 keys: BERT's 65-128-token
    sequences, which the interpreter's own 64-key tile sends to the split pair), the split kernels
    forbidden, against float64."""
    fa = flash_attention
    fa.set_config_override({"fused": [32, 128, 4, 1]})
    try:
        with pytest.MonkeyPatch.context() as m:
            for name in ("_attn_bwd_dq", "_attn_bwd_dkdv"):
                m.setattr(fa, name, _Forbidden(name))
            if case == "packed-causal":
                check_packed_varlen([128, 1, 0, 77, 100], 2, 32, True, torch.float16, device)
            elif case == "padded":
                q, k, v = (torch.randn(2, 2, 100, 32, device=device) for _ in range(3))
                mask = random_mask(2, 100).to(device)
                check_against_reference(
                    lambda q, k, v: K.attention(q, k, v, mask),
                    lambda q, k, v: torch_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu()),
                    lambda q, k, v: reference.attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu()),
                    (q, k, v), torch.float32)
            else:
                q, k, v = (torch.randn(2, 1, 128, 64, device=device) for _ in range(3))
                mask = (torch.arange(128)[None, :] < torch.tensor([[128], [90]])).to(device)
                keep = philox_keep_mask(_seed_of(11, q, 0.2), 2, 1, 128, 128, 0.2)
                p_eff = fa.effective_dropout_p(0.2)

                def run(q, k, v):
                    torch.manual_seed(11)
                    return K.attention(q, k, v, mask, causal=True, dropout_p=0.2)

                def oracle(q, k, v):
                    return torch_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), True, keep=keep, dropout_p=p_eff)

                check_against_reference(run, oracle, oracle, (q, k, v), torch.float16)
    finally:
        fa.set_config_override(None)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_backward_writes_every_given_gradient(triton_kernels, device, bwd_path, layout):
    """Given gradient buffers (the qkv-packed entries' dqkv) filled with NaN beforehand come back
    finite everywhere: every row is written, including a batch row without a real key, keys past
    seq_q (seq_q != seq_k) and an empty packed sequence."""
    fa = flash_attention
    if layout == "padded":
        q = torch.randn(2, 2, 20, 16, device=device)
        k, v = (torch.randn(2, 2, 33, 16, device=device) for _ in range(2))
        mask, cu, max_len = random_mask(2, 33).to(device), None, 0
    else:
        q, k, v, cu = packed_qkv([5, 0, 31, 1], 2, 16, device, torch.float32)
        mask, max_len = None, 31
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    out, lse = fa._flash_fwd(q, k, v, mask, cu, max_len, seed, False, 0.0, 0.25)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    fa._flash_bwd(torch.randn_like(out), q, k, v, out, lse, mask, cu, max_len, seed, False, 0.0, 0.25, grads=grads)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert torch.isfinite(g).all(), f"{name}: rows left unwritten"


def test_fused_and_split_backward_dropout(triton_kernels, device, bwd_path):
    """Dropout in the fused kernel regenerates the forward's documented mask (float64 oracle with it)."""
    batch, heads, seq, dim = 2, 2, 45, 16
    q, k, v = (torch.randn(batch, heads, seq, dim, device=device) for _ in range(3))
    mask = (torch.arange(seq)[None, :] < torch.tensor([[seq], [30]])).to(device)
    _check_padded_dropout(q, k, v, mask, 0.25, 5, torch.float16)


# ------------------------------------------------------------------------------- determinism

def test_backward_is_bitwise_deterministic(triton_kernels, device):
    q, k, v = (torch.randn(2, 2, 70, 32, device=device, dtype=torch.float16, requires_grad=True) for _ in range(3))
    mask = random_mask(2, 70, empty_row=False).to(device)
    grad = torch.randn(2, 2, 70, 32, device=device, dtype=torch.float16)
    first = torch.autograd.grad(K.attention(q, k, v, mask), (q, k, v), grad)
    for _ in range(2):
        again = torch.autograd.grad(K.attention(q, k, v, mask), (q, k, v), grad)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# -------------------------------------------------------------------- custom ops and compile

def test_opcheck_padded(triton_kernels, device):
    q, k, v = (torch.randn(2, 2, 9, 16, device=device, requires_grad=True) for _ in range(3))
    mask = random_mask(2, 9).to(device)
    seed = torch.tensor([42], dtype=torch.int64, device=device)
    for args in ((q, k, v, mask, None, False, 0.0, 0.25), (q, k, v, None, seed, True, 0.2, 0.25)):
        torch.library.opcheck(torch.ops.fastbert.attention_fwd.default, args)
    # The backward op has no double-backward formula: check it on plain tensors.
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.fastbert.attention_fwd(q, k, v, mask, seed, True, 0.2, 0.25)
    torch.library.opcheck(torch.ops.fastbert.attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, mask, seed, True, 0.2, 0.25))


def test_opcheck_varlen(triton_kernels, device):
    q, k, v, cu = packed_qkv([3, 8], 2, 16, device, torch.float32)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    seed = torch.tensor([7], dtype=torch.int64, device=device)
    for args in ((q, k, v, cu, 8, None, False, 0.0, 0.25), (q, k, v, cu, 8, seed, True, 0.1, 0.25)):
        torch.library.opcheck(torch.ops.fastbert.varlen_attention_fwd.default, args)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.fastbert.varlen_attention_fwd(q, k, v, cu, 8, seed, False, 0.1, 0.25)
    torch.library.opcheck(torch.ops.fastbert.varlen_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, cu, 8, seed, False, 0.1, 0.25))


@pytest.mark.parametrize("packed", [False, True])
def test_custom_op_matches_eager_path(triton_kernels, device, packed):
    """Eager calls skip the custom-op dispatch; the ops (what torch.compile calls) give the same bits,
    dropout included, forward and gradients."""
    fa = flash_attention
    if packed:
        q, k, v, cu = packed_qkv([5, 1, 30], 2, 32, device, torch.float16)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        eager = lambda: fa.varlen_attention(q, k, v, cu, 30, True, 0.2, 0.3)  # noqa: E731
        op = lambda: fa.varlen_attention_fwd(q, k, v, cu, 30, fa._draw_seed(q, 0.2), True, 0.2, 0.3)[0]  # noqa: E731
    else:
        q, k, v = (torch.randn(2, 2, 21, 32, device=device, dtype=torch.float16, requires_grad=True)
                   for _ in range(3))
        mask = random_mask(2, 21).to(device)
        eager = lambda: fa.attention(q, k, v, mask, False, 0.2, 0.3)  # noqa: E731
        op = lambda: fa.attention_fwd(q, k, v, mask, fa._draw_seed(q, 0.2), False, 0.2, 0.3)[0]  # noqa: E731
    results = []
    for fn in (eager, op):
        torch.manual_seed(11)
        out = fn()
        results.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph(triton_kernels, device):
    """The Triton entry points trace into one graph with their backward (aot_eager: the trace is what
    is tested, not inductor's code generation), dropout included."""
    fa = flash_attention
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 2, 12, 16, device=device, requires_grad=True) for _ in range(3))
    mask = random_mask(2, 12).to(device)
    pq, pk, pv, cu = packed_qkv([4, 8], 2, 16, device, torch.float32)
    pq, pk, pv = (t.detach().requires_grad_() for t in (pq, pk, pv))

    def fn(q, k, v, pq, pk, pv):
        padded = fa.attention(q, k, v, mask, False, 0.0, 0.25)
        packed = fa.varlen_attention(pq, pk, pv, cu, 8, True, 0.0, 0.25)
        dropped = fa.attention(q, k, v, None, False, 0.5, 0.25)
        return (padded * padded).sum() + (packed * packed).sum(), dropped

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    args = (q, k, v, pq, pk, pv)
    torch.manual_seed(3)
    got, dropped = compiled(*args)
    torch.manual_seed(3)
    want, dropped_eager = fn(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the seed comes from torch.randint inside the graph: the same generator state gives the same mask
    assert torch.equal(dropped, dropped_eager)
    assert not torch.equal(dropped, fa.attention(q, k, v, None, False, 0.0, 0.25))
    for a, b in zip(torch.autograd.grad(got, args), torch.autograd.grad(want, args)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- bad inputs

def test_bad_inputs(triton_kernels, device):
    q = torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        K.attention(*(torch.randn(1, 1, 4, 160, device=device) for _ in range(3)))
    with pytest.raises(ValueError, match="head_dim"):
        K.varlen_attention(*(torch.randn(4, 1, 192, device=device) for _ in range(3)),
                           torch.tensor([0, 4], dtype=torch.int32, device=device), 4)
    with pytest.raises(ValueError, match="same shape"):
        K.attention(q, torch.randn(1, 2, 8, 16, device=device), torch.randn(1, 2, 9, 16, device=device))
    with pytest.raises(ValueError, match="agree"):
        K.attention(q, torch.randn(1, 2, 8, 32, device=device), torch.randn(1, 2, 8, 32, device=device))
    with pytest.raises(ValueError, match="dtype"):
        K.attention(q, q.half(), q)
    with pytest.raises(ValueError, match="key_padding_mask"):
        K.attention(q, q, q, torch.ones(1, 9, dtype=torch.bool, device=device))
    if device == "cuda":
        with pytest.raises(ValueError, match="device"):
            K.attention(q, q.cpu(), q)
    packed = torch.randn(6, 2, 16, device=device)
    with pytest.raises(TypeError, match="int32"):
        K.varlen_attention(packed, packed, packed, torch.tensor([0, 6], device=device), 6)
    for cu, message in (([1, 6], "start at 0"), ([0, 4, 3, 6], "non-decreasing"), ([0, 5], "ends at")):
        with pytest.raises(ValueError, match=message):
            K.varlen_attention(packed, packed, packed, torch.tensor(cu, dtype=torch.int32, device=device), 6)
    with pytest.raises(ValueError, match="max_seqlen"):
        K.varlen_attention(packed, packed, packed, torch.tensor([0, 6], dtype=torch.int32, device=device), 4)


@interpreted
def test_bf16_refused_by_an_interpreter_that_multiplies_it_wrongly(triton_kernels, monkeypatch):
    """Triton's own interpreter multiplies bf16 bit patterns as integers: refused, not a silently wrong
    result (the suite's interpreter computes bf16 right, so the probe's verdict is forced here; that the
    probe notices the stock product is tests/test_interpreter_gpu_like.py's)."""
    from fastbert.kernels import _interpreter_probe
    monkeypatch.setattr(_interpreter_probe, "_verdict", False)
    q = torch.randn(1, 2, 8, 16).bfloat16()
    with pytest.raises(TypeError, match="interpreter"):
        K.attention(q, q, q)
    packed = torch.randn(6, 2, 16).bfloat16()
    with pytest.raises(TypeError, match="interpreter"):
        K.varlen_attention(packed, packed, packed, torch.tensor([0, 6], dtype=torch.int32), 6)


def test_config_override_for_gpu_sweeps(monkeypatch):
    """set_config_override (used by bench_attention --sweep), or FASTBERT_ATTENTION_CONFIG read once at
    the first launch, replaces the GPU launch parameters; None restores the defaults."""
    fa = flash_attention
    gpu = dict(interpreting=False)
    default = fa.fwd_config(64, torch.bfloat16, **gpu), fa.bwd_config(64, torch.bfloat16, **gpu)
    try:
        fa.set_config_override({"fwd": [64, 32, 8, 2], "dq": [32, 16, 4, 1]})
        assert fa.fwd_config(64, torch.bfloat16, **gpu) == dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
        assert fa.bwd_config(64, torch.bfloat16, **gpu) == dict(dkdv=default[1]["dkdv"], dq=(32, 16, 4, 1),
                                                                fused=default[1]["fused"])
        monkeypatch.setenv("FASTBERT_ATTENTION_CONFIG", '{"dkdv": [16, 32, 4, 1], "fused": []}')
        monkeypatch.setattr(fa, "_config_override_read", False)  # as in a fresh process
        assert fa.bwd_config(64, torch.bfloat16, **gpu) == dict(dkdv=(16, 32, 4, 1), dq=default[1]["dq"], fused=None)
    finally:
        fa.set_config_override(None)
    assert (fa.fwd_config(64, torch.bfloat16, **gpu), fa.bwd_config(64, torch.bfloat16, **gpu)) == default
    for bad in ({"dq": []}, {"fused": [32, 128]}, {"dkdv": [32, 128, 4]}, {"bwd": [32, 128, 4, 3]}):
        with pytest.raises(ValueError, match="attention config override"):
            fa.set_config_override(bad)
    assert fa._config_override is None


def test_float64_runs_the_reference(triton_kernels, device):
    q, k, v = (torch.randn(1, 2, 5, 16, dtype=torch.float64, device=device) for _ in range(3))
    torch.testing.assert_close(K.attention(q, k, v), reference.attention(q, k, v), rtol=0, atol=0)


# ------------------------------------------------------------------- ahead-of-time compilation

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _aot_jobs(dtype, head_dim, varlen, causal=True, dropout=True):
    """The launches _flash_fwd/_flash_bwd make for one dtype/head_dim (padded: with a key padding mask),
    as (kernel, signature, constexprs, options), with the GPU block configuration of fwd_config/bwd_config."""
    from fastbert.kernels import flash_attention as fa

    block_d = fa._block_d(head_dim)
    # The interpreter picks its own blocks; ask for the GPU ones.
    fwd, bwd = fa.fwd_config(block_d, dtype, interpreting=False), fa.bwd_config(block_d, dtype, interpreting=False)
    elem = "*" + _TRITON_DTYPE[dtype]
    pointers = {"Q": elem, "K": elem, "V": elem, "O": elem, "DO": elem, "DQ": elem, "DK": elem, "DV": elem,
                "LSE": "*fp32", "DELTA": "*fp32", "KPM": "*u8", "CU_SEQLENS": "*i32", "SEED": "*i64"}
    floats = {"qk_scale", "sm_scale", "keep_scale"}
    flag_values = dict(IS_VARLEN=varlen, HAS_MASK=not varlen, CAUSAL=causal, HAS_DROPOUT=dropout,
                       DOT_PRECISION=fa._PRECISION[dtype], HEAD_DIM=head_dim, BLOCK_D=block_d, MASK_BLOCK=512)

    def job(name, blocks, options):
        fn = getattr(fa, name)
        constexprs = {**{k: v for k, v in flag_values.items() if k in fn.arg_names}, **blocks}
        signature = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in pointers:
                signature[arg] = pointers[arg]
            else:
                signature[arg] = "fp32" if arg in floats else "i32"
        return [name, signature, constexprs, options]

    jobs = [job("_attn_fwd", dict(BLOCK_M=fwd["BLOCK_M"], BLOCK_N=fwd["BLOCK_N"]),
                dict(num_warps=fwd["num_warps"], num_stages=fwd["num_stages"]))]
    for name, key in (("_attn_bwd_dkdv", "dkdv"), ("_attn_bwd_dq", "dq"), ("_attn_bwd_fused", "fused")):
        if bwd[key] is None:
            continue
        bm, bn, warps, stages = bwd[key]
        jobs.append(job(name, dict(BLOCK_M=bm, BLOCK_N=bn), dict(num_warps=warps, num_stages=stages)))
    return jobs


def _compile(jobs, archs=(90, 80)):
    """Compile every (kernel, signature, constexprs, options) job for each arch (tests/aot.py)."""
    by_kernel = {}
    for kernel, signature, constexprs, options in jobs:
        by_kernel.setdefault(kernel, []).append((signature, constexprs, options))
    for kernel, configs in by_kernel.items():
        compile_in_subprocess("fastbert.kernels.flash_attention", kernel, configs, archs=archs, timeout=1800)


def test_aot_compile_largest_configs():
    """The configurations with the most shared memory (head_dim 128, bf16 with every flag on, and the
    fp32 dK/dV kernel at head_dim 128, the fp32 fused backward at its largest, 64), and the BERT training
    launch (bf16, head_dim 64, packed, dropout), compile for sm_90 and sm_80 within their shared-memory
    limits. The whole matrix (every dtype, head_dim and layout) is test_aot_compile_every_config (-m slow:
    minutes)."""
    fp32 = ([job for job in _aot_jobs(torch.float32, 128, varlen=False) if job[0] == "_attn_bwd_dkdv"]
            + [job for job in _aot_jobs(torch.float32, 64, varlen=False) if job[0] == "_attn_bwd_fused"])
    jobs = _aot_jobs(torch.bfloat16, 128, varlen=False) + fp32 + _aot_jobs(torch.bfloat16, 64, varlen=True, causal=False)
    assert {job[0] for job in jobs} == {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv", "_attn_bwd_fused"}
    _compile(jobs)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_aot_compile_every_config(dtype):
    jobs = []
    for head_dim in (16, 64, 96, 128):
        jobs += (_aot_jobs(dtype, head_dim, varlen=False) + _aot_jobs(dtype, head_dim, varlen=True, causal=False)
                 + _aot_jobs(dtype, head_dim, varlen=True, causal=False, dropout=False))
    _compile(jobs)


# ---------------------------------------------------------------------------------- GPU only

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype,head_dim,causal", [
    (torch.bfloat16, 64, False), (torch.bfloat16, 64, True), (torch.bfloat16, 128, False),
    (torch.bfloat16, 32, True), (torch.float16, 64, False), (torch.float32, 64, False), (torch.float32, 128, True),
], ids=str)
def test_gpu_attention_compiled(triton_kernels, device, dtype, head_dim, causal):
    if device != "cuda":
        pytest.skip("needs CUDA (FASTBERT_TEST_GPU=1)")
    batch, heads, seq = 4, 3, 511
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device) for _ in range(3))
    mask = random_mask(batch, seq).to(device)
    out, *_ = check_against_reference(
        lambda q, k, v: K.attention(q, k, v, mask, causal=causal),
        lambda q, k, v: torch_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), causal),
        lambda q, k, v: reference.attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), causal=causal),
        (q, k, v), dtype)
    assert torch.count_nonzero(out[-1]) == 0


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_gpu_varlen_compiled(triton_kernels, device, dtype):
    if device != "cuda":
        pytest.skip("needs CUDA (FASTBERT_TEST_GPU=1)")
    lengths, heads, dim = [1, 17, 128, 511, 513, 300], 12, 64
    q, k, v, cu = packed_qkv(lengths, heads, dim, device, torch.float32)
    baseline = packed_torch_attention(lengths)
    check_against_reference(
        lambda q, k, v: K.varlen_attention(q, k, v, cu, max(lengths)),
        baseline,
        lambda q, k, v: reference.varlen_attention(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), max(lengths)),
        (q, k, v), dtype)


@gpu
def test_gpu_dropout_and_determinism(triton_kernels, device):
    """Compiled dropout: the forward's mask bit for bit (one-hot values, 2 key blocks), then out, dQ,
    dK, dV against float64 with the documented mask over several blocks of every kernel, padded and
    packed (the model's training launch), bf16; and bitwise-repeatable gradients."""
    if device != "cuda":
        pytest.skip("needs CUDA (FASTBERT_TEST_GPU=1)")
    p = 0.1
    p_eff = flash_attention.effective_dropout_p(p)
    batch, heads, seq, dim = 2, 4, 128, 128
    q, k = (torch.randn(batch, heads, seq, dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    torch.manual_seed(4321)
    kept = K.attention(q, k, _one_hot_values(batch, heads, seq, dim, device).bfloat16(), dropout_p=p)
    documented = philox_keep_mask(_seed_of(4321, q, p), batch, heads, seq, seq, p)
    assert torch.equal(kept[..., :seq].cpu() != 0, documented)

    batch, heads, seq, dim = 2, 4, 300, 64
    q, k, v = (torch.randn(batch, heads, seq, dim, device=device) for _ in range(3))
    mask = random_mask(batch, seq, empty_row=False).to(device)
    _check_padded_dropout(q, k, v, mask, p, 4321, torch.bfloat16)

    lengths, heads = [1, 17, 128, 300, 257], 12
    q, k, v, cu = packed_qkv(lengths, heads, 64, device, torch.float32)
    width = max(lengths)
    keep = philox_keep_mask(_seed_of(99, q, p), len(lengths), heads, width, width, p, rng_seq_k=width)

    def packed_run(q, k, v):
        torch.manual_seed(99)
        return K.varlen_attention(q, k, v, cu, width, dropout_p=p, validate=False)
    baseline = packed_torch_attention(lengths, keep=keep, dropout_p=p_eff)
    check_against_reference(packed_run, baseline, baseline, (q, k, v), torch.bfloat16)

    qs, ks, vs = (torch.randn(8, 12, 512, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3))
    mask = random_mask(8, 512, empty_row=False).to(device)
    grad = torch.randn_like(qs)
    grads = []
    for _ in range(2):
        torch.manual_seed(5)
        grads.append(torch.autograd.grad(K.attention(qs, ks, vs, mask, dropout_p=p), (qs, ks, vs), grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("dtype,head_dim,seq,causal", [
    (torch.bfloat16, 64, 128, False), (torch.bfloat16, 64, 128, True), (torch.bfloat16, 32, 97, False),
    (torch.bfloat16, 128, 64, False), (torch.float16, 64, 77, True), (torch.float32, 64, 64, False),
], ids=str)
def test_gpu_fused_backward_compiled(triton_kernels, device, bwd_path, dtype, head_dim, seq, causal):
    """The one-launch backward compiled (its GPU launch: 8 warps, 32-row steps over 128 keys at head_dim
    <= 64; 64 keys at head_dim 128 and in fp32), and the split pair on the same inputs, against float64:
    padded with a batch row of no real key, then the packed BERT launch with dropout against the
    documented mask."""
    if device != "cuda":
        pytest.skip("needs CUDA (FASTBERT_TEST_GPU=1)")
    if bwd_path == "fused":
        fused = flash_attention.bwd_config(flash_attention._block_d(head_dim), dtype)["fused"]
        assert fused is not None and seq <= fused[1], "this case must take the fused kernel"
    batch, heads = 4, 3
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device) for _ in range(3))
    mask = random_mask(batch, seq).to(device)
    out, dq, dk, dv = check_against_reference(
        lambda q, k, v: K.attention(q, k, v, mask, causal=causal),
        lambda q, k, v: torch_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), causal),
        lambda q, k, v: reference.attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), causal=causal),
        (q, k, v), dtype)
    for t in (out, dq, dk, dv):
        assert torch.count_nonzero(t[-1]) == 0

    p, p_eff = 0.1, flash_attention.effective_dropout_p(0.1)
    lengths = [1, 17, seq, seq - 5, 40]
    q, k, v, cu = packed_qkv(lengths, heads, head_dim, device, torch.float32)
    keep = philox_keep_mask(_seed_of(7, q, p), len(lengths), heads, seq, seq, p, rng_seq_k=seq)

    def packed_run(q, k, v):
        torch.manual_seed(7)
        return K.varlen_attention(q, k, v, cu, seq, dropout_p=p, validate=False)
    baseline = packed_torch_attention(lengths, keep=keep, dropout_p=p_eff)
    check_against_reference(packed_run, baseline, baseline, (q, k, v), dtype)


def test_too_many_sequences_for_one_launch_is_a_clear_error(triton_kernels, device):
    """(sequences x heads) is the grid's y axis, which CUDA caps at 65535: refused before launching."""
    n = 65536  # one-token sequences, one head
    q = torch.randn(n, 1, 16, device=device)
    cu = torch.arange(n + 1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="65535"):
        K.varlen_attention(q, q, q, cu, 1)


# ------------------------------------------------------------------------ one fused QKV projection

@pytest.mark.parametrize("dropout_p, causal", [(0.0, False), (0.25, False), (0.0, True)])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_qkvpacked_gives_the_unpacked_bits(triton_kernels, device, layout, dropout_p, causal):
    """attention_qkvpacked / varlen_attention_qkvpacked take the model's fused projection (qkv with
    a 3 axis) and return the next matmul's layout; outputs and the gradient (one dqkv) equal the
    unpacked ops' on views of the same qkv bit for bit (same kernels, strided reads and writes), with
    dropout (same seed), causal masking, padding and a non-contiguous output gradient. Odd sizes: 2
    heads of 24, sequences 7 and 13."""
    lengths, heads, dim = [7, 13], 2, 24
    if layout == "padded":
        qkv = torch.randn(2, 13, 3, heads, dim, device=device)
        mask = torch.arange(13, device=device)[None] < torch.tensor(lengths, device=device)[:, None]

        def packed(x):
            return K.attention_qkvpacked(x, mask, dropout_p=dropout_p, causal=causal)  # (B, S, H, D)

        def unpacked(x):
            q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
            return K.attention(q, k, v, mask, dropout_p=dropout_p, causal=causal).transpose(1, 2)
    else:
        qkv = torch.randn(sum(lengths), 3, heads, dim, device=device)
        cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)

        def packed(x):
            return K.varlen_attention_qkvpacked(x, cu, 13, dropout_p=dropout_p, causal=causal)

        def unpacked(x):
            return K.varlen_attention(*x.unbind(1), cu, 13, dropout_p=dropout_p, causal=causal)

    grad = None
    results = []
    for fn in (packed, unpacked):
        x = qkv.detach().clone().requires_grad_()
        torch.manual_seed(11)
        out = fn(x)
        # a non-contiguous output gradient (a transposed buffer), as a later permute would hand back
        grad = torch.randn(out.shape[::-1], device=device).permute(*reversed(range(out.dim()))) if grad is None else grad
        out.backward(grad)
        results.append((out.detach(), x.grad))
    (out_p, g_p), (out_u, g_u) = results
    assert out_p.shape == out_u.shape and torch.equal(out_p, out_u)
    assert torch.equal(g_p, g_u) and g_p.abs().sum() > 0
    if layout == "padded":
        # the output is laid out for the next matmul: (B, S, H*D) is a view, no copy
        assert out_p.is_contiguous()
        assert out_p[1, 7:].abs().sum() > 0 and torch.isfinite(g_p).all()  # padded queries still attend


def test_qkvpacked_gradient_is_one_buffer(triton_kernels, device):
    """The point of the packed ops: autograd's path from the output to qkv has no unbind (whose
    backward stacks three gradients into a new tensor) and no permute / reshape copy."""
    qkv = torch.randn(9, 3, 2, 16, device=device, requires_grad=True)
    out = K.varlen_attention_qkvpacked(qkv, torch.tensor([0, 4, 9], dtype=torch.int32, device=device), 5)
    assert "QKVPacked" in type(out.grad_fn).__name__
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "AccumulateGrad"
    qkv5 = torch.randn(2, 5, 3, 2, 16, device=device, requires_grad=True)
    out5 = K.attention_qkvpacked(qkv5)
    assert "QKVPacked" in type(out5.grad_fn).__name__ and out5.is_contiguous()


def test_qkvpacked_reference_path_and_errors(reference_kernels):
    qkv = torch.randn(2, 6, 3, 2, 8, dtype=torch.float64)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    torch.testing.assert_close(K.attention_qkvpacked(qkv), K.attention(q, k, v).transpose(1, 2), rtol=0, atol=0)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    flat = torch.randn(12, 3, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(K.varlen_attention_qkvpacked(flat, cu, 7), K.varlen_attention(*flat.unbind(1), cu, 7),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="3, heads"):
        K.attention_qkvpacked(torch.randn(2, 6, 4, 2, 8))
    with pytest.raises(ValueError, match="total, 3"):
        K.varlen_attention_qkvpacked(torch.randn(12, 2, 2, 8), cu, 7)
    with pytest.raises(ValueError, match="ends at"):
        K.varlen_attention_qkvpacked(flat[:11], cu, 7)


def test_given_outputs_and_long_rows_are_checked(triton_kernels, device):
    """The launchers' given outputs must match q/k/v with a contiguous last dim; offsets within a
    sequence are int32 in the kernels, so a sequence whose rows pass 2**31 elements is refused (here
    faked with a huge token stride: an expanded view, nothing allocated)."""
    q = torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="given out"):
        flash_attention._flash_fwd(q, q, q, None, None, 0, None, False, 0.0, 0.25, out=torch.empty(1, 2, 8, 8))
    with pytest.raises(ValueError, match="given dq"):
        flash_attention._flash_bwd(q, q, q, q, q, torch.zeros(1, 2, 8), None, None, 0, None, False, 0.0, 0.25,
                                   grads=(q.transpose(-1, -2), q, q))
    qkv_view = torch.empty(2, 3, 12, 64, device=device)[:, 0]  # (T, H, D) at BERT-base's qkv token stride 2304
    rows = flash_attention._rows(qkv_view, True)
    flash_attention._check_row_offsets(932_000, rows)  # 2.147e9 - a little: allowed
    with pytest.raises(ValueError, match="2\\*\\*31"):
        flash_attention._check_row_offsets(933_000, rows)


@pytest.mark.parametrize("dtype", INTERPRETED_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_qkvpacked_matches_float64(triton_kernels, device, layout, dtype):
    """The qkv-packed entries on their own against float64, by the tolerance rule (fp32 and fp16,
    odd sizes, a padded and an empty row): the output and the gradients of q, k and v, which reach the
    kernels as one stacked qkv (the gradient comes back as one dqkv and is split by stack's backward)."""
    heads, dim = 2, 24
    if layout == "padded":
        mask = random_mask(3, 13).to(device)
        q, k, v = (torch.randn(3, heads, 13, dim, device=device) for _ in range(3))

        def run(q, k, v):  # (B, H, S, D) each -> (B, H, S, D)
            qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2)  # (B, S, 3, H, D)
            return K.attention_qkvpacked(qkv, mask).transpose(1, 2)

        baseline = lambda q, k, v: torch_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu())  # noqa: E731
        oracle = lambda q, k, v: reference.attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu())  # noqa: E731
    else:
        lengths = [5, 1, 17]
        q, k, v, cu = packed_qkv(lengths, heads, dim, device, torch.float32)

        def run(q, k, v):  # (T, H, D) each
            return K.varlen_attention_qkvpacked(torch.stack([q, k, v], dim=1), cu, 17)
        baseline = packed_torch_attention(lengths)
        oracle = lambda q, k, v: reference.varlen_attention(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), 17)  # noqa: E731
    check_against_reference(run, baseline, oracle, (q, k, v), dtype)


def test_head_dim_zero_with_the_default_scale():
    # Zero-size inputs work in every other dimension; head_dim 0 must not divide by zero while the
    # default softmax scale 1/sqrt(head_dim) is formed (any scale gives the same empty output).
    q = torch.randn(2, 3, 4, 0, requires_grad=True)
    out = K.attention(q, q, q, torch.ones(2, 4, dtype=torch.bool), causal=True)
    assert out.shape == (2, 3, 4, 0)
    out.sum().backward()
    assert reference.attention(q, q, q).shape == (2, 3, 4, 0)
    assert K.attention_qkvpacked(torch.randn(2, 4, 3, 3, 0)).shape == (2, 4, 3, 0)
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    assert K.varlen_attention(*torch.randn(3, 5, 2, 0), cu, 3).shape == (5, 2, 0)
    assert K.varlen_attention_qkvpacked(torch.randn(5, 3, 2, 0), cu, 3).shape == (5, 2, 0)
