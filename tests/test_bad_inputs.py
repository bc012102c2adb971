"""A corpus of malformed inputs, each made here (nothing binary is committed), each run through the
real `minibert` command. Every one must end with a non-zero exit status, no traceback, and a last
line of the form `minibert CMD: WHERE: what is wrong...` where WHERE names the file, file:line
or key; a run directory that existed before is left exactly as it was, and a --out that did not
exist still does not.

The cases span data files (JSONL, CSV, TSV, CoNLL, SQuAD JSON), checkpoints (missing, truncated,
wrong dtype, missing/extra keys, wrong shapes, bad config values and types, a vocabulary that
does not fit), run directories (predict without best/, --resume with a damaged or foreign
state/) and contradictory flags. The count is printed (pytest -s shows it) for the README.
"""

import hashlib
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny import make_checkpoint, make_sentiment
from train.cli import main
from train.finetune.config import FinetuneConfig
from train.finetune.finetune import run_finetune

TRIED = []


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint, a sentiment set, and a finished run to point predict and resume at."""
    root = tmp_path_factory.mktemp("bad")
    make_checkpoint(root / "model")
    make_sentiment(root / "data")
    run_finetune(FinetuneConfig(model=str(root / "model"), train=str(root / "data/train.jsonl"),
                                dev=str(root / "data/dev.jsonl"), out=str(root / "run"),
                                batch_size=8, max_steps=4, eval_every=2, threads=1,
                                max_length=16))
    return root


def snapshot(d):
    """{relative path: sha256} of every file below d, the lock file aside (it holds a pid)."""
    out = {}
    for dirpath, _, files in os.walk(d):
        for f in files:
            if f != ".lock":
                p = os.path.join(dirpath, f)
                out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def run_cli(argv, capsys):
    """(exit status, stderr) of `minibert ARGV`, run in this process."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
        said = ""
    except SystemExit as e:  # a command's own one-line stop, or argparse
        code, said = (1, e.code) if isinstance(e.code, str) else (e.code, "")
    err = capsys.readouterr().err + (said + "\n" if said else "")
    return code, err


def check(name, argv, where, capsys, runs=()):
    where = str(where)
    before = {str(r): snapshot(r) for r in runs}
    out = str(argv[argv.index("--out") + 1]) if "--out" in argv else None
    new_out = out is not None and not os.path.exists(out)
    code, err = run_cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code not in (0, None), f"{name}: exit status {code}\n{err}"
    assert "Traceback" not in err, f"{name}: a traceback\n{err}"
    last = lines[-1]
    assert last.startswith("minibert"), f"{name}: last line {last!r}"
    assert where in last, f"{name}: {where!r} not named in {last!r}"
    for r in runs:
        assert snapshot(r) == before[str(r)], f"{name}: {r} changed"
    if new_out:  # a refused command leaves no trace of the --out it was given
        assert not os.path.exists(out), f"{name}: left {out}: {os.listdir(out)}"
    TRIED.append(name)
    if os.environ.get("SHOW_BAD_INPUTS"):
        print(f"  {name:32s} {last}", file=sys.__stderr__)


def write(path, text, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(text)
    return path


def jsonl(path, rows):
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


GOOD = [{"text": "good movie", "label": 1}, {"text": "bad plot", "label": 0}] * 4


def data_cases(t):
    """(name, training file or extra args, what the last line must name) for `finetune`."""
    c = []

    def case(name, rows=None, where=None, path=None, text=None, extra=(), dev=None, **kw):
        p = path or str(t / f"{name}.jsonl")
        if text is not None:
            write(p, text, "wb" if isinstance(text, bytes) else "w")
        elif rows is not None:
            jsonl(p, rows)
        c.append((name, ["--train", p, *(["--dev", dev] if dev else []), *extra],
                  where.format(p=p) if where else p))
    case("jsonl-not-json", GOOD + ['{"text": "x", "label": 1'], "{p}:9")
    case("jsonl-not-an-object", GOOD + ['["x", 1]'], "{p}:9")
    case("jsonl-missing-text", GOOD + [{"label": 1}], "{p}:9")
    case("jsonl-missing-label", GOOD + [{"text": "x"}], "{p}:9")
    case("jsonl-empty-text", GOOD + [{"text": "  ", "label": 1}], "{p}:9")
    case("jsonl-number-as-text", GOOD + [{"text": 5, "label": 1}], "{p}:9")
    case("jsonl-fractional-label", GOOD + [{"text": "meh", "label": 1.5}], "--task regression")
    case("jsonl-mixed-labels", GOOD + [{"text": "meh", "label": "pos"}], "{p}:")
    case("jsonl-one-class", [{"text": "good", "label": 1}] * 8, "{p}")
    case("jsonl-not-utf8", text=b'{"text": "caf\xe9", "label": 1}\n', where="{p}:1")
    case("jsonl-empty-file", text="", where="{p}")
    jsonl(t / "dev-unseen.jsonl", [{"text": "odd", "label": 7}])
    case("dev-label-unseen", GOOD, str(t / "dev-unseen.jsonl") + ":1",
         dev=str(t / "dev-unseen.jsonl"))
    case("csv-no-text-column", path=str(t / "a.csv"), text="sentence,label\nhi,1\nho,0\n")
    case("csv-short-row", path=str(t / "b.csv"), text="text,label\nhi,1\nho\n",
         where=str(t / "b.csv") + ":3")
    case("csv-not-utf8", path=str(t / "c.csv"), text=b"text,label\ncaf\xe9,1\n",
         where=str(t / "c.csv") + ":2")
    case("tsv-fractional-label", path=str(t / "d.tsv"), text="text\tlabel\nhi\t2.5\nho\t0\n",
         where="--task regression")
    case("csv-quote-never-closed", path=str(t / "c2.csv"),
         text='text,label\nhi,1\n"ho,0\nhu,1\n', where=str(t / "c2.csv") + ":3")
    case("unknown-format", path=str(t / "e.xml"), text="<x/>")
    reg = ["--task", "regression", "--target-field", "score"]
    case("regression-text-target", [{"text": "a", "score": "high"}, {"text": "b", "score": 1}],
         "{p}:1", extra=reg)
    case("regression-nan-target", [{"text": "a", "score": 1}, {"text": "b", "score": "nan"}],
         "{p}:2", extra=reg)
    case("regression-constant", [{"text": "a", "score": 2}, {"text": "b", "score": 2}],
         "{p}", extra=reg + ["--standardize-targets"])
    tok = ["--task", "tokens"]
    case("conll-no-tag", path=str(t / "f.conll"), text="good O\nmovie\n\n", where=":2", extra=tok)
    write(t / "g.conll", "good B-X\nmovie O\n\n")
    write(t / "g-dev.conll", "good B-Y\n\n")
    c.append(("conll-dev-tag-outside-set", ["--train", str(t / "g.conll"), "--dev",
              str(t / "g-dev.conll"), *tok], str(t / "g-dev.conll") + ":1"))
    case("tagging-length-mismatch", [{"tokens": ["a", "b"], "tags": ["O"]}], "{p}:1", extra=tok)
    case("tagging-no-tokens", [{"tokens": [], "tags": []}], "{p}:1", extra=tok)
    case("tagging-integer-tags", [{"tokens": ["a", "b"], "tags": [0, 3]}], "{p}:1", extra=tok)
    case("conll-not-utf8", path=str(t / "f2.conll"), text=b"good O\ncaf\xe9 O\n",
         where=str(t / "f2.conll") + ":2", extra=tok)
    qa = ["--task", "qa"]
    para = {"context": "the film was good", "qas": [
        {"id": "q1", "question": "how?", "answers": [{"text": "good", "answer_start": 13}]}]}
    case("squad-not-json", path=str(t / "h.json"), text="{", extra=qa)
    case("squad-no-data", path=str(t / "i.json"), text='{"version": 1}', extra=qa)
    bad_pos = json.loads(json.dumps(para))
    bad_pos["qas"][0]["answers"][0]["answer_start"] = 2
    case("squad-answer-elsewhere", path=str(t / "j.json"),
         text=json.dumps({"data": [{"paragraphs": [bad_pos]}]}), where="q1", extra=qa)
    case("squad-duplicate-id", path=str(t / "k.json"),
         text=json.dumps({"data": [{"paragraphs": [para, para]}]}), where="already used",
         extra=qa)
    empty = json.loads(json.dumps(para))
    empty["qas"][0]["answers"] = [{"text": "", "answer_start": 0}]
    case("squad-empty-answer", path=str(t / "l.json"),
         text=json.dumps({"data": [{"paragraphs": [empty]}]}), where="q1", extra=qa)
    no_ctx = {"qas": para["qas"]}
    case("squad-no-context", path=str(t / "n.json"),
         text=json.dumps({"data": [{"paragraphs": [no_ctx]}]}), where="paragraphs[0]", extra=qa)
    str_pos = json.loads(json.dumps(para))
    str_pos["qas"][0]["answers"][0]["answer_start"] = "13"
    case("squad-answer-start-not-int", path=str(t / "o.json"),
         text=json.dumps({"data": [{"paragraphs": [str_pos]}]}), where="answer_start", extra=qa)
    long_q = json.loads(json.dumps(para))  # at --max-length 16, room for 3 context tokens,
    long_q["qas"][0]["question"] = "how " * 10  # not above the stride 16 // 3 (a panic once)
    case("squad-question-leaves-no-room-for-the-stride", path=str(t / "p.json"),
         text=json.dumps({"data": [{"paragraphs": [long_q]}]}), where="q1", extra=qa)
    none = json.loads(json.dumps(para))
    none["qas"][0]["answers"] = []
    case("squad-no-answers", path=str(t / "m.json"),
         text=json.dumps({"data": [{"paragraphs": [none]}]}), where="q1", extra=qa)
    return c


def test_malformed_data_is_named(base, tmp_path, capsys):
    for name, args, where in data_cases(tmp_path):
        check(name, ["finetune", "--model", base / "model", "--out", tmp_path / "out" / name,
                     "--max-steps", "1", "--threads", "1", "--max-length", "16", *args],
              where, capsys, runs=[base / "run"])


def damaged_checkpoints(base, t):
    """(name, checkpoint directory, what the last line must name)."""
    src = base / "model"
    out = []

    def copy(name, edit):
        d = t / name
        shutil.copytree(src, d)
        where = edit(d)
        out.append((name, d, where or str(d)))

    def config(d, **changes):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))
        return str(d / "config.json")

    def tensors(d, fn):
        sd = load_file(d / "model.safetensors")
        fn(sd)
        save_file(sd, d / "model.safetensors")
        return str(d / "model.safetensors")

    out.append(("checkpoint-missing", t / "nowhere", str(t / "nowhere")))
    copy("checkpoint-no-config", lambda d: os.remove(d / "config.json"))
    copy("config-not-json", lambda d: (d / "config.json").write_text("{") and None)
    copy("config-not-an-object", lambda d: (d / "config.json").write_text("[1, 2]") and None
         or str(d / "config.json"))
    copy("tokenizer-json-truncated", lambda d: (d / "tokenizer.json").write_text(
        (d / "tokenizer.json").read_text()[:500]) and str(d / "tokenizer.json"))
    copy("config-heads-do-not-divide", lambda d: config(d, num_attention_heads=5))
    copy("config-wrong-type", lambda d: config(d, hidden_size="32"))
    copy("config-negative-size", lambda d: config(d, num_hidden_layers=-1))
    copy("only-pytorch-model-bin", lambda d: (os.remove(d / "model.safetensors"),
                                              write(d / "pytorch_model.bin", "x"))[0])
    copy("safetensors-truncated", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:300]) and str(d / "model.safetensors"))
    copy("safetensors-wrong-dtype", lambda d: tensors(d, lambda sd: sd.update(
        {k: v.to(torch.int32) for k, v in sd.items() if k.endswith("query.weight")})))
    copy("safetensors-missing-key", lambda d: tensors(
        d, lambda sd: sd.pop(next(k for k in sd if k.endswith("value.weight")))))
    copy("safetensors-extra-key", lambda d: tensors(
        d, lambda sd: sd.update({"bert.surprise": torch.zeros(3)})))
    copy("safetensors-wrong-shape", lambda d: tensors(d, lambda sd: sd.update(
        {k: torch.zeros(7, 7) for k in sd if k.endswith("0.attention.self.key.weight")})))
    copy("vocabulary-too-large", lambda d: (
        os.remove(d / "tokenizer.json"),
        write(d / "vocab.txt", (d / "vocab.txt").read_text() + "".join(
            f"extra{i}\n" for i in range(100))))[1])
    return out


def test_damaged_checkpoints_are_named(base, tmp_path, capsys):
    data = base / "data"
    for name, ckpt, where in damaged_checkpoints(base, tmp_path):
        check(name, ["finetune", "--model", ckpt, "--train", data / "train.jsonl",
                     "--out", tmp_path / "out" / name, "--max-steps", "1", "--threads", "1"],
              where, capsys, runs=[base / "run"])
        check(name + " (embed)", ["embed", "--model", ckpt, "--text", "good"], where, capsys)


def test_run_directories_that_cannot_serve(base, tmp_path, capsys):
    run = base / "run"
    # predict on a run without best/
    nobest = tmp_path / "nobest"
    shutil.copytree(run, nobest)
    shutil.rmtree(nobest / "best")
    check("predict-without-best", ["predict", nobest, "--text", "good"], str(nobest), capsys,
          runs=[nobest])
    check("predict-text-and-input", ["predict", run, "--text", "good", "--input",
                                     base / "data/dev.jsonl"], "--input", capsys, runs=[run])

    def resume_case(name, damage, where):
        d = tmp_path / name
        shutil.copytree(run, d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "out": str(d)}))
        shutil.rmtree(d / "state.old", ignore_errors=True)
        damage(d)
        check(name, ["finetune", "--resume", d], where(d), capsys, runs=[d])
    resume_case("resume-trainer-json-corrupt",
                lambda d: (d / "state" / "trainer.json").write_text("{"), lambda d: str(d))
    resume_case("resume-optimizer-corrupt",
                lambda d: (d / "state" / "optimizer.pt").write_bytes(b"not a torch file"),
                lambda d: str(d / "state"))
    resume_case("resume-trainer-json-incomplete",
                lambda d: (d / "state" / "trainer.json").write_text('{"step": 2}'),
                lambda d: str(d / "state"))

    def foreign(d):  # the state of a wider model (hidden 64) in this run's state/
        make_checkpoint(tmp_path / "wide", hidden_size=64, intermediate_size=128)
        other = run_finetune(FinetuneConfig(
            model=str(tmp_path / "wide"), train=str(base / "data/train.jsonl"),
            out=str(tmp_path / "wide-run"), batch_size=8, max_steps=2, eval_every=None,
            threads=1, max_length=16))
        assert other is not None
        shutil.rmtree(d / "state")
        shutil.copytree(tmp_path / "wide-run" / "state", d / "state")
    resume_case("resume-foreign-state", foreign, lambda d: str(d / "state"))
    resume_case("resume-no-state", lambda d: shutil.rmtree(d / "state"), lambda d: str(d))

    def edit(**kw):  # RUN/config.json edited by hand
        def damage(d):
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**cfg, **kw}))
        return damage
    where = lambda d: str(d / "config.json")  # noqa: E731
    resume_case("resume-config-value-a-string", edit(max_steps="40"), where)
    resume_case("resume-config-key-misspelt", edit(max_step=40), where)
    resume_case("resume-config-out-of-range", edit(lr=-1.0), where)
    resume_case("resume-config-not-an-object",
                lambda d: (d / "config.json").write_text("[1]"), where)
    # another command's run: a pretraining run's config given to finetune --resume
    resume_case("resume-another-commands-run",
                edit(corpus=["a.txt"], mask_prob=0.15), where)
    check("resume-not-a-run", ["finetune", "--resume", tmp_path / "empty"],
          str(tmp_path / "empty"), capsys)
    # a fresh run pointed at a finished one refuses instead of writing into it
    check("fresh-run-into-a-finished-one",
          ["finetune", "--model", base / "model", "--train", base / "data/train.jsonl",
           "--out", run, "--max-steps", "1"], str(run), capsys, runs=[run])


def test_kernels_that_cannot_run_here(base, tmp_path, capsys, monkeypatch):
    # Triton kernels on a CPU without the interpreter: one line naming the setting, no traceback
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["finetune", "--model", base / "model", "--train", base / "data/train.jsonl",
            "--device", "cpu", "--attention", "triton"]
    check("triton-on-cpu", [*argv, "--out", tmp_path / "o"], "attention='triton'", capsys)
    # on a machine with a GPU too: the run's --device decides, not whether a GPU exists
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check("triton-on-cpu-beside-a-gpu", [*argv, "--out", tmp_path / "o2"], "attention='triton'",
          capsys)


def test_contradictory_and_wrong_flags(base, tmp_path, capsys):
    common = ["--model", base / "model", "--train", base / "data/train.jsonl",
              "--out", tmp_path / "o"]
    cases = [
        ("freeze-backbone-and-unfreeze", ["--freeze-backbone", "--unfreeze-every", "1"],
         "--freeze-backbone"),
        ("plateau-without-dev", ["--schedule", "plateau"], "--dev"),
        ("early-stopping-without-dev", ["--early-stopping-patience", "2"], "--dev"),
        ("init-heads-with-random-init", ["--init-heads", str(base / "run/best"), "--init",
                                         "random"], "--init-heads"),
        ("accumulation-disagrees", ["--grad-accum", "2", "--effective-batch-size", "10",
                                    "--batch-size", "4"], "--effective-batch-size"),
        ("freeze-head-without-multitask", ["--freeze-head", "a"], "--freeze-head"),
        ("unknown-flag", ["--learning-rate", "1e-4"], "--learning-rate"),
        ("not-a-number", ["--lr", "fast"], "--lr"),
        ("not-a-choice", ["--pooling", "max"], "--pooling"),
        ("batch-size-zero", ["--batch-size", "0"], "--batch-size"),
        ("log-every-zero", ["--log-every", "0"], "--log-every"),
        ("metric-not-the-tasks", ["--metric", "acuracy"], "--metric"),
        ("doc-stride-too-long", ["--task", "qa", "--doc-stride", "128"], "--doc-stride"),
        ("bio-constraints-without-crf", ["--task", "tokens", "--bio-constraints"], "--crf"),
        ("max-steps-zero", ["--max-steps", "0"], "--max-steps"),
        ("epochs-zero", ["--epochs", "0"], "--epochs"),
        ("eval-every-zero", ["--eval-every", "0"], "--eval-every"),
        ("threads-zero", ["--threads", "0"], "--threads"),
    ]
    for name, flags, where in cases:
        check(name, ["finetune", *common, *flags], where, capsys, runs=[base / "run"])
    check("sweep-bad-grid", ["sweep", "--grid", "lr", "--out", tmp_path / "sw", "--",
                             *common[:4]], "--grid", capsys)
    check("diagnose-one-label", ["diagnose", base / "run", "--labels", "1"], "--labels", capsys)
    check("sweep-random-zero", ["sweep", "--grid", "lr=1e-5", "--random", "0", "--out",
                                tmp_path / "sw0", "--", *common[:4]], "--random", capsys)
    check("pretrain-max-steps-negative", ["pretrain", "--config", "tiny", "--corpus",
                                          base / "data/train.jsonl", "--max-steps", "-3",
                                          "--out", tmp_path / "p0"], "--max-steps", capsys)
    check("pretrain-valid-missing", ["pretrain", "--config", "tiny", "--corpus",
                                     base / "data/train.jsonl", "--valid", tmp_path / "nope.txt",
                                     "--out", tmp_path / "p1"], "--valid", capsys)
    check("pretrain-eval-batch-zero", ["pretrain", "--config", "tiny", "--corpus",
                                       base / "data/train.jsonl", "--eval-batch-size", "0",
                                       "--out", tmp_path / "p2"], "--eval-batch-size", capsys)
    check("pretrain-max-minutes-negative", ["pretrain", "--config", "tiny", "--corpus",
                                            base / "data/train.jsonl", "--max-minutes", "-1",
                                            "--out", tmp_path / "p3"], "--max-minutes", capsys)
    afile = write(str(tmp_path / "afile"), "x\n")
    check("tokenizer-out-a-file", ["tokenizer", "train", "--corpus", base / "data/train.jsonl",
                                   "--out", afile], f"{afile}: a file", capsys)
    check("pretrain-tokenizer-a-file", ["pretrain", "--config", "tiny", "--corpus",
                                        base / "data/train.jsonl", "--tokenizer",
                                        base / "model/vocab.txt", "--out", tmp_path / "p4"],
          f"{base / 'model/vocab.txt'}: a file; give the directory", capsys)
    check("pretrain-without-config", ["pretrain", "--corpus", base / "data/train.jsonl",
                                      "--out", tmp_path / "p"], "--config", capsys)
    check("multitask-bad-spec", ["finetune", "--task", "multitask", "--model", base / "model",
                                 "--tasks", "a:classification", "--out", tmp_path / "m"],
          "--tasks spec 1", capsys)
    check("multitask-metric-not-a-heads", ["finetune", "--task", "multitask", "--model",
                                           base / "model", "--tasks",
                                           f"a:classification:{base}/data/{{split}}.jsonl",
                                           "--metric", "b/accuracy", "--out", tmp_path / "m2"],
          "--metric", capsys)


def test_the_corpus_is_large(capsys):
    # runs last in this file: every case above that passed is counted here
    with capsys.disabled():
        print(f"\nbad inputs: {len(TRIED)} tried, each named in one line, no traceback, "
              "no run directory touched")
    assert len(TRIED) >= 40
