"""benchmarks/finetune_ab.py end to end on a micro model and tiny stand-ins for the data sets."""
import argparse
import json
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: `benchmarks` is not installed

WORDS = ["the", "cat", "sat", "on", "mat", "good", "bad", "movie", "paris", "london"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + WORDS
TAGS = ["O", "B-loc", "I-loc", "B-per", "I-per"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fastbert.config import BertConfig
    from fastbert.modeling import BertModel
    root = tmp_path_factory.mktemp("ab")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    model = root / "model"
    BertModel(cfg).save_pretrained(str(model))
    (model / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    rng = random.Random(0)
    (root / "data" / "sentiment_en").mkdir(parents=True)
    (root / "data" / "ner_en").mkdir()
    for split, n in (("train", 20), ("dev", 8)):
        rows = [{"text": " ".join(rng.choice(WORDS[:5]) for _ in range(4)) + (" good" if i % 2 else " bad"),
                 "label": i % 2} for i in range(n)]
        (root / "data" / "sentiment_en" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        # the short train file has no "per" entity; labels.txt must make the dev file's tags known
        lines = []
        for i in range(n):
            lines += ["the\tO", "paris\tB-loc", "london\tI-loc"] + (["cat\tB-per"] if split == "dev" else []) + [""]
        (root / "data" / "ner_en" / f"{split}.conll").write_text("\n".join(lines) + "\n")
    (root / "data" / "ner_en" / "labels.txt").write_text("\n".join(TAGS) + "\n")
    return root


def test_finetune_ab_writes_both_arms_and_the_ratio(setup, tmp_path):
    pytest.importorskip("transformers")
    from benchmarks import finetune_ab
    out = tmp_path / "results"
    rc = finetune_ab.main(["--model", str(setup / "model"), "--data-root", str(setup / "data"), "--epochs", "1",
                           "--threads", "1", "--device", "cpu", "--out", str(out),
                           "--experiments", "sentiment_en,ner_en,frozen"])
    assert rc == 0
    payload = json.loads((out / "finetune_ab.json").read_text())
    rows = {(r["experiment"], r["impl"]): r for r in payload["rows"]}
    assert set(rows) == {(name, impl) for name in ("sentiment_en", "ner_en")
                         for impl in ("fastbert", "transformers", "transformers-random")} | {("frozen", "fastbert")}
    for name in ("sentiment_en", "ner_en"):
        fb, hf, rnd = rows[(name, "fastbert")], rows[(name, "transformers")], rows[(name, "transformers-random")]
        for other in (hf, rnd):
            assert other["fastbert_speedup"] == pytest.approx(other["train_seconds"] / fb["train_seconds"], rel=1e-2)
            assert other["steps"] == fb["steps"] and other["threads"] == 1
        assert fb["threads"] == 1
        assert payload["context"]["arms"][f"{name}/transformers-random"]["batching"] == "random"
        arms = payload["context"]["arms"]  # every arm's full metrics.json
        assert arms[f"{name}/transformers"]["impl"] == "transformers"
        assert arms[f"{name}/fastbert"]["train_seconds"] == fb["train_seconds"]
        assert not any(arms[f"{name}/{impl}"]["cuda_graphs"] for impl in ("fastbert", "transformers"))
        assert 0.0 <= fb["dev"] <= 1.0 and 0.0 <= hf["dev"] <= 1.0
    assert rows[("ner_en", "fastbert")]["metric"] == "f1"
    assert rows[("frozen", "fastbert")]["freeze"] == "all"
    assert payload["machine"]["git_sha"] and payload["machine"]["torch"] == torch.__version__
    assert payload["context"]["smoke"] is True
    md = (out / "finetune_ab.md").read_text()
    assert "| sentiment_en | fastbert |" in md and "SMOKE RUN" in md and "Feature-based" in md
    # on a GPU too, every arm runs the same eager loop (--cuda-graphs auto would graph the fastbert arm)
    opts = argparse.Namespace(epochs=None, seed=42, precision="auto", threads=None, device="cuda",
                              max_train_examples=None, max_eval_examples=None)
    argv = finetune_ab.arm_argv(finetune_ab.EXPERIMENTS["sentiment_en"], "fastbert", "m", "d", "o", opts)
    assert argv[argv.index("--cuda-graphs") + 1] == "off"
