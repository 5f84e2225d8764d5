"""The dropout keep mask of kernels/philox_dropout.py, recomputed independently in numpy (Philox4x32-10
written out from its definition), so a test can compare the Triton kernels' masks bit for bit."""
from __future__ import annotations

import numpy as np
import torch


def philox_keep_mask(seed, batch, heads, seq_q, seq_k, p, rng_seq_k=None):
    """The keep mask (B, H, Sq, Sk) bool that kernels/philox_dropout.py documents, as the attention kernels
    key it: Philox4x32-10 keyed by seed + b * H + h (the LayerNorm family's (rows, n) mask is batch =
    heads = 1, seq_q = rows, seq_k = n); counter i * ceil(rng_seq_k / 8) + j // 8 (rng_seq_k: the
    kernels' seq_k, max_seqlen when packed); key j takes 16-bit half (j % 2) of word (j % 8) // 2 and is
    kept when it is >= round(p * 65536)."""
    halves = philox_halves(seed, batch, heads, seq_q, seq_k, rng_seq_k)
    return torch.from_numpy(halves >= min(65535, round(p * 65536)))


def philox_halves(seed, batch, heads, seq_q, seq_k, rng_seq_k=None):
    """The 16 random bits (B, H, Sq, Sk) uint64 of each element that philox_keep_mask compares with the
    threshold; the counter wraps at 2**32 as the kernels' int32 counter does."""
    m32 = np.uint64(0xFFFFFFFF)
    groups = ((seq_k if rng_seq_k is None else rng_seq_k) + 7) // 8
    counter = (np.arange(seq_q, dtype=np.uint64)[:, None] * np.uint64(groups)
               + np.arange((seq_k + 7) // 8, dtype=np.uint64)[None, :]) & m32
    key = (np.uint64(seed) + np.arange(batch * heads, dtype=np.uint64)).reshape(batch, heads, 1, 1)
    k0, k1 = key & m32, key >> np.uint64(32)
    c0 = np.broadcast_to(counter, (batch, heads) + counter.shape)
    c1 = c2 = c3 = np.zeros_like(c0)
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p1 = b * c2, a * c0  # 32 x 32 -> 64-bit products: (high word, low word)
        c0, c2, c1, c3 = (p0 >> np.uint64(32)) ^ c1 ^ k0, (p1 >> np.uint64(32)) ^ c3 ^ k1, p0 & m32, p1 & m32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    words = np.stack([c0, c1, c2, c3], -1)
    halves = np.stack([words & np.uint64(0xFFFF), words >> np.uint64(16)], -1).reshape(batch, heads, seq_q, -1)
    return halves[..., :seq_k]
