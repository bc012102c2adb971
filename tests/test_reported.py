"""Problems users reported, one test each (the rest are cases of tests/test_bad_inputs.py):
fill-mask and predict on bad inputs, texts piped on stdin, files with a byte-order mark and CRLF
line ends, what a checkpoint's config.json says it holds, strict JSON in every file a run writes,
and one spelling (`--model`) for the model in every command, the old spelling still working.
"""

import io
import json
import os
import shutil

import pytest

from tests.test_bad_inputs import check, run_cli
from tests.tiny import make_checkpoint, make_sentiment
from train.data.examples import DataError, read_examples
from train.finetune.config import FinetuneConfig
from train.finetune.finetune import run_finetune


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reported")
    make_checkpoint(root / "mlm", mlm=True)
    make_checkpoint(root / "model")
    make_sentiment(root / "data")
    run_finetune(FinetuneConfig(model=str(root / "model"), train=str(root / "data/train.jsonl"),
                                out=str(root / "run"), batch_size=8, max_steps=2,
                                eval_every=None, threads=1, max_length=16))
    return root


def test_fill_mask_names_a_bad_checkpoint(tiny, tmp_path, capsys):
    check("fill-mask-missing", ["fill-mask", "--model", tmp_path / "no", "a [MASK]"],
          tmp_path / "no", capsys)
    heads = tmp_path / "heads"
    shutil.copytree(tiny / "mlm", heads)
    cfg = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3}))
    check("fill-mask-heads", ["fill-mask", heads, "a [MASK]"], heads / "config.json", capsys)
    binary = tmp_path / "bin"
    shutil.copytree(tiny / "mlm", binary)
    os.remove(binary / "model.safetensors")
    (binary / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    check("fill-mask-bin-only", ["fill-mask", binary, "a [MASK]"], "pytorch_model.bin", capsys)
    cut = tmp_path / "cut"
    shutil.copytree(tiny / "mlm", cut)
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:500])
    check("fill-mask-truncated", ["fill-mask", cut, "a [MASK]"], cut / "model.safetensors",
          capsys)


def test_fill_mask_on_an_encoder_only_checkpoint(tiny, capsys):
    # a sentence-embedding model (MiniLM's layout) has no cls.predictions.*: say so, in one line
    check("fill-mask-no-head", ["fill-mask", tiny / "model", "a [MASK]"], tiny / "model", capsys)
    assert "no masked-LM head" in run_cli(["fill-mask", tiny / "model", "a [MASK]"], capsys)[1]


def piped(argv, stdin, capsys, monkeypatch):
    """(exit status or SystemExit's message, stdout) of `minibert ARGV < stdin`, in this process."""
    from train.cli import main
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        return e.code, None
    return code, capsys.readouterr().out


def test_embed_and_predict_read_texts_from_stdin(tiny, capsys, monkeypatch):
    # line N of the output answers line N of the input, a blank line too; CRLF is read
    texts = ["good", "", "bad plot"]
    for command, model, parse in (("embed", tiny / "model", json.loads),
                                  ("predict", tiny / "run", lambda out: out.splitlines())):
        flagged = piped([command, model, *(a for t in texts for a in ("--text", t))], "",
                        capsys, monkeypatch)
        stdin = piped([command, model], "good\r\n\nbad plot\n", capsys, monkeypatch)
        assert flagged[0] == stdin[0] == 0, command
        assert parse(stdin[1]) == parse(flagged[1]) and len(parse(flagged[1])) == 3, command
        said, _ = piped([command, model], "", capsys, monkeypatch)
        assert f"minibert {command}: stdin is empty; give --text" in said


def test_a_bad_stdin_line_is_named_by_its_line():
    from train.tasks.qa import QATask
    with pytest.raises(DataError, match="^stdin:2: write 'QUESTION ||| CONTEXT'"):
        QATask({}).read_inputs(["who ||| the good film", "no separator"], None, None, 4,
                               "stdin:{}")


def test_predict_refuses_a_number_for_a_text(tiny, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"text": "good film"}\n{"text": 42}\n')
    check("predict-number-as-text", ["predict", tiny / "run", "--input", inputs],
          f"{inputs}:2", capsys, runs=[tiny / "run"])


def test_byte_order_mark_and_crlf_are_read(tmp_path):
    rows = [{"text": "good film", "label": 1}, {"text": "bad plot", "label": 0}]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode())
    csv = tmp_path / "windows.csv"
    csv.write_bytes(b"\xef\xbb\xbftext,label\r\ngood film,1\r\nbad plot,0\r\n")
    want = [(e.text, e.target) for e in read_examples(str(plain), "text", None, "label")[0]]
    for f in (windows, csv):
        got = [(e.text, str(e.target)) for e in read_examples(str(f), "text", None, "label")[0]]
        assert got == [(t, str(y)) for t, y in want], f


def test_checkpoints_say_what_they_hold(tiny, tmp_path):
    best = json.loads((tiny / "run" / "best" / "config.json").read_text())
    assert best["architectures"] == ["BertModel"]  # a backbone; the head is head.safetensors
    assert json.loads((tiny / "run" / "best" / "task.json").read_text())["task"] == \
        "classification"
    assert json.loads((tiny / "mlm" / "config.json").read_text())["architectures"] == \
        ["BertForMaskedLM"]


def test_every_json_a_run_writes_is_strict(tiny):
    def strict(text, where):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{where}: {c}"))
    for dirpath, _, files in os.walk(tiny / "run"):
        for f in files:
            p = os.path.join(dirpath, f)
            if f.endswith(".json"):
                strict(open(p).read(), p)
            elif f.endswith(".jsonl"):
                for n, line in enumerate(open(p).read().splitlines(), 1):
                    strict(line, f"{p}:{n}")


def test_one_spelling_for_the_model(tiny, capsys):
    # both spellings read the same model and texts (neither text holds a [MASK], so both stop
    # at the first text, naming it)
    new = run_cli(["fill-mask", "--model", tiny / "mlm", "a film", "the end"], capsys)
    old = run_cli(["fill-mask", tiny / "mlm", "a film", "the end"], capsys)
    assert new[0] == old[0] == 1 and "no [MASK] in 'a film'" in new[1] == old[1]
    for argv in (["embed", "--model", tiny / "model"], ["embed", tiny / "model"]):
        capsys.readouterr()
        assert run_cli([*argv, "--text", "good"], capsys)[0] == 0
    from train.cli import build_parser
    sub = build_parser()._subparsers._group_actions[0].choices
    for command in ("embed", "fill-mask", "predict", "export", "quantize", "finetune", "pretrain",
                    "memory"):
        assert "--model" in sub[command].format_help(), command
    assert "older spelling" in sub["embed"].format_help()


def test_a_command_s_own_stop_exits_as_an_input_error(tmp_path):
    # `minibert` (train.cli:run): status 2 and one line, the traceback only under --debug, as for
    # a UserError; main() itself still raises, for tests and library callers
    import subprocess
    import sys
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])  # this checkout, not the installed one
    argv = [sys.executable, "-P", "-m", "train.cli", "predict", str(tmp_path / "no"), "--text", "a"]
    for debug in ([], ["--debug"]):
        r = subprocess.run(argv[:4] + debug + argv[4:], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": root})
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.splitlines()[-1].startswith(f"minibert predict: {tmp_path / 'no'}")
        assert ("Traceback" in r.stderr) == bool(debug), r.stderr


def test_flags_out_of_range_are_named(tiny, tmp_path, capsys):
    data = tiny / "data"
    base = ["finetune", "--model", tiny / "model", "--train", data / "train.jsonl", "--out",
            tmp_path / "r", "--max-length", "16", "--threads", "1"]
    check("device-unknown", base + ["--device", "nonsense"], "--device nonsense", capsys)
    import torch
    with pytest.MonkeyPatch.context() as m:  # a machine without CUDA, wherever this runs
        m.setattr(torch.cuda, "is_available", lambda: False)
        check("device-cuda-absent", base + ["--device", "cuda"], "--device cuda", capsys)
    check("unfreeze-every-zero", base + ["--unfreeze-every", "0"], "--unfreeze-every 0", capsys)
    check("eval-batch-size-zero", base + ["--eval-batch-size", "0"], "--eval-batch-size 0",
          capsys)
    check("predict-batch-size-zero", ["predict", tiny / "run", "--text", "good",
                                      "--batch-size", "0"], "--batch-size", capsys)
    # an unknown flag is named by its command, whose --help lists the right ones
    code, err = run_cli(base + ["--bogus", "1"], capsys)
    assert code == 2 and "minibert finetune: unrecognized arguments: --bogus 1" in err


def test_logs_go_to_the_stderr_of_the_moment(monkeypatch):
    # bound at import, a default stream outlives the one a caller (or pytest) swaps in later
    import io
    import sys
    from train.command import print_config
    late = io.StringIO()
    monkeypatch.setattr(sys, "stderr", late)
    print_config(FinetuneConfig(model="m", train="t"), "finetune config")
    assert late.getvalue().startswith("finetune config:")
