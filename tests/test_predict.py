"""`minibert predict --input FILE` for classification, regression and extractive QA: one JSON line
per input, in the file's order, with the task's keys, and the values the run's best model gives
when it is called here directly (text by text, not through the task's prediction path where the
model's raw output can be read).

Each run is a few steps on the tiny checkpoint of tests/tiny.py: what is checked is that predict
answers what the saved model computes, not that the model is good."""

import io
import json
import math

import pytest
import torch

from minibert.tokenizer import Tokenizer
from tests.test_qa import make_squad
from tests.test_regression import make_scores
from tests.tiny import make_checkpoint, make_sentiment
from train.cli import main
from train.finetune.config import FinetuneConfig
from train.finetune.finetune import load_task_model, run_finetune

# fp32: the same model on a padded batch (predict, --batch-size 5) and on one text alone (here)
# differs by rounding, ~1e-7 on these 32-wide activations; predict rounds probabilities and
# targets to 5 decimals (<= 5e-6). 1e-5 covers both; a wrong row order, label order or a missing
# de-standardisation moves a value by 1e-2 or more.
ATOL = 1e-5


def _predict(capsys, run, path, batch_size):
    capsys.readouterr()
    assert main(["predict", "--model", str(run), "--input", str(path),
                 "--batch-size", str(batch_size), "--device", "cpu"]) in (0, None)
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return [json.loads(line) for line in out.splitlines()]


def _finetune(tmp_path, **kw):
    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    run_finetune(FinetuneConfig(model=ckpt, out=str(tmp_path / "r"), max_steps=6, batch_size=8,
                                eval_every=None, log_every=50, threads=1, lr=3e-3, lr_head=1e-2,
                                device="cpu", **kw))
    return tmp_path / "r"


def test_predict_classification_jsonl(tmp_path, capsys):
    data = make_sentiment(tmp_path / "data", n_dev=13)
    run = _finetune(tmp_path, train=f"{data}/train.jsonl")
    rows = _predict(capsys, run, f"{data}/dev.jsonl", 5)
    texts = [json.loads(line)["text"] for line in open(f"{data}/dev.jsonl")]
    assert [r["text"] for r in rows] == texts  # one line per input, in order
    model, task = load_task_model(str(run / "best"), "cpu")
    tok = Tokenizer.from_dir(str(run / "best"))
    labels = [str(v) for v in sorted({json.loads(x)["label"] for x in open(f"{data}/train.jsonl")})]
    for r, t in zip(rows, texts):
        assert set(r) == {"text", "label", "probabilities"}
        with torch.no_grad():
            p = model(tok.encode_batch([t]))["logits"][0].softmax(-1).tolist()
        assert list(r["probabilities"]) == labels
        assert [r["probabilities"][lab] for lab in labels] == pytest.approx(p, abs=ATOL)
        assert r["label"] == labels[max(range(len(p)), key=p.__getitem__)]
    # a model that says the same for every text would pass the checks above vacuously
    assert len({round(r["probabilities"][labels[0]], 4) for r in rows}) > 1
    # a bad row is named, without advice to use a flag predict does not have
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert main(["predict", str(run), "--input", str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "--skip-bad-rows" not in err, err
    # a run that has not finished (killed: no results.json) serves its best/ so far, and says so
    (run / "results.json").rename(tmp_path / "results.json")
    assert main(["predict", str(run), "--text", "fine", "--device", "cpu"]) == 0
    assert f"note: {run} has not finished training (no results.json)" in capsys.readouterr().err
    assert main(["predict", f"{run}/best/", "--text", "fine", "--device", "cpu"]) == 0
    assert "note:" not in capsys.readouterr().err  # a model directory, not a run (a trailing /)
    # an ONNX export given without --backend onnx: the message says what to add
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"")
    with pytest.raises(SystemExit, match="it holds an ONNX export: add --backend onnx$"):
        main(["predict", str(tmp_path / "onnx"), "--text", "fine"])


def test_output_that_would_replace_what_predict_reads_is_refused_first(tmp_path, capsys,
                                                                        monkeypatch):
    """--output as the --input file (the gold labels gone), inside the model's directory
    (task.json replaced by predictions), or a directory (said after all the work, of a hidden
    temporary name): each refused in one line before the model is loaded."""
    data = make_sentiment(tmp_path / "data", n_dev=5)
    run = _finetune(tmp_path, train=f"{data}/train.jsonl")
    before = {p: p.read_bytes() for p in (run / "best").iterdir()}
    dev = tmp_path / "data" / "dev.jsonl"
    text = dev.read_text()
    import train.finetune.predict as predict
    monkeypatch.setattr(predict, "load_task_model", None)  # any work would fail loudly
    for output, why in ((dev, "is the --input file"),
                        (run / "best" / "task.json", "would replace a file of the model or "
                                                     "its run"),
                        (run / "config.json", "would replace a file of the model or its run"),
                        (run / "state" / "x.json", "would replace a file of the model or its run"),
                        (tmp_path, "a directory; give a file name")):
        with pytest.raises(SystemExit, match=f"--output {output}:? {why}"):
            main(["predict", str(run), "--input", str(dev), "--output", str(output)])
    assert dev.read_text() == text
    assert before == {p: p.read_bytes() for p in (run / "best").iterdir()}
    monkeypatch.undo()  # beside the model in its run directory is where predictions may go
    assert main(["predict", str(run), "--input", str(dev), "--output",
                 str(run / "dev-predictions.jsonl")]) in (0, None)
    assert len((run / "dev-predictions.jsonl").read_text().splitlines()) == 5


def test_predict_regression_jsonl_in_data_units(tmp_path, capsys):
    train, dev = make_scores(tmp_path / "train.jsonl", 48, 0), make_scores(tmp_path / "dev.jsonl",
                                                                           11, 1)
    run = _finetune(tmp_path, task="regression", train=train, target_field="y",
                    standardize_targets=True)
    rows = _predict(capsys, run, dev, 5)
    texts = [json.loads(line)["text"] for line in open(dev)]
    assert [r["text"] for r in rows] == texts
    assert all(set(r) == {"text", "y"} for r in rows)
    ys = [json.loads(line)["y"] for line in open(train)]
    mean = sum(ys) / len(ys)
    std = math.sqrt(sum((y - mean) ** 2 for y in ys) / len(ys))
    model, _ = load_task_model(str(run / "best"), "cpu")
    tok = Tokenizer.from_dir(str(run / "best"))
    with torch.no_grad():
        z = [model(tok.encode_batch([t]))["predictions"].item() for t in texts]
    # z is scaled by std (~8) on the way back: the fp32 rounding of z grows with it
    assert [r["y"] for r in rows] == pytest.approx([v * std + mean for v in z], abs=ATOL * std)
    assert len({round(r["y"], 3) for r in rows}) > 1


def test_predict_qa_squad_json(tmp_path, capsys):
    train, dev = make_squad(tmp_path / "train.json", 16, 0), make_squad(tmp_path / "dev.json",
                                                                        7, 1)
    run = _finetune(tmp_path, task="qa", train=train, max_length=24, doc_stride=6,
                    max_answer_len=5)
    rows = _predict(capsys, run, dev, 5)
    squad = json.load(open(dev))
    qas = [(qa, p["context"]) for a in squad["data"] for p in a["paragraphs"] for qa in p["qas"]]
    assert [r["id"] for r in rows] == [qa["id"] for qa, _ in qas]  # in the file's order
    model, task = load_task_model(str(run / "best"), "cpu")
    # the task's own path on a different batching (3 windows a batch, not 5): the same answers
    direct = task.predict(model, task.read_inputs(None, dev, Tokenizer.from_dir(str(run / "best")),
                                                  3), "cpu")
    for r, d, (qa, ctx) in zip(rows, direct, qas):
        assert set(r) == {"id", "question", "answer", "start", "end", "score"}
        assert r["question"] == qa["question"]
        assert ctx[r["start"]:r["end"]] == r["answer"]  # the span is the context's characters
        assert (r["answer"], r["start"], r["end"]) == (d["answer"], d["start"], d["end"])
        assert r["score"] == pytest.approx(d["score"], abs=1e-4)  # both rounded to 4 decimals
    qa, ctx = qas[0]
    # a question too long for the run's windows: predict has no --max-length to raise
    assert main(["predict", str(run), "--text", "why " * 30 + "||| " + ctx]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.endswith("this model reads questions of at most 14 tokens; shorten it"), said


def test_predict_text_on_a_pair_model_reads_both_texts(tmp_path, capsys, monkeypatch):
    pairs = [("a film", "it was superb"), ("the plot", "dull and boring")] * 8
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps({"text": a, "hyp": b, "label": i % 2}) + "\n"
                             for i, (a, b) in enumerate(pairs)))
    run = _finetune(tmp_path, train=str(train), pair_field="hyp")
    model, _ = load_task_model(str(run / "best"), "cpu")
    tok = Tokenizer.from_dir(str(run / "best"))
    capsys.readouterr()
    assert main(["predict", "--model", str(run), "--text", "a film ||| it was superb",
                 "--device", "cpu"]) in (0, None)
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["text"], row["pair"]) == ("a film", "it was superb")
    with torch.no_grad():
        p = model(tok.encode_batch(["a film"], ["it was superb"]))["logits"][0].softmax(-1)
    assert list(row["probabilities"].values()) == pytest.approx(p.tolist(), abs=ATOL)
    # one text alone would be classified without its pair: refused, naming the input
    assert main(["predict", "--model", str(run), "--text", "a film ||| fine", "--text",
                 "a film", "--device", "cpu"]) == 2
    assert "--text 2: this model reads text pairs ('hyp'); write 'TEXT ||| PAIR'" in \
        capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("a film ||| fine\nno pair here\n"))
    assert main(["predict", "--model", str(run), "--device", "cpu"]) == 2
    assert "stdin:2: this model reads text pairs" in capsys.readouterr().err
