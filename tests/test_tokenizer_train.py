"""`minibert tokenizer train` (train/pretrain/tokenizer.py): the vocabulary it learns must tokenize
exactly as transformers' BertTokenizerFast does when given the same vocab.txt, since that is how
anyone else will read the checkpoint."""

import pytest

from minibert.tokenizer import SPECIALS, Tokenizer
from train.pretrain.tokenizer import train_tokenizer

TEXTS = [
    "The Café served crème brûlée to the Naïve Critic.",
    "Stocks fell sharply on Monday, and the president said nothing.",
    "Unbelievably, the unbelievers believed: 3.5% growth in 2024!",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "corpus.txt"
    path.write_text("\n".join(TEXTS * 20) + "\n", encoding="utf-8")
    return str(path)


def test_specials_first_and_pipeline_is_berts(corpus, tmp_path):
    tok = train_tokenizer([corpus], vocab_size=300, min_frequency=1)
    assert [tok.tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3, 4]
    assert tok.pad_id == 0
    enc = tok.tok.encode("Café", "Naïve")
    # uncased, accents stripped, [CLS] A [SEP] B [SEP] with segment ids 0 / 1
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert "".join(t.lstrip("#") for t in enc.tokens[1:enc.tokens.index("[SEP]")]) == "cafe"
    assert enc.type_ids[-1] == 1 and enc.type_ids[0] == 0
    assert any(t.startswith("##") for t in tok.tok.get_vocab())  # WordPiece continuations
    tok.save(str(tmp_path))
    again = Tokenizer.from_dir(str(tmp_path))
    assert again.vocab_size <= 300
    assert again.tok.encode(TEXTS[0]).ids == enc_ids(tok, TEXTS[0])


def enc_ids(tok, text):
    return tok.tok.encode(text).ids


def test_same_ids_as_transformers_from_vocab_txt(corpus, tmp_path):
    from transformers import BertTokenizerFast

    tok = train_tokenizer([corpus], vocab_size=300, min_frequency=1)
    tok.save(str(tmp_path))
    # transformers 5 takes the vocabulary as a {token: id} dict; read vocab.txt by hand so that
    # only the file, not our tokenizer.json, reaches the reference
    lines = (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    ref = BertTokenizerFast(vocab={t: i for i, t in enumerate(lines)}, do_lower_case=True,
                            strip_accents=True)
    assert len(ref) == tok.vocab_size
    for text in TEXTS + ["A word never seen: zyzzyva."]:
        assert enc_ids(tok, text) == ref(text)["input_ids"], text


def test_bad_inputs_fail_loudly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        train_tokenizer([str(tmp_path / "missing.txt")], vocab_size=100)
    (tmp_path / "c.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="special"):
        train_tokenizer([str(tmp_path / "c.txt")], vocab_size=5)


def test_blank_corpus_or_no_alphabet_is_refused_not_written(corpus, tmp_path):
    # either once wrote a tokenizer of the 5 special tokens alone, and said nothing
    from train.cli import main

    blank = tmp_path / "blank.txt"
    blank.write_text("\ufeff\n  \n\t\n\u00a0\u3000\n", encoding="utf-8")  # BOM, Unicode spaces
    out = tmp_path / "tok"
    with pytest.raises(SystemExit, match=rf"^minibert tokenizer train: {blank}: no text to learn"):
        main(["tokenizer", "train", "--corpus", corpus, str(blank), "--out", str(out)])
    with pytest.raises(SystemExit, match=r"--limit-alphabet 0: must be at least 1"):
        main(["tokenizer", "train", "--corpus", corpus, "--out", str(out), "--limit-alphabet", "0"])
    control = tmp_path / "control.txt"  # text that the normalizer drops entirely
    control.write_text("\x01\x02\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"control.txt: no text to learn from \(no token"):
        main(["tokenizer", "train", "--corpus", str(control), "--out", str(out)])
    assert not out.exists()


def test_vocabulary_larger_than_asked_is_said(tmp_path, capsys):
    # 60 CJK characters, each a word of its own: the trainer keeps them all, past --vocab-size
    from train.cli import main

    cjk = tmp_path / "cjk.txt"
    cjk.write_text(" ".join(chr(0x4E00 + i) for i in range(60)) + "\n", encoding="utf-8")
    main(["tokenizer", "train", "--corpus", str(cjk), "--out", str(tmp_path / "t"),
          "--vocab-size", "20"])
    assert "65 tokens, more than --vocab-size 20" in capsys.readouterr().err


def test_command_line_writes_a_tokenizer_that_transformers_reads_the_same(corpus, tmp_path,
                                                                          capsys):
    # `minibert tokenizer train` end to end: two corpus files after one --corpus (the second
    # holds a word only it has, so a vocabulary learned from the first alone would split it),
    # --vocab-size reaches the trainer, and the written directory loads and tokenizes every
    # corpus line as BertTokenizerFast does on the written vocab.txt alone
    from transformers import BertTokenizerFast

    from train.cli import main

    extra = tmp_path / "extra.txt"
    extra.write_text("zyzzyva zyzzyva zyzzyva.\n" * 30, encoding="utf-8")
    sizes = {}
    for n in (80, 130):
        out = tmp_path / f"tok{n}"
        assert main(["tokenizer", "train", "--corpus", corpus, str(extra), "--out", str(out),
                     "--vocab-size", str(n)]) in (0, None)
        assert f"written to {out}" in capsys.readouterr().err
        tok = Tokenizer.from_dir(str(out))
        lines = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
        assert lines[:len(SPECIALS)] == list(SPECIALS) and len(lines) == tok.vocab_size
        sizes[n] = tok.vocab_size
        ref = BertTokenizerFast(vocab={t: i for i, t in enumerate(lines)}, do_lower_case=True,
                                strip_accents=True)
        texts = open(corpus, encoding="utf-8").read().splitlines()[:3] + \
            [extra.read_text(encoding="utf-8").splitlines()[0], "Unseen: qwxj!"]
        for text in texts:
            assert enc_ids(tok, text) == ref(text)["input_ids"], (n, text)
    # the vocabulary is as large as asked (at --min-frequency 2 these files hold 155 pieces, so
    # both sizes are reachable)
    assert sizes == {80: 80, 130: 130}
    assert "zyzzyva" in lines  # learned from the second file


def test_ids_follow_one_fixed_order(corpus, tmp_path):
    # the trainer's own ids follow hash order where counts tie, so runs that learn the same
    # tokens numbered them differently; now specials, then the tokens sorted
    train_tokenizer([corpus], vocab_size=300, min_frequency=1).save(str(tmp_path))
    lines = (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:5] == list(SPECIALS) and lines[5:] == sorted(lines[5:])
