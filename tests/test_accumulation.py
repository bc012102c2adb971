"""The trainer's batch handling and its guards, on a tiny BERT classifier driven directly:

- gradient accumulation: micro-batches weighted by their share equal one big batch;
- the divergence guard: the first non-finite loss stops the run, names step and lr, and the
  best checkpoint saved before it holds the weights of its step (against a plain SGD loop);
- out of memory mid-run: a clean stop with advice, the checkpoint kept;
- batch planning: --effective-batch-size, the search behind --batch-size auto (the search
  itself; the CUDA probe cannot run here) and its clear error on CPU.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from minibert.config import BertConfig
from minibert.model import BertEncoder, BertForMLM
from train.pretrain.corpus import MLMData
from train.pretrain.masking import IGNORE
from train.pretrain.pretrain import MLMObjective
from tests.tiny import tiny_tokenizer
from train.tasks.classification import ClassificationHead
from train.tasks.tagging import TokenTask
from train.finetune.finetune import run_finetune
from train.finetune.config import FinetuneConfig
from train.runs.memory import largest_fitting, plan_accumulation
from train.loop.rundir import RunDir, read_jsonl
from train.loop.schedules import LambdaSchedule
from train.tasks.task import TaskModel
from train.loop.device import OutOfMemory
from train.loop.trainer import Diverged, LoopSettings, Trainer

N = 8  # training examples


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return TaskModel(BertEncoder(cfg), ClassificationHead(16, 2, "mean", 0.0))


class Data:
    """N examples of different lengths, in a fixed order, cut into batches of `batch_size`."""

    def __init__(self, batch_size):
        g = torch.Generator().manual_seed(1)
        self.lengths = [3 + i for i in range(N)]
        self.ids = [torch.randint(1, 50, (n,), generator=g) for n in self.lengths]
        self.labels = [i % 2 for i in range(N)]
        self.batch_size = batch_size

    def batches(self, epoch):
        return [list(range(s, min(s + self.batch_size, N))) for s in range(0, N, self.batch_size)]

    def collate(self, idx):
        T = max(self.lengths[i] for i in idx)  # padded to the micro-batch's own longest
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :self.lengths[i]] = self.ids[i]
            mask[r, :self.lengths[i]] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                "labels": torch.tensor([self.labels[i] for i in idx])}


def make_trainer(model, data, run_dir, opt, max_steps, grad_accum=1, eval_every=None, keep=None):
    """A Trainer whose best/ holds `keep`'s weights (default: the model's)."""
    keep = keep if keep is not None else model
    settings = LoopSettings(epochs=100, max_steps=max_steps, grad_accum=grad_accum,
                            clip_grad_norm=None, eval_every=eval_every, log_every=1,
                            metric="loss", metric_mode="min", early_stopping_patience=None,
                            save_every=None)
    schedule = LambdaSchedule(opt, lambda step: 1.0)

    def save_best(d):
        save_file({k: v.contiguous() for k, v in keep.state_dict().items()},
                  os.path.join(d, "model.safetensors"))

    run = RunDir(str(run_dir))
    # a dev loss that improves at every eval, so that each eval saves best/
    evaluate = lambda m: {"loss": 1.0 / (1 + len(run.events))}  # noqa: E731
    return Trainer(model, opt, schedule, data, evaluate, run, settings, torch.device("cpu"),
                   save_best=save_best)


def weights_after_one_step(tmp_path, batch_size, accum):
    model = tiny_model()
    # Plain SGD (lr 1): the weight change *is* the gradient. AdamW's first step is close to
    # lr * sign(g) and would hide a wrong scale (summing micro-batch losses instead of
    # averaging them gives the same signs).
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_trainer(model, Data(batch_size), tmp_path / f"b{batch_size}a{accum}", opt, max_steps=1,
                 grad_accum=accum).fit()
    return {k: v - before[k] for k, v in model.state_dict().items()}


@pytest.mark.parametrize("batch_size,accum", [(2, 4), (3, 3)])  # (3, 3): micro-batches 3, 3, 2
def test_accumulation_equals_one_big_batch(tmp_path, batch_size, accum):
    big = weights_after_one_step(tmp_path, 8, 1)
    small = weights_after_one_step(tmp_path, batch_size, accum)
    assert sum(d.abs().sum() for d in big.values()) > 1e-2  # the step did change the weights
    # fp32: the same sums in a different order (and different padding, masked out), ~1e-7
    for k in big:
        torch.testing.assert_close(small[k], big[k], rtol=1e-4, atol=1e-6, msg=k)


class MaskedData(Data):
    """Data's sequences as masked-LM batches: a different number of masked positions in each
    sequence (1 to 8), so that a mean over sequences and a mean over masked tokens differ."""
    count_items = staticmethod(MLMData.count_items)  # what pretraining's data counts

    def collate(self, idx):
        batch = super().collate(idx)
        labels = torch.full_like(batch["input_ids"], IGNORE)
        for r, i in enumerate(idx):
            n = 1 + i % self.lengths[i]
            labels[r, :n] = batch["input_ids"][r, :n]
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": labels}


def mlm_weights_after_one_step(tmp_path, batch_size, accum):
    torch.manual_seed(0)
    model = MLMObjective(BertForMLM(tiny_model().bert.config))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_trainer(model, MaskedData(batch_size), tmp_path / f"m{batch_size}a{accum}", opt,
                 max_steps=1, grad_accum=accum, keep=tiny_model()).fit()  # keep: untied weights
    return {k: v - before[k] for k, v in model.state_dict().items()}


@pytest.mark.parametrize("batch_size,accum", [(2, 4), (3, 3)])
def test_masked_lm_accumulation_equals_one_big_batch(tmp_path, batch_size, accum):
    # masked-LM's loss is a mean over masked tokens: micro-batches weigh by those, not by rows
    big = mlm_weights_after_one_step(tmp_path, 8, 1)
    small = mlm_weights_after_one_step(tmp_path, batch_size, accum)
    assert sum(d.abs().sum() for d in big.values()) > 1e-2
    for k in big:
        torch.testing.assert_close(small[k], big[k], rtol=1e-4, atol=1e-6, msg=k)
    # and the logged train loss is that mean too, as the evaluation's is
    logged = [read_jsonl(tmp_path / f"m{b}a{a}" / "metrics.jsonl")[0]["train_loss"]
              for b, a in ((8, 1), (batch_size, accum))]
    assert logged[1] == pytest.approx(logged[0], rel=1e-6)


def tagger_weights_after_one_step(tmp_path, batch_size, accum, crf, multitask=False):
    # sentences of 1 to 8 words: a mean over words and a mean over sentences differ. multitask:
    # the same tagger as the one head of a multi-task model
    from train.tasks.multitask import MultiDataset, MultiHead
    words = ["good", "film", "bad", "plot", "the", "movie", "was", "very"]
    rows = [(words[:n], ["B-X" if w in ("good", "bad") else "O" for w in words[:n]], f"t:{n}")
            for n in range(1, N + 1)]
    task = TokenTask({"task": "tokens", "labels": ["O", "B-X"], "scheme": "bio", "crf": crf,
                      "bio_constraints": False, "fallback_tag": "O", "max_length": 16})
    data = task._dataset(rows, tiny_tokenizer(), batch_size)
    torch.manual_seed(0)
    bert, head = tiny_model().bert, task.build_head(16, 0.0)
    if multitask:
        data = MultiDataset({"pos": data}, "proportional", 1.0, seed=0)
        head = MultiHead({"pos": head}, {"pos": 1.0})
    model = TaskModel(bert, head)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_trainer(model, data, tmp_path / f"t{crf}{multitask}{batch_size}a{accum}", opt,
                 max_steps=1, grad_accum=accum).fit()
    return {k: v - before[k] for k, v in model.state_dict().items()}


@pytest.mark.parametrize("crf", [False, True])  # a mean over words; over sentences
def test_tagging_accumulation_equals_one_big_batch(tmp_path, crf):
    big = tagger_weights_after_one_step(tmp_path, 8, 1, crf)
    small = tagger_weights_after_one_step(tmp_path, 3, 3, crf)
    assert sum(d.abs().sum() for d in big.values()) > 1e-2
    for k in big:
        torch.testing.assert_close(small[k], big[k], rtol=1e-4, atol=1e-6, msg=k)


def test_multitask_accumulation_weighs_each_task_by_its_own_items(tmp_path):
    # a tagging head in a multi-task model: its micro-batches weigh by words, as alone
    big = tagger_weights_after_one_step(tmp_path, 8, 1, crf=False, multitask=True)
    small = tagger_weights_after_one_step(tmp_path, 3, 3, crf=False, multitask=True)
    assert sum(d.abs().sum() for d in big.values()) > 1e-2
    for k in big:
        torch.testing.assert_close(small[k], big[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_step_of_two_tasks_weighs_tasks_by_examples_and_batches_by_items():
    from train.loop.accumulate import micro_batches
    from train.loop.distributed import single

    class TwoTasks:  # task 0 counts its examples, task 1 words: 10 per example
        def unit_of(self, idx):
            return int(idx[0] >= 100)

        def collate(self, idx):
            return {"idx": idx}

        def count_items(self, batch):
            return len(batch["idx"]) * (10 if batch["idx"][0] >= 100 else 1)

    group = [[0, 1, 2], [100, 101], [3], [102, 103, 104]]  # 4 examples of task 0, 5 of task 1
    shares, total = micro_batches(TwoTasks(), single(torch.device("cpu")), group)
    weights = [items / total for _, items, _ in shares]
    # task 0: 4/9 of the step, split 3:1; task 1: 5/9, split by words 20:30
    assert weights == pytest.approx([4 / 9 * 3 / 4, 5 / 9 * 20 / 50, 4 / 9 * 1 / 4, 5 / 9 * 30 / 50])


def test_the_teachers_cache_keeps_what_a_tagger_counts():
    # distillation wraps the data with the teacher's cached targets: its micro-batches must
    # still weigh by words, as the same data unwrapped does
    from train.distill.teacher import CachedTargets
    words = ["good", "film", "bad", "plot"]
    rows = [(words[:n], ["O"] * n, f"t:{n}") for n in range(1, 5)]
    for crf in (False, True):
        task = TokenTask({"task": "tokens", "labels": ["O", "B-X"], "scheme": "bio", "crf": crf,
                          "bio_constraints": False, "fallback_tag": "O", "max_length": 16})
        ds = task._dataset(rows, tiny_tokenizer(), 2)
        cached = CachedTargets(ds, "tokens", {"targets": None, "offsets": None, "valid": None})
        assert (cached.count_items is None) == crf  # a CRF's loss is per sentence
        if not crf:
            batch = ds.collate([0, 3])
            assert cached.count_items(batch) == ds.count_items(batch) == 5


class NaNAt(torch.nn.Module):
    """Wraps a model; its loss becomes NaN from the `k`-th forward call on."""

    def __init__(self, model, k, error=None):
        super().__init__()
        self.model, self.k, self.calls, self.error = model, k, 0, error

    def forward(self, batch):
        self.calls += 1
        out = self.model(batch)
        if self.calls >= self.k:
            if self.error is not None:
                raise self.error
            out["loss"] = out["loss"] * float("nan")
        return out


def test_divergence_guard_keeps_the_best_checkpoint(tmp_path):
    model = NaNAt(tiny_model(), k=6)  # one forward per step: NaN after 5 good steps
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = make_trainer(model, Data(4), tmp_path / "run", opt, max_steps=10, eval_every=2,
                           keep=model.model)
    with pytest.raises(Diverged, match=r"loss is nan at step 5 \(lr 1.00e-01\).*lower --lr"):
        trainer.fit()
    events = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert events[-1]["event"] == "diverged" and events[-1]["step"] == 5
    # best/ holds the weights of the eval at step 4: those of 4 plain SGD steps written out here
    # (the same batches in the same order: Data has no shuffling), not of step 2 (the eval
    # before), nor anything the NaN step 5 touched
    best = load_file(tmp_path / "run" / "best" / "model.safetensors")
    ref = tiny_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    data = Data(4)
    snapshots = {}
    for step in range(1, 5):
        ref(data.collate(data.batches(0)[(step - 1) % 2]))["loss"].backward()
        ref_opt.step()
        ref_opt.zero_grad()
        snapshots[step] = {k: v.clone() for k, v in ref.state_dict().items()}
    assert best.keys() == snapshots[4].keys()
    # fp32, the same operations in the same order: equal up to rounding. 1e-6 is far below what
    # two steps change (over 1e-3, checked below), so step 2's weights cannot pass for step 4's.
    for k, v in best.items():
        torch.testing.assert_close(v, snapshots[4][k], rtol=0, atol=1e-6, msg=k)
    assert max((snapshots[4][k] - snapshots[2][k]).abs().max() for k in best) > 1e-3
    fresh = tiny_model(seed=123)
    fresh.load_state_dict(best)  # and they load into a fresh model


def test_absurd_learning_rate_stops_with_the_message(tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e30)
    with pytest.raises(Diverged, match="training diverged: loss is (nan|inf)"):
        make_trainer(model, Data(4), tmp_path / "run", opt, max_steps=50, eval_every=1).fit()
    assert os.path.isdir(tmp_path / "run" / "best")


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError(),
    # what torch's CPU allocator raises
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 8589934592 bytes. Error code 12")])
def test_out_of_memory_stops_cleanly(tmp_path, error):
    model = NaNAt(tiny_model(), k=6, error=error)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = make_trainer(model, Data(4), tmp_path / "run", opt, max_steps=10, eval_every=2,
                           keep=model.model)
    with pytest.raises(OutOfMemory, match=r"out of memory in step 6.*--grad-accum.*"
                                          r"keeps the batch.*best model in .*step 4"):
        trainer.fit()
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["event"] == "oom"
    assert os.path.isdir(tmp_path / "run" / "state")
    tiny_model().load_state_dict(load_file(tmp_path / "run" / "best" / "model.safetensors"))


def test_plan_accumulation():
    assert plan_accumulation(64, 32) == (32, 2)
    assert plan_accumulation(32, 32) == (32, 1)
    assert plan_accumulation(48, 32) == (24, 2)  # largest divisor of 48 not above 32
    assert plan_accumulation(7, 4) == (1, 7)  # a prime: only micro-batches of 1 divide it
    assert plan_accumulation(8, 100) == (8, 1)


@pytest.mark.parametrize("threshold", [1, 2, 37, 64, 100, 1000])
def test_largest_fitting_finds_the_threshold(threshold):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= threshold

    assert largest_fitting(fits, limit=100) == min(threshold, 100)
    assert len(calls) <= 2 * 7 + 1  # doubling then bisection: O(log limit) real steps
    assert largest_fitting(lambda n: False, limit=100) == 0


def test_effective_batch_size_config_checks():
    with pytest.raises(ValueError, match="not both"):
        FinetuneConfig(model="m", train="t", batch_size=16, grad_accum=3, effective_batch_size=32)
    FinetuneConfig(model="m", train="t", batch_size=16, grad_accum=2, effective_batch_size=32)
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        FinetuneConfig(model="m", train="t", batch_size="big")


def test_batch_size_auto_needs_cuda(tmp_path):
    cfg = FinetuneConfig(model="m", train="t", batch_size="auto", device="cpu",
                         out=str(tmp_path / "run"))
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        run_finetune(cfg)


def test_effective_batch_size_sets_accumulation_in_a_real_run(tmp_path):
    from tests.tiny import make_checkpoint, make_sentiment
    make_checkpoint(tmp_path / "ckpt")
    make_sentiment(tmp_path / "data")
    cfg = FinetuneConfig(model=str(tmp_path / "ckpt"), train=str(tmp_path / "data/train.jsonl"),
                         dev=str(tmp_path / "data/dev.jsonl"), out=str(tmp_path / "run"),
                         batch_size=12, effective_batch_size=16, max_steps=2, eval_every=2,
                         threads=1)
    run_finetune(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["batch_size"], saved["grad_accum"]) == (8, 2)  # 8 = largest divisor <= 12
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 2
    # the end of every run writes its diagnosis
    assert json.loads((tmp_path / "run" / "diagnosis.json").read_text())["verdict"]


def test_other_runtime_errors_are_not_out_of_memory(tmp_path):
    # a bug stays a bug: only the allocator's message makes a RuntimeError an out-of-memory stop
    model = NaNAt(tiny_model(), k=2, error=RuntimeError("shape mismatch"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = make_trainer(model, Data(4), tmp_path / "run", opt, max_steps=4, eval_every=2,
                           keep=model.model)
    with pytest.raises(RuntimeError, match="shape mismatch") as e:
        trainer.fit()
    assert not isinstance(e.value, OutOfMemory)
