"""`minibert sweep` end to end on a tiny random BERT and a tiny synthetic dataset: every trial
gets its run directory, a failing trial is recorded and the sweep goes on, the table is sorted by
the dev metric, and a second run of the same command resumes instead of starting over.

Each trial is a `minibert finetune` subprocess of a few steps (about 2 s, mostly imports).
"""

import json
import os

import pytest

from train.cli import main


def sweep_args(root, out, grid):
    return (["sweep", "--out", str(out)] + [a for g in grid for a in ("--grid", g)] +
            ["--", "--model", str(root / "model"), "--train", str(root / "train.jsonl"),
             "--dev", str(root / "dev.jsonl"), "--max-steps", "16", "--batch-size", "8",
             "--eval-every", "4", "--threads", "1", "--max-length", "16", "--lr-head", "1e-2",
             "--warmup-steps", "0"])


def test_sweep_records_failures_sorts_and_resumes(tiny_setup, tmp_path, capsys):
    out = tmp_path / "sweep"
    # "oops" is not a float: that trial fails at argument parsing, the others must still run.
    # In 16 steps lr 1e-2 learns the task (dev accuracy ~0.9) and 1e-5 does not (~0.5): the
    # two finished trials must not tie, or a table sorted the wrong way would pass. The grid
    # lists the worse one first, so an unsorted table fails too.
    args = sweep_args(tiny_setup, out, ["lr=1e-5,oops,1e-2"])
    assert main(args) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "sweep.json").read_text())
    by_name = {t["name"]: t for t in s["trials"]}
    assert set(by_name) == {"lr=1e-5", "lr=oops", "lr=1e-2"}
    assert by_name["lr=oops"]["status"] == "failed"
    assert "invalid" in by_name["lr=oops"]["error"]
    done = [t for t in s["trials"] if t["status"] == "done"]
    assert len(done) == 2
    # the ranking is checked against each run's own results.json, not the sweep's copy
    dev_acc = {t["name"]: json.loads(open(os.path.join(t["run"], "results.json")).read())
               ["dev"]["accuracy"] for t in done}
    assert dev_acc["lr=1e-2"] > dev_acc["lr=1e-5"] + 0.2, dev_acc  # no tie: see above
    assert [t["name"] for t in s["trials"]] == ["lr=1e-2", "lr=1e-5", "lr=oops"]  # best first
    assert [t["dev_accuracy"] for t in done] == [dev_acc["lr=1e-2"], dev_acc["lr=1e-5"]]
    assert s["best"]["name"] == "lr=1e-2" and s["best"]["values"] == {"lr": "1e-2"}
    assert s["best"]["command"].startswith("minibert finetune --model")
    assert "--lr 1e-2 " in s["best"]["command"]
    # the printed table (and sweep.md) lists the rows in the same order
    header, *rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert header.split("|")[1].strip() == "lr"
    assert [r.split("|")[1].strip() for r in rows] == ["1e-2", "1e-5", "oops"], printed
    assert "reproduce: minibert finetune" in printed
    assert (out / "sweep.md").read_text().strip() == printed.strip()

    # Interrupted sweep: one trial lost its results (killed after its last save), one never
    # ran. The rerun resumes the first from state/, runs the second, and only reads the third.
    first, second = done[0]["run"], done[1]["run"]
    os.remove(os.path.join(first, "results.json"))
    os.rename(second, second + ".gone")
    assert main(args) == 0
    capsys.readouterr()
    s2 = {t["name"]: t for t in json.loads((out / "sweep.json").read_text())["trials"]}
    assert s2[done[0]["name"]]["how"] == "resumed"
    assert s2[done[1]["name"]]["how"] == "ran"
    log = open(os.path.join(first, "finetune.log")).read()
    assert "resumed from" in log
    # killed between the renames of a save: state.old alone, which --resume reads too
    os.remove(os.path.join(first, "results.json"))
    os.rename(os.path.join(first, "state"), os.path.join(first, "state.old"))
    assert main(args) == 0
    capsys.readouterr()
    s3 = {t["name"]: t for t in json.loads((out / "sweep.json").read_text())["trials"]}
    assert s3[done[0]["name"]]["how"] == "resumed", s3[done[0]["name"]]


def test_random_draws_a_seeded_subset(tiny_setup, tmp_path):
    from train.runs.sweep import parse_grid, trials
    grid = parse_grid(["lr=1,2,3", "batch-size=8,16", "epochs=1,2"])
    assert len(trials(grid)) == 12
    a, b = trials(grid, 4, seed=1), trials(grid, 4, seed=1)
    assert a == b and len(a) == 4 and len({tuple(t.values()) for t in a}) == 4
    with pytest.raises(SystemExit, match="not a finetune option"):
        parse_grid(["learning_rate=1"])
    # values that would be dropped, or run twice into one directory, are refused
    for specs, said in ((["lr=1", "lr=2"], "--grid lr given twice"),
                        (["lr=,"], "give distinct values"), (["lr=1,1"], "give distinct values")):
        with pytest.raises(SystemExit, match=said):
            parse_grid(specs)
    # the sweep names each trial's --out: one given as --out=DIR would be overridden silently
    for given in (["--out=elsewhere"], ["--ou", "elsewhere"]):
        with pytest.raises(SystemExit, match="--out/--resume are set by the sweep"):
            main(["sweep", "--grid", "lr=1", "--out", str(tmp_path / "s"), "--", "--model", "m",
                  "--train", "t", *given])


def test_boolean_fields_become_flags_finetune_accepts(tmp_path):
    from train.cli import build_parser
    from train.runs.sweep import finetune_command, parse_grid, trials
    grid = parse_grid(["freeze_embeddings=true,false"])
    for values, want in zip(trials(grid), (True, False)):
        cmd = finetune_command(["--model", "m", "--train", "t"], values, str(tmp_path / "r"))
        assert build_parser().parse_args(cmd[1:]).freeze_embeddings is want, cmd
    with pytest.raises(SystemExit, match="freeze_embeddings=yes: .* boolean .* true,false"):
        parse_grid(["freeze_embeddings=true,yes"])


def test_changed_finetune_args_are_refused_same_ones_reused(tiny_setup, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = sweep_args(tiny_setup, out, ["lr=1e-2"])
    assert main(args) == 0
    saved = json.loads((out / "sweep.json").read_text())["finetune_args"]
    assert saved == args[args.index("--") + 1:]
    # trials are named by their grid values only: lr=1e-2 of 16 steps is not lr=1e-2 of 8
    changed = [("8" if a == "16" else a) for a in args]
    with pytest.raises(SystemExit, match=f"--out {out} holds trials run with other finetune"):
        main(changed)
    assert main(args) == 0
    capsys.readouterr()
    (trial,) = json.loads((out / "sweep.json").read_text())["trials"]
    assert trial["how"] == "already done"


def test_a_metric_the_task_cannot_report_is_refused_before_any_trial(tiny_setup, tmp_path):
    # a classification run reports accuracy, f1, ... but no pearson; a regression run no
    # accuracy: refused before the first trial (which would run whole, then fail), naming both
    for task, metric in ((["--task", "classification"], "pearson"),
                         (["--task", "regression", "--target-field", "label"], "accuracy")):
        out = tmp_path / metric
        args = sweep_args(tiny_setup, out, ["lr=1e-2,1e-3"]) + task
        with pytest.raises(SystemExit, match=rf"^minibert sweep: --metric {metric}: not a metric "
                                             rf"of --task {task[1]}; one of "):
            main(args[:1] + ["--metric", metric] + args[1:])
        assert not out.exists()


def test_the_default_metric_is_the_trials_task_s(tiny_setup, tmp_path, capsys):
    from train.runs.sweep import sort_key, sweep_metric
    assert sweep_metric(None, ["--task", "regression"], {}) == "pearson"
    assert sweep_metric(None, ["--task=tokens"], {}) == "f1"
    assert sweep_metric(None, ["--task", "multitask", "--tasks", "a:b:c"], {}) == "combined"
    assert sweep_metric(None, ["--model", "m"], {}) == "accuracy"  # finetune's default task
    assert sweep_metric(None, ["--task", "regression", "--metric", "mse"], {}) == "mse"
    assert sweep_metric("a/mse", ["--task", "multitask"], {}) == "a/mse"  # a head's
    with pytest.raises(SystemExit, match="give --metric"):
        sweep_metric(None, [], {"task": ["classification", "regression"]})
    # the trials' own --metric mse ranks lowest first: the direction is metric_mode's
    trials = [{"status": "done", "dev_mse": v} for v in (0.3, 0.1, 0.2)]
    assert [t["dev_mse"] for t in sorted(trials, key=sort_key("mse"))] == [0.1, 0.2, 0.3]
    # end to end: a regression sweep given no --metric ranks its trial by dev pearson
    out = tmp_path / "sweep"
    args = sweep_args(tiny_setup, out, ["lr=1e-2"]) + ["--task", "regression",
                                                       "--target-field", "label"]
    assert main(args) == 0
    s = json.loads((out / "sweep.json").read_text())
    assert s["metric"] == "pearson" and s["trials"][0]["status"] == "done", s
    assert isinstance(s["trials"][0]["dev_pearson"], float)


def test_a_metric_no_trial_reports_is_named(tiny_setup, tmp_path, capsys):
    from train.runs.sweep import check_metric
    with pytest.raises(SystemExit, match=r"its dev metrics: none \(pass --dev after --\)"):
        check_metric({"best_step": 3}, "accuracy", "lr=1")


def children(pid):
    """The pids whose parent is `pid` (Linux /proc)."""
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(d))
    return out


def alive(pid):
    """Running, not a zombie: a container's pid 1 may never reap an orphan's exit."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_sweep_takes_its_running_trial_with_it(tiny_setup, tmp_path):
    """kill -9 of the sweep left its trial training, and the rerun recorded that trial as failed
    on the lock the orphan still held."""
    import signal
    import subprocess
    import time
    from train.command import minibert_argv
    args = sweep_args(tiny_setup, tmp_path / "sweep", ["lr=1e-3"])
    args[args.index("--max-steps") + 1] = "1000000"  # trains until killed
    sweep = subprocess.Popen(minibert_argv() + args, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    metrics = tmp_path / "sweep" / "lr=1e-3" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and children(sweep.pid)) and time.time() < deadline:
        time.sleep(0.2)
    trial = children(sweep.pid)
    assert metrics.exists() and trial, "the trial never started training"
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait()
    deadline = time.time() + 30
    while alive(trial[0]) and time.time() < deadline:
        time.sleep(0.2)
    if alive(trial[0]):
        os.kill(trial[0], signal.SIGKILL)
        pytest.fail("the trial went on training after its sweep was killed")
