"""`minibert pretrain` end to end on a corpus the test writes: BERT's initialisation, the model
sizes, a tiny run whose `best/` transformers' BertForMaskedLM reads with the same logits (and
whose fill-mask output is transformers'), exact resume (including the tied decoder), continued
pretraining from a checkpoint without a head, and a checkpoint whose decoder is not tied.

Each run is a 2-layer, 128-wide model on a few thousand tokens for a handful of steps: seconds.
"""

import json

import pytest
import torch
from conftest import ATOL_FP32
from safetensors.torch import load_file

from minibert.checkpoint import load_model, save_model
from minibert.errors import UserError
from minibert.model import BertEncoder, BertForMLM
from minibert.tokenizer import Tokenizer
from tests.tiny import NEWS_WORDS as WORDS
from tests.tiny import compile_and_bf16_losses, make_corpus, tiny_tokenizer
from tests.tiny import pretrain_config as config
from train.loop.rundir import read_jsonl
from train.pretrain.pretrain import MLMObjective, run_pretrain
from train.pretrain.config import SIZES, model_config

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tiny_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    results = run_pretrain(config(corpus, out))
    return out, results


def test_sizes_are_googles_compact_berts():
    for name, (layers, hidden) in SIZES.items():
        c = model_config(name, 1000, 128, "sdpa", 0)
        assert (c.num_hidden_layers, c.hidden_size) == (layers, hidden)
        assert c.num_attention_heads == hidden // 64 and c.intermediate_size == 4 * hidden
    assert (SIZES["mini"], SIZES["base"]) == ((4, 256), (12, 768))


def test_berts_initialisation_and_tied_decoder():
    torch.manual_seed(0)
    mlm = BertForMLM(model_config("tiny", 1000, 128, "sdpa", 0))
    # the decoder *is* the word-embedding matrix: one tensor, not a copy that drifts apart
    assert mlm.head.word_embeddings.weight is mlm.bert.embeddings.word.weight
    mats = [p for n, p in mlm.named_parameters() if p.ndim == 2 and "word" not in n]
    w = torch.cat([p.flatten() for p in mats] + [mlm.bert.embeddings.word.weight[1:].flatten()])
    # the sample std of n normal draws has standard error sigma / sqrt(2 n); allow 5 of them
    assert abs(w.std().item() - 0.02) < 5 * 0.02 / (2 * w.numel()) ** 0.5
    assert abs(w.mean().item()) < 5 * 0.02 / w.numel() ** 0.5
    assert (mlm.bert.embeddings.word.weight[0] == 0).all()  # [PAD]
    for n, p in mlm.named_parameters():
        if n.endswith("bias"):
            assert (p == 0).all(), n
        if ".ln" in n and n.endswith("weight"):
            assert (p == 1).all(), n


def test_results_and_checkpoint_read_by_transformers(tiny_run):
    out, results = tiny_run
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved == results
    assert set(saved["valid"]) == {"mlm_loss", "perplexity", "mlm_accuracy"}
    assert saved["valid"]["perplexity"] == pytest.approx(2.718281828 ** saved["valid"]["mlm_loss"])
    assert saved["tokens_per_second"] > 0 and saved["train_seconds"] > 0
    assert saved["steps"] == 4

    from transformers import BertForMaskedLM
    best = str(out / "best")
    assert any(k.startswith("cls.predictions.") for k in load_file(f"{best}/model.safetensors"))
    ref = BertForMaskedLM.from_pretrained(best).eval()
    ours = load_model(best, with_head=True)
    tok = Tokenizer.from_dir(best)
    b = tok.encode_batch(["the senate voted.", "markets fell sharply on a [MASK] day."])
    with torch.no_grad():
        want = ref(**b).logits
        got = ours(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    real = b["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL_FP32, rtol=0)


def test_best_serves_fill_mask_and_finetune(tiny_run, tmp_path, capsys):
    out, results = tiny_run
    best = str(out / "best")
    assert isinstance(load_model(best), BertEncoder)  # what `minibert finetune --model` loads
    # best/ is the model that was evaluated at the best step, MLM head included: its valid loss,
    # recomputed from the files, is the one logged then (a fresh or stale head, or other
    # weights, would move it by far more than fp32 rounding)
    evals = {e["step"]: e["dev"]["mlm_loss"] for e in read_jsonl(out / "metrics.jsonl")
             if e["event"] == "eval"}
    assert results["valid"]["mlm_loss"] == pytest.approx(evals[results["best_step"]], rel=1e-5)

    # fill-mask: the top tokens and their probabilities are transformers' at the [MASK]
    from transformers import BertForMaskedLM

    from train.cli import main
    text = "the senate [MASK] on it."
    assert main(["fill-mask", best, text, "--top-k", "5"]) == 0
    (mask,) = json.loads(capsys.readouterr().out)["masks"]
    tok = Tokenizer.from_dir(best)
    b = tok.encode_batch([text])
    (where,) = (b["input_ids"][0] == tok.mask_id).nonzero()[:, 0].tolist()
    with torch.no_grad():
        probs = BertForMaskedLM.from_pretrained(best).eval()(**b).logits[0, where].softmax(-1)
    top = probs.topk(5)
    assert [m["token"] for m in mask] == [tok.id_to_token(i) for i in top.indices.tolist()]
    # printed rounded to 4 decimals: 5e-5, plus fp32 rounding between the two models
    assert [m["prob"] for m in mask] == pytest.approx(top.values.tolist(), abs=6e-5)

    # fine-tuning starts from best/'s encoder: with the backbone frozen (a linear probe) the
    # fine-tuned checkpoint holds it bit for bit
    from train.finetune.finetune import load_task_model, run_finetune
    from train.finetune.config import FinetuneConfig
    rows = [{"text": " ".join(WORDS[i:i + 6]), "label": i % 2} for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_finetune(FinetuneConfig(model=best, train=str(data), dev=str(data),
                                      out=str(tmp_path / "ft"), max_steps=2, batch_size=4,
                                      threads=1, device="cpu", freeze_backbone=True,
                                      warmup_steps=0, lr_head=1e-2))
    notes = []
    pretrained = load_model(best, notes=notes).state_dict()
    # MLM never trains the pooler, so best/ stores none (as transformers' BertForMaskedLM), and
    # loading says it is fresh; each load draws its own, so it is left out of the comparison
    assert any("pooler absent" in n for n in notes), notes
    tuned, task = load_task_model(str(tmp_path / "ft" / "best"), "cpu")
    assert tuned.bert.state_dict().keys() == pretrained.keys()
    for k, v in tuned.bert.state_dict().items():
        assert k.startswith("pooler.") or torch.equal(v, pretrained[k]), k
    # and the dev accuracy reported is that model's, recomputed here text by text
    with torch.no_grad():
        pred = [task.labels[tuned(tok.encode_batch([r["text"]]))["logits"].argmax().item()]
                for r in rows]
    acc = sum(p == str(r["label"]) for p, r in zip(pred, rows)) / len(rows)
    assert res["dev"]["accuracy"] == pytest.approx(acc)


def test_exact_resume_after_time_budget_with_tied_weights(corpus, tiny_run, tmp_path, capsys):
    # one tokenizer for both runs: WordPiece training in `tokenizers` breaks ties between equally
    # frequent merges differently from run to run, so two trained vocabularies may differ (a
    # resumed run reads its own RUN/tokenizer back, so resume itself is not affected)
    tok = str(tiny_run[0] / "tokenizer")
    straight = tmp_path / "straight"
    run_pretrain(config(corpus, straight, eval_every=None, tokenizer=tok))
    # max_minutes=0 stops after the first step, evaluates and saves state, as a killed run
    # would have left it at its last save; the resumed run must then match the straight one
    cut = tmp_path / "cut"
    run_pretrain(config(corpus, cut, eval_every=None, max_minutes=0, tokenizer=tok))
    state = load_file(str(cut / "state" / "model.safetensors"))
    word = "mlm.bert.embeddings.word.weight"
    assert word in state and "mlm.head.word_embeddings.weight" not in state  # stored once
    assert json.load(open(cut / "state" / "trainer.json"))["step"] == 1
    run_pretrain(config(corpus, cut, eval_every=None, tokenizer=tok), resume=True)
    assert "resumed from" in capsys.readouterr().err
    a = load_file(str(straight / "state" / "model.safetensors"))
    b = load_file(str(cut / "state" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the tie survives a load: the decoder of the reloaded best/ is the embedding matrix again
    mlm = load_model(str(cut / "best"), with_head=True)
    assert mlm.head.word_embeddings.weight is mlm.bert.embeddings.word.weight


def test_compile_and_bf16_on_cpu_train_the_same_model(corpus, tiny_run, tmp_path, capsys,
                                                      monkeypatch):
    # the README's pretraining command runs `--precision bf16 --compile` on a CPU: the compiled
    # and bf16 runs against the eager one (tests/tiny.py: compile_and_bf16_losses), then fp32
    # weights saved by the bf16 run
    tok = str(tiny_run[0] / "tokenizer")

    def train(name, **kw):
        run_pretrain(config(corpus, tmp_path / name, eval_every=None, tokenizer=tok, dropout=0.0,
                            max_steps=3, **kw))
        return str(tmp_path / name)

    compile_and_bf16_losses(monkeypatch, capsys, train)
    weights = load_file(str(tmp_path / "bf16" / "best" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_continued_pretraining_creates_a_missing_head(corpus, tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    enc_dir = str(tmp_path / "encoder-only")  # like MiniLM: a BertModel, no cls.predictions.*
    save_model(load_model(str(out / "best")), enc_dir, Tokenizer.from_dir(str(out / "best")))
    capsys.readouterr()
    cfg = config(corpus, tmp_path / "cont", config=None, init_from=enc_dir, max_steps=2)
    run_pretrain(cfg)
    assert "no MLM head (cls.predictions.*) in the checkpoint; created fresh" in \
        capsys.readouterr().err
    # it continued from the checkpoint: AdamW moves a weight by at most ~lr per step (|m/sqrt(v)|
    # <= 1.001 in the first steps with betas (0.9, 0.98); weight decay adds lr * 0.01 * |w|), so
    # after 2 steps at lr <= 1e-3 no encoder weight is more than 2.5e-3 from the checkpoint's.
    # An encoder initialised afresh differs by ~0.03 (N(0, 0.02) draws on both sides).
    assert (cfg.max_steps, cfg.lr) == (2, 1e-3)
    start = load_model(enc_dir).state_dict()
    cont = load_model(str(tmp_path / "cont" / "best")).state_dict()
    assert cont.keys() == start.keys()
    drift = {k: (cont[k] - start[k]).abs().max().item() for k in start}
    assert max(drift.values()) < 2.5e-3, drift
    assert max(drift.values()) > 0  # and it did train
    with pytest.raises(ValueError, match="drop --config"):
        config(corpus, tmp_path / "x", init_from=enc_dir)
    # a --max-len past the checkpoint's positions is named before anything trains
    positions = load_model(enc_dir).config.max_position_embeddings
    with pytest.raises(UserError, match=f"^--max-len {positions + 1}: {enc_dir} has positions"):
        run_pretrain(config(corpus, tmp_path / "long", config=None, init_from=enc_dir,
                            max_len=positions + 1))


def test_a_decoder_that_differs_from_the_embeddings_is_reported_and_tied(tmp_path):
    """A checkpoint trained with an untied decoder (tie_word_embeddings=False): minibert ties
    the decoder to the word embeddings (minibert/checkpoint.py), says so, and then computes what
    transformers computes with the decoder tied the same way, not the untied model's logits."""
    from transformers import BertConfig as HFConfig
    from transformers import BertForMaskedLM

    from conftest import randomize_
    cfg = HFConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    ref = randomize_(BertForMaskedLM(cfg), seed=0).eval()
    decoder = ref.cls.predictions.decoder.weight
    assert decoder is not ref.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        decoder.copy_(torch.randn(decoder.shape, generator=torch.Generator().manual_seed(1)))
        # untied, transformers 5 gives the decoder its own bias too; a checkpoint written by
        # transformers 4 (which always linked them) has one bias, as here
        ref.cls.predictions.decoder.bias.copy_(ref.cls.predictions.bias)
    ref.save_pretrained(str(tmp_path))
    assert "cls.predictions.decoder.weight" in load_file(str(tmp_path / "model.safetensors"))

    notes = []
    ours = load_model(str(tmp_path), with_head=True, notes=notes)
    assert any("cls.predictions.decoder.weight differs from the word embeddings; minibert ties "
               "them and uses the word embeddings" in n for n in notes), notes
    assert torch.equal(ours.head.word_embeddings.weight,
                       ref.bert.embeddings.word_embeddings.weight)
    ids = torch.randint(5, 60, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        untied = ref(input_ids=ids, attention_mask=mask).logits
        decoder.copy_(ref.bert.embeddings.word_embeddings.weight)
        tied = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    torch.testing.assert_close(got, tied, atol=ATOL_FP32, rtol=0)
    assert (got - untied).abs().max() > 100 * ATOL_FP32


def test_a_fresh_run_trains_its_own_tokenizer_over_a_leftover_one(corpus, tmp_path):
    # an attempt killed before its first save leaves RUN/tokenizer/, made for another config
    out = tmp_path / "run"
    leftover = tiny_tokenizer()  # the sentiment words, none of the news corpus's
    leftover.save(str(out / "tokenizer"))
    run_pretrain(config(corpus, out, max_steps=1, eval_every=None))
    vocab = Tokenizer.from_dir(str(out / "tokenizer")).tok.get_vocab()
    assert len(vocab) != leftover.vocab_size and "senate" in vocab


def test_a_valid_text_with_nothing_masked_is_named(corpus, tmp_path):
    # it would score loss 0 and perplexity 1 at every evaluation, and best/ would never move
    short = tmp_path / "short.txt"
    short.write_text("the senate voted.\n")
    with pytest.raises(UserError, match=f"^--valid {short}: no token was chosen"):
        run_pretrain(config(corpus, tmp_path / "run", valid=str(short), mask_prob=0.01))


def test_a_run_that_spent_its_time_budget_resumes_to_no_more_steps(corpus, tiny_run, tmp_path,
                                                                   monkeypatch):
    import time
    import train.pretrain.pretrain as module
    real = module.evaluate

    def slow(*a, **kw):  # an evaluation that takes time, as a real one does
        time.sleep(0.3)
        return real(*a, **kw)
    monkeypatch.setattr(module, "evaluate", slow)
    tok = str(tiny_run[0] / "tokenizer")
    cut = config(corpus, tmp_path / "cut", eval_every=None, max_minutes=0, tokenizer=tok)
    run_pretrain(cut)
    first = json.load(open(tmp_path / "cut" / "results.json"))
    run_pretrain(cut, resume=True)  # as `minibert pretrain --resume RUN` reads it back
    assert json.load(open(tmp_path / "cut" / "state" / "trainer.json"))["step"] == 1
    again = json.load(open(tmp_path / "cut" / "results.json"))
    assert again["steps"] == 1
    assert again["train_seconds"] == first["train_seconds"]  # no step: no time added or lost


def test_out_of_memory_stops_in_one_line_and_keeps_the_state(corpus, tiny_run, tmp_path,
                                                            monkeypatch):
    real, calls = MLMObjective.forward, [0]

    def forward(self, batch):  # the third training step asks the CPU allocator for too much
        calls[0] += self.training
        if calls[0] == 3 and self.training:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                               "8589934592 bytes. Error code 12 (Cannot allocate memory)")
        return real(self, batch)
    monkeypatch.setattr(MLMObjective, "forward", forward)
    cfg = config(corpus, tmp_path / "run", tokenizer=str(tiny_run[0] / "tokenizer"))
    with pytest.raises(SystemExit, match=r"^minibert pretrain: out of memory in step 3 .*"
                                         r"--grad-accum \(now 1\), which keeps the batch"):
        run_pretrain(cfg)
    assert json.load(open(tmp_path / "run" / "state" / "trainer.json"))["step"] == 2


def test_out_holding_a_checkpoint_or_tokenizer_is_refused_and_left_intact(corpus, tiny_run,
                                                                          tmp_path, capsys):
    """`--out` given the model's own directory (continuing "in place") would replace its
    config.json and weights; refused before anything is written there, a lock file included."""
    from tests.tiny import make_checkpoint, make_sentiment
    from train.cli import main
    ckpt = make_checkpoint(tmp_path / "ckpt", mlm=True)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    with pytest.raises(UserError, match=f"^{ckpt}/model.safetensors: {ckpt} holds a checkpoint"):
        run_pretrain(config(corpus, ckpt, config=None, init_from=str(ckpt)))
    data = make_sentiment(tmp_path / "data")
    assert main(["finetune", "--model", str(ckpt), "--train", f"{data}/train.jsonl", "--out",
                 str(ckpt), "--threads", "1"]) == 2
    assert "holds a checkpoint or a tokenizer" in capsys.readouterr().err
    # tokenizer train: over a model's vocabulary no, over an earlier tokenizer yes
    assert main(["tokenizer", "train", "--corpus", str(corpus / "train.txt"), "--out",
                 str(ckpt)]) == 2
    assert "holds a checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    for _ in range(2):
        assert main(["tokenizer", "train", "--corpus", str(corpus / "train.txt"), "--vocab-size",
                     "100", "--out", str(tmp_path / "tok")]) in (0, None)


def test_flags_that_cannot_work_are_refused_before_the_tokenizer_is_trained(corpus, tmp_path,
                                                                            capsys):
    from tests.tiny import make_checkpoint
    from train.cli import main
    ckpt = make_checkpoint(tmp_path / "ckpt", mlm=True)  # 64 positions
    (tmp_path / "texts").mkdir()
    train = str(corpus / "train.txt")
    for flags, why in (
            (["--config", "tinny", "--corpus", train], "--config 'tinny': neither a size"),
            (["--config", "tiny", "--corpus", str(tmp_path / "texts")],
             f"--corpus {tmp_path / 'texts'}: a directory; give its files"),
            (["--init-from", str(ckpt), "--corpus", train, "--max-len", "128"],
             f"--max-len 128: {ckpt} has positions for 64 tokens")):
        out = tmp_path / "run"
        try:  # a refused flag is a SystemExit with the line, an input error 2 and the line
            said = main(["pretrain", *flags, "--out", str(out), "--cache-dir",
                         str(tmp_path / "cache")]) == 2 and capsys.readouterr().err
        except SystemExit as e:
            said = str(e)
        assert why in said
        assert not (tmp_path / "cache").exists() and not (out / "tokenizer").exists()


def test_resume_refuses_a_corpus_or_tokenizer_changed_since_the_start(corpus, tiny_run, tmp_path):
    """A resume on a changed corpus recomputed the schedule for another size and went on with
    no word; one on a retrained tokenizer went on with other token ids. Both are refused."""
    import dataclasses
    import shutil
    train, tok = tmp_path / "train.txt", tmp_path / "tok"
    shutil.copy(corpus / "train.txt", train)
    shutil.copytree(tiny_run[0] / "tokenizer", tok)
    cut = dataclasses.replace(config(corpus, tmp_path / "cut", eval_every=None, max_minutes=0,
                                     tokenizer=str(tok)), corpus=[str(train)])
    run_pretrain(cut)
    saved = json.loads((tmp_path / "cut" / "inputs.json").read_text())
    assert set(saved) == {str(train), str(corpus / "valid.txt"), str(tok / "tokenizer.json"),
                          str(tok / "vocab.txt")}
    original = train.read_bytes()
    train.write_bytes(original[: len(original) // 2])
    with pytest.raises(UserError, match=f"^{train}: changed since this run started"):
        run_pretrain(cut, resume=True)
    train.write_bytes(original)
    (tok / "vocab.txt").write_text((tok / "vocab.txt").read_text() + "newword\n")
    with pytest.raises(UserError, match=f"^{tok / 'vocab.txt'}: changed since this run started"):
        run_pretrain(cut, resume=True)
    (tok / "vocab.txt").unlink()
    with pytest.raises(UserError, match=f"^{tok / 'vocab.txt'}: this run read it at its start"):
        run_pretrain(cut, resume=True)
    assert json.load(open(tmp_path / "cut" / "state" / "trainer.json"))["step"] == 1


def test_a_vocab_size_that_a_given_tokenizer_makes_unused_is_said(corpus, tiny_run, tmp_path,
                                                                  capsys):
    tok = str(tiny_run[0] / "tokenizer")
    run_pretrain(config(corpus, tmp_path / "r", tokenizer=tok, vocab_size=50, max_steps=1,
                        eval_every=None))
    err = capsys.readouterr().err
    assert "note: --vocab-size 50 sizes a tokenizer trained on the corpus; --tokenizer brings " \
        "its own; it is ignored" in err
    from train.pretrain.config import PretrainConfig
    run_pretrain(config(corpus, tmp_path / "r2", tokenizer=tok, max_steps=1, eval_every=None,
                        vocab_size=PretrainConfig.vocab_size))
    assert "--vocab-size" not in capsys.readouterr().err  # not given: nothing to say
