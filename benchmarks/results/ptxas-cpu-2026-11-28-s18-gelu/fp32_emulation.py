"""GELU and GELU' of kernels/gelu.py's exact form, evaluated step by step in numpy float32 with the
operations and FMAs of the compiled PTX (sm_90), against float64, beside PyTorch's own fp32 GELU on
this CPU. The hardware rsqrt and exp2 (rsqrt.approx.ftz, ex2.approx.ftz) are modelled as correctly
rounded results scaled by (1 + s * 2**-22), s = -1 or +1 for each of the two: their documented error
bounds are 2**-22.9 and about 2**-22.5; the table takes the worst of the four sign combinations.
Over [-12, 12] (2M points) and 1M samples of 3 N(0, 1).

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


def ours(z, s_rsqrt=0, s_exp2=0):
    q_coeffs = [f32(c * 0.3989422804014327) for c in G.TAIL_COEFFS]
    a = np.minimum(np.abs(z), f32(64))
    d = fma(a, np.full_like(a, f32(G.TAIL_P)), np.ones_like(a))
    r = f32(f32(1 / np.sqrt(d.astype(np.float64))) * (1 + s_rsqrt * 2.0**-22))
    t = f32(r * r)
    t = fma(t, fma(-d, t, np.ones_like(t)), t)
    q = np.full_like(t, q_coeffs[-1])
    for c in q_coeffs[-2::-1]:
        q = fma(t, q, np.full_like(t, c))
    q = f32(t * q)
    e = f32(f32(np.exp2(f32(f32(a * a) * f32(-0.7213475204444817)).astype(np.float64))) * (1 + s_exp2 * 2.0**-22))
    y = fma(-a, f32(e * q), np.maximum(z, f32(0)))  # forward: tail = e q rounded, then one FMA
    ae = f32(a * e)
    a_phi = f32(ae * f32(0.3989422804014327))
    # backward, as the PTX fuses it: z >= 0: fma(a e, 1/sqrt(2 pi), fma(-q, e, 1)); z < 0: fma(q, e, -a_phi)
    g = np.where(z >= 0, fma(ae, np.full_like(ae, f32(0.3989422804014327)), fma(-q, e, np.ones_like(q))),
                 fma(q, e, -a_phi))
    return y, g


z32 = np.concatenate([np.linspace(-12, 12, 2_000_001), np.random.default_rng(0).standard_normal(1_000_000) * 3]).astype(f32)
z = z32.astype(np.float64)
cdf, pdf = 0.5 * erfc(-z / np.sqrt(2)), np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)
tz = torch.from_numpy(z32).requires_grad_()
ty = torch.nn.functional.gelu(tz)
ty.sum().backward()
truth = {"gelu": z * cdf, "gelu'": cdf + z * pdf}
torch_err = {"gelu": np.abs(ty.detach().double().numpy() - truth["gelu"]),
             "gelu'": np.abs(tz.grad.double().numpy() - truth["gelu'"])}
signs = [(0, 0)] if exact else [(a, b) for a in (-1, 1) for b in (-1, 1)]
worst = {"gelu": (0.0, 0.0, None), "gelu'": (0.0, 0.0, None)}
for s_rsqrt, s_exp2 in signs:
    y, g = ours(z32, s_rsqrt, s_exp2)
    for name, ours_val in (("gelu", y), ("gelu'", g)):
        err = np.abs(ours_val - truth[name])
        if err.max() > worst[name][0]:
            worst[name] = (err.max(), z[err.argmax()], (s_rsqrt, s_exp2))
print("rsqrt / exp2:", "correctly rounded" if exact else "x (1 +- 2**-22), worst of the 4 sign combinations")
for name in ("gelu", "gelu'"):
    err, at, sign = worst[name]
    te = torch_err[name]
    print(f"{name:6s} max abs error: ours {err:.2e} (z = {at:+.3f}, signs {sign}), "
          f"PyTorch fp32 {te.max():.2e} (z = {z[te.argmax()]:+.3f})")
