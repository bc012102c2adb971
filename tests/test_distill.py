"""Distillation: the loss against a hand computation, the layers= student bit for bit, end to end
for classification, tagging (with a CRF) and regression with the cached teacher outputs checked
against the teacher run alone, the hidden-state and attention losses, and the refusals. All on
tiny models built here; the kill -9 resume of a distillation run is in tests/test_kill.py."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from minibert.model import BertEncoder
from minibert.tokenizer import Tokenizer
from tests.tiny import FILLER, NEGATIVE, POSITIVE, make_checkpoint, make_sentiment, tiny_config
from train.cli import main
from train.distill.config import DistillConfig
from train.distill.distill import run_distill
from train.distill.loss import attention_log_probs, soft_kl
from train.distill.model import DistillModel
from train.distill.student import build_student, layers_student
from train.distill.teacher import CachedTargets, retokenized, teacher_pass
from train.finetune.config import FinetuneConfig
from train.finetune.finetune import load_task_model, run_finetune
from train.loop.rundir import read_jsonl
from train.tasks.classification import ClassificationHead, ClassificationTask
from train.tasks.regression import RegressionHead
from train.tasks.task import TaskModel

# float32 arithmetic against python's float64: a few ulps of numbers of size ~1
REL = 1e-6


# ------------------------------------------------------------------ the loss, by hand

def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


class Given(nn.Module):
    """An encoder whose output is given: (B, 1, C). With mean pooling over one token and an
    identity head, the student's logits are exactly these numbers."""

    def __init__(self, h):
        super().__init__()
        self.h = h

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.h


def forward(head, h, kind, alpha, T, labels, teacher):
    model = DistillModel(Given(h), head, kind, alpha, T).train()
    B = h.size(0)
    batch = {"input_ids": torch.zeros(B, 1, dtype=torch.long),
             "attention_mask": torch.ones(B, 1, dtype=torch.long),
             "token_type_ids": torch.zeros(B, 1, dtype=torch.long),
             "labels": labels, "teacher_targets": teacher}
    return model(batch)


def test_classification_loss_is_hintons_formula():
    s = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.2]]  # student logits
    t = [[2.0, 0.0, 1.0], [0.0, 0.5, 3.0]]  # teacher logits
    y = [1, 2]
    head = ClassificationHead(3, 3, "mean", 0.0)
    with torch.no_grad():
        head.out.weight.copy_(torch.eye(3))
        head.out.bias.zero_()

    def by_hand(alpha, T):
        hard = sum(-math.log(softmax(si)[yi]) for si, yi in zip(s, y)) / 2
        soft = T * T * sum(kl(softmax([v / T for v in ti]), softmax([v / T for v in si]))
                           for si, ti in zip(s, t)) / 2
        return alpha * hard + (1 - alpha) * soft, hard, soft

    for alpha, T in ((0.3, 2.0), (0.0, 4.0), (1.0, 2.0), (0.5, 1.0)):
        out = forward(head, torch.tensor(s).unsqueeze(1), "classification", alpha, T,
                      torch.tensor(y), torch.tensor(t))
        want, hard, soft = by_hand(alpha, T)
        assert out["loss"].item() == pytest.approx(want, rel=REL), (alpha, T)
        assert out["terms"]["hard"].item() == pytest.approx(hard, rel=REL)
        assert out["terms"]["soft"].item() == pytest.approx(soft, rel=REL)
    # alpha = 1 is fine-tuning: the cross-entropy alone, whatever the teacher says
    out = forward(head, torch.tensor(s).unsqueeze(1), "classification", 1.0, 3.0,
                  torch.tensor(y), torch.tensor(t) * 10)
    assert out["loss"].item() == pytest.approx(
        (-math.log(softmax(s[0])[1]) - math.log(softmax(s[1])[2])) / 2, rel=REL)


def test_regression_soft_term_is_the_mse_to_the_teacher_without_temperature():
    p, y, t = [0.5, -1.0, 2.0], [1.0, -2.0, 2.5], [0.0, -0.5, 1.0]
    head = RegressionHead(2, "mean", 0.0)
    with torch.no_grad():
        head.out.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.out.bias.zero_()
    h = torch.tensor([[v, 7.0] for v in p]).unsqueeze(1)  # (B, 1, 2): the prediction is h[..., 0]
    for alpha in (0.25, 0.0, 1.0):
        want = alpha * sum((a - b) ** 2 for a, b in zip(p, y)) / 3 + \
            (1 - alpha) * sum((a - b) ** 2 for a, b in zip(p, t)) / 3
        for T in (1.0, 5.0):  # no temperature in regression
            out = forward(head, h, "regression", alpha, T, torch.tensor(y), torch.tensor(t))
            assert out["loss"].item() == pytest.approx(want, rel=REL), (alpha, T)


def test_tagging_kl_counts_only_the_masked_in_words():
    s = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[2.0, 2.0], [5.0, -5.0]]])  # (B=2, W=2, K=2)
    t = torch.tensor([[[0.0, 1.0], [9.0, 9.0]], [[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False], [True, False]])  # one word each, the other padding
    T = 2.0
    want = T * T * (kl(softmax([0.0, 0.5]), softmax([0.5, 0.0]))
                    + kl(softmax([0.5, 0.0]), softmax([1.0, 1.0]))) / 2
    assert soft_kl(s, t, T, mask).item() == pytest.approx(want, rel=REL)


def test_attention_from_qkv_is_what_the_layer_computes():
    # exp(attention_log_probs) @ v through the layer's own projection gives the layer's output,
    # at every real query: the split of qkv, the scale and the key mask are the model's
    torch.manual_seed(0)
    attn = BertEncoder(tiny_config(attention="eager")).blocks[-1].attn.eval()
    B, T = 3, 7
    x = torch.randn(B, T, 32)
    mask = torch.arange(T) < torch.tensor([[7], [4], [1]])  # (B, T): ragged rows
    qkv = attn.qkv(x)
    logp = attention_log_probs(qkv, attn.nh, attn.hs, mask)  # (B, nh, T, T)
    v = qkv.split(attn.nh * attn.hs, -1)[2].view(B, T, attn.nh, attn.hs).transpose(1, 2)
    y = attn.proj((logp.exp() @ v).transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(y[mask], attn(x, mask)[mask], rtol=0, atol=1e-6)
    # under the run's bf16 autocast the scores stay fp32: the KL term is a small difference of
    # log-probabilities that bf16's 8 bits would round away
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = attention_log_probs(qkv, attn.nh, attn.hs, mask)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, logp, rtol=0, atol=0)


# ------------------------------------------------------------------ teachers

def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_tagging(d, seed=0):
    """JSONL tokens/tags: B-POS or B-NEG on the sentiment word, O elsewhere; a third of the
    sentiment words carry a plural 's', two pieces (good ##s)."""
    rng = random.Random(seed)
    for split, n in (("train", 48), ("dev", 16), ("test", 16)):
        rows = []
        for _ in range(n):
            words = rng.sample(FILLER, rng.randint(2, 5))
            pos = rng.random() < 0.5
            w = rng.choice(POSITIVE if pos else NEGATIVE)
            k = rng.randint(0, len(words))
            words.insert(k, w + "s" if rng.random() < 0.33 else w)
            rows.append({"tokens": words, "tags": ["O"] * k + ["B-POS" if pos else "B-NEG"]
                         + ["O"] * (len(words) - k - 1)})
        write_rows(d / f"{split}.jsonl", rows)


def make_scores(d, seed=0):
    """JSONL text/score: +1 with a positive word, -1 with a negative one, plus noise."""
    rng = random.Random(seed)
    for split, n in (("train", 48), ("dev", 16), ("test", 16)):
        rows = []
        for _ in range(n):
            pos = rng.random() < 0.5
            words = rng.sample(FILLER, rng.randint(2, 5)) + [rng.choice(POSITIVE if pos
                                                                        else NEGATIVE)]
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "score": (1 if pos else -1) + rng.uniform(-.3, .3)})
        write_rows(d / f"{split}.jsonl", rows)


TASK_FLAGS = {"classification": {}, "tokens": {"crf": True},
              "regression": {"standardize_targets": True}}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    make_checkpoint(d / "ckpt", num_hidden_layers=3)  # a 3-block teacher for layers=0,2
    make_sentiment(d / "classification", n_train=48, n_dev=16, n_test=16)
    (d / "tokens").mkdir()
    make_tagging(d / "tokens")
    (d / "regression").mkdir()
    make_scores(d / "regression")
    return d


TEACHERS = {}


def teacher(root, task):
    """A finished finetune run for `task` (made once per module)."""
    if task not in TEACHERS:
        data = root / task
        run_finetune(FinetuneConfig(model=str(root / "ckpt"), task=task,
                                    train=str(data / "train.jsonl"), dev=str(data / "dev.jsonl"),
                                    out=str(root / f"teacher-{task}"), batch_size=8, epochs=3,
                                    lr=3e-3, lr_head=3e-3, eval_every=None, log_every=6,
                                    threads=1, max_length=16, **TASK_FLAGS[task]))
        TEACHERS[task] = str(root / f"teacher-{task}")
    return TEACHERS[task]


def distill_cfg(root, task, out, **kw):
    data = root / task
    d = dict(teacher=teacher(root, task), student="layers=0,2", train=str(data / "train.jsonl"),
             dev=str(data / "dev.jsonl"), test=str(data / "test.jsonl"), out=str(out),
             batch_size=8, epochs=2, eval_every=None, log_every=1, threads=1)
    d.update(kw)
    return DistillConfig(**d)


# ------------------------------------------------------------------ the layers= student

def test_layers_student_is_the_teachers_blocks_bit_for_bit(root):
    cfg = distill_cfg(root, "classification", "unused")
    t, task = load_task_model(f"{cfg.teacher}/best", torch.device("cpu"))
    student = build_student(cfg, task, t, Tokenizer.from_dir(cfg.model))
    assert student.bert.config.num_hidden_layers == 2
    want = {"embeddings": t.bert.embeddings, "pooler": t.bert.pooler, "blocks.0": t.bert.blocks[0],
            "blocks.1": t.bert.blocks[2]}
    have = {"embeddings": student.bert.embeddings, "pooler": student.bert.pooler,
            "blocks.0": student.bert.blocks[0], "blocks.1": student.bert.blocks[1]}
    for name, module in want.items():
        a, b = module.state_dict(), have[name].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k}"
    for k, v in t.head.state_dict().items():  # the head is the teacher's too (student.py)
        assert torch.equal(v, student.head.state_dict()[k]), k


def test_layers_student_of_a_pruned_teacher_keeps_each_blocks_heads_and_width():
    # per-layer fields (heads pruned, MLP width) follow their blocks to the new numbering
    torch.manual_seed(0)
    bert = BertEncoder(tiny_config(num_hidden_layers=3, pruned_heads={1: [0], 2: [1]},
                                   intermediate_sizes=[64, 48, 40]))
    task = ClassificationTask({"task": "classification", "labels": ["0", "1"], "pooling": "cls",
                               "max_length": 16, "text_field": "text", "pair_field": None})
    t = TaskModel(bert, task.build_head(32, 0.1))
    flags = SimpleNamespace(attention="eager", hidden_dropout=None, attention_dropout=None,
                            classifier_dropout=None)
    student = layers_student(t, [0, 2], flags, task).bert
    assert student.config.pruned_heads == {1: [1]} and student.config.intermediate_sizes == [64, 40]
    assert student.blocks[1].attn.nh == 1 and student.config.attention == "eager"
    for k, v in bert.blocks[2].state_dict().items():
        assert torch.equal(v, student.blocks[1].state_dict()[k]), k


@pytest.mark.parametrize("spec,says", [("layers=2,1", "strictly increasing"),
                                       ("layers=9", "the teacher has 3 blocks"),
                                       ("layers=0,x", "give block indices"),
                                       ("random:huge", "neither a size")])
def test_a_bad_student_is_one_line_naming_the_flag(root, tmp_path, capsys, spec, says):
    code = main(["distill", "--teacher", teacher(root, "classification"), "--student", spec,
                 "--train", str(root / "classification/train.jsonl"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith(f"minibert distill: --student {spec}")
    assert says in err


def test_a_teacher_without_best_is_refused(root, tmp_path, capsys):
    code = main(["distill", "--teacher", str(tmp_path), "--student", "layers=0",
                 "--train", str(root / "classification/train.jsonl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and f"--teacher {tmp_path}: no best/" in err


# ------------------------------------------------------------------ end to end

def teacher_alone(best, task, example):
    """The teacher's soft targets for one example, run alone (batch of one, no padding)."""
    model, t = load_task_model(best, torch.device("cpu"))
    tok = Tokenizer.from_dir(best)
    if task == "tokens":
        ds = t.read_inputs([" ".join(example["tokens"])], None, tok, 1)
    else:
        ds = t.read_inputs([example["text"]], None, tok, 1)
    with torch.no_grad():
        out = model(ds.collate([0]))
    if task == "tokens":
        return out["word_logits"][0]  # (n_words, K): every word here has a first piece
    return (out["logits"] if task == "classification" else out["predictions"].view(1, 1))[0]


@pytest.mark.parametrize("task", ["classification", "tokens", "regression"])
def test_distils_and_predicts(root, tmp_path, capsys, task):
    out = tmp_path / "run"
    results = run_distill(distill_cfg(root, task, out))
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    metric = {"classification": "accuracy", "tokens": "f1", "regression": "pearson"}[task]
    assert metric in results["test"] and results["best_step"] in (6, 12)  # 6 steps an epoch
    err = capsys.readouterr().err
    assert "teacher: soft targets of 48 training examples computed in one pass" in err
    # the cache holds, row by row, what the teacher says about each training example alone;
    # 1e-5: the cached pass pads its batches, so sums run over other lengths (rounding only)
    cache = load_file(out / "teacher_logits.safetensors")
    rows = [json.loads(x) for x in (root / task / "train.jsonl").read_text().splitlines()]
    best = f"{teacher(root, task)}/best"
    for i in range(0, 48, 5):
        a, b = int(cache["offsets"][i]), int(cache["offsets"][i + 1])
        assert cache["valid"][a:b].all()
        torch.testing.assert_close(cache["targets"][a:b].view(-1),
                                   teacher_alone(best, task, rows[i]).reshape(-1),
                                   rtol=0, atol=1e-5)
    # the run is a finetune run to the commands that read one
    assert main(["predict", str(out), "--text", "a good film", "--text", "bad plot"]) == 0
    preds = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(preds) == 2 and all("text" in p for p in preds)
    saved = json.loads((out / "best" / "task.json").read_text())
    assert saved == json.loads((root / f"teacher-{task}" / "best" / "task.json").read_text())


def test_tagging_rows_follow_the_words_when_the_teacher_cut_the_sentence(root):
    # The teacher reads the sentences cut at 6 pieces, the student at 16: the student's words
    # beyond the teacher's cut get no soft target (mask False), the others their own word's.
    best = f"{teacher(root, 'tokens')}/best"
    model, t = load_task_model(best, torch.device("cpu"))
    tok = Tokenizer.from_dir(best)
    student_ds = t.read_inputs(None, str(root / "tokens/train.jsonl"), tok, 8)
    teacher_ds = retokenized(student_ds, tok, 6, 8)
    batch = CachedTargets(student_ds, "tokens", teacher_pass(model, "tokens", teacher_ds,
                                                            torch.device("cpu"))).collate(
        list(range(16)))
    cut = 0
    for b in range(16):
        n_s, n_t = len(student_ds.first[b]), len(teacher_ds.first[b])
        cut += n_s > n_t
        assert batch["teacher_mask"][b].tolist() == [True] * n_t + [False] * (
            batch["teacher_mask"].size(1) - n_t)
        with torch.no_grad():
            alone = model(teacher_ds.collate([b]))["word_logits"][0]  # (n_t, K)
        torch.testing.assert_close(batch["teacher_targets"][b, :n_t], alone, rtol=0, atol=1e-5)
    assert cut >= 4  # the case under test did occur


def test_hidden_mse_and_attention_kl_train_with_a_narrower_student(root, tmp_path):
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    (narrow / "config.json").write_text(json.dumps(dict(
        vocab_size=27, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64)))
    out = tmp_path / "run"
    cfg = distill_cfg(root, "classification", out, student=f"random:{narrow}", hidden_mse=2.0,
                      attention_kl=3.0, max_steps=4, epochs=1)
    run_distill(cfg)
    events = [e for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "train"]
    assert len(events) == 4
    for e in events:
        t = e["train_terms"]
        assert t["hidden_mse"] > 0 and t["attention_kl"] > 0 and t["hard"] > 0 and t["soft"] >= 0
        # the logged terms are the parts of the loss that trained
        assert e["train_loss"] == pytest.approx(0.5 * t["hard"] + 0.5 * t["soft"] +
                                                2.0 * t["hidden_mse"] + 3.0 * t["attention_kl"],
                                                rel=1e-6)
    assert not (out / "teacher_logits.safetensors").exists()  # the teacher ran on the fly
    # the projection 16 -> 32 trained and is kept for resume, but is no part of the student
    state = load_file(out / "state" / "model.safetensors")
    assert state["project.weight"].shape == (32, 16)
    assert not any(k.startswith("teacher") for k in state)  # the teacher is no submodule
    # and every trainable parameter, the projection too, got a gradient at each of the 4 steps
    opt = torch.load(out / "state" / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == sum(len(g["params"]) for g in opt["param_groups"])
    assert all(s["step"] == 4 for s in opt["state"].values())
    for f in ("model.safetensors", "head.safetensors"):
        assert not any("project" in k for k in load_file(out / "best" / f))
    model, _ = load_task_model(str(out / "best"), torch.device("cpu"))
    assert model.bert.config.hidden_size == 16


def test_attention_kl_needs_as_many_heads(root, tmp_path, capsys):
    four = tmp_path / "four"
    four.mkdir()
    (four / "config.json").write_text(json.dumps(dict(
        vocab_size=27, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=32, max_position_embeddings=64)))
    code = main(["distill", "--teacher", teacher(root, "classification"), "--student",
                 f"random:{four}", "--train", str(root / "classification/train.jsonl"),
                 "--attention-kl", "1", "--out", str(tmp_path / "o"), "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("minibert distill: --attention-kl 1.0: the student's last layer has 4 "
                          "heads, the teacher's 2")


def test_training_data_with_other_labels_is_refused(root, tmp_path):
    rows = [{"text": "a good film", "label": "x"}, {"text": "bad", "label": "y"},
            {"text": "dull", "label": "z"}]
    train = write_rows(tmp_path / "three.jsonl", rows)
    with pytest.raises(Exception, match=r"three.jsonl: gives labels \['x', 'y', 'z'\]"):
        run_distill(distill_cfg(root, "classification", tmp_path / "o", train=train, dev=None,
                                test=None))
