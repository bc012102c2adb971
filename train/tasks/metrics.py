"""Classification metrics, written out: accuracy, precision, recall, F1 and the confusion matrix.

Binary tasks report precision/recall/F1 of the positive class (label index 1) as `precision`,
`recall`, `f1`, and also the macro averages (`macro_f1` ...) that multi-class tasks use, over the
classes that occur in the gold labels or the predictions. Checked
against hand-computed examples in tests/test_metrics.py.
"""


def confusion_matrix(gold, pred, n):
    """cm[g][p] = number of examples of class g predicted as p."""
    cm = [[0] * n for _ in range(n)]
    for g, p in zip(gold, pred):
        cm[g][p] += 1
    return cm


def prf(correct, n_pred, n_gold):
    """(precision, recall, F1) of `correct` hits among n_pred predictions and n_gold gold units;
    0 where a denominator is 0."""
    p = correct / n_pred if n_pred else 0.0
    r = correct / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def classification_metrics(gold, pred, n_classes):
    cm = confusion_matrix(gold, pred, n_classes)
    acc = sum(cm[c][c] for c in range(n_classes)) / max(len(gold), 1)
    # class c: hits cm[c][c], predicted column c, gold row c
    per_class = [prf(cm[c][c], sum(row[c] for row in cm), sum(cm[c])) for c in range(n_classes)]
    # the macro average runs over the classes seen in gold or predictions (as scikit-learn's): a
    # class this set lacks, and that is never predicted, has no precision or recall to average
    seen = [c for c in range(n_classes) if sum(cm[c]) or sum(row[c] for row in cm)] or [0]
    macro = [sum(per_class[c][i] for c in seen) / len(seen) for i in range(3)]
    out = {"accuracy": acc, "macro_precision": macro[0], "macro_recall": macro[1],
           "macro_f1": macro[2], "confusion_matrix": cm}
    if n_classes == 2:
        out["precision"], out["recall"], out["f1"] = per_class[1]
    else:
        out["precision"], out["recall"], out["f1"] = macro
    return out
