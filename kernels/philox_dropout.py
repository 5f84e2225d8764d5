"""The dropout keep mask every fastbert kernel draws: 16 Philox bits per element, 8 elements per call.

One Philox4x32-10 call (tl.randint4x) gives 128 random bits. Spent on one element, as tl.rand(seed,
offset) does, that is ~55 SASS instructions per element (sm_90, most of them 32-bit multiplies):
enough to make a memory-bound LayerNorm compute-bound (add_layer_norm p=0.1 forward 0.133 ms vs
0.043 ms at p=0 for 32768 x 768 bf16, H200, benchmarks/results/gpu-h200-2026-11-27-run2). Cut into
eight 16-bit halves it serves 8 elements: the attention kernels did so first, the LayerNorm family
(add_layer_norm, embed_layer_norm) does the same through keep_tile.

The mapping, for a (rows, width) tensor: element (i, 8g + 2w + h) takes half h (0 = low 16 bits) of
word w of randint4x(seed, i * cdiv(width, 8) + g), and is kept when those 16 bits are >= drop_threshold
= round(p * 65536). A pure function of (seed, row, column, width): the mask does not depend on block
shapes or launch parameters, so a backward regenerates its forward's mask whatever its tiling.

Supports: any width (the last group of a row is partial: its unused bits are drawn and dropped); any
tile (BLOCK_M, BLOCK_N) with BLOCK_N 8 times a power of 2 (tl.arange(0, BLOCK_N // 8)) and a column
start that is a multiple of 8.
Caution: p is quantised to 16 bits (effective_dropout_p; 0.1 -> 0.100006, always within 2**-17 of p)
and kept values are scaled by 1 / (1 - effective_dropout_p(p)), so the expectation is exact; p close
to 1 never drops everything (at most 65535 / 65536). The counter is 32 bits: the pattern of one seed
repeats after 2**32 groups of 8 elements (2**35 elements of a LayerNorm call).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["keep_tile", "keep_row", "drop_threshold", "effective_dropout_p", "dropout_args"]


@triton.jit
def keep_tile(seed, rows, col_start, width, drop_threshold, BLOCK_N: tl.constexpr):
    """Keep mask (len(rows), BLOCK_N) of columns col_start + [0, BLOCK_N) (col_start a multiple of 8) of
    the given rows of a (rows, width) tensor; rows int32 or int64 (the counter wraps to int32)."""
    BLOCK_M: tl.constexpr = rows.shape[0]
    groups = col_start // 8 + tl.arange(0, BLOCK_N // 8)
    counter = (rows[:, None] * ((width + 7) // 8) + groups[None, :]).to(tl.int32)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    # join + reshape lays the four words of one call side by side: column 4g + w holds word w
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N // 2))
    bits = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (BLOCK_M, BLOCK_N))
    return bits.to(tl.int32) >= drop_threshold


@triton.jit
def keep_row(seed, row, width, drop_threshold, BLOCK_N: tl.constexpr):
    """keep_tile of one row (a scalar index), columns [0, BLOCK_N): a (BLOCK_N,) mask."""
    rows = tl.zeros((1,), dtype=tl.int64) + row  # row may be a Python int (the interpreter's loops)
    return tl.reshape(keep_tile(seed, rows, 0, width, drop_threshold, BLOCK_N), (BLOCK_N,))


def drop_threshold(p: float) -> int:
    return min(65535, round(p * 65536.0))


def effective_dropout_p(p: float) -> float:
    """The drop probability the kernels apply for dropout_p = p: round(p * 65536) / 65536 (16 random
    bits per element); kept values are scaled by 1 / (1 - that), so the output's expectation is exact."""
    return drop_threshold(p) / 65536.0 if p > 0.0 else 0.0


_DROPOUT_ARGS: dict = {0.0: (0, 1.0)}


def dropout_args(p: float):
    """(drop_threshold, keep_scale) kernel arguments for dropout_p = p."""
    args = _DROPOUT_ARGS.get(p)
    if args is None:
        threshold = drop_threshold(p)
        args = _DROPOUT_ARGS[p] = (threshold, 65536.0 / (65536 - threshold))
    return args
