"""benchmarks/zh_grid.py: the two-stage fine-tuning grid's summary (means over seeds, paired
differences, each arm's best lr) and its resume from finished runs."""
import json

import pytest

from benchmarks import zh_grid


def test_summary_pairs_seeds_and_picks_each_arms_best_lr():
    acc = {("pretrained", "1e-4", 1): 0.80, ("pretrained", "1e-4", 2): 0.82,
           ("pretrained", "3e-4", 1): 0.84, ("pretrained", "3e-4", 2): 0.83,
           ("random", "1e-4", 1): 0.81, ("random", "1e-4", 2): 0.80,
           ("random", "3e-4", 2): 0.78}  # seed 1 of random 3e-4 missing: no pair for it
    results = {k: {"accuracy": v} for k, v in acc.items()}
    s = zh_grid.summarize(results, ["1e-4", "3e-4"], [1, 2])
    lo, hi = s["per_lr"]
    assert lo["pretrained"]["mean"] == pytest.approx(0.81) and lo["random"]["mean"] == pytest.approx(0.805)
    assert lo["paired_difference"]["n"] == 2 and lo["paired_difference"]["mean"] == pytest.approx(0.005)
    assert lo["paired_difference"]["sd"] == pytest.approx(0.0212132, abs=1e-6)  # diffs -0.01, +0.02
    assert hi["random"]["n"] == 1 and hi["paired_difference"]["n"] == 1
    assert hi["paired_difference"]["mean"] == pytest.approx(0.05)  # seed 2's pair: 0.83 - 0.78
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
    (done / zh_grid.SETTINGS).write_text("{}")
    zh_grid.prune_run(done)  # what stays is what the summary, a reader and a later read-back need
    assert sorted(f.name for f in done.iterdir()) == ["config.json", "grid_run.json", "metrics.json"]
    assert zh_grid.load_result(done)["accuracy"] == 0.75


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert zh_grid.main([str(tmp_path)]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert zh_grid.main([str(tmp_path), "--data", str(tmp_path / "nodata")]) == 2
    assert "missing" in capsys.readouterr().err


SHAPE = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2}


def _finished_grid(tmp_path):
    """A model folder, a data folder and a grid folder whose every run has finished, as a real grid
    would leave them (metrics.json, the fine-tuned config.json, grid_run.json)."""
    model, data, out = tmp_path / "model", tmp_path / "data", tmp_path / "grid"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**SHAPE, "architectures": ["BertForPreTraining"]}))
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"{split}.jsonl").write_text(f'{{"text": "{split}", "label": 1}}\n')
    argv = [str(model), "--data", str(data), "--out", str(out), "--lrs", "1e-4", "--seeds", "1,2",
            "--epochs", "3", "--batch-size", "8"]
    args = zh_grid.argparse.Namespace(epochs=3, batch_size=8, max_length=128, max_train_examples=None,
                                      max_eval_examples=None)
    for arm in zh_grid.ARMS:
        for seed, acc in ((1, 0.8), (2, 0.9)):
            run = out / zh_grid.RUNS / zh_grid.run_name(arm, "1e-4", seed)
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps(
                {"dev": {"accuracy": acc + (arm == "pretrained") * 0.05}, "best_epoch": 1, "train_seconds": 1.0,
                 "history": [{"epoch": 1, "accuracy": acc}]}))
            (run / "config.json").write_text(json.dumps({**SHAPE, "architectures": ["BertForSequenceClassification"]}))
            (run / zh_grid.SETTINGS).write_text(json.dumps(
                zh_grid.run_settings(arm, "1e-4", seed, zh_grid.data_digest(str(data)), args)))
    return argv, out


def test_a_finished_grid_is_read_back_and_summarised_without_running_anything(tmp_path, capsys):
    argv, out = _finished_grid(tmp_path)
    assert zh_grid.main(argv) == 0
    assert "4 runs done, 0 to go" in capsys.readouterr().out  # 2 arms x 2 seeds, nothing started
    summary = json.loads((out / "grid.json").read_text())["summary"]
    assert summary["best_difference"] == pytest.approx(0.05)
    assert summary["per_lr"][0]["paired_difference"]["n"] == 2


@pytest.mark.parametrize("change", ["epochs", "batch", "data", "model shape", "no settings file"])
def test_a_finished_run_with_other_settings_is_refused_not_mixed_in(tmp_path, capsys, change):
    argv, out = _finished_grid(tmp_path)
    run = out / zh_grid.RUNS / zh_grid.run_name("random", "1e-4", 2)
    if change == "epochs":
        argv[argv.index("--epochs") + 1] = "6"
    elif change == "batch":
        argv[argv.index("--batch-size") + 1] = "32"
    elif change == "data":
        (tmp_path / "data" / "dev.jsonl").write_text('{"text": "other", "label": 0}\n')
    elif change == "model shape":
        (run / "config.json").write_text(json.dumps({**SHAPE, "vocab_size": 51}))
    else:
        (run / zh_grid.SETTINGS).unlink()
    assert zh_grid.main(argv) == 2
    err = capsys.readouterr().err
    assert "would mix" in err and str(run) in err
    expected = {"epochs": "epochs 3 (command: 6)", "batch": "batch_size 8 (command: 32)",
                "data": "data_sha256", "model shape": "vocab_size 51 (model: 50)",
                "no settings file": "no readable grid_run.json"}[change]
    assert expected in err
    # one line per refused run: all four when the command's settings or the data change, else the edited one
    assert err.count("\n  ") == (4 if change in ("epochs", "batch", "data") else 1)
    assert not (out / "grid.json").exists()


# Stands in for `fastbert finetune`: writes what a finished run leaves (metrics.json, config.json and a
# weights file the grid prunes) into its --out; the accuracy encodes arm and seed.
_FAKE_FINETUNE = r"""
import json, pathlib, sys
out, arm, seed = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
acc = 0.8 + 0.01 * seed + (0.05 if arm == "pretrained" else 0.0)
(out / "metrics.json").write_text(json.dumps({"dev": {"accuracy": acc}, "best_epoch": 1, "train_seconds": 1.0,
                                              "history": [{"epoch": 1, "accuracy": acc}]}))
(out / "config.json").write_text(json.dumps(json.loads(sys.argv[4])))
(out / "model.safetensors").write_text("weights")
"""


def test_a_grid_resumes_from_the_runs_it_wrote_itself(tmp_path, monkeypatch, capsys):
    """The whole loop with a stand-in fine-tuning command: the first call runs every job and keeps
    each run's settings; a second call with the same arguments reads all of them back and runs nothing;
    one with another max length refuses them."""
    argv, out = _finished_grid(tmp_path)
    import shutil
    shutil.rmtree(out)
    started = []

    def fake_command(model, data, arm, lr, seed, run_out, args):
        started.append((arm, lr, seed))
        return [zh_grid.sys.executable, "-c", _FAKE_FINETUNE, str(run_out), arm, str(seed), json.dumps(SHAPE)]

    monkeypatch.setattr(zh_grid, "finetune_command", fake_command)
    assert zh_grid.main(argv) == 0
    assert "0 runs done, 4 to go" in capsys.readouterr().out and len(started) == 4
    run = out / zh_grid.RUNS / zh_grid.run_name("pretrained", "1e-4", 2)
    assert sorted(f.name for f in run.iterdir()) == ["config.json", "grid_run.json", "metrics.json"]
    first = json.loads((out / "grid.json").read_text())["summary"]
    assert first["best_difference"] == pytest.approx(0.05)

    started.clear()
    assert zh_grid.main(argv) == 0
    assert "4 runs done, 0 to go" in capsys.readouterr().out and started == []
    assert json.loads((out / "grid.json").read_text())["summary"] == first

    assert zh_grid.main(argv + ["--max-length", "64"]) == 2
    assert "max_length 128 (command: 64)" in capsys.readouterr().err and started == []


@pytest.mark.parametrize("flag, value", [("--seeds", "1,2,1"), ("--lrs", "1e-4,1e-4"), ("--arms", "random,random")])
def test_a_value_given_twice_is_refused_not_counted_twice(tmp_path, capsys, flag, value):
    """--seeds 1,2,1 used to read seed 1's runs back twice: n=3 over two runs, and a paired sd of
    two copies; a repeated value to run would start two processes into one run folder."""
    argv, out = _finished_grid(tmp_path)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert zh_grid.main(argv) == 2
    assert "twice" in capsys.readouterr().err
    assert not (out / "grid.json").exists()
