"""`fastbert finetune` and `fastbert encode` end to end on a micro model and tiny files."""
import io
import json
import os
import random
import stat

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
              "--batch-size", "8", "--max-length", "24", "--freeze", freeze, "--lr", "1e-3", "--device", "cpu"]
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
                "--max-length", "16", "--no-progress", "--device", "cpu"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "test" not in m
    assert m["dev"]["accuracy"] >= 0.9


def test_finetune_bad_input_is_a_clear_error(micro_model, tmp_path, capsys):
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}])
    dv = _jsonl(tmp_path / "dv.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "c"}])
    base = ["finetune", "--task", "classify", "--model", micro_model, "--train", tr, "--out",
            str(tmp_path / "o"), "--no-progress", "--device", "cpu"]
    assert cli(base + ["--dev", dv]) == 2
    assert "dv.jsonl:2: label 'c' does not occur in the training file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("")
    assert cli(base + ["--dev", str(tmp_path / "empty.jsonl")]) == 2
    assert "empty.jsonl: the file is empty" in capsys.readouterr().err
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "good"}])
    assert cli(base + ["--dev", bad]) == 2
    assert "bad.jsonl:1: missing field 'label'" in capsys.readouterr().err


def test_finetune_refuses_to_write_over_its_own_model(micro_model, tmp_path, capsys, monkeypatch):
    """--out naming the --model folder (by another spelling too: a link to it, a relative path) would
    replace the model the run starts from: refused before anything is written."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    (tmp_path / "alias").symlink_to(model, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}])
    for out in (str(model), str(model) + "/", str(tmp_path / "." / "model"), str(tmp_path / "alias"), "model",
                "alias/"):
        assert cli(["finetune", "--task", "classify", "--model", str(model), "--train", tr, "--dev", tr,
                    "--out", out, "--no-progress", "--device", "cpu"]) == 2
        assert "is the --model folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before


def test_a_label_outside_the_label_set_names_where_the_set_came_from(micro_model, tmp_path, capsys):
    """Without --labels the error points at --labels (the fix for a shortened training file); with
    --labels FILE a label missing from FILE is FILE's fault, not "not in the training file"."""
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}])
    dv = _jsonl(tmp_path / "dv.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "c"}])
    base = ["finetune", "--task", "classify", "--model", micro_model, "--train", tr, "--dev", dv, "--out",
            str(tmp_path / "o"), "--no-progress", "--device", "cpu"]
    assert cli(base) == 2
    assert "--labels FILE gives the full label set" in capsys.readouterr().err
    (tmp_path / "labels.txt").write_text("a\nc\n")
    assert cli(base + ["--labels", str(tmp_path / "labels.txt")]) == 2
    err = capsys.readouterr().err
    assert f"tr.jsonl:2: label 'b' is not listed in --labels {tmp_path / 'labels.txt'}" in err
    assert "training file" not in err


@pytest.mark.parametrize("flag, value, least", [("--max-train-examples", 0, 1), ("--max-eval-examples", 0, 1),
                                                 ("--max-answer-length", 0, 1), ("--doc-stride", -1, 0)])
def test_finetune_counts_out_of_range_are_a_usage_error(micro_model, tmp_path, capsys, flag, value, least):
    """0 examples, a 0-token answer or a negative window overlap is a clear exit 2 before any work, not
    an IndexError, "accuracy of an empty set" or doc_stride traceback after it (or a run that predicts
    only empty answers)."""
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}])
    rc = cli(["finetune", "--task", "classify", "--model", micro_model, "--train", tr, "--dev", tr, "--out",
              str(tmp_path / "o"), "--no-progress", "--device", "cpu", flag, str(value)])
    assert rc == 2
    assert f"{flag} must be at least {least}, not {value}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_pretraining_run_before_its_first_checkpoint_is_said_to_hold_random_weights(micro_model, tmp_path, capsys):
    """`fastbert pretrain` writes its step-0 model so that the run folder loads from the start, with a note
    that the first checkpoint removes; fine-tuning or encoding from such a folder (a run stopped before
    its first checkpoint) warns what the weights are (random, or --init-from's). Other folders: no word.
    (tests/test_pretrain_cli.py: the note's life in a real run.)"""
    import shutil

    from fastbert.trainer import INITIAL_MODEL_FILE
    run = tmp_path / "run"
    shutil.copytree(micro_model, run)
    (run / INITIAL_MODEL_FILE).write_text('{"init_from": null}')  # as fastbert pretrain writes it at step 0
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}])
    (tmp_path / "in.txt").write_text("good movie\n")
    warning = f"{run} is a pretraining run that has not reached its first checkpoint"

    def warned():
        capsys.readouterr()
        assert cli(["finetune", "--task", "classify", "--model", str(run), "--train", tr, "--dev", tr, "--out",
                    str(tmp_path / "o"), "--device", "cpu", "--no-progress", "--epochs", "1"]) == 0
        finetune_err = capsys.readouterr().err
        assert cli(["encode", "--model", str(run), "--input", str(tmp_path / "in.txt"), "--output",
                    str(tmp_path / "e.npy"), "--device", "cpu"]) == 0
        return finetune_err, capsys.readouterr().err
    assert all(f"{warning}: its model is the run's random initialisation" in err for err in warned())
    (run / INITIAL_MODEL_FILE).write_text('{"init_from": "runs/small"}')
    capsys.readouterr()
    assert cli(["encode", "--model", str(run), "--input", str(tmp_path / "in.txt"), "--output",
                str(tmp_path / "e.npy"), "--device", "cpu"]) == 0
    assert "its model is the weights it started from (--init-from runs/small)" in capsys.readouterr().err
    (run / INITIAL_MODEL_FILE).unlink()  # the first checkpoint's model replaced it, or any other folder
    assert not any(warning in err for err in warned())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_against_a_float64_loop(dtype):
    """encode.pool: the mean over each row's real tokens (wherever they sit, not only a prefix), [CLS]'s
    state, L2 normalisation, fp32 out whatever the hidden dtype; a row with no real token gives zeros,
    normalised or not. The reference is a float64 loop over tokens."""
    from fastbert.encode import pool
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(4, 7, 5, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0, 0], [0] * 7])
    x = hidden.to(dtype)
    exact = x.double()  # what the pool sees: the input already rounded to dtype
    mean = torch.zeros(4, 5, dtype=torch.float64)
    for b in range(4):
        rows = [exact[b, t] for t in range(7) if mask[b, t]]
        if rows:
            mean[b] = sum(rows) / len(rows)
    for pooling, want in (("mean", mean), ("cls", exact[:, 0])):
        for normalize in (False, True):
            got = pool(x, mask, pooling, normalize)
            ref = want / want.norm(dim=-1, keepdim=True).clamp(min=1e-12) if normalize else want
            assert got.dtype == torch.float32 and got.shape == (4, 5)
            torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
            if normalize:
                norms = got.norm(dim=-1)
                torch.testing.assert_close(norms[:3], torch.ones(3), rtol=1e-6, atol=0)
    assert pool(x, mask, "mean", True)[3].eq(0).all() and pool(x, mask, "mean")[3].eq(0).all()


def test_encode_npy_and_jsonl(micro_model, tmp_path, monkeypatch):
    from fastbert.modeling import BertModel
    from fastbert.tasks import load_tokenizer
    lines = ["the cat sat", "good movie", "where is it ?"]
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(lines) + "\n")
    assert cli(["encode", "--model", micro_model, "--input", str(inp), "--output", str(tmp_path / "e.npy"),
                "--pooling", "mean", "--normalize", "--device", "cpu", "--precision", "fp32"]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # the mean of the last layer over real tokens, computed here one sentence at a time
    model, tok = BertModel.from_pretrained(micro_model), load_tokenizer(micro_model)
    with torch.no_grad():
        h = model(torch.tensor([tok.encode(lines[2]).ids])).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(emb[2], (h / h.norm()).numpy(), rtol=1e-4, atol=1e-5)

    from test_modeling import last_layer_row_counts
    with last_layer_row_counts() as rows:  # cls pooling: the last layer past attention on [CLS] rows only
        assert cli(["encode", "--model", micro_model, "--input", str(inp), "--output", str(tmp_path / "e.jsonl"),
                    "--pooling", "cls", "--device", "cpu"]) == 0
    assert rows == [3]
    rows = [json.loads(l) for l in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == lines
    with torch.no_grad():
        cls0 = model(torch.tensor([tok.encode(lines[0]).ids])).last_hidden_state[0, 0]
    np.testing.assert_allclose(rows[0]["embedding"], cls0.numpy(), rtol=1e-4, atol=1e-5)


def test_encode_output_that_cannot_be_written_is_a_clear_error_before_the_work(micro_model, tmp_path, capsys,
                                                                               monkeypatch):
    """--output in a folder that does not exist: exit 2 with the path named, before any text is
    encoded (not a traceback after all of them)."""
    from fastbert import encode
    inp = tmp_path / "in.txt"
    inp.write_text("the cat sat\ngood movie\n")
    monkeypatch.setattr(encode, "embed", lambda *a, **k: pytest.fail("encoded before checking --output"))
    for name in ("e.npy", "e.jsonl"):
        out = tmp_path / "no-such-dir" / name
        assert cli(["encode", "--model", micro_model, "--input", str(inp), "--output", str(out),
                    "--device", "cpu", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"fastbert encode: error: --output {out}: " in err and "Traceback" not in err


def test_encode_to_a_pipe_that_closes_early_ends_quietly(micro_model, tmp_path):
    """`fastbert encode ... | head -1`: the reader going away ends the command without a traceback."""
    import os
    import subprocess
    import sys
    inp = tmp_path / "in.txt"
    inp.write_text("the cat sat on the mat near the big red door\n" * 3000)  # far more than a pipe buffer
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "fastbert.cli", "encode", "--model", micro_model, "--input",
                             str(inp), "--device", "cpu", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline().startswith(b'{"text": "the cat sat')
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_cli_warnings_read_as_the_commands_own_lines(tmp_path):
    """A warning from the library (here: encode on a pretraining run's folder, whose MLM and NSP heads
    BertModel does not use) reaches a command's user as one line naming the command, not as a path
    into the package's source followed by the source line that warned."""
    import os
    import subprocess
    import sys

    from fastbert.config import BertConfig
    from fastbert.modeling import BertForPreTraining
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertForPreTraining(cfg).save_pretrained(str(tmp_path / "run"))
    (tmp_path / "run" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "fastbert.cli", "encode", "--model", str(tmp_path / "run"),
                           "--device", "cpu", "--no-progress"], input=b"the cat sat\n", capture_output=True,
                          env=env, timeout=120)
    assert proc.returncode == 0
    err = proc.stderr.decode()
    assert "fastbert encode: warning: BertModel: checkpoint weights not used: cls.predictions.bias" in err, err
    assert "UserWarning" not in err and "from_pretrained(" not in err, err


def test_encode_cuda_graphs_needs_a_gpu(micro_model, tmp_path, capsys):
    """--cuda-graphs on the CPU: a clear error, not a crash halfway."""
    from fastbert.encode import length_buckets
    assert length_buckets(512) == (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448, 480, 512)
    assert length_buckets(40) == (32, 40) and length_buckets(32) == (32,)
    inp = tmp_path / "in.txt"
    inp.write_text("the cat sat\ngood movie\nwhere is it ?\n" + "the big red door is near the mat .\n" * 4)
    base = ["encode", "--model", micro_model, "--input", str(inp), "--precision", "fp32", "--batch-size", "4"]
    assert cli(base + ["--device", "cpu", "--cuda-graphs"]) == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
    assert cli(base + ["--device", "cpu", "--cuda-graphs", "on"]) == 2
    assert "--cuda-graphs needs a CUDA device" in capsys.readouterr().err
    out = tmp_path / "e.npy"
    for choice in ("auto", "off"):  # auto (the default) and off run eagerly on the CPU
        assert cli(base + ["--device", "cpu", "--cuda-graphs", choice, "--output", str(out)]) == 0
        assert np.load(out).shape == (7, 32)


def test_encode_cuda_graphs_auto_is_on_for_small_batches_on_a_gpu():
    from fastbert.runtime import GRAPHS_AUTO_MAX_BATCH, use_cuda_graphs
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert use_cuda_graphs("auto", cuda, 64) and use_cuda_graphs("auto", cuda, GRAPHS_AUTO_MAX_BATCH)
    assert not use_cuda_graphs("auto", cuda, GRAPHS_AUTO_MAX_BATCH + 1)  # large batches: eager was faster
    assert not use_cuda_graphs("auto", cpu, 4) and not use_cuda_graphs("off", cuda, 4)
    assert use_cuda_graphs("on", cuda, 4096)
    assert use_cuda_graphs(True, cuda, 4096) and not use_cuda_graphs(False, cuda, 4)  # the old flag's bool


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encode_cuda_graphs_gives_the_eager_commands_vectors(micro_model, tmp_path, monkeypatch, precision):
    """--cuda-graphs on a GPU (benchmarks/gpu_check.sh, compiled kernels; the default at batch 4): the same
    vectors as the eager command (--cuda-graphs off), in both precisions; the graphs run the padded layout, the eager command the
    unpadded one, so bf16 agrees to its rounding, fp32 (TF32 off) to 1e-4."""
    inp = tmp_path / "in.txt"
    inp.write_text("the cat sat\ngood movie\nwhere is it ?\n" + "the big red door is near the mat .\n" * 4)
    base = ["encode", "--model", micro_model, "--input", str(inp), "--precision", precision, "--batch-size", "4",
            "--device", "cuda", "--normalize"]
    torch.backends.cuda.matmul.allow_tf32 = False
    from fastbert import encode
    built, real_graphed = [], encode._graphed  # what each run built: a GraphedEncoder, or None (eager)
    monkeypatch.setattr(encode, "_graphed", lambda *a, **k: built.append(real_graphed(*a, **k)) or built[-1])
    assert cli(base + ["--output", str(tmp_path / "g.npy")]) == 0  # auto: graphs at this batch size
    assert cli(base + ["--output", str(tmp_path / "e.npy"), "--cuda-graphs", "off"]) == 0
    assert built[0] is not None and built[1] is None
    graphed, eager = np.load(tmp_path / "g.npy"), np.load(tmp_path / "e.npy")
    assert graphed.shape == eager.shape == (7, 32)
    if precision == "fp32":
        np.testing.assert_allclose(graphed, eager, rtol=1e-4, atol=1e-5)
    else:  # normalised vectors: bf16's 8-bit mantissa over a few layers, not a different computation
        np.testing.assert_allclose(graphed, eager, atol=3e-2)
        assert (graphed * eager).sum(1).min() > 0.999


def test_finetune_cuda_graphs_refuses_what_it_cannot_run(micro_model, tmp_path, capsys):
    files = make_data("classify", tmp_path, random.Random(1))
    (tmp_path / "qa").mkdir()
    qa = make_data("qa", tmp_path / "qa", random.Random(1))
    base = ["finetune", "--model", micro_model, "--out", str(tmp_path / "o"), "--epochs", "1", "--no-progress",
            "--cuda-graphs"]
    for extra, message in (
            (["--task", "qa", "--train", qa["train"], "--dev", qa["dev"]], "--cuda-graphs does not run qa"),
            (["--task", "classify", "--train", files["train"], "--dev", files["dev"], "--impl", "transformers"],
             "--cuda-graphs runs fastbert's own models only"),
            (["--task", "classify", "--train", files["train"], "--dev", files["dev"], "--device", "cpu"],
             "--cuda-graphs needs a CUDA device, not cpu"),
            (["--task", "classify", "--train", files["train"], "--dev", files["dev"], "--grad-accum", "2"],
             "--cuda-graphs does not run --grad-accum above 1")):
        assert cli(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_finetune_cuda_graphs_auto_is_on_where_graphs_run(capsys):
    """--cuda-graphs auto (the default): graphs for a CUDA run that can take them at a batch size up to
    GRAPHS_AUTO_MAX_BATCH, eager (and said why) for one that cannot; on insists, off never."""
    from argparse import Namespace
    from fastbert.finetune import UsageError, use_cuda_graphs
    from fastbert.runtime import GRAPHS_AUTO_MAX_BATCH
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def args(choice="auto", task="classify", impl="fastbert", batch=32, accum=1):
        return Namespace(cuda_graphs=choice, task=task, impl=impl, batch_size=batch, grad_accum=accum)
    assert use_cuda_graphs(args(), cuda, "bf16") and use_cuda_graphs(args(task="choice"), cuda, "fp32")
    assert use_cuda_graphs(args(batch=GRAPHS_AUTO_MAX_BATCH), cuda, "bf16")
    assert capsys.readouterr().err == ""
    for a, precision, why in ((args(task="qa"), "bf16", "does not run qa"),
                              (args(), "fp16", "does not run fp16"),
                              (args(impl="transformers"), "bf16", "fastbert's own models only"),
                              (args(accum=4), "bf16", "does not run --grad-accum above 1"),
                              (args(batch=GRAPHS_AUTO_MAX_BATCH + 1), "bf16", f"is above {GRAPHS_AUTO_MAX_BATCH}")):
        assert not use_cuda_graphs(a, cuda, precision)
        err = capsys.readouterr().err
        assert "CUDA graphs off (--cuda-graphs auto)" in err and why in err
    assert not use_cuda_graphs(args(), cpu, "fp32") and capsys.readouterr().err == ""  # the CPU: silently eager
    assert not use_cuda_graphs(args("off"), cuda, "bf16")
    assert use_cuda_graphs(args("on", batch=1024), cuda, "bf16")
    with pytest.raises(UsageError, match="--cuda-graphs does not run qa"):
        use_cuda_graphs(args("on", task="qa"), cuda, "bf16")
    assert use_cuda_graphs(Namespace(cuda_graphs=True, task="pair", impl="fastbert", batch_size=8), cuda, "bf16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("task, freeze", [("classify", "none"), ("ner", "none"), ("choice", "none"),
                                          ("pair", "1"), ("classify", "all")])
def test_finetune_cuda_graphs_trains_like_the_eager_loop(micro_no_dropout, tmp_path, monkeypatch, task, freeze):
    """--cuda-graphs on a GPU (benchmarks/gpu_check.sh): without dropout, the graphed steps (padded
    layout, two 32-token buckets, a last batch padded with ignored rows) train like the eager loop
    (unpadded): the same per-epoch training losses and final weights, fp32 with TF32 off, weights that
    moved far more than the two differ; frozen lower layers and the frozen encoder + layer mix too."""
    from safetensors.torch import load_file
    files = make_data(task, tmp_path, random.Random(2))
    if task == "classify":  # a few examples past 32 tokens: the second bucket is captured mid-epoch
        with open(files["train"], "a") as f:
            for i in range(3):
                f.write(json.dumps({"text": " ".join(["the", "big", "red", "door"] * 9), "label": ["neg", "pos"][i % 2]})
                        + "\n")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    runs = {}
    for mode in ("graphs", "eager"):
        out = tmp_path / mode
        assert cli(["finetune", "--task", task, "--model", micro_no_dropout, "--train", files["train"],
                    "--dev", files["dev"], "--out", str(out), "--epochs", "3", "--batch-size", "5",
                    "--max-length", "60", "--lr", "1e-3", "--device", "cuda", "--precision", "fp32",
                    "--freeze", freeze, "--no-progress"]  # graphs: the default (auto) at this batch size
                   + ([] if mode == "graphs" else ["--cuda-graphs", "off"])) == 0
        runs[mode] = (json.loads((out / "metrics.json").read_text()),
                      load_file(str(out / ("layer_mix.safetensors" if freeze == "all" else "model.safetensors"))))
    (g, g_w), (e, e_w) = runs["graphs"], runs["eager"]
    # capture time is part of training time; both are rounded to 0.01 s, so a short run can show them equal
    assert g["cuda_graphs"] and not e["cuda_graphs"] and 0 < g["capture_seconds"] <= g["train_seconds"]
    assert g["best_epoch"] == e["best_epoch"]
    for gh, eh in zip(g["history"], e["history"], strict=True):
        assert gh["train_loss"] == pytest.approx(eh["train_loss"], rel=1e-4), gh["epoch"]
    init = {} if freeze == "all" else load_file(f"{micro_no_dropout}/model.safetensors")
    moved = 0.0
    for name, w in e_w.items():
        torch.testing.assert_close(g_w[name], w, rtol=1e-4, atol=1e-5, msg=name)
        start = init.get(name.removeprefix("bert."))
        if start is not None:
            moved = max(moved, (w - start).abs().max().item())
    assert freeze == "all" or moved > 1e-3  # 100x the tolerance: the steps did train


# ------------------------------------------------------------------- device, random init, baseline arm

@pytest.fixture(scope="module")
def micro_no_dropout(tmp_path_factory):
    """A micro checkpoint without dropout, so two implementations of the same loop must agree step by step."""
    from fastbert.config import BertConfig
    from fastbert.modeling import BertModel
    d = tmp_path_factory.mktemp("micro_nodrop")
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(str(d))
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return str(d)


@pytest.mark.parametrize("task, freeze", [("ner", "1"), ("classify", "all")])
def test_transformers_arm_runs_the_same_loop(micro_no_dropout, tmp_path, task, freeze):
    # Same initial weights (head included), data order, batches, optimizer and schedule: without
    # dropout the two implementations must give the same training losses and dev predictions.
    pytest.importorskip("transformers")
    files = make_data(task, tmp_path, random.Random(2))
    runs = {}
    for impl in ("fastbert", "transformers"):
        out = tmp_path / impl
        assert cli(["finetune", "--task", task, "--model", micro_no_dropout, "--train", files["train"],
                    "--dev", files["dev"], "--test", files["test"], "--out", str(out), "--epochs", "2",
                    "--batch-size", "8", "--max-length", "24", "--lr", "3e-3", "--freeze", freeze,
                    "--impl", impl, "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
        runs[impl] = (json.loads((out / "metrics.json").read_text()),
                      (out / "predictions.jsonl").read_text())
    (fb, fb_pred), (hf, hf_pred) = runs["fastbert"], runs["transformers"]
    fb_loss = [h["train_loss"] for h in fb["history"]]
    assert fb_loss[1] < fb_loss[0]  # it trains at all
    assert [h["train_loss"] for h in hf["history"]] == pytest.approx(fb_loss, rel=1e-5)
    assert hf["dev"] == fb["dev"] and hf_pred == fb_pred
    assert (fb["impl"], hf["impl"]) == ("fastbert", "transformers")
    for m in (fb, hf):
        assert m["device"] == "cpu" and m["precision"] == "fp32" and m["threads"] == 1
        assert 0 < m["train_seconds"] <= m["total_seconds"]


def test_random_init_keeps_config_and_tokenizer(micro_model, tmp_path):
    from safetensors.torch import load_file
    from fastbert.finetune import build_model
    ckpt = load_file(f"{micro_model}/model.safetensors")
    torch.manual_seed(5)
    a = build_model("classify", micro_model, ["neg", "pos"], "none", random_init=True)
    torch.manual_seed(5)
    b = build_model("classify", micro_model, ["neg", "pos"], "none", random_init=True)
    torch.manual_seed(5)
    pre = build_model("classify", micro_model, ["neg", "pos"], "none")
    sa, sb, sp = a.state_dict(), b.state_dict(), pre.state_dict()
    assert sa.keys() == sp.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # seeded: the same fresh weights every time
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(sp[key], ckpt[key.removeprefix("bert.")])
    assert not torch.allclose(sa[key], sp[key])
    assert a.config.hidden_size == pre.config.hidden_size and a.config.id2label == {0: "neg", 1: "pos"}
    # through the command line: recorded in metrics.json, tokenizer files copied
    files = make_data("classify", tmp_path, random.Random(3))
    out = tmp_path / "out"
    assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", files["train"],
                "--dev", files["dev"], "--out", str(out), "--epochs", "1", "--batch-size", "8",
                "--max-length", "24", "--random-init", "--device", "cpu", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["random_init"] is True and (out / "vocab.txt").exists()


@pytest.mark.parametrize("extra, message", [
    (["--device", "cpu", "--precision", "fp16"], "fp16 needs a CUDA device"),
    (["--device", "tpu:0"], "--device 'tpu:0'"),
    (["--device", "nonsense"], "expected cpu, cuda or cuda:N"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU is available")]))
def test_device_and_precision_errors(micro_model, tmp_path, capsys, extra, message):
    base = ["--model", micro_model, "--no-progress"]
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    assert cli(["finetune", "--task", "classify", "--train", tr, "--dev", tr, "--out", str(tmp_path / "o")]
               + base + extra) == 2
    assert message in capsys.readouterr().err
    (tmp_path / "in.txt").write_text("good\n")
    assert cli(["encode", "--model", micro_model, "--input", str(tmp_path / "in.txt")] + extra) == 2
    assert message in capsys.readouterr().err


def test_transformers_arm_without_transformers_is_a_clear_error(micro_model, tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", tr, "--dev", tr,
                "--out", str(tmp_path / "o"), "--impl", "transformers", "--device", "cpu"]) == 2
    assert "--impl transformers needs the transformers package" in capsys.readouterr().err


def test_label_file(tmp_path):
    from fastbert.finetune import read_label_file
    from fastbert.tasks import DataError
    (tmp_path / "ner.txt").write_text("O\nB-X\nI-X\nB-Y\n\n")
    assert read_label_file(str(tmp_path / "ner.txt"), "ner", []) == ["O", "B-X", "I-X", "B-Y"]
    (tmp_path / "cls.txt").write_text("1\n0\n")
    assert read_label_file(str(tmp_path / "cls.txt"), "classify", [{"label": 0}]) == [1, 0]
    assert read_label_file(str(tmp_path / "cls.txt"), "classify", [{"label": "0"}]) == ["1", "0"]
    (tmp_path / "bad.txt").write_text("O\nX-1\n")
    with pytest.raises(DataError, match="bad.txt"):
        read_label_file(str(tmp_path / "bad.txt"), "ner", [])
    (tmp_path / "dup.txt").write_text("a\na\n")
    with pytest.raises(DataError, match="listed twice"):
        read_label_file(str(tmp_path / "dup.txt"), "classify", [{"label": "a"}])


# ------------------------------------------------------------ regressions (session 13's bug hunt)

# `fastbert encode`'s input: row i belongs to line i, whatever the line endings; unreadable input is a clear error

def _rows(path):
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]


def test_encode_splits_lines_at_newlines_only(micro_model, tmp_path, monkeypatch):
    # a BOM (Notepad), CRLF endings and a bare CR inside a line (scraped text): three lines, three rows
    inp = tmp_path / "in.txt"
    inp.write_bytes(b"\xef\xbb\xbfthe cat\r\ngood\rmovie\r\nwhere is it ?\r\n")
    out = tmp_path / "e.jsonl"
    assert cli(["encode", "--model", micro_model, "--input", str(inp), "--output", str(out), "--device", "cpu"]) == 0
    assert [r["text"] for r in _rows(out)] == ["the cat", "good\rmovie", "where is it ?"]
    # stdin alike
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(inp.read_bytes()), encoding="utf-8"))
    assert cli(["encode", "--model", micro_model, "--output", str(out), "--device", "cpu"]) == 0
    assert [r["text"] for r in _rows(out)] == ["the cat", "good\rmovie", "where is it ?"]


def test_encode_unreadable_input_is_a_clear_error(micro_model, tmp_path, capsys):
    base = ["encode", "--model", micro_model, "--device", "cpu", "--input"]
    assert cli(base + [str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: No such file or directory" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 cat\n")
    assert cli(base + [str(tmp_path / "latin1.txt")]) == 2
    assert "latin1.txt: not UTF-8 text" in capsys.readouterr().err
    for given, message in ((str(tmp_path), "is a folder; give a text file"), ("", "--input is empty")):
        assert cli(base + [given]) == 2  # JSONL to stdout: it said "0 lines written to stdout before it"
        err = capsys.readouterr().err
        assert message in err and "written" not in err, err


# `fastbert encode`'s numeric options: a clear error or the documented clamp, never a traceback

def test_encode_max_length_above_the_models_positions_is_clamped(micro_model, tmp_path, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text("the cat sat\n" + "cat " * 100 + "\n")
    out = tmp_path / "e.npy"
    assert cli(["encode", "--model", micro_model, "--input", str(inp), "--output", str(out), "--device", "cpu",
                "--max-length", "100"]) == 0
    assert np.load(out).shape == (2, 32)
    assert "1 of 2 texts truncated to 64 tokens" in capsys.readouterr().err


def test_encode_bad_sizes_are_a_clear_error(micro_model, tmp_path, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text("the cat sat\n")
    base = ["encode", "--model", micro_model, "--input", str(inp), "--device", "cpu"]
    assert cli(base + ["--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    assert cli(base + ["--max-length", "4"]) == 2
    assert "--max-length 4 is too small" in capsys.readouterr().err


# `fastbert finetune`'s numeric options: out-of-range values are a usage error (exit 2), not a traceback

@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--eval-batch-size", "-1"], "--eval-batch-size must be at least 1"),
    (["--threads", "-2"], "--threads must be at least 1"),
    (["--max-length", "4"], "--max-length 4 is too small"),
    (["--lr=-1e-5"], "--lr must be a finite number at least 0"),
    (["--lr", "inf"], "--lr must be a finite number at least 0"),
    (["--weight-decay=-0.1"], "--weight-decay must be a finite number at least 0"),
    (["--max-grad-norm=-1"], "--max-grad-norm must be a finite number at least 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number at least 0"),
    (["--warmup", "1.5"], "--warmup is a fraction of the steps in [0, 1]"),
    (["--train", "-"], "--train -: fastbert finetune reads files by name"),  # "-" is predict's stdin only
    (["--test", "-"], "--test -: fastbert finetune reads files by name"),
    (["--dev", "-"], "--dev -: fastbert finetune reads files by name"),
    (["--labels", "-"], "--labels -: fastbert finetune reads files by name"),
])
def test_finetune_bad_sizes_are_a_usage_error(micro_model, tmp_path, capsys, extra, message):
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", tr, "--dev", tr,
                "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"] + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# `fastbert finetune --freeze N` above the model's layer count: a usage error before anything is written

def test_finetune_freeze_more_layers_than_the_model_has(micro_model, tmp_path, capsys):
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", tr, "--dev", tr,
                "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress", "--freeze", "3"]) == 2
    assert "--freeze 3: the model has 2 layers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# `fastbert finetune --out`: an unusable output folder is found before training, not after it

def test_finetune_out_that_is_a_file_fails_before_training(micro_model, tmp_path, capsys):
    files = make_data("classify", tmp_path, random.Random(1))
    (tmp_path / "taken").write_text("not a folder\n")
    assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", files["train"],
                "--dev", files["dev"], "--out", str(tmp_path / "taken"), "--epochs", "1", "--batch-size", "8",
                "--max-length", "24", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "taken" in err
    assert "epoch 1" not in err  # no training ran first


# `fastbert finetune --out` over an earlier run's folder: nothing of the earlier run passes for this one's

def test_finetune_into_a_used_out_folder(micro_model, tmp_path):
    from fastbert.tasks import load_tokenizer
    files = make_data("classify", tmp_path, random.Random(1))
    out = tmp_path / "out"
    out.mkdir()
    # left by an earlier run: another model's tokenizer.json, its predictions, a layer mix
    (out / "tokenizer.json").write_text("{}")
    (out / "predictions.jsonl").write_text('{"index": 0, "label": "stale"}\n')
    (out / "layer_mix.safetensors").write_bytes(b"stale")
    assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", files["train"],
                "--dev", files["dev"], "--out", str(out), "--epochs", "1", "--batch-size", "8",
                "--max-length", "24", "--device", "cpu", "--no-progress"]) == 0
    assert not (out / "predictions.jsonl").exists()  # no --test this time
    assert not (out / "layer_mix.safetensors").exists()
    tok, ref = load_tokenizer(str(out)), load_tokenizer(micro_model)  # the fine-tuned model's own tokenizer
    assert tok.encode("the cat sat").ids == ref.encode("the cat sat").ids


def test_layer_mix_qa_loss_and_gradients_match_on_a_transformers_encoder():
    """--freeze all QA (fastbert.layer_mix): the span loss normalises over every position, padding too,
    as on transformers' encoder (the --impl transformers arm), so the two arms give one loss and
    gradients (float64: to rounding)."""
    pytest.importorskip("transformers")
    from fastbert.config import BertConfig
    from fastbert.finetune import _transformers_copy
    from fastbert.layer_mix import LayerMixModel
    from fastbert.modeling import BertModel
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=40)).double()
    ids = torch.randint(1, 101, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    spans = dict(start_positions=torch.tensor([1, 2, 0]), end_positions=torch.tensor([4, 3, 1]))
    results = []
    for encoder in (_transformers_copy(bert, "BertModel").double(), bert):
        torch.manual_seed(0)
        model = LayerMixModel(encoder, "qa", dropout=0.0).double().train()
        loss = model(ids, mask, **spans).loss
        loss.backward()
        results.append((loss.detach(), model.mix.weights.grad, model.head.weight.grad))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


# a non-finite training loss ends `fastbert finetune` with its message and exit status 1 (as pretrain)

def test_finetune_non_finite_loss_is_a_clear_error(micro_model, tmp_path, capsys):
    files = make_data("classify", tmp_path, random.Random(1))
    assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", files["train"],
                "--dev", files["dev"], "--out", str(tmp_path / "o"), "--epochs", "1", "--batch-size", "8",
                "--max-length", "24", "--lr", "1e30", "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "fastbert finetune: error: non-finite training loss in epoch 1, steps 1..3" in err, err
    assert not (tmp_path / "o" / "metrics.json").exists()


# `fastbert finetune --freeze all` writes a layer-mix model: its head is in layer_mix.safetensors, so a
# BertFor* class loaded from that folder has a fresh head; loading must say so and name the loader to use

def test_layer_mix_folder_loaded_as_a_head_class_names_layer_mix_model(micro_model, tmp_path):
    from fastbert.finetune import build_model
    from fastbert.layer_mix import LayerMixModel
    from fastbert.modeling import BertForSequenceClassification
    torch.manual_seed(0)
    mix = build_model("classify", micro_model, ["neg", "pos"], "all")
    mix.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="LayerMixModel.from_pretrained"):
        BertForSequenceClassification.from_pretrained(str(tmp_path))
    back = LayerMixModel.from_pretrained(str(tmp_path))  # the loader that does give the trained model back
    ids = torch.tensor([[2, 9, 10, 3]])
    torch.testing.assert_close(back(ids).logits, mix.eval()(ids).logits)


# `fastbert finetune` as it goes: history.jsonl, the best epoch on disk at once, a training curve

def _classify_run(micro_model, tmp_path, *extra):
    files = make_data("classify", tmp_path, random.Random(3))
    out = tmp_path / "o"
    rc = cli(["finetune", "--task", "classify", "--model", micro_model, "--train", files["train"],
              "--dev", files["dev"], "--out", str(out), "--device", "cpu", "--no-progress",
              "--batch-size", "4", "--epochs", "3", "--lr", "1e-3", *extra])
    return rc, out


def test_finetune_into_an_earlier_runs_folder_says_it_replaces_it(micro_model, tmp_path, capsys):
    """`fastbert pretrain` refuses an --out that holds a run; `fastbert finetune` reuses one by design
    (reruns, grids), but says so before the earlier run's files go, so a mistyped --out is noticed."""
    assert _classify_run(micro_model, tmp_path, "--epochs", "1")[0] == 0
    assert "replaces" not in capsys.readouterr().err
    assert _classify_run(micro_model, tmp_path, "--epochs", "1")[0] == 0
    assert f"{tmp_path / 'o'} holds an earlier run (model.safetensors, metrics.json, ...); this run replaces it" \
        in capsys.readouterr().err


def test_a_model_that_does_not_load_is_a_usage_error_and_leaves_out_intact(micro_model, tmp_path, capsys):
    """A checkpoint that does not load (a head fine-tuned for 2 labels given 3; a config.json that is
    not JSON) is a clear error before --out is touched: it was a traceback after an earlier run's
    metrics, predictions and history there had been deleted."""
    import shutil

    assert _classify_run(micro_model, tmp_path, "--epochs", "1")[0] == 0  # tmp_path/o: a 2-label classifier
    done = tmp_path / "done"
    assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", str(tmp_path / "train.jsonl"),
                "--dev", str(tmp_path / "dev.jsonl"), "--out", str(done), "--device", "cpu", "--no-progress",
                "--epochs", "1"]) == 0
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    assert "metrics.json" in before and "history.jsonl" in before
    three = _jsonl(tmp_path / "three.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"},
                                              {"text": "red", "label": "c"}])
    base = ["finetune", "--task", "classify", "--train", three, "--dev", three, "--out", str(done),
            "--device", "cpu", "--no-progress", "--epochs", "1"]
    capsys.readouterr()
    assert cli(base + ["--model", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--model {tmp_path / 'o'}: checkpoint weights have the wrong shape" in err, err
    assert "classifier.weight: checkpoint (2, 32), model (3, 32)" in err, err
    assert "--new-head starts a head of another shape afresh" in err and "ignore_mismatched_sizes" not in err, err
    broken = tmp_path / "broken"
    shutil.copytree(micro_model, broken)
    (broken / "config.json").write_text("{not json")
    assert cli(base + ["--model", str(broken)]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before


def test_new_head_fine_tunes_a_classifier_for_another_label_count(micro_model, tmp_path):
    """--new-head: the 2-label classifier's head starts afresh for 3 labels (warned), its encoder is kept."""
    from safetensors.torch import load_file
    assert _classify_run(micro_model, tmp_path, "--epochs", "1")[0] == 0  # tmp_path/o: a 2-label classifier
    three = _jsonl(tmp_path / "three.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"},
                                              {"text": "red", "label": "c"}])
    new = tmp_path / "new"
    with pytest.warns(UserWarning, match=r"newly initialised \(another shape in the checkpoint\): classifier.weight"):
        assert cli(["finetune", "--task", "classify", "--model", str(tmp_path / "o"), "--train", three, "--dev",
                    three, "--out", str(new), "--device", "cpu", "--no-progress", "--epochs", "1", "--lr", "0",
                    "--new-head"]) == 0
    before, after = load_file(tmp_path / "o" / "model.safetensors"), load_file(new / "model.safetensors")
    assert after["classifier.weight"].shape == (3, 32)
    encoder = "bert.encoder.layer.1.output.dense.weight"
    assert torch.equal(after[encoder], before[encoder])  # lr 0: the encoder as the checkpoint's
    assert json.loads((new / "config.json").read_text())["id2label"] == {"0": "a", "1": "b", "2": "c"}


def test_new_head_does_not_start_an_encoder_of_another_shape_afresh(micro_model, tmp_path, capsys):
    """--new-head is for the head: an encoder weight of another shape (here every feed-forward block)
    is another model, an error naming it, not a silently re-initialised body."""
    import shutil
    other = tmp_path / "other"
    shutil.copytree(micro_model, other)
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] += 8
    (other / "config.json").write_text(json.dumps(config))
    tr = _jsonl(tmp_path / "tr.jsonl", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}])
    capsys.readouterr()
    assert cli(["finetune", "--task", "classify", "--model", str(other), "--train", tr, "--dev", tr, "--out",
                str(tmp_path / "o"), "--device", "cpu", "--no-progress", "--epochs", "1", "--new-head"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint weights have the wrong shape: bert.encoder.layer.0.intermediate.dense.bias" in err, err
    assert not (tmp_path / "o").exists()


def test_qa_with_unanswerable_training_questions_may_answer_nothing(micro_model, tmp_path, capsys, monkeypatch):
    """Training questions without an answer (SQuAD 2.0 style) teach [CLS]; evaluation then lets
    [CLS] win (null_answers), and only then: SQuAD 1.1-style training data always gets a span."""
    import fastbert.tasks as T
    files = make_data("qa", tmp_path, random.Random(2))
    seen = []
    real = T.qa_best_spans

    def spy(*args, **kw):
        seen.append(kw.get("null_answers", False))
        return real(*args, **kw)
    monkeypatch.setattr(T, "qa_best_spans", spy)
    rows = [json.loads(line) for line in open(files["train"])]
    rows[0]["answers"] = {"text": [], "answer_start": []}
    null_train = _jsonl(tmp_path / "null.jsonl", rows)
    for train, want in ((files["train"], False), (null_train, True)):
        seen.clear()
        assert cli(["finetune", "--task", "qa", "--model", micro_model, "--train", train, "--dev", files["dev"],
                    "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress", "--epochs", "1",
                    "--max-length", "24", "--doc-stride", "8"]) == 0
        assert seen and set(seen) == {want}
        assert ("1 training questions have no answer" in capsys.readouterr().err) == want


def test_finetune_writes_its_history_and_curve(micro_model, tmp_path):
    rc, out = _classify_run(micro_model, tmp_path)
    assert rc == 0
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = [r for r in rows if "dev_accuracy" in r]
    losses = [r for r in rows if "loss" in r]
    # 24 examples / batch 4 = 6 steps an epoch: one loss row at step 6 of each epoch (CHECK_EVERY 10)
    assert [r["step"] for r in losses] == [6, 12, 18] and [r["step"] for r in epochs] == [6, 12, 18]
    for r, h in zip(epochs, metrics["history"]):
        assert r["dev_accuracy"] == h["accuracy"] and r["train_loss"] == pytest.approx(h["train_loss"])
    for r in losses:  # a whole epoch's window: its mean is the epoch's train loss
        assert r["loss"] == pytest.approx(epochs[r["epoch"] - 1]["train_loss"])
    best = max(range(3), key=lambda i: (epochs[i]["dev_accuracy"], -i))
    assert metrics["best_epoch"] == best + 1 and epochs[best]["saved"]
    assert (out / "training_curve.png").stat().st_size > 10_000


def test_an_interrupted_finetune_keeps_the_best_epoch_so_far(micro_model, tmp_path, capsys, monkeypatch):
    import fastbert.finetune as F
    real, calls = F.evaluate, []

    def evaluate(model, *args, **kwargs):  # Ctrl-C during the third epoch's dev evaluation
        calls.append({k: v.detach().clone() for k, v in model.state_dict().items()})  # the epoch's weights
        if len(calls) == 3:
            raise KeyboardInterrupt
        metrics, preds = real(model, *args, **kwargs)
        if len(calls) == 2:  # the second epoch scores worse than the first: OUT must keep the first
            metrics = dict(metrics, accuracy=-0.5)
        return metrics, preds

    monkeypatch.setattr(F, "evaluate", evaluate)
    rc, out = _classify_run(micro_model, tmp_path)
    assert rc == 130
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "dev_accuracy" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["saved"] for r in epochs] == [True, False]
    err = capsys.readouterr().err
    assert f"interrupted; {out} holds the best epoch so far (epoch 1: dev_accuracy" in err
    assert not (out / "metrics.json").exists()
    assert (out / "training_curve.png").stat().st_size > 10_000  # plotted after each finished epoch
    from fastbert.modeling import BertForSequenceClassification
    model = BertForSequenceClassification.from_pretrained(str(out))  # the saved epoch loads, head included
    assert model.config.id2label == {0: "neg", 1: "pos"}
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in calls[0].items()), "OUT does not hold epoch 1's weights"
    assert not all(torch.equal(saved[k], v) for k, v in calls[1].items())  # the epochs differ: the check can fail


def test_a_finetune_interrupted_in_its_first_epoch_says_whose_model_out_holds(micro_model, tmp_path, capsys,
                                                                              monkeypatch):
    """OUT already holds an earlier run's model; this run stops before its first dev evaluation: the
    message must not let the earlier model pass for this run's."""
    import fastbert.finetune as F
    assert _classify_run(micro_model, tmp_path)[0] == 0  # the earlier run, into the same OUT

    def evaluate(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(F, "evaluate", evaluate)
    capsys.readouterr()
    rc, out = _classify_run(micro_model, tmp_path)
    assert rc == 130
    assert f"no epoch finished, nothing saved ({out}'s model files are an earlier run's)" in capsys.readouterr().err
    # nor do the earlier run's settings pass for this run's (fastbert predict would read them)
    assert not (out / "metrics.json").exists() and not (out / "finetune.json").exists()


def test_encode_shows_progress_unless_asked_not_to(micro_model, tmp_path, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text("".join(f"the cat sat {i}\n" for i in range(9)))
    base = ["encode", "--model", micro_model, "--input", str(inp), "--output", str(tmp_path / "e.npy"),
            "--device", "cpu", "--batch-size", "4"]
    assert cli(base) == 0
    err = capsys.readouterr().err
    assert "encode: 100%" in err and "9/9" in err
    assert cli(base + ["--no-progress"]) == 0
    assert "encode:" not in capsys.readouterr().err


def test_version_names_fastbert_and_what_it_runs_on(capsys):
    import fastbert
    with pytest.raises(SystemExit) as exit_info:
        cli(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fastbert {fastbert.__version__} (torch {torch.__version__}") and "triton" in out


def test_commands_ignore_output_flags_in_the_checkpoints_config(micro_model, tmp_path, monkeypatch):
    """A config.json may set output_attentions / output_hidden_states (transformers' forward defaults,
    which the classes honour): fastbert's own commands still ask for neither, so they keep the fast
    unpadded layout instead of the padded reference path."""
    import shutil

    from fastbert import modeling
    model_dir = tmp_path / "m"
    shutil.copytree(micro_model, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(output_attentions=True, output_hidden_states=True, return_dict=False)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    padded = []
    real = modeling._Padded.__init__

    def spy(self, *args, **kwargs):
        padded.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(modeling._Padded, "__init__", spy)
    files = make_data("classify", tmp_path, random.Random(5))
    assert cli(["finetune", "--task", "classify", "--model", str(model_dir), "--train", files["train"],
                "--dev", files["dev"], "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress",
                "--epochs", "1", "--batch-size", "8"]) == 0
    inp = tmp_path / "in.txt"
    inp.write_text("the cat sat\nbig red door\n")
    assert cli(["encode", "--model", str(model_dir), "--input", str(inp), "--output", str(tmp_path / "e.npy"),
                "--device", "cpu", "--no-progress"]) == 0
    assert not padded


def test_a_finetune_interrupted_before_training_does_not_claim_an_earlier_runs_model(micro_model, tmp_path, capsys,
                                                                                      monkeypatch):
    import fastbert.finetune as F
    rc, out = _classify_run(micro_model, tmp_path, "--epochs", "1")  # an earlier, complete run in OUT
    assert rc == 0 and (out / "metrics.json").exists()
    capsys.readouterr()

    def tokenizing(*args, **kwargs):  # Ctrl-C while this run still reads its data
        raise KeyboardInterrupt

    monkeypatch.setattr(F, "_load", tokenizing)
    rc, out = _classify_run(micro_model, tmp_path)
    assert rc == 130
    err = capsys.readouterr().err
    # OUT still holds the earlier run, metrics.json included: not this run's "best epoch so far"
    assert "holds the best epoch so far" not in err and "without metrics.json" not in err, err
    assert "fastbert finetune: interrupted before training" in err, err
    assert (out / "metrics.json").exists()


def test_an_interrupted_layer_mix_save_keeps_the_saved_head(tmp_path, monkeypatch):
    """--freeze all: OUT is re-saved at every better epoch, so a save interrupted part-way must leave
    the earlier layer_mix.safetensors / layer_mix.json whole (they were written in place)."""
    import safetensors.torch

    from fastbert import BertConfig, BertModel
    from fastbert.layer_mix import HEAD_FILE, META_FILE, LayerMixModel
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = LayerMixModel(BertModel(cfg), "classify", num_labels=2)
    model.save_pretrained(str(tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in (HEAD_FILE, META_FILE)}
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(1.0)
    real = safetensors.torch.save_file

    def interrupted(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        if not any(k.startswith("head.") for k in tensors):
            return  # the encoder's model.safetensors (written to a temporary name, as the head is)
        with open(path, "r+b") as f:
            f.truncate(100)  # the write got this far, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(str(tmp_path))
    assert {name: (tmp_path / name).read_bytes() for name in (HEAD_FILE, META_FILE)} == before
    monkeypatch.undo()
    LayerMixModel.from_pretrained(str(tmp_path))  # still loads


def test_help_names_every_default_and_describes_the_command():
    """`fastbert SUBCOMMAND --help`: an option that has a default says so (a user reads the help, not
    the source); finetune's --task help gives each task's file format; encode, which does not train,
    does not describe a GradScaler."""
    import argparse

    from fastbert.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = [(name, a.option_strings[0]) for name, p in sub.choices.items() for a in p._actions
              if a.option_strings and a.default not in (None, False, argparse.SUPPRESS)
              and "default" not in (a.help or "")]
    assert silent == []
    helps = {name: {a.dest: a.help or "" for a in p._actions} for name, p in sub.choices.items()}
    for fmt in ('{"text", "label"}', '{"text_a", "text_b", "label"}', "token<TAB>tag", '"answer_start"',
                '"choices"'):
        assert fmt in helps["finetune"]["task"]
    assert "GradScaler" not in helps["encode"]["precision"] and "GradScaler" in helps["finetune"]["precision"]
    from fastbert.pretrain import SIZE_LR  # every size's default learning rate, not "tiny 1e-3 ... base 1e-4"
    assert "micro 2e-3" in helps["pretrain"]["lr"] and "large 5e-5" in helps["pretrain"]["lr"]
    assert all(f"{size} " in helps["pretrain"]["lr"] for size in SIZE_LR)


# `fastbert encode` in chunks: bounded memory, the same output, nothing lost or half-written on a crash

def _encode_input(tmp_path, n=11):
    rng = random.Random(3)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]
    lines[4] = ""  # an empty line still gets its row
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(lines) + "\n")
    return inp, lines


def _encode_base(micro_model, inp):
    return ["encode", "--model", micro_model, "--input", str(inp), "--device", "cpu", "--precision", "fp32",
            "--no-progress", "--batch-size", "2", "--normalize"]


def _interrupted_jsonl(base, tmp_path, capsys, to_stdout):
    """Run encode (JSONL to a file or stdout) where it is interrupted: asserts exit 130; returns (what
    reached the output, stderr, the output's name as the message gives it)."""
    out = tmp_path / "e.jsonl"
    capsys.readouterr()
    assert cli(base + ([] if to_stdout else ["--output", str(out)])) == 130
    captured = capsys.readouterr()
    written = captured.out if to_stdout else out.read_text(encoding="utf-8")
    return written, captured.err, "stdout" if to_stdout else str(out)


def _chunk_spy(monkeypatch, fail_at=None, error=KeyboardInterrupt):
    """Records the size of each chunk encode.embed_chunk gets; raises `error` at call number fail_at."""
    from fastbert import encode
    sizes, real = [], encode.embed_chunk

    def spy(model, tok, texts, *args, **kwargs):
        if fail_at is not None and len(sizes) + 1 == fail_at:
            raise error
        sizes.append(len(texts))
        return real(model, tok, texts, *args, **kwargs)

    monkeypatch.setattr(encode, "embed_chunk", spy)
    return sizes


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_encode_in_chunks_gives_the_unchunked_output(micro_model, tmp_path, monkeypatch, suffix):
    """A chunk holding the whole input: the very bytes of one pass (the batches are the same). Chunks
    that cut the input (4 of 11 lines, 1 line): other batches, so each vector may differ by float32
    rounding (the unpadded encoder's matrix products run over a batch's real tokens, whose count
    changes with the batch), never more."""
    inp, lines = _encode_input(tmp_path)
    base = _encode_base(micro_model, inp)
    outputs = {}
    for chunk in (100, 4, 1):
        sizes = _chunk_spy(monkeypatch)
        out = tmp_path / f"c{chunk}{suffix}"
        assert cli(base + ["--output", str(out), "--chunk-size", str(chunk)]) == 0
        assert sizes == [min(chunk, 11 - k) for k in range(0, 11, chunk)]
        outputs[chunk] = out
    monkeypatch.undo()
    assert cli(base + ["--output", str(tmp_path / f"whole{suffix}")]) == 0  # the default chunk size
    whole = tmp_path / f"whole{suffix}"
    assert outputs[100].read_bytes() == whole.read_bytes()
    if suffix == ".npy":
        ref = np.load(whole)
        assert ref.shape == (11, 32)
        for chunk in (4, 1):
            np.testing.assert_allclose(np.load(outputs[chunk]), ref, rtol=1e-5, atol=1e-6)
    else:
        ref = _rows(whole)
        assert [r["text"] for r in ref] == lines
        for chunk in (4, 1):
            rows = _rows(outputs[chunk])
            assert [r["text"] for r in rows] == lines
            np.testing.assert_allclose([r["embedding"] for r in rows], [r["embedding"] for r in ref], atol=3e-6)


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_encode_stdin_in_chunks_gives_the_files_output(micro_model, tmp_path, monkeypatch, suffix):
    """stdin (streamed for JSONL; copied to an anonymous file beside the output for .npy, whose row
    count is needed first): the bytes the same --input file gives, chunk by chunk."""
    inp, _ = _encode_input(tmp_path)
    base = _encode_base(micro_model, inp)
    assert cli(base + ["--output", str(tmp_path / f"file{suffix}"), "--chunk-size", "3"]) == 0
    sizes = _chunk_spy(monkeypatch)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(inp.read_bytes()), encoding="utf-8"))
    stdin_base = [a for a in base if a not in ("--input", str(inp))]
    assert cli(stdin_base + ["--output", str(tmp_path / f"stdin{suffix}"), "--chunk-size", "3"]) == 0
    assert sizes == [3, 3, 3, 2]
    assert (tmp_path / f"stdin{suffix}").read_bytes() == (tmp_path / f"file{suffix}").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.txt", f"file{suffix}", f"stdin{suffix}"])


def test_encode_npy_from_a_pipe_given_as_input(micro_model, tmp_path):
    """--input naming a FIFO (`--input <(zcat big.txt.gz)`) cannot be read twice: it is copied once, as
    stdin is, not counted and then found empty."""
    import os
    import threading
    inp, _ = _encode_input(tmp_path)
    base = _encode_base(micro_model, inp)
    assert cli(base + ["--output", str(tmp_path / "file.npy"), "--chunk-size", "3"]) == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(inp.read_bytes()))
    writer.start()
    fifo_base = [str(fifo) if a == str(inp) else a for a in base]
    assert cli(fifo_base + ["--output", str(tmp_path / "fifo.npy"), "--chunk-size", "3"]) == 0
    writer.join(timeout=60)
    assert (tmp_path / "fifo.npy").read_bytes() == (tmp_path / "file.npy").read_bytes()


def test_encode_interrupted_npy_leaves_no_file(micro_model, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second chunk: exit 130, one line saying the .npy was not written, no traceback;
    neither a truncated .npy nor the temporary file is left, and an earlier run's .npy stays as it was."""
    inp, _ = _encode_input(tmp_path)
    base = _encode_base(micro_model, inp) + ["--chunk-size", "4"]
    out = tmp_path / "e.npy"
    _chunk_spy(monkeypatch, fail_at=2)
    assert cli(base + ["--output", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"fastbert encode: interrupted after 4 of 11 lines; {out} not written" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
    np.save(out, np.arange(6, dtype="float32"))  # an earlier run's output
    before = out.read_bytes()
    assert cli(base + ["--output", str(out)]) == 130
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "in.txt"]


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_encode_stopped_by_sigterm_is_stopped_as_by_ctrl_c(micro_model, tmp_path, monkeypatch, capsys, suffix):
    """SIGTERM (a scheduler, `timeout`) in the second chunk: exit 143, the one-line message of Ctrl-C, no
    temporary file left (it was: a full-size hidden .tmp beside the output); JSONL keeps its first chunk."""
    import signal

    from fastbert import encode
    inp, _ = _encode_input(tmp_path)
    calls, real, handler = [], encode.embed_chunk, signal.getsignal(signal.SIGTERM)

    def spy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(encode, "embed_chunk", spy)
    out = tmp_path / f"e{suffix}"
    assert cli(_encode_base(micro_model, inp) + ["--chunk-size", "4", "--output", str(out)]) == 143
    err = capsys.readouterr().err
    assert "fastbert encode: interrupted" in err and "Traceback" not in err
    if suffix == ".npy":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
    else:
        assert len(out.read_text().splitlines()) == 4
    assert signal.getsignal(signal.SIGTERM) is handler  # the command's handler is gone again


def test_encode_refuses_outputs_it_would_destroy(micro_model, tmp_path, capsys, monkeypatch):
    """--output the --input file (it was truncated while read, and the command read its own rows back
    without end) and a .npy --output that is a pipe (the renamed file replaced it; as root /dev/null
    too): refused before any work. JSONL into a pipe or a device is written through, as before."""
    from fastbert.modeling import BertModel
    inp, lines = _encode_input(tmp_path)
    before = inp.read_bytes()
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    (tmp_path / "link.txt").symlink_to(inp)
    real = BertModel.forward
    monkeypatch.setattr(BertModel, "forward", lambda *a, **k: pytest.fail("encoded before the output check"))
    for output, message in ((inp, "is the --input file"), (tmp_path / "link.txt", "is the --input file"),
                            (fifo, "not a regular file (a device or a pipe)")):
        assert cli(_encode_base(micro_model, inp) + ["--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert inp.read_bytes() == before and stat.S_ISFIFO(os.stat(fifo).st_mode)
    monkeypatch.setattr(BertModel, "forward", real)
    assert cli(_encode_base(micro_model, inp) + ["--output", os.devnull]) == 0


def test_encode_refuses_its_input_as_its_output_through_redirections(micro_model, tmp_path):
    """`--output f < f` and `--input f >> f`: the same runaway as --output = --input, refused."""
    import subprocess
    import sys
    for how in ("stdin", "stdout"):
        f = tmp_path / f"{how}.jsonl"
        f.write_text("the cat sat\ngood movie\n")
        cmd = [sys.executable, "-m", "fastbert.cli", "encode", "--model", micro_model, "--device", "cpu",
               "--no-progress"]
        with open(f) as src, open(f, "a") as dst:
            if how == "stdin":
                proc = subprocess.run(cmd + ["--output", str(f)], stdin=src, capture_output=True, text=True,
                                      timeout=300)
            else:
                proc = subprocess.run(cmd + ["--input", str(f)], stdout=dst, stderr=subprocess.PIPE, text=True,
                                      timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "it would" in proc.stderr and "Traceback" not in proc.stderr
        assert f.read_text() == "the cat sat\ngood movie\n"


def test_encode_stopped_while_loading_says_so(micro_model, tmp_path, capsys, monkeypatch):
    import signal

    from fastbert.modeling import BertModel
    inp, _ = _encode_input(tmp_path)
    real = BertModel.from_pretrained.__func__

    def slow_load(cls, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(BertModel, "from_pretrained", classmethod(slow_load))
    assert cli(_encode_base(micro_model, inp) + ["--output", str(tmp_path / "e.npy")]) == 143
    err = capsys.readouterr().err
    assert "interrupted before encoding; nothing written" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_encode_write_errors_and_foreign_tokenizers_are_one_line_errors(micro_model, tmp_path, capsys):
    """A full disk (/dev/full) while writing JSONL: exit 1 and one line. A tokenizer whose ids pass the
    model's vocabulary, or a tokenizer.json that does not parse: exit 2, said at load, not mid-run."""
    import shutil
    inp, _ = _encode_input(tmp_path)
    if os.path.exists("/dev/full"):
        assert cli(_encode_base(micro_model, inp) + ["--output", "/dev/full"]) == 1
        err = capsys.readouterr().err
        assert "fastbert encode: error: cannot write /dev/full: No space left on device" in err, err
        assert "Traceback" not in err
    big = tmp_path / "big"
    shutil.copytree(micro_model, big)
    with open(big / "vocab.txt", "a") as f:
        f.write("zebra\n")
    (inp.parent / "z.txt").write_text("zebra\n")
    base = ["encode", "--input", str(inp.parent / "z.txt"), "--device", "cpu", "--no-progress"]
    assert cli(base + ["--model", str(big)]) == 2
    assert "the tokenizer has token ids up to 30, but the model has 30 word embeddings" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(micro_model, broken)
    (broken / "tokenizer.json").write_text("{}")
    assert cli(base + ["--model", str(broken)]) == 2
    assert "tokenizer.json: not a readable tokenizer file" in capsys.readouterr().err
    blank = tmp_path / "blank"  # a trailing blank line of vocab.txt is a token never produced: fine
    shutil.copytree(micro_model, blank)
    with open(blank / "vocab.txt", "a") as f:
        f.write("\n")
    assert cli(base + ["--model", str(blank)]) == 0
    padded = tmp_path / "padded"  # embedding rows past the vocabulary (30528 for 30522, say): fine
    from fastbert.modeling import BertModel
    model = BertModel.from_pretrained(micro_model)
    model.resize_token_embeddings(40)
    model.save_pretrained(padded)
    shutil.copy(os.path.join(micro_model, "vocab.txt"), padded)
    assert cli(base + ["--model", str(padded)]) == 0


def test_encode_follows_a_sentence_transformers_folder(micro_model, tmp_path, capsys):
    """sentence_bert_config.json's max_seq_length is the default cut (all-MiniLM-L6-v2: 256, not 512), and
    a modules.json listing a Normalize module gets a note unless --normalize is given; .NPY is a .npy too."""
    import shutil
    folder = tmp_path / "st"
    shutil.copytree(micro_model, folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    inp = tmp_path / "in.txt"
    inp.write_text("the cat sat on the mat " * 4 + "\ngood movie\n")
    base = ["encode", "--input", str(inp), "--device", "cpu", "--no-progress", "--output"]
    assert cli(base + [str(tmp_path / "a.NPY"), "--model", str(folder)]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 texts truncated to 12 tokens" in err and "add --normalize for the same vectors" in err
    assert np.load(tmp_path / "a.NPY").shape == (2, 32)
    assert cli(base + [str(tmp_path / "b.npy"), "--model", str(folder), "--normalize", "--max-length", "64"]) == 0
    err = capsys.readouterr().err
    assert "truncated" not in err and "add --normalize" not in err
    assert cli(base + [str(tmp_path / "c.npy"), "--model", micro_model]) == 0  # no such files: the positions
    assert "truncated" not in capsys.readouterr().err


def test_encode_npy_through_a_symlink_writes_its_target(micro_model, tmp_path):
    """--output a symlink to a .npy elsewhere: the target gets the array and the link stays a link (the
    atomic rename replaced the link with a file; np.save had written through it)."""
    inp, _ = _encode_input(tmp_path)
    (tmp_path / "data").mkdir()
    target, link = tmp_path / "data" / "e.npy", tmp_path / "link.npy"
    target.write_bytes(b"old")
    link.symlink_to(target)
    assert cli(_encode_base(micro_model, inp) + ["--output", str(link)]) == 0
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    assert cli(_encode_base(micro_model, inp) + ["--output", str(tmp_path / "direct.npy")]) == 0
    assert np.array_equal(np.load(target), np.load(tmp_path / "direct.npy"))


def test_encode_output_through_a_dangling_symlink_is_checked_where_it_points(micro_model, tmp_path, capsys,
                                                                           monkeypatch):
    """A link into a folder that does not exist is refused before any encoding (it was checked as if
    the link's own folder would take the file, and failed only at the write, after all the work)."""
    from fastbert.modeling import BertModel
    inp, _ = _encode_input(tmp_path)
    monkeypatch.setattr(BertModel, "forward", lambda *a, **k: pytest.fail("encoded before the output check"))
    for name in ("e.npy", "e.jsonl"):
        link = tmp_path / f"link-{name}"
        link.symlink_to(tmp_path / "missing" / name)
        assert cli(_encode_base(micro_model, inp) + ["--output", str(link)]) == 2
        assert f"the folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_encode_crashing_npy_leaves_no_file(micro_model, tmp_path, monkeypatch):
    """A crash inside the model (here: its forward raising) propagates, leaving no file behind either."""
    from fastbert.modeling import BertModel
    inp, _ = _encode_input(tmp_path)
    calls = []
    real = BertModel.forward

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BertModel, "forward", forward)
    with pytest.raises(RuntimeError, match="simulated"):
        cli(_encode_base(micro_model, inp) + ["--chunk-size", "4", "--output", str(tmp_path / "e.npy")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


@pytest.mark.parametrize("to_stdout", [False, True])
def test_encode_interrupted_jsonl_keeps_the_chunks_written(micro_model, tmp_path, monkeypatch, capsys, to_stdout):
    """Ctrl-C during the third chunk of 4: the first 8 rows are out (flushed), in input order, as a full
    run writes them; exit 130 with one line saying how many lines were written."""
    inp, lines = _encode_input(tmp_path)
    base = _encode_base(micro_model, inp) + ["--chunk-size", "4"]
    assert cli(base + ["--output", str(tmp_path / "full.jsonl")]) == 0
    full = (tmp_path / "full.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    _chunk_spy(monkeypatch, fail_at=3)
    written, err, where = _interrupted_jsonl(base, tmp_path, capsys, to_stdout)
    assert written == "".join(full[:8])
    assert f"fastbert encode: interrupted; 8 lines written to {where}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("output", ["e.npy", "e.jsonl", None])
def test_encode_reads_lazily_and_never_holds_all_features(micro_model, tmp_path, monkeypatch, output):
    """The input is read chunk by chunk (a generator standing in for a huge file is never drained ahead
    of the chunk being encoded), and no call tokenizes more than one chunk. A file is read twice only
    for a .npy (its row count first); JSONL without a progress bar reads it once."""
    from fastbert import encode
    from fastbert import tasks as T
    inp, lines = _encode_input(tmp_path)
    consumed = []  # per read of the input: how many lines it has yielded so far
    real_iter = encode.iter_lines

    def iter_lines(path):
        consumed.append(0)
        for t in real_iter(path):
            consumed[-1] += 1
            yield t

    monkeypatch.setattr(encode, "iter_lines", iter_lines)
    seen, real_features = [], T.build_features

    def build_features(task, examples, *args, **kwargs):
        seen.append((len(examples), consumed[-1]))
        return real_features(task, examples, *args, **kwargs)

    monkeypatch.setattr(T, "build_features", build_features)
    args = _encode_base(micro_model, inp) + ["--chunk-size", "3"]
    if output:
        args += ["--output", str(tmp_path / output)]
    assert cli(args) == 0
    assert [n for n, _ in seen] == [3, 3, 3, 2]
    # when chunk k is tokenized, the input has been read up to its end and no further
    assert [c for _, c in seen] == [3, 6, 9, 11]
    assert len(consumed) == (2 if output == "e.npy" else 1)


def test_encode_jsonl_from_a_file_counts_it_for_the_progress_bar(micro_model, tmp_path, monkeypatch):
    """With a progress bar, JSONL from a file still reads it twice: the count first, for the bar's total
    (only --no-progress JSONL reads it once)."""
    import tqdm.auto
    from fastbert import encode
    inp, lines = _encode_input(tmp_path)
    reads, totals, real_iter, real_tqdm = [], [], encode.iter_lines, tqdm.auto.tqdm
    monkeypatch.setattr(encode, "iter_lines", lambda path: reads.append(path) or real_iter(path))
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: totals.append(k.get("total")) or real_tqdm(*a, **k))
    args = [a for a in _encode_base(micro_model, inp) if a != "--no-progress"]
    assert cli(args + ["--output", str(tmp_path / "e.jsonl")]) == 0
    assert len(reads) == 2 and totals == [len(lines)]


def test_encode_chunks_share_one_progress_bar_and_one_truncation_count(micro_model, tmp_path, capsys):
    inp = tmp_path / "in.txt"
    inp.write_text("".join(("cat " * 80 if i % 3 == 0 else f"the cat sat {i}") + "\n" for i in range(9)))
    base = ["encode", "--model", micro_model, "--input", str(inp), "--output", str(tmp_path / "e.npy"),
            "--device", "cpu", "--batch-size", "2", "--chunk-size", "4"]
    assert cli(base) == 0
    err = capsys.readouterr().err
    assert "encode: 100%" in err and "9/9" in err
    assert err.count("truncated") == 1 and "3 of 9 texts truncated to 64 tokens" in err
    assert cli(base + ["--chunk-size", "0"]) == 2
    assert "--chunk-size must be at least 1, not 0" in capsys.readouterr().err


def test_encode_embed_function_gives_the_commands_vectors(micro_model, tmp_path):
    """embed(), which other code calls, keeps its signature and return value: (N, hidden) float32 and
    the truncation count, the very vectors of the command's one-chunk run."""
    from fastbert.encode import embed
    from fastbert.modeling import BertModel
    from fastbert.tasks import load_tokenizer
    inp, lines = _encode_input(tmp_path)
    lines[0] = "cat " * 80
    inp.write_text("\n".join(lines) + "\n")
    assert cli(_encode_base(micro_model, inp) + ["--output", str(tmp_path / "e.npy")]) == 0
    model, tok = BertModel.from_pretrained(micro_model), load_tokenizer(micro_model)
    emb, n_trunc = embed(model, tok, lines, "mean", True, 2, 64)
    assert emb.dtype == np.float32 and emb.shape == (11, 32) and n_trunc == 1
    assert np.array_equal(emb, np.load(tmp_path / "e.npy"))


@pytest.mark.parametrize("to_stdout", [False, True])
def test_encode_interrupted_while_writing_jsonl_rows_leaves_whole_chunks_only(micro_model, tmp_path, monkeypatch,
                                                                              capsys, to_stdout):
    """Ctrl-C while the second chunk's rows are being written (JSON formatting takes a while for large
    chunks): the output holds the first chunk's rows only, as the message says, not some rows of the
    second chunk too (the buffer's rest flushed at close or exit)."""
    import json as json_module
    import types

    from fastbert import encode
    inp, _ = _encode_input(tmp_path)
    base = _encode_base(micro_model, inp) + ["--chunk-size", "4"]
    assert cli(base + ["--output", str(tmp_path / "full.jsonl")]) == 0
    full = (tmp_path / "full.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    calls = []

    def dumps(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # the second row of the second chunk
            raise KeyboardInterrupt
        return json_module.dumps(*args, **kwargs)

    monkeypatch.setattr(encode, "json", types.SimpleNamespace(dumps=dumps))
    written, err, where = _interrupted_jsonl(base, tmp_path, capsys, to_stdout)
    assert written == "".join(full[:4])
    assert f"fastbert encode: interrupted; 4 lines written to {where}" in err


def test_encode_jsonl_into_an_existing_file_of_a_read_only_folder(micro_model, tmp_path, monkeypatch, capsys):
    """JSONL is written in place: an existing writable file in a folder the user cannot write
    (`--output /dev/null` as a user other than root, a shared results folder) is written, not refused
    before the work; a .npy there (a temporary file, then renamed) and a new file are refused."""
    import os

    from fastbert import encode
    inp, lines = _encode_input(tmp_path, n=5)
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "e.jsonl").write_text("")
    real = os.access
    # as for a user other than root: the folder is not writable, the file in it is
    monkeypatch.setattr(encode.os, "access", lambda p, mode: False if str(p) == str(folder) else real(p, mode))
    base = _encode_base(micro_model, inp)
    assert cli(base + ["--output", str(folder / "e.jsonl")]) == 0
    assert [r["text"] for r in _rows(folder / "e.jsonl")] == lines
    (folder / "e.NPY").write_bytes(b"")  # an existing .NPY is a .npy too: renamed over, so the folder counts
    for name in ("new.jsonl", "e.npy", "e.NPY"):
        assert cli(base + ["--output", str(folder / name)]) == 2
        assert f"--output {folder / name}: cannot write there (permission denied)" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["classify", "ner", "qa", "choice"])
def test_grad_accum_trains_like_the_whole_batch(micro_no_dropout, tmp_path, task):
    """--grad-accum 3 splits each batch of 8 into micro-batches of 2-3 (ner: some with fewer labelled
    tokens than others, weighted by them) whose summed gradients are the batch's: without dropout the
    same losses, dev predictions and weights as one micro-batch per step, to fp32 rounding."""
    from safetensors.torch import load_file
    files = make_data(task, tmp_path, random.Random(4))
    runs = {}
    for accum in ("1", "3"):
        out = tmp_path / f"accum{accum}"
        assert cli(["finetune", "--task", task, "--model", micro_no_dropout, "--train", files["train"],
                    "--dev", files["dev"], "--test", files["test"], "--out", str(out), "--epochs", "2",
                    "--batch-size", "8", "--grad-accum", accum, "--max-length", "24", "--lr", "3e-3",
                    "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
        runs[accum] = (json.loads((out / "metrics.json").read_text()), (out / "predictions.jsonl").read_text(),
                       load_file(str(out / "model.safetensors")))
    (one, one_pred, one_w), (three, three_pred, three_w) = runs["1"], runs["3"]
    losses = [h["train_loss"] for h in one["history"]]
    assert losses[1] < losses[0]  # it trains at all
    assert [h["train_loss"] for h in three["history"]] == pytest.approx(losses, rel=1e-5)
    assert three["steps"] == one["steps"] == one["planned_steps"] and three_pred == one_pred
    start = load_file(os.path.join(micro_no_dropout, "model.safetensors"))
    for k, w in one_w.items():
        if k == "qa_outputs.bias":  # its gradient is 0 in exact arithmetic (it shifts every position's logit
            continue                # alike): AdamW turns the rounding noise into steps of +-lr, run by run
        torch.testing.assert_close(three_w[k], w, rtol=0, atol=2e-5)
        if k in start:  # the weights moved far more than the two runs differ
            assert (w - start[k]).abs().max() > 1e-3


def test_grad_accum_errors(micro_model, tmp_path, capsys):
    files = make_data("classify", tmp_path, random.Random(1))
    for extra, message in ((["--grad-accum", "0"], "--grad-accum must be at least 1"),
                           (["--grad-accum", "9"], "--grad-accum 9 splits a batch of --batch-size 8 into more")):
        assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", files["train"], "--dev",
                    files["dev"], "--out", str(tmp_path / "o"), "--batch-size", "8", "--device", "cpu",
                    "--no-progress"] + extra) == 2
        assert message in capsys.readouterr().err


def test_patience_stops_once_dev_stops_improving(micro_model, tmp_path, capsys):
    """At lr 0 dev never betters epoch 1: --patience 2 stops after epoch 3 (said, and in metrics.json),
    the model on disk epoch 1's; without it, or with patience past the last epoch, every epoch runs."""
    files = make_data("classify", tmp_path, random.Random(1))
    for patience, epochs in ((["--patience", "2"], 3), ([], 5), (["--patience", "5"], 5)):
        out = tmp_path / f"out{len(patience)}{patience[-1:]}"
        assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", files["train"], "--dev",
                    files["dev"], "--out", str(out), "--epochs", "5", "--lr", "0", "--batch-size", "8", "--device",
                    "cpu", "--no-progress"] + patience) == 0
        m = json.loads((out / "metrics.json").read_text())
        assert len(m["history"]) == epochs and m["best_epoch"] == 1
        assert m["stopped_early_after_epoch"] == (3 if epochs == 3 else None)
        assert m["steps"] == m["planned_steps"] * epochs // 5  # the steps run, not those the schedule planned
        assert ("stopping early" in capsys.readouterr().err) == (epochs == 3)
    assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", files["train"], "--dev",
                files["dev"], "--out", str(tmp_path / "o"), "--patience", "0", "--device", "cpu"]) == 2
    assert "--patience must be at least 1" in capsys.readouterr().err


def test_patience_leaves_the_best_epoch_on_disk(micro_model, tmp_path):
    """Dev accuracy rises to its best at epoch 3, then falls: --patience 2 stops after epoch 5 with epoch 3's
    model in OUT (not the last epoch's), which predicts the dev file at epoch 3's accuracy."""
    files = make_data("classify", tmp_path, random.Random(3))
    out = tmp_path / "out"
    assert cli(["finetune", "--task", "classify", "--model", micro_model, "--train", files["train"], "--dev",
                files["dev"], "--out", str(out), "--epochs", "8", "--lr", "3e-3", "--batch-size", "8", "--seed",
                "0", "--threads", "1", "--patience", "2", "--device", "cpu", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    acc = [h["accuracy"] for h in m["history"]]
    best = m["best_epoch"]
    assert best > 1 and acc.index(max(acc)) + 1 == best and m["stopped_early_after_epoch"] == best + 2 == len(acc)
    assert acc[-1] < acc[best - 1]  # (this data and seed) the last epoch's model would predict otherwise
    assert cli(["predict", "--model", str(out), "--input", files["dev"], "--metrics", str(tmp_path / "m.json"),
                "--output", str(tmp_path / "p.jsonl"), "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == acc[best - 1] == m["dev"]["accuracy"]


# `fastbert encode`: what a mutation audit found unpinned — truncation and --max-length's bounds, the default
# cut, the text and the rounding of JSONL rows, eval mode in embed(), an empty input

def test_encode_truncates_to_the_first_max_length_tokens(micro_model, tmp_path, capsys):
    """--max-length 8 (the smallest allowed): a longer text's vector is that of [CLS] + its first 6 word
    pieces + [SEP], recomputed here in float64; --max-length equal to the model's 64 positions is no note."""
    from fastbert.modeling import BertModel
    from fastbert.tasks import load_tokenizer
    text = "the cat sat on the big red mat near the door"
    inp = tmp_path / "in.txt"
    inp.write_text(text + "\n")
    out = tmp_path / "e.npy"
    assert cli(["encode", "--model", micro_model, "--input", str(inp), "--output", str(out), "--device", "cpu",
                "--precision", "fp32", "--max-length", "8", "--no-progress"]) == 0
    assert "1 of 1 texts truncated to 8 tokens" in capsys.readouterr().err
    model, tok = BertModel.from_pretrained(micro_model).double().eval(), load_tokenizer(micro_model)
    ids = tok.encode(text).ids
    assert len(ids) == 13  # [CLS] 11 words [SEP]
    with torch.no_grad():
        want = model(torch.tensor([ids[:7] + ids[-1:]])).last_hidden_state[0].mean(0).numpy()
    np.testing.assert_allclose(np.load(out)[0], want, rtol=1e-4, atol=1e-5)
    assert cli(["encode", "--model", micro_model, "--input", str(inp), "--output", str(out), "--device", "cpu",
                "--max-length", "64", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "above the model's" not in err and "truncated" not in err, err


@pytest.mark.parametrize("config, positions, expected", [
    (None, 64, 64), (None, 1024, 512),  # no sentence-transformers file: the positions, at most 512
    ({"max_seq_length": 256}, 512, 256), ({"max_seq_length": 600}, 512, 512),  # never past the positions
    ({"max_seq_length": 8}, 512, 8), ({"max_seq_length": 7}, 512, 512),  # 8 is the smallest usable cut
    ({"max_seq_length": True}, 512, 512), ({"max_seq_length": "256"}, 512, 512), ([256], 512, 512),
])
def test_encode_default_max_length_reads_sentence_bert_config(tmp_path, config, positions, expected):
    """The default cut: sentence_bert_config.json's max_seq_length (an int of at least 8), never past the
    model's positions; otherwise (no file, or a value that is no such int) the positions, at most 512."""
    from fastbert.encode import _default_max_length
    if config is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps(config))
    assert _default_max_length(str(tmp_path), positions) == expected


@pytest.mark.parametrize("from_stdin", [False, True])
def test_encode_jsonl_keeps_each_lines_text_but_its_line_break(micro_model, tmp_path, monkeypatch, from_stdin):
    """JSONL's "text" is the line as given: leading and trailing spaces and tabs kept, only the line break
    ("\\n" or "\\r\\n") stripped — from a file and from stdin."""
    lines = ["  the cat sat  ", "\tgood movie\t", "where is it ? ", ""]
    data = "\r\n".join(lines[:2]) + "\r\n" + "\n".join(lines[2:]) + "\n"
    inp = tmp_path / "in.txt"
    inp.write_bytes(data.encode())
    out = tmp_path / "e.jsonl"
    args = ["encode", "--model", micro_model, "--output", str(out), "--device", "cpu", "--no-progress"]
    if from_stdin:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data.encode()), encoding="utf-8"))
    else:
        args += ["--input", str(inp)]
    assert cli(args) == 0
    assert [r["text"] for r in _rows(out)] == lines


def test_encode_jsonl_values_are_the_npy_values_rounded_to_6_decimals(micro_model, tmp_path):
    """The same run written both ways: each JSONL number is the .npy's float32 value rounded to 6 decimals
    (the documented rounding; the batches are the same, so the values before rounding are too)."""
    inp, lines = _encode_input(tmp_path, n=5)
    base = _encode_base(micro_model, inp)
    assert cli(base + ["--output", str(tmp_path / "e.npy")]) == 0
    assert cli(base + ["--output", str(tmp_path / "e.jsonl")]) == 0
    npy = np.load(tmp_path / "e.npy")
    rows = _rows(tmp_path / "e.jsonl")
    assert [r["embedding"] for r in rows] == [[round(float(x), 6) for x in v] for v in npy]
    assert any(abs(float(x) - round(float(x), 5)) > 1e-6 for x in npy.ravel())  # 5 decimals would differ


def test_encode_embed_gives_eval_vectors_for_a_model_in_training_mode(micro_model):
    """embed() puts the model in eval mode: dropout (the micro model's 0.1) never touches the vectors, so a
    model left in training mode gives the eval model's vectors, run after run."""
    from fastbert.encode import embed
    from fastbert.modeling import BertModel
    from fastbert.tasks import load_tokenizer
    model, tok = BertModel.from_pretrained(micro_model), load_tokenizer(micro_model)
    assert model.config.hidden_dropout_prob > 0
    texts = ["the cat sat on the mat", "good movie", "where is it ?"]
    want, _ = embed(model.eval(), tok, texts, "mean", False, 2, 64)
    for _ in range(2):
        got, _ = embed(model.train(), tok, texts, "mean", False, 2, 64)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("output, extra, stdin", [("e.npy", [], False), ("e.jsonl", ["--no-progress"], False),
                                                  ("e.jsonl", [], True), ("e.npy", [], True)],
                         ids=["npy-counted", "jsonl-streamed", "jsonl-stdin", "npy-stdin"])
def test_encode_empty_input_is_an_error_and_writes_nothing(micro_model, tmp_path, monkeypatch, capsys, output, extra,
                                                           stdin):
    """No input lines at all (an empty file or stdin; not an empty line, which gets its row): exit 2 with
    "no input lines", whether the input was counted first (.npy) or streamed (JSONL), and no output file
    (not an empty array or an empty JSONL file that looks like a result)."""
    inp = tmp_path / "in.txt"
    inp.write_text("")
    args = ["encode", "--model", micro_model, "--device", "cpu", "--output", str(tmp_path / output)] + extra
    if stdin:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8"))
    else:
        args += ["--input", str(inp)]
    assert cli(args) == 2
    assert "fastbert encode: error: no input lines" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
