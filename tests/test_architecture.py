"""The shape of the code, and the mechanisms that exist once: the import graph runs one way with
no circles, no source file passes 350 lines, the metric direction is one rule that sweep and
diagnose obey, a run without a dev set keeps and tests its last checkpoint, library calls leave
the global random state alone, and a user's own train.py cannot stand in for minibert's package.
"""

import ast
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from train.cli import main
from train.finetune.config import FinetuneConfig
from train.finetune.finetune import run_finetune
from train.loop.best import better, metric_mode
from train.runs.curves import best_eval, load_curves
from train.runs.diagnose import diagnose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("minibert", "train")
MAX_LINES = 350


def source_modules():
    """{'train.loop.trainer': path, ...} for every .py file of the two packages."""
    mods = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    mods[".".join(rel)] = os.path.join(d, f)
    return mods


def imports_of(path, mods):
    """Project modules imported anywhere in the file (function bodies too): `from a.b import c`
    counts as a.b.c when that is a module, else as a.b."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                     else node.module for a in node.names]
        out.update(n for n in names if n.split(".")[0] in PACKAGES)
    return out


def test_import_graph_runs_one_way_without_circles():
    mods = source_modules()
    graph = {m: imports_of(p, mods) - {m} for m, p in mods.items()}
    upward = [(m, t) for m, ts in graph.items() for t in ts
              if m.startswith("minibert") and t.startswith("train")]
    assert upward == [], f"minibert imports train: {upward}"
    # importlib by string would hide an edge from this walk: there must be none
    hidden = [m for m, p in mods.items() if "import_module(" in open(p, encoding="utf-8").read()
              and not m.startswith("minibert.kernels")]
    assert hidden == [], f"imports by string in {hidden}"

    # a circle is a path back to where it started; depth-first search with colours
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == "open":
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == [], f"import circles: {circles}"


def test_the_import_walk_sees_a_circle_and_an_upward_import(tmp_path):
    # the test above must be able to fail: the same walk on two files that import each other
    (tmp_path / "a.py").write_text("from train.loop import trainer\nimport minibert.model\n")
    mods = {"train.loop.trainer": "", "minibert.model": ""}
    assert imports_of(tmp_path / "a.py", mods) == {"train.loop.trainer", "minibert.model"}
    (tmp_path / "b.py").write_text("def f():\n    from train.cli import main\n")
    assert imports_of(tmp_path / "b.py", {}) == {"train.cli"}  # inside a function too


def test_no_source_file_passes_350_lines():
    long = {os.path.relpath(p, ROOT): n for p in source_modules().values()
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert long == {}


# ------------------------------------------------------------------ metric direction

@pytest.mark.parametrize("metric,mode", [("accuracy", "max"), ("f1", "max"), ("pearson", "max"),
                                         ("loss", "min"), ("mse", "min"), ("rmse", "min"),
                                         ("perplexity", "min"), ("intensity/mse", "min"),
                                         ("polarity/accuracy", "max"), ("combined", "max")])
def test_metric_direction(metric, mode):
    assert metric_mode(metric) == mode
    assert FinetuneConfig(task="regression", metric=metric).metric_mode == mode


def test_missing_values_never_win():
    assert better(0.5, None, "max") and better(0.5, float("nan"), "min")
    assert not better(float("nan"), 0.5, "max") and not better(None, 0.5, "min")
    assert better(0.2, 0.5, "min") and not better(0.5, 0.2, "min")


def test_sweep_ranks_mse_lowest_first(tmp_path, capsys):
    out = tmp_path / "sweep"
    # three finished trials (results.json present: the sweep only reads them)
    for lr, mse in (("1e-4", 0.40), ("2e-4", 0.15), ("3e-4", 0.90)):
        d = out / f"lr={lr}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(
            {"best_step": 10, "train_seconds": 1.0, "dev": {"mse": mse, "loss": mse}}))
    assert main(["sweep", "--grid", "lr=1e-4,2e-4,3e-4", "--metric", "mse", "--out", str(out),
                 "--", "--model", "m", "--task", "regression", "--train", "t.jsonl"]) == 0
    capsys.readouterr()
    s = json.loads((out / "sweep.json").read_text())
    assert [t["name"] for t in s["trials"]] == ["lr=2e-4", "lr=1e-4", "lr=3e-4"]
    assert s["best"]["name"] == "lr=2e-4"


def test_diagnose_reads_a_falling_mse_as_improving(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    events = []
    for i in range(1, 11):
        s = 100 * i
        events.append({"event": "train", "step": s, "train_loss": 0.9 * math.exp(-i / 4) + 0.1,
                       "lr": {"head": 1e-3, "layer.0": 1e-4}})
        mse = 0.8 * math.exp(-i / 3) + 0.2  # falls at every eval: the last is the best
        events.append({"event": "eval", "step": s, "dev": {"loss": mse, "mse": mse,
                                                           "pearson": 1 - mse}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "config.json").write_text(json.dumps({"metric": "mse", "task": "regression"}))
    c = load_curves(str(run))
    assert c.metric == "mse" and c.mode == "min"
    assert best_eval(c) == len(c.eval_steps) - 1
    d = diagnose(str(run))
    assert d["verdict"] == "healthy", d
    assert "best dev mse 0.2285 at step 1000" in " ".join(d["evidence"])
    assert any("still improving" in a for a in d["advice"])


# ------------------------------------------------------------------ runs without a dev set

def test_without_dev_the_last_checkpoint_is_kept_and_tested(tiny_setup, tmp_path, capsys):
    root = tiny_setup
    out = tmp_path / "run"
    cfg = FinetuneConfig(model=str(root / "model"), train=str(root / "train.jsonl"),
                         test=str(root / "test.jsonl"), out=str(out), batch_size=8, max_steps=12,
                         eval_every=4, log_every=4, threads=1, max_length=16)
    results = run_finetune(cfg)
    err = capsys.readouterr().err
    assert "no dev set" in err and "test (last checkpoint, step 12)" in err
    assert results["best_step"] == 12 and results["checkpoint"] == "last (no dev set)"
    # best/ holds the weights of the last step, which state/ also holds
    from safetensors.torch import load_file
    best = load_file(out / "best" / "head.safetensors")
    last = load_file(out / "state" / "model.safetensors")
    assert torch.equal(best["out.weight"], last["head.out.weight"])
    # and metrics.jsonl is strict JSON: no NaN stands in for the missing dev metrics
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text
    events = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
              for line in text.splitlines()]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [4, 8, 12]
    assert results["test"]["accuracy"] == pytest.approx(
        json.loads((out / "results.json").read_text())["test"]["accuracy"])


def test_plateau_or_early_stopping_without_dev_is_refused(tiny_setup):
    with pytest.raises(ValueError, match="--dev"):
        FinetuneConfig(model="m", train="t", schedule="plateau")
    with pytest.raises(ValueError, match="--dev"):
        FinetuneConfig(model="m", train="t", early_stopping_patience=2)


# ------------------------------------------------------------------ no side effects

def test_library_calls_leave_the_global_rng_and_threads_as_they_were(tiny_setup, tmp_path,
                                                                     capsys):
    from train.runs.memory import measure
    from tests.tiny import tiny_config

    root = tiny_setup
    torch.manual_seed(1234)
    before, threads = torch.get_rng_state(), torch.get_num_threads()
    run_finetune(FinetuneConfig(model=str(root / "model"), train=str(root / "train.jsonl"),
                                dev=str(root / "dev.jsonl"), out=str(tmp_path / "r"),
                                batch_size=8, max_steps=3, eval_every=None, seed=7,
                                threads=1 if threads != 1 else 2, max_length=16))
    measure(tiny_config(), 2, 8)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.get_num_threads() == threads


def test_loading_and_building_print_nothing(tiny_setup, capsys):
    import minibert
    from tests.tiny import tiny_config

    root = tiny_setup
    capsys.readouterr()
    minibert.BertEncoder(tiny_config())
    minibert.load_encoder(str(root / "model"))
    minibert.load_mlm(str(root / "model"), allow_missing_head=True)
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------ a train.py in the way

@pytest.fixture
def hostile_cwd(tmp_path):
    """A working directory holding the user's own train.py, which fails loudly on import."""
    d = tmp_path / "work"
    d.mkdir()
    (d / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    return d


def minibert_exe():
    exe = os.path.join(os.path.dirname(sys.executable), "minibert")
    assert os.path.exists(exe), "the minibert console script is installed with the package"
    return exe


def test_sweep_from_a_folder_with_train_py(tiny_setup, hostile_cwd):
    root = tiny_setup
    r = subprocess.run([minibert_exe(), "sweep", "--grid", "lr=1e-3", "--out", "sw", "--",
                        "--model", str(root / "model"), "--train", str(root / "train.jsonl"),
                        "--dev", str(root / "dev.jsonl"), "--max-steps", "2", "--batch-size", "8",
                        "--threads", "1", "--max-length", "16"],
                       cwd=hostile_cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trial = json.loads((hostile_cwd / "sw" / "sweep.json").read_text())["trials"][0]
    assert trial["status"] == "done", trial


def test_nproc_from_a_folder_with_train_py(tiny_setup, hostile_cwd):
    root = tiny_setup
    r = subprocess.run([minibert_exe(), "finetune", "--nproc", "2", "--model", str(root / "model"),
                        "--train", str(root / "train.jsonl"), "--max-steps", "2",
                        "--batch-size", "4", "--threads", "1", "--max-length", "16",
                        "--out", "run"],
                       cwd=hostile_cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads((hostile_cwd / "run" / "config.json").read_text())["nproc"] == 2
    assert (hostile_cwd / "run" / "results.json").exists()
