"""train/tasks/metrics.py against examples worked out by hand."""

import pytest

from train.tasks.metrics import classification_metrics, confusion_matrix, prf


def test_binary_reports_the_positive_class_and_the_macro_averages():
    # gold 0 0 1 1, predicted 0 1 1 1: class 1 has 2 hits among 3 predicted, of 2 gold
    m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert m["confusion_matrix"] == [[1, 1], [0, 2]]
    assert m["accuracy"] == 0.75
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    # class 0: precision 1, recall 1/2, F1 2/3; the macro F1 is (2/3 + 0.8) / 2
    assert m["macro_precision"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert m["macro_recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_multiclass_reports_macro_averages_with_never_predicted_classes_at_zero():
    # class 2 is never predicted: its precision and F1 are 0, not a division by zero
    m = classification_metrics([0, 1, 2, 2], [0, 1, 1, 0], 3)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
    assert m["accuracy"] == 0.5
    assert m["macro_precision"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert m["macro_recall"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0.0) / 3)
    assert (m["precision"], m["recall"], m["f1"]) == \
        (m["macro_precision"], m["macro_recall"], m["macro_f1"])


def test_empty_denominators_give_zero():
    assert prf(0, 0, 0) == (0.0, 0.0, 0.0)
    assert confusion_matrix([], [], 2) == [[0, 0], [0, 0]]


def test_macro_averages_leave_out_a_class_absent_from_gold_and_predictions():
    # class 1 is in the label set but in neither this dev set nor its predictions: perfect
    # predictions score 1, not 2/3; a class predicted but absent from gold still counts (as 0)
    m = classification_metrics([0, 0, 2, 2], [0, 0, 2, 2], 3)
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == (1.0, 1.0, 1.0)
    m = classification_metrics([0, 0, 2, 2], [0, 1, 2, 2], 3)
    assert m["macro_recall"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    # the same numbers as scikit-learn's defaults, computed by hand: labels = gold | predicted
    assert m["macro_precision"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
