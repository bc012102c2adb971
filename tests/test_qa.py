"""Extractive QA: SQuAD's EM/F1 against the official v1.1 evaluation script, windows that map
answers back to the exact characters, and a tiny end-to-end run whose contexts need several
windows."""

import json
import random
import re
import string
from collections import Counter

import pytest

from tests.tiny import FILLER, NEGATIVE, POSITIVE, make_checkpoint, tiny_tokenizer
from train.data.examples import DataError
from train.finetune.finetune import load_task_model, run_finetune
from train.finetune.config import FinetuneConfig
from train.tasks.qa import QADataset, QAExample, QATask, read_squad
from train.tasks.squad_eval import exact_match, f1, normalize_answer, squad_scores


class OfficialSquadV11:
    """SQuAD v1.1's official evaluation script (evaluate-v1.1.py, Rajpurkar et al. 2016, as
    published with the data set), its scoring functions copied unchanged apart from this wrapper
    and the stderr message: the reference that no one here wrote."""

    @staticmethod
    def normalize_answer(s):
        """Lower text and remove punctuation, articles and extra whitespace."""
        def remove_articles(text):
            return re.sub(r'\b(a|an|the)\b', ' ', text)

        def white_space_fix(text):
            return ' '.join(text.split())

        def remove_punc(text):
            exclude = set(string.punctuation)
            return ''.join(ch for ch in text if ch not in exclude)

        def lower(text):
            return text.lower()

        return white_space_fix(remove_articles(remove_punc(lower(s))))

    @classmethod
    def f1_score(cls, prediction, ground_truth):
        prediction_tokens = cls.normalize_answer(prediction).split()
        ground_truth_tokens = cls.normalize_answer(ground_truth).split()
        common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
        num_same = sum(common.values())
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(prediction_tokens)
        recall = 1.0 * num_same / len(ground_truth_tokens)
        f1 = (2 * precision * recall) / (precision + recall)
        return f1

    @classmethod
    def exact_match_score(cls, prediction, ground_truth):
        return (cls.normalize_answer(prediction) == cls.normalize_answer(ground_truth))

    @staticmethod
    def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
        scores_for_ground_truths = []
        for ground_truth in ground_truths:
            score = metric_fn(prediction, ground_truth)
            scores_for_ground_truths.append(score)
        return max(scores_for_ground_truths)

    @classmethod
    def evaluate(cls, dataset, predictions):
        f1 = exact_match = total = 0
        for article in dataset:
            for paragraph in article['paragraphs']:
                for qa in paragraph['qas']:
                    total += 1
                    if qa['id'] not in predictions:
                        continue  # 'Unanswered question ... will receive score 0.'
                    ground_truths = list(map(lambda x: x['text'], qa['answers']))
                    prediction = predictions[qa['id']]
                    exact_match += cls.metric_max_over_ground_truths(
                        cls.exact_match_score, prediction, ground_truths)
                    f1 += cls.metric_max_over_ground_truths(
                        cls.f1_score, prediction, ground_truths)

        exact_match = 100.0 * exact_match / total
        f1 = 100.0 * f1 / total

        return {'exact_match': exact_match, 'f1': f1}


# Answers whose scores depend on the order of the normalisation steps (punctuation before
# articles: "the-end" is one word "theend", not "end"), on what counts as punctuation (ASCII only:
# curly quotes and dashes stay), on whole-word articles ("theatre", "ant"), case, whitespace and
# repeated words.
TRICKY = ["the-end", "The end.", "end", "theend", "a.m. train", "am train", "an ant",
          "Theatre's", "theatres", "“Denver”", "Denver", "Denver—Broncos", "Denver Broncos",
          "the the cat", "cat  cat", "A", "", "  ", "U.S.A", "usa", "l'an", "lan", "b b c",
          "b c c", "an-the", "é the", "É", "4.5%", "45"]


def test_squad_scores_equal_the_official_script():
    pairs = [(p, g) for p in TRICKY for g in TRICKY]
    for p, g in pairs:
        assert normalize_answer(p) == OfficialSquadV11.normalize_answer(p), p
        assert exact_match(p, g) == float(OfficialSquadV11.exact_match_score(p, g)), (p, g)
        assert f1(p, g) == pytest.approx(OfficialSquadV11.f1_score(p, g), abs=1e-12), (p, g)
    # a corpus: several gold answers per question, some questions unanswered
    rng = random.Random(0)
    qas = [{"id": f"q{i}", "answers": [{"text": t} for t in rng.sample(TRICKY, rng.randint(1, 3))]}
           for i in range(200)]
    predictions = {q["id"]: rng.choice(TRICKY) for q in qas if rng.random() < 0.9}
    want = OfficialSquadV11.evaluate([{"paragraphs": [{"qas": qas}]}], predictions)
    got = squad_scores(predictions, {q["id"]: [a["text"] for a in q["answers"]] for q in qas})
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < want["exact_match"] < 100 and 0 < want["f1"] < 100  # neither all right nor wrong


def test_unanswered_question_scores_zero():
    # The official script skips a question without a prediction: 0 for EM and F1, even when the
    # gold answer normalises to nothing ("A", "The"), which the empty string would match exactly.
    golds = {"q1": ["The"], "q2": ["A"], "q3": ["Denver"]}
    assert OfficialSquadV11.evaluate(
        [{"paragraphs": [{"qas": [{"id": q, "answers": [{"text": a} for a in answers]}
                                  for q, answers in golds.items()]}]}], {}) == \
        {"exact_match": 0.0, "f1": 0.0}
    assert squad_scores({}, golds) == {"exact_match": 0.0, "f1": 0.0}


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("the-end") == "theend"  # punctuation goes first: no article left
    assert exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    # pred "cat sat on" (3 words) vs gold "the cat sat" (2 words after normalising): overlap 2,
    # P = 2/3, R = 1 -> F1 = 0.8
    assert f1("cat sat on", "the cat sat") == pytest.approx(0.8)
    assert f1("dog", "cat") == 0.0
    # words are a multiset: {b, b, c} and {b, c, c} share one b and one c -> P = R = 2/3
    assert f1("b b c", "b c c") == pytest.approx(2 / 3)
    # best over gold answers, mean over questions, percent; a missing prediction scores 0
    s = squad_scores({"q1": "Denver Broncos", "q2": "x"},
                     {"q1": ["Broncos", "Denver Broncos"], "q2": ["y"], "q3": ["z"]})
    assert s == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(100 / 3)}


def make_squad(path, n, seed, words=24):
    """The answer is the context's one positive word; contexts are longer than one window."""
    rng = random.Random(seed)
    paras = []
    for q in range(n):
        ctx_words = [rng.choice(FILLER + NEGATIVE) for _ in range(words)]
        ans = rng.choice(POSITIVE)
        ctx_words.insert(rng.randint(0, words), ans)
        ctx = " ".join(ctx_words)
        start = ctx.index(" " + ans + " ") + 1 if f" {ans} " in ctx else ctx.index(ans)
        paras.append({"context": ctx, "qas": [{"id": f"q{q}", "question": "the good",
                                               "answers": [{"text": ans, "answer_start": start}]}]})
    with open(path, "w") as f:
        json.dump({"version": "1.1", "data": [{"title": "t", "paragraphs": paras}]}, f)
    return str(path)


def test_windows_map_answers_back_to_their_characters(tmp_path):
    tok = tiny_tokenizer()
    ctx = "the movie was a plot and very goodly lovely film story it was boring and dull"
    start = ctx.index("goodly lovely")
    ex = QAExample("x", "the film", ctx, [("goodly lovely", start)], "t")
    ds = QADataset([ex], tok, max_length=12, doc_stride=3, batch_size=4)
    assert len(ds.windows) > 2  # the context needed several windows
    found = 0
    for (_, enc), (a, b) in zip(ds.windows, ds.positions):
        if (a, b) == (0, 0):
            continue
        found += 1
        assert ctx[enc.offsets[a][0]:enc.offsets[b][1]] == "goodly lovely"
        assert enc.sequence_ids[a] == enc.sequence_ids[b] == 1
    assert found >= 1
    # consecutive windows share --doc-stride context tokens
    w0, w1 = ds.windows[0][1], ds.windows[1][1]
    ctx0 = [o for o, s in zip(w0.offsets, w0.sequence_ids) if s == 1]
    ctx1 = [o for o, s in zip(w1.offsets, w1.sequence_ids) if s == 1]
    assert ctx0[-3:] == ctx1[:3]


def test_an_answer_ending_in_an_accent_of_nfd_text_is_labelled_as_in_nfc():
    """The normalizer drops a combining accent (NFD text), so no token's offsets reached the
    answer's last character: its label ran a word too long, or to [CLS] at the context's end."""
    import unicodedata
    from minibert.tokenizer import Tokenizer, build_wordpiece
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "who", "wrote", "it", "?", "by",
             "andre", "gide", "in", "paris", "."]
    tok = Tokenizer(build_wordpiece({w: i for i, w in enumerate(words)}))
    labels = {}
    for form in ("NFC", "NFD"):
        for ctx in ("by André Gidé in Paris.", "by André Gidé"):
            ctx = unicodedata.normalize(form, ctx)
            answer = unicodedata.normalize(form, "André Gidé")
            ex = QAExample("x", "who wrote it?", ctx, [(answer, ctx.index(answer))], "t")
            labels[form, ctx[-3:] == "is."] = QADataset([ex], tok, 64, 16, 1).positions
    assert labels["NFD", True] == labels["NFC", True] and labels["NFD", False] == \
        labels["NFC", False] != [(0, 0)]
    # a tokenizer that keeps accents reads the mark as a piece of its own: the label keeps it
    cased = Tokenizer(build_wordpiece({w: i for i, w in enumerate(
        words[:5] + ["who", "by", "André", "Gide", "##\u0301", "?"])}, lowercase=False,
        strip_accents=False))
    ctx = unicodedata.normalize("NFD", "by André Gidé")
    ex = QAExample("x", "who?", ctx, [(ctx[3:], 3)], "t")
    ds = QADataset([ex], cased, 64, 16, 1)
    (a, b), = ds.positions
    enc = ds.windows[0][1]
    assert enc.tokens[b] == "##\u0301" and ctx[enc.offsets[a][0]:enc.offsets[b][1]] == ctx[3:]


def test_misplaced_answer_names_the_question(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"data": [{"paragraphs": [{"context": "good film", "qas": [
        {"id": "q7", "question": "the", "answers": [{"text": "film", "answer_start": 0}]}]}]}]}))
    with pytest.raises(DataError, match=r"qas\[0\] \(id 'q7'\): answer 'film' is not at character"):
        read_squad(str(p))


def test_learns_spans_across_windows_and_predicts_text(tmp_path):
    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    train, dev = make_squad(tmp_path / "train.json", 64, 0), make_squad(tmp_path / "dev.json",
                                                                        24, 1)
    cfg = FinetuneConfig(model=ckpt, task="qa", train=train, dev=dev, out=str(tmp_path / "r"),
                         max_length=24, doc_stride=6, max_answer_len=5, batch_size=16, epochs=6,
                         lr=3e-3, lr_head=1e-2, eval_every=None, log_every=50, threads=1,
                         hidden_dropout=0.0, attention_dropout=0.0)
    res = run_finetune(cfg)
    assert res["dev"]["exact_match"] > 80, res["dev"]
    assert set(res["dev"]) >= set(QATask.metrics)  # every name --metric accepts
    model, task = load_task_model(str(tmp_path / "r" / "best"), "cpu")
    ctx = "the movie was dull and boring but the story was lovely and the plot very poor"
    ds = task.read_inputs([f"the good ||| {ctx}"], None, tiny_tokenizer(), 4)
    (row,) = task.predict(model, ds, "cpu")
    assert row["answer"] == "lovely" and ctx[row["start"]:row["end"]] == "lovely", row


def test_qa_runs_with_the_default_length_and_stride(tmp_path):
    # BERT's SQuAD runs share 128 tokens between windows of 384; a fixed --doc-stride 128 did
    # not fit the default --max-length 128. The stride now follows the length.
    assert FinetuneConfig(task="qa").doc_stride == 42  # --max-length 128 // 3
    assert FinetuneConfig(task="qa", max_length=384).doc_stride == 128
    assert FinetuneConfig(task="qa", max_length=384, doc_stride=64).doc_stride == 64
    with pytest.raises(ValueError, match=r"--doc-stride 128 must be below --max-length 128"):
        FinetuneConfig(task="qa", doc_stride=128)
    ckpt = str(make_checkpoint(tmp_path / "ckpt", max_position_embeddings=128))
    train = make_squad(tmp_path / "train.json", 8, 0, words=150)  # longer than one window
    res = run_finetune(FinetuneConfig(model=ckpt, task="qa", train=train, out=str(tmp_path / "r"),
                                      max_steps=1, batch_size=8, threads=1))
    assert res["best_step"] == 1


@pytest.mark.parametrize("edit, named", [
    (lambda d: d["data"][0].pop("paragraphs"), r"data\[0\]: missing 'paragraphs'"),
    (lambda d: d["data"][0]["paragraphs"][0].pop("context"),
     r"paragraphs\[0\]: missing 'context'"),
    (lambda d: d["data"][0]["paragraphs"][0].pop("qas"), r"paragraphs\[0\]: missing 'qas'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("id"), r"qas\[0\]: missing 'id'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("question"),
     r"qas\[0\] \(id 'q1'\): missing 'question'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].pop("text"),
     r"\(id 'q1'\) answers\[0\]: missing 'text'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].pop("answer_start"),
     r"\(id 'q1'\) answers\[0\]: missing 'answer_start'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start="5"),
     r"answers\[0\]: 'answer_start' is '5', not an integer"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers={"text": "good"}),
     r"\(id 'q1'\): 'answers' is .*, not a list"),
    (lambda d: d["data"][0]["paragraphs"].append("text"), r"paragraphs\[1\]: missing 'context'"),
])
def test_malformed_squad_names_the_place_and_the_key(tmp_path, edit, named):
    data = {"data": [{"paragraphs": [{"context": "the film was good", "qas": [
        {"id": "q1", "question": "how?", "answers": [{"text": "good", "answer_start": 13}]}]}]}]}
    edit(data)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    with pytest.raises(DataError, match=named) as e:
        read_squad(str(p))
    assert str(e.value).startswith(f"{p}: data[0]")
