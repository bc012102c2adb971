"""Fine-tuning: freezing, gradual unfreezing, layer-wise learning rates, resume after kill -9,
strict data reading, prediction, and the options end to end (early stopping, --pooling cls,
--init random, sentence pairs, fp16 resume). All on a tiny checkpoint and dataset built here."""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import (FILLER, NEGATIVE, POSITIVE, compile_and_bf16_losses, make_checkpoint,
                        make_sentiment, tiny_tokenizer)
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


PREFIX = {"head": "head.", "layer.1": "bert.blocks.1.", "layer.0": "bert.blocks.0.",
          "embeddings": "bert.embeddings."}


def test_gradual_unfreezing_follows_its_stages(setup, tmp_path):
    # 8 steps per epoch; a new stage every 2 steps, stage lrs 1e-3 then 1e-4.
    def run(out, **kw):
        run_finetune(cfg_for(setup, out, unfreeze_every=2, unfreeze_unit="step",
                             stage_lrs=[1e-3, 1e-4], warmup_steps=0, schedule="constant",
                             layer_lr_decay=1.0, lr_head=None, **kw))

    run(tmp_path / "r")
    events = [e for e in read_jsonl(tmp_path / "r" / "metrics.jsonl") if e["event"] == "train"]
    assert [e["step"] for e in events] == list(range(1, 9))  # log_every=1: every step logged
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

    # The weights: stopped after 2, 4 and 6 steps, exactly the units unfrozen by then have moved
    # from their start (the checkpoint, and the head as the run initialises it), every tensor of
    # them; the others are bit-identical. The pooler is unused with mean pooling: never moves.
    torch.manual_seed(0)
    before = build_model(cfg_for(setup, tmp_path / "unused"), _task()).state_dict()
    for stage, steps in enumerate((2, 4, 6)):
        run(tmp_path / f"s{steps}", max_steps=steps)
        after = state_weights(tmp_path / f"s{steps}")
        assert after.keys() == before.keys()
        moved = set(expected[stage])
        for name, t in after.items():
            unit = next((u for u, p in PREFIX.items() if name.startswith(p)), None)
            assert torch.equal(t, before[name]) == (unit not in moved), \
                f"after {steps} steps {name} {'did not move' if unit in moved else 'moved'}"
    # and the full run's last stage (steps 7 and 8) moved the embeddings too
    assert not torch.equal(after["bert.embeddings.word.weight"],
                           state_weights(tmp_path / "r")["bert.embeddings.word.weight"])
    # no stage unfroze the unused pooler: the optimizer holds every parameter but its two,
    # each unit's group once
    opt = torch.load(tmp_path / "r" / "state" / "optimizer.pt", weights_only=True)
    groups = opt["param_groups"]
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), names
    assert sum(len(g["params"]) for g in groups) == len(before) - 2


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


def test_an_empty_label_is_a_bad_row_not_a_class(setup, tmp_path):
    tok = tiny_tokenizer()
    for name, text in (("d.jsonl", '{"text": "good", "label": "pos"}\n'
                                   '{"text": "bad", "label": " "}\n'
                                   '{"text": "dull", "label": "neg"}\n'),
                       ("d.csv", "text,label\ngood,1\nbad,\ndull,0\n")):  # numeric labels
        f = tmp_path / name
        f.write_text(text)
        cfg = cfg_for(setup, tmp_path / "r", train=str(f), dev=None, test=None)
        with pytest.raises(DataError, match=rf"^{f}:\d: empty label \(use --skip-bad-rows"):
            ClassificationTask.from_data(cfg, tok)
        task, _ = ClassificationTask.from_data(cfg_for(setup, tmp_path / "r", train=str(f),
                                                       dev=str(f), test=None,
                                                       skip_bad_rows=True), tok)
        assert len(task.labels) == 2 and "" not in task.labels and " " not in task.labels


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


def _texts(path):
    ex, _ = read_examples(str(path), "text", None, "label")
    return [(e.text, e.where.rsplit(":", 1)[1]) for e in ex]


def test_csv_keeps_every_character_of_a_field_and_the_line_numbers(tmp_path):
    # a newline inside a quoted field, and characters str.splitlines() would split at
    f = tmp_path / "a.csv"
    f.write_bytes('text,label\n"multi\nline",1\n"a\u2028b",0\n"c\x0cd\x85e",1\n\nlast,0\n'
                  .encode())
    assert _texts(f) == [("multi\nline", "2"), ("a\u2028b", "4"), ("c\x0cd\x85e", "5"),
                         ("last", "7")]


def test_tsv_has_no_quoting(tmp_path):
    # GLUE's TSV files: a quote is text, even at the start of a field or left open
    f = tmp_path / "a.tsv"
    f.write_text('text\tlabel\n" a gripping film\t1\nawful plot\t0\n"the end" came\t1\n')
    assert _texts(f) == [('" a gripping film', "2"), ("awful plot", "3"),
                         ('"the end" came', "4")]


def test_csv_that_does_not_parse_is_named(tmp_path):
    # a quote never closed would swallow the rest of the file into one field
    f = tmp_path / "a.csv"
    f.write_text('text,label\nfine,1\n"open quote,0\nmore,1\n')
    with pytest.raises(DataError, match=r"a\.csv:3: not valid CSV"):
        read_examples(str(f), "text", None, "label")
    f.write_text("text,label\nfine,1\na, b and c,0\n")  # an unquoted comma
    with pytest.raises(DataError, match=r"a\.csv:3: 3 fields, but the header has 2"):
        read_examples(str(f), "text", None, "label")


def test_csv_field_longer_than_the_csv_default_limit(tmp_path):
    limit = csv.field_size_limit()
    f = tmp_path / "a.csv"
    f.write_text(f"text,label\n{'x' * (limit + 10)},1\nshort,0\n")
    assert [len(t) for t, _ in _texts(f)] == [limit + 10, 5]
    assert csv.field_size_limit() == limit  # the process-wide limit is left as it was


def test_learns_and_predicts(setup, tmp_path):
    run = tmp_path / "r"
    results = run_finetune(cfg_for(setup, run, epochs=10, lr=3e-3, lr_head=3e-3))
    assert results["test"]["accuracy"] >= 0.9, results["test"]
    assert set(results["test"]) >= set(ClassificationTask.metrics)  # what --metric accepts
    r = subprocess.run([sys.executable, "-P", "-m", "train.cli", "predict", str(run),
                        "--text", "a good movie", "--text", "an awful plot"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["label"] for row in rows] == ["1", "0"]
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-4


def _task():
    return ClassificationTask({"labels": ["0", "1"], "pooling": "mean"})


# ---------------------------------------------------------------------------------------------
# Options end to end: early stopping, --pooling cls, --init random, pairs, fp16 resume


def test_early_stopping_stops_at_the_patience_th_eval_without_improvement(setup, tmp_path):
    # 20 epochs of 8 steps, an eval every 4: the dev accuracy stops improving long before the
    # end, and the run must stop at the 2nd eval in a row that is not strictly better
    res = run_finetune(cfg_for(setup, tmp_path / "r", epochs=20, eval_every=4, lr=3e-3,
                               lr_head=3e-3, early_stopping_patience=2))
    events = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    evals = [e for e in events if e["event"] == "eval"]
    best, best_step, bad, stop = None, None, 0, None  # the rule, replayed on the logged values
    for e in evals:
        value = e["dev"]["accuracy"]
        if best is None or value > best:
            best, best_step, bad = value, e["step"], 0
        else:
            bad += 1
        if bad == 2:
            stop = e["step"]
            break
    assert stop is not None and stop < 160, [e["dev"]["accuracy"] for e in evals]
    assert evals[-1]["step"] == stop  # no eval after the stop ...
    assert max(e["step"] for e in events if e["event"] == "train") == stop  # ... nor a step
    assert res["best_step"] == best_step and res["dev"]["accuracy"] == best


def test_pooling_cls_is_berts_pooler_as_transformers_computes_it(setup, tmp_path):
    ckpt, data = setup
    run = tmp_path / "r"
    run_finetune(cfg_for(setup, run, pooling="cls", epochs=2, lr=3e-3, lr_head=3e-3))
    # the pooler is trained (with mean pooling it is frozen and unused)
    start = load_file(os.path.join(ckpt, "model.safetensors"))
    assert not torch.equal(state_weights(run)["bert.pooler.weight"],
                           start["bert.pooler.dense.weight"])
    # predictions: the head's linear layer on transformers' pooler_output of best/
    from transformers import BertModel

    from minibert.tokenizer import Tokenizer
    from train.finetune.finetune import load_task_model
    best = str(run / "best")
    model, task = load_task_model(best, "cpu")
    tok = Tokenizer.from_dir(best)
    rows = task.predict(model, task.read_inputs(None, f"{data}/test.jsonl", tok, 16), "cpu")
    head = load_file(os.path.join(best, "head.safetensors"))
    ref = BertModel.from_pretrained(best).eval()
    with torch.no_grad():
        for row in rows:
            pooled = ref(**tok.encode_batch([row["text"]])).pooler_output[0]  # tanh(W h_CLS + b)
            probs = (pooled @ head["out.weight"].T + head["out.bias"]).softmax(-1)
            # printed to 5 decimals; fp32 differences between the two models are ~1e-6
            assert [row["probabilities"][lab] for lab in task.labels] == \
                pytest.approx(probs.tolist(), abs=2e-5), row


def test_init_random_trains_the_architecture_from_scratch(setup, tmp_path):
    ckpt, _ = setup
    # a frozen backbone keeps its initial weights, so best/ shows what --init random started from
    run_finetune(cfg_for(setup, tmp_path / "r", init="random", freeze_backbone=True,
                         max_steps=2))
    best = str(tmp_path / "r" / "best")
    with open(os.path.join(ckpt, "config.json")) as f, \
            open(os.path.join(best, "config.json")) as g:
        assert json.load(f) == json.load(g)  # the same architecture
    start = load_file(os.path.join(ckpt, "model.safetensors"))
    fresh = load_file(os.path.join(best, "model.safetensors"))
    assert fresh.keys() == start.keys()
    mats = [k for k, v in fresh.items() if v.ndim == 2]
    for k in mats:  # not one matrix of the checkpoint survives ...
        assert not torch.equal(fresh[k], start[k]), k
    # ... and they are BERT's initialisation, N(0, 0.02): the sample std of n draws has standard
    # error 0.02 / sqrt(2 n); allow 5
    w = torch.cat([fresh[k].flatten() for k in mats if "word_embeddings" not in k])
    assert abs(w.std().item() - 0.02) < 5 * 0.02 / (2 * w.numel()) ** 0.5


def make_pairs(path, seed=0):
    """Label = the polarity of the *second* text's sentiment word; the first text holds one of
    either polarity at random. A model that drops the pair scores ~50%."""
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)
    for split, n in (("train", 128), ("dev", 32), ("test", 64)):
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                label = rng.random() < 0.5
                a, b = rng.sample(FILLER, 3), rng.sample(FILLER, 3)
                a.insert(rng.randint(0, 3), rng.choice(POSITIVE + NEGATIVE))
                b.insert(rng.randint(0, 3), rng.choice(POSITIVE if label else NEGATIVE))
                f.write(json.dumps({"premise": " ".join(a), "hypothesis": " ".join(b),
                                    "label": int(label)}) + "\n")
    return str(path)


def test_sentence_pairs_are_read_and_learned(setup, tmp_path):
    data = make_pairs(tmp_path / "pairs")
    res = run_finetune(cfg_for(setup, tmp_path / "r", train=f"{data}/train.jsonl",
                               dev=f"{data}/dev.jsonl", test=f"{data}/test.jsonl",
                               text_field="premise", pair_field="hypothesis", epochs=6,
                               eval_every=16, lr=3e-3, lr_head=3e-3))
    assert res["test"]["accuracy"] >= 0.9, res["test"]  # only the second text tells the label
    with open(tmp_path / "r" / "best" / "task.json") as f:
        assert json.load(f)["pair_field"] == "hypothesis"


def test_fp16_resume_restores_the_grad_scaler(setup, tmp_path):
    def fp16(out, steps):
        return cfg_for(setup, out, precision="fp16", device="cpu", schedule="constant",
                       warmup_steps=0, eval_every=2, max_steps=steps)

    def scaler(run):
        with open(os.path.join(run, "state", "trainer.json")) as f:
            return json.load(f)["scaler"]

    run_finetune(fp16(tmp_path / "straight", 8))
    # GradScaler counts steps without inf/nan towards growing the scale: 8 here
    assert scaler(tmp_path / "straight")["_growth_tracker"] == 8
    run_finetune(fp16(tmp_path / "cut", 4))
    assert scaler(tmp_path / "cut")["_growth_tracker"] == 4
    # a second copy whose saved scale is not the default, as overflows would have left it
    shutil.copytree(tmp_path / "cut", tmp_path / "backed-off")
    state = tmp_path / "backed-off" / "state" / "trainer.json"
    info = json.loads(state.read_text())
    info["scaler"]["scale"] = 1024.0
    state.write_text(json.dumps(info))

    run_finetune(fp16(tmp_path / "cut", 8), resume=True)
    assert scaler(tmp_path / "cut") == scaler(tmp_path / "straight")  # a fresh one would say 4
    a, b = state_weights(tmp_path / "straight"), state_weights(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    run_finetune(fp16(tmp_path / "backed-off", 8), resume=True)
    assert scaler(tmp_path / "backed-off")["scale"] == 1024.0  # a fresh one would say 65536


def test_compile_and_bf16_fine_tune_the_same_model(setup, tmp_path, capsys, monkeypatch):
    # as for pretraining (tests/tiny.py: compile_and_bf16_losses says what is checked, and the
    # tolerances' reasons), then fp32 weights saved by the bf16 run
    def train(name, **kw):
        run_finetune(cfg_for(setup, tmp_path / name, max_steps=3, eval_every=None, dev=None,
                             test=None, hidden_dropout=0.0, attention_dropout=0.0,
                             classifier_dropout=0.0, device="cpu", lr=1e-3, **kw))
        return str(tmp_path / name)

    compile_and_bf16_losses(monkeypatch, capsys, train)
    for name, precision in (("eager", "fp32"), ("bf16", "bf16")):  # results.json says which
        assert json.loads((tmp_path / name / "results.json").read_text())["precision"] == precision
    for part in ("model.safetensors", "head.safetensors"):
        weights = load_file(str(tmp_path / "bf16" / "best" / part))
        assert {w.dtype for w in weights.values()} == {torch.float32}, part


def test_precision_auto_is_bf16_on_a_cpu_with_bf16_instructions_only(monkeypatch):
    # bf16 on a CPU without bf16 instructions is emulated and slower than fp32: auto keeps fp32
    # there, picks bf16 where the CPU has them (claim runs: README, "The guides' claims"), and
    # says which at start; an explicit --precision is never overridden
    from train.loop import device as d
    cpu = torch.device("cpu")
    monkeypatch.setattr(d, "native_bf16", lambda: [])
    assert d.resolve_precision("auto", cpu) == ("fp32", None)
    assert d.describe_precision("fp32", None, "auto", cpu) == \
        "fp32 (auto: this CPU has no bf16 instructions)"
    monkeypatch.setattr(d, "native_bf16", lambda: ["avx512_bf16"])
    assert d.resolve_precision("auto", cpu) == ("bf16", torch.bfloat16)
    assert d.resolve_precision("fp32", cpu) == ("fp32", None)
    assert d.describe_precision("bf16", torch.bfloat16, "auto", cpu) == \
        "bf16 autocast, fp32 master weights (auto: this CPU has avx512_bf16)"
    assert d.describe_precision("fp32", None, "fp32", cpu) == "fp32"


@pytest.mark.this_cpu
def test_the_bf16_probe_agrees_with_the_kernel_on_this_cpu():
    # native_bf16 asks torch; Linux lists the same instruction sets in /proc/cpuinfo
    from train.loop.device import native_bf16
    with open("/proc/cpuinfo") as f:
        flags = set(next(l for l in f if l.startswith("flags")).split(":", 1)[1].split())
    assert set(native_bf16()) == {"avx512_bf16", "amx_bf16"} & flags


def test_init_heads_brings_the_pooler_a_cls_head_read(setup, tmp_path, capsys):
    # the head of a cls-pooling run reads the pooler, trained with it: both must come along
    src = tmp_path / "src"
    run_finetune(cfg_for(setup, src, pooling="cls", max_steps=8, lr_head=1e-2))
    trained = load_file(os.path.join(src, "best", "model.safetensors"))
    ckpt = load_file(os.path.join(setup[0], "model.safetensors"))
    key = next(k for k in trained if k.endswith("pooler.dense.weight"))
    assert not torch.equal(trained[key], ckpt[key])  # the source run did move it
    # an lr of 0 is refused (--lr: must be > 0); 1e-30 moves no fp32 weight of this size (its
    # ulp is ~1e-10), so the one step leaves every loaded value as it was
    run_finetune(cfg_for(setup, tmp_path / "new", pooling="cls", max_steps=1, lr=1e-30,
                         lr_head=1e-30, init_heads=[str(src / "best")]))
    assert "and the pooler it read" in capsys.readouterr().err
    new = state_weights(tmp_path / "new")
    assert torch.equal(new["bert.pooler.weight"], trained[key])  # still what it loaded


def test_lr_encoder_is_one_flat_rate_for_the_blocks_and_the_embeddings():
    policy = LrPolicy(lr=1e-4, layer_lr_decay=0.9, lr_encoder=2e-5)
    assert {u: policy.unit_lr(u, 2) for u in ("layer.1", "layer.0", "embeddings")} == \
        dict.fromkeys(("layer.1", "layer.0", "embeddings"), 2e-5)


def test_max_length_past_the_model_s_positions_is_cut_to_them(setup, tmp_path, capsys):
    # the tiny checkpoint has 64 positions: at 128 a run would fail on its first long text
    run_finetune(cfg_for(setup, tmp_path / "r", max_length=128, max_steps=1))
    assert "max length: 64, the positions" in capsys.readouterr().err
    run = tmp_path / "r"
    assert json.loads((run / "config.json").read_text())["max_length"] == 64
    assert json.loads((run / "best" / "task.json").read_text())["max_length"] == 64
    # and transformers, reading best/, truncates there too
    assert json.loads((run / "best" / "tokenizer_config.json").read_text())[
        "model_max_length"] == 64
