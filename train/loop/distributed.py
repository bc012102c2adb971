"""Data-parallel training on PyTorch's own engine: torch.distributed and DistributedDataParallel.

minibert builds no distributed machinery of its own. This file holds the few decisions that sit
between torchrun and the generic trainer (train/loop/trainer.py):

- Launching. `torchrun --nproc-per-node N -m train.cli finetune ...` starts N processes, one
  per device, and sets RANK/LOCAL_RANK/WORLD_SIZE; `minibert finetune ... --nproc N` re-runs its
  own command line under `python -m torch.distributed.run --standalone` (`launch`). The backend
  follows the device: NCCL for CUDA, gloo for CPU.
- Data. The global batch order stays what one process would use: `data.batches(epoch)` with the
  global micro-batch (per-process batch x N), a pure function of (seed, epoch). Rank r takes the
  strided slice `batch[r::N]` of each global batch (`shard`); strided rather than contiguous
  because length-grouped batches are sorted, so every rank gets a similar mix of lengths. So a
  run sees the same global batches whatever N is, and the trainer's position (epoch, micro-batch)
  means the same thing for any N: a killed run resumes with the same or another process count.
- Loss weights. DDP averages gradients over ranks; the trainer multiplies each micro-batch loss
  by (its examples / the global group's examples) x N, so that the average is the mean over the
  whole global group, exactly as with one process.
- I/O. Only rank 0 writes: `run_dir` gives other ranks a RunDir(writer=False) that keeps its
  events in memory (so event counts and resume bookkeeping agree) but writes nothing. Evaluation runs on rank 0
  only, on the unwrapped model, and its metrics are broadcast (`on_main`), so that early
  stopping, the plateau schedule and the best step are decided identically everywhere.
- Logs and errors. Ranks other than 0 send their ordinary stderr to /dev/null (N copies of the
  config help nobody); an exception on any rank is printed to the real stderr with its rank
  before the process exits, and torchrun then stops the other ranks.

Known limits: a resume with a different process count continues exactly in data order and
weights-so-far, but dropout cannot be bit-identical (each rank draws its own dropout masks; the
saved RNG state of N ranks does not map onto M). Gradual unfreezing (`--unfreeze-every`) changes
which parameters need gradients mid-run, which DDP cannot follow, so it is refused with N > 1.
"""

import contextlib
import dataclasses
import gc
import os
import subprocess
import sys
import time

import torch
import torch.distributed as tdist

from minibert.errors import INPUT_OS_ERRORS, UserError
from train.command import die_with_parent, minibert_argv
from train.loop.device import OutOfMemory
from train.loop.rundir import RunDir


def launched():
    """True in a process that torchrun started (it sets these before running us)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def other_rank():
    """True in a torchrun worker other than rank 0: its errors are rank 0's too, said once."""
    return launched() and os.environ.get("RANK", "0") != "0"


def launch(argv, nproc):
    """Run `minibert <argv>` in `nproc` processes under torchrun (through train/loop/torchrun.py,
    which cuts its failure report to what the user needs); returns the job's exit code.

    `--nproc` itself is removed from the child command line (torchrun's parser would take it
    for its own --nproc-per-node): a worker reads the process count from WORLD_SIZE.
    `--standalone` makes torchrun pick a free port on this machine."""
    child, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            child.append(a)
    # --no-python: the workers run minibert_argv() as given, with `python -P`, so that a
    # train.py in the working directory cannot stand in for the `train` package
    cmd = [sys.executable, "-P", "-m", "train.loop.torchrun", "--standalone",
           "--nproc-per-node", str(nproc), "--no-python", *minibert_argv(), *child]
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    # one thread per process, torchrun's own default, said here so that it prints no banner
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:  # the job got the same Ctrl-C: let it stop its workers
            continue
    return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's status, not 256 - sig


class Dist:
    """This process's place in the job (rank, world size, device) and the few collectives the
    trainer needs. With world == 1 every method is the identity, so the single-process path
    runs exactly as it did before data parallelism existed."""

    def __init__(self, rank, world, device):
        self.rank, self.world, self.device = rank, world, device
        self.ddp = None  # the DistributedDataParallel wrapper, once `wrap` made one

    @property
    def is_main(self):
        return self.rank == 0

    def seed_per_rank(self, seed):
        """Distinct dropout streams per rank (the same masks on every rank would make N ranks
        worth one); a single process keeps the stream it always had."""
        if self.world > 1:
            torch.manual_seed(seed * 1_000_003 + self.rank)

    # ------------------------------------------------------------------ data
    def shard(self, batch):
        """(this rank's indices, how many of them are real) for one global batch.

        A global batch smaller than the world (the last one of an epoch, say) leaves some ranks
        without examples; such a rank still has to run a forward and backward, or the others
        wait forever for its gradients. It reruns the batch's first example with weight 0.
        A batch that carries more than indices (pretraining's BatchIndices, which seed the
        masking) splits itself through its `part` method."""
        if self.world == 1:
            return batch, len(batch)
        split = batch.part if hasattr(batch, "part") else (lambda r, w: batch[r::w])
        part = split(self.rank, self.world)
        if len(part) == 0:
            return split(0, len(batch)), 0  # the batch's first example, weight 0
        return part, len(part)

    # ------------------------------------------------------------------ model
    def wrap(self, model, find_unused_parameters=False, compile=False):
        """The module the training loop calls: DDP over `model` when world > 1, compiled with
        torch.compile when asked. Evaluation and checkpoints use `model` itself (the same
        parameters), which keeps DDP's hooks out of a forward that rank 0 runs alone."""
        net = model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters: a multitask batch touches one head; DDP must be told, or it
            # waits for gradients that never come. It costs a graph walk per step, so only then.
            self.ddp = net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=find_unused_parameters)
        if compile:
            # compiled outside DDP, as PyTorch recommends: its DDPOptimizer then splits the
            # graph at gradient-bucket boundaries so communication overlaps the backward
            net = torch.compile(net)
        return net

    def no_sync(self, last):
        """Context for one micro-batch's forward and backward: on all but the last micro-batch
        of an accumulation group DDP only accumulates, skipping the all-reduce."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, t):
        """Sum of tensor `t` over ranks, in place and returned. On NCCL the tensor must live on
        the GPU; callers pass device tensors."""
        if self.world > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; small objects only)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def on_main(self, fn):
        """fn() run on rank 0 alone; its (picklable) result is returned on every rank."""
        if self.world == 1:
            return fn()
        box = [fn() if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            tdist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (it may write a cache or a tokenizer), the others after,
        reading what it wrote. If rank 0's block fails, rank 0 reports why and the others stop
        quietly, instead of each dying in a collective that rank 0 never joins."""
        if self.world == 1:
            yield
            return
        if not self.is_main:
            if not self.on_main(lambda: None):  # rank 0's outcome
                raise SystemExit(2)
            yield
            return
        try:
            yield
        except BaseException:
            self.on_main(lambda: False)
            raise
        self.on_main(lambda: True)


def single(device):
    return Dist(0, 1, device)


@contextlib.contextmanager
def session(device):
    """The Dist of this process: a single-process one outside torchrun; inside, the process
    group is created (NCCL on CUDA, gloo on CPU) and torn down at the end.

    On ranks other than 0 ordinary stderr goes to /dev/null for the duration; an error on such
    a rank is printed to the real stderr with the rank, so a crash never goes unexplained."""
    if not launched():
        yield single(device)
        return
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # torchrun died before the request above was in place
        raise SystemExit("minibert: torchrun, which started this process, has exited")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    tdist.init_process_group(backend, rank=rank, world_size=world)
    if rank == 0:
        print(f"distributed: {world} processes, backend {backend}, rank 0 on {device}; "
              "logs and files come from rank 0 only", file=sys.stderr, flush=True)
    # File descriptor 2 itself is pointed at /dev/null, not just sys.stderr: functions that
    # bound sys.stderr as a default argument at import, and C++ warnings, go quiet as well.
    quiet = rank != 0
    if quiet:
        sys.stderr.flush()
        real_fd = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def speak():  # fd 2 back to the real stderr, once
        nonlocal quiet
        if quiet:
            sys.stderr.flush()
            os.dup2(real_fd, 2)
            os.close(real_fd)
            quiet = False

    try:
        yield Dist(rank, world, device)
    except (SystemExit, UserError, KeyboardInterrupt, *INPUT_OS_ERRORS) as e:
        # a deliberate stop (divergence, a data error, Ctrl-C) happens on every rank alike;
        # rank 0 reports it, the others leave with rank 0's status and no second message
        tdist.destroy_process_group()  # now, not in the interpreter's teardown
        if rank != 0:
            # rank 0 exits first, having said why: torchrun stops the job at the first exit
            # and would otherwise end rank 0 (SIGTERM) before its message is out
            time.sleep(2)
            raise SystemExit(exit_status(e)) from None
        raise
    except OutOfMemory as e:  # one rank's own stop, which the others need not share: said here
        speak()
        print(f"minibert: rank {rank} of {world}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except BaseException as e:
        speak()  # the interpreter prints the traceback after this line
        print(f"minibert: rank {rank} of {world} failed: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        raise
    else:
        # Free the DistributedDataParallel wrapper (held in reference cycles) now, while the
        # interpreter and the group are alive: gloo work it still holds, freed only at
        # interpreter exit, can abort the process ("terminate called without an active
        # exception", seen once in CI on a rank that had finished).
        gc.collect()
        tdist.barrier()  # nobody tears down while another rank still finishes its last write
        tdist.destroy_process_group()
    finally:
        speak()


def exit_status(e):
    """The status `minibert` leaves with after `e` (train/cli.py): an input error 2, Ctrl-C 130,
    a SystemExit its code (1 for a message)."""
    if isinstance(e, (UserError, *INPUT_OS_ERRORS)):
        return 2
    if isinstance(e, KeyboardInterrupt):
        return 130
    return e.code if isinstance(e.code, int) else int(e.code is not None)


def run_dir(path, dist):
    """RUN for rank 0 (which creates it); on the other ranks a RunDir that writes nothing."""
    if dist.is_main:
        run = RunDir(path)
        dist.barrier()  # the directory exists before another rank reads it
        return run
    dist.barrier()
    return RunDir(path, writer=False)


def fit_to_world(cfg, dist, resume):
    """`cfg` (a config with `batch_size` per process and `nproc`) for this job's world size.

    A fresh run records the world size in `nproc` (so RUN/config.json says how it ran). A
    resumed run saved by another number of processes keeps its global micro-batch,
    batch_size x nproc: each process now takes global / world examples, so the global batches,
    the data position and the optimizer steps mean what they meant before the kill."""
    if cfg.nproc == dist.world:
        return cfg
    if not resume:
        if cfg.nproc != 1:
            raise ValueError(f"--nproc {cfg.nproc}, but this job has {dist.world} process(es); "
                             "--nproc N launches torchrun itself (leave it out under torchrun)")
        return dataclasses.replace(cfg, nproc=dist.world)
    total = cfg.batch_size * cfg.nproc
    if total % dist.world:
        raise ValueError(f"the run was saved by {cfg.nproc} processes x batch {cfg.batch_size} "
                         f"= {total} examples per micro-batch, which {dist.world} processes "
                         "cannot share evenly; resume with a process count that divides it")
    print(f"resume: {cfg.nproc} process(es) x batch {cfg.batch_size} -> {dist.world} x "
          f"{total // dist.world}: the same {total} examples per global micro-batch",
          file=sys.stderr)
    return dataclasses.replace(cfg, batch_size=total // dist.world, nproc=dist.world)
