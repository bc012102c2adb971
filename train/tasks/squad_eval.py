"""SQuAD v1.1's exact match and F1 (Rajpurkar et al. 2016, section 5), as its official evaluation
script defines them, written out here:

- normalise both strings: lowercase, drop punctuation (ASCII `string.punctuation`), drop the
  articles a / an / the as whole words, collapse whitespace;
- exact match: the normalised strings are equal;
- F1: over the bags of normalised words, 2PR / (P + R) with P = overlap / predicted words and
  R = overlap / gold words (0 when there is no overlap);
- each question takes the best score over its gold answers, and the corpus score is the mean,
  reported in percent (0-100) as SQuAD reports it.

Limits: English normalisation only (the article list and punctuation set are SQuAD's); no
unanswerable questions (SQuAD 2.0's empty answer has no special case here).
"""

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction, gold):
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())  # multiset intersection
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions, golds):
    """predictions: {id: text}; golds: {id: [answer texts]} -> {"exact_match", "f1"} in percent.
    Every gold question counts; one without a prediction scores 0."""
    if not golds:
        raise ValueError("no gold questions to score")
    # a missing prediction is not the empty string: an answer that normalises to "" ("The")
    # would then match it, where the official script scores a missing prediction 0
    answered = {q: a for q, a in golds.items() if q in predictions}
    em = sum(max(exact_match(predictions[q], a) for a in answers)
             for q, answers in answered.items())
    f = sum(max(f1(predictions[q], a) for a in answers) for q, answers in answered.items())
    return {"exact_match": 100.0 * em / len(golds), "f1": 100.0 * f / len(golds)}
