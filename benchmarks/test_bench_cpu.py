"""CPU checks of the benchmark tools, and a pytest-benchmark view of the CPU training step.

Part of the default test command (testpaths = tests, benchmarks); alone: python -m pytest -q
benchmarks/test_bench_cpu.py. The training-step timings are benchmarks (pytest benchmarks/
--benchmark-enable); the rest are tests of benchmarks/compare.py, bench_encode.py, pretrain_race.py,
pretrain_loop.py, launch_census.py and bench_read_rows.py.
"""
import json

import pytest
import torch

from benchmarks import compare
from fastbert import bench

# ------------------------------------------------------------------------------ compare.py


def _write(folder, name, rows, gpu="NVIDIA H200", date="2026-11-26T03:00:00Z"):
    folder.mkdir(parents=True, exist_ok=True)
    machine = {"date": date, "torch": "2.11.0", "cpu": "x86_64", "cpu_count": 16}
    if gpu:
        machine["gpu"] = gpu
    (folder / f"{name}.json").write_text(json.dumps({"name": name, "machine": machine, "context": {},
                                                      "rows": rows}))


def _rows(scale=None, drop=()):
    """Kernel rows as the harness writes them; scale maps impl -> factor on the timings."""
    scale = scale or {}
    rows = []
    for impl in ("fastbert", "eager"):
        for p in ("fwd", "fwd+bwd"):
            if (impl, p) in drop:
                continue
            ms = {"fwd": 0.10, "fwd+bwd": 0.30}[p] * (2 if impl == "eager" else 1) * scale.get(impl, 1.0)
            rows.append({"op": "bias_gelu", "size": "base", "shape": "32768x3072", "dtype": "bf16", "impl": impl,
                         "pass": p, "median_ms": ms, "p20_ms": ms * 0.99, "p80_ms": ms * 1.01,
                         "gbps": 1000 / ms, "speedup_vs_eager": 1.0})
    return rows


def test_compare_flags_a_slower_row_and_exits_nonzero(tmp_path, capsys):
    _write(tmp_path / "old", "bench_fused", _rows())
    _write(tmp_path / "new", "bench_fused", _rows(scale={"fastbert": 1.2}))  # 20% slower, beyond p20-p80
    rc = compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")])
    out = capsys.readouterr().out
    assert rc == 1
    flagged = [line for line in out.splitlines() if "SLOWER" in line]
    assert len(flagged) == 2 and all("impl=fastbert" in line and "1.200" in line for line in flagged)
    assert "2 of 4 compared rows more than 10% slower" in out
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old"), "--warn-only"]) == 0
    # a looser threshold lets the same 20% pass
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old"), "--threshold", "0.25"]) == 0


def test_compare_takes_a_throughput_row_as_time_per_token(tmp_path, capsys):
    """pretrain_loop rows report tokens/s only: 20% fewer tokens/s is 25% more time per token."""
    def loop_rows(tps_on):
        return [{"bench": "pretrain_loop", "config": "base", "batch": 128, "seq": 128, "device": "NVIDIA H200",
                 "impl": impl, "n_steps": n, "real_tokens_per_s": tps, "vs_bare": tps / 4e5}
                for impl, n, tps in (("bare-step", 37, 4e5), ("loop-prefetch-on", 30 + (tps_on < 3e5), tps_on))]
    _write(tmp_path / "old", "pretrain_loop", loop_rows(3.6e5))
    _write(tmp_path / "new", "pretrain_loop", loop_rows(2.88e5))
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")]) == 1
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if "SLOWER" in line]
    assert len(flagged) == 1 and "impl=loop-prefetch-on" in flagged[0] and "1.250" in flagged[0]
    assert "ms per 1k real tokens" in flagged[0] and "1 of 2 compared rows" in out


def test_compare_passes_within_threshold_and_marks_faster(tmp_path, capsys):
    _write(tmp_path / "old", "bench_fused", _rows())
    _write(tmp_path / "new", "bench_fused", _rows(scale={"fastbert": 1.05, "eager": 0.8}))
    rc = compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "SLOWER" not in out and out.count("faster") == 2
    assert "0 of 4 compared rows" in out


def test_compare_refuses_another_card(tmp_path, capsys):
    _write(tmp_path / "old", "bench_fused", _rows(), gpu="NVIDIA H100 80GB HBM3")
    _write(tmp_path / "new", "bench_fused", _rows())
    rc = compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "refusing to compare across cards" in err and "H100" in err and "H200" in err


def test_compare_refuses_unknown_card(tmp_path, capsys):
    _write(tmp_path / "old", "bench_fused", _rows())
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "bench_fused.json").write_text(json.dumps(_rows()))  # bare rows: no machine, no device
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")]) == 2
    assert "cannot tell which card" in capsys.readouterr().err
    # the folder's env.txt (what gpu_check.sh writes) names the card
    (tmp_path / "new" / "env.txt").write_text("name, memory.total [MiB]\nNVIDIA H200, 143771 MiB, 580.1\n")
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")]) == 0


def test_compare_reports_missing_and_failed_rows(tmp_path, capsys):
    _write(tmp_path / "old", "bench_fused", _rows())
    new = _rows(drop={("eager", "fwd")}) + [{"op": "bias_gelu", "impl": "ERROR", "error": "RuntimeError: boom"}]
    _write(tmp_path / "new", "bench_fused", new)
    rc = compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")])
    out = capsys.readouterr().out
    assert rc == 1  # a benchmark that now fails is a regression
    assert "baseline rows missing from the new run (1):" in out and "impl=eager pass=fwd" in out
    assert "rows that failed in the new run (1):" in out
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old"), "--warn-only"]) == 0
    _write(tmp_path / "new", "bench_fused", _rows(drop={("eager", "fwd")}))
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")]) == 0  # missing alone: said
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old"), "--fail-on-missing"]) == 1
    # a row whose own check said its result was wrong (bench_ffn's ok) fails, and still joins its baseline
    old_ok = [dict(r, ok=True) for r in _rows()]
    _write(tmp_path / "old", "bench_fused", old_ok)
    _write(tmp_path / "new", "bench_fused", old_ok[:3] + [dict(old_ok[3], ok=False)])
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")]) == 1
    out = capsys.readouterr().out
    assert "rows that failed in the new run (1):" in out and "3 of 3 compared rows" not in out


def test_compare_fail_on_missing_counts_a_whole_benchmark_not_rerun(tmp_path, capsys):
    _write(tmp_path / "old", "bench_fused", _rows())
    _write(tmp_path / "old", "bench_attention", _rows())
    _write(tmp_path / "new", "bench_fused", _rows())
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")]) == 0
    assert "baseline benchmarks not in the new run (1):" in capsys.readouterr().out
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old"), "--fail-on-missing"]) == 1


def test_compare_auto_baseline_takes_each_row_from_the_newest_run_that_has_it(tmp_path, capsys):
    """A newer run of some of the rows (here the fastbert ones) must not hide the older run of the
    others: the eager rows, 50% slower now, are compared against the older run and flagged."""
    root = tmp_path / "results"
    _write(root / "h200-full", "bench_fused", _rows(), date="2026-11-20T00:00:00Z")
    _write(root / "h200-part", "bench_fused", [r for r in _rows() if r["impl"] == "fastbert"],
           date="2026-11-22T00:00:00Z")
    _write(root / "new", "bench_fused", _rows(scale={"eager": 1.5}), date="2026-11-25T00:00:00Z")
    assert compare.main([str(root / "new"), "--results-root", str(root)]) == 1
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert "h200-part" in first and "+ rows of" in first and "h200-full" in first, first
    assert "2 of 4 compared rows more than 10% slower" in out and "new rows without a baseline" not in out
    # a row that failed in the newest run does not stand in for the older run's good one
    _write(root / "h200-part", "bench_fused", [r for r in _rows() if r["impl"] == "fastbert"]
           + [dict(r, ok=False) for r in _rows() if r["impl"] == "eager"], date="2026-11-22T00:00:00Z")
    assert compare.main([str(root / "new"), "--results-root", str(root), "--json", str(tmp_path / "r.json")]) == 1
    assert "2 of 4 compared rows more than 10% slower" in capsys.readouterr().out
    assert "h200-full" in json.loads((tmp_path / "r.json").read_text())["files"][0][1]


@pytest.mark.parametrize("extra, message", [(["--threshold", "nan"], "--threshold must be a number >= 0"),
                                            (["--threshold", "-0.1"], "--threshold must be a number >= 0"),
                                            (["--json", "."], "is a folder")])
def test_compare_bad_options_are_usage_errors(tmp_path, capsys, extra, message):
    _write(tmp_path / "old", "bench_fused", _rows())
    _write(tmp_path / "new", "bench_fused", _rows(scale={"fastbert": 1.5}))
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")] + extra)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_compare_auto_baseline_takes_the_newest_of_the_same_card(tmp_path, capsys):
    root = tmp_path / "results"
    _write(root / "gpu-h200-old", "bench_fused", _rows(scale={"fastbert": 0.5}), date="2026-11-01T00:00:00Z")
    _write(root / "gpu-h200-new", "bench_fused", _rows(), date="2026-11-20T00:00:00Z")
    _write(root / "gpu-h100-newest", "bench_fused", _rows(scale={"fastbert": 0.5}), gpu="NVIDIA H100 80GB HBM3",
           date="2026-11-25T00:00:00Z")
    _write(root / "gpu_latest", "bench_fused", _rows(), date="2026-11-26T00:00:00Z")  # the new run itself
    rc = compare.main([str(root / "gpu_latest"), "--results-root", str(root)])
    out = capsys.readouterr().out
    assert rc == 0, out  # against gpu-h200-new (equal), not the faster older H200 run nor the H100 run
    assert "gpu-h200-new" in out.splitlines()[0]
    # no committed results of this card at all
    _write(tmp_path / "a100", "bench_fused", _rows(), gpu="NVIDIA A100-SXM4-80GB")
    assert compare.main([str(tmp_path / "a100"), "--results-root", str(root)]) == 2
    assert "no committed results" in capsys.readouterr().err


def _step_rows(scale=1.0, **extra):
    """Model-step rows as bench_model writes them; `extra` adds fields (e.g. the later malloc column)."""
    return [{"case": "pretrain", "size": "large", "batch": 32, "seq": 512, "impl": impl, "device": "NVIDIA H200",
             "median_ms": ms * scale, "p20_ms": ms * scale * 0.99, "p80_ms": ms * scale * 1.01, **extra}
            for impl, ms in (("fastbert", 107.0), ("transformers-sdpa", 119.0))]


def test_compare_rows_from_before_a_new_column_join_on_its_default(tmp_path, capsys):
    """The H200 large-model rows of 11-27 carry malloc=glibc-default, those of 11-26 have no malloc
    field: the same rows, compared (and a 20% slower one flagged), not reported as all new."""
    _write(tmp_path / "old", "model_step_gpu_large", _step_rows())
    _write(tmp_path / "new", "model_step_gpu_large", _step_rows(1.2, malloc="glibc-default"))
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")]) == 1
    out = capsys.readouterr().out
    assert "2 of 2 compared rows more than 10% slower" in out and "without a baseline" not in out
    # another allocator is another row, not a regression of this one
    _write(tmp_path / "jemalloc", "model_step_gpu_large", _step_rows(1.2, malloc="jemalloc"))
    assert compare.main([str(tmp_path / "jemalloc"), "--baseline", str(tmp_path / "old")]) == 2
    assert "no value in common: malloc" in capsys.readouterr().out


def test_compare_that_matched_no_row_never_passes(tmp_path, capsys):
    """A benchmark whose rows join none of its baseline's compared nothing: exit 2, even with
    --warn-only, naming the fields that split them."""
    _write(tmp_path / "old", "model_step_gpu_large", _step_rows())
    _write(tmp_path / "new", "model_step_gpu_large", _step_rows(precision="bf16-autocast"))
    _write(tmp_path / "new", "bench_fused", _rows())
    _write(tmp_path / "old", "bench_fused", _rows())  # the other benchmark compares fine
    for extra in ([], ["--warn-only"]):
        assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old"), *extra]) == 2
        out = capsys.readouterr().out
        assert "benchmarks compared on no row (exit 2) (1):" in out
        assert "model_step_gpu_large: none of its 2 rows matches one of the baseline's 2" in out
        assert "fields on one side only: precision" in out and "0 of 4 compared rows" in out
    # ignoring the splitting field joins them again
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old"),
                         "--ignore-field", "precision"]) == 0
    capsys.readouterr()
    # every new row failed: nothing compared, and a regression (exit 1: the failures are one)
    _write(tmp_path / "failed", "model_step_gpu_large",
           [{"impl": r["impl"], "case": "pretrain", "error": "OutOfMemoryError"} for r in _step_rows()])
    assert compare.main([str(tmp_path / "failed"), "--baseline", str(tmp_path / "old")]) == 1
    assert "none of its 0 rows (2 more failed) matches one of the baseline's 2\n" in capsys.readouterr().out
    assert compare.main([str(tmp_path / "failed"), "--baseline", str(tmp_path / "old"), "--warn-only"]) == 2


def test_compare_joined_rows_without_a_time_figure(tmp_path, capsys):
    """Rows that join but carry no time figure on either side (finetune_ab's rows) compared nothing
    slower, and matched: exit 0. A row whose new run lost the baseline's median is listed, and fails
    with --fail-on-missing."""
    rows = [{"experiment": "sentiment_en", "impl": impl, "train_seconds": t, "device": "NVIDIA H200"}
            for impl, t in (("fastbert", 250.0), ("transformers-random", 543.7))]
    _write(tmp_path / "old", "finetune_ab", rows)
    _write(tmp_path / "new", "finetune_ab", rows)
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")]) == 0
    assert "compared on no row" not in capsys.readouterr().out
    lost = _step_rows()
    del lost[0]["median_ms"]
    _write(tmp_path / "old2", "model_step_gpu_large", _step_rows())
    _write(tmp_path / "new2", "model_step_gpu_large", lost)
    assert compare.main([str(tmp_path / "new2"), "--baseline", str(tmp_path / "old2")]) == 0
    out = capsys.readouterr().out
    assert "rows whose new run lost the baseline's time figure (1):" in out and "impl=fastbert" in out
    assert compare.main([str(tmp_path / "new2"), "--baseline", str(tmp_path / "old2"), "--fail-on-missing"]) == 1


def test_compare_auto_baseline_takes_an_earlier_run_sharing_rows(tmp_path, capsys):
    """--baseline auto passes over a newer run of the same card whose rows are other shapes, and over
    runs dated after the new one."""
    root = tmp_path / "results"
    _write(root / "h200-a", "model_step_gpu_large", _step_rows(), date="2026-11-20T00:00:00Z")
    _write(root / "h200-b", "model_step_gpu_large", [dict(r, seq=128) for r in _step_rows(0.3)],
           date="2026-11-22T00:00:00Z")
    _write(root / "h200-later", "model_step_gpu_large", _step_rows(0.5), date="2026-11-30T00:00:00Z")
    _write(root / "new", "model_step_gpu_large", _step_rows(1.05), date="2026-11-25T00:00:00Z")
    assert compare.main([str(root / "new"), "--results-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "h200-a" in out.splitlines()[0] and "0 of 2 compared rows" in out
    # a newer run whose only shared row failed there shares nothing
    _write(root / "h200-failed", "model_step_gpu_large", [dict(_step_rows()[0], error="OutOfMemoryError")],
           date="2026-11-23T00:00:00Z")
    assert compare.main([str(root / "new"), "--results-root", str(root)]) == 0
    assert "h200-a" in capsys.readouterr().out.splitlines()[0]
    (root / "h200-failed" / "model_step_gpu_large.json").unlink()
    # with no earlier run sharing a row, the newest earlier one is named and the check fails
    (root / "h200-a" / "model_step_gpu_large.json").unlink()
    assert compare.main([str(root / "new"), "--results-root", str(root)]) == 2
    out = capsys.readouterr().out
    assert "h200-b" in out.splitlines()[0] and "none of its 2 rows" in out and "no value in common: seq" in out


@pytest.mark.slow  # ~2 s on an idle 2-core machine, 10+ s on a busy one
def test_compare_model_step_rows_join_on_case_and_impl(tmp_path, capsys):
    rows = bench.run("finetune", "cpu-small", 4, 16, steps=2, warmup=1, vocab=2000, competitors=["fastbert"],
                     device="cpu", progress=False)
    _write(tmp_path / "old", "model_step_cpu", rows, gpu=None)
    slower = [dict(r, median_ms=r["median_ms"] * 1.5, real_tokens_per_s=r["real_tokens_per_s"] / 1.5) for r in rows]
    _write(tmp_path / "new", "model_step_cpu", slower, gpu=None)
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")]) == 1
    out = capsys.readouterr().out
    assert "model_step_cpu: case=finetune" in out or "model_step_cpu: (single row)" in out
    assert rows[0]["repeats"] == 2 and rows[0]["p20_ms"] <= rows[0]["median_ms"] <= rows[0]["p80_ms"]


# ------------------------------------------------------------------------------ training step (pytest-benchmark)

@pytest.mark.parametrize("case", ["pretrain", "finetune"])
@pytest.mark.parametrize("impl", ["fastbert", "transformers-sdpa"])
def test_training_step_cpu(benchmark, case, impl):
    pytest.importorskip("transformers")
    batch = 16 if case == "pretrain" else 32
    models, _ = bench.build_models(case, "cpu-small", 30522, 128, "cpu", [impl])
    model, _ = models[impl]
    batches = bench.make_batches(case, 1, batch, 128, 30522, 0, "cpu")
    kw = batches[0][0]

    def step():
        loss = model(**kw).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    loss = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert loss.isfinite()


# ------------------------------------------------------------------------------ bench_encode.py

def test_encode_embeddings_agree_with_transformers_fp32():
    """fastbert's unpadded encoder and transformers' padded one give the same mean-pooled embeddings."""
    pytest.importorskip("transformers")
    import contextlib


    from benchmarks import bench_encode as E
    cfg = dict(E.MINILM, num_hidden_layers=2)  # MiniLM's widths, fewer layers: the test stays quick
    models, used = E.load_models(("fastbert", "transformers-sdpa"), "cpu", "random", cfg)
    assert used == "random"
    ids, mask, lengths = E.make_batches(1, 12, seed=3)[0]
    assert min(lengths) < ids.shape[1]  # real padding in the batch
    emb = {k: E.embed(m, ids, mask, contextlib.nullcontext) for k, m in models.items()}
    cos = torch.nn.functional.cosine_similarity(emb["fastbert"], emb["transformers-sdpa"], dim=-1)
    assert cos.min() > 0.999, cos.min()
    torch.testing.assert_close(emb["fastbert"], emb["transformers-sdpa"], rtol=1e-4, atol=1e-5)


def test_encode_run_rows():
    pytest.importorskip("transformers")
    from benchmarks import bench_encode as E
    cfg = dict(E.MINILM, num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128,
               vocab_size=2000)
    rows, _ = E.run(batch=8, n_batches=2, repeats=2, impls=("fastbert", "transformers-sdpa"), device="cpu",
                       weights="random", config=cfg, progress=False)
    assert [r["impl"] for r in rows] == ["fastbert", "transformers-sdpa"]
    for r in rows:
        assert r["n_sentences"] == 16 and r["repeats"] == 2 and r["sentences_per_s"] > 0
        assert r["cos_min_vs_sdpa"] > 0.999 and 0 < r["padding_frac"] < 1


# ------------------------------------------------------------------------------ pretrain_race.py

@pytest.mark.slow  # trains a tokenizer on the sample corpus: ~10-20 s
def test_pretrain_race_smoke(tmp_path, monkeypatch):
    """Two competitors, same start, same batches, no dropout (their masks are drawn differently): the
    first step's losses agree; files are written."""
    pytest.importorskip("transformers")
    from importlib import resources

    from benchmarks import pretrain_race
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    corpus = str(resources.files("fastbert.data").joinpath("sample_corpus.txt"))
    rc = pretrain_race.main([corpus, "--config", "micro", "--seq-len", "24", "--batch-size", "4", "--steps", "2",
                             "--vocab-size", "500", "--eval-examples", "8", "--warmup-untimed", "1",
                             "--cache-dir", str(tmp_path / "cache"), "--workers", "1", "--dropout", "0"])
    assert rc == 0
    out = tmp_path / "out"
    rows = json.loads((out / "pretrain_race.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["fastbert", "transformers-sdpa"]
    assert all(r["steps"] == 2 and r["stopped_by"] == "steps" and r["real_tokens_per_s"] > 0 for r in rows)
    curves = json.loads((out / "pretrain_race_curves.json").read_text())["curves"]
    first = [curves[k][0] for k in ("fastbert", "transformers-sdpa")]
    assert first[0][2] == pytest.approx(first[1][2], rel=1e-5)  # MLM loss before any update
    assert first[0][3] == pytest.approx(first[1][3], rel=1e-5)  # NSP loss
    assert (out / "pretrain_race.png").stat().st_size > 0 and (out / "pretrain_race.md").is_file()


@pytest.mark.slow  # trains a tokenizer and builds three epochs: ~10 s
def test_pretrain_race_batches_are_the_cli_batches(tmp_path):
    """Epochs built in parallel processes give exactly the batches `fastbert pretrain` takes, in order."""
    from importlib import resources


    from benchmarks.pretrain_race import build_batches
    from fastbert.pretraining_data import PretrainingData, collate, split_documents, tokenize_corpus
    corpus = str(resources.files("fastbert.data").joinpath("sample_corpus.txt"))
    tok, batches, _, info = build_batches([corpus], vocab_size=600, seq_len=24, batch_size=8, steps=900,
                                          cache_dir=str(tmp_path), eval_examples=0, workers=2)
    assert info["epochs_used"] > 1  # the parallel path ran
    shards = tokenize_corpus([corpus], tok, str(tmp_path))
    train_docs, _ = split_documents(shards.num_documents, 0.05, 0)
    data = PretrainingData(shards, tok, train_docs, seq_len=24, seed=0, mask_prob=0.15, nsp=True)
    position = (0, 0)
    for b in batches:
        examples, position = data.take(position, 8)
        expected = collate(examples, data.ids["pad"])
        assert all(torch.equal(expected[k], b[k]) for k in expected)


# ------------------------------------------------------------------------------ pretrain_loop.py

@pytest.mark.slow  # trains a tokenizer and runs the CLI twice: ~10 s
def test_pretrain_loop_smoke(tmp_path, monkeypatch):
    from benchmarks import pretrain_loop
    monkeypatch.setenv("OUT", str(tmp_path))
    assert pretrain_loop.main(["--config", "micro", "--seq-len", "24", "--batch-size", "4", "--steps", "6",
                               "--log-every", "2", "--vocab-size", "500"]) == 0
    rows = json.loads((tmp_path / "pretrain_loop.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["bare-step", "loop-prefetch-off", "loop-prefetch-on"]  # (no graphs on a CPU)
    assert all(r["real_tokens_per_s"] > 0 for r in rows)
    assert rows[0]["vs_bare"] == 1.0 and rows[1]["n_steps"] == rows[2]["n_steps"] == 8  # 2 runs x 2 rows x 2 steps


def test_bench_data_smoke(tmp_path, monkeypatch, capsys):
    from benchmarks import bench_data
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench_data.main(["--batch-size", "8", "--seq-len", "32", "--steps", "4", "--vocab-size", "500"]) == 0
    rows = json.loads((tmp_path / "bench_data.json").read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["plain", "whole-word", "packed"]
    for r in rows:
        assert 0 < r["step_ms_median"] and 0 < r["epoch_ms"] and r["pairs_per_epoch"] > 0
        assert r["examples_per_s"] == pytest.approx(r["examples_per_step"] / r["step_ms_median"] * 1e3)
    assert rows[0]["examples_per_step"] == 8 and rows[2]["examples_per_step"] > 8  # packed rows hold several
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        bench_data.main(["--recipes", "plain,bogus"])
    assert stop.value.code == 2
    assert "unknown recipe(s) bogus; choose from plain, whole-word, packed" in capsys.readouterr().err


def test_measure_cpu_percentiles_stay_within_the_samples(monkeypatch):
    """harness.measure on the CPU: p20/p80 of 3 timings must lie between the fastest and slowest one
    (statistics.quantiles' default 'exclusive' method extrapolated beyond them)."""
    from benchmarks import harness

    ticks = iter([0.0, 0.010, 0.0, 0.020, 0.0, 0.030])  # three timed calls: 10, 20, 30 ms
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(ticks))
    t = harness.measure(lambda: None, warmup=1, rep=3, device="cpu")
    assert t["median_ms"] == pytest.approx(20.0)
    assert 10.0 <= t["p20_ms"] <= t["median_ms"] <= t["p80_ms"] <= 30.0


def test_measure_graphed_has_no_figure_off_a_gpu():
    """The kernel benchmarks' graph_ms columns come from CUDA-graph replays; on the CPU there are none
    (the rows keep their other figures)."""
    from benchmarks.harness import measure_graphed
    calls = []
    assert measure_graphed(lambda: calls.append(1), device="cpu") is None
    assert calls == []  # not even run: a CPU figure under that name would mean something else


def test_compare_checks_the_graphed_device_time_too(tmp_path, capsys):
    """A kernel 30% slower in its CUDA-graph device time is flagged even when its host-bound median did
    not move; rows without graph_ms on one side compare their medians only; None-valued graph ratios do
    not split a row's identity."""
    def rows(graph_scale, with_graph=True):
        out = _rows()
        for r in out:
            if with_graph:
                g = r["median_ms"] * 0.5 * (graph_scale if r["impl"] == "fastbert" else 1.0)
                r.update(graph_ms=g, graph_p20_ms=g * 0.99, graph_p80_ms=g * 1.01,
                         graph_speedup_vs_eager=None if r["impl"] == "fastbert" else 2.0)
        return out
    _write(tmp_path / "old", "bench_fused", rows(1.0))
    _write(tmp_path / "new", "bench_fused", rows(1.3))
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "old")]) == 1
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if "SLOWER" in line]
    assert len(flagged) == 2 and all("[graph]" in line and "impl=fastbert" in line and "1.300" in line
                                     for line in flagged)
    # the summary counts rows once and says which figure was slower: 0 medians, 2 graph device times
    assert "0 of 4 compared rows more than 10% slower (median); 2 of 4 in their CUDA-graph device time" in out
    _write(tmp_path / "plain", "bench_fused", rows(1.3, with_graph=False))  # a baseline from before graph_ms
    assert compare.main([str(tmp_path / "new"), "--baseline", str(tmp_path / "plain")]) == 0
    assert "0 of 4 compared rows" in capsys.readouterr().out


# ------------------------------------------------------------------------------ launch_census.py

def test_launch_census_counts_computing_ops_and_autocast_casts():
    """One launch per op that computes, none for views / allocations, one per autocast cast inside a
    matmul, none for a cast to the same dtype; a nonzero is a sync, a CUDA stand-in range one launch."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import launch_census as LC

    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.linear(x, w, b)  # 1 + casts of x, w, b
        y.view(2, 12).t().float().sum()  # view, t: nothing; float: 1 cast; sum: 1
        x.to(torch.float32)  # same dtype: nothing
        (x > 0).nonzero()  # gt: 1; nonzero: 1, and a sync
        with torch.profiler.record_function(LC.ONE_LAUNCH + "stand-in"):
            x.double().sum()  # counted as the one launch the range stands for
            with torch.profiler.record_function(LC.ONE_LAUNCH + "inner"):
                x.sum()  # part of the outer one
    launches, syncs = LC.count_launches(prof.events())
    assert launches == {"linear": 1, "_to_copy (in linear)": 3, "to": 1, "sum": 1, "gt": 1, "nonzero": 1,
                        "stand-in": 1}, launches
    assert syncs == {"nonzero": 1}


def test_launch_census_smoke():
    """A 2-layer fine-tuning step: every Triton kernel of the eager step counted per layer, the
    fp32-gradient linears' GEMMs as on CUDA, and fewer launches than transformers SDPA."""
    import os

    from benchmarks import launch_census as LC
    from fastbert.kernels._dispatch import interpreting

    if not interpreting():
        pytest.skip("needs Triton's interpreter (tests/conftest.py sets it when the test suite runs)")
    before = os.environ.get("FASTBERT_KERNELS")

    tri, aten, syncs = LC.census("finetune", "fastbert", layers=2, batch=2, seq=16)
    assert tri == {"_add_ln_fwd": 4, "_add_ln_bwd": 4, "_attn_fwd": 2, "_attn_bwd_fused": 2, "_bias_gelu_fwd": 2,
                   "_bias_gelu_bwd": 2}, tri
    # QKV, output and both feed-forward weights per layer, then the pooler and the classifier
    assert aten["mm (fp32 out)"] == 4 * 2 + 2
    assert syncs == {"tolist": 1}  # the unpadded layout's one read
    _, hf, _ = LC.census("finetune", "transformers-sdpa", layers=2, batch=2, seq=16)
    assert sum(tri.values()) + sum(aten.values()) < sum(hf.values())
    assert os.environ.get("FASTBERT_KERNELS") == before  # the census leaves the backend as it found it


# ------------------------------------------------------------------------------ bench_read_rows.py

def test_read_rows_benchmark_arms_differ_only_in_the_rows(monkeypatch):
    """The all-rows arm is the model with the short path off (every row through the last layer), the
    other arm runs one row per example; both time the same batches."""
    import fastbert
    from benchmarks import bench_read_rows
    from fastbert import modeling
    seen, choose = [], modeling._last_layer_rows
    monkeypatch.setattr(modeling, "_last_layer_rows", lambda layout, i, n: seen.append(r := choose(layout, i, n)) or r)
    cfg = fastbert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=24)
    model = fastbert.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = (torch.arange(7) < torch.tensor([[7], [4], [2]])).long()

    def last_rows():
        seen.clear()
        model(input_ids=ids, attention_mask=mask)
        return None if seen[-1] is None else len(seen[-1])

    assert last_rows() == 3
    with bench_read_rows.all_rows():
        assert last_rows() is None  # every row
    assert last_rows() == 3  # restored
    times = bench_read_rows.finetune_step("cpu-small", 1, "cpu")
    assert sorted(times) == ["all-rows", "pooler-rows"] and all(len(t) == 1 and t[0] > 0 for t in times.values())
