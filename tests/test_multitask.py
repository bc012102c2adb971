"""Multi-task: spec parsing, the three sampling rules, per-head metrics and checkpoint, prediction
from every head or the heads --head names, a frozen head that stays bit-identical, and freezing
everything as an error."""

import json
import os
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from minibert.checkpoint import load_model
from minibert.tokenizer import Tokenizer
from tests.tiny import FILLER, NEGATIVE, POSITIVE, make_checkpoint
from train.finetune.finetune import TASKS, build_model, run_finetune
from train.finetune.config import FinetuneConfig
from train.finetune.predict import pick_heads
from train.tasks.multitask import MultiDataset, parse_specs
from train.cli import main


def make_snippets(path, seed):
    """rt-snippets' shape: text, label (score > 0) and score; a stronger word, a bigger score."""
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)
    for split, n in (("train", 64), ("dev", 32)):
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                pos = rng.random() < 0.5
                i = rng.randrange(5)
                words = rng.sample(FILLER, 3)
                words.insert(1, (POSITIVE if pos else NEGATIVE)[i])
                score = (1 if pos else -1) * (1 + i * 0.5)
                f.write(json.dumps({"text": " ".join(words), "label": int(pos),
                                    "score": score}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("mt")
    return str(make_checkpoint(d / "ckpt")), make_snippets(d / "data", 0)


def cfg_for(setup, out, **kw):
    ckpt, data = setup
    d = dict(model=ckpt, task="multitask", out=str(out), batch_size=8, epochs=3, lr=3e-3,
             lr_head=1e-2, eval_every=None, log_every=50, threads=1,
             tasks=[f"polarity:classification:{data}/{{split}}.jsonl:label_field=label",
                    f"intensity:regression:{data}/{{split}}.jsonl:target_field=score:weight=0.5"
                    ":standardize_targets=true"])
    d.update(kw)
    return FinetuneConfig(**d)


def test_specs_parse_and_bad_specs_say_why(setup, tmp_path):
    specs = parse_specs(cfg_for(setup, "unused"))
    assert [(s.name, s.type, s.weight) for s in specs] == \
        [("polarity", "classification", 1.0), ("intensity", "regression", 0.5)]
    assert specs[1].options == {"target_field": "score", "standardize_targets": True}
    for bad, why in [(["a:classification"], "NAME:TYPE:PATH"),
                     (["a:nope:x"], "unknown task type"),
                     (["a:regression:x:colour=red"], "not a per-task option"),
                     (["a:regression:x:crf=maybe"], "true or false"),
                     (["a:regression:x{split}", "a:regression:y{split}"], "unique"),
                     # dev and test would be the training file: chosen and tested on train
                     (["a:regression:x.jsonl"], "path 'x.jsonl' has no {split}, which becomes"),
                     # set by the multi-task run itself, per head or for the run
                     (["a:regression:x:metric=mse"], "'metric' is not a per-task option"),
                     (["a:regression:x:freeze_head=a"], "'freeze_head' is not a per-task"),
                     (["a:regression:x:weight=heavy"], "weight='heavy' must be a number"),
                     (["a:regression:x:max_length=long"], "max_length='long' must be int"),
                     # a training flag is the run's: accepted per task, it would do nothing
                     (["a:regression:x:lr=1e9"], "'lr' is not a per-task option; those are"),
                     # the flag's choices hold per task too
                     (["a:regression:x:pooling=clss"], "pooling='clss' must be one of cls, mean")]:
        with pytest.raises(ValueError, match=why):
            parse_specs(cfg_for(setup, "unused", tasks=bad))
    for text, why in (("[\"a\"]", "must be a JSON list of objects"),
                      ('[{"name": "a",', "not valid JSON")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=f"^{tmp_path / 'bad.json'}: {why}"):
            parse_specs(cfg_for(setup, "unused", tasks=None, tasks_file=str(tmp_path / "bad.json")))
    f = tmp_path / "tasks.json"
    f.write_text(json.dumps([{"name": "p", "type": "classification", "path": "x/{split}.jsonl",
                              "weight": 2, "label_field": "label"}]))
    (s,) = parse_specs(cfg_for(setup, "unused", tasks=None, tasks_file=str(f)))
    assert (s.name, s.weight, s.options) == ("p", 2.0, {"label_field": "label"})
    # JSON values are read as the flag reads them, not taken as they come
    for extra, why in (({"max_length": 64.5}, "max_length=64.5 must be int"),
                       ({"max_length": [64]}, r"max_length=\[64\] must be int"),
                       ({"pooling": "clss"}, "pooling=.clss. must be one of cls, mean"),
                       ({"crf": "maybe"}, "crf must be true or false")):
        f.write_text(json.dumps([{"name": "p", "type": "tokens", "path": "x", **extra}]))
        with pytest.raises(ValueError, match=f"^{f}\\[0\\]: {why}"):
            parse_specs(cfg_for(setup, "unused", tasks=None, tasks_file=str(f)))
    f.write_text(json.dumps([{"name": "p", "type": "qa", "path": "x{split}", "max_length": 256,
                              "doc_stride": None, "max_answer_len": 20}]))
    (s,) = parse_specs(cfg_for(setup, "unused", tasks=None, tasks_file=str(f)))
    assert s.options == {"max_length": 256, "doc_stride": None, "max_answer_len": 20}
    # name, type and path are strings, not a traceback further on
    for row, why in (({"name": 5, "type": "qa", "path": "x"}, "name=5 must be a non-empty str"),
                     ({"name": "p", "type": "qa", "path": ["x"]}, r"path=\['x'\] must be"),
                     ({"name": "p", "type": "qa", "path": ""}, "path='' must be")):
        f.write_text(json.dumps([row]))
        with pytest.raises(ValueError, match=f"^{f}\\[0\\]: {why}"):
            parse_specs(cfg_for(setup, "unused", tasks=None, tasks_file=str(f)))


def test_tasks_file_paths_are_read_from_its_folder(setup, tmp_path, monkeypatch):
    """The same files whatever the current directory, as on --resume from elsewhere."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "elsewhere").mkdir()
    f = tmp_path / "conf" / "tasks.json"
    f.write_text(json.dumps([{"name": "p", "type": "classification",
                              "path": "../data/{split}.jsonl"},
                             {"name": "q", "type": "regression", "path": "/abs/{split}.jsonl"}]))
    monkeypatch.chdir(tmp_path / "elsewhere")
    p, q = parse_specs(cfg_for(setup, "unused", tasks=None, tasks_file=str(f)))
    assert p.path == str(tmp_path / "conf" / "../data/{split}.jsonl")
    assert q.path == "/abs/{split}.jsonl"


class Part:
    def __init__(self, n, bs):
        self.lengths, self.batch_size = [1] * n, bs

    def batches(self, epoch):
        order = list(range(len(self.lengths)))
        random.Random(epoch).shuffle(order)
        return [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]


def task_of(ds, batch):
    return max(n for n in ds.names if ds.offsets[n] <= batch[0])


def test_sampling_rules():
    parts = {"big": Part(300, 10), "small": Part(30, 10)}  # 30 and 3 batches
    prop = MultiDataset(parts, "proportional", 1.0, 0).batches(0)
    assert Counter(task_of(MultiDataset(parts, "proportional", 1.0, 0), b) for b in prop) == \
        {"big": 30, "small": 3}
    assert sorted(i for b in prop for i in b) == list(range(330))  # each example once
    assert prop == MultiDataset(parts, "proportional", 1.0, 0).batches(0)  # pure function
    rr = MultiDataset(parts, "round-robin", 1.0, 0)
    assert [task_of(rr, b) for b in rr.batches(0)][:6] == ["big", "small"] * 3
    # temperature: p_small = 30^(1/T) / (300^(1/T) + 30^(1/T)), worked out for T = 1
    # (proportional: 30/330), the default T = 2 (sqrt(30) / (sqrt(300) + sqrt(30)) =
    # 1 / (1 + sqrt(10))) and T = 1e6 (uniform). A rule right only at the two ends (say
    # n^(1/T^2): 0.360 at T = 2) misses T = 2 by 16 standard errors.
    default = FinetuneConfig(task="multitask", sampling="temperature").sampling_temperature
    assert default == 2.0
    for T, p_small in ((1.0, 30 / 330), (default, 1 / (1 + 10 ** 0.5)), (1e6, 0.5)):
        ds = MultiDataset(parts, "temperature", T, 0)
        draws = [task_of(ds, b) for e in range(100) for b in ds.batches(e)]
        frac = draws.count("small") / len(draws)
        # each batch's task is an independent draw: 5 standard errors of a binomial share
        assert abs(frac - p_small) < 5 * (p_small * (1 - p_small) / len(draws)) ** 0.5, (T, frac)


def test_default_temperature_reaches_the_sampler(setup):
    ckpt, _ = setup
    cfg = cfg_for(setup, "unused", sampling="temperature")
    task, data = TASKS["multitask"].from_data(cfg, Tokenizer.from_dir(ckpt))
    assert task.meta["sampling_temperature"] == 2.0
    assert {(d.sampling, d.temperature) for d in data.values()} == {("temperature", 2.0)}


def head_params(run):
    return load_file(os.path.join(run, "best", "head.safetensors"))


def test_trains_both_heads_and_predicts_with_every_head(setup, tmp_path):
    res = run_finetune(cfg_for(setup, tmp_path / "r"))
    dev = res["dev"]
    assert dev["polarity/accuracy"] > 0.8 and dev["intensity/pearson"] > 0.7, dev
    assert dev["combined"] == pytest.approx((dev["polarity/accuracy"] +
                                             dev["intensity/pearson"]) / 2)
    keys = set(head_params(tmp_path / "r"))
    assert {"polarity.out.weight", "intensity.out.weight"} <= keys
    out = tmp_path / "pred.jsonl"

    assert main(["predict", "--model", str(tmp_path / "r"), "--text", "the film was superb",
                 "--output", str(out), "--batch-size", "8", "--device", "cpu"]) == 0
    row = json.loads(out.read_text())
    assert row["polarity"]["label"] == "1" and row["intensity"]["score"] > 0, row
    # --head: the named heads alone, with the same answers
    assert main(["predict", "--model", str(tmp_path / "r"), "--text", "the film was superb",
                 "--output", str(out), "--head", "intensity", "--device", "cpu"]) == 0
    alone = json.loads(out.read_text())
    assert set(alone) == {"text", "intensity"} and alone["intensity"] == row["intensity"], alone
    with pytest.raises(SystemExit, match="--head tone: .* no such head; its heads: polarity, "
                                         "intensity"):
        main(["predict", "--model", str(tmp_path / "r"), "--text", "x", "--head", "tone"])


def test_heads_that_read_different_inputs_are_chosen_with_head():
    # A QA head reads 'QUESTION ||| CONTEXT', a pair classifier 'TEXT ||| PAIR', others a text:
    # one --text cannot feed all of them, so predict refuses and --head picks.
    cls = {"task": "classification", "labels": ["0", "1"], "pair_field": None}
    task = TASKS["multitask"]({"task": "multitask", "heads": [
        {"name": "sent", "weight": 1.0, "meta": cls},
        {"name": "ans", "weight": 1.0, "meta": {"task": "qa", "max_length": 64,
                                                "doc_stride": 16}},
        {"name": "nli", "weight": 1.0, "meta": {**cls, "pair_field": "claim"}}]})
    with pytest.raises(SystemExit, match=r"RUN: its heads read different inputs \(sent reads a "
                       r"text; ans reads 'QUESTION \|\|\| CONTEXT'; nli reads 'TEXT \|\|\| "
                       r"PAIR'\); choose .* --head NAME"):
        pick_heads(task, None, "RUN")
    assert list(pick_heads(task, ["ans"], "RUN").tasks) == ["ans"]
    assert list(pick_heads(task, ["sent"], "RUN").tasks) == ["sent"]
    with pytest.raises(SystemExit, match="nli reads 'TEXT"):
        pick_heads(task, ["nli", "sent"], "RUN")
    with pytest.raises(SystemExit, match="--head sent: RUN is a single-task model"):
        pick_heads(TASKS["classification"](cls), ["sent"], "RUN")
    assert pick_heads(TASKS["classification"](cls), None, "RUN").name == "classification"


def test_frozen_head_stays_bit_identical(setup, tmp_path):
    cfg = cfg_for(setup, tmp_path / "r", freeze_head=["polarity"], epochs=1)
    run_finetune(cfg)
    # the same seed builds the same initial head, as run_finetune did
    torch.manual_seed(cfg.seed)
    task, _ = TASKS["multitask"].from_data(cfg, Tokenizer.from_dir(cfg.model))
    torch.manual_seed(cfg.seed)
    init = build_model(cfg, task).head.state_dict()
    after = head_params(tmp_path / "r")
    for k, v in after.items():
        same = torch.equal(v, init[k])
        assert same == k.startswith("polarity."), f"{k}: {'unchanged' if same else 'changed'}"


def test_freezing_everything_is_an_error(setup, tmp_path):
    cfg = cfg_for(setup, tmp_path / "r", freeze_head=["polarity", "intensity"],
                  freeze_backbone=True)
    with pytest.raises(SystemExit, match="every parameter is frozen"):
        run_finetune(cfg)
    with pytest.raises(ValueError, match="no such head"):
        run_finetune(cfg_for(setup, tmp_path / "r2", freeze_head=["nope"]))


def test_init_heads_carries_a_trained_head_that_then_stays_frozen(setup, tmp_path):
    first = tmp_path / "first"
    run_finetune(cfg_for(setup, first))
    trained = head_params(first)
    # continue from the first run's backbone and polarity head; only intensity and the backbone
    # train, and the polarity loss keeps the backbone fitting the frozen head
    best = str(first / "best")
    res = run_finetune(cfg_for(setup, tmp_path / "second", model=best, epochs=1,
                               init_heads=[f"polarity={best}"], freeze_head=["polarity"]))
    after = head_params(tmp_path / "second")
    for k, v in after.items():
        if k.startswith("polarity."):
            assert torch.equal(v, trained[k]), k
    assert res["dev"]["polarity/accuracy"] > 0.8, res["dev"]


def test_init_heads_errors_name_the_problem(setup, tmp_path):
    first = tmp_path / "first"
    run_finetune(cfg_for(setup, first, epochs=1))
    best = str(first / "best")
    with pytest.raises(SystemExit, match="no head 'nope'"):
        run_finetune(cfg_for(setup, tmp_path / "a", init_heads=[f"nope={best}"]))
    with pytest.raises(SystemExit, match="no .*head.safetensors"):
        run_finetune(cfg_for(setup, tmp_path / "b", init_heads=[f"polarity={tmp_path}"]))
    # a head whose outputs would mean something else here: another task type, units, pooling
    data = setup[1]
    for spec, why in ((f"intensity:classification:{data}/{{split}}.jsonl:label_field=label",
                       "task 'regression', here 'classification'"),
                      (f"intensity:regression:{data}/{{split}}.jsonl:target_field=score",
                       "standardized targets, here raw ones"),
                      (f"polarity:classification:{data}/{{split}}.jsonl:pooling=cls",
                       "pooling 'mean', here 'cls'")):
        name = spec.split(":")[0]
        with pytest.raises(SystemExit, match=f"--init-heads {name}=.*: that head was trained "
                                             f"with {why}: its outputs would mean something"):
            run_finetune(cfg_for(setup, tmp_path / "c", tasks=[spec],
                                 init_heads=[f"{name}={best}"]))
    with pytest.raises(ValueError, match="NAME=DIR names heads of --task multitask"):
        FinetuneConfig(model=setup[0], train="x", task="classification",
                       init_heads=[f"polarity={best}"])


def test_a_crf_head_keeps_its_constraints_meaning():
    from train.tasks.task import head_meaning_differs
    crf = {"task": "tokens", "labels": ["O", "B-X"], "crf": True, "bio_constraints": False}
    assert head_meaning_differs(crf, dict(crf)) is None
    assert "bio_constraints False, here True" in head_meaning_differs(
        crf, {**crf, "bio_constraints": True})


def test_init_heads_spec_keeps_a_directory_with_an_equals_sign_whole():
    from train.finetune.config import head_spec
    assert head_spec("polarity=runs/a/best") == ("polarity", "runs/a/best")
    assert head_spec("runs/sweep/lr=1e-3/best") == (None, "runs/sweep/lr=1e-3/best")
    assert head_spec("polarity=runs/sweep/lr=1e-3/best") == ("polarity", "runs/sweep/lr=1e-3/best")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_pooler_trains_when_a_head_reads_it(setup, tmp_path, pooling):
    # the top-level --pooling stays at its default (mean): pooling is chosen per head
    ckpt, data = setup
    cfg = cfg_for(setup, tmp_path / "r", epochs=1, tasks=[
        f"polarity:classification:{data}/{{split}}.jsonl:pooling={pooling}",
        f"intensity:regression:{data}/{{split}}.jsonl:target_field=score"])
    run_finetune(cfg)
    after = load_file(os.path.join(tmp_path, "r", "state", "model.safetensors"))
    before = load_model(ckpt).pooler.weight
    assert torch.equal(after["bert.pooler.weight"], before) == (pooling == "mean")


def test_metric_must_be_one_the_heads_report(setup, tmp_path):
    with pytest.raises(ValueError, match=r"--metric polarity/acc: not a metric of --task "
                                         r"multitask; one of combined, loss, polarity/accuracy"):
        run_finetune(cfg_for(setup, tmp_path / "r", metric="polarity/acc"))
    assert not os.path.exists(tmp_path / "r" / "state")  # refused before any training


def test_a_per_task_max_length_beyond_the_positions_is_refused(setup, tmp_path):
    ckpt, data = setup
    positions = json.loads(open(os.path.join(ckpt, "config.json")).read())[
        "max_position_embeddings"]
    spec = f"p:classification:{data}/{{split}}.jsonl:max_length={positions + 1}"
    with pytest.raises(ValueError, match=f"task p: max_length={positions + 1} is above the "
                                         f"{positions} positions"):
        run_finetune(cfg_for(setup, tmp_path / "r", tasks=[spec]))
    assert not os.path.exists(tmp_path / "r" / "state")


def test_the_data_of_each_task_is_fingerprinted_for_resume(setup, tmp_path):
    """RUN/inputs.json holds the files behind --tasks specs and a --tasks-file, not only the
    tasks file itself: a changed dev file is then refused on --resume, as for one task."""
    from train.loop.inputs import input_files
    from train.loop.launch import absolute_paths
    _, data = setup
    want = {f"{data}/train.jsonl", f"{data}/dev.jsonl"}  # no test.jsonl: skipped
    assert want <= set(input_files(absolute_paths(cfg_for(setup, "unused"))))
    f = tmp_path / "tasks.json"
    f.write_text(json.dumps([{"name": "p", "type": "classification",
                              "path": os.path.relpath(data, tmp_path) + "/{split}.jsonl"}]))
    got = input_files(cfg_for(setup, "unused", tasks=None, tasks_file=str(f)))
    assert {os.path.realpath(p) for p in got} >= {os.path.realpath(p) for p in want} | {
        os.path.realpath(f)}


@pytest.mark.parametrize("flags", [dict(early_stopping_patience=1),
                                   dict(schedule="plateau", warmup_steps=1)])
def test_dev_watching_flags_need_one_head_with_dev_data(setup, tmp_path, flags):
    """A head without a dev file does not stop the run from following the others' dev metric;
    with no dev file at all, the flag is refused, naming --tasks (--dev means nothing here)."""
    import shutil
    _, data = setup
    nodev = tmp_path / "nodev"
    nodev.mkdir()
    shutil.copy(f"{data}/train.jsonl", nodev / "train.jsonl")
    mixed = [f"p:classification:{data}/{{split}}.jsonl", f"q:regression:{nodev}/{{split}}.jsonl"
             ":target_field=score"]
    results = run_finetune(cfg_for(setup, tmp_path / "r", tasks=mixed, max_steps=4,
                                   eval_every=2, **flags))
    assert "p/accuracy" in results["dev"] and "q/mse" not in results["dev"]
    with pytest.raises(ValueError, match=r"follows the dev metric, and no --tasks head has a "
                                         "dev file"):
        run_finetune(cfg_for(setup, tmp_path / "r2", tasks=mixed[1:], **flags))


def test_a_multi_task_run_resumes(setup, tmp_path):
    # its config.json holds "train": null (the data comes from --tasks), which --resume's check
    # of the saved types refused
    run_finetune(cfg_for(setup, tmp_path / "r", max_steps=2))
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"] is None
    assert main(["finetune", "--resume", str(tmp_path / "r")]) == 0
