"""benchmarks/zh_grid.py: the two-stage fine-tuning grid's summary (means over seeds, paired
differences, each arm's best lr) and its resume from finished runs."""
import json

import pytest

from benchmarks import zh_grid


def test_summary_pairs_seeds_and_picks_each_arms_best_lr():
    acc = {("pretrained", "1e-4", 1): 0.80, ("pretrained", "1e-4", 2): 0.82,
           ("pretrained", "3e-4", 1): 0.84, ("pretrained", "3e-4", 2): 0.83,
           ("random", "1e-4", 1): 0.81, ("random", "1e-4", 2): 0.80,
           ("random", "3e-4", 1): 0.78}  # seed 2 of random 3e-4 missing: no pair for it
    results = {k: {"accuracy": v} for k, v in acc.items()}
    s = zh_grid.summarize(results, ["1e-4", "3e-4"], [1, 2])
    lo, hi = s["per_lr"]
    assert lo["pretrained"]["mean"] == pytest.approx(0.81) and lo["random"]["mean"] == pytest.approx(0.805)
    assert lo["paired_difference"]["n"] == 2 and lo["paired_difference"]["mean"] == pytest.approx(0.005)
    assert lo["paired_difference"]["sd"] == pytest.approx(0.0212132, abs=1e-6)  # diffs -0.01, +0.02
    assert hi["random"]["n"] == 1 and hi["paired_difference"]["n"] == 1
    assert hi["paired_difference"]["mean"] == pytest.approx(0.06)
    # each arm at its own best lr by mean over seeds: pretrained 3e-4 (0.835), random 1e-4 (0.805)
    assert s["best"]["pretrained"]["lr"] == "3e-4" and s["best"]["random"]["lr"] == "1e-4"
    assert s["best_difference"] == pytest.approx(0.03)
    text = zh_grid.markdown(s, "header")
    assert "| 1e-4 | 0.8100 ± 0.0141 (n=2; 0.800–0.820) | 0.8050 ± 0.0071 (n=2; 0.800–0.810) |" in text
    assert "**+3.00 points**" in text


def test_finished_runs_are_read_back_and_unfinished_ones_are_not(tmp_path):
    done = tmp_path / zh_grid.run_name("random", "1e-3", 7)
    done.mkdir()
    (done / "metrics.json").write_text(json.dumps(
        {"dev": {"accuracy": 0.75, "n": 8}, "best_epoch": 2, "train_seconds": 1.5,
         "history": [{"epoch": 1, "accuracy": 0.5}, {"epoch": 2, "accuracy": 0.75}]}))
    assert zh_grid.load_result(done) == {"accuracy": 0.75, "best_epoch": 2, "epochs": [0.5, 0.75],
                                         "train_seconds": 1.5}
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "metrics.json").write_text('{"dev": {"accur')  # a run killed while writing
    assert zh_grid.load_result(cut) is None and zh_grid.load_result(tmp_path / "absent") is None
    for name in ("model.safetensors", "vocab.txt", "config.json"):
        (done / name).write_text("x")
    zh_grid.prune_run(done)  # what stays is what the summary and a reader need
    assert sorted(f.name for f in done.iterdir()) == ["config.json", "metrics.json"]
    assert zh_grid.load_result(done)["accuracy"] == 0.75


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert zh_grid.main([str(tmp_path)]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert zh_grid.main([str(tmp_path), "--data", str(tmp_path / "nodata")]) == 2
    assert "missing" in capsys.readouterr().err
