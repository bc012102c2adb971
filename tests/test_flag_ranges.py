"""Numeric flags out of their range are refused up front: one line naming the flag and what it
must be, before data or model are read and before --out exists. A value that was accepted before
would have been used as given (a negative clip norm or lr reverses training, a zero stage lr
divides by zero mid-run). Flags that only matter in another setting are said to be ignored at
the start of the run: refused, they would stop a sweep over --schedule and a saved run."""

import dataclasses

import pytest

from tests.tiny import make_checkpoint, make_sentiment
from train.cli import main
from train.finetune.config import FinetuneConfig
from train.pretrain.config import PretrainConfig


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranges")
    make_checkpoint(root / "model")
    make_sentiment(root / "data")
    return root


def refused(argv, capsys):
    """The one line `minibert ARGV` stops with (a command's own stop raises SystemExit)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert isinstance(e.value.code, str), capsys.readouterr().err
    return e.value.code


FINETUNE = [
    # reversed or broken training
    (["--clip-grad-norm=-1"], "--clip-grad-norm -1: must be > 0, or none"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm 0: must be > 0, or none"),
    (["--layer-lr-decay", "-1"], "--layer-lr-decay -1: must be > 0"),
    (["--lr-head=-1e-3"], "--lr-head -0.001: must be > 0, or none"),
    (["--lr-encoder=-1e-4"], "--lr-encoder -0.0001: must be > 0, or none"),
    (["--lr-embeddings", "0"], "--lr-embeddings 0: must be > 0, or none"),
    (["--lr", "0"], "--lr 0: must be > 0"),
    (["--stage-lrs=-1e-3", "--unfreeze-every", "1"], "--stage-lrs -0.001: each must be > 0, or "
                                                     "none"),
    # was a ZeroDivisionError in GradualUnfreezer.update at the first stage change
    (["--stage-lrs", "1e-3,0", "--unfreeze-every", "5", "--unfreeze-unit", "step"],
     "--stage-lrs 0.001,0: each must be > 0, or none"),
    # was rounded to whole epochs: stage 1 never happened
    (["--unfreeze-every", "0.5"], "--unfreeze-every 0.5: must be a whole number of epochs; use "
                                  "--unfreeze-unit step for less"),
    (["--unfreeze-every", "1.5", "--unfreeze-unit", "epoch"],
     "--unfreeze-every 1.5: must be a whole number of epochs; use --unfreeze-unit step for less"),
    (["--unfreeze-every", "0"], "--unfreeze-every 0: must be > 0, or none"),
    # out of range, accepted silently or refused late with torch's names
    (["--dev", "DEV", "--early-stopping-patience", "0"],
     "--early-stopping-patience 0: must be >= 1, or none"),
    (["--freeze-layers", "-1"], "--freeze-layers -1: must be >= 0"),
    (["--warmup-ratio=-0.5"], "--warmup-ratio -0.5: must be in [0, 1]"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio 1.5: must be in [0, 1]"),
    (["--warmup-steps=-5"], "--warmup-steps -5: must be >= 0, or none"),
    (["--dev", "DEV", "--schedule", "plateau", "--plateau-patience=-2"],
     "--plateau-patience -2: must be >= 0"),
    (["--dev", "DEV", "--schedule", "plateau", "--plateau-factor", "1.5"],
     "--plateau-factor 1.5: must be in (0, 1)"),
    (["--weight-decay=-0.5"], "--weight-decay -0.5: must be >= 0"),
    (["--adam-beta1", "1.5"], "--adam-beta1 1.5: must be in [0, 1)"),
    (["--adam-beta2", "1"], "--adam-beta2 1: must be in [0, 1)"),
]


@pytest.mark.parametrize("flags,said", FINETUNE, ids=[" ".join(f) for f, _ in FINETUNE])
def test_finetune_refuses_up_front(root, tmp_path, capsys, flags, said):
    flags = [str(root / "data/dev.jsonl") if f == "DEV" else f for f in flags]
    out = tmp_path / "out"
    argv = ["finetune", "--model", root / "model", "--train", root / "data/train.jsonl",
            "--out", out, "--threads", "1", *flags]
    assert refused(argv, capsys) == f"minibert finetune: {said}"
    assert not out.exists()  # nothing written: refused before the run directory is made


UNUSED = [
    (["--stage-lrs", "1e-3,1e-4"], "--stage-lrs applies with --unfreeze-every only"),
    (["--unfreeze-unit", "step"], "--unfreeze-unit applies with --unfreeze-every only"),
    (["--plateau-factor", "0.3"], "--plateau-factor applies to --schedule plateau only"),
    (["--plateau-min-lr", "1e-6"], "--plateau-min-lr applies to --schedule plateau only"),
    (["--crf"], "--crf applies to --task tokens only"),
    (["--task", "tokens", "--crf", "--standardize-targets"],
     "--standardize-targets applies to --task regression only"),
    (["--doc-stride", "10"], "--doc-stride applies to --task qa only"),
    (["--max-answer-len", "5"], "--max-answer-len applies to --task qa only"),
    (["--task", "tokens", "--text-field", "words"],
     "--text-field applies to --task classification or regression only"),
    (["--task", "tokens", "--label-field", "ner"],
     "--label-field applies to --task classification only"),
    (["--task", "regression", "--label-field", "y"],
     "--label-field applies to --task classification only"),
    (["--task", "qa", "--pooling", "cls"],
     "--pooling applies to --task classification or regression only"),
    (["--tasks", "a:classification:d/{split}.jsonl"], "--tasks applies to --task multitask only"),
    (["--sampling-temperature", "3"], "--sampling-temperature applies to --task multitask only"),
    # the harness gives --train: a multi-task run reads its data from --tasks alone
    (["--task", "multitask", "--tasks", "a:classification:d/{split}.jsonl"],
     "--train applies to a single --task; a multi-task run reads its data from --tasks"),
    # the tagging and SQuAD readers stop at the first bad row
    (["--task", "qa", "--skip-bad-rows"],
     "--skip-bad-rows applies to --task classification or regression only"),
]


@pytest.mark.parametrize("flags,said", UNUSED, ids=[" ".join(f) for f, _ in UNUSED])
def test_a_flag_read_only_in_another_setting_is_named(flags, said):
    from train.cli import build_parser
    from train.command import dataclass_from_args
    from train.finetune.config import unused_flags
    args = build_parser().parse_args(["finetune", "--model", "m", "--train", "t", *flags])
    assert unused_flags(dataclass_from_args(FinetuneConfig, args)) == [said]


def test_a_run_says_what_it_ignores_and_one_saved_with_it_resumes(root, tmp_path, capsys):
    """A sweep over --schedule with a plateau flag in common, or a run saved (by an earlier
    version) with a flag its setting does not read: each runs, and says so at its start."""
    out = tmp_path / "run"
    argv = ["finetune", "--model", root / "model", "--train", root / "data/train.jsonl",
            "--out", out, "--threads", "1", "--max-steps", "4", "--plateau-patience", "3",
            "--save-every", "2"]
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    assert "note: --plateau-patience applies to --schedule plateau only; it is ignored" in \
        capsys.readouterr().err
    (out / "results.json").unlink()  # as if killed after its last save
    assert main(["finetune", "--resume", str(out)]) == 0
    assert "resumed from" in capsys.readouterr().err


def test_the_values_at_the_edges_of_each_range_are_accepted(root):
    ok = dict(model="m", train="t", dev="d", lr=1e-9, lr_head=None, layer_lr_decay=1.2,
              clip_grad_norm=None, weight_decay=0.0, adam_beta1=0.0, warmup_ratio=1.0,
              warmup_steps=0, schedule="plateau", plateau_patience=0, plateau_factor=0.99,
              early_stopping_patience=1, freeze_layers=0, unfreeze_every=2.0,
              stage_lrs=[1e-3, 1e-5])
    FinetuneConfig(**ok)
    FinetuneConfig(**{**ok, "unfreeze_every": 0.5, "unfreeze_unit": "step"})


@pytest.mark.parametrize("flags,said", [
    (["--clip-grad-norm=-1"], "--clip-grad-norm -1: must be > 0, or none"),
    (["--weight-decay=-0.5"], "--weight-decay -0.5: must be >= 0"),
    (["--adam-beta1", "1.5"], "--adam-beta1 1.5: must be in [0, 1)"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio 1.5: must be in [0, 1]"),
    (["--lr=-1e-3"], "--lr -0.001: must be > 0")])
def test_pretrain_shares_the_checks(root, tmp_path, capsys, flags, said):
    out = tmp_path / "p"
    argv = ["pretrain", "--config", "tiny", "--corpus", root / "data/train.jsonl", "--out", out,
            "--threads", "1", *flags]
    assert refused(argv, capsys) == f"minibert pretrain: {said}"
    assert not out.exists()
    PretrainConfig(corpus=["c"], config="tiny", clip_grad_norm=None)  # 'none' stays allowed


def test_memory_refuses_freeze_layers_as_finetune_does(root, capsys):
    argv = ["memory", "--model", root / "model", "--batch-size", "2", "--max-len", "8",
            "--freeze-layers", "-1"]
    assert refused(argv, capsys) == "minibert memory: --freeze-layers -1: must be >= 0"


def test_multitask_task_flags_go_to_the_heads_that_read_them(root, tmp_path, capsys):
    spec = f"a:classification:{root}/data/{{split}}.jsonl"
    base = ["finetune", "--task", "multitask", "--model", root / "model", "--threads", "1",
            "--out", tmp_path / "m"]
    # a spec option its head type does not read is named with the spec
    assert refused(base + ["--tasks", spec + ":crf=true"], capsys) == \
        "minibert finetune: --tasks spec 1: crf applies to type tokens only"
    # a run's flag that no head reads
    assert refused(base + ["--tasks", spec, "--max-answer-len", "5"], capsys) == \
        "minibert finetune: --max-answer-len applies to --task qa only, and no head is of that type"
    # one that some head reads is that head's default; the classification head, which would
    # refuse --standardize-targets, does not get it
    from tests.tiny import tiny_tokenizer
    from train.tasks.multitask import MultiTask
    cfg = FinetuneConfig(model=str(root / "model"), task="multitask", max_length=16,
                         standardize_targets=True, target_field="label",
                         tasks=[spec, f"b:regression:{root}/data/{{split}}.jsonl"])
    task, _ = MultiTask.from_data(cfg, tiny_tokenizer())
    b = task.meta["heads"][1]["meta"]
    assert b["target_field"] == "label" and b["target_std"] != 1.0  # standardized


def test_a_runs_crf_with_bio_constraints_goes_to_its_tagging_heads_only(root, tmp_path):
    """--crf --bio-constraints on a run with a classification head and a tagging head: the
    classification head used to get --bio-constraints without --crf, and refused the run."""
    from tests.test_tagging import make_ner
    from tests.tiny import tiny_tokenizer
    from train.tasks.multitask import MultiTask
    make_ner(tmp_path / "train.jsonl", 16, 0)
    cfg = FinetuneConfig(model=str(root / "model"), task="multitask", max_length=16, crf=True,
                         bio_constraints=True,
                         tasks=[f"a:classification:{root}/data/{{split}}.jsonl",
                                f"b:tokens:{tmp_path}/{{split}}.jsonl",
                                f"c:tokens:{tmp_path}/{{split}}.jsonl:crf=false"])
    task, _ = MultiTask.from_data(cfg, tiny_tokenizer())
    a, b, c = (h["meta"] for h in task.meta["heads"])
    assert b["crf"] and b["bio_constraints"] and "crf" not in a
    assert not c["crf"] and not c.get("bio_constraints")  # its spec turned the CRF off


def test_a_run_saved_with_a_zero_now_refused_still_resumes(tmp_path):
    """0 was accepted for --eval-every and --save-every (never) and --threads (torch's default)
    before it was refused: a run saved with one reads it as the none that means the same."""
    from train.loop.launch import saved_config
    saved = dataclasses.asdict(FinetuneConfig(model="m", train="t"))
    saved.update(eval_every=0, save_every=0, threads=0)
    cfg = saved_config(FinetuneConfig, saved, str(tmp_path), "finetune")
    assert (cfg.eval_every, cfg.save_every, cfg.threads) == (None, None, None)
