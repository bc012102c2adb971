"""Token tagging: entity scoring on textbook cases and against the `seqeval` package, BIO repair,
first-piece labels, CoNLL reading, and a tiny end-to-end run with and without the CRF."""

import json
import os
import random

import pytest
from safetensors.torch import load_file

from tests.tiny import FILLER, NEGATIVE, POSITIVE, make_checkpoint, tiny_tokenizer
from train.data.examples import DataError
from train.finetune.finetune import run_finetune
from train.finetune.config import FinetuneConfig
from train.cli import main
from train.tasks.seqeval import entity_scores, is_bio, repair_bio, spans, token_scores
from train.tasks.tagging import TaggedDataset, TokenTask, read_tagged


def test_textbook_entity_scores():
    # seqeval's README example: one of two predicted entities is right (MISC starts one token
    # early), one of two gold entities is found -> P = R = F1 = 0.5
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    m = entity_scores(gold, pred)
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)
    # a wrong type is wrong even with the right span; a partial span is wrong even of the right
    # type: P = 1/3 (only LOC), R = 1/3 -> F1 = 1/3
    gold = [["B-PER", "I-PER", "O", "B-ORG", "O", "B-LOC"]]
    pred = [["B-ORG", "I-ORG", "O", "B-ORG", "I-ORG", "B-LOC"]]
    m = entity_scores(gold, pred)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(1 / 3)
    # nothing predicted: P = R = F1 = 0, not an error
    assert entity_scores([["B-PER"]], [["O"]])["f1"] == 0.0


def test_bio_repair_and_spans():
    assert repair_bio(["I-PER", "I-PER", "O", "I-LOC", "B-ORG", "I-LOC", "I-LOC"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-ORG", "B-LOC", "I-LOC"]
    assert spans(["B-PER", "I-PER", "O", "I-LOC", "B-ORG", "I-LOC"]) == \
        [("PER", 0, 1), ("LOC", 3, 3), ("ORG", 4, 4), ("LOC", 5, 5)]
    assert is_bio(["O", "B-X", "I-X"]) and not is_bio(["NN", "VB"]) and not is_bio(["B-"])


def random_tags(rng, n):
    return [rng.choice(["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC"]) for _ in range(n)]


def test_agrees_with_the_seqeval_package_on_random_sequences():
    import seqeval.metrics as seqeval  # a reference no one here wrote (test extra)
    rng = random.Random(0)
    gold, pred = [], []
    for _ in range(200):
        n = rng.randint(1, 12)
        gold.append(repair_bio(random_tags(rng, n)))  # gold is valid BIO
        pred.append(random_tags(rng, n))  # predictions may be invalid: conlleval's reading
    m = entity_scores(gold, pred)
    assert m["precision"] == pytest.approx(seqeval.precision_score(gold, pred), abs=1e-12)
    assert m["recall"] == pytest.approx(seqeval.recall_score(gold, pred), abs=1e-12)
    assert m["f1"] == pytest.approx(seqeval.f1_score(gold, pred), abs=1e-12)


def test_token_accuracy_reads_gold_and_predictions_alike():
    # a gold file that starts an entity with I- (IOB1 habits): the model's tags, repaired before
    # scoring, equal it entity for entity, and token by token once both read as BIO
    gold = [["I-PER", "I-PER", "O", "I-LOC"]]
    m = entity_scores(gold, [repair_bio(gold[0])])
    assert (m["f1"], m["accuracy"]) == (1.0, 1.0)
    assert entity_scores(gold, [["O", "I-PER", "O", "B-LOC"]])["accuracy"] == 0.5


def test_labels_sit_on_first_pieces_only():
    tok = tiny_tokenizer()
    sents = [(["goodly", "film", "goods"], ["B-X", "O", "B-X"], "t:1", "", [])]
    ds = TaggedDataset(sents, tok, 32, {"O": 0, "B-X": 1}, 4)
    b = ds.collate([0])
    assert [tok.id_to_token(i) for i in b["input_ids"][0].tolist()] == \
        ["[CLS]", "good", "##ly", "film", "good", "##s", "[SEP]"]
    assert b["labels"][0].tolist() == [-100, 1, -100, 0, 1, -100, -100]
    assert b["first"][0].tolist() == [False, True, False, True, True, False, False]


def test_conll_reading_and_errors(tmp_path):
    p = tmp_path / "a.conll"
    p.write_text("-DOCSTART- O\n\nthe DT O\nfilm NN B-X\n\t\ngood JJ O\n")
    assert [(w, t) for w, t, _ in read_tagged(str(p))] == \
        [(["the", "film"], ["O", "B-X"]), (["good"], ["O"])]
    p.write_text("the O\nfilm\n")
    with pytest.raises(DataError, match=r"a.conll:2: expected 'token tag'"):
        read_tagged(str(p))
    q = tmp_path / "b.jsonl"
    q.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    with pytest.raises(DataError, match=r"b.jsonl:1: 'tags' must be a list as long"):
        read_tagged(str(q))


def test_both_scorings_report_every_name_metric_accepts():
    for score in (entity_scores, token_scores):  # BIO tags, and other tag sets
        assert set(score([["O", "B-X"]], [["O", "B-X"]])) | {"loss"} >= set(TokenTask.metrics)


def test_tagged_files_are_split_at_newlines_only(tmp_path):
    # raw U+2028 and U+0085 inside a JSON string (json.dumps escapes them; other writers do not)
    q = tmp_path / "a.jsonl"
    q.write_bytes('{"tokens": ["a\u2028b", "c\x85"], "tags": ["O", "B-X"]}\n'.encode())
    assert [(w, t, where[-2:]) for w, t, where in read_tagged(str(q))] == \
        [(["a\u2028b", "c\x85"], ["O", "B-X"], ":1")]
    # a byte-order mark before CoNLL's document marker
    p = tmp_path / "a.conll"
    p.write_bytes(b"\xef\xbb\xbf-DOCSTART- O\n\nthe O\nfilm B-X\n")
    assert [(w, where[-2:]) for w, _, where in read_tagged(str(p))] == [(["the", "film"], ":3")]


def test_tagged_files_that_cannot_be_read_are_named(tmp_path):
    q = tmp_path / "a.jsonl"
    q.write_text(json.dumps({"tokens": ["a", "b"], "tags": [0, 3]}) + "\n")  # HF's ner_tags
    with pytest.raises(DataError, match=r"a.jsonl:1: 'tags' must be tag names .* not 0"):
        read_tagged(str(q))
    q.write_text('{"tokens": ["a"], "tags": ["O"]}\n["a", "O"]\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: not a JSON object"):
        read_tagged(str(q))
    p = tmp_path / "a.conll"
    p.write_bytes(b"the O\n\ncaf\xe9 O\n")
    with pytest.raises(DataError, match=r"a.conll:3: not UTF-8"):
        read_tagged(str(p))


def make_ner(path, n, seed):
    """Entities: a sentiment word (B-POS / B-NEG), sometimes continued by 'story' (I-...)."""
    rng = random.Random(seed)
    filler = [w for w in FILLER if w != "story"]
    with open(path, "w") as f:
        for _ in range(n):
            words = rng.sample(filler, rng.randint(2, 5))
            tags = ["O"] * len(words)
            at = rng.randint(0, len(words))
            pos = rng.random() < 0.5
            ent = [rng.choice(POSITIVE if pos else NEGATIVE)] + (["story"] if rng.random() < .5
                                                                 else [])
            typ = "POS" if pos else "NEG"
            words[at:at] = ent
            tags[at:at] = ["B-" + typ] + ["I-" + typ] * (len(ent) - 1)
            f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ner(tmp_path_factory):
    d = tmp_path_factory.mktemp("ner")
    return (str(make_checkpoint(d / "ckpt")), make_ner(d / "train.jsonl", 96, 0),
            make_ner(d / "dev.jsonl", 32, 1))


@pytest.mark.parametrize("crf", [False, True])
def test_learns_entities_and_predicts_spans(ner, tmp_path, crf):
    ckpt, train, dev = ner
    cfg = FinetuneConfig(model=ckpt, task="tokens", train=train, dev=dev, out=str(tmp_path / "r"),
                         batch_size=8, epochs=8, lr=3e-3, lr_head=1e-2, eval_every=None,
                         log_every=50, threads=1, crf=crf, bio_constraints=crf, seed=0,
                         hidden_dropout=0.0, attention_dropout=0.0)
    res = run_finetune(cfg)
    # Without a CRF this tiny model tags 'story' I-POS after either sentiment word (it has not
    # learned to look left), which repair turns into a wrong B-POS; the CRF's transitions (and
    # constraints) settle the type from the B- tag before it.
    assert res["dev"]["f1"] > (0.95 if crf else 0.6), res["dev"]
    assert set(res["dev"]) >= set(TokenTask.metrics)  # every name --metric accepts
    out = tmp_path / "pred.jsonl"

    assert main(["predict", "--model", str(tmp_path / "r"), "--text", "the film was superb story and dull",
                 "--output", str(out), "--batch-size", "8", "--device", "cpu"]) == 0
    row = json.loads(out.read_text())
    ents = {(e["type"], e["text"]) for e in row["entities"]}
    assert ("POS", "superb story") in ents and ("NEG", "dull") in ents, row
    for e in row["entities"]:
        assert row["text"][e["start"]:e["end"]] == e["text"]
    # a blank line is answered, with no tokens, so that output line N answers input line N;
    # alone in a batch too
    for texts in (["the film was dull", "", "superb story"], [""]):
        assert main(["predict", str(tmp_path / "r"), "--output", str(out), "--device", "cpu",
                     *[a for t in texts for a in ("--text", t)]]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["text"] for r in rows] == texts
        assert [len(r["tokens"]) for r in rows] == [len(t.split()) for t in texts]
        assert all(r["entities"] == [] for r, t in zip(rows, texts) if not t)
    if crf:  # the CRF's parameters and penalties are saved with the head
        head = load_file(os.path.join(tmp_path / "r", "best", "head.safetensors"))
        assert "crf.transitions" in head and "crf.trans_penalty" in head


@pytest.mark.parametrize("crf", [False, True])
def test_dev_loss_does_not_depend_on_the_evaluation_batch_size(crf):
    # a softmax tagger's loss is a mean over words, a CRF's over sentences: either way the whole
    # set's mean, however it is cut into batches
    import torch
    from minibert.model import BertEncoder
    from tests.tiny import tiny_config
    from train.tasks.task import TaskModel
    words = ["good", "film", "bad", "plot", "the", "movie", "was", "very"]
    rows = [(words[:n], ["B-X" if w in ("good", "bad") else "O" for w in words[:n]], f"t:{n}")
            for n in range(1, 9)]
    task = TokenTask({"task": "tokens", "labels": ["O", "B-X"], "scheme": "bio", "crf": crf,
                      "bio_constraints": False, "fallback_tag": "O", "max_length": 16})
    torch.manual_seed(0)
    model = TaskModel(BertEncoder(tiny_config()), task.build_head(32, 0.0))
    losses = [task.evaluate(model, task._dataset(rows, tiny_tokenizer(), bs), "cpu")["loss"]
              for bs in (1, 3, 8)]
    assert losses[0] == pytest.approx(losses[2], rel=1e-5)
    assert losses[1] == pytest.approx(losses[2], rel=1e-5)
