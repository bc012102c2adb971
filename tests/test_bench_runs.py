"""bench/runs.py: two benches that share a run make it once (OUT.making), and a lock left by a
dead process is taken over."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A bench process whose "run" takes a second and leaves a line in made.txt for each time it ran.
BENCH = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    from bench import runs

    def fake_make(out, args, threads):
        with open(os.path.join({tmp!r}, "made.txt"), "a") as f:
            f.write(out + "\\n")
        time.sleep(1.0)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({{"ok": True}}, f)

    runs.make_one = fake_make
    runs.run_missing([(os.path.join({tmp!r}, "runs", "r1"), ["finetune"])])
""")


def bench(tmp):
    code = BENCH.format(root=ROOT, tmp=str(tmp))
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)


def test_two_benches_make_a_shared_run_once(tmp_path):
    procs = [bench(tmp_path), bench(tmp_path)]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert (tmp_path / "made.txt").read_text().splitlines() == [str(tmp_path / "runs" / "r1")]
    assert any("waiting" in e for e in errs)  # the second one waited instead of making it
    assert not (tmp_path / "runs" / "r1.making").exists()


def test_a_dead_makers_lock_is_taken_over(tmp_path):
    lock = tmp_path / "runs" / "r1.making"
    lock.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (lock / "pid").write_text(str(dead.pid))
    p = bench(tmp_path)
    assert p.wait(timeout=60) == 0, p.stderr.read()
    assert (tmp_path / "made.txt").read_text().splitlines() == [str(tmp_path / "runs" / "r1")]
    assert not lock.exists()
