"""minibert's tokenizer against transformers' tokenizer for the published MiniLM directory.

Three ways to get a minibert tokenizer are checked against the same reference: the published
`tokenizer.json`, the one `weights import` re-saves, and `vocab.txt` alone (minibert then builds
BERT's normalizer, pre-tokenizer, WordPiece and [CLS]/[SEP] template itself). Ids, segment ids,
the attention mask and character offsets must be equal, not close.

Then the options of `tokenizer_config.json` (cased, accents kept or stripped, CJK split or not),
on a small vocabulary: read from `vocab.txt` by both libraries, and written back by minibert's
`save` so that transformers reads the saved tokenizer as minibert does.
"""

import json
import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer

import minibert
from minibert.errors import CheckpointError
from minibert.tokenizer import build_wordpiece

LONG = " ".join(f"Sentence number {i} talks about tokenization, truncation and padding."
                for i in range(80))  # about 1,000 tokens: longer than any max_length below
TEXTS = [
    "Hello, world!",
    "Café déjà vu: naïve résumé, Ångström, façade.",  # accents, stripped by uncased BERT
    "e\u0301 (a combining accent), ½ ² ﬁ: compatibility characters",
    "Prices rose 3.14% to $1,234,567.89 on 2024-01-31 at 10:45pm (#42).",  # numbers, punctuation
    "Supercalifragilisticexpialidocious antidisestablishmentarianism xyzzyqwv",  # word pieces
    "a" * 150,  # one word over WordPiece's 100-character limit: a single [UNK]
    "日本語のテキストと中文字符，以及한국어.",  # CJK (split per character) and Hangul
    "Emoji 😀🎉 and symbols ™ © → ∞",  # mostly [UNK]
    "tabs\tand\nnew lines\r\n and \u200b zero-width \x00 control chars",
    "The capital of France is [MASK]. [CLS] a [SEP] b [UNK] [PAD]; [mask] is plain text",
    "",
    LONG,
]
# Pairs whose sides have very different lengths, so that longest-first truncation has to choose.
PAIRS = [
    (TEXTS[0], TEXTS[3]),
    (TEXTS[4], TEXTS[0]),
    (TEXTS[1], TEXTS[6]),
    (TEXTS[9], TEXTS[2]),
    (LONG, TEXTS[7]),
    (TEXTS[8], LONG),
]


@pytest.fixture(scope="module", params=["published", "imported", "vocab_only"])
def ours(request, minilm_original_dir, minilm_dir, tmp_path_factory):
    if request.param == "published":
        return minibert.load_tokenizer(minilm_original_dir)
    if request.param == "imported":
        return minibert.load_tokenizer(minilm_dir)
    d = tmp_path_factory.mktemp("vocab_only")
    shutil.copy(os.path.join(minilm_original_dir, "vocab.txt"), d)
    tok = minibert.load_tokenizer(d)
    assert tok.source.endswith("vocab.txt")  # really the fallback, not a tokenizer.json
    return tok


def _reference(hf_tok, texts, pairs, max_length):
    return hf_tok(texts, pairs, padding="longest", truncation="longest_first",
                  max_length=max_length, return_offsets_mapping=True, return_tensors="pt")


def _assert_equal(ours, ref):
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[k], ref[k]), k
    assert torch.equal(ours["offsets"], ref["offset_mapping"])


@pytest.mark.parametrize("max_length", [512, 16])
def test_single_texts_match_transformers(ours, minilm_hf_tokenizer, max_length):
    got = ours.encode_batch(TEXTS, max_length=max_length, return_offsets=True)
    ref = _reference(minilm_hf_tokenizer, TEXTS, None, max_length)
    _assert_equal(got, ref)
    assert got["input_ids"].shape[1] == max_length  # LONG was truncated to exactly max_length
    assert (got["input_ids"] == ours.unk_id).any()


@pytest.mark.parametrize("max_length", [512, 24, 9])
def test_pairs_match_transformers(ours, minilm_hf_tokenizer, max_length):
    a, b = map(list, zip(*PAIRS))
    got = ours.encode_batch(a, b, max_length=max_length, return_offsets=True)
    ref = _reference(minilm_hf_tokenizer, a, b, max_length)
    _assert_equal(got, ref)
    assert (got["token_type_ids"] == 1).any()
    if max_length == 512:
        assert (got["attention_mask"] == 0).any()  # the batch is padded
    else:
        assert got["input_ids"].shape[1] == max_length  # and here truncated


def test_known_ids(ours):
    # Anchors that do not depend on transformers: BERT's uncased vocabulary ids.
    b = ours.encode_batch(["Hello, world!"], ["Café"])
    assert b["input_ids"].tolist() == [[101, 7592, 1010, 2088, 999, 102, 7668, 102]]
    assert b["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 1, 1]]
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (0, 100, 101,
                                                                                  102, 103)


# A vocabulary in which casing, accents and CJK splitting each change the ids.
SMALL_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "World", "hello", "world",
               "Café", "café", "cafe", "naïve", "naive", "Naïve", ".", ",", "日", "本", "日本"]
OPTION_TEXTS = ["Hello World, hello world.", "Café naïve Naïve cafe.", "Hello [MASK].", "日本"]
OPTIONS = [
    {"do_lower_case": False},  # a cased model
    {"do_lower_case": True, "strip_accents": False},  # lowercase, accents kept
    {"do_lower_case": False, "strip_accents": True},  # cased, accents stripped
    {"do_lower_case": True, "tokenize_chinese_chars": False},
]


def _small_tokenizer_dir(d, options):
    d.mkdir()
    (d / "vocab.txt").write_text("".join(t + "\n" for t in SMALL_VOCAB), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", **options}))
    return d


def _ids(tok, texts):
    if isinstance(tok, minibert.Tokenizer):
        return tok.encode_batch(texts)["input_ids"].tolist()
    return tok(texts, padding="longest", return_tensors="pt")["input_ids"].tolist()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: json.dumps(o))
def test_vocab_txt_follows_tokenizer_config(options, tmp_path):
    d = _small_tokenizer_dir(tmp_path / "tok", options)
    ours = minibert.load_tokenizer(d)
    assert ours.source.endswith("vocab.txt")
    assert _ids(ours, OPTION_TEXTS) == _ids(AutoTokenizer.from_pretrained(d), OPTION_TEXTS)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: json.dumps(o))
def test_saved_tokenizer_config_says_how_it_normalizes(options, tmp_path):
    # transformers rebuilds BERT's normalizer from tokenizer_config.json, not tokenizer.json
    ours = minibert.load_tokenizer(_small_tokenizer_dir(tmp_path / "tok", options))
    ours.save(tmp_path / "saved")
    want = _ids(ours, OPTION_TEXTS)
    assert _ids(AutoTokenizer.from_pretrained(tmp_path / "saved"), OPTION_TEXTS) == want
    assert _ids(minibert.load_tokenizer(tmp_path / "saved"), OPTION_TEXTS) == want


def test_a_bad_tokenizer_config_value_is_named(tmp_path):
    d = _small_tokenizer_dir(tmp_path / "tok", {"do_lower_case": "no"})
    with pytest.raises(CheckpointError,
                       match=r"tokenizer_config.json: do_lower_case='no' must be true or false"):
        minibert.load_tokenizer(d)


@pytest.mark.parametrize("options", OPTIONS + [{}], ids=lambda o: json.dumps(o))
def test_tokenizer_json_follows_tokenizer_config(options, tmp_path):
    """transformers' BertTokenizer sets the normalizer from tokenizer_config.json (BERT's defaults
    for keys it lacks) over what tokenizer.json says; so does minibert, to give the same ids."""
    d = _small_tokenizer_dir(tmp_path / "tok", options)
    vocab = {t: i for i, t in enumerate(SMALL_VOCAB)}
    opposite = not options.get("do_lower_case", True)  # tokenizer.json says the other case
    build_wordpiece(vocab, lowercase=opposite).save(str(d / "tokenizer.json"))
    ours = minibert.load_tokenizer(d)
    assert ours.source.endswith("tokenizer.json")
    assert _ids(ours, OPTION_TEXTS) == _ids(AutoTokenizer.from_pretrained(d), OPTION_TEXTS)


def test_bad_tokenizer_files_are_named(tmp_path):
    d = _small_tokenizer_dir(tmp_path / "tok", {})
    (d / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(CheckpointError, match=r"tok/tokenizer.json: not a readable tokenizer.json"):
        minibert.load_tokenizer(d)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: must be a JSON object"):
        minibert.load_tokenizer(d)
    (d / "tokenizer_config.json").unlink()
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    with pytest.raises(CheckpointError, match=r"vocab.txt: vocabulary lacks .*\[MASK\]"):
        minibert.load_tokenizer(d)


def test_a_vocab_txt_with_a_repeated_line_keeps_its_ids_when_saved(tmp_path):
    """A token listed twice takes its later line's id (as in transformers), leaving the earlier
    id to no token; the saved vocab.txt keeps line i = id i, so it reads back the same."""
    d = tmp_path / "tok"
    d.mkdir()
    (d / "vocab.txt").write_text("".join(t + "\n" for t in SMALL_VOCAB[:9] + ["Hello", "there"]))
    (d / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    texts = ["Hello there world"]
    want = _ids(AutoTokenizer.from_pretrained(d), texts)
    assert _ids(minibert.load_tokenizer(d), texts) == want
    minibert.load_tokenizer(d).save(tmp_path / "saved")
    (tmp_path / "saved" / "tokenizer.json").unlink()  # read back through vocab.txt alone
    assert _ids(minibert.load_tokenizer(tmp_path / "saved"), texts) == want


def test_a_max_length_without_room_for_a_token_is_an_error():
    from tests.tiny import tiny_tokenizer
    with pytest.raises(ValueError, match="max_length=1 leaves no room"):
        tiny_tokenizer().encode_batch(["a b c"], max_length=1)
    with pytest.raises(ValueError, match="max_length=2 leaves no room.*pair"):
        tiny_tokenizer().encode_batch(["a b c"], pairs=["b"], max_length=2)
    b = tiny_tokenizer().encode_batch(["a b c"], pairs=["b"], max_length=3)
    assert b["input_ids"].shape == (1, 3)


def test_no_texts_give_empty_tensors():
    from tests.tiny import tiny_tokenizer
    b = tiny_tokenizer().encode_batch([])
    assert b["input_ids"].shape == b["attention_mask"].shape == (0, 0)


def _bert_checkpoint_dir(d, tokenizer_config):
    """SMALL_VOCAB as a BERT checkpoint's tokenizer: config.json names the model type, so that
    transformers picks its BERT tokenizer class when tokenizer_config.json names none."""
    d.mkdir()
    (d / "vocab.txt").write_text("".join(t + "\n" for t in SMALL_VOCAB), encoding="utf-8")
    (d / "config.json").write_text('{"model_type": "bert"}')
    if tokenizer_config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return d


@pytest.mark.parametrize("options", [None, {}, {"do_lower_case": False}],
                         ids=["no tokenizer_config", "{}", "cased, no class"])
def test_tokenizer_json_follows_a_config_that_names_no_class(options, tmp_path):
    """An older checkpoint's tokenizer_config.json may name no tokenizer class, or be missing:
    transformers still reads it with BERT's class, whose options override tokenizer.json's."""
    d = _bert_checkpoint_dir(tmp_path / "tok", options)
    vocab = {t: i for i, t in enumerate(SMALL_VOCAB)}
    opposite = not (options or {}).get("do_lower_case", True)
    build_wordpiece(vocab, lowercase=opposite).save(str(d / "tokenizer.json"))
    assert _ids(minibert.load_tokenizer(d), OPTION_TEXTS) == \
        _ids(AutoTokenizer.from_pretrained(d), OPTION_TEXTS)


def test_a_tokenizer_json_without_a_post_processor_gets_bert_s_template(tmp_path):
    d = _bert_checkpoint_dir(tmp_path / "tok", {"tokenizer_class": "BertTokenizer"})
    tok = build_wordpiece({t: i for i, t in enumerate(SMALL_VOCAB)})
    spec = json.loads(tok.to_str())
    spec["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(spec))
    ours = _ids(minibert.load_tokenizer(d), ["hello world"])
    assert ours == _ids(AutoTokenizer.from_pretrained(d), ["hello world"]) == [[2, 7, 8, 3]]


@pytest.mark.parametrize("where", ["added_tokens.json", "added_tokens_decoder"])
def test_tokens_added_beside_a_vocab_txt_keep_their_ids(where, tmp_path):
    d = _bert_checkpoint_dir(tmp_path / "tok", {"tokenizer_class": "BertTokenizer"})
    n = len(SMALL_VOCAB)
    if where == "added_tokens.json":
        (d / "added_tokens.json").write_text(json.dumps({"<ent>": n, "<loc>": n + 1}))
    else:
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "BertTokenizer", "added_tokens_decoder": {
                str(n): {"content": "<ent>", "special": False, "normalized": True},
                str(n + 1): {"content": "<loc>", "special": True, "normalized": False}}}))
    texts = ["hello <ent> world <loc>."]
    ours = _ids(minibert.load_tokenizer(d), texts)
    assert ours == _ids(AutoTokenizer.from_pretrained(d), texts)
    assert n in ours[0] and n + 1 in ours[0]


def test_a_tokenizer_json_alone_keeps_its_own_normalizer(tmp_path):
    # no config.json and no tokenizer_config.json: nothing says BERT's class reads it, so its
    # own (cased) normalizer stands, as transformers' PreTrainedTokenizerFast keeps it
    from tokenizers import Tokenizer as HFTokenizer
    d = tmp_path / "tok"
    d.mkdir()
    build_wordpiece({t: i for i, t in enumerate(SMALL_VOCAB)}, lowercase=False).save(
        str(d / "tokenizer.json"))
    own = HFTokenizer.from_file(str(d / "tokenizer.json"))
    assert _ids(minibert.load_tokenizer(d), ["Hello world"]) == \
        [own.encode("Hello world").ids] == [[2, 5, 8, 3]]
