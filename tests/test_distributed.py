"""Data-parallel fine-tuning (train/loop/distributed.py), 2 gloo processes on the CPU, against one
process that sees the same global batches:

- after a few steps the 2-process weights equal the 1-process weights (uneven last batch and
  gradient accumulation included), and only rank 0 wrote files;
- a 2-process run killed with SIGKILL resumes with 1 process and with 2, and both end at the
  weights of an uninterrupted 1-process run;
- the pure parts: sharding a global batch, the resume arithmetic of `fit_to_world`, and the
  divergence guard in its deferred (GPU / multi-process) form.

Dropout is 0 everywhere, so that runs with different process counts can agree: with dropout,
each rank draws its own masks and no two world sizes can match.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_accumulation import Data, NaNAt, make_trainer, tiny_model
from tests.tiny import make_checkpoint, make_sentiment
from train.loop.distributed import Dist, fit_to_world
from train.finetune.finetune import cmd_finetune, run_finetune
from train.finetune.config import FinetuneConfig
from train.loop.rundir import read_jsonl
from train.loop.trainer import Diverged

# Two processes sum the same examples' losses in another order (two partial means, then the
# all-reduce), which changes fp32 results by ~1e-7 relative per step; AdamW carries such
# differences along without growing them much over a few dozen steps (seen: < 1e-8). Every step
# moves weights by ~lr (>= 5e-5), so 1e-6 still tells a wrong weighting from round-off.
ATOL = 1e-6

NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--classifier-dropout", "0"]
ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    ckpt = str(make_checkpoint(d / "ckpt"))
    # 61 = 7 x 8 + 5: the last global batch splits 3 + 2, so each rank's share must be weighted
    # by its size; 57 = 7 x 8 + 1: the last one leaves rank 1 without an example
    return ckpt, str(make_sentiment(d / "d61", n_train=61)), str(make_sentiment(d / "d57",
                                                                               n_train=57))


def flags(ckpt, data, out, *extra):
    # fp32 named: the ranks run as subprocesses, where `--precision auto` sees this CPU (bf16
    # where it has bf16 instructions), and the reference runs in this process (fp32: conftest)
    return ["--model", ckpt, "--train", f"{data}/train.jsonl", "--dev", f"{data}/dev.jsonl",
            "--out", str(out), "--threads", "1", "--log-every", "1", "--precision", "fp32",
            *NO_DROPOUT, *extra]


def single(args):
    """One process, in this one (no interpreter start-up): the reference runs."""
    from train.cli import build_parser
    ns = build_parser().parse_args(["finetune", *args])
    ns.argv = ["finetune", *args]
    assert cmd_finetune(ns) in (0, None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_gone(marker, timeout=30):
    """Wait until no process has `marker` on its command line (Linux /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        alive.append(pid)
            except OSError:
                pass
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes still running for {marker}: {alive}")


def weights(run):
    return load_file(os.path.join(run, "state", "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=k)


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


def test_two_processes_equal_one_with_the_same_global_batch(setup, tmp_path):
    ckpt, d61, _ = setup
    # accumulation 2: groups of two global micro-batches of 8, the last group 8 + 5.
    # AdamW's update hardly depends on the gradient's scale; a large epsilon makes it depend on
    # it, so that a wrong overall weight of the ranks' losses would show too.
    common = ["--epochs", "1", "--grad-accum", "2", "--eval-every", "2", "--adam-eps", "1e-3",
              "--lr", "1e-3"]
    single(flags(ckpt, d61, tmp_path / "one", "--batch-size", "8", *common))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "train.cli", "finetune",
           *flags(ckpt, d61, tmp_path / "two", "--batch-size", "4", *common)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "backend gloo" in r.stderr
    assert r.stderr.count("finetune config:") == 1  # rank 1 prints nothing

    one, two = tmp_path / "one", tmp_path / "two"
    assert json.loads((two / "state" / "trainer.json").read_text())["step"] == 4
    assert_same_weights(weights(one), weights(two))
    # the per-rank gradient weights also shape the logged (all-reduced) train loss
    loss = [[e["train_loss"] for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "train"]
            for run in (one, two)]
    assert loss[0] == pytest.approx(loss[1], abs=1e-6)
    # rank 0 alone wrote: the same files as one process, each event once, nothing else
    assert files_under(two) == files_under(one)
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]
    ev = [(e["event"], e["step"]) for e in read_jsonl(two / "metrics.jsonl")]
    assert ev == [(e["event"], e["step"]) for e in read_jsonl(one / "metrics.jsonl")]
    assert len(ev) == len(set(ev)) == 4 + 2  # 4 train logs, evals at steps 2 and 4
    assert json.loads((two / "config.json").read_text())["nproc"] == 2


def test_killed_two_process_run_resumes_with_one_or_two(setup, tmp_path):
    ckpt, _, d57 = setup
    common = ["--epochs", "6", "--eval-every", "1000", "--save-every", "2"]  # 8 steps an epoch
    single(flags(ckpt, d57, tmp_path / "full", "--batch-size", "8", *common))

    killed = tmp_path / "killed"
    # the launcher path: `minibert finetune --nproc 2` re-runs itself under torchrun; its own
    # process group holds torchrun and both ranks, and all of it gets SIGKILL
    p = subprocess.Popen([sys.executable, "-P", "-m", "train.cli", "finetune", "--nproc", "2",
                          *flags(ckpt, d57, killed, "--batch-size", "4", *common)],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    trainer_json = killed / "state" / "trainer.json"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        try:
            if json.loads(trainer_json.read_text())["step"] >= 10:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    wait_gone(str(killed))  # the workers die with torchrun (PR_SET_PDEATHSIG), a moment later
    state = json.loads(trainer_json.read_text())
    assert 10 <= state["step"] < 48 and state["world"] == 2, "the kill should land mid-run"
    # a second copy of the killed run, for the 2 -> 2 resume (a run resumes into its config's out)
    shutil.copytree(killed, tmp_path / "killed2")
    cfg = json.loads((killed / "config.json").read_text())
    (tmp_path / "killed2" / "config.json").write_text(
        json.dumps({**cfg, "out": str(tmp_path / "killed2")}))

    # 2 -> 1: the one process takes the whole global micro-batch of 8
    r = subprocess.run([sys.executable, "-P", "-m", "train.cli", "finetune", "--resume",
                        str(killed)], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) x batch 4 -> 1 x 8" in r.stderr
    assert "dropout masks are drawn afresh" in r.stderr
    assert_same_weights(weights(tmp_path / "full"), weights(killed))

    # 2 -> 2, through the launcher
    r = subprocess.run([sys.executable, "-P", "-m", "train.cli", "finetune", "--resume",
                        str(tmp_path / "killed2"), "--nproc", "2"], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "drawn afresh" not in r.stderr
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "killed2"))
    for run in (killed, tmp_path / "killed2"):
        steps = [e["step"] for e in read_jsonl(run / "metrics.jsonl") if e["event"] == "train"]
        assert steps == list(range(1, 49))  # no event lost or written twice


def test_shard_splits_a_global_batch_among_ranks():
    cpu = torch.device("cpu")
    batch = [10, 11, 12, 13, 14]
    parts = [Dist(r, 2, cpu).shard(batch) for r in range(2)]
    assert parts == [([10, 12, 14], 3), ([11, 13], 2)]
    assert Dist(0, 1, cpu).shard(batch) == (batch, 5)
    # fewer examples than ranks: rank 2 reruns one example with weight 0
    assert [Dist(r, 3, cpu).shard([7, 8]) for r in range(3)] == [([7], 1), ([8], 1), ([7], 0)]


def test_fit_to_world_keeps_the_global_micro_batch(tmp_path):
    cfg = FinetuneConfig(model="m", train="t", batch_size=4, nproc=2, out=str(tmp_path))
    cpu = torch.device("cpu")
    assert fit_to_world(cfg, Dist(0, 1, cpu), resume=True).batch_size == 8
    assert fit_to_world(cfg, Dist(0, 4, cpu), resume=True).batch_size == 2
    with pytest.raises(ValueError, match="cannot share evenly"):
        fit_to_world(cfg, Dist(0, 3, cpu), resume=True)
    fresh = FinetuneConfig(model="m", train="t", batch_size=4, out=str(tmp_path))
    assert fit_to_world(fresh, Dist(0, 2, cpu), resume=False).nproc == 2  # plain torchrun
    with pytest.raises(ValueError, match="--nproc 2, but this job has 1"):
        run_finetune(cfg)  # --nproc without torchrun, called as a library


def test_deferred_divergence_guard_stops_at_the_first_bad_step(tmp_path):
    # the form used on CUDA and with several processes: the loss is not read at every step,
    # yet the run stops naming the step where it first went non-finite, before any save
    model = NaNAt(tiny_model(), k=6)  # one forward per step: NaN from step 5 (0-based count)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = make_trainer(model, Data(4), tmp_path / "run", opt, max_steps=20, eval_every=4,
                           keep=model.model)
    trainer.check_each_loss = False
    trainer.s.log_every = 3  # the check comes at step 6, one step after the bad loss
    with pytest.raises(Diverged, match=r"loss is nan at step 5 \(lr 1.00e-01\)"):
        trainer.fit()
    events = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert events[-1]["event"] == "diverged" and events[-1]["step"] == 5
    assert json.loads((tmp_path / "run" / "state" / "trainer.json").read_text())["step"] == 4


def test_fp16_keeps_its_gradient_scaler_in_the_state(setup, tmp_path, capsys):
    ckpt, d61, _ = setup
    cfg = FinetuneConfig(model=ckpt, train=f"{d61}/train.jsonl", out=str(tmp_path / "r"),
                         batch_size=8, max_steps=3, log_every=1, eval_every=None, threads=1,
                         precision="fp16")
    run_finetune(cfg)
    assert "precision: fp16 autocast, fp32 master weights and gradient scaler" in \
        capsys.readouterr().err
    state = json.loads((tmp_path / "r" / "state" / "trainer.json").read_text())
    # three steps without an overflow: the scaler counted them (it grows after 2000)
    assert state["scaler"]["_growth_tracker"] == 3 and state["scaler"]["scale"] == 2.0 ** 16


def test_an_input_error_under_two_processes_is_one_line(tmp_path):
    """Rank 0 fails inside main_first (reading the corpus, before the others start): it says
    why in one line, the other rank stops quietly, and torchrun's own failure report is left
    out (train/loop/torchrun.py). The exit status is the input error's, 2."""
    ckpt = make_checkpoint(tmp_path / "tiny", mlm=True)
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(b"fine text\ncaf\xe9 au lait\n")
    r = subprocess.run([sys.executable, "-P", "-m", "train.cli", "pretrain", "--config", "tiny",
                        "--tokenizer", str(ckpt), "--corpus", str(corpus), "--out",
                        str(tmp_path / "run"), "--max-len", "32", "--batch-size", "4",
                        "--max-steps", "2", "--threads", "1", "--nproc", "2"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"minibert pretrain: {corpus}:2: not UTF-8" in r.stderr
    for noise in ("Traceback", "ChildFailedError", "rank 1 of 2 failed", "OMP_NUM_THREADS",
                  "failed (exitcode"):
        assert noise not in r.stderr, r.stderr[-3000:]


def two_processes(*args):
    return subprocess.run([sys.executable, "-P", "-m", "train.cli", "finetune", "--nproc", "2",
                           *args], env=ENV, capture_output=True, text=True, timeout=180)


def test_refusals_under_two_processes_are_said_once(setup, tmp_path):
    """Rank 0 alone holds the lock and checks --out: its refusal used to leave rank 1 waiting in
    a collective rank 0 never joined (a gloo traceback). A flag's refusal was said by each rank.
    An effective batch split over the processes was refused, counted for one process."""
    ckpt, d61, _ = setup
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "results.json").write_text("{}")  # a finished run
    for out, extra, said in ((taken, (), f"{taken}/results.json: {taken} holds a run already"),
                             (tmp_path / "neg", ("--lr", "-1"), "--lr -1: must be > 0")):
        r = two_processes(*flags(ckpt, d61, out, "--max-steps", "1", *extra))
        assert r.returncode == 2, r.stderr[-3000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("minibert")]
        assert len(lines) == 1 and said in lines[0], r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "rank 1 of 2 failed" not in r.stderr
    r = two_processes(*flags(ckpt, d61, tmp_path / "eb", "--batch-size", "4", "--grad-accum",
                             "2", "--effective-batch-size", "16", "--max-steps", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((tmp_path / "eb" / "config.json").read_text())
    assert (cfg["nproc"], cfg["batch_size"], cfg["grad_accum"]) == (2, 4, 2)


def test_torchrun_wrapper_exits_as_the_failed_worker_did(monkeypatch, capsys):
    """The worker's own status (2 for an input error, which it has said); a worker killed by a
    signal, which could say nothing, is named in one line, with the shell's 128 + signal."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    import train.loop.torchrun as wrapper

    def failing(code):
        def run(argv):
            raise ChildFailedError("train.cli", {1: ProcessFailure(1, 8678, code, "<N/A>")})
        return run
    monkeypatch.setattr(wrapper, "torchrun", failing(2))
    assert wrapper.main([]) == 2 and capsys.readouterr().err == ""
    monkeypatch.setattr(wrapper, "torchrun", failing(-9))
    assert wrapper.main([]) == 128 + 9
    assert capsys.readouterr().err == "minibert: rank 1 was killed by signal SIGKILL (out of " \
                                      "memory?)\n"
    monkeypatch.setattr(wrapper, "torchrun", lambda argv: None)
    assert wrapper.main([]) == 0
    # rank 1 stopped on the input error first; torchrun then ended rank 0 with SIGTERM in the
    # same second: the status is the input error's, and no signal is reported

    def both(argv):
        failures = {0: ProcessFailure(0, 1, -15, "<N/A>"), 1: ProcessFailure(1, 2, 2, "<N/A>")}
        for f in failures.values():
            f.timestamp = 1796403056
        raise ChildFailedError("train.cli", failures)
    monkeypatch.setattr(wrapper, "torchrun", both)
    assert wrapper.main([]) == 2 and capsys.readouterr().err == ""


def test_a_follower_rank_leaves_with_rank_0s_status():
    """Ranks other than 0 leave a deliberate stop quietly, with the status rank 0 gets from
    train/cli.py; a follower's 1 used to win when both exited in the same second."""
    from minibert.errors import UserError
    from train.loop.distributed import exit_status
    assert [exit_status(e) for e in (UserError("x"), KeyboardInterrupt(), SystemExit("said"),
                                     SystemExit(3), SystemExit(None))] == [2, 130, 1, 3, 0]
