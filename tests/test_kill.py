"""kill -9, twenty times: a small fine-tuning run, a small distillation run and a small pretraining
run are each killed with SIGKILL at 20 moments and resumed (`--resume RUN`) after every kill. At
the end each must equal an uninterrupted run bit for bit on the CPU: every weight of best/ and
state/, the distillation's cached teacher outputs, and every logged number of metrics.jsonl
(losses and their parts, learning rates, dev metrics; wall-clock times and speeds aside). After
every kill, every file of the run directory must read back: JSON and JSONL with a strict parser,
safetensors and torch state (weights only).

The moments are chosen three ways, in turn: a random moment inside a training step (the previous
step's save has finished, the next has not begun); the instant a checkpoint write is under way
(a `best.new/` or `state.new/` directory, or a `.tmp` file, exists); and the instant an
evaluation starts (the last event logged is a step that evaluates). Where each kill
landed is counted and printed (pytest -s) for the README. The runs save state at every step
(`--save-every 1`) and log every step, so each resumed process makes progress before the next
kill, and a log interval never straddles a resume.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.tiny import make_checkpoint, make_sentiment, tiny_tokenizer

KILLS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# fields of metrics.jsonl events that measure the machine, not the run
CLOCK = {"time", "examples_per_second", "tokens_per_second", "memory"}
LANDED = {}


def minibert(*args):
    return [sys.executable, "-P", "-m", "train.cli", *map(str, args)]


def events(run):
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f.read().splitlines()]


def read_everything(run):
    """Read every file a reader would: raises if any is damaged."""
    def in_flight(name):
        return name.endswith((".new", ".tmp")) or name.startswith(".")
    for name in os.listdir(run):
        p = os.path.join(run, name)
        if in_flight(name) or name.endswith(".old") and os.path.exists(p[:-4]):
            continue
        if name.endswith(".json"):
            json.loads(open(p, encoding="utf-8").read(),
                       parse_constant=lambda c: pytest.fail(f"{p}: {c}"))
        elif name == "metrics.jsonl":
            events(run)
        elif name.endswith(".safetensors"):  # distill's teacher_logits.safetensors
            load_file(p)
        elif os.path.isdir(p):
            for f in os.listdir(p):
                q = os.path.join(p, f)
                if in_flight(f):
                    continue
                if f.endswith(".safetensors"):
                    with safe_open(q, framework="pt") as st:
                        [st.get_tensor(k) for k in st.keys()]
                elif f.endswith(".pt"):
                    torch.load(q, weights_only=True)
                elif f.endswith(".json"):
                    json.loads(open(q, encoding="utf-8").read())


def in_checkpoint_write(run):
    for dirpath, dirs, files in os.walk(run):
        if any(d.endswith(".new") for d in dirs) or any(f.endswith(".tmp") for f in files):
            return True
    return False


def saved_step(run):
    try:
        with open(os.path.join(run, "state", "trainer.json"), encoding="utf-8") as f:
            return json.load(f)["step"]
    except (OSError, ValueError, KeyError):
        return None


def last_event(run):
    try:
        with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
            lines = f.read().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def campaign(fresh, run, eval_every, seed):
    """Start `fresh`, kill it KILLS times at chosen moments, resume after each; return where the
    kills landed."""
    rng = random.Random(seed)
    landed = Counter()
    for k in range(KILLS + 1):
        has_state = os.path.isdir(os.path.join(run, "state")) or \
            os.path.isdir(os.path.join(run, "state.old"))
        cmd = minibert(fresh[4], "--resume", run) if has_state else fresh  # fresh[4]: the command
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                             text=True)
        if k == KILLS:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
            return landed
        start = (last_event(run) or {}).get("step", 0) if has_state else 0
        mode = k % 3
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline:
            e = last_event(run)
            moved = e is not None and e.get("step", 0) > start
            if mode == 0 and moved and saved_step(run) == e["step"] and \
                    not in_checkpoint_write(run):
                time.sleep(rng.uniform(0.0, 0.02))  # somewhere in the forward or backward
                break
            if mode == 1 and moved and in_checkpoint_write(run):
                break
            if mode == 2 and moved and e["event"] == "train" and e["step"] % eval_every == 0:
                break
            time.sleep(0.001)
        assert p.poll() is None, f"the run ended before kill {k + 1}: {p.stderr.read()}"
        writing = in_checkpoint_write(run)
        e = last_event(run)
        evaluating = not writing and e is not None and e["event"] == "train" and \
            e["step"] % eval_every == 0
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        landed["checkpoint write" if writing else "evaluation" if evaluating else "step"] += 1
        read_everything(run)
    return landed


def same_run(a, b):
    for sub in ("best", "state", "."):
        for f in sorted(os.listdir(os.path.join(a, sub))):
            if f.endswith(".safetensors"):
                x, y = load_file(os.path.join(a, sub, f)), load_file(os.path.join(b, sub, f))
                assert x.keys() == y.keys()
                for k in x:
                    assert torch.equal(x[k], y[k]), f"{sub}/{f}: {k} differs"
    strip = [[{k: v for k, v in e.items() if k not in CLOCK} for e in events(r)] for r in (a, b)]
    assert strip[0] == strip[1]


def survives(name, fresh, tmp_path, seed):
    """An uninterrupted run, then the campaign (evaluations every 3 steps), then the comparison;
    every kind of moment must have been hit at least once."""
    ref = tmp_path / "reference"
    subprocess.run(fresh(ref), check=True, env=ENV, capture_output=True)
    LANDED[name] = campaign(fresh(tmp_path / "killed"), str(tmp_path / "killed"), 3, seed)
    same_run(ref, tmp_path / "killed")
    assert min(LANDED[name][w] for w in ("step", "evaluation", "checkpoint write")) >= 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    make_checkpoint(root / "model")
    make_sentiment(root / "data", n_train=240, n_dev=400, n_test=8)
    return root


def test_finetune_survives_twenty_kills(tiny, tmp_path):
    def fresh(out):
        return minibert("finetune", "--model", tiny / "model", "--train",
                        tiny / "data/train.jsonl", "--dev", tiny / "data/dev.jsonl",
                        "--out", out, "--batch-size", "8", "--eval-batch-size", "8",
                        "--max-steps", "40", "--eval-every", "3", "--log-every", "1",
                        "--save-every", "1", "--threads", "1", "--max-length", "16",
                        "--hidden-dropout", "0.1")
    survives("finetune", fresh, tmp_path, seed=1)


def test_distill_survives_twenty_kills(tiny, tmp_path):
    # the teacher: a short finetune run of the tiny 2-block model; the student keeps block 1
    subprocess.run(minibert("finetune", "--model", tiny / "model", "--train",
                            tiny / "data/train.jsonl", "--out", tmp_path / "teacher",
                            "--batch-size", "8", "--max-steps", "10", "--threads", "1",
                            "--max-length", "16"), check=True, env=ENV, capture_output=True)

    def fresh(out):
        return minibert("distill", "--teacher", tmp_path / "teacher", "--student", "layers=1",
                        "--train", tiny / "data/train.jsonl", "--dev", tiny / "data/dev.jsonl",
                        "--out", out, "--batch-size", "8", "--eval-batch-size", "8",
                        "--max-steps", "40", "--eval-every", "3", "--log-every", "1",
                        "--save-every", "1", "--threads", "1", "--hidden-dropout", "0.1")
    survives("distill", fresh, tmp_path, seed=3)


def test_pretraining_survives_twenty_kills(tiny, tmp_path):
    tiny_tokenizer().save(str(tmp_path / "tok"))
    rng = random.Random(0)
    words = ["good", "bad", "the", "movie", "was", "a", "plot", "and", "very", "film"]
    for name, n in (("corpus.txt", 300), ("valid.txt", 60)):
        (tmp_path / name).write_text("".join(
            " ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + "\n"
            for _ in range(n)))
    cfg = {"vocab_size": 27, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    def fresh(out):
        return minibert("pretrain", "--config", tmp_path / "config.json", "--tokenizer",
                        tmp_path / "tok", "--corpus", tmp_path / "corpus.txt", "--valid",
                        tmp_path / "valid.txt", "--cache-dir", tmp_path / "cache", "--out", out,
                        "--max-len", "32", "--batch-size", "8", "--max-steps", "40",
                        "--eval-every", "3", "--log-every", "1", "--save-every", "1",
                        "--threads", "1")
    survives("pretrain", fresh, tmp_path, seed=2)


def test_report(capsys):
    with capsys.disabled():
        for name, c in LANDED.items():
            print(f"\nkill -9: {name}: {sum(c.values())} kills survived ({dict(c)}); resumed "
                  "run bit-identical to an uninterrupted one; every file readable after each")
