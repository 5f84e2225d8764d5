"""GELU and GELU' of kernels/gelu.py's exact form, evaluated step by step in numpy float32 as the
compiled kernel does (FMAs rounded once), with the hardware rsqrt and exp2 perturbed by up to
+-2**-22 relative (uniform; their documented bounds are 2**-22.9 and ~2**-22.5), against float64,
beside PyTorch's own fp32 GELU on this CPU. Over [-12, 12] (2M points) and 1M samples of 3 N(0, 1).

    python fp32_emulation.py [--exact]   (--exact: correctly rounded rsqrt / exp2, what the interpreter does)
"""
import sys

import numpy as np
import torch
from scipy.special import erfc

from fastbert.kernels import gelu as G

f32 = np.float32
exact = "--exact" in sys.argv


def fma(a, b, c):
    return f32(a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64))


def hw(x, seed):
    if exact:
        return x
    return f32(x * (1 + np.random.default_rng(seed).uniform(-1, 1, x.shape) * 2.0**-22))


def ours(z):
    q_coeffs = [f32(c * 0.3989422804014327) for c in G.TAIL_COEFFS]
    a = np.minimum(np.abs(z), f32(64))
    d = fma(a, np.full_like(a, f32(G.TAIL_P)), np.ones_like(a))
    r = hw(f32(1 / np.sqrt(d.astype(np.float64))), 1)
    t = f32(r * r)
    t = fma(t, fma(-d, t, np.ones_like(t)), t)
    q = np.full_like(t, q_coeffs[-1])
    for c in q_coeffs[-2::-1]:
        q = fma(t, q, np.full_like(t, c))
    q = f32(t * q)
    e = hw(f32(np.exp2(f32(f32(a * a) * f32(-0.7213475204444817)).astype(np.float64))), 2)
    tail = f32(e * q)
    y = fma(-a, tail, np.maximum(z, f32(0)))
    a_phi = f32(f32(a * e) * f32(0.3989422804014327))
    g = np.where(z >= 0, f32(f32(f32(1) - tail) + a_phi), f32(tail - a_phi))
    return y, g


z32 = np.concatenate([np.linspace(-12, 12, 2_000_001), np.random.default_rng(0).standard_normal(1_000_000) * 3]).astype(f32)
z = z32.astype(np.float64)
cdf, pdf = 0.5 * erfc(-z / np.sqrt(2)), np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
y, g = ours(z32)
tz = torch.from_numpy(z32).requires_grad_()
ty = torch.nn.functional.gelu(tz)
ty.sum().backward()
print("rsqrt / exp2:", "correctly rounded" if exact else "perturbed by up to 2**-22")
for name, a, b, true in (("gelu", y, ty.detach().double().numpy(), z * cdf), ("gelu'", g, tz.grad.double().numpy(), cdf + z * pdf)):
    ea, eb = np.abs(a - true), np.abs(b - true)
    print(f"{name:6s} max abs error: ours {ea.max():.2e} (z = {z[ea.argmax()]:+.3f}), PyTorch fp32 {eb.max():.2e} (z = {z[eb.argmax()]:+.3f})")
