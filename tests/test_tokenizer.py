"""minibert's tokenizer against transformers' tokenizer for the published MiniLM directory.

Three ways to get a minibert tokenizer are checked against the same reference: the published
`tokenizer.json`, the one `weights import` re-saves, and `vocab.txt` alone (minibert then builds
BERT's normalizer, pre-tokenizer, WordPiece and [CLS]/[SEP] template itself). Ids, segment ids,
the attention mask and character offsets must be equal, not close.
"""

import os
import shutil

import pytest
import torch

import minibert

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
