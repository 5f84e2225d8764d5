"""`fastbert finetune` and `fastbert encode` end to end on a micro model and tiny files."""
import json
import random

import numpy as np
import pytest
import torch

from fastbert.cli import main as cli

WORDS = ["the", "cat", "sat", "on", "mat", "near", "big", "red", "door", "where", "is", "it",
         "good", "bad", "movie", "paris", "london", "city", "capital", "of", "france", "england"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "##s"] + WORDS


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from fastbert.config import BertConfig
    from fastbert.modeling import BertModel
    d = tmp_path_factory.mktemp("micro")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(d))
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return str(d)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sentences(rng, n, k=(2, 7)):
    return [" ".join(rng.choice(WORDS[:12]) for _ in range(rng.randint(*k))) for _ in range(n)]


def make_data(task, d, rng):
    files = {}
    for split, n in (("train", 24), ("dev", 10), ("test", 7)):
        if task == "classify":
            rows = [{"text": s + (" good" if i % 2 else " bad"), "label": "pos" if i % 2 else "neg"}
                    for i, s in enumerate(_sentences(rng, n))]
        elif task == "pair":
            rows = [{"text_a": a, "text_b": b, "label": i % 3} for i, (a, b) in
                    enumerate(zip(_sentences(rng, n), _sentences(rng, n)))]
        elif task == "choice":
            rows = [{"question": q, "choices": ["good movie", "bad movie", "red door"], "label": i % 3}
                    for i, q in enumerate(_sentences(rng, n))]
        elif task == "qa":
            rows = []
            for i in range(n):
                city = ["paris", "london"][i % 2]
                # long enough that max-length 24 needs several windows
                ctx = " ".join(_sentences(rng, 1, (6, 14))) + f" the capital is {city} ." + " the cat sat" * (i % 3)
                rows.append({"question": "where is the capital ?", "context": ctx,
                             "answers": {"text": [city], "answer_start": [ctx.index(f"is {city}") + 3]}})
        else:
            lines = []
            for s in _sentences(rng, n):
                for w in s.split():
                    lines.append(f"{w}\t{'B-X' if w == 'cat' else 'I-X' if w == 'sat' else 'O'}")
                lines.append("")
            p = d / f"{split}.conll"
            p.write_text("\n".join(lines) + "\n")
            files[split] = str(p)
            continue
        files[split] = _jsonl(d / f"{split}.jsonl", rows)
    return files


@pytest.mark.parametrize("task, freeze", [("classify", "none"), ("pair", "1"), ("ner", "none"),
                                          ("qa", "none"), ("choice", "none"), ("classify", "all"),
                                          ("ner", "all")])
def test_finetune_each_task(micro_model, tmp_path, task, freeze):
    files = make_data(task, tmp_path, random.Random(1))
    out = tmp_path / "out"
    rc = cli(["finetune", "--task", task, "--model", micro_model, "--train", files["train"],
              "--dev", files["dev"], "--test", files["test"], "--out", str(out), "--epochs", "2",
              "--batch-size", "8", "--max-length", "24", "--freeze", freeze, "--lr", "1e-3"]
             + ([] if task == "qa" else ["--no-progress"]))  # qa runs with the tqdm bar
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    keys = {"classify": ["accuracy"], "pair": ["accuracy"], "choice": ["accuracy"], "ner": ["f1"],
            "qa": ["f1", "exact_match"]}[task]
    for split in ("dev", "test"):
        for k in keys:
            assert 0.0 <= m[split][k] <= 1.0
    assert len(m["history"]) == 2
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 7
    cfg = json.loads((out / "config.json").read_text())
    if task == "classify":
        assert cfg["id2label"] == {"0": "neg", "1": "pos"}
        assert {p["label"] for p in preds} <= {"neg", "pos"}
    if task == "ner":
        assert set(cfg["id2label"].values()) == {"O", "B-X", "I-X"}
        test_words = [l for l in open(files["test"]).read().split("\n\n") if l.strip()]
        assert [len(p["tags"]) for p in preds] == [len(s.splitlines()) for s in test_words]
    if task == "qa":
        # a predicted answer is a piece of its context, in the context's own characters
        ctxs = [json.loads(l)["context"] for l in open(files["test"])]
        assert all(p["answer"] in c for p, c in zip(preds, ctxs))
    assert (out / "model.safetensors").exists() and (out / "vocab.txt").exists()
    if freeze == "all":
        assert (out / "layer_mix.safetensors").exists()


def test_classify_learns_an_easy_rule(micro_model, tmp_path):
    # the label is the last word (good / bad): a micro model must get dev almost right
    rng = random.Random(0)
    rows = lambda n: [{"text": s + (" good" if i % 2 else " bad"), "label": i % 2}
                      for i, s in enumerate(_sentences(rng, n, (1, 3)))]
    tr, dv = _jsonl(tmp_path / "tr.jsonl", rows(160)), _jsonl(tmp_path / "dv.jsonl", rows(40))
    out = tmp_path / "out"
    assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", tr, "--dev", dv,
                "--out", str(out), "--epochs", "4", "--batch-size", "16", "--lr", "2e-3",
                "--max-length", "16", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "test" not in m
    assert m["dev"]["accuracy"] >= 0.9


def test_finetune_bad_input_is_a_clear_error(micro_model, tmp_path, capsys):
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}])
    dv = _jsonl(tmp_path / "dv.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "c"}])
    base = ["finetune", "--task", "classify", "--model", micro_model, "--train", tr, "--out",
            str(tmp_path / "o"), "--no-progress"]
    assert cli(base + ["--dev", dv]) == 2
    assert "dv.jsonl:2: label 'c' does not occur in the training file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert cli(base + ["--dev", str(tmp_path / "empty.jsonl")]) == 2
    assert "empty.jsonl: the file is empty" in capsys.readouterr().err
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "good"}])
    assert cli(base + ["--dev", bad]) == 2
    assert "bad.jsonl:1: missing field 'label'" in capsys.readouterr().err


def test_encode_npy_and_jsonl(micro_model, tmp_path, monkeypatch):
    from fastbert.modeling import BertModel
    from fastbert.tasks import load_tokenizer
    lines = ["the cat sat", "good movie", "where is it ?"]
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(lines) + "\n")
    assert cli(["encode", "--model", micro_model, "--input", str(inp), "--output", str(tmp_path / "e.npy"),
                "--pooling", "mean", "--normalize"]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # the mean of the last layer over real tokens, computed here one sentence at a time
    model, tok = BertModel.from_pretrained(micro_model), load_tokenizer(micro_model)
    with torch.no_grad():
        h = model(torch.tensor([tok.encode(lines[2]).ids])).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(emb[2], (h / h.norm()).numpy(), rtol=1e-4, atol=1e-5)

    assert cli(["encode", "--model", micro_model, "--input", str(inp), "--output", str(tmp_path / "e.jsonl"),
                "--pooling", "cls"]) == 0
    rows = [json.loads(l) for l in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == lines
    with torch.no_grad():
        cls0 = model(torch.tensor([tok.encode(lines[0]).ids])).last_hidden_state[0, 0]
    np.testing.assert_allclose(rows[0]["embedding"], cls0.numpy(), rtol=1e-4, atol=1e-5)
