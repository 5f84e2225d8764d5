"""Fit the normal-tail approximation the exact-GELU kernels use (kernels/gelu.py, `_normal_tail`).

    Q(a) = P(N(0, 1) > a) ~= phi(a) * sum_k c_k t**k,  t = 1 / (1 + p a),  k = 1 .. DEGREE

(the form of Abramowitz & Stegun 26.2.17; the coefficients are fitted here, not taken from the book).
GELU(z) = z Phi(z) and GELU'(z) = Phi(z) + z phi(z) need Phi, and Phi(z) is 1 - Q(z) or Q(-z).
The error measured is |approx - Q(a)| * max(1, a), since GELU multiplies Phi by z: a bound on it is a
bound on GELU's absolute error. For each p on a grid, the coefficients minimising the maximum error
over a dense grid of a in [0, 14] come from Lawson's iteration (weighted least squares whose weights
grow where the error is largest); the best p wins. Everything in float64 (torch).

    python -m benchmarks.fit_normal_tail [--degree 6]

prints p, the coefficients and the maximum error, also on an independent grid out to a = 40.
`tests/test_gelu.py` checks that the constants in kernels/gelu.py still meet the bound it states.
"""
from __future__ import annotations

import argparse
import math

import torch

A_MAX = 14.0  # Q(14) ~ 8e-45: nothing beyond matters in fp32


def tail(a: torch.Tensor) -> torch.Tensor:
    """Q(a) in float64."""
    return 0.5 * torch.special.erfc(a / math.sqrt(2.0))


def approx_tail(a: torch.Tensor, p: float, coeffs) -> torch.Tensor:
    """phi(a) * sum_k c_k t**k, t = 1 / (1 + p a), in float64."""
    t = 1.0 / (1.0 + p * a)
    poly = torch.zeros_like(a)
    for c in reversed(coeffs):
        poly = (poly + c) * t
    return torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi) * poly


def max_error(p: float, coeffs, a_max: float = 40.0, points: int = 400_001) -> float:
    """max over a in [0, a_max] of |approx - Q(a)| * max(1, a)."""
    a = torch.linspace(0.0, a_max, points, dtype=torch.float64)
    return ((approx_tail(a, p, coeffs) - tail(a)).abs() * a.clamp_min(1.0)).max().item()


def fit(p: float, degree: int, iterations: int, points: int = 56_001):
    """(coefficients, max error on the fitting grid) for one p: Lawson's minimax iteration."""
    a = torch.linspace(0.0, A_MAX, points, dtype=torch.float64)
    weight = a.clamp_min(1.0)
    t = 1.0 / (1.0 + p * a)
    phi = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    basis = torch.stack([weight * phi * t ** k for k in range(1, degree + 1)], 1)  # (points, degree)
    target = weight * tail(a)
    lawson = torch.full_like(a, 1.0 / points)
    best = (None, math.inf)
    for _ in range(iterations):
        s = lawson.sqrt()
        coeffs = torch.linalg.lstsq(basis * s[:, None], (target * s)[:, None]).solution[:, 0]
        residual = (basis @ coeffs - target).abs()
        if residual.max().item() < best[1]:
            best = (coeffs.tolist(), residual.max().item())
        lawson = lawson * residual
        lawson = lawson / lawson.sum()
    return best


def search(degree: int):
    """(p, coefficients, error): a coarse scan of p, then a fine one around the best."""
    coarse = [0.15 + 0.01 * i for i in range(46)]
    p = min(coarse, key=lambda q: fit(q, degree, 60, points=14_001)[1])
    fine = [p - 0.01 + 0.0005 * i for i in range(41)]
    p = min(fine, key=lambda q: fit(q, degree, 200, points=14_001)[1])
    coeffs, err = fit(p, degree, 1500)
    return p, coeffs, err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--degree", type=int, default=6, help="number of coefficients c_1 .. c_DEGREE")
    args = ap.parse_args(argv)
    p, coeffs, err = search(args.degree)
    print(f"p = {p:.4f}")
    print(f"coefficients = ({', '.join(repr(c) for c in coeffs)})")
    print(f"max |approx - Q(a)| * max(1, a): {err:.3e} on the fitting grid, "
          f"{max_error(round(p, 4), coeffs):.3e} on [0, 40] with p rounded to 4 digits")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
