"""Labelled examples from JSONL, CSV or TSV files, and the batches a trainer draws from them.

Reading is strict: a row with a missing field, an empty text, an empty label, a label unseen in
training, or a line that does not decode stops the run with `file:line` and the reason. With
`skip_bad_rows` such rows are skipped and counted instead, and the count is printed; nothing is
dropped silently.

Batching is dynamic: each batch is padded to its own longest sequence. With `group_by_length`,
examples are sorted by length inside large shuffled windows so that a batch holds similar lengths
(less padding, faster steps) while the order stays random from epoch to epoch. The order is a
pure function of (seed, epoch), which is what makes exact resume possible.
"""

import csv
import io
import json
import os
import random
import sys
from dataclasses import dataclass, field

from minibert.errors import UserError


class DataError(UserError, ValueError):
    """A data file not in the form expected; the message names the file and the line."""


@dataclass
class Example:
    text: str
    pair: str | None
    target: object  # the raw label (str) for classification, a float for regression, ...
    where: str  # file:line, for error messages


@dataclass
class ReadStats:
    path: str
    rows: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count

    def summary(self):
        s = f"{self.path}: {self.rows} rows"
        if self.skipped:
            s += ", skipped " + ", ".join(f"{n} ({why})" for why, n in self.skipped.items())
        return s


def decode_line(raw, path, n):
    """Line n of a file, bytes, as text; a DataError naming path:n when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                        f"{e.start + 1}); convert the file, e.g. iconv -t UTF-8") from None


def _read_bytes(path):
    """The file's bytes, without a UTF-8 byte-order mark (as many Windows tools write one)."""
    with open(path, "rb") as fb:
        data = fb.read()
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def read_lines(path, data=None):
    """(line number, text or the DataError of a line that is not UTF-8) of each line, split at
    "\n" only: str.splitlines() would also split at U+2028 or U+0085 inside a JSON string. A
    CRLF line keeps its "\r", which JSON allows."""
    for n, raw in enumerate((_read_bytes(path) if data is None else data).split(b"\n"), 1):
        try:
            yield n, decode_line(raw, path, n)
        except DataError as e:
            yield n, e


def _rows(path):
    """(line number, dict) for each data row of a JSONL, CSV or TSV file."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".json", ".csv", ".tsv"):
        raise DataError(f"{path}: unknown format {ext!r}; use .jsonl, .csv or .tsv")
    data = _read_bytes(path)
    if ext in (".jsonl", ".json"):
        for i, line in read_lines(path, data):
            if isinstance(line, DataError):  # a bad row, which --skip-bad-rows may skip
                yield i, line
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, DataError(f"{path}:{i}: not valid JSON ({e.msg})")
                continue
            yield i, row if isinstance(row, dict) else DataError(f"{path}:{i}: not a JSON object")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason})") from None
    yield from _table_rows(path, text, tsv=ext == ".tsv")


def _table_rows(path, text, tsv):
    """(line number, dict) of each data row of CSV or TSV `text`; a row's number is the line it
    starts on (a quoted CSV field may hold newlines).

    CSV is read as RFC 4180 says, strictly: a quote left open would otherwise swallow every line
    after it into one field. TSV is read as GLUE's files are written, with no quoting at all: a
    text may start with a quote. A row with more fields than the header is an error: a comma or
    tab inside an unquoted text would otherwise cut the text short silently."""
    reader = csv.reader(io.StringIO(text, newline=""),  # newline="": keep them inside fields
                        delimiter="\t" if tsv else ",", strict=not tsv,
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    # No field is longer than the file. The limit is process-wide: restored once read.
    old_limit = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    rows, start = [], 1
    try:
        header = next(reader, [])
        start = reader.line_num + 1
        for row in reader:
            if len(row) > len(header):
                rows.append((start, DataError(f"{path}:{start}: {len(row)} fields, but the "
                                              f"header has {len(header)}")))
            elif row:  # [] is a blank line
                rows.append((start, dict(zip(header, row))))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{start}: not valid {'TSV' if tsv else 'CSV'} ({e})") from None
    finally:
        csv.field_size_limit(old_limit)
    return rows


def read_examples(path, text_field, pair_field, target_field, skip_bad_rows=None,
                  check_target=None):
    """Read `path` into Examples. `check_target(value) -> error message or None` validates the
    target (e.g. a dev label must exist in train). skip_bad_rows: --skip-bad-rows, or None for
    a command without that flag (predict), whose errors then do not suggest it."""
    stats = ReadStats(path)
    examples = []

    def bad(where, why):
        if not skip_bad_rows:
            raise DataError(f"{where}: {why}" + (" (use --skip-bad-rows to skip and count such "
                                                 "rows)" if skip_bad_rows is False else ""))
        key = why.split(":")[0]
        stats.skipped[key] = stats.skipped.get(key, 0) + 1

    for line, row in _rows(path):
        where = f"{path}:{line}"
        if isinstance(row, DataError):
            bad(where, str(row).split(": ", 1)[1])
            continue
        missing = [f for f in (text_field, pair_field, target_field) if f and row.get(f) is None]
        if missing:
            bad(where, f"missing field {missing[0]!r}")
            continue
        not_text = [f for f in (text_field, pair_field) if f and not isinstance(row[f], str)]
        if not_text:
            bad(where, f"field {not_text[0]!r} is {row[not_text[0]]!r}, not a text")
            continue
        text, pair = row[text_field], row[pair_field] if pair_field else None
        if not text.strip() or (pair is not None and not pair.strip()):
            bad(where, "empty text")
            continue
        target = row[target_field] if target_field else None
        if check_target is not None:
            err = check_target(target)
            if err:
                bad(where, err)
                continue
        examples.append(Example(text, pair, target, where))
        stats.rows += 1
    if not examples:
        raise DataError(f"{path}: no usable rows")
    print(f"data: {stats.summary()}", file=sys.stderr)
    return examples, stats


def label_key(v):
    """Labels are compared as strings, so that 1 (JSON), "1" (CSV) and 1.0 are one class."""
    s = str(v).strip()
    return str(int(float(s))) if _is_number(s) and float(s).is_integer() else s


def build_label_map(examples):
    """Sorted label -> index map from the training data (integer labels sort numerically).

    Refused, naming a row: a label that is a non-integer number (a score: --task regression),
    labels that mix numbers and names ("pos" and 0 would become two unrelated classes), and a
    single class (a one-class model scores 1.0 on anything and learns nothing)."""
    first = {}
    for e in examples:
        first.setdefault(label_key(e.target), e)
    kinds = {}
    for key, e in first.items():
        if isinstance(e.target, bool) or not isinstance(e.target, (int, float, str)):
            raise DataError(f"{e.where}: label {e.target!r} is not a class name or an integer")
        if _is_number(key) and not float(key).is_integer():
            raise DataError(f"{e.where}: label {e.target!r} is not an integer class; for a "
                            "real-valued target use --task regression")
        kinds.setdefault("number" if _is_number(key) else "name", e)
    if len(kinds) > 1:
        raise DataError(f"{kinds['name'].where}: label {kinds['name'].target!r} is a name, but "
                        f"{kinds['number'].where} has the number {kinds['number'].target!r}; "
                        "give every label in one form")
    if len(first) < 2:
        raise DataError(f"{examples[0].where.rsplit(':', 1)[0]}: every row has the label "
                        f"{next(iter(first))!r}; a classifier needs at least two classes")
    labels = sorted(first, key=lambda s: (int(float(s)), s) if _is_number(s) else (0, s))
    return {lab: i for i, lab in enumerate(labels)}


def _is_number(s):
    try:
        return float(s) == float(s)  # not NaN
    except ValueError:
        return False


class Batched:
    """The batching every labelled dataset shares: `batches(epoch)` is batch_order over the
    dataset's `lengths`, with the settings given here."""

    def __init__(self, batch_size, seed=0, group_by_length=False, shuffle=False):
        self.batch_size, self.seed = batch_size, seed
        self.group_by_length, self.shuffle = group_by_length, shuffle

    def batches(self, epoch):
        return batch_order(self.lengths, self.batch_size, self.seed, epoch,
                           self.group_by_length, self.shuffle)


def batch_order(lengths, batch_size, seed, epoch, group_by_length, shuffle=True):
    """Lists of example indices, one per batch: a pure function of its arguments.

    group_by_length sorts within windows of 50 batches: most padding goes away, yet consecutive
    epochs still see different batches.
    """
    idx = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(idx)
    if group_by_length:
        window = batch_size * 50
        idx = [i for s in range(0, len(idx), window)
               for i in sorted(idx[s:s + window], key=lambda j: lengths[j])]
    batches = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    if group_by_length and shuffle:
        rng.shuffle(batches)  # otherwise each window would run short-to-long
    return batches
