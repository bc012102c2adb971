"""The pretraining data pipeline (train/pretrain/corpus.py): the token cache, FULL-SENTENCES packing
(no token lost or duplicated, document boundaries kept) and batches that are a pure function of
(seed, epoch, batch)."""

import os

import numpy as np
import pytest

from minibert.tokenizer import Tokenizer
from train.pretrain.masking import Masker
from train.pretrain.corpus import MLMData, Packing, load_corpus, tokenize_to_cache
from train.pretrain.tokenizer import train_tokenizer

DOCS = [
    "The senate voted on the nomination this afternoon.",
    "",  # a blank line is not a document
    "Stocks fell sharply on Monday " * 9,  # longer than one packed sequence
    "Short.",
    "The president of the United States said the talks went well, and markets rose.",
]


@pytest.fixture(scope="module")
def tok_and_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    corpus = d / "train.txt"
    corpus.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    tok = train_tokenizer([str(corpus)], vocab_size=200, min_frequency=1)
    tok.save(str(d / "tok"))
    return Tokenizer.from_dir(str(d / "tok")), str(corpus)


def reference_ids(tok, docs):
    """The corpus as the tokenizer sees it, document by document, no special tokens."""
    return [tok.tok.encode(t, add_special_tokens=False).ids for t in docs if t.strip()]


def test_cache_holds_every_document(tok_and_corpus, tmp_path):
    tok, corpus = tok_and_corpus
    tokens, offsets, _ = tokenize_to_cache(corpus, tok, str(tmp_path))  # its own: no other run
    assert tokens.dtype == np.uint16  # 200 tokens fit in 16 bits
    want = reference_ids(tok, DOCS)
    assert len(offsets) == len(want) + 1
    got = [tokens[offsets[d]:offsets[d + 1]].tolist() for d in range(len(want))]
    assert got == want
    # a second call reads the cache instead of tokenizing again
    cache = os.path.dirname(tokens.filename)
    before = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)}
    tokenize_to_cache(corpus, tok, str(tmp_path))
    assert before == {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)}


@pytest.mark.parametrize("damage", ["truncate tokens", "pickle offsets", "garble meta"])
def test_a_damaged_cache_is_made_again(tok_and_corpus, tmp_path, damage):
    """A cache hurt after it was made (a full disk, a stray edit) is said and rebuilt, not read
    as it is: a short token file, offsets that np.load would only read by unpickling, and a meta
    file that is not JSON each used to be an error naming no file, at every later run."""
    import io
    import pickle
    tok, corpus = tok_and_corpus
    tokens, offsets, _ = tokenize_to_cache(corpus, tok, str(tmp_path))
    want = (tokens.tolist(), offsets.tolist())
    stem = tokens.filename[:-len(".tokens")]
    del tokens
    if damage == "truncate tokens":
        os.truncate(stem + ".tokens", 3)
    elif damage == "pickle offsets":
        with open(stem + ".offsets.npy", "wb") as f:
            np.save(f, np.array([pickle.dumps(1)], dtype=object), allow_pickle=True)
    else:
        with open(stem + ".json", "w") as f:
            f.write("{'n_tokens': ")
    log = io.StringIO()
    tokens, offsets, _ = tokenize_to_cache(corpus, tok, str(tmp_path), log=log)
    assert (tokens.tolist(), offsets.tolist()) == want
    assert f"token cache {stem}.*: damaged; tokenizing {corpus} again" in log.getvalue()


@pytest.mark.parametrize("max_len", [8, 13, 128])  # shorter than a doc, odd, longer than all
def test_packing_loses_and_duplicates_nothing(tok_and_corpus, max_len, tmp_path):
    tok, corpus = tok_and_corpus
    [packing] = load_corpus([corpus], tok, max_len, str(tmp_path))
    seqs = [packing[i] for i in range(len(packing))]
    assert all(s[0] == tok.cls_id and s[-1] == tok.sep_id for s in seqs)
    assert all(len(s) == max_len for s in seqs[:-1])  # only the last one is short
    assert len(seqs[-1]) <= max_len
    # strip [CLS] ... [SEP] and lay the sequences end to end: the stream, with one [SEP] after
    # each document; splitting it at those gives back the documents exactly, in order
    stream = np.concatenate([s[1:-1] for s in seqs]).tolist()
    want = reference_ids(tok, DOCS)
    assert len(stream) == sum(map(len, want)) + len(want)
    docs, cur = [], []
    for t in stream:
        if t == tok.sep_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == [] and docs == want


def test_a_corpus_line_that_is_not_utf8_is_named(tok_and_corpus, tmp_path):
    tok, corpus = tok_and_corpus
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(open(corpus, "rb").read() + "café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{bad}:6: not UTF-8 \(byte 0xe9 at column 4\)"):
        tokenize_to_cache(str(bad), tok, str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=rf"^{bad}:6: not UTF-8"):
        train_tokenizer([str(bad)], vocab_size=200, min_frequency=1)
    assert not os.listdir(tmp_path / "cache")  # nothing half-written left to be reused


def test_packing_by_hand():
    # two documents [10 11 12] and [20 21], L = 3: stream 10 11 12 S 20 21 S
    p = Packing(np.array([10, 11, 12, 20, 21]), np.array([0, 3, 5]), max_len=5, cls_id=1, sep_id=2)
    assert [p[i].tolist() for i in range(len(p))] == [
        [1, 10, 11, 12, 2], [1, 2, 20, 21, 2], [1, 2, 2]]


def test_batches_are_a_pure_function_of_seed_epoch_batch(tok_and_corpus, tmp_path):
    tok, corpus = tok_and_corpus
    vocab = [tok.id_to_token(i) for i in range(tok.vocab_size)]

    def data(seed):
        masker = Masker(vocab, tok.special_ids, tok.mask_id)
        return MLMData(load_corpus([corpus], tok, 13, str(tmp_path)), 2, seed, masker, tok.pad_id)

    a, b = data(0), data(0)
    assert a.batches(1) == b.batches(1)
    assert a.batches(0) != a.batches(1)  # a new order every epoch
    assert sorted(i for bt in a.batches(2) for i in bt) == list(range(len(a)))
    x, y = a.collate(a.batches(1)[2]), b.collate(b.batches(1)[2])
    for k in x:
        assert (x[k] == y[k]).all(), k
    z = data(1).collate(a.batches(1)[2])  # other seed: other masks for the same sequences
    assert not (z["labels"] == x["labels"]).all()


def test_log_every_zero_is_refused_naming_the_flag():
    from train.pretrain.config import PretrainConfig
    with pytest.raises(ValueError, match="^--log-every 0 must be at least 1"):
        PretrainConfig(corpus=["c.txt"], config="tiny", log_every=0)
