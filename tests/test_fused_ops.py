"""Cross-cutting checks of the fused element-wise / LayerNorm / embedding kernels.

- torch.library.opcheck on every custom op (forward and backward ops), in interpreter mode: schema,
  fake (meta) implementation, autograd registration, and torch.compile's AOT dispatch.
- Ahead-of-time compilation for sm_90 and sm_80 (no GPU needed) of the kernel configurations the
  launchers pick, bf16 included: the interpreter accepts programs that a GPU compiler rejects.
  The default run compiles, per kernel, the BERT-size block in every dtype and flag combination
  plus the smallest and largest blocks; `-m slow` compiles every block size the launchers can pick.
  The add / GELU + LayerNorm kernels compile with the tile (BLOCK_M), num_warps and pipelining
  stages layer_norm.ln_config picks on a GPU, and with the one-row launch of before the tiling (the
  sweep's baseline), at widths 16, 768 / 1024, 4096 and 8192.
"""
import itertools

import pytest
import torch

from aot import compile_in_subprocess
from fastbert.kernels import embedding as E
from fastbert.kernels import gelu as G
from fastbert.kernels import layer_norm as L
from interpreter_bounds import interpreted

# ----------------------------------------------------------------------------------------- opcheck



def _opcheck(op, args):
    torch.library.opcheck(op, args)


@interpreted
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opcheck_bias_gelu(triton_kernels, approximate):
    x, b = torch.randn(3, 40, requires_grad=True), torch.randn(40, requires_grad=True)
    _opcheck(torch.ops.fastbert.bias_gelu.default, (x, b, approximate))
    _opcheck(torch.ops.fastbert.bias_gelu_backward.default, (torch.randn(3, 40), x.detach(), b.detach(), approximate))


@interpreted
@pytest.mark.parametrize("x_bias", [False, True], ids=["", "x_bias"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_add_layer_norm(triton_kernels, p, x_bias):
    x, r = torch.randn(3, 40, requires_grad=True), torch.randn(3, 40, requires_grad=True)
    w, b = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)
    xb = (torch.randn(40, requires_grad=True),) if x_bias else ()  # absent: the op's default (None)
    seed = L.draw_seed("cpu") if p else None
    _opcheck(torch.ops.fastbert.add_layer_norm.default, (x, r, w, b, 1e-5, p, seed, *xb))
    _, mean, rstd = torch.ops.fastbert.add_layer_norm(x, r, w, b, 1e-5, p, seed, *xb)
    _opcheck(torch.ops.fastbert.add_layer_norm_backward.default,
             (torch.randn(3, 40), x.detach(), r.detach(), w.detach(), mean.detach(), rstd.detach(), p, seed,
              *(t.detach() for t in xb)))


@interpreted
def test_opcheck_gelu_layer_norm(triton_kernels):
    x, c = torch.randn(3, 40, requires_grad=True), torch.randn(40, requires_grad=True)
    w, b = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)
    _opcheck(torch.ops.fastbert.gelu_layer_norm.default, (x, c, w, b, 1e-5, "tanh"))
    _, mean, rstd = torch.ops.fastbert.gelu_layer_norm(x, c, w, b, 1e-5, "tanh")
    _opcheck(torch.ops.fastbert.gelu_layer_norm_backward.default,
             (torch.randn(3, 40), x.detach(), c.detach(), w.detach(), mean.detach(), rstd.detach(), "tanh"))


@interpreted
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_embed_layer_norm(triton_kernels, p):
    ids = torch.randint(0, 11, (2, 5))
    tt = torch.randint(0, 2, (2, 5))
    pos = torch.arange(5).expand(2, 5)
    tables = [torch.randn(11, 24, requires_grad=True), torch.randn(7, 24, requires_grad=True),
              torch.randn(2, 24, requires_grad=True), torch.randn(24, requires_grad=True),
              torch.randn(24, requires_grad=True)]
    seed = L.draw_seed("cpu") if p else None
    _opcheck(torch.ops.fastbert.embed_layer_norm.default, (ids, tt, pos, *tables, 1e-5, p, seed))
    _, mean, rstd = torch.ops.fastbert.embed_layer_norm(ids, tt, pos, *tables, 1e-5, p, seed)
    _opcheck(torch.ops.fastbert.embed_layer_norm_backward.default,
             (torch.randn(2, 5, 24), ids, tt, pos, *[t.detach() for t in tables[:4]], mean.detach(), rstd.detach(),
              p, seed))


@interpreted
def test_compile_fullgraph(triton_kernels):
    # torch.compile traces through the custom ops (fake kernels) without graph breaks, dropout's
    # seed draw included. (The modules' entry points: fastbert.kernels' lazy importlib lookup is
    # itself a graph break, a separate matter.)
    x, r = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32)
    w, b = torch.ones(32, requires_grad=True), torch.zeros(32, requires_grad=True)

    def f(x, r, w, b):
        h = L.gelu_layer_norm(G.bias_gelu(x, b, "none"), b, w, b, 1e-5, "tanh")
        h = L.add_layer_norm(h, r, w, b, 1e-5, 0.0, x_bias=w)  # the dense bias fused
        return L.add_layer_norm(h, r, w, b, 1e-5, 0.0).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, r, w, b)
    out.backward()
    torch.testing.assert_close(out, f(x, r, w, b))


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    y = fn(*leaves)
    y.backward(torch.linspace(-1.0, 1.0, y.numel(), device=y.device).reshape(y.shape))
    return [y.detach()] + [t.grad for t in leaves if t.is_floating_point()]


def test_eager_path_equals_custom_ops(triton_kernels, device):
    # Eager calls take an autograd.Function over the same launchers (no custom-op dispatch cost);
    # the custom ops (what torch.compile traces) must give bit-identical outputs and gradients.
    n = 40
    x, r, c = torch.randn(3, n, device=device), torch.randn(3, n, device=device), torch.randn(n, device=device)
    w, b = torch.randn(n, device=device), torch.randn(n, device=device)
    ids = torch.randint(0, 11, (2, 5), device=device)
    tt = torch.randint(0, 2, (2, 5), device=device)
    pos = torch.arange(5, device=device).expand(2, 5)
    tables = [torch.randn(11, n, device=device), torch.randn(7, n, device=device), torch.randn(2, n, device=device)]
    ops = torch.ops.fastbert
    cases = [
        ((x, c), lambda x, c: G.bias_gelu(x, c, "tanh"), lambda x, c: ops.bias_gelu(x, c, "tanh")),
        ((x, r.half(), w, b), lambda *a: L.add_layer_norm(*a, 1e-5, 0.0),
         lambda *a: ops.add_layer_norm(*a, 1e-5, 0.0, None)[0]),
        ((x, r, w, b, c), lambda *a: L.add_layer_norm(*a[:4], 1e-5, 0.0, x_bias=a[4]),
         lambda *a: ops.add_layer_norm(*a[:4], 1e-5, 0.0, None, a[4])[0]),
        ((x, c, w, b), lambda *a: L.gelu_layer_norm(*a, 1e-5, "none"),
         lambda *a: ops.gelu_layer_norm(*a, 1e-5, "none")[0]),
        ((ids, tt, pos, *tables, w, b), lambda *a: E.embed_layer_norm(*a, 1e-5, 0.0),
         lambda *a: ops.embed_layer_norm(*a, 1e-5, 0.0, None)[0]),
    ]
    for inputs, eager, op in cases:
        for a, o in zip(_grads(eager, inputs), _grads(op, inputs)):
            assert a.dtype == o.dtype and torch.equal(a, o)
    # dropout: the same seed draw after the same manual_seed, hence the same mask, on both paths
    torch.manual_seed(5)
    got = _grads(lambda *a: L.add_layer_norm(*a, 1e-5, 0.3), (x, r, w, b))
    torch.manual_seed(5)
    want = _grads(lambda *a: ops.add_layer_norm(*a, 1e-5, 0.3, L.draw_seed(device))[0], (x, r, w, b))
    assert all(torch.equal(a, o) for a, o in zip(got, want))
    torch.manual_seed(5)
    got = _grads(lambda *a: L.add_layer_norm(*a[:4], 1e-5, 0.3, low_dtype=torch.float16, x_bias=a[4])[0],
                 (x, r, w, b, c))
    torch.manual_seed(5)
    want = _grads(lambda *a: ops.add_layer_norm(*a[:4], 1e-5, 0.3, L.draw_seed(device), a[4])[0], (x, r, w, b, c))
    assert len(got) == 6 and all(torch.equal(a, o) for a, o in zip(got, want))


# ---------------------------------------------------------------------------- ahead-of-time compile

_PT = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ALL_ROW_BLOCKS = [1 << k for k in range(4, 14)]  # row_block(n) for n = 1 .. MAX_WIDTH
BERT_BLOCKS = [L.row_block(768), L.row_block(1024), L.row_block(4096)]


def _row_blocks(exhaustive):
    return ALL_ROW_BLOCKS if exhaustive else [16, L.row_block(768), L.MAX_WIDTH]


def _variants(flags, exhaustive):
    """bf16 in every flag combination and fp16 / fp32 with every flag on at the BERT block; bf16
    with every flag on at the smallest and largest blocks."""
    out = []
    for block in _row_blocks(exhaustive):
        for dtype in DTYPES:
            for values in itertools.product((False, True), repeat=len(flags)):
                bf16, on = dtype == torch.bfloat16, all(values)
                if exhaustive or (block in BERT_BLOCKS and (bf16 or on)) or (bf16 and on):
                    out.append((block, dtype, dict(zip(flags, values))))
    return out


def _bias_gelu_fwd(exhaustive):
    ns = [1 << k for k in range(0, 11)] if exhaustive else [37, 768]  # 3072 uses 768's blocks
    return [({"X": _PT[d], "BIAS": _PT[d], "Y": _PT[d], "rows": "i32", "n": "i32", "APPROX_TANH": "constexpr",
              "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
             {"APPROX_TANH": a, "BLOCK_M": G.fwd_config(n)[0], "BLOCK_N": G.fwd_config(n)[1]})
            for n in ns for d in DTYPES for a in (False, True)
            if exhaustive or (n == 768 and (d == torch.bfloat16 or a)) or (d == torch.bfloat16 and a)]


def _bias_gelu_bwd(exhaustive):
    ns = [1 << k for k in range(0, 11)] if exhaustive else [37, 768]  # 3072 uses 768's blocks
    configs = []
    for n in ns:
        block_m, block_n, _ = G.bwd_config(n)
        for d in DTYPES:
            for a in (False, True):
                if not (exhaustive or (n == 768 and (d == torch.bfloat16 or a)) or (d == torch.bfloat16 and a)):
                    continue
                configs.append(({"X": _PT[d], "BIAS": _PT[d], "DY": _PT[d], "DX": _PT[d], "DBIAS_PART": "*fp32",
                                 "rows": "i32", "n": "i32", "rows_per_program": "i32", "APPROX_TANH": "constexpr",
                                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                                {"APPROX_TANH": a, "BLOCK_M": block_m, "BLOCK_N": block_n}))
    return configs


LN_WIDTHS = [16, 768, 1024, 4096, L.MAX_WIDTH]  # 768 and 1024 share a block (and so a configuration)


def _ln_launches(kind, exhaustive):
    """(BLOCK_N, constexprs and compile options of one launch, whether it is a default) of an add / GELU
    + LayerNorm kernel: ln_config's GPU choice per width (True), the one-row launch of before the
    tiling (False); exhaustive: also the candidates benchmarks/bench_ln_sweep.py tries (None)."""
    widths = ALL_ROW_BLOCKS if exhaustive else LN_WIDTHS
    out = {}
    launches = [(n, config, default) for n in widths
                for config, default in ((L.ln_config(n, kind, interpreting=False), True),
                                        (L.one_row_config(n, kind), False))]
    if exhaustive:
        from benchmarks import bench_ln_sweep
        candidates = bench_ln_sweep.BWD_CANDIDATES if kind.endswith("_bwd") else bench_ln_sweep.FWD_CANDIDATES
        launches += [(768, L.LnConfig(*c), None) for c in candidates]  # None: bf16, every flag on only
    for n, config, default in launches:
        blk = L.row_block(n)
        if not (exhaustive or default or blk == L.row_block(768)):
            continue
        const = {"BLOCK_M": config.block_m, "BLOCK_N": blk}
        if kind.endswith("_bwd"):
            const["NUM_STAGES"] = config.num_stages
        key = (blk, tuple(const.items()), config.num_warps)
        out.setdefault(key, (blk, const, {"num_warps": config.num_warps}, default))
    return list(out.values())


def _ln_variants(kind, flags, exhaustive):
    """bf16 in every flag combination and fp16 / fp32 with every flag on at the BERT block's default
    launch; bf16 with every flag on for every other launch (exhaustive: every dtype and flag, except
    for the sweep's candidates)."""
    out = []
    for blk, const, options, default in _ln_launches(kind, exhaustive):
        for dtype in DTYPES:
            for values in itertools.product((False, True), repeat=len(flags)):
                bf16, on = dtype == torch.bfloat16, all(values)
                bert = default and blk == L.row_block(768)
                if (exhaustive and default is not None) or (bert and (bf16 or on)) or (bf16 and on):
                    out.append((dtype, {**dict(zip(flags, values)), **const}, options))
    return out


def _add_ln_fwd(exhaustive):
    # Y_LOW / DY_LOW: the matmul copy is bf16 beside an fp32 stream in the model, whatever X's dtype here;
    # XB: the dense bias, an fp32 parameter in the model
    return [({"X": _PT[d], "R": _PT[d], "W": _PT[d], "B": _PT[d], "Y": _PT[d], "Y_LOW": "*bf16", "MEAN": "*fp32",
              "RSTD": "*fp32", "SEED": "*i64", "XB": "*fp32", "rows": "i32", "n": "i32", "eps": "fp32", "drop_threshold": "i32",
              "scale": "fp32", "HAS_DROPOUT": "constexpr", "HAS_X_BIAS": "constexpr", "STORE_LOW": "constexpr",
              "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}, const, options)
            for d, const, options in _ln_variants("add_fwd", ("HAS_DROPOUT", "STORE_LOW", "HAS_X_BIAS"), exhaustive)]


def _add_ln_bwd(exhaustive):
    return [({"X": _PT[d], "R": _PT[d], "W": _PT[d], "DY": _PT[d], "DY_LOW": "*bf16", "DR": _PT[d], "DX": _PT[d],
              "DW_PART": "*fp32", "DB_PART": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "SEED": "*i64", "XB": "*fp32",
              "DXB_PART": "*fp32", "rows": "i32", "n": "i32", "rows_per_program": "i32", "drop_threshold": "i32", "scale": "fp32",
              "HAS_DROPOUT": "constexpr", "HAS_DY_LOW": "constexpr", "STORE_DX": "constexpr", "HAS_X_BIAS": "constexpr",
              "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "NUM_STAGES": "constexpr"}, const,
             options)
            for d, const, options in _ln_variants("add_bwd", ("HAS_DROPOUT", "HAS_DY_LOW", "STORE_DX", "HAS_X_BIAS"),
                                                  exhaustive)]


def _gelu_ln_fwd(exhaustive):
    return [({"X": _PT[d], "BIAS": _PT[d], "W": _PT[d], "B": _PT[d], "Y": _PT[d], "MEAN": "*fp32", "RSTD": "*fp32",
              "rows": "i32", "n": "i32", "eps": "fp32", "APPROX_TANH": "constexpr", "BLOCK_M": "constexpr",
              "BLOCK_N": "constexpr"}, const, options)
            for d, const, options in _ln_variants("gelu_fwd", ("APPROX_TANH",), exhaustive)]


def _gelu_ln_bwd(exhaustive):
    return [({"X": _PT[d], "BIAS": _PT[d], "W": _PT[d], "DY": _PT[d], "DX": _PT[d], "PART": "*fp32", "MEAN": "*fp32",
              "RSTD": "*fp32", "rows": "i32", "n": "i32", "rows_per_program": "i32", "part_stride": "i32",
              "APPROX_TANH": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "NUM_STAGES": "constexpr"},
             const, options)
            for d, const, options in _ln_variants("gelu_bwd", ("APPROX_TANH",), exhaustive)]


_IDS = {"IDS": "*i64", "TT": "*i64", "POS": "*i64"}
_STRIDES = {k: "i32" for k in ("s_ids_b", "s_ids_s", "s_tt_b", "s_tt_s", "s_pos_b", "s_pos_s")}


def _embed_fwd(exhaustive):
    return [({**_IDS, "WORD": _PT[d], "POSW": _PT[d], "TYPEW": _PT[d], "W": _PT[d], "B": _PT[d], "Y": _PT[d],
              "MEAN": "*fp32", "RSTD": "*fp32", "SEED": "*i64", "seq": "i32", **_STRIDES, "n": "i32", "eps": "fp32",
              "drop_threshold": "i32", "scale": "fp32", "HAS_DROPOUT": "constexpr", "BLOCK_N": "constexpr"},
             {**f, "BLOCK_N": blk})
            for blk, d, f in _variants(("HAS_DROPOUT",), exhaustive)]


def _embed_bwd(exhaustive):
    return [({**_IDS, "WORD": _PT[d], "POSW": _PT[d], "TYPEW": _PT[d], "W": _PT[d], "DY": _PT[d], "DH": "*fp32",
              "DW_PART": "*fp32", "DB_PART": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "SEED": "*i64",
              "tokens": "i32", "seq": "i32", **_STRIDES, "n": "i32", "rows_per_program": "i32", "drop_threshold": "i32",
              "scale": "fp32", "HAS_DROPOUT": "constexpr", "BLOCK_N": "constexpr"}, {**f, "BLOCK_N": blk})
            for blk, d, f in _variants(("HAS_DROPOUT",), exhaustive)]


def _segment_blocks(exhaustive):
    return [1 << k for k in range(0, 9)] if exhaustive else [E.SEGMENT_BLOCK_N]


def _segment_chunks(exhaustive):
    return [({"SORTED": "*i64", "PERM": "*i64", "DH": "*fp32", "OUT": _PT[d], "CARRY": "*fp32", "tokens": "i32",
              "n": "i32", "CHUNK": "constexpr", "BLOCK_N": "constexpr"}, {"CHUNK": 64, "BLOCK_N": blk})
            for blk in _segment_blocks(exhaustive) for d in DTYPES]


def _segment_carries(exhaustive):
    return [({"SORTED": "*i64", "CARRY": "*fp32", "OUT": _PT[d], "tokens": "i32", "n": "i32", "CHUNK": "constexpr",
              "BLOCK_N": "constexpr"}, {"CHUNK": 64, "BLOCK_N": blk})
            for blk in _segment_blocks(exhaustive) for d in DTYPES]


def _dropout_mask(exhaustive):
    return [({"SEED": "*i64", "MASK": "*i8", "n": "i32", "drop_threshold": "i32", "BLOCK_N": "constexpr"}, {"BLOCK_N": blk})
            for blk in _row_blocks(exhaustive)]


KERNELS = [
    ("fastbert.kernels.gelu", "_bias_gelu_fwd", _bias_gelu_fwd),
    ("fastbert.kernels.gelu", "_bias_gelu_bwd", _bias_gelu_bwd),
    ("fastbert.kernels.layer_norm", "_add_ln_fwd", _add_ln_fwd),
    ("fastbert.kernels.layer_norm", "_add_ln_bwd", _add_ln_bwd),
    ("fastbert.kernels.layer_norm", "_gelu_ln_fwd", _gelu_ln_fwd),
    ("fastbert.kernels.layer_norm", "_gelu_ln_bwd", _gelu_ln_bwd),
    ("fastbert.kernels.layer_norm", "_dropout_mask_kernel", _dropout_mask),
    ("fastbert.kernels.embedding", "_embed_ln_fwd", _embed_fwd),
    ("fastbert.kernels.embedding", "_embed_ln_bwd", _embed_bwd),
    ("fastbert.kernels.embedding", "_segment_sum_chunks", _segment_chunks),
    ("fastbert.kernels.embedding", "_segment_sum_carries", _segment_carries),
]


@pytest.mark.parametrize("module,kernel,configs", KERNELS, ids=[k[1] for k in KERNELS])
def test_aot_compile(module, kernel, configs):
    compile_in_subprocess(module, kernel, configs(False))


@pytest.mark.slow
@pytest.mark.parametrize("module,kernel,configs", KERNELS, ids=[k[1] for k in KERNELS])
def test_aot_compile_every_block(module, kernel, configs):
    compile_in_subprocess(module, kernel, configs(True), archs=(90,))
