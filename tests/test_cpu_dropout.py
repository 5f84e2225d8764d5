"""Dropout with 16-bit draws on the CPU (kernels/cpu_dropout.py): rate, scale, gradient, seeding."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastbert.kernels import cpu_dropout, reference
from tolerance import assert_close_to_reference


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1e-3])
def test_drop_rate_and_scale(p):
    x = torch.rand(1000, 1001) + 0.5  # no zeros of its own; 1001 columns: n is not a multiple of 4
    torch.manual_seed(0)
    out = cpu_dropout.dropout(x, p)
    dropped = out == 0
    p_eff = round(p * 65536) / 65536
    sigma = math.sqrt(p_eff * (1 - p_eff) / x.numel())
    assert abs(dropped.float().mean().item() - p_eff) < 5 * sigma
    # every one of the four 16-bit lanes of a 64-bit draw carries the same rate (no biased lane)
    for lane in range(4):
        rate = dropped.reshape(-1)[lane::4].float().mean().item()
        assert abs(rate - p_eff) < 5 * math.sqrt(4) * sigma, lane
    kept = ~dropped
    assert torch.equal(out[kept], x[kept] * (1 / (1 - p_eff)))  # exact expectation-preserving scale


@pytest.mark.parametrize("shape", [(1,), (2,), (4,), (3, 37), (2, 3, 5, 7)])
def test_gradient_uses_the_forward_mask(shape):
    x = (torch.rand(shape, dtype=torch.float64) + 0.5).requires_grad_()
    out = cpu_dropout.dropout(x, 0.3)
    g = torch.randn(shape, dtype=torch.float64)
    out.backward(g)
    scale = 65536 / (65536 - round(0.3 * 65536))
    kept = out.detach() != 0  # x has no zeros of its own
    assert torch.equal(out.detach(), torch.where(kept, x.detach() * scale, 0.0))
    assert torch.equal(x.grad, torch.where(kept, g * scale, 0.0))


def test_seeded_repeatable_and_edge_probabilities():
    x = torch.randn(50, 30)
    torch.manual_seed(7)
    a = cpu_dropout.dropout(x, 0.2)
    torch.manual_seed(7)
    b = cpu_dropout.dropout(x, 0.2)
    assert torch.equal(a, b) and not torch.equal(a, cpu_dropout.dropout(x, 0.2))
    assert cpu_dropout.dropout(x, 0.0) is x
    assert torch.count_nonzero(cpu_dropout.dropout(x, 1.0)) == 0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            cpu_dropout.dropout(x, bad)


def test_reference_ops_use_it_on_the_cpu_and_match_the_same_mask():
    """The reference's add_layer_norm with dropout equals LayerNorm(mask * scale * x + residual) for the
    mask the same seed draws, and attention's probabilities are dropped with it too."""
    x, r = torch.randn(4, 9, 37, dtype=torch.float64), torch.randn(4, 9, 37, dtype=torch.float64)
    w, b = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64)
    torch.manual_seed(11)
    got = reference.add_layer_norm(x, r, w, b, 1e-5, 0.25)
    torch.manual_seed(11)
    keep, scale = cpu_dropout.keep_mask(x.shape, 0.25)
    want = F.layer_norm(x * keep * scale + r, (37,), w, b, 1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)

    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    torch.manual_seed(4)
    out = reference.attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(4)
    keep, scale = cpu_dropout.keep_mask((2, 3, 5, 5), 0.4)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(out, (probs * keep * scale) @ v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [1 / 65536, 0.1, 0.5, 65535 / 65536])
def test_every_lane_keeps_exactly_65536_minus_threshold_of_its_values(monkeypatch, p):
    """Draws whose four lanes each run through all 65536 values: every lane keeps exactly
    65536 - round(p * 65536) of them (a uniform lane is then kept with exactly 1 - p_eff)."""
    u = torch.arange(65536, dtype=torch.int32)
    signed = torch.where(u >= 32768, u - 65536, u).to(torch.int16)  # the int16 view of unsigned u
    words = signed[:, None].expand(65536, 4).contiguous().view(torch.int64).view(-1)  # lanes (u, u, u, u)
    monkeypatch.setattr(cpu_dropout, "_draws", lambda n, device: words[:n])
    keep, scale = cpu_dropout.keep_mask((65536, 4), p)
    t = round(p * 65536)
    assert keep.sum(0).tolist() == [65536 - t] * 4
    assert scale == 65536 / (65536 - t)


def test_the_four_lanes_of_a_draw_are_independent():
    """At p = 0.5, two lanes of one 64-bit draw both drop a quarter of the time (a lane reused twice
    would make it a half)."""
    x = torch.ones(4 * 200_000)
    torch.manual_seed(1)
    dropped = (cpu_dropout.dropout(x, 0.5) == 0).view(-1, 4)
    sigma = math.sqrt(0.25 * 0.75 / dropped.shape[0])
    for a, b in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)):
        both = (dropped[:, a] & dropped[:, b]).float().mean().item()
        assert abs(both - 0.25) < 5 * sigma, (a, b, both)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_attention_with_dropout_computes_in_fp32(dtype):
    """CPU attention with dropout on bf16/fp16 inputs (as under autocast): scores, softmax and the
    dropped probabilities in fp32 (the reference's promise), then one rounding to the input dtype —
    within 2x of the float64 answer rounded once to that dtype, the best any result in it can be."""
    q, k, v = (torch.randn(2, 3, 17, 8).to(dtype) for _ in range(3))
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = reference.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    keep, scale = cpu_dropout.keep_mask((2, 3, 17, 17), 0.3)
    q64, k64, v64 = q.double(), k.double(), v.double()
    probs = torch.softmax(q64 @ k64.transpose(-1, -2) / math.sqrt(8), dim=-1)
    want = (probs * keep * scale) @ v64
    assert out.dtype == dtype
    assert_close_to_reference(out, want.to(dtype), want, k=2, name=str(dtype))
