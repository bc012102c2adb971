"""Resume at the moments that used to go wrong: a run stopped right after it saved its state at
step k, then resumed with `--resume RUN`, must end as the uninterrupted run does (every weight of
state/ and best/, every logged number but the clock's). The stop is an exception raised inside
the process just after the save (what a kill at that instant leaves on disk), so each case runs
in seconds; tests/test_kill.py does the same with real SIGKILLs at random moments.

The moments: a save at a step where gradual unfreezing moves to its next stage (the state must
hold that stage's param groups), under a linear and a plateau schedule; a plateau schedule saved
before its first evaluation (its best is still infinite, which JSON cannot hold); a save after
early stopping has said stop (the resumed run must not train on); and a save inside a log
interval (the resumed run must log the same train loss). And the progress bar of a resumed run
estimates its time left from its own steps only.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import make_checkpoint, make_sentiment
from train.cli import main
from train.loop import state
from train.loop.rundir import read_jsonl

CLOCK = {"time", "examples_per_second", "tokens_per_second", "memory"}


class Killed(BaseException):
    """Raised just after a save: nothing in the trainer catches it, as nothing catches SIGKILL."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    return make_checkpoint(d / "ckpt"), make_sentiment(d / "data", n_train=48)


def flags(setup, out, *extra):
    ckpt, data = setup
    return ["finetune", "--model", ckpt, "--train", data / "train.jsonl", "--dev",
            data / "dev.jsonl", "--out", out, "--batch-size", "4", "--max-length", "16",
            "--threads", "1", "--precision", "fp32", "--max-steps", "12", *extra]


def run(argv):
    assert main([str(a) for a in argv]) == 0


def killed_after_save_at(step, argv, monkeypatch):
    real = state.save

    def save_then_die(t):
        real(t)
        if t.step >= step:
            raise Killed

    monkeypatch.setattr(state, "save", save_then_die)
    with pytest.raises(Killed):
        run(argv)
    monkeypatch.setattr(state, "save", real)


def same_run(a, b):
    for d in ("state", "best"):
        x, y = load_file(a / d / "model.safetensors"), load_file(b / d / "model.safetensors")
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"{d}/{k}"
    def strip(events):
        return [{k: v for k, v in e.items() if k not in CLOCK} for e in events]
    assert strip(read_jsonl(b / "metrics.jsonl")) == strip(read_jsonl(a / "metrics.jsonl"))


def resumed_equals_uninterrupted(setup, tmp_path, monkeypatch, step, *extra):
    run(flags(setup, tmp_path / "full", *extra))
    killed = tmp_path / "killed"
    killed_after_save_at(step, flags(setup, killed, *extra), monkeypatch)
    assert (killed / "state").is_dir() and not (killed / "results.json").exists()
    run(["finetune", "--resume", killed])
    same_run(tmp_path / "full", killed)
    return killed


@pytest.mark.parametrize("schedule", [[], ["--schedule", "plateau", "--warmup-steps", "2"]])
def test_resume_where_unfreezing_moves_to_its_next_stage(setup, tmp_path, monkeypatch, schedule):
    # stages change at steps 2, 4, 6; the save at step 4 falls on a change
    resumed_equals_uninterrupted(setup, tmp_path, monkeypatch, 4, "--unfreeze-every", "2",
                                 "--unfreeze-unit", "step", "--eval-every", "4", *schedule)


def test_resume_a_plateau_saved_before_its_first_evaluation(setup, tmp_path, monkeypatch):
    # saves at steps 2 and 4 fall in the warm-up, where the plateau has seen nothing yet
    resumed_equals_uninterrupted(setup, tmp_path, monkeypatch, 2, "--schedule", "plateau",
                                 "--warmup-steps", "6", "--eval-every", "2")


def test_resume_after_early_stopping_does_not_train_on(setup, tmp_path, monkeypatch):
    extra = ["--eval-every", "1", "--early-stopping-patience", "1", "--lr", "1e-9",
             "--lr-head", "1e-9"]  # nothing moves: the second evaluation is no better
    run(flags(setup, tmp_path / "probe", *extra))
    stopped_at = max(e["step"] for e in read_jsonl(tmp_path / "probe" / "metrics.jsonl"))
    assert stopped_at < 12
    resumed_equals_uninterrupted(setup, tmp_path, monkeypatch, stopped_at, *extra)


def test_resume_inside_a_log_interval_logs_the_same_loss(setup, tmp_path, monkeypatch):
    # saved at step 3, logged every 4 steps
    resumed_equals_uninterrupted(setup, tmp_path, monkeypatch, 3, "--log-every", "4",
                                 "--eval-every", "3", "--grad-accum", "2")


def test_progress_after_a_resume_counts_only_this_process_s_steps(setup, tmp_path,
                                                                     monkeypatch):
    import io
    from train.loop import progress, trainer
    clock = iter([0.0, 100.0])  # made at 0 s; 100 s later, 400 steps done here
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    out = io.StringIO()
    bar = progress.Progress(2000, "train", file=out, start=1000)  # resumed at step 1000
    bar.update(1400)  # 4 steps/s, 600 steps to go
    assert "train 1400/2000 |  70% | eta 2:30" in out.getvalue()
    monkeypatch.undo()
    # and a resumed trainer tells its bar where it starts
    starts = []
    monkeypatch.setattr(trainer, "Progress", lambda *a, start=0, **k: starts.append(start)
                        or progress.Progress(*a, start=start, **k))
    killed_after_save_at(4, flags(setup, tmp_path / "r", "--eval-every", "4"), monkeypatch)
    run(["finetune", "--resume", tmp_path / "r"])
    assert starts == [0, 4]


def test_resume_writes_into_the_directory_given_and_refuses_other_flags(setup, tmp_path,
                                                                         monkeypatch, capsys):
    # a run copied elsewhere resumes there (config.json still names the original --out)
    first = tmp_path / "first"
    killed_after_save_at(4, flags(setup, first), monkeypatch)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    capsys.readouterr()
    assert main(["finetune", "--resume", str(copy), "--max-steps", "20", "--lr", "5"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "continues with the run's saved config.json; drop --lr, --max-steps")
    # how the process runs may change, its flags abbreviated as argparse allows; a prefix that
    # may begin a flag of the run too is refused (--de: --debug, or --device)
    import argparse
    from minibert.errors import UserError
    from train.loop.launch import command
    from train.pretrain.config import PretrainConfig
    from train.pretrain.pretrain import register
    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    args = sub.choices["pretrain"].parse_args(["--resume", str(copy), "--de", "cpu"])
    args.argv, args.nproc = ["pretrain", "--resume", str(copy), "--de", "cpu"], 1
    with pytest.raises(UserError, match="drop --de$"):
        command(args, "pretrain", PretrainConfig, None)
    run(["finetune", "--resu", copy, "--thr", "1"])
    assert (copy / "results.json").exists() and not (first / "results.json").exists()


def test_resume_from_another_working_directory(setup, tmp_path, monkeypatch):
    # --model, --train, --dev and --out given relative to one directory: config.json names them
    # absolutely, so the run resumes from any other
    for name, target in zip(("ckpt", "data"), setup):
        (tmp_path / name).symlink_to(target)
    monkeypatch.chdir(tmp_path)
    killed_after_save_at(4, flags((Path("ckpt"), Path("data")), "r", "--eval-every", "4"),
                         monkeypatch)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run(["finetune", "--resume", "../r"])
    assert (tmp_path / "r" / "results.json").exists()


def test_paths_made_absolute_keep_their_meaning_through_a_link(tmp_path, monkeypatch):
    # lnk/../data is tmp/real/data seen through the link; os.path.abspath would turn it into
    # tmp/data as text, a path that does not exist
    from train.finetune.config import FinetuneConfig
    from train.loop.launch import absolute_paths
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "data.jsonl").write_text("{}\n")
    (tmp_path / "lnk").symlink_to(tmp_path / "real" / "sub")
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(FinetuneConfig(train="lnk/../data.jsonl"))
    assert os.path.isabs(cfg.train) and os.path.isfile(cfg.train)
