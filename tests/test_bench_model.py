"""fastbert/bench.py's model-step competitors compute what they claim to (the timing itself lives in
benchmarks/, not in tests)."""
import json

import pytest
import torch

from fastbert import bench


def test_masked_head_floor_gives_the_transformers_model_loss_and_gradients():
    """The floor competitor (transformers' modules, MLM head on masked rows) computes transformers'
    own pretraining loss and gradients, only cheaper (dropout off, float64)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=1301, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForPreTraining(cfg).double().train()
    kw = bench.make_batches("pretrain", 1, 3, 17, 1301, 5, "cpu")[0][0]
    results = []
    for step in (model, bench.MaskedHeadPretraining(model)):
        model.zero_grad()
        loss = step(**kw).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_useful_flops_by_hand():
    """hidden 2, one layer, intermediate 4, vocab 3, one sequence of 2 tokens, 1 masked, 1 row:
    linear 6 (4·4 + 2·2·4) = 192 per token, attention 12·2·2² = 96, MLM head 6 (4 + 6) = 60, pooler 24;
    a token nothing reads keeps only its key and value projections in the last layer (6·2·4 = 48)
    and drops its share (1/2) of that layer's attention."""
    assert bench.training_flops(2, 1, 4, 3, [2], 1, 1) == 192 * 2 + 96 + 60 + 24
    assert bench.training_flops(2, 1, 4, 3, [2], 1, 1, read_rows=[1]) == 192 + 48 + 96 / 2 + 60 + 24
    assert bench.training_flops(2, 1, 4, 3, [2], 1, 1, read_rows=[2]) == 192 * 2 + 96 + 60 + 24
    # sequences of 3 and 1 tokens, one read token each (a classifier): attention 12·2·(3² + 1²) = 240
    # in a layer that reads all, 12·2·(3 + 1) = 96 in one with one query per sequence
    both = 192 * 4 + 240
    assert bench.training_flops(2, 2, 4, 3, [3, 1], 0, 2, read_rows=[1, 1]) == both + 192 * 2 + 48 * 2 + 96 + 48
    with pytest.raises(ValueError, match="does not fit"):
        bench.training_flops(2, 1, 4, 3, [3, 1], 0, 2, read_rows=[1, 2])


def test_summarize_runs_takes_the_median_of_per_run_ratios(tmp_path):
    """benchmarks/summarize_runs.py: each run's ratio is taken within that run, and the series median
    is the median of those ratios (a ratio of medians from different runs would compare unlike runs);
    a run differing in batch or malloc is its own series; a run without the baseline has no ratio."""
    import json

    from benchmarks import summarize_runs

    def write(name, date, malloc, timings, batch=16):
        rows = [dict(case="pretrain", size="cpu-small", batch=batch, seq=128, device="cpu", precision="fp32",
                     malloc=malloc, impl=impl, median_ms=ms) for impl, ms in timings.items()]
        if malloc is None:  # a file from before the malloc column: counts as glibc's default
            for r in rows:
                del r["malloc"]
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_step_cpu.json").write_text(json.dumps(
            {"name": "model_step_cpu", "machine": {"date": date, "git_sha": "abc"}, "context": {}, "rows": rows}))

    def both(fast, sdpa):
        return {"fastbert": fast, "transformers-sdpa": sdpa}

    # per-run ratios 4, 2, 3, 10 (d has no malloc column): median 3.5, mean 4.75; the ratio of the
    # median times would be 300 / 112.5 = 2.67. Dates order the runs d, b, a, c, ... — not the names.
    write("a", "2026-01-01T00:03Z", "glibc-default", both(100, 400))
    write("b", "2026-01-01T00:02Z", "glibc-default", both(150, 300))
    write("c", "2026-01-01T00:04Z", "glibc-default", both(100, 300))
    write("d", "2026-01-01T00:01Z", None, both(125, 1250))
    write("e", "2026-01-01T00:05Z", "tuned", both(100, 250))
    write("f", "2026-01-01T00:06Z", "glibc-default", {"fastbert": 90})  # baseline failed: listed, no ratio
    write("g", "2026-01-01T00:07Z", "glibc-default", both(200, 300), batch=32)
    runs = summarize_runs.load_runs(tmp_path)
    assert [r["file"] for r in runs] == [f"{x}/model_step_cpu.json" for x in "dbacefg"]  # by date
    assert summarize_runs.main([str(tmp_path)]) == 0
    text = (tmp_path / "summary.md").read_text()
    series = "| pretrain | cpu-small | {} | 128 | cpu | fp32 | {} |"
    assert series.format(16, "glibc-default") + " 4 | **3.50×** | 2.00–10.00× |" in text
    assert series.format(16, "tuned") + " 1 | **2.50×** | 2.50–2.50× |" in text
    assert series.format(32, "glibc-default") + " 1 | **1.50×** | 1.50–1.50× |" in text
    assert series.format(16, "glibc-default") + " 00:06 abc | 90 |  | — |" in text
    assert "nan" not in text
    assert (tmp_path / "summary.png").stat().st_size > 0


def test_encode_bench_keeps_the_other_rows_when_a_competitor_fails():
    """benchmarks/bench_encode.py: a competitor that raises (here fastbert-graphs, which needs CUDA)
    becomes an error row; the others are timed and compared as usual."""
    pytest.importorskip("transformers")
    from benchmarks import bench_encode
    config = dict(bench_encode.MINILM, vocab_size=1200, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=64)
    rows, used = bench_encode.run(batch=4, n_batches=2, repeats=1, impls=("fastbert", "fastbert-graphs",
                                  "transformers-sdpa"), device="cpu", weights="random", config=config,
                                  progress=False)
    by = {r["impl"]: r for r in rows}
    assert used == "random" and set(by) == {"fastbert", "fastbert-graphs", "transformers-sdpa"}
    assert "CUDA graphs need the model on a CUDA device" in by["fastbert-graphs"]["error"]
    assert "median_ms" not in by["fastbert-graphs"]
    assert by["fastbert"]["median_ms"] > 0 and by["transformers-sdpa"]["speedup_vs_sdpa"] == 1.0
    assert by["fastbert"]["cos_min_vs_sdpa"] > 0.9999  # same weights, same vectors


@pytest.mark.parametrize("op", ["add_layer_norm + bf16 copy", "add_layer_norm + dense bias"])
def test_fused_bench_copy_case_times_one_computation(triton_kernels, op):
    """benchmarks/bench_fused.py's 'add_layer_norm + bf16 copy' and '+ dense bias' cases: their four
    competitors (fused, unfused ops, eager, and what compile is given) compute the same outputs and
    gradients (the dense bias's included), so the timings compare equal work. CPU, interpreted
    kernels, 2 x 8 tokens."""
    from benchmarks import bench_fused
    case = next(c for c in bench_fused._make_cases(768, 3072, "cpu", 2, 8) if c["op"] == op)
    impls = {"fastbert": case["ours"], "eager": case["eager"], **dict(case["extra"])}
    results = {}
    for name, fn in impls.items():
        leaves = [t.detach().clone().requires_grad_() for t in case["inputs"]]
        y, y_low = fn(*leaves)
        assert (y.dtype, y_low.dtype) == (torch.float32, torch.bfloat16)
        g = torch.Generator().manual_seed(3)
        dy, dy_low = torch.randn(y.shape, generator=g), torch.randn(y.shape, generator=g).bfloat16()
        grads = torch.autograd.grad((y, y_low), leaves, (dy, dy_low))
        results[name] = (y.detach(), y_low.detach().float(), *grads)
    for name in ("eager", "fastbert-unfused"):
        for a, b in zip(results["fastbert"], results[name]):
            # bf16 copies (and the bf16 dx) may differ by one bf16 rounding: the interpreter truncates.
            # The dense-bias case's unfused competitor rounds x + bias to bf16 before the LayerNorm (as a
            # bf16 matmul with its bias would; the fused kernel adds in fp32): one bf16 rounding of
            # values up to ~8, hence a tolerance relative to each tensor's largest value there.
            scale = b.float().abs().max().item() if op.endswith("dense bias") and name != "eager" else 1.0
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * max(1.0, scale))
    assert not torch.equal(results["fastbert"][2], torch.zeros_like(results["fastbert"][2]))


def _pretraining_batch(seed, length, pad_row, pad_from, next_sentence_label):
    """A 3-row BertForPreTraining batch over a 97-token vocabulary: row pad_row padded from pad_from,
    about 30% of the real tokens labelled, -100 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 97, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[pad_row, pad_from:] = 0
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100) * mask + (mask - 1) * 100
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                next_sentence_label=torch.tensor(next_sentence_label))


def test_unfused_competitor_is_the_model_without_its_copy_removals(triton_kernels):
    """fastbert.bench's 'fastbert-unfused' competitor (copies_unfused) runs the model with autocast's
    casts and q/k/v views instead of the matmul copy and the qkv-packed attention: the same loss and
    gradients bit for bit (interpreted kernels, fp16 autocast standing in for bf16), a different autograd
    path, and everything restored afterwards."""
    import fastbert
    from fastbert import bench, modeling
    cfg = fastbert.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=48, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(cfg).train()
    batch = _pretraining_batch(1, 11, 1, 7, [0, 1, 0])
    originals = (modeling._matmul_copy_dtype, modeling.K.attention_qkvpacked, modeling.K.varlen_attention_qkvpacked)

    def step(unfused):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=torch.float16), (bench.copies_unfused() if unfused else nullcontext()):
            if unfused:
                assert modeling.K.varlen_attention_qkvpacked is not originals[2]
            loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    from contextlib import nullcontext
    (loss_f, grads_f), (loss_u, grads_u) = step(False), step(True)
    assert (modeling._matmul_copy_dtype, modeling.K.attention_qkvpacked,
            modeling.K.varlen_attention_qkvpacked) == originals
    assert torch.isfinite(loss_f) and torch.equal(loss_f, loss_u) and len(grads_f) == len(grads_u) > 20
    assert all(torch.equal(a, b) for a, b in zip(grads_f, grads_u))


def test_before_competitor_turns_off_every_unmeasured_change(triton_kernels, monkeypatch, add_layer_norm_calls):
    """fastbert.bench's 'fastbert-before' competitor (changes_off) runs forward and backward with the split
    attention backward (the fused kernel forbidden inside), the LayerNorm kernels' one-row launches and
    the copies unfused, computes what the model computes (fp32: equal up to summation order), and
    restores every default afterwards."""
    import fastbert
    from fastbert import bench
    from fastbert.kernels import flash_attention as fa, layer_norm as ln, linear_cross_entropy as lce
    cfg = fastbert.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=48)
    torch.manual_seed(0)
    model = fastbert.BertForPreTraining(cfg).eval()  # no dropout: both runs see the same function
    batch = _pretraining_batch(3, 13, 2, 9, [0, 1, 1])
    defaults = (fa.bwd_config(32, torch.float32), {k: ln.ln_config(32, k) for k in ln.LN_KINDS})
    assert defaults[0]["fused"] is not None and defaults[1]["add_fwd"].block_m > 1  # both changes are on here

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    chunk_bytes = lce.CHUNK_BYTES
    with bench.changes_off(32):
        assert lce.CHUNK_BYTES == 64 << 20 != chunk_bytes
        with monkeypatch.context() as m:
            m.setattr(fa, "_attn_bwd_fused", None)  # launching it would raise TypeError
            assert {k: ln.ln_config(32, k) for k in ln.LN_KINDS} == {k: ln.one_row_config(32, k) for k in ln.LN_KINDS}
            loss_b, grads_b = step()
    x_biases = [c.get("x_bias") for c in add_layer_norm_calls]
    assert len(x_biases) == 4 and all(b is None for b in x_biases)  # the dense biases stayed in the matmuls
    assert (fa.bwd_config(32, torch.float32), {k: ln.ln_config(32, k) for k in ln.LN_KINDS}) == defaults
    assert lce.CHUNK_BYTES == chunk_bytes
    add_layer_norm_calls.clear()
    loss_a, grads_a = step()
    x_biases = [c.get("x_bias") for c in add_layer_norm_calls]
    assert len(x_biases) == 4 and all(b is not None for b in x_biases)  # and join the kernels by default
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert len(grads_a) == len(grads_b) > 20
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ln_sweep_arguments_bytes_and_refusal_without_cuda(monkeypatch):
    """benchmarks/bench_ln_sweep.py without running a kernel: it refuses to run without CUDA (before any
    work), --quick narrows widths and cases, every launch it tries is one the override accepts and
    includes each kernel's default and one-row launch, and its byte formulas agree with bench_fused's
    (autocast + copy: 12 and 18 bytes per element; bf16: 3 s, and 4 s or 5 s with dropout)."""
    from benchmarks import bench_ln_sweep as S
    from fastbert.kernels import layer_norm as L

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        S.main(["--quick"])
    quick, full = S.parse_args(["--quick"]), S.parse_args([])
    assert (quick.widths, quick.cases) == ([768], list(S.QUICK_CASES))
    assert (full.widths, full.cases, full.rows) == ([768, 1024], [c[0] for c in S.CASES], 32768)
    with pytest.raises(SystemExit):
        S.parse_args(["--cases", "no such case"])
    try:
        for family in ("add", "gelu"):
            launches = S.launches(family, 768)
            labels = {(kind, name) for kind, label, _ in launches for name in label.split("+")}
            for kind in ("both", f"{family}_fwd", f"{family}_bwd"):
                assert {(kind, "default"), (kind, "one-row")} <= labels
            assert len({str(o) for _, _, o in launches}) == len(launches)  # no launch timed twice
            for _, _, override in launches:
                L.set_ln_config_override(override or None)
    finally:
        L.set_ln_config_override(None)
    bf16, fp32, t = torch.bfloat16, torch.float32, 10 * 3
    assert S.case_bytes("add", bf16, fp32, 0.1, bf16, 10, 3) == (12 * t, 18 * t)
    assert S.case_bytes("add", bf16, bf16, 0.0, None, 10, 3) == (3 * 2 * t, 4 * 2 * t)
    assert S.case_bytes("add", bf16, bf16, 0.1, None, 10, 3) == (3 * 2 * t, 5 * 2 * t)
    assert S.case_bytes("gelu", bf16, bf16, 0.0, None, 10, 3) == (2 * 2 * t, 3 * 2 * t)


def test_encode_bench_fused_ffn_competitor(triton_kernels, monkeypatch):
    """bench_encode's fastbert-ffn row (GPU only in a real run) on the interpreted kernels: the encoder
    takes K.feed_forward in every layer, inference writes no z, and its vectors are transformers'."""
    pytest.importorskip("transformers")
    from benchmarks import bench_encode
    from fastbert import modeling
    from fastbert.kernels import gemm_gelu as GG
    calls = []
    real = GG.dense_gelu
    monkeypatch.setattr(GG, "dense_gelu", lambda *a: calls.append(a[4]) or real(*a))
    config = dict(bench_encode.MINILM, vocab_size=1200, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64)
    rows, _ = bench_encode.run(batch=4, n_batches=2, repeats=1, impls=("fastbert-ffn", "transformers-sdpa"),
                               device="cpu", weights="random", config=config, progress=False)
    by = {r["impl"]: r for r in rows}
    assert by["fastbert-ffn"]["cos_min_vs_sdpa"] > 0.9999
    assert calls and not any(calls)  # the fused block ran, never storing z
    assert modeling.FUSED_FFN is False  # restored


def _gpu_check_commands():
    """(module, argv) of every `$PY -m benchmarks.X ...` line of benchmarks/gpu_check.sh, with the
    script's ${VAR:-default}s, $((arithmetic)) and $R filled in as a run with no variables set sees them."""
    import os
    import re
    import shlex
    text = open(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.sh")).read()
    text = text.replace("\\\n", " ")
    for _ in range(3):  # nested defaults (${LNSWEEP_ARGS:---quick} inside nothing; $(( ${T:-240} - 40 )))
        text = re.sub(r"\$\{\w+:-([^{}]*)\}", r"\1", text)
    text = re.sub(r"\$\(\(([\d\s+\-*]+)\)\)", lambda m: str(eval(m.group(1))), text)
    text = text.replace('"$R"', "/tmp/R").replace("$R", "/tmp/R")
    out = []
    for line in text.splitlines():
        m = re.search(r"\$PY -m (benchmarks\.\w+)(.*)$", line)
        if m and not line.lstrip().startswith("#"):
            out.append((m.group(1), shlex.split(m.group(2))))
    return out


def test_gpu_check_benchmark_commands_parse(monkeypatch):
    """Every benchmark command of the GPU script is accepted by its script's own argument parser, so a
    renamed or removed flag fails here, on the CPU, not minutes into a session's only GPU call."""
    import argparse
    import importlib
    commands = _gpu_check_commands()
    assert len(commands) >= 12 and {"benchmarks.pretrain_loop", "benchmarks.bench_ffn"} <= {m for m, _ in commands}

    class Parsed(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        ns = real(self, args, namespace)  # SystemExit(2) on an unknown flag or a bad value
        raise Parsed(ns)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for module, argv in commands:
        main = importlib.import_module(module).main
        with pytest.raises(Parsed):
            main(argv)


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--batch-size", "0"], ["--seq-len", "0"], ["--warmup", "-1"]])
def test_bench_refuses_sizes_below_one_before_running(bad, monkeypatch, capsys):
    """--steps 0 ended in a StatisticsError traceback, --batch-size 0 silently ran batches of 32 and
    --seq-len 0 printed every competitor's error and exited 0."""
    from fastbert import cli
    pytest.importorskip("transformers")
    ran = []
    monkeypatch.setattr(bench, "run", lambda *a, **k: ran.append(a) or [])
    assert cli.main(["bench", "--device", "cpu"] + bad) == 2
    assert "must be at least" in capsys.readouterr().err and ran == []


@pytest.mark.parametrize("device,message", [("foo", "expected cpu, cuda or cuda:N"),
                                            ("cuda:64", "GPU")])
def test_bench_unusable_device_is_a_usage_error(monkeypatch, capsys, device, message):
    """As the other commands: an unknown or absent --device is one line and exit 2 (it was a traceback)."""
    from fastbert import cli
    pytest.importorskip("transformers")
    ran = []
    monkeypatch.setattr(bench, "run", lambda *a, **k: ran.append(a) or [])
    assert cli.main(["bench", "--device", device, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and ran == []


@pytest.mark.parametrize("case", ["pretrain", "finetune"])
def test_every_cpu_competitor_runs_a_step(case):
    """`fastbert bench` on the CPU: every competitor of the default list gives a timing row, none an
    error row (the masked-head floor once raised on the return_dict= that step() passes every model)."""
    pytest.importorskip("transformers")
    comps = bench.competitor_list(case=case, device="cpu")
    rows = bench.run(case, "cpu-small", batch=2, seq=8, steps=1, warmup=1, vocab=1301, competitors=comps,
                     device="cpu", progress=False)
    assert sorted(r["impl"] for r in rows) == sorted(comps)
    errors = {r["impl"]: r["error"] for r in rows if "error" in r}
    assert not errors, errors


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_bench_treats_an_indexed_cuda_device_as_cuda(device, monkeypatch):
    """--device cuda:0 once reached run() as a string unequal to "cuda": steps timed without a
    synchronize (launch time only), fp32 instead of bf16, no peak memory, the card recorded as "cpu".
    Simulated without a GPU: moves to CUDA stay on the CPU, torch.cuda's bookkeeping is counted."""
    import collections
    pytest.importorskip("transformers")
    calls = collections.Counter()
    for name, value in [("synchronize", None), ("empty_cache", None), ("reset_peak_memory_stats", None),
                        ("memory_allocated", 0), ("max_memory_allocated", 0), ("get_device_name", "NVIDIA FAKE"),
                        ("set_device", None)]:
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, _v=value, **k: calls.update([_n]) or _v)
    to_tensor, to_module = torch.Tensor.to, torch.nn.Module.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self if a and str(a[0]).startswith("cuda")
                        else to_tensor(self, *a, **k))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self if a and str(a[0]).startswith("cuda")
                        else to_module(self, *a, **k))
    rows = bench.run("finetune", "cpu-small", batch=2, seq=16, steps=2, warmup=0, device=device, vocab=1301,
                     competitors=["fastbert", "transformers-sdpa"], progress=False)
    assert all(r["device"] == "NVIDIA FAKE" and r["precision"] == "bf16" and r["peak_mem_gib"] is not None
               for r in rows)
    assert calls["synchronize"] >= 2 * 2 * 2  # before and after each timed step of each competitor


def test_bench_json_that_cannot_be_written_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    from fastbert import cli
    pytest.importorskip("transformers")
    ran = []
    monkeypatch.setattr(bench, "run", lambda *a, **k: ran.append(a) or [])
    assert cli.main(["bench", "--device", "cpu", "--steps", "1", "--json", str(tmp_path)]) == 2
    assert "cannot write there" in capsys.readouterr().err and ran == []


def test_bench_json_names_its_machine_so_two_cpu_runs_compare(tmp_path, monkeypatch, capsys):
    """`fastbert bench --json` wrote a bare list whose rows say only "cpu": compare could never tell the
    CPU and refused. It now writes the harness's layout with the machine, CPU model included."""
    from benchmarks import compare

    from fastbert import cli
    pytest.importorskip("transformers")
    scale = [1.0]
    monkeypatch.setattr(bench, "run", lambda case, *a, **k: [
        {"case": case, "size": "cpu-small", "impl": impl, "batch": 16, "seq": 128, "precision": "fp32",
         "device": "cpu", "median_ms": ms * scale[0], "p20_ms": ms * scale[0], "p80_ms": ms * scale[0]}
        for impl, ms in (("fastbert", 10.0), ("transformers-sdpa", 20.0))])
    for folder, factor in (("old", 1.0), ("new", 1.5)):
        scale[0] = factor
        for case in ("pretrain", "finetune"):  # a file each, in one folder: two benchmarks, not one
            assert cli.main(["bench", "--device", "cpu", "--case", case, "--json",
                             str(tmp_path / folder / f"{case}.json")]) == 0
    saved = json.loads((tmp_path / "new" / "pretrain.json").read_text())
    assert saved["machine"]["cpu_model"] and saved["machine"]["cpu_count"] and len(saved["rows"]) == 2
    capsys.readouterr()
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")]) == 1
    assert "4 of 4 compared rows more than 10% slower" in capsys.readouterr().out


def test_useful_flops_by_hand_at_sizes_that_tell_the_terms_apart():
    """DESIGN.md's useful FLOPs, worked by hand at hidden D = 3, intermediate I = 5, vocab V = 7, two
    layers, sequences of 4 and 2 tokens, 3 masked rows, 2 rows (at D = 2, as above, D² = 2D and
    I = D², so a term written with the wrong power of D gave the same count).
    Per token and layer 6 (4 D² + 2 D I) = 6 (36 + 30) = 396; attention per layer 12 D Σ n² = 36 · 20 = 720;
    MLM head 6 (D² + D V) = 6 (9 + 21) = 180 per masked row; pooler 6 D² = 54 per row."""
    all_read = 396 * 6 * 2 + 720 * 2 + 180 * 3 + 54 * 2
    assert all_read == 6840
    assert bench.training_flops(3, 2, 5, 7, [4, 2], 3, 2) == all_read
    assert bench.training_flops(3, 2, 5, 7, [4, 2], 3, 2, read_rows=[4, 2]) == all_read
    # last layer with 2 of the 4 tokens and 1 of the 2 read: 3 read tokens at 396; 3 unread ones keep
    # their key and value projections, 6 · 2 D² = 108 each; attention 12 D Σ n_i r_i = 36 (4·2 + 2·1) = 360
    first_layer = 396 * 6 + 720
    last_layer = 396 * 3 + 108 * 3 + 360
    assert bench.training_flops(3, 2, 5, 7, [4, 2], 3, 2, read_rows=[2, 1]) == first_layer + last_layer + 540 + 108
    # a sequence nothing reads (0 rows) still has keys and values for nobody: only its K, V projections
    assert bench.training_flops(3, 1, 5, 7, [4, 2], 0, 2, read_rows=[0, 2]) == 108 * 4 + 396 * 2 + 36 * 2 * 2 + 108
    # the pooler and classifier count per row of the batch given, not per sequence
    assert bench.training_flops(3, 1, 5, 7, [2], 0, 5) - bench.training_flops(3, 1, 5, 7, [2], 0, 1) == 54 * 4
    for bad in ([2], [2, 1, 1], [5, 1], [-1, 2]):
        with pytest.raises(ValueError, match="does not fit the sequence lengths"):
            bench.training_flops(3, 1, 5, 7, [4, 2], 0, 2, read_rows=bad)


def test_make_batches_pretrain_rows():
    """Pretraining batches: every row full length, ids from 1000 up (clear of [PAD] and the special
    tokens), the second half of each row sentence B, about 15% of the tokens labelled with their own id,
    the masked count being the labelled count; the same seed gives the same batches."""
    batches = bench.make_batches("pretrain", 3, 16, 128, 1301, 7, "cpu")
    total = labelled = 0
    for kw, lengths, masked in batches:
        ids, labels = kw["input_ids"], kw["labels"]
        assert lengths == [128] * 16 and ids.shape == (16, 128) and bool((kw["attention_mask"] == 1).all())
        assert int(ids.min()) >= 1000 and int(ids.max()) < 1301
        assert kw["token_type_ids"][:, :64].eq(0).all() and kw["token_type_ids"][:, 64:].eq(1).all()
        is_label = labels != -100
        assert torch.equal(labels[is_label], ids[is_label]) and masked == int(is_label.sum())
        assert kw["next_sentence_label"].shape == (16,) and set(kw["next_sentence_label"].tolist()) <= {0, 1}
        total, labelled = total + ids.numel(), labelled + masked
    assert 0.13 < labelled / total < 0.17  # 6144 tokens drawn at 0.15: the standard deviation is 0.005
    again = bench.make_batches("pretrain", 3, 16, 128, 1301, 7, "cpu")
    assert all(torch.equal(a[0][k], b[0][k]) for a, b in zip(batches, again) for k in a[0])


def test_make_batches_finetune_rows_follow_the_real_lengths():
    """Fine-tuning batches: lengths drawn from sentiment_en's histogram, capped at seq, the batch padded
    to its longest row ([PAD] = 0, mask 0 there), one label in {0, 1} per row, nothing masked; the
    same seed gives the same lengths."""
    batches = bench.make_batches("finetune", 4, 8, 16, 1301, 3, "cpu")
    every = [n for _, lengths, _ in batches for n in lengths]
    assert max(every) == 16 and min(every) >= 1 and len(set(every)) > 1  # 80% of the texts are longer than 16
    for kw, lengths, masked in batches:
        ids, mask = kw["input_ids"], kw["attention_mask"]
        assert masked == 0 and ids.shape == (8, max(lengths)) and mask.sum(1).tolist() == lengths
        assert ids[mask == 0].eq(0).all() and int(ids[mask == 1].min()) >= 1000
        assert kw["token_type_ids"].eq(0).all() and set(kw["labels"].tolist()) <= {0, 1}
    assert [b[1] for b in bench.make_batches("finetune", 4, 8, 16, 1301, 3, "cpu")] == [b[1] for b in batches]


def test_competitor_list_by_device_case_and_compile():
    base = ["fastbert", "transformers-eager", "transformers-sdpa"]
    gpu = base + ["transformers-patched", "fastbert-graphs", "fastbert-unfused", "fastbert-before", "fastbert-ffn"]
    assert bench.competitor_list(case="pretrain", device="cpu") == base + ["transformers-sdpa-masked-head"]
    assert bench.competitor_list(case="finetune", device=torch.device("cpu")) == base
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):  # main passes resolve_device's cuda:N
        for case in ("pretrain", "finetune"):
            assert bench.competitor_list(case=case, device=device) == gpu
    assert bench.competitor_list(True, "finetune", "cpu") == base + ["transformers-sdpa-compile", "fastbert-compile"]


def _main_with_recorded_runs(monkeypatch, argv, rows_for=None):
    """cli.main(["bench", *argv]) with bench.run recording its arguments; rows_for(case) gives its rows."""
    from fastbert import cli
    pytest.importorskip("transformers")
    calls = []

    def fake_run(case, size, batch, seq, steps, warmup, competitors=None, device=None):
        calls.append(dict(case=case, size=size, batch=batch, seq=seq, steps=steps, warmup=warmup,
                          competitors=competitors, device=device))
        return rows_for(case) if rows_for else []
    monkeypatch.setattr(bench, "run", fake_run)
    return cli.main(["bench"] + argv), calls


def test_bench_defaults_on_the_cpu(monkeypatch):
    """`fastbert bench` on the CPU: both cases, cpu-small, batch 16 (pretrain) / 32 (finetune), length
    128, 5 timed steps after 2 untimed, the CPU competitors; --padded adds fastbert-padded to finetune
    only, --compile the compiled pair; the smallest sizes allowed are taken as given."""
    rc, calls = _main_with_recorded_runs(monkeypatch, ["--device", "cpu"])
    assert rc == 0
    assert calls == [dict(case="pretrain", size="cpu-small", batch=16, seq=128, steps=5, warmup=2,
                          competitors=bench.competitor_list(False, "pretrain", "cpu"), device=torch.device("cpu")),
                     dict(case="finetune", size="cpu-small", batch=32, seq=128, steps=5, warmup=2,
                          competitors=bench.competitor_list(False, "finetune", "cpu"), device=torch.device("cpu"))]
    rc, calls = _main_with_recorded_runs(monkeypatch, ["--device", "cpu", "--padded", "--compile"])
    assert rc == 0 and [c["competitors"] for c in calls] == [
        bench.competitor_list(True, "pretrain", "cpu"), bench.competitor_list(True, "finetune", "cpu") + ["fastbert-padded"]]
    rc, calls = _main_with_recorded_runs(monkeypatch, ["--device", "cpu", "--case", "finetune", "--size", "base",
                                                       "--batch-size", "1", "--seq-len", "1", "--steps", "1",
                                                       "--warmup", "0"])
    assert rc == 0 and [(c["case"], c["size"], c["batch"], c["seq"], c["steps"], c["warmup"]) for c in calls] == [
        ("finetune", "base", 1, 1, 1, 0)]


def test_bench_table_malloc_line_and_json_rows(tmp_path, monkeypatch, capsys):
    """What `fastbert bench` prints and saves: a table of case, impl, median_ms, real_tokens_per_s,
    speedup_vs_sdpa, peak_mem_gib (floats to 4 significant digits, a failed competitor's error in the
    median_ms column), the CPU's malloc line, and rows carrying the malloc label; the JSON's machine
    names no GPU on the CPU. The file does not exist while the run is going (nothing half-written)."""
    out = tmp_path / "sub" / "rows.json"

    def rows_for(case):
        assert not out.exists() and out.parent.is_dir()  # checked writable, made, and removed again
        return [{"case": case, "impl": "fastbert", "median_ms": 12.3456, "real_tokens_per_s": 1234.5678,
                 "speedup_vs_sdpa": 2.0, "peak_mem_gib": None},
                {"case": case, "impl": "transformers-eager", "error": "RuntimeError: boom"}]
    rc, calls = _main_with_recorded_runs(monkeypatch, ["--device", "cpu", "--case", "pretrain", "--json", str(out)],
                                         rows_for)
    assert rc == 0 and len(calls) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["case | impl | median_ms | real_tokens_per_s | speedup_vs_sdpa | peak_mem_gib",
                     "pretrain | fastbert | 12.35 | 1235 | 2 | None",
                     "pretrain | transformers-eager | RuntimeError: boom |  |  | ",
                     "malloc: glibc defaults for every competitor (--tuned-malloc: as the fastbert commands run)"]
    saved = json.loads(out.read_text())
    assert [r["malloc"] for r in saved["rows"]] == ["glibc-default", "glibc-default"]
    assert "gpu" not in saved["machine"] and saved["machine"]["torch"] == torch.__version__
