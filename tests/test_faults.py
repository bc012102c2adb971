"""Faults a long run meets, each made to happen on purpose, and what must survive it:

- a NaN in the loss, and an out-of-memory error, mid-run: the run stops with one message, and the
  best/ and state/ of the last evaluation are intact and load;
- a full disk (ENOSPC) while writing a checkpoint: the previous state/ stays readable, no half
  directory is left, and the message says what to do;
- two runs pointed at the same --out at once: the second refuses, naming the lock;
- no load path runs code from a file: no pickle, no torch.load without weights_only=True, no
  eval/exec (an AST scan of minibert/ and train/, which is shown to catch each of them).
"""

import ast
import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from minibert.errors import UserError
from tests.tiny import make_checkpoint, make_sentiment
from train.finetune.config import FinetuneConfig
from train.finetune.finetune import run_finetune
from train.loop import state as state_module
from train.tasks.task import TaskModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    make_checkpoint(root / "model")
    make_sentiment(root / "data")
    return root


def config(tiny, out, **kw):
    return FinetuneConfig(**{**dict(model=str(tiny / "model"), train=str(tiny / "data/train.jsonl"),
                                    dev=str(tiny / "data/dev.jsonl"), out=str(out), batch_size=8,
                                    max_steps=12, eval_every=3, log_every=1, threads=1,
                                    max_length=16), **kw})


def fail_training_forward_at(monkeypatch, step, fault):
    """TaskModel.forward in training mode, with `fault(out)` applied at the step-th call."""
    real, calls = TaskModel.forward, [0]

    def forward(self, batch):
        out = real(self, batch)
        if self.training:
            calls[0] += 1
            if calls[0] == step:
                return fault(out)
        return out
    monkeypatch.setattr(TaskModel, "forward", forward)


def intact(run, step):
    """best/ and state/ load, and state/ is the one saved at `step`."""
    assert json.loads((run / "state" / "trainer.json").read_text())["step"] == step
    for d in ("best", "state"):
        for f in os.listdir(run / d):
            if f.endswith(".safetensors"):
                assert all(torch.isfinite(t).all() for t in load_file(run / d / f).values())
    assert not [n for n in os.listdir(run) if n.endswith(".new")]


def test_nan_loss_stops_with_the_last_good_checkpoints(tiny, tmp_path, monkeypatch):
    def poison(out):
        return {**out, "loss": out["loss"] * float("nan")}
    fail_training_forward_at(monkeypatch, 8, poison)
    with pytest.raises(SystemExit, match="diverged: loss is nan at step 7"):
        run_finetune(config(tiny, tmp_path / "run"))
    intact(tmp_path / "run", 6)  # saved at the evaluation of step 6
    FAULTS.append("NaN loss")


@pytest.mark.parametrize("error", [MemoryError(), torch.cuda.OutOfMemoryError("CUDA out of "
                                                                               "memory")])
def test_out_of_memory_stops_with_the_last_good_checkpoints(tiny, tmp_path, monkeypatch, error):
    def oom(out):
        raise error
    fail_training_forward_at(monkeypatch, 11, oom)
    with pytest.raises(SystemExit, match="out of memory in step 11"):
        run_finetune(config(tiny, tmp_path / "run"))
    intact(tmp_path / "run", 9)
    FAULTS.append(f"out of memory ({type(error).__name__})")


def test_full_disk_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    real, saves = state_module.atomic_torch_save, []

    def save(path, obj):
        saves.append(path)
        if len(saves) == 5:  # optimizer.pt of the third save (each save writes two .pt files)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(path, obj)
    monkeypatch.setattr(state_module, "atomic_torch_save", save)
    with pytest.raises(UserError, match=r"state: the disk is full.*previous state/ is intact.*"
                                        "--resume"):
        run_finetune(config(tiny, tmp_path / "run"))
    intact(tmp_path / "run", 6)
    FAULTS.append("full disk (ENOSPC)")


def test_full_disk_at_the_first_save_does_not_advise_resume(tiny, tmp_path, monkeypatch):
    def save(path, obj):  # the disk is full from the first state/ on: nothing to resume from
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(state_module, "atomic_torch_save", save)
    with pytest.raises(UserError, match=r"state: the disk is full .*; no state/ had been saved "
                                        r"yet: free some space, then start the run again$"):
        run_finetune(config(tiny, tmp_path / "run"))


def test_full_disk_outside_a_run_is_one_line(tmp_path, monkeypatch, capsys):
    # the tokenizer's files (and the token cache) are written outside RUN/: the command's error
    # boundary says a full disk in one line too, naming the file
    import minibert.io
    from train.cli import main

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(minibert.io, "atomic_write_text", full)
    (tmp_path / "c.txt").write_text("the cat sat on the mat\n" * 50)
    code = main(["tokenizer", "train", "--corpus", str(tmp_path / "c.txt"), "--vocab-size", "40",
                 "--out", str(tmp_path / "tok")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1] == f"minibert tokenizer: {tmp_path / 'tok' / 'tokenizer.json'}: no space left " \
        "on device"


def test_atomic_writes_give_the_umask_permissions_and_leave_it_alone(tmp_path, monkeypatch):
    """A written file has the permissions open() would give it (mkstemp's 0600 would hide a run
    from its group), and writing never sets the process umask, which other threads share."""
    from minibert.io import atomic_write_text
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("atomic write set the umask"))
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary file left


def test_a_second_run_on_the_same_out_refuses(tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "shared"
    args = ["finetune", "--model", tiny / "model", "--train", tiny / "data/train.jsonl",
            "--out", out, "--batch-size", "4", "--max-steps", "100000", "--eval-every", "none",
            "--log-every", "1", "--threads", "1", "--max-length", "16"]
    cmd = [sys.executable, "-P", "-m", "train.cli", *map(str, args)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first run should still be training"
    first.kill()  # it would train for a long time; its files so far are what matters
    first.wait()
    assert second.returncode != 0 and "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert f"{out}/.lock: another minibert run (pid {first.pid})" in last, last
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # one run's events, not two interleaved
    FAULTS.append("two runs on one --out")



def test_a_run_that_stops_early_removes_only_the_out_it_made(tmp_path, monkeypatch):
    # run_in_state removes a --out it made when the run stops before its first event, and only
    # while it holds that directory's lock: never a directory another run took in between.
    from train.loop import launch, rundir
    cfg = type("Cfg", (), dict(seed=0, threads=1, device="cpu"))

    def stop(*_):
        raise UserError("refused")

    cfg.out = str(tmp_path / "made")  # made here, stopped before any event: gone again
    with pytest.raises(UserError):
        launch.run_in_state(stop, cfg)
    assert not os.path.exists(cfg.out)

    cfg.out = str(tmp_path / "taken")  # another run takes it between the check and the lock
    held = []

    def exclusive_after_another(path):
        held.append(rundir.exclusive(path))
        held[0].__enter__()  # the other run now holds the lock
        return rundir.exclusive(path)
    monkeypatch.setattr(launch, "exclusive", exclusive_after_another)
    with pytest.raises(UserError, match="another minibert run"):
        launch.run_in_state(stop, cfg)
    assert sorted(os.listdir(cfg.out)) == [".lock"], "the other run's directory is intact"
    held[0].__exit__(None, None, None)
    monkeypatch.undo()

    cfg.out = str(tmp_path / "kept")  # an event was logged: the directory stays
    with pytest.raises(UserError):
        launch.run_in_state(lambda *_: (rundir.RunDir(cfg.out).log({"event": "x"}), stop()), cfg)
    assert sorted(os.listdir(cfg.out)) == [".lock", "metrics.jsonl"]

# ------------------------------------------------------------------ no code execution on load

def code_execution(source, path="<src>"):
    """Places in `source` that could run code from a file's contents."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            found += [f"{path}:{node.lineno}: imports {n}" for n in names
                      if n.split(".")[0] in ("pickle", "dill", "marshal", "shelve")]
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
            else ""
        kw = {k.arg: k.value for k in node.keywords}
        if name in ("eval", "exec") and isinstance(f, ast.Name):
            found.append(f"{path}:{node.lineno}: {name}()")
        if owner == "torch" and name == "load" and not (
                "weights_only" in kw and getattr(kw["weights_only"], "value", None) is True):
            found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
        if name == "load" and owner in ("np", "numpy") and \
                getattr(kw.get("allow_pickle"), "value", False) is True:
            found.append(f"{path}:{node.lineno}: np.load(allow_pickle=True)")
    return found


def test_the_scan_catches_each_kind():
    bad = ("import pickle\nfrom dill import loads\nx = torch.load(p)\n"
           "y = torch.load(p, weights_only=False)\neval(s)\nexec(s)\n"
           "z = np.load(p, allow_pickle=True)\n")
    assert len(code_execution(bad)) == 7
    assert code_execution("x = torch.load(p, weights_only=True)\ny = np.load(p)\n") == []


def test_no_load_path_runs_code_from_a_file():
    found = []
    for pkg in ("minibert", "train"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    p = os.path.join(dirpath, f)
                    found += code_execution(open(p, encoding="utf-8").read(),
                                            os.path.relpath(p, ROOT))
    assert found == []


def test_report(capsys):
    with capsys.disabled():
        print(f"\nfaults survived: {len(FAULTS)} ({', '.join(FAULTS)}); best/ and state/ intact "
              "after each")
