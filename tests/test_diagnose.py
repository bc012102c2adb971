"""The run diagnosis (train/runs/diagnose.py) on synthetic learning curves, one per verdict.

Each curve is written as a RUN/metrics.jsonl in the trainer's event format, with the shapes the
rules are meant to catch (and, for healthy, shapes they must not): a curve drawn by hand is the
one reference we have for what "overfitting" looks like. Binary task (chance = ln 2 = 0.693),
1000 dev examples balanced 50/50, 20 train logs and 10 evals over 1000 steps unless stated.
"""

import json
import math
import os

import pytest

from train.cli import main
from train.runs.diagnose import diagnose

STEPS = 1000


def linear_lr(peak, warmup=100, total=STEPS):
    return lambda s: peak * (s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup)))


def write_run(path, train_loss, dev_loss, dev_acc, lr=linear_lr(5e-5), head_lr=None,
              config=None, extra=(), terms=None):
    """train_loss/dev_loss/dev_acc: functions of the step (fraction of the run in [0, 1]);
    terms, if given, the same for the dict logged as train_terms (distillation's parts)."""
    os.makedirs(path, exist_ok=True)
    events = []
    head = head_lr or (lambda s: 20 * lr(s))
    for i in range(1, 21):
        s = i * STEPS // 20
        events.append({"event": "train", "step": s, "epoch": s / 500,
                       "train_loss": train_loss(s / STEPS),
                       "lr": {"head": head(s), "layer.0": lr(s), "embeddings": lr(s)},
                       **({"train_terms": terms(s / STEPS)} if terms else {})})
        if i % 2 == 0:
            acc = dev_acc(s / STEPS)
            ok = round(acc * 500)
            events.append({"event": "eval", "step": s, "epoch": s / 500,
                           "dev": {"loss": dev_loss(s / STEPS), "accuracy": acc,
                                   "confusion_matrix": [[ok, 500 - ok], [500 - ok, ok]]},
                           "lr": {}, "best_step": None})
    events += list(extra)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"metric": "accuracy", "init": "pretrained", **(config or {})}, f)
    return path


def healthy_run(path):
    return write_run(path, lambda x: 0.6 * math.exp(-2 * x) + 0.15,
                     lambda x: 0.45 - 0.1 * x, lambda x: 0.80 + 0.06 * x)


def test_healthy(tmp_path):
    d = diagnose(healthy_run(tmp_path / "run"))
    assert d["verdict"] == "healthy", d
    assert d["also"] == []
    assert "best dev accuracy 0.8600 at step 1000" in d["evidence"][1]


def test_healthy_says_which_way_the_train_loss_went():
    from train.runs.curves import Curves
    from train.runs.diagnose import healthy
    for losses, said in (([0.60, 0.50], "fell"), ([0.60, 0.70], "rose"), ([0.6, 0.6], "stayed")):
        c = Curves(train_steps=[1, 2], train_loss=losses, lr={}, eval_steps=[], dev_loss=[],
                   dev_metric=[], metric="accuracy", mode="max", diverged=None, n_labels=2,
                   majority=None, n_dev=None, config={})
        assert healthy(c).evidence[0].startswith(f"train loss {said} from"), said


def test_a_single_train_log_has_no_trend(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    event = {"event": "train", "step": 8, "epoch": 1.0, "train_loss": 0.5, "lr": {"head": 1e-4}}
    (run / "metrics.jsonl").write_text(json.dumps(event) + "\n")
    d = diagnose(run)
    assert d["verdict"] == "healthy" and d["evidence"] == ["a single train log: loss 0.5000 at "
                                                           "step 8"], d


def test_overfitting_names_the_eval_and_the_gap(tmp_path):
    # dev loss bottoms out at x = 0.3 (the 3rd eval, step 300) and climbs 80%, train loss -> 0
    run = write_run(tmp_path / "run", lambda x: 0.5 * math.exp(-6 * x) + 0.005,
                    lambda x: 0.45 + 1.2 * (x - 0.3) ** 2 if x > 0.3 else 0.6 - 0.5 * x,
                    lambda x: 0.78 if x > 0.3 else 0.7 + 0.2 * x)
    d = diagnose(run)
    assert d["verdict"] == "overfitting", d
    assert "step 300" in d["headline"] and "eval 3" in d["headline"]
    assert "gap" in d["evidence"][1]
    assert any("early stopping would have stopped there" in a for a in d["advice"])
    assert any("dropout or weight decay" in a for a in d["advice"])


def test_small_dev_loss_rise_with_better_accuracy_is_not_overfitting(tmp_path):
    # +8% dev loss at the end while accuracy still climbs: common in fine-tuning, not a verdict
    run = write_run(tmp_path / "run", lambda x: 0.5 - 0.3 * x, lambda x: 0.40 + 0.032 * x,
                    lambda x: 0.80 + 0.05 * x)
    assert diagnose(run)["verdict"] == "healthy"


def test_underfitting_frozen_backbone(tmp_path):
    # a linear probe: loss stuck at ~0.55 nats (80% of chance), barely moving
    run = write_run(tmp_path / "run", lambda x: 0.56 - 0.01 * x, lambda x: 0.56,
                    lambda x: 0.70, config={"freeze_backbone": True})
    d = diagnose(run)
    assert d["verdict"] == "underfitting", d
    assert d["headline"] == "the train loss is high and flat"
    assert any("unfreeze more layers" in a for a in d["advice"])
    assert any("train longer" in a for a in d["advice"])


def test_underfitting_at_chance_with_a_small_lr(tmp_path):
    # random init, sensible lr: no learning, but nothing was forgotten
    run = write_run(tmp_path / "run", lambda x: 0.693, lambda x: 0.693, lambda x: 0.5,
                    config={"init": "random"})
    d = diagnose(run)
    assert d["verdict"] == "underfitting" and "chance" in d["headline"], d


def test_diverging_nonfinite(tmp_path):
    run = write_run(tmp_path / "run", lambda x: 0.5, lambda x: 0.45, lambda x: 0.8,
                    extra=[{"event": "diverged", "step": 1003, "lr": {"head": 0.1},
                            "loss": "nan"}])
    d = diagnose(run)
    assert d["verdict"] == "diverging" and "non-finite at step 1003" in d["headline"], d
    assert any("lower the learning rate" in a for a in d["advice"])


def test_a_non_finite_loss_logged_as_null_reads_as_nan(tmp_path):
    # NaN is written as null (strict JSON); the curves read it back as NaN, not None
    run = write_run(tmp_path / "run", lambda x: float("nan") if x > 0.5 else 0.5,
                    lambda x: float("nan") if x > 0.5 else 0.45, lambda x: 0.5)
    text = open(os.path.join(run, "metrics.jsonl")).read()
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write(text.replace("NaN", "null"))
    assert "NaN" in text  # there was a non-finite value to write as null
    d = diagnose(run)
    assert d["verdict"] == "diverging", d


def test_forgetting_at_lr_1e3(tmp_path):
    # lr 1e-3 on the backbone: learns a little in warm-up, then sits at chance (no NaN)
    run = write_run(tmp_path / "run", lambda x: 0.55 if x < 0.1 else 0.694,
                    lambda x: 0.693, lambda x: 0.5, lr=linear_lr(1e-3))
    d = diagnose(run)
    assert d["verdict"] == "diverging", d
    assert "catastrophic forgetting" in d["headline"] and "went up to" in d["headline"]
    assert any("lower the learning rate" in a for a in d["advice"])


def test_forgetting_without_a_dip_needs_a_high_lr(tmp_path):
    # the same flat-at-chance curve: forgetting with lr 1e-3, underfitting with 2e-5
    flat = (lambda x: 0.694, lambda x: 0.693, lambda x: 0.5)
    high = diagnose(write_run(tmp_path / "high", *flat, lr=linear_lr(1e-3)))
    low = diagnose(write_run(tmp_path / "low", *flat, lr=linear_lr(2e-5)))
    assert high["verdict"] == "diverging" and "stayed at" in high["headline"]
    assert low["verdict"] == "underfitting"


def test_diverging_rising_loss(tmp_path):
    run = write_run(tmp_path / "run", lambda x: 0.3 + 0.6 * max(0.0, x - 0.4),
                    lambda x: 0.4, lambda x: 0.8)
    d = diagnose(run)
    assert d["verdict"] == "diverging" and d["headline"] == "the train loss is rising", d


def test_a_short_log_at_an_epoch_end_is_not_taken_for_a_minimum(tmp_path):
    """A 30-step tagging run logged at steps 15, 19 (the epoch's last 4 steps), 20 (1 step) and
    30: the 4-step log, low by chance, passed for the minimum the loss then 'rose' from, though
    the loss fell from 1.49 to 0.30 and the dev loss reached its lowest at the end."""
    run = tmp_path / "run"
    run.mkdir()
    lr = lambda s: 1e-4 * (30 - s) / 27  # noqa: E731 (warm-up ended at step 3)
    events = [{"event": "train", "step": s, "epoch": s / 19, "train_loss": v,
               "lr": {"head": 10 * lr(s), "layer.0": lr(s)}}
              for s, v in ((15, 1.4901), (19, 0.1406), (20, 0.2801), (30, 0.3013))]
    events[1:1] = [{"event": "eval", "step": 15, "epoch": 15 / 19,
                    "dev": {"loss": 0.2949, "f1": 0.1}, "lr": {}, "best_step": 15}]
    events.append({"event": "eval", "step": 30, "epoch": 30 / 19,
                   "dev": {"loss": 0.2785, "f1": 0.2}, "lr": {}, "best_step": 30})
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "config.json").write_text(json.dumps({"metric": "f1", "init": "pretrained",
                                                 "task": "tokens", "lr": 1e-4}))
    assert diagnose(str(run))["verdict"] != "diverging"
    # a rise is still a rise when short logs sit among the others: 19 steps an epoch, a log
    # every 20 and at each epoch's end, warm-up to step 20
    lr = lambda s: 1e-4 * min(s / 20, 1.0)  # noqa: E731
    events = [{"event": "train", "step": s, "epoch": s / 19, "train_loss": v,
               "lr": {"head": 10 * lr(s), "layer.0": lr(s)}}
              for s, v in ((19, 0.69), (20, 0.60), (38, 0.95), (40, 1.3), (57, 2.1))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert diagnose(str(run))["verdict"] == "diverging"


def test_stalled_when_the_lr_is_tiny(tmp_path):
    # plateau schedule cut the lr to 1e-8 at step 500; nothing improved afterwards
    lr = lambda s: 5e-5 if s < 500 else 1e-8  # noqa: E731
    run = write_run(tmp_path / "run", lambda x: 0.3 - 0.1 * min(x, 0.5),
                    lambda x: 0.40, lambda x: 0.85 if x >= 0.5 else 0.8 + 0.1 * x, lr=lr,
                    head_lr=lr)
    d = diagnose(run)
    assert d["verdict"] == "stalled", d
    assert "from step 500" in d["evidence"][0]


def test_cli_prints_text_and_json(tmp_path, capsys):
    run = healthy_run(tmp_path / "run")
    assert main(["diagnose", str(run)]) == 0
    assert capsys.readouterr().out.startswith("diagnosis: HEALTHY")
    assert main(["diagnose", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "healthy"


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        main(["diagnose", str(tmp_path / "nothing")])


@pytest.mark.parametrize("where", ["config", "task.json"])
def test_a_crf_sentence_loss_is_not_compared_with_chance(tmp_path, where):
    # a CRF's loss is the NLL of a whole sentence: ~5 nats for a well-trained tagger of 10-word
    # sentences is far above ln K per token, yet healthy (dev f1 0.86)
    run = write_run(tmp_path / "run", lambda x: 5 + 5 * math.exp(-3 * x), lambda x: 6 - x,
                    lambda x: 0.80 + 0.06 * x, config={"crf": True} if where == "config" else {})
    if where == "task.json":
        os.makedirs(run / "best")
        with open(run / "best" / "task.json", "w") as f:
            json.dump({"task": "tokens", "labels": ["O", "B-X", "I-X"], "crf": True}, f)
    d = diagnose(run)
    assert d["verdict"] == "healthy", d
    # the same curve from a softmax tagger is indeed far above chance: the rule is still there
    write_run(tmp_path / "softmax", lambda x: 5 + 5 * math.exp(-3 * x), lambda x: 6 - x,
              lambda x: 0.80 + 0.06 * x)
    assert diagnose(tmp_path / "softmax")["verdict"] == "underfitting"


def test_distillation_is_judged_on_its_hard_term(tmp_path):
    # train_loss = 0.5 * hard + 0.5 * soft (soft carries T^2 and can be large): the mix says
    # nothing about chance, the hard term (cross-entropy on the gold labels) does
    def mixed(hard, soft):
        return (lambda x: 0.5 * hard(x) + 0.5 * soft(x),
                lambda x: {"hard": hard(x), "soft": soft(x)})
    loss, terms = mixed(lambda x: 0.6 * math.exp(-2 * x) + 0.15, lambda x: 2.0 - 0.5 * x)
    learned = diagnose(write_run(tmp_path / "learned", loss, lambda x: 0.45 - 0.1 * x,
                                 lambda x: 0.80 + 0.06 * x, terms=terms))
    assert learned["verdict"] == "healthy", learned
    loss, terms = mixed(lambda x: 0.694, lambda x: 0.001)
    stuck = diagnose(write_run(tmp_path / "stuck", loss, lambda x: 0.693, lambda x: 0.5,
                               terms=terms))
    assert stuck["verdict"] == "underfitting" and "0.6940 at the end" in stuck["evidence"][0]


# ------------------------------------------------------------------ plot and report read the same
def test_plot_overlays_runs(tmp_path):
    import matplotlib  # noqa: F401  (test extra: the plot is part of what is tested)
    a, b = healthy_run(tmp_path / "a"), write_run(tmp_path / "b", lambda x: 0.694,
                                                  lambda x: 0.693, lambda x: 0.5)
    out = tmp_path / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a run without evaluations leaves the metric panel empty, and no warning on stderr
    import warnings
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "metrics.jsonl").write_text(json.dumps(
        {"event": "train", "step": 2, "train_loss": 0.6, "lr": {"head": 1e-3}}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["plot", str(lone), "--out", str(tmp_path / "lone.png")]) == 0


def test_plot_names_the_loss_of_each_run_s_task(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    figs = []
    monkeypatch.setattr(Figure, "savefig", lambda self, f, **kw: figs.append(self))
    cls = healthy_run(tmp_path / "cls")
    with open(cls / "config.json", "w") as f:
        json.dump({"task": "classification"}, f)
    reg = healthy_run(tmp_path / "reg")  # its task meta says regression: trained with MSE
    (reg / "best").mkdir()
    (reg / "best" / "task.json").write_text(json.dumps({"task": "regression"}))
    dis = healthy_run(tmp_path / "dis")  # a distilled classifier: the loss mixes the teacher's
    (dis / "config.json").write_text(json.dumps({"task": "classification", "teacher": "t"}))
    for runs, label in (([reg], "mean squared error"), ([cls], "cross-entropy (nats)"),
                        ([cls, reg, cls], "cross-entropy (nats) / mean squared error"),
                        ([dis], "distillation loss")):
        assert main(["plot", *map(str, runs), "--out", str(tmp_path / "c.png")]) == 0
        assert figs[-1].axes[0].get_ylabel() == label


def test_plot_refuses_an_unknown_format_and_writes_atomically(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    run = healthy_run(tmp_path / "a")
    with pytest.raises(SystemExit, match=r"--out .*c\.xyz: not an image format .*\.png"):
        main(["plot", str(run), "--out", str(tmp_path / "c.xyz")])
    assert not (tmp_path / "c.xyz").exists()
    # the format follows the real extension, though the file is written under a temporary name
    assert main(["plot", str(run), "--out", str(tmp_path / "c.svg")]) == 0
    assert (tmp_path / "c.svg").read_text().startswith("<?xml")

    def killed(self, fname, **kw):  # a drawing that dies half-way through its file
        with open(fname, "wb") if isinstance(fname, (str, os.PathLike)) else fname as f:
            f.write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Figure, "savefig", killed)
    assert main(["plot", str(run), "--out", str(tmp_path / "c.svg")]) == 130  # interrupted
    assert (tmp_path / "c.svg").read_text().startswith("<?xml")  # the old plot, whole
    assert sorted(os.listdir(tmp_path)) == ["a", "c.svg"]  # no temporary file left


def test_plot_refuses_a_metric_a_run_does_not_report(tmp_path):
    import matplotlib  # noqa: F401
    a, b = healthy_run(tmp_path / "a"), healthy_run(tmp_path / "reg")
    text = (b / "metrics.jsonl").read_text().replace('"accuracy"', '"pearson"')
    (b / "metrics.jsonl").write_text(text)  # a regression run: no accuracy
    out = tmp_path / "c.png"
    with pytest.raises(SystemExit, match=r"^minibert plot: --metric acuracy: .*a reports no dev "
                                         r"acuracy; its dev metrics: loss, accuracy$"):
        main(["plot", str(a), "--out", str(out), "--metric", "acuracy"])  # a typo
    with pytest.raises(SystemExit, match=r"--metric accuracy: .*reg reports no dev accuracy; "
                                         r"its dev metrics: loss, pearson$"):
        main(["plot", str(a), str(b), "--out", str(out), "--metric", "accuracy"])
    assert not out.exists()
    assert main(["plot", str(a), str(b), "--out", str(out), "--metric", "loss"]) == 0
    # a run without evaluations (no --dev) is drawn beside the others: its loss and lr
    c = healthy_run(tmp_path / "nodev")
    text = "".join(line + "\n" for line in (c / "metrics.jsonl").read_text().splitlines()
                   if '"eval"' not in line)
    (c / "metrics.jsonl").write_text(text)
    assert main(["plot", str(a), str(c), "--out", str(out), "--metric", "accuracy"]) == 0
    with pytest.raises(SystemExit, match="--metric acuracy: no run has dev evaluations"):
        main(["plot", str(c), "--out", str(tmp_path / "d.png"), "--metric", "acuracy"])
    assert not (tmp_path / "d.png").exists()


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match=r"pip install 'minibert\[plot\]'"):
        main(["plot", str(healthy_run(tmp_path / "a")), "--out", str(tmp_path / "x.png")])


def test_lr_groups_with_identical_curves_are_drawn_once():
    from train.runs.plot import lr_curves
    train = [{"step": s, "lr": {"head": 1e-3 * s, "head.no_decay": 1e-3 * s, "layer.0": 1e-5}}
             for s in (1, 2)]
    assert [c[0] for c in lr_curves(train)] == ["head (+1 groups)", "layer.0"]


def test_report_summarises_the_run(tmp_path, capsys):
    run = healthy_run(tmp_path / "run")
    with open(run / "config.json", "w") as f:
        json.dump({"lr": 3e-5, "epochs": 3}, f)  # epochs 3 is the default, lr is not
    with open(run / "results.json", "w") as f:
        json.dump({"best_step": 1000, "train_seconds": 120.0, "examples_per_second": 50.0,
                   "dev": {"accuracy": 0.86, "loss": 0.35}}, f)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "config (non-default): lr=3e-05\n" in out
    assert "head: peak lr 1.00e-03" in out
    assert "dev (best checkpoint): accuracy 0.8600, loss 0.3500" in out
    assert "diagnosis: HEALTHY" in out and "2.0 min training, 50.0 examples/s" in out


def test_report_shows_pretraining_s_valid_scores(tmp_path, capsys):
    run = healthy_run(tmp_path / "run")
    with open(run / "results.json", "w") as f:  # what `minibert pretrain` writes
        json.dump({"steps": 1000, "best_step": 1000, "valid": {
            "mlm_loss": 2.5, "perplexity": 12.18, "mlm_accuracy": 0.51}}, f)
    assert main(["report", str(run)]) == 0
    assert "valid (best checkpoint): mlm_loss 2.5000, perplexity 12.1800, mlm_accuracy 0.5100" \
        in capsys.readouterr().out


def test_report_compares_each_run_kind_with_its_own_defaults(tmp_path, capsys):
    run = healthy_run(tmp_path / "run")  # lr 1e-3 is pretrain's default, alpha 0.5 distill's
    for config, shown in (({"corpus": ["c"], "lr": 1e-3, "mask_prob": 0.15}, "corpus=['c']"),
                          ({"teacher": "t", "alpha": 0.5, "lr": 3e-5}, "teacher=t, lr=3e-05"),
                          ({"out": "/x/runs/finetune", "lr": 2e-4}, "lr=0.0002")):  # out absolute
        (run / "config.json").write_text(json.dumps(config))
        assert main(["report", str(run)]) == 0
        assert f"config (non-default): {shown}\n" in capsys.readouterr().out


def test_report_shows_every_task_s_scores(tmp_path, capsys):
    # regression's and a multi-task run's scores too, the run's --metric first
    run = healthy_run(tmp_path / "run")
    dev = {"combined": 0.85, "loss": 0.35, "polarity/accuracy": 0.86, "polarity/loss": 0.3,
           "polarity/confusion_matrix": [[1, 0], [0, 1]], "score/pearson": 0.84,
           "score/mse": 0.5, "rmse": 0.7, "mse": 0.49}
    for metric, line in (("combined", "combined 0.8500, rmse 0.7000, loss 0.3500, "
                                      "polarity/accuracy 0.8600, score/pearson 0.8400"),
                         ("mse", "mse 0.4900, combined 0.8500, rmse 0.7000, loss 0.3500, "
                                 "polarity/accuracy 0.8600, score/pearson 0.8400")):
        with open(run / "config.json", "w") as f:
            json.dump({"metric": metric}, f)
        with open(run / "results.json", "w") as f:
            json.dump({"best_step": 1000, "dev": dev}, f)
        capsys.readouterr()
        assert main(["report", str(run)]) == 0
        assert f"dev (best checkpoint): {line}\n" in capsys.readouterr().out


def test_partial_forgetting_high_and_flat_at_a_high_lr(tmp_path):
    # stuck at 0.5 nats (72% of chance): damaged by lr 1e-3, merely underfit at 2e-5
    stuck = (lambda x: 0.62 - 0.12 * min(x, 0.3) / 0.3, lambda x: 0.56, lambda x: 0.71)
    high = diagnose(write_run(tmp_path / "high", *stuck, lr=linear_lr(1e-3)))
    low = diagnose(write_run(tmp_path / "low", *stuck, lr=linear_lr(2e-5)))
    assert high["verdict"] == "diverging" and "partial catastrophic forgetting" in high["headline"]
    assert low["verdict"] == "underfitting" and low["headline"] == "the train loss is high and flat"


# ------------------------------------------------------ groups that gradual unfreezing adds
def unfreezing_run(path, stage_lr, lr=1e-4):
    """--unfreeze-every with --stage-lrs 1e-3,STAGE_LR: the head trains alone for the first 5 of
    20 logs, then layer.0 and the embeddings join at the stage's rate, as the trainer logs it."""
    run = write_run(path, lambda x: 0.694, lambda x: 0.693, lambda x: 0.5,
                    lr=linear_lr(stage_lr), head_lr=linear_lr(1e-3),
                    config={"lr": lr, "stage_lrs": [1e-3, stage_lr], "unfreeze_every": 250})
    events = [json.loads(line) for line in open(run / "metrics.jsonl")]
    for e in events:
        if e["event"] == "train" and e["step"] <= 250:
            e["lr"] = {"head": e["lr"]["head"]}
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_groups_unfreezing_adds_mid_run_are_read(tmp_path, capsys, monkeypatch):
    # a backbone unfrozen at 1e-3 (logged peak 7.8e-4 at step 300) sits at chance: forgetting,
    # not "raise the learning rate" of a backbone the rules could not see
    run = unfreezing_run(tmp_path / "run", 1e-3)
    d = diagnose(run)
    assert d["verdict"] == "diverging" and "forgetting" in d["headline"], d
    assert "backbone peak lr 7.78e-04" in d["evidence"][2]
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "parameter groups (3):\n  head: peak lr 1.00e-03\n" \
           "  layer.0, embeddings: peak lr 7.78e-04\n" in out
    from matplotlib.figure import Figure
    figs = []
    monkeypatch.setattr(Figure, "savefig", lambda self, f, **kw: figs.append(self))
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    lines = {ln.get_label(): ln for ln in figs[-1].axes[2].get_lines()}
    assert list(lines) == ["run head", "run layer.0 (+1 groups)"]
    assert list(lines["run layer.0 (+1 groups)"].get_xdata()) == list(range(300, 1001, 50))


def test_stage_lrs_not_lr_are_the_backbone_s_rate(tmp_path):
    # --lr 1e-3 is no group's base lr under --stage-lrs 1e-3,2e-5: the backbone trained at 2e-5
    d = diagnose(unfreezing_run(tmp_path / "run", 2e-5, lr=1e-3))
    assert d["verdict"] == "underfitting", d


def test_underfitting_says_whether_the_loss_fell_or_rose(tmp_path):
    for name, loss, said in (("up", lambda x: 0.68 + 0.02 * x, "rose 1.1%"),
                             ("down", lambda x: 0.70 - 0.02 * x, "fell 1.1%"),
                             ("flat", lambda x: 0.69, "stayed flat")):
        d = diagnose(write_run(tmp_path / name, loss, lambda x: 0.693, lambda x: 0.5,
                               config={"init": "random"}))
        assert d["verdict"] == "underfitting", d
        assert f"train loss {said} over the second half of the run" in d["evidence"], d


@pytest.mark.parametrize("config,lines", [
    ({"lr": 1e-4}, ["head: peak lr 2.00e-03", "layer.0, embeddings: peak lr 1.00e-04"]),
    ({"lr": 1e-4, "lr_encoder": 2e-5}, ["head: peak lr 4.00e-04", "layer.0, embeddings: peak lr "
                                                                  "2.00e-05"])])
def test_report_peak_lr_is_the_one_used_without_warm_up(tmp_path, capsys, config, lines):
    # no warm-up: the peak is step 0, before the first log at step 50 (0.95 of it)
    peak = config.get("lr_encoder", config["lr"])
    run = write_run(tmp_path / "run", lambda x: 0.6 * math.exp(-2 * x) + 0.15,
                    lambda x: 0.45 - 0.1 * x, lambda x: 0.80 + 0.06 * x,
                    lr=lambda s: peak * (1 - s / STEPS), config=config)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "parameter groups (3):\n" + "".join(f"  {x}\n" for x in lines) in out


def test_a_run_logged_only_at_its_last_step_reads_its_configured_lr(tmp_path, capsys):
    # a short run whose one train log is its last step, where linear decay is at 0: the peak
    # is the configured --lr, not 0, and report says the groups' peaks are not in the logs
    run = write_run(tmp_path / "run", lambda x: 0.6 * math.exp(-2 * x) + 0.15,
                    lambda x: 0.45 - 0.1 * x, lambda x: 0.80 + 0.06 * x,
                    lr=lambda s: 1e-4 * (1 - s / STEPS), config={"lr": 1e-4})
    events = [json.loads(line) for line in open(run / "metrics.jsonl")]
    last = [e for e in events if e["event"] == "train"][-1]
    assert set(last["lr"].values()) == {0.0}
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events
                                               if e["event"] != "train" or e is last))
    from train.runs.curves import backbone_peak_lr, load_curves
    assert backbone_peak_lr(load_curves(run)) == 1e-4  # what the lr rules of diagnose read
    assert main(["report", str(run)]) == 0
    assert "head, layer.0, embeddings: peak lr not logged" in capsys.readouterr().out


def test_report_counts_the_task_s_own_metric_as_a_default(tmp_path, capsys):
    run = healthy_run(tmp_path / "run")
    for config, shown in (({"metric": "accuracy", "lr": 3e-5}, "lr=3e-05"),
                          ({"task": "regression", "metric": "pearson"}, "task=regression"),
                          ({"task": "regression", "metric": "rmse"}, "task=regression, "
                                                                     "metric=rmse")):
        (run / "config.json").write_text(json.dumps(config))
        assert main(["report", str(run)]) == 0
        assert f"config (non-default): {shown}\n" in capsys.readouterr().out


def test_the_majority_baseline_is_set_beside_accuracy_only():
    # the majority label's score is an accuracy: "dev loss 0.68 vs majority 0.52" compared nats
    # with a fraction
    from train.runs.curves import Curves, dev_vs_chance
    for metric, shown in (("accuracy", True), ("loss", False), ("macro_f1", False)):
        c = Curves(train_steps=[1], train_loss=[0.6], lr={}, eval_steps=[1], dev_loss=[0.68],
                   dev_metric=[0.68], metric=metric, mode="min" if metric == "loss" else "max",
                   diverged=None, n_labels=2, majority=0.525, n_dev=40, config={})
        assert ("always-the-majority-label 0.5250" in dev_vs_chance(c)) == shown, metric


def test_a_rising_dev_loss_names_what_the_metric_did():
    """'the dev accuracy held' was said of any healthy run whose dev loss rose, even when the
    accuracy fell far beyond its noise (0.80 to 0.56 on 100 dev examples)."""
    from train.runs.curves import Curves
    from train.runs.diagnose import healthy
    for last, held in ((0.79, True), (0.56, False)):
        c = Curves(train_steps=[10, 50, 100], train_loss=[0.3, 0.3, 0.3], lr={},
                   eval_steps=[20, 60, 100], dev_loss=[0.40, 0.50, 0.56],
                   dev_metric=[0.80, 0.70, last], metric="accuracy", mode="max", diverged=None,
                   n_labels=2, majority=None, n_dev=100, config={})
        advice = " ".join(healthy(c).advice)
        assert ("while the dev accuracy held" in advice) == held, advice
        assert ("the dev accuracy went from 0.8000 (best) to 0.5600" in advice) != held, advice


def test_a_damaged_metrics_file_is_named_in_one_line(tmp_path, capsys):
    from train.cli import main
    run = write_run(tmp_path / "run", lambda x: 0.5, lambda x: 0.5, lambda x: 0.8)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("not json\n")
    n = len((run / "metrics.jsonl").read_text().splitlines())
    for command in ("diagnose", "report"):
        assert main([command, str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"minibert {command}: {run}/metrics.jsonl:{n}: not a JSON event")
