"""Fine-tuning: freezing, gradual unfreezing, layer-wise learning rates, resume after kill -9,
strict data reading, prediction. All on a tiny checkpoint and dataset built here."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import make_checkpoint, make_sentiment
from train.tasks.classification import ClassificationTask
from train.data.examples import DataError, read_examples
from train.finetune.finetune import build_model, run_finetune
from train.finetune.config import FinetuneConfig
from train.loop.params import LrPolicy, param_groups, units_top_down
from train.loop.rundir import read_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    return str(make_checkpoint(d / "ckpt")), str(make_sentiment(d / "data"))


def cfg_for(setup, out, **kw):
    ckpt, data = setup
    d = dict(model=ckpt, train=f"{data}/train.jsonl", dev=f"{data}/dev.jsonl",
             test=f"{data}/test.jsonl", out=str(out), batch_size=8, eval_every=4, log_every=1,
             epochs=1, threads=1)
    d.update(kw)
    return FinetuneConfig(**d)


def state_weights(run):
    return load_file(os.path.join(run, "state", "model.safetensors"))


def test_frozen_parameters_stay_bit_identical(setup, tmp_path):
    ckpt, _ = setup
    run_finetune(cfg_for(setup, tmp_path / "r", freeze_embeddings=True, freeze_layers=1,
                         lr=1e-2, lr_head=1e-2))
    torch.manual_seed(0)
    before = build_model(cfg_for(setup, tmp_path / "unused"), _task()).state_dict()
    after = state_weights(tmp_path / "r")
    for name, t in after.items():
        if name.startswith("head."):
            continue
        # the pooler is unused (so untouched) with the default mean pooling
        frozen = name.startswith(("bert.embeddings.", "bert.blocks.0.", "bert.pooler."))
        same = torch.equal(t, before[name])
        assert same == frozen, f"{name}: {'changed' if frozen else 'did not change'}"
    # no optimizer state for frozen parameters: the groups never held them
    opt = torch.load(os.path.join(tmp_path / "r", "state", "optimizer.pt"), weights_only=True)
    names = {g["name"] for g in opt["param_groups"]}
    assert names and not any(n.startswith(("embeddings", "layer.0")) for n in names)


def test_layerwise_learning_rates_follow_the_formula(setup):
    model = build_model(cfg_for(setup, "unused"), _task())
    L = model.bert.config.num_hidden_layers
    policy = LrPolicy(lr=1e-4, lr_head=1e-3, layer_lr_decay=0.5)
    groups = {g["name"]: g for g in param_groups(model, set(units_top_down(L)), policy)}
    assert groups["head"]["lr"] == 1e-3
    for i in range(L):
        assert groups[f"layer.{i}"]["lr"] == pytest.approx(1e-4 * 0.5 ** (L - 1 - i), rel=1e-12)
        assert groups[f"layer.{i}.no_decay"]["weight_decay"] == 0.0
    assert groups["embeddings"]["lr"] == pytest.approx(1e-4 * 0.5 ** L, rel=1e-12)
    # 1-D tensors (biases, LayerNorm) never decay; matrices do
    for g in groups.values():
        assert all((p.ndim >= 2) == (g["weight_decay"] > 0) for p in g["params"])
    # explicit overrides win over the decay
    over = LrPolicy(lr=1e-4, layer_lr_decay=0.5, lr_encoder=3e-5, lr_embeddings=1e-6)
    groups = {g["name"]: g for g in param_groups(model, set(units_top_down(L)), over)}
    assert groups["layer.0"]["lr"] == groups["layer.1"]["lr"] == 3e-5
    assert groups["embeddings"]["lr"] == 1e-6


def test_gradual_unfreezing_follows_its_stages(setup, tmp_path):
    # 8 steps per epoch; a new stage every 2 steps, stage lrs 1e-3 then 1e-4.
    run_finetune(cfg_for(setup, tmp_path / "r", unfreeze_every=2, unfreeze_unit="step",
                         stage_lrs=[1e-3, 1e-4], warmup_steps=0, schedule="constant",
                         layer_lr_decay=1.0, lr_head=None))
    events = [e for e in read_jsonl(tmp_path / "r" / "metrics.jsonl") if e["event"] == "train"]
    expected = [["head"], ["head", "layer.1"], ["head", "layer.1", "layer.0"],
                ["head", "layer.1", "layer.0", "embeddings"]]
    for e in events:
        step = e["step"]
        # the lrs logged at step s are those of the update that made step s, i.e. stage (s-1)//2
        stage = min((step - 1) // 2, 3)
        units = sorted({k.replace(".no_decay", "") for k in e["lr"]})
        assert units == sorted(expected[stage]), f"step {step}: {units}"
        want = 1e-3 if stage == 0 else 1e-4
        assert all(lr == pytest.approx(want) for lr in e["lr"].values()), (step, e["lr"])


def _cli(*args):
    return [sys.executable, "-P", "-m", "train.cli", "finetune", *args]


def test_resume_after_kill_gives_the_same_weights(setup, tmp_path):
    ckpt, data = setup
    common = ["--model", ckpt, "--train", f"{data}/train.jsonl", "--dev", f"{data}/dev.jsonl",
              "--batch-size", "4", "--epochs", "3", "--eval-every", "1000", "--save-every", "2",
              "--threads", "1", "--log-every", "1"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run(_cli(*common, "--out", str(tmp_path / "full")), check=True, env=env,
                   capture_output=True)
    # The same run, killed with SIGKILL mid-epoch once it has saved state past step 10.
    killed = tmp_path / "killed"
    p = subprocess.Popen(_cli(*common, "--out", str(killed)), env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer_json = killed / "state" / "trainer.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if trainer_json.exists():
            try:
                if json.loads(trainer_json.read_text())["step"] >= 10:
                    break
            except (json.JSONDecodeError, OSError):
                pass
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    step = json.loads(trainer_json.read_text())["step"]
    assert 10 <= step < 48, "the kill should land mid-run"
    r = subprocess.run(_cli("--resume", str(killed)), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    a, b = state_weights(tmp_path / "full"), state_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [e["step"] for e in read_jsonl(killed / "metrics.jsonl") if e["event"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 48  # no duplicated or lost events


def test_bad_rows_stop_with_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok", "label": 1}\n{"text": "", "label": 0}\n{"label": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: empty text"):
        read_examples(str(f), "text", None, "label")
    ex, stats = read_examples(str(f), "text", None, "label", skip_bad_rows=True)
    assert len(ex) == 1
    assert stats.skipped == {"empty text": 1, "missing field 'text'": 1, "not valid JSON (Expecting value)": 1}


def test_dev_label_absent_from_train_is_an_error(setup, tmp_path):
    _, data = setup
    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"text": "good film", "label": 1}\n{"text": "a film", "label": 7}\n')
    with pytest.raises(DataError, match=r"dev.jsonl:2: label 7 does not occur in the training"):
        run_finetune(cfg_for(setup, tmp_path / "r", dev=str(dev), max_steps=1))


def test_csv_and_pairs(setup, tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('premise,hypothesis,gold\n"a good film","it was great",yes\nbad,"dull plot",no\n')
    ex, _ = read_examples(str(f), "premise", "hypothesis", "gold")
    assert [(e.text, e.pair, e.target) for e in ex] == [("a good film", "it was great", "yes"),
                                                        ("bad", "dull plot", "no")]


def test_learns_and_predicts(setup, tmp_path):
    run = tmp_path / "r"
    results = run_finetune(cfg_for(setup, run, epochs=10, lr=3e-3, lr_head=3e-3))
    assert results["test"]["accuracy"] >= 0.9, results["test"]
    assert set(results["test"]) >= {"accuracy", "f1", "precision", "recall", "loss"}
    r = subprocess.run([sys.executable, "-P", "-m", "train.cli", "predict", str(run),
                        "--text", "a good movie", "--text", "an awful plot"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["label"] for row in rows] == ["1", "0"]
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-4


def _task():
    return ClassificationTask({"labels": ["0", "1"], "pooling": "mean"})
