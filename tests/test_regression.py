"""Regression: metrics against scipy, target standardisation saved and undone, strict reading of
targets, a tiny end-to-end run and prediction."""

import json
import math
import random

import pytest
import torch
from scipy import stats

from minibert.tokenizer import Tokenizer
from tests.tiny import FILLER, NEGATIVE, POSITIVE, make_checkpoint
from train.data.examples import DataError
from train.finetune.finetune import load_task_model, run_finetune
from train.finetune.config import FinetuneConfig
from train.tasks.regression import RegressionTask, ranks, regression_metrics


def test_metrics_equal_scipy_with_ties():
    rng = random.Random(0)
    gold = [rng.choice([-1.0, 0.0, 0.5, 2.0]) for _ in range(50)]  # many ties
    pred = [g + rng.gauss(0, 1) for g in gold]
    pred[:5] = [0.3] * 5
    m = regression_metrics(gold, pred)
    assert m["pearson"] == pytest.approx(stats.pearsonr(gold, pred)[0], abs=1e-12)
    assert m["spearman"] == pytest.approx(stats.spearmanr(gold, pred)[0], abs=1e-12)
    assert ranks([3.0, 1.0, 3.0, 2.0]) == list(stats.rankdata([3.0, 1.0, 3.0, 2.0]))
    mse = sum((g - p) ** 2 for g, p in zip(gold, pred)) / len(gold)
    assert m["mse"] == pytest.approx(mse) and m["rmse"] == pytest.approx(math.sqrt(mse))
    # a constant prediction: correlation 0 by convention, not NaN
    assert regression_metrics([1.0, 2.0], [0.5, 0.5])["pearson"] == 0.0


def make_scores(path, n, seed):
    """score = 50 + 10 * (number of positive words - negative words): far from N(0, 1)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = rng.sample(FILLER, 3)
            k = rng.choice([-1, 0, 1])
            words.insert(1, rng.choice(POSITIVE if k > 0 else NEGATIVE if k < 0 else FILLER))
            f.write(json.dumps({"text": " ".join(words), "y": 50.0 + 10 * k}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("reg")
    return (str(make_checkpoint(d / "ckpt")), make_scores(d / "train.jsonl", 96, 0),
            make_scores(d / "dev.jsonl", 48, 1))


def test_standardised_regression_learns_and_predicts_in_data_units(data, tmp_path):
    ckpt, train, dev = data
    cfg = FinetuneConfig(model=ckpt, task="regression", train=train, dev=dev, test=dev,
                         out=str(tmp_path / "r"), target_field="y", standardize_targets=True,
                         batch_size=8, epochs=6, lr=3e-3, lr_head=1e-2, eval_every=None,
                         log_every=50, threads=1, hidden_dropout=0.0, attention_dropout=0.0)
    assert cfg.metric == "pearson" and cfg.metric_mode == "max"
    res = run_finetune(cfg)
    assert res["dev"]["pearson"] > 0.9, res["dev"]
    assert set(res["dev"]) >= set(RegressionTask.metrics)  # every name --metric accepts
    model, task = load_task_model(str(tmp_path / "r" / "best"), "cpu")
    ys = [json.loads(line)["y"] for line in open(train)]
    mean = sum(ys) / len(ys)
    std = math.sqrt(sum((y - mean) ** 2 for y in ys) / len(ys))
    assert task.meta["target_mean"] == pytest.approx(mean)
    assert task.meta["target_std"] == pytest.approx(std)
    # Predictions come back in the data's units: each row is y = z * std + mean, where z is the
    # head's raw output (computed here from the model, text by text, not through the task's
    # prediction path) and mean, std are the training targets' (computed above, not read back).
    tok = Tokenizer.from_dir(str(tmp_path / "r" / "best"))
    texts = [json.loads(line)["text"] for line in open(dev)]
    gold = [json.loads(line)["y"] for line in open(dev)]
    rows = task.predict(model, task.read_inputs(None, dev, tok, 16), "cpu")
    with torch.no_grad():
        z = [model(tok.encode_batch([t]))["predictions"].item() for t in texts]
    # fp32 forward passes, padded in a batch vs alone: ~1e-6 in z, times std 8.2; rows are
    # rounded to 5 decimals. 1e-3 leaves margin, and a missing `* std` or `+ mean` moves a
    # prediction by several units (up to 9 here).
    assert [r["y"] for r in rows] == pytest.approx([v * std + mean for v in z], abs=1e-3)
    # ... and they are good in those units: the mse is far below the targets' variance (a
    # prediction left in standardised units, spread ~1 around the mean, has mse ~ var)
    mse = sum((v * std + mean - g) ** 2 for v, g in zip(z, gold)) / len(gold)
    assert mse < 0.2 * std ** 2, (mse, std ** 2)
    # the reported test mse is that one (test = dev here), computed by the formula, not the task
    assert res["test"]["mse"] == pytest.approx(mse, rel=1e-4)


def test_mse_is_judged_lower_is_better():
    assert FinetuneConfig(task="regression", metric="rmse").metric_mode == "min"
    assert FinetuneConfig(task="multitask", metric="b/mse").metric_mode == "min"
    assert FinetuneConfig(task="multitask").metric == "combined"


def test_non_numeric_target_names_file_and_line(data, tmp_path):
    ckpt, train, _ = data
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good film", "y": 1.5}\n{"text": "bad film", "y": "high"}\n')
    cfg = FinetuneConfig(model=ckpt, task="regression", train=str(bad), out=str(tmp_path / "r"),
                         target_field="y")
    with pytest.raises(DataError, match=r"bad.jsonl:2: target 'y' is 'high', not a finite"):
        run_finetune(cfg)
