"""Deployment: a fine-tuned run exported to transformers (loaded by transformers itself) and to
ONNX (run by onnxruntime), its int8 form against minibert's reference int8 math, and `predict
--backend onnx` against `--backend torch`. Every run is tiny and trained for two steps; the
encoder starts from random non-trivial weights and the trained heads are randomised, so that a
dropped bias, an unfolded mean or a swapped start/end shows (fresh BERT initialisation has zero
biases, unit LayerNorms and near-zero logits, which would hide all three).

Tolerances, once, with their reasons:
- transformers: ATOL_FP32 (conftest): the same math in another order of additions.
- onnxruntime fp32: 1e-4, the issue's bound; observed differences are ~1e-6 (fused kernels and
  onnxruntime's own GELU/LayerNorm/softmax round differently from torch).
- int8, one Linear: onnxruntime and the reference in its per-tensor scheme do the same integer
  products with the same scales, so they agree to float rounding of the rescale (1e-6 of |y|).
  Against the per-token reference, each output element differs from the float product by at
  most d_x sum_k |W[n, k]| + d_w[n] sum_k |x[k]| + K d_x d_w[n] (d: the largest rounding error,
  half a step; a whole step for the per-tensor scheme, whose top value can clip), so the two int8
  results differ by at most the sum of the two schemes' bounds.
- int8, whole model: the same integer products again, except where fp32 rounding upstream
  (onnxruntime's LayerNorm, GELU and softmax vs torch's, ~1e-6) pushes an activation across a
  rounding boundary. Such a "flip" moves one input of one layer by one step, while the
  quantisation error is the sum of every input's rounding (each up to half a step); a few flips
  are a share of it (at this width, K = 32, up to ~30% was seen; most batches have none and
  agree to 1e-6). So fast and reference, same scheme, must be closer to each other than the
  reference is to fp32. And, as FlashAttention's tests bound a kernel by what the reference
  makes: the fast path's error against fp32 is at most twice the per-token reference's (1.5x at
  most was seen over 12 batches).
"""

import json
import os
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import ATOL_FP32
from minibert.checkpoint import read_safetensors, save_model
from minibert.io import atomic_save_safetensors, atomic_write_json
from minibert.model import BertEncoder
from minibert.tokenizer import Tokenizer
from tests.test_qa import make_squad
from tests.test_tagging import make_ner
from tests.tiny import FILLER, NEGATIVE, POSITIVE, tiny_config, tiny_tokenizer
from train.cli import main
from train.deploy.int8 import (ENCODER_LINEARS, int8_linear, quantize_activations,
                               quantize_encoder, quantize_graph, quantize_table, quantize_weight,
                               weight_qmax)
from train.deploy.onnx_export import check_dynamic, heads_of
from train.finetune.config import FinetuneConfig
from train.finetune.finetune import load_task_model, run_finetune
from train.tasks.task import TaskModel

ATOL_ONNX = 1e-4
EPS32 = torch.finfo(torch.float32).eps


def randomize(named, seed, scale=1.0):
    """{name: tensor} with random non-trivial values: unit-ish LayerNorm gains, 0.5-sized
    embeddings, other matrices scaled by fan-in so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in named.items():
        noise = torch.randn(p.shape, generator=g)
        if "penalty" in name:
            out[name] = p  # BIO constraints: fixed, not learned
        elif re.search(r"(^|\.)ln(_\w+)?\.weight$", name):
            out[name] = 1.0 + 0.2 * noise
        elif "embeddings" in name:
            out[name] = 0.5 * noise
        else:
            out[name] = scale * noise / (p.shape[-1] if p.dim() == 2 else p.shape[0]) ** 0.5
    return out


def make_snippets(path, n=48, seed=0):
    """text, pair, label (neg/pos) and a score around 50, far from N(0, 1)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            pos = bool(rng.random() < 0.5)
            words = list(rng.choice(FILLER, 4)) + [str(rng.choice(POSITIVE if pos else NEGATIVE))]
            f.write(json.dumps({"text": " ".join(words), "pair": " ".join(rng.choice(FILLER, 3)),
                                "label": "pos" if pos else "neg",
                                "score": 50.0 + 10 * pos + float(rng.normal())}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A random checkpoint, data for every task, and runs trained on demand (then cached)."""
    d = tmp_path_factory.mktemp("deploy")
    model = BertEncoder(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.load_state_dict(randomize(model.state_dict(), seed=0))
    save_model(model, str(d / "ckpt"), tiny_tokenizer())
    snippets = make_snippets(d / "train.jsonl")
    data = {"snippets": snippets, "ner": make_ner(d / "ner.jsonl", 32, 0),
            "squad": make_squad(d / "squad.json", 16, 0)}
    mt = [f"polarity:classification:{d}/{{split}}.jsonl",
          f"intensity:regression:{d}/{{split}}.jsonl:standardize_targets=true:pooling=cls"]
    specs = {
        "cls": dict(task="classification", train=snippets, pooling="cls", pair_field="pair"),
        "mean": dict(task="classification", train=snippets),
        "regression": dict(task="regression", train=snippets, pooling="cls",
                           standardize_targets=True),
        "tokens": dict(task="tokens", train=data["ner"]),
        "crf": dict(task="tokens", train=data["ner"], crf=True, bio_constraints=True),
        "qa": dict(task="qa", train=data["squad"], max_length=24, doc_stride=6,
                   max_answer_len=5),
        "multitask": dict(task="multitask", tasks=mt),
    }
    runs, exports = {}, {}

    def run(name):
        if name not in runs:
            out = str(d / "runs" / name)
            run_finetune(FinetuneConfig(model=str(d / "ckpt"), out=out, batch_size=8, max_steps=2,
                                        eval_every=None, log_every=50, threads=1,
                                        **specs[name]))
            path = os.path.join(out, "best", "head.safetensors")
            atomic_save_safetensors(path, randomize(read_safetensors(path), seed=1, scale=3.0))
            runs[name] = out
        return runs[name]

    def export(name, *flags):
        key = (name,) + flags
        if key not in exports:
            exports[key] = str(d / "onnx" / "-".join(key))
            assert main(["export", run(name), "--to", "onnx", "--out", exports[key],
                         *flags]) == 0
        return exports[key]

    return {"run": run, "export": export, "data": data, "dir": d}


def padded_batch(B, T, vocab, pairs, seed):
    """Random ids, row lengths 2..T (one full row, unless B is 1: then the row is padded),
    segment B in the second part for pairs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T if B > 1 else T - 5
    mask = (torch.arange(T) < lengths[:, None]).long()  # (B, T)
    ids = torch.randint(5, vocab, (B, T), generator=g) * mask
    split = (lengths // 2)[:, None]
    tt = ((torch.arange(T) >= split) & mask.bool()).long() if pairs else torch.zeros_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}


def best(lab, name):
    return load_task_model(os.path.join(lab["run"](name), "best"), "cpu")


# ---------------------------------------------------------------- transformers

def hf_outputs(name, model, task, tok, out_dir):
    """(minibert's head output, transformers' output), each at the places that count."""
    import transformers as tf

    texts = ["the good film", "it was a very dull and boring story about the movie plot"]
    if name == "qa":
        ds = task.read_inputs([f"the good ||| the movie was {t} and superb" for t in texts],
                              None, tok, 8)
        batch = ds.collate([0, 1])
    elif name == "tokens":
        batch = task.read_inputs(texts, None, tok, 8).collate([0, 1])
    else:  # text pairs: segment B counts too
        batch = tok.encode_batch(texts, ["a plot", "the story was fine"])
    cls = {"tokens": tf.AutoModelForTokenClassification, "qa": tf.AutoModelForQuestionAnswering}
    hf, info = cls.get(name, tf.AutoModelForSequenceClassification).from_pretrained(
        out_dir, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), \
        info
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        ours, theirs = model(batch), hf.eval()(**inputs)
    real = batch["attention_mask"].bool()
    if name == "tokens":  # word-level scores: at each word's first piece
        first = batch["first"]
        return ours["word_logits"][ours["word_mask"]], theirs.logits[first]
    if name == "qa":  # minibert sets padding to -1e4, transformers does not
        return (torch.stack([ours["start_logits"][real], ours["end_logits"][real]]),
                torch.stack([theirs.start_logits[real], theirs.end_logits[real]]))
    if name == "regression":  # in standardised units: the folded mean is exact in both
        m, s = task.meta["target_mean"], task.meta["target_std"]
        return ours["predictions"], (theirs.logits[:, 0] - m) / s
    return ours["logits"], theirs.logits


@pytest.mark.parametrize("name,cls", [("cls", "BertForSequenceClassification"),
                                      ("regression", "BertForSequenceClassification"),
                                      ("tokens", "BertForTokenClassification"),
                                      ("qa", "BertForQuestionAnswering")])
def test_transformers_loads_each_export_and_gives_minibert_logits(lab, tmp_path, name, cls):
    out = str(tmp_path / "hf")
    assert main(["export", lab["run"](name), "--to", "hf", "--out", out]) == 0
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["architectures"] == [cls]
    model, task = best(lab, name)
    if name == "cls":
        assert config["id2label"] == {"0": "neg", "1": "pos"}
        assert config["label2id"] == {"neg": 0, "pos": 1}
        assert config["problem_type"] == "single_label_classification"
    if name == "regression":
        assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
        assert abs(task.meta["target_mean"] - 55) < 5 and task.meta["target_std"] > 2
    # transformers' tokenizer truncates where the run read and minibert predicts: its max length
    tok_config = json.loads(open(os.path.join(out, "tokenizer_config.json")).read())
    assert tok_config["model_max_length"] == task.meta["max_length"]
    ours, theirs = hf_outputs(name, model, task, Tokenizer.from_dir(out), out)
    diff = (ours - theirs).abs().max().item()
    print(f"hf {name}: max |minibert - transformers| = {diff:.2e}, |logit| <= "
          f"{ours.abs().max().item():.2f}")
    assert ours.abs().max() > 0.5  # logits of a size that a wrong weight would change
    assert diff < ATOL_FP32


@pytest.mark.parametrize("name,head", [("mean", "classification head pools with --pooling mean"),
                                       ("crf", "tokens head has a CRF"),
                                       ("multitask", "multitask run (2 heads: polarity, "
                                                     "intensity)")])
def test_heads_without_a_transformers_class_are_refused_in_one_line(lab, tmp_path, name, head):
    out = tmp_path / "hf"
    with pytest.raises(SystemExit) as e:
        main(["export", lab["run"](name), "--to", "hf", "--out", str(out)])
    msg = str(e.value)
    assert head in msg and "use --to onnx" in msg and "\n" not in msg, msg
    assert not out.exists()  # refused before anything was written


def test_export_refuses_an_out_that_holds_a_run_or_a_file(lab, tmp_path):
    """--out RUN/best (or RUN, or any checkpoint) would write a transformers model over the
    model there; a file cannot be a directory. Refused in one line before any work, nothing touched."""
    run = lab["run"]("cls")
    before = {f: os.path.getmtime(os.path.join(run, "best", f))
              for f in os.listdir(os.path.join(run, "best"))}
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    ckpt = tmp_path / "ckpt"  # an imported checkpoint, or a pretraining run's best/
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    for cmd in (["export", run, "--to", "hf"], ["export", run, "--to", "onnx"],
                ["quantize", run]):
        for out, why in ((os.path.join(run, "best"), "holds a checkpoint, a run or an export"),
                         (run, "holds a checkpoint, a run or an export"),
                         (str(ckpt), r"holds a checkpoint, a run or an export \(config.json\)"),
                         (str(a_file), "a file, not a directory")):
            with pytest.raises(SystemExit, match=f"--out {out}:? .*{why}"):
                main([*cmd, "--out", out])
    assert before == {f: os.path.getmtime(os.path.join(run, "best", f))
                      for f in os.listdir(os.path.join(run, "best"))}
    assert a_file.read_text() == "x"


# ---------------------------------------------------------------- ONNX

def minibert_outputs(model, meta, batch):
    """{graph output name: tensor} computed by minibert's own heads."""
    out = {}
    for prefix, m, head in heads_of(meta, model.head):
        if m["task"] == "tokens":  # emission scores at every piece
            h = model.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            out[prefix + "logits"] = head.out(h)
            continue
        o = TaskModel(model.bert, head)(batch)
        if m["task"] == "regression":
            out[prefix + "logits"] = (o["predictions"] * m["target_std"] + m["target_mean"])[:, None]
        else:
            out.update({prefix + k: v for k, v in o.items()})
    return out


@pytest.mark.parametrize("name,flags", [("mean", ()), ("crf", ()), ("qa", ("--optimize",)),
                                        ("multitask", ())])
def test_onnxruntime_matches_minibert_at_odd_shapes(lab, name, flags, capsys):
    d = lab["export"](name, *flags)
    card = json.loads(open(os.path.join(d, "model.json")).read())
    if flags:
        assert "optimize: onnxruntime.transformers fused" in capsys.readouterr().err
        assert card["fusions"].get("SkipLayerNormalization", 0) > 0, card["fusions"]
    model, task = best(lab, name)
    pairs = name == "qa"
    assert ("token_type_ids" in card["inputs"]) == pairs  # single texts omit it
    proto = onnx.load(os.path.join(d, "model.onnx"))
    check_dynamic(proto, list(card["inputs"]), card["outputs"])
    session = ort.InferenceSession(os.path.join(d, "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    for B, T in ((1, 23), (37, 40)):  # the export example is 3 x 11
        batch = padded_batch(B, T, model.bert.config.vocab_size, pairs, seed=B)
        got = session.run(None, {k: batch[k].numpy() for k in card["inputs"]})
        with torch.no_grad():
            want = minibert_outputs(model, task.meta, batch)
        assert [o.name for o in session.get_outputs()] == list(want)
        for (k, w), g in zip(want.items(), got):
            g = torch.from_numpy(g)
            assert g.shape == w.shape, (k, g.shape, w.shape)
            if g.dim() == 3:  # emissions: padded pieces are never read
                g, w = g[batch["attention_mask"].bool()], w[batch["attention_mask"].bool()]
            diff = (g - w).abs().max().item()
            print(f"onnx {name} {k} B={B} T={T}: max |onnxruntime - minibert| = {diff:.2e}")
            assert diff < ATOL_ONNX, k


def test_a_frozen_dimension_is_caught(lab):
    d = lab["export"]("mean")
    proto = onnx.load(os.path.join(d, "model.onnx"))
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 3  # batch frozen at 3
    with pytest.raises(ValueError, match="logits has its batch dimension frozen at 3"):
        check_dynamic(proto, ["input_ids", "attention_mask"], {"logits": "(batch, labels)"})


def predict_rows(argv, tmp_path, tag):
    out = tmp_path / f"{tag}.jsonl"
    assert main(["predict", *argv, "--output", str(out)]) in (0, None)
    return [json.loads(line) for line in out.read_text().splitlines()]


def same_answers(a, b):
    """Equal JSON rows, numbers within 1e-4 (relative beyond 1: regression is in data units)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_answers(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_answers(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= 1e-4 * max(1.0, abs(a))
    return a == b


@pytest.mark.parametrize("name", ["mean", "crf", "qa", "multitask"])
def test_predict_with_onnx_answers_as_torch_does(lab, tmp_path, name):
    if name == "qa":
        texts = ["the good ||| the movie was dull and the story superb and the plot poor",
                 "the good ||| a fine film"]
    else:
        texts = ["the film was superb story and dull", "boring", "it was a very good movie"]
    flags = [a for t in texts for a in ("--text", t)]
    torch_rows = predict_rows([lab["run"](name), *flags], tmp_path, "torch")
    onnx_rows = predict_rows([lab["export"](name), "--backend", "onnx", *flags], tmp_path, "onnx")
    assert same_answers(torch_rows, onnx_rows), (torch_rows, onnx_rows)


def test_an_export_killed_over_an_earlier_one_is_never_read_as_a_model(lab, tmp_path, capsys,
                                                                        monkeypatch):
    """A regression export killed over a classification export, after its graph and before its
    task.json, used to be read as the classifier (exit 0, wrong answers). model.json, removed
    first and written last, now marks a complete export; the folder can be exported into again,
    and an ONNX export and a transformers checkpoint are never mixed in one folder."""
    import train.deploy.onnx_export as onnx_export
    out = tmp_path / "ex"
    shutil.copytree(lab["export"]("mean"), out)

    def killed(path, obj):
        if path.endswith("task.json"):
            raise KeyboardInterrupt  # stands for kill -9 at this point
        atomic_write_json(path, obj)
    monkeypatch.setattr(onnx_export, "atomic_write_json", killed)
    assert main(["export", lab["run"]("regression"), "--to", "onnx", "--out", str(out)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["predict", str(out), "--backend", "onnx", "--text", "good"]) == 2
    assert f"{out}: no model.onnx and model.json" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"holds a checkpoint, a run or an export \(model.onnx\)"):
        main(["export", lab["run"]("regression"), "--to", "hf", "--out", str(out)])
    assert main(["export", lab["run"]("regression"), "--to", "onnx", "--out", str(out)]) == 0
    assert json.loads((out / "task.json").read_text())["task"] == "regression"
    assert main(["predict", str(out), "--backend", "onnx", "--text", "good"]) == 0


def test_a_damaged_or_mismatched_task_or_head_is_one_line(lab, tmp_path, capsys):
    """task.json and the head's tensors, of a run and of an export: a traceback each, before."""
    from safetensors.torch import save_file

    def copy(src, name):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    def head_of(run):  # head.safetensors of a run's best/
        return read_safetensors(os.path.join(lab["run"](run), "best", "head.safetensors"))
    cases = []
    d = copy(lab["run"]("cls"), "cut-task")
    (d / "best" / "task.json").write_text('{"task": "classification"')
    cases.append((d, f"{d}/best/task.json: not valid JSON"))
    d = copy(lab["run"]("cls"), "foo-task")
    (d / "best" / "task.json").write_text('{"task": "foo"}')
    cases.append((d, f"{d}/best/task.json: task 'foo' is not one of classification,"))
    d = copy(lab["run"]("cls"), "other-head")
    save_file(head_of("regression"), d / "best" / "head.safetensors")
    cases.append((d, f"{d}/best/head.safetensors: does not fit the head its task.json"))
    d = copy(lab["run"]("crf"), "no-crf")
    save_file({k: v for k, v in head_of("crf").items() if "crf" not in k},
              d / "best" / "head.safetensors")
    cases.append((d, f"{d}/best/head.safetensors: does not fit the head its task.json"))
    d = copy(lab["export"]("crf"), "onnx-no-crf")
    (d / "crf.safetensors").unlink()
    cases.append((d, f"{d}/crf.safetensors: missing; task.json has a CRF head"))
    d = copy(lab["export"]("cls"), "onnx-no-task")
    (d / "task.json").unlink()
    cases.append((d, f"{d}/task.json: no such file or directory"))
    d = copy(lab["export"]("cls"), "onnx-list-card")
    (d / "model.json").write_text("[]")
    cases.append((d, f"{d}/model.json: "))
    for d, why in cases:
        backend = "onnx" if "onnx" in d.name else "torch"
        capsys.readouterr()
        assert main(["predict", str(d), "--backend", backend, "--text", "good"]) == 2, d
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "".join(err) and why in err[-1], err[-1]
    # the graph runs on onnxruntime's CPU provider: another --device is refused, not ignored
    with pytest.raises(SystemExit, match=r"--device cuda: --backend onnx runs on the CPU"):
        main(["predict", str(lab["export"]("cls")), "--backend", "onnx", "--device", "cuda",
              "--text", "good"])


def test_a_damaged_onnx_export_is_named_in_one_line(lab, tmp_path, capsys):
    src = lab["export"]("mean")
    for name, damage in (("cut", lambda d: (d / "model.onnx").write_bytes(
                              (d / "model.onnx").read_bytes()[:5000])),
                         ("foreign-card", lambda d: (d / "model.json").write_text(json.dumps(
                              {**json.loads((d / "model.json").read_text()),
                               "outputs": {"other.logits": "?"}})))):
        d = tmp_path / name
        shutil.copytree(src, d)
        damage(d)
        capsys.readouterr()
        assert main(["predict", str(d), "--backend", "onnx", "--text", "good"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert not any("Traceback" in line for line in lines), lines
        err = lines[-1]  # the one line of the error, after what loading said
        assert f"{d}/model.onnx" in err and "export it again" in err, err


# ---------------------------------------------------------------- int8

def test_reference_int8_linear_is_its_dequantised_float_math():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 64, generator=g) * 0.1, torch.randn(48, generator=g)
    x = torch.randn(5, 7, 64, generator=g) * 3
    for qmax in (127, 64):
        wq, sw = quantize_weight(w, qmax)
        assert wq.abs().max() == qmax and wq.dtype == torch.int8
        for scheme in ("token", "tensor"):
            xq, sx, zero = quantize_activations(x, scheme)
            # the same numbers in float64: (xq - z) s_x times (Wq s_w)^T, plus b
            want = ((xq - zero).double() * sx.double()) @ (wq.double() * sw.double()[:, None]).t() \
                + b.double()
            got = int8_linear(x, wq, sw, b, scheme)
            # the int32 sum is exact; the rescale and the bias round once or twice each
            tol = 4 * EPS32 * (want.abs() + b.double().abs())
            assert ((got.double() - want).abs() <= tol).all(), (qmax, scheme)


def linear_graph(w, b):
    """x (B, T, K) -> x W^T + b as ONNX MatMul + Add, the form the exporter gives a Linear."""
    N, K = w.shape
    nodes = [helper.make_node("MatMul", ["x", "wt"], ["xw"], name="linear"),
             helper.make_node("Add", ["xw", "b"], ["y"], name="bias")]
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", N])],
        [numpy_helper.from_array(w.t().contiguous().numpy(), "wt"),
         numpy_helper.from_array(b.numpy(), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def rounding_bound(x, w, d_x, d_w):
    """max |x^ W^^T - x W^T| per element, when |x^ - x| <= d_x (per row) and |W^ - W| <= d_w."""
    K = x.shape[-1]
    return d_x * w.abs().sum(1) + x.abs().sum(-1, keepdim=True) * d_w + K * d_x * d_w


@pytest.mark.parametrize("qmax", sorted({weight_qmax(), 64}))  # this CPU's choice, and 7-bit
def test_onnxruntime_int8_is_the_reference_math_layer_by_layer(lab, qmax):
    model, _ = best(lab, "cls")
    inputs = {}

    def keep_input(name):  # a forward hook that returns None leaves the output alone
        return lambda module, args, output: inputs.__setitem__(name, args[0])
    hooks = [m.register_forward_hook(keep_input(n)) for n, m in model.bert.named_modules()
             if n.endswith(ENCODER_LINEARS)]
    with torch.no_grad():
        model(padded_batch(37, 40, model.bert.config.vocab_size, True, seed=3))
    for h in hooks:
        h.remove()
    assert len(inputs) == 4 * model.bert.config.num_hidden_layers
    for name, x in inputs.items():
        lin = model.bert.get_submodule(name)
        w, b = lin.weight.detach(), lin.bias.detach()
        q = quantize_graph(linear_graph(w, b), ["linear"], qmax)
        init = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
        wq, sw = quantize_weight(w, qmax)
        assert np.array_equal(init["wt_quantized"].T, wq.numpy()), name  # same integers
        assert np.array_equal(init["wt_scale"], sw.numpy()), name  # same scales
        session = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
        fast = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        same = int8_linear(x, wq, sw, b, "tensor")
        assert (fast - same).abs().max() <= 1e-6 * same.abs().max(), name
        token = int8_linear(x, wq, sw, b, "token")
        _, s_tok, _ = quantize_activations(x, "token")
        _, s_ten, _ = quantize_activations(x, "tensor")
        d_w = sw / 2
        bound = rounding_bound(x, w, s_tok / 2, d_w) + rounding_bound(x, w, s_ten, d_w)
        assert ((fast - token).abs() <= bound).all(), name
        print(f"int8 q<={qmax} {name}: |fast - reference(tensor)| {(fast - same).abs().max():.1e}, "
              f"|fast - reference(token)| {(fast - token).abs().max():.2e} "
              f"(bound {bound.min():.2e}..{bound.max():.2e})")


def test_quantize_command_matches_the_reference_model(lab, tmp_path, capsys):
    out = str(tmp_path / "int8")
    assert main(["quantize", lab["run"]("cls"), "--out", out]) == 0
    assert "quantize: fast path onnxruntime quantize_dynamic" in capsys.readouterr().err
    card = json.loads(open(os.path.join(out, "model.json")).read())
    qmax = card["int8"]["weight_qmax"]
    model, _ = best(lab, "cls")
    assert card["int8"]["layers"] == 4 * model.bert.config.num_hidden_layers
    # the embedding tables: onnxruntime's uint8 tables, scales and zero points are the
    # reference's (quantize_table), byte for byte
    init = {i.name: numpy_helper.to_array(i) for i in onnx.load(
        os.path.join(out, "model.onnx")).graph.initializer}
    for table in ("word", "position", "token_type"):
        q, scale, zero = quantize_table(getattr(model.bert.embeddings, table).weight)
        key = f"bert.embeddings.{table}.weight"
        assert np.array_equal(init[key + "_quantized"], q.numpy()), table
        assert np.array_equal(init[key + "_scale"], scale.numpy()), table
        assert np.array_equal(init[key + "_zero_point"], zero.numpy()), table
    batch = padded_batch(37, 40, model.bert.config.vocab_size, True, seed=5)
    session = ort.InferenceSession(os.path.join(out, "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    fast = torch.from_numpy(session.run(None, {k: batch[k].numpy() for k in card["inputs"]})[0])
    with torch.no_grad():
        fp32 = model(batch)["logits"]
        same = quantize_encoder(model, qmax, "tensor")[0](batch)["logits"]
        token = quantize_encoder(model, qmax, "token")[0](batch)["logits"]
    err_same, err_token = (same - fp32).abs().max(), (token - fp32).abs().max()
    err_fast, gap = (fast - fp32).abs().max(), (fast - same).abs().max()
    print(f"int8 model: |logit| <= {fp32.abs().max():.2f}; vs fp32: fast {err_fast:.2e}, "
          f"reference(tensor) {err_same:.2e}, reference(token) {err_token:.2e}; "
          f"|fast - reference(tensor)| {gap:.1e}")
    assert 0 < err_same and gap <= err_same
    assert err_fast <= 2 * err_token
    # the int8 directory is served like any export
    # (a model of text pairs: the pair after |||)
    rows = predict_rows([out, "--backend", "onnx", "--text", "the good film ||| a fine story"],
                        tmp_path, "int8")
    assert rows[0]["label"] in ("neg", "pos")
