"""Pruning (train/prune/): the gates, Michel et al.'s importance, the surgery, the command.

The reference for a pruned model is the unpruned model with the removed units' gates at 0
(importance.gates): the two must agree to float rounding. 1e-6 in fp32: the pruned model sums
fewer terms in its matmuls, which changes the rounding at ~1e-7 on these O(1) activations; a
wrong row or column gives differences of 1e-2 or more.
"""

import json
import os

import onnxruntime as ort
import pytest
import torch

from minibert.checkpoint import load_model, save_model
from minibert.config import BertConfig
from minibert.errors import ConfigError
from minibert.model import BertEncoder
from tests.test_deploy import padded_batch, randomize
from tests.tiny import make_checkpoint, make_sentiment, tiny_config, tiny_tokenizer
from train.cli import main
from train.finetune.finetune import load_task_model
from train.prune.importance import gates, importance, least_important
from train.prune.surgery import pruned
from train.tasks.classification import ClassificationHead
from train.tasks.task import TaskModel

ATOL_PRUNE = 1e-6


def random_encoder(seed=0, dtype=torch.float32, **kw):
    """4 heads of 8, 3 layers, FFN 48, no dropout, weights far from their initialisation."""
    cfg = tiny_config(num_attention_heads=4, num_hidden_layers=3, intermediate_size=48,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    bert = BertEncoder(cfg)
    bert.load_state_dict(randomize(bert.state_dict(), seed))
    return bert.to(dtype).eval()


def batch(bert, seed=0):
    return padded_batch(5, 13, bert.config.vocab_size, pairs=True, seed=seed)


def hidden(bert, b):
    with torch.no_grad():
        return bert(b["input_ids"], b["attention_mask"], b["token_type_ids"])


def zero_gates(bert, heads, neurons):
    """Gates of 1 everywhere except 0 at the given {layer: [index]} heads and neurons."""
    hg = [torch.ones(b.attn.nh) for b in bert.blocks]
    fg = [torch.ones(b.mlp.fc_in.out_features) for b in bert.blocks]
    for i, js in heads.items():
        hg[i][js] = 0.0
    for i, js in neurons.items():
        fg[i][js] = 0.0
    return hg, fg


def real(b):
    return b["attention_mask"].bool()


def test_pruning_a_head_whose_output_projection_is_zero_changes_no_output():
    bert = random_encoder()
    hs = bert.blocks[1].attn.hs
    with torch.no_grad():
        bert.blocks[1].attn.proj.weight[:, 2 * hs:3 * hs] = 0.0  # head 2 of block 1 says nothing
    b = batch(bert)
    want = hidden(bert, b)
    diff = (hidden(pruned(bert, {1: [2]}), b) - want)[real(b)].abs().max().item()
    assert diff < ATOL_PRUNE, diff
    # the control: a head that does speak changes the output when removed
    assert (hidden(pruned(bert, {1: [1]}), b) - want)[real(b)].abs().max().item() > 1e-3


def test_a_pruned_model_equals_the_gated_model():
    bert = random_encoder()
    heads, neurons = {0: [0, 3], 2: [1]}, {0: [5, 6, 40], 1: list(range(0, 48, 2))}
    b = batch(bert)
    with gates(bert, *zero_gates(bert, heads, neurons)):
        want = hidden(bert, b)
    small = pruned(bert, heads, neurons)
    assert [blk.attn.nh for blk in small.blocks] == [2, 4, 3]
    assert small.config.intermediate_sizes == [45, 24, 48]
    assert small.config.pruned_heads == {0: [0, 3], 2: [1]}
    assert small.blocks[0].attn.qkv.weight.shape == (3 * 2 * 8, 32)
    assert small.blocks[1].mlp.fc_out.weight.shape == (32, 24)
    diff = (hidden(small, b) - want)[real(b)].abs().max().item()
    assert diff < ATOL_PRUNE, diff

    # pruning again numbers heads as the layer has them now; the config keeps the original ones
    again = pruned(small, {0: [1]}, {})  # head 1 of [1, 2] left in layer 0 is original head 2
    assert again.config.pruned_heads == {0: [0, 2, 3], 2: [1]}
    with gates(bert, *zero_gates(bert, {0: [0, 2, 3], 2: [1]}, neurons)):
        want = hidden(bert, b)
    assert (hidden(again, b) - want)[real(b)].abs().max().item() < ATOL_PRUNE


def test_importance_is_the_gradient_of_the_loss_with_respect_to_each_gate():
    """Against central finite differences of the loss in each gate, in fp64."""
    torch.manual_seed(0)
    bert = random_encoder(dtype=torch.float64)
    model = TaskModel(bert, ClassificationHead(32, 3, "mean", 0.0).double()).eval()
    b = {**batch(bert), "labels": torch.tensor([0, 1, 2, 1, 0])}
    heads, ffn = importance(model, [b])
    assert all(p.grad is None for p in model.parameters())  # only the gates got gradients

    def loss(layer, kind, j, value):
        hg, fg = zero_gates(bert, {}, {})
        hg, fg = [g.double() for g in hg], [g.double() for g in fg]
        (hg if kind == "head" else fg)[layer][j] = value
        with torch.no_grad(), gates(bert, hg, fg):
            return model(b)["loss"].item()

    eps = 1e-5
    for kind, scores, picks in (("head", heads, [(0, 0), (1, 3), (2, 2)]),
                                ("ffn", ffn, [(0, 7), (2, 40)])):
        for layer, j in picks:
            fd = (loss(layer, kind, j, 1 + eps) - loss(layer, kind, j, 1 - eps)) / (2 * eps)
            assert abs(scores[layer][j].item() - abs(fd)) < 1e-7 * max(1.0, abs(fd)), \
                (kind, layer, j, scores[layer][j].item(), fd)


def test_least_important_ranks_across_layers_after_normalising_each_layer():
    scores = [torch.tensor([3.0, 4.0, 0.0]),  # norm 5: 0.6, 0.8, 0.0
              torch.tensor([1.0, 1.0]),  # norm 1.41: 0.71, 0.71
              torch.tensor([0.1, 0.2, 0.2])]  # norm 0.3: 0.33, 0.67, 0.67
    assert least_important(scores, 2 / 8) == {0: [2], 2: [0]}
    assert least_important(scores, 3 / 8) == {0: [0, 2], 2: [0]}
    # every layer keeps one unit: layer 1 gives up one of its two, never both
    assert least_important(scores, 0.99) == {0: [0, 2], 1: [0], 2: [0, 1]}
    assert least_important(scores, 0.0) == {}


def test_config_records_pruning_and_refuses_what_cannot_be_built(tmp_path):
    small = pruned(random_encoder(), {1: [0]}, {2: [0, 1]})
    save_model(small, str(tmp_path / "p"), tiny_tokenizer())
    raw = json.loads(open(tmp_path / "p" / "config.json").read())
    assert raw["pruned_heads"] == {"1": [0]} and raw["intermediate_sizes"] == [48, 48, 46]
    back = load_model(str(tmp_path / "p"))
    assert back.config == small.config
    b = batch(small)
    assert torch.equal(hidden(back, b), hidden(small, b))
    plain = tiny_config().to_hf_dict()
    assert "pruned_heads" not in plain and "intermediate_sizes" not in plain
    for bad, what in (({"pruned_heads": {"0": [0, 1]}}, "removes every head"),
                      ({"pruned_heads": {"5": [0]}}, "layer '5'"),
                      ({"pruned_heads": {"0": [2]}}, r"pruned_heads\[0\]=\[2\]"),
                      ({"intermediate_sizes": [64]}, "intermediate_sizes")):
        with pytest.raises(ConfigError, match=what):
            BertConfig.from_dict({**tiny_config().to_hf_dict(), **bad})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny fine-tuned classifier (BERT's pooler on [CLS], so transformers has its class)."""
    d = tmp_path_factory.mktemp("prune")
    make_checkpoint(str(d / "ckpt"), num_attention_heads=4, intermediate_size=64)
    data = make_sentiment(str(d / "data"))
    out = str(d / "run")
    assert main(["finetune", "--model", str(d / "ckpt"), "--train", f"{data}/train.jsonl",
                 "--dev", f"{data}/dev.jsonl", "--test", f"{data}/test.jsonl", "--out", out,
                 "--pooling", "cls", "--max-steps", "6", "--batch-size", "16", "--threads", "1",
                 "--eval-every", "3"]) == 0
    return out


def test_prune_command_writes_a_smaller_model_that_loads_predicts_and_exports(run, tmp_path,
                                                                              capsys):
    out = str(tmp_path / "p")
    assert main(["prune", run, "--heads", "0.5", "--ffn", "0.25", "--out", out,
                 "--importance-examples", "40", "--finetune-steps", "2", "--threads", "1"]) == 0
    res = json.loads(open(os.path.join(out, "results.json")).read())
    assert res["size_after"]["heads"] == 4 and res["size_before"]["heads"] == 8
    assert res["size_after"]["neurons"] == 96 and res["size_before"]["neurons"] == 128
    assert set(res["pruned"]) == {"dev", "test"} and set(res["finetuned"]) == {"dev", "test"}
    assert res["model"] == os.path.join(out, "finetune", "best")
    model, task = load_task_model(os.path.join(out, "pruned"), "cpu")
    assert sum(b.attn.nh for b in model.bert.blocks) == 4
    capsys.readouterr()
    assert main(["predict", os.path.join(out, "pruned"), "--text", "a good film"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in ("0", "1")
    # DIR itself serves its final model, as a run serves its best/
    from train.finetune.predict import find_best
    assert find_best(out, "predict") == os.path.join(out, "finetune", "best")
    assert main(["predict", out, "--text", "a good film"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] in ("0", "1")
    # a fine-tune killed before its end: DIR serves pruned/ until `finetune --resume` ends it
    os.rename(os.path.join(out, "finetune", "results.json"), tmp_path / "ft-results.json")
    assert find_best(out, "predict") == os.path.join(out, "pruned")
    assert main(["finetune", "--resume", os.path.join(out, "finetune")]) == 0
    assert find_best(out, "predict") == os.path.join(out, "finetune", "best")
    # a prune output names no data to score on: its message says what to prune instead
    assert main(["prune", out, "--heads", "0.1", "--out", str(tmp_path / "again")]) == 2
    assert f"{out}: a `minibert prune` output" in capsys.readouterr().err
    # nor is DIR a folder to export another model into: predict would still answer from pruned/
    with pytest.raises(SystemExit, match=r"holds a checkpoint, a run or an export \(results"):
        main(["export", run, "--to", "onnx", "--out", out])
    # again into the same DIR: refused in one line before any work, naming what to do
    (tmp_path / "p" / "results.json").unlink()  # as if killed before it wrote results.json
    config = open(os.path.join(out, "pruned", "config.json")).read()
    assert main(["prune", run, "--heads", "0.25", "--out", out, "--finetune-steps", "2",
                 "--threads", "1"]) == 2
    assert f"{out}/finetune holds a run already; continue it with --resume {out}/finetune" \
        in capsys.readouterr().err
    assert open(os.path.join(out, "pruned", "config.json")).read() == config  # untouched
    # a checkpoint is not a run: it names no data to score on
    assert main(["prune", os.path.join(out, "pruned"), "--heads", "0.1", "--out",
                 str(tmp_path / "again")]) == 2
    assert "a checkpoint, not a run directory" in capsys.readouterr().err

    # ONNX: the graph of the smaller model gives its logits, with and without fusions
    b = padded_batch(7, 19, model.bert.config.vocab_size, pairs=False, seed=3)
    with torch.no_grad():
        want = model(b)["logits"]
    for flags in ((), ("--optimize",)):
        d = str(tmp_path / ("onnx" + "".join(flags)))
        assert main(["export", os.path.join(out, "pruned"), "--to", "onnx", "--out", d,
                     *flags]) == 0
        s = ort.InferenceSession(os.path.join(d, "model.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(s.run(None, {k: b[k].numpy() for k in ("input_ids",
                                                                      "attention_mask")})[0])
        assert (got - want).abs().max().item() < 1e-4, flags

    # transformers has no per-layer FFN width: refused in one line, nothing written
    with pytest.raises(SystemExit) as e:
        main(["export", os.path.join(out, "pruned"), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert "pruned (heads, FFN neurons)" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_a_prune_killed_in_its_fine_tune_serves_pruned_and_keeps_its_scores(run, tmp_path,
                                                                            monkeypatch, capsys):
    import train.prune.prune as module
    from train.finetune.predict import find_best

    def killed(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(module, "run_finetune", killed)
    out = str(tmp_path / "p")
    assert main(["prune", run, "--heads", "0.5", "--out", out, "--importance-examples", "40",
                 "--finetune-steps", "2", "--threads", "1"]) == 130
    res = json.loads(open(os.path.join(out, "results.json")).read())
    assert res["model"] == os.path.join(out, "pruned") and set(res["pruned"]) == {"dev", "test"}
    assert find_best(out, "predict") == os.path.join(out, "pruned")
    # pruning into DIR again says how to finish the fine-tune that stopped there
    os.makedirs(os.path.join(out, "finetune", "state"))
    monkeypatch.undo()
    assert main(["prune", run, "--heads", "0.5", "--out", out, "--finetune-steps", "2"]) == 2
    assert f"continue it with `minibert finetune --resume {out}/finetune`" in \
        capsys.readouterr().err


def test_prune_refuses_bad_fractions_and_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["prune", str(tmp_path), "--heads", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "minibert prune: --heads 1.5: give a fraction in [0, 1)" in capsys.readouterr().err
    assert main(["prune", str(tmp_path), "--heads", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "not a minibert run directory" in capsys.readouterr().err
    (tmp_path / "o").mkdir(exist_ok=True)
    (tmp_path / "o" / "results.json").write_text("{}")  # a finished prune: no --resume to offer
    assert main(["prune", str(tmp_path), "--heads", "0.5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds a run already; give another --out" in err and "--resume" not in err, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("prune-runs")
    make_checkpoint(str(d / "ckpt"), num_attention_heads=4, intermediate_size=64)
    return d, make_sentiment(str(d / "data"))


def run_flags(data, out):
    return ["--train", f"{data}/train.jsonl", "--dev", f"{data}/dev.jsonl", "--out", str(out),
            "--max-steps", "2", "--batch-size", "16", "--threads", "1", "--eval-every", "2"]


def prune_and_finetune(run, out):
    assert main(["prune", str(run), "--heads", "0.5", "--out", str(out), "--importance-examples",
                 "16", "--finetune-steps", "1", "--threads", "1"]) == 0
    return json.loads((out / "results.json").read_text())


def test_a_run_from_random_weights_prunes_and_finetunes(data, tmp_path):
    # the pruned backbone is trained now: its fine-tune starts from it ("pretrained"), with
    # the run's head, instead of an --init random config that refuses --init-heads
    d, sentiment = data
    run = tmp_path / "run"
    assert main(["finetune", "--model", str(d / "ckpt"), "--init", "random",
                 *run_flags(sentiment, run)]) == 0
    res = prune_and_finetune(run, tmp_path / "p")
    assert res["size_after"]["heads"] == 4 and "dev" in res["finetuned"]
    saved = json.loads((tmp_path / "p" / "finetune" / "config.json").read_text())
    assert saved["init"] == "pretrained"
    assert saved["init_heads"] == [str(tmp_path / "p" / "pruned")]


def test_a_distilled_run_prunes_and_finetunes_without_its_teacher(data, tmp_path):
    d, sentiment = data
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert main(["finetune", "--model", str(d / "ckpt"), *run_flags(sentiment, teacher)]) == 0
    assert main(["distill", "--teacher", str(teacher), "--student", "layers=0,1",
                 *run_flags(sentiment, student)]) == 0
    assert "teacher" in json.loads((student / "config.json").read_text())
    res = prune_and_finetune(student, tmp_path / "p")
    assert res["size_after"]["heads"] == 4 and "dev" in res["finetuned"]
    assert "teacher" not in json.loads((tmp_path / "p" / "finetune" / "config.json").read_text())


def test_a_prune_output_teaches_and_says_what_each_layer_kept(data, tmp_path, capsys):
    """--heads 0.875 of 8 heads in 2 layers asks for 7, but each layer keeps one: 6 go, and the
    command says so (results.json already records the sizes). The pruned model, which predict
    and export take from DIR, is a teacher for distill as well."""
    d, sentiment = data
    run, pruned, student = tmp_path / "run", tmp_path / "p", tmp_path / "student"
    assert main(["finetune", "--model", str(d / "ckpt"), *run_flags(sentiment, run)]) == 0
    capsys.readouterr()
    assert main(["prune", str(run), "--heads", "0.875", "--out", str(pruned),
                 "--importance-examples", "16", "--threads", "1"]) == 0
    assert "--heads 0.875 asks for 7 of 8 heads; 6 removed, as every layer keeps at least one" \
        in capsys.readouterr().err
    assert main(["distill", "--teacher", str(pruned), "--student", "layers=0",
                 *run_flags(sentiment, student)]) == 0
    assert json.loads((student / "results.json").read_text())["dev"]
