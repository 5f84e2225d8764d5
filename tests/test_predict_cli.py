"""`fastbert predict`: a fine-tuned model applied to a file, labelled or not, on a micro model."""
import json
import random

import pytest
import torch
from test_finetune_cli import _jsonl, _sentences, make_data, micro_model  # noqa: F401  (micro_model: a fixture)

from fastbert.cli import main as cli


def _finetune(micro_model, tmp_path, task, freeze="none"):
    files = make_data(task, tmp_path, random.Random(1))
    out = tmp_path / "out"
    assert cli(["finetune", "--task", task, "--model", micro_model, "--train", files["train"], "--dev", files["dev"],
                "--test", files["test"], "--out", str(out), "--epochs", "2", "--batch-size", "8", "--max-length", "24",
                "--freeze", freeze, "--lr", "1e-3", "--device", "cpu", "--no-progress"]) == 0
    return files, out


def _unlabelled(task, path, dst):
    """The file at `path` without its labels (ner: the token column alone)."""
    if task == "ner":
        dst.write_text("".join((line.split("\t")[0] if line.strip() else line) + "\n"
                               for line in open(path).read().split("\n")[:-1]))
        return str(dst)
    rows = [json.loads(line) for line in open(path)]
    for r in rows:
        r.pop("answers" if task == "qa" else "label")
    return _jsonl(dst, rows)


@pytest.mark.parametrize("task, freeze", [("classify", "none"), ("pair", "1"), ("ner", "none"), ("qa", "none"),
                                          ("choice", "none"), ("classify", "all"), ("ner", "all")])
def test_predict_gives_finetunes_own_test_predictions_and_metrics(micro_model, tmp_path, capsys, task, freeze):
    """What `fastbert finetune --test` wrote for its test file, `fastbert predict` gives again from the
    saved folder alone (its finetune.json: task, labels, max length): the same predictions.jsonl byte
    for byte and the same metrics; the file without its labels gets the same predictions and no metrics."""
    files, out = _finetune(micro_model, tmp_path, task, freeze)
    preds, metrics = tmp_path / "p.jsonl", tmp_path / "m.json"
    assert cli(["predict", "--model", str(out), "--input", files["test"], "--output", str(preds),
                "--metrics", str(metrics), "--device", "cpu", "--no-progress"]) == 0
    assert preds.read_text() == (out / "predictions.jsonl").read_text()
    assert json.loads(metrics.read_text()) == json.loads((out / "metrics.json").read_text())["test"]

    bare = _unlabelled(task, files["test"], tmp_path / ("bare.conll" if task == "ner" else "bare.jsonl"))
    capsys.readouterr()
    assert cli(["predict", "--model", str(out), "--input", bare, "--device", "cpu", "--no-progress",
                "--metrics", str(tmp_path / "m2.json")]) == 0
    captured = capsys.readouterr()
    assert captured.out == (out / "predictions.jsonl").read_text()  # stdout by default
    assert not (tmp_path / "m2.json").exists() and "no labels" in captured.err
    if task in ("classify", "pair", "choice"):  # the probabilities: a distribution whose argmax is the label
        assert cli(["predict", "--model", str(out), "--input", bare, "--device", "cpu", "--no-progress",
                    "--probabilities"]) == 0
        for line, plain in zip(capsys.readouterr().out.splitlines(), captured.out.splitlines()):
            row, plain = json.loads(line), json.loads(plain)
            p = row.pop("probabilities")
            assert row == plain and sum(p.values() if task != "choice" else p) == pytest.approx(1.0, abs=1e-6)
            best = max(range(len(p)), key=p.__getitem__) if task == "choice" else max(p, key=p.get)
            assert best == str(plain["label"]) or best == plain["label"]


def test_predict_a_transformers_checkpoint_given_its_task(micro_model, tmp_path):
    """A fine-tuned head saved by transformers (no finetune.json): --task names the task, config.json's
    id2label the labels; the predictions are transformers' own argmax on the same token ids."""
    transformers = pytest.importorskip("transformers")
    from fastbert import tasks as T
    torch.manual_seed(3)
    config = transformers.BertConfig.from_pretrained(micro_model, id2label={0: "neg", 1: "pos", 2: "mixed"},
                                                     label2id={"neg": 0, "pos": 1, "mixed": 2})
    config.initializer_range = 0.5  # weights large enough that the features differ between texts
    hf = transformers.BertForSequenceClassification(config).eval()
    ckpt = tmp_path / "hf"
    (ckpt / "vocab.txt").parent.mkdir()
    (ckpt / "vocab.txt").write_text(open(f"{micro_model}/vocab.txt").read())
    tok = T.load_tokenizer(str(ckpt))
    texts = ["the cat sat on the mat", "good movie", "where is the big red door ?", "bad", "it is paris",
             "london is a big city", "the capital of france", "near the door"]
    with torch.no_grad():  # the head's bias centred on these texts, so that the argmax moves with the text
        hf.classifier.bias -= torch.cat([hf(torch.tensor([tok.encode(t).ids])).logits for t in texts]).mean(0)
        logits = torch.cat([hf(torch.tensor([tok.encode(t).ids])).logits for t in texts])
    want = [config.id2label[int(i)] for i in logits.argmax(-1)]
    hf.save_pretrained(str(ckpt))
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    out = tmp_path / "p.jsonl"
    assert cli(["predict", "--model", str(ckpt), "--task", "classify", "--input", inp, "--output", str(out),
                "--device", "cpu", "--no-progress", "--probabilities"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == want
    probs = torch.tensor([[r["probabilities"][name] for name in ("neg", "pos", "mixed")] for r in rows],
                         dtype=torch.float64)
    torch.testing.assert_close(probs, logits.double().softmax(-1), rtol=0, atol=1e-5)
    assert len(set(want)) > 1  # the check can tell labels apart


@pytest.mark.parametrize("make, extra, message", [
    (None, [], "give --task"),                                                      # no finetune.json
    (None, ["--model", "nowhere"], "--model nowhere: no such folder"),
    (None, ["--task", "classify"], "no trained classify head (missing: classifier.bias, classifier.weight)"),
    ("classify", ["--task", "pair"], "was fine-tuned for classify"),
    ("classify", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("classify", ["--output", "."], "is a folder"),
    ("classify", ["--output", "same.json", "--metrics", "same.json"], "--output and --metrics are the same file"),
    ("classify", ["--null-answers", "on"], "--null-answers applies to qa, not classify"),
    (None, ["--task", "ner", "--probabilities"], "--probabilities applies to classify, pair and choice, not ner"),
])
def test_predict_usage_errors(micro_model, tmp_path, capsys, make, extra, message):
    model = micro_model
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": "good movie"}])
    if make:
        _, out = _finetune(micro_model, tmp_path, make)
        model = str(out)
    capsys.readouterr()
    assert cli(["predict", "--model", model, "--input", inp, "--device", "cpu", "--no-progress"] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_predict_refuses_labels_it_cannot_score(micro_model, tmp_path, capsys):
    """Labels in part of a file, or one the model was not fine-tuned on: an error naming the line."""
    _, out = _finetune(micro_model, tmp_path, "classify")
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad"}])
    unknown = _jsonl(tmp_path / "unknown.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "meh"}])
    for path, message in ((mixed, "mixed.jsonl:2: lacks 'label'"),
                          (unknown, "unknown.jsonl:2: label 'meh' is not one of the labels")):
        capsys.readouterr()
        assert cli(["predict", "--model", str(out), "--input", path, "--device", "cpu", "--no-progress"]) == 2
        assert message in capsys.readouterr().err


def test_predict_cuts_inputs_where_finetuning_cut_them(micro_model, tmp_path, capsys):
    """The max length of finetune.json (24 here), not a default of the command's own."""
    _, out = _finetune(micro_model, tmp_path, "classify")
    inp = _jsonl(tmp_path / "long.jsonl", [{"text": "the cat sat on the mat " * 12}, {"text": "good movie"}])
    capsys.readouterr()
    assert cli(["predict", "--model", str(out), "--input", inp, "--device", "cpu", "--no-progress"]) == 0
    assert "1 of 2 examples cut to 24 tokens" in capsys.readouterr().err
    assert cli(["predict", "--model", str(out), "--input", inp, "--device", "cpu", "--no-progress",
                "--max-length", "64"]) == 0
    assert "cut to 64 tokens" in capsys.readouterr().err


def test_predict_choice_needs_one_number_of_choices(micro_model, tmp_path, capsys):
    _, out = _finetune(micro_model, tmp_path, "choice")
    inp = _jsonl(tmp_path / "c.jsonl", [{"question": "q", "choices": ["a", "b", "c"]},
                                        {"question": "q", "choices": ["a", "b"]}])
    capsys.readouterr()
    assert cli(["predict", "--model", str(out), "--input", inp, "--device", "cpu", "--no-progress"]) == 2
    assert "c.jsonl:2: 2 choices, but the first question has 3 (every question needs the same number)" in capsys.readouterr().err


def _transformers_classifier(micro_model, tmp_path):
    """A transformers classification head saved without label names or finetune.json (64 positions)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    config = transformers.BertConfig.from_pretrained(micro_model, num_labels=2)
    config.initializer_range = 0.5
    ckpt = tmp_path / "hf"
    transformers.BertForSequenceClassification(config).eval().save_pretrained(str(ckpt))
    (ckpt / "vocab.txt").write_text(open(f"{micro_model}/vocab.txt").read())
    return ckpt


def test_predict_without_finetune_json_cuts_at_the_models_positions(micro_model, tmp_path, capsys):
    """No finetune.json and no --max-length: the default 128 is capped at the model's 64 positions,
    so a long text is cut there (said once) instead of failing past the position table."""
    ckpt = _transformers_classifier(micro_model, tmp_path)
    assert json.loads((ckpt / "config.json").read_text())["max_position_embeddings"] == 64
    inp = _jsonl(tmp_path / "long.jsonl", [{"text": "the cat sat on the mat " * 20}, {"text": "good movie"}])
    capsys.readouterr()
    assert cli(["predict", "--model", str(ckpt), "--task", "classify", "--input", inp, "--device", "cpu",
                "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert "1 of 2 examples cut to 64 tokens" in captured.err
    assert "using max length 64 (the model's positions)" in captured.err


def test_predict_output_and_metrics_through_a_link_are_the_same_file(micro_model, tmp_path, capsys):
    _, out = _finetune(micro_model, tmp_path, "classify")
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": "good movie", "label": "pos"}])
    (tmp_path / "m.json").symlink_to(tmp_path / "p.jsonl")
    capsys.readouterr()
    assert cli(["predict", "--model", str(out), "--input", inp, "--device", "cpu", "--no-progress",
                "--output", str(tmp_path / "p.jsonl"), "--metrics", str(tmp_path / "m.json")]) == 2
    assert "--output and --metrics are the same file" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_predict_reads_labels_numbered_by_config_as_the_files_integers(micro_model, tmp_path, capsys):
    """A transformers head saved without label names (id2label LABEL_0, LABEL_1) and a file labelled 0 / 1:
    the labels are the integers, scored and printed as such (not "LABEL_1", not an unknown-label error)."""
    ckpt = _transformers_classifier(micro_model, tmp_path)
    texts = ["the cat sat on the mat", "good movie", "where is the big red door ?", "bad", "it is paris", "near"]
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(texts)])
    capsys.readouterr()
    assert cli(["predict", "--model", str(ckpt), "--task", "classify", "--input", inp, "--device", "cpu",
                "--no-progress", "--metrics", str(tmp_path / "m.json")]) == 0
    captured = capsys.readouterr()
    got = [json.loads(line)["label"] for line in captured.out.splitlines()]
    assert all(type(g) is int for g in got) and len(got) == len(texts)
    accuracy = sum(g == i % 2 for i, g in enumerate(got)) / len(texts)
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == pytest.approx(accuracy)
    assert "has no finetune.json" in captured.err  # the defaulted settings are said
    unlabelled = _unlabelled("classify", inp, tmp_path / "unl.jsonl")
    assert cli(["predict", "--model", str(ckpt), "--task", "classify", "--input", unlabelled, "--device", "cpu",
                "--no-progress"]) == 0
    assert [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()] == got  # labels or not


def test_predict_without_finetune_json_reads_integer_label_names_as_integers(micro_model, tmp_path, capsys):
    """Integer labels 1..3 (not ids): finetune saves id2label {0: "1", 1: "2", 2: "3"}; with finetune.json
    gone, predict still gives the integers 1..3 and scores the file against them."""
    files = make_data("pair", tmp_path, random.Random(1))
    for split in ("train", "dev"):
        rows = [json.loads(line) for line in open(files[split])]
        _jsonl(tmp_path / f"{split}.jsonl", [dict(r, label=r["label"] + 1) for r in rows])
    out = tmp_path / "out"
    assert cli(["finetune", "--task", "pair", "--model", micro_model, "--train", files["train"], "--dev",
                files["dev"], "--out", str(out), "--epochs", "2", "--batch-size", "8", "--max-length", "24",
                "--lr", "1e-3", "--device", "cpu", "--no-progress"]) == 0
    predict = ["predict", "--model", str(out), "--input", files["dev"], "--device", "cpu", "--no-progress",
               "--max-length", "24"]
    capsys.readouterr()
    assert cli(predict) == 0
    want = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert set(want) <= {1, 2, 3} and len(want) == 10
    (out / "finetune.json").unlink()
    assert cli(predict + ["--task", "pair", "--metrics", str(tmp_path / "m.json")]) == 0
    assert [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()] == want
    accuracy = sum(w == json.loads(line)["label"] for w, line in zip(want, open(files["dev"]))) / len(want)
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == pytest.approx(accuracy)


def test_predict_batches_as_finetuning_evaluated(micro_model, tmp_path, monkeypatch):
    """The batch size defaults to finetune.json's eval_batch_size (2 x --batch-size 8 here); --batch-size
    overrides it."""
    from fastbert import finetune
    _, out = _finetune(micro_model, tmp_path, "classify")
    assert json.loads((out / "finetune.json").read_text())["eval_batch_size"] == 16
    seen = []

    def predict(model, task, feats, batch_size, *args):
        seen.append(batch_size)
        return real(model, task, feats, batch_size, *args)
    real = finetune.predict
    monkeypatch.setattr(finetune, "predict", predict)
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": "good movie"}, {"text": "bad"}])
    for extra in ([], ["--batch-size", "3"]):
        assert cli(["predict", "--model", str(out), "--input", inp, "--device", "cpu", "--no-progress"] + extra) == 0
    assert seen == [16, 3]


def test_predict_refuses_a_label_set_that_does_not_fit_the_head(micro_model, tmp_path, capsys):
    _, out = _finetune(micro_model, tmp_path, "classify")
    settings = json.loads((out / "finetune.json").read_text())
    settings["labels"].append("extra")
    (out / "finetune.json").write_text(json.dumps(settings))
    inp = _jsonl(tmp_path / "in.jsonl", [{"text": "good movie"}])
    capsys.readouterr()
    assert cli(["predict", "--model", str(out), "--input", inp, "--device", "cpu", "--no-progress"]) == 2
    assert "3 labels (['neg', 'pos', 'extra']) for a head of 2 outputs" in capsys.readouterr().err


def test_predict_answers_nothing_where_the_model_was_trained_to(micro_model, tmp_path):
    """qa trained with unanswerable questions (finetune.json qa_null): predict answers "" as fine-tuning
    did on its test file; --null-answers off forces a span for every question."""
    rng = random.Random(2)
    files = {}
    for split, n in (("train", 40), ("dev", 10), ("test", 12)):
        rows = []
        for i in range(n):
            city = ["paris", "london"][i % 2]
            if i % 3 == 0:  # the capital is not in this context
                ctx = " ".join(_sentences(rng, 1, (6, 14))) + " the cat sat"
                rows.append({"question": "where is the capital ?", "context": ctx,
                             "answers": {"text": [], "answer_start": []}})
            else:
                ctx = " ".join(_sentences(rng, 1, (6, 14))) + f" the capital is {city} ."
                rows.append({"question": "where is the capital ?", "context": ctx,
                             "answers": {"text": [city], "answer_start": [ctx.index(f"is {city}") + 3]}})
        files[split] = _jsonl(tmp_path / f"{split}.jsonl", rows)
    out = tmp_path / "out"
    assert cli(["finetune", "--task", "qa", "--model", micro_model, "--train", files["train"], "--dev", files["dev"],
                "--test", files["test"], "--out", str(out), "--epochs", "3", "--lr", "1e-3", "--batch-size", "8",
                "--max-length", "32", "--threads", "1", "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((out / "finetune.json").read_text())["qa_null"] is True
    want = (out / "predictions.jsonl").read_text()
    assert '"answer": ""' in want  # (this data and seed) the model does answer nothing somewhere
    runs = {}
    for null in ("auto", "on", "off"):
        assert cli(["predict", "--model", str(out), "--input", files["test"], "--output", str(tmp_path / null),
                    "--null-answers", null, "--threads", "1", "--device", "cpu", "--no-progress"]) == 0
        runs[null] = (tmp_path / null).read_text()
    assert runs["auto"] == runs["on"] == want
    off = [json.loads(line)["answer"] for line in runs["off"].splitlines()]
    assert len(off) == 12 and all(off)


def test_predict_reads_standard_input(micro_model, tmp_path, capsys, monkeypatch):
    """--input - : the same predictions as from the file; errors name <stdin> and its line."""
    import io
    files, out = _finetune(micro_model, tmp_path, "classify")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(open(files["test"], "rb").read())))
    capsys.readouterr()
    assert cli(["predict", "--model", str(out), "--input", "-", "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().out == (out / "predictions.jsonl").read_text()
    for data, message in ((b'{"text": "good"}\n{"txt": "bad"}\n', "<stdin>:2: missing field 'text'"),
                          (b"", "<stdin>: standard input is empty")):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
        assert cli(["predict", "--model", str(out), "--input", "-", "--device", "cpu", "--no-progress"]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("names, labels, want", [
    (["LABEL_0", "LABEL_1"], None, [0, 1]),                  # transformers' default names: the ids
    (["LABEL_0", "LABEL_1"], [1, 0], [0, 1]),
    (["1", "2", "3"], None, [1, 2, 3]),                      # finetune's str() of integer labels
    (["-1", "0", "1"], [0, -1], [-1, 0, 1]),
    (["1", "2"], ["2", "1"], ["1", "2"]),                    # the file's labels are strings: so are the names
    (["1", "01"], None, ["1", "01"]),                        # not as str(int) writes integers: codes
    (["007", "008"], [7], ["007", "008"]),
    (["\u0661", "\u0662"], None, ["\u0661", "\u0662"]),      # other scripts' digits are not integers here
    (["neg", "pos"], None, ["neg", "pos"]),
    (["LABEL_1", "LABEL_0"], None, ["LABEL_1", "LABEL_0"]),  # not the default numbering
])
def test_label_list_reads_config_names_as_integers_only_where_they_print_as_integers(names, labels, want):
    from types import SimpleNamespace

    from fastbert.predict import label_list
    config = SimpleNamespace(id2label=dict(enumerate(names)), num_labels=len(names))
    model = SimpleNamespace(config=config, num_labels=len(names))
    examples = [{"text": "x"} if labels is None else {"text": "x", "label": lab} for lab in (labels or [None])]
    got = label_list("classify", {}, model, examples)
    assert got == want and [type(g) for g in got] == [type(w) for w in want]


def test_label_list_of_ner_keeps_its_tags_labelled_or_not():
    from types import SimpleNamespace

    from fastbert.predict import label_list
    names = ["O", "B-X", "I-X"]
    model = SimpleNamespace(config=SimpleNamespace(id2label=dict(enumerate(names)), num_labels=3), num_labels=3)
    for examples in ([{"tokens": ["a"], "tags": ["O"]}], [{"tokens": ["a"]}]):
        assert label_list("ner", {}, model, examples) == names
