"""Regression, token tagging (with and without a CRF) and extractive QA: minibert against
transformers, on the same checkpoint, data subset and hyperparameters.

The references are transformers' BertForSequenceClassification(num_labels=1) (regression, MSE),
BertForTokenClassification and BertForQuestionAnswering, trained by a plain loop written here:
torch.optim.AdamW with two parameter groups (the new head at --lr-head, the rest at --lr; no
weight decay on biases and LayerNorm, 0.01 elsewhere: the same rule minibert uses), transformers'
get_linear_schedule_with_warmup (10% warm-up), gradient clipping at 1.0, the same batch size,
epochs and max length. Both sides evaluate on dev at each epoch end and report the best epoch.
minibert runs `minibert finetune` with the same recipe (`--layer-lr-decay 1.0
--no-group-by-length`), and `--pooling cls` for regression (the reference's head is BERT's
pooler). Both are scored by the same code (train/tasks/seqeval.py, train/tasks/squad_eval.py, and
the QA span search of train/tasks/qa.py), so the numbers differ only by model and training.

    python bench/tasks_vs_transformers.py --only wnut,wnut-crf,pos,regression,qa \
        [--max-train N] [--max-eval N] [--epochs E] [--threads 1]

Limits: CPU budgets make the subsets small; --max-train/--max-eval take N evenly spaced rows
(the first N questions for QA) of train and dev, so both sides see the same ones.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.tasks.qa import best_span, read_squad  # noqa: E402
from train.tasks.regression import regression_metrics  # noqa: E402
from train.tasks.seqeval import entity_scores, is_bio, repair_bio, token_scores  # noqa: E402
from train.tasks.squad_eval import squad_scores  # noqa: E402

TASKS = {  # name: (minibert task, data dir, extra minibert flags, metric shown)
    "regression": ("regression", "data/rt-snippets", ["--target-field", "score",
                                                      "--pooling", "cls"], "pearson"),
    "wnut": ("tokens", "data/wnut16", [], "f1"),
    "wnut-crf": ("tokens", "data/wnut16", ["--crf", "--bio-constraints"], "f1"),
    "pos": ("tokens", "data/pos-wsj", [], "accuracy"),
    "qa": ("qa", "data/quoref", [], "f1"),
}


def subset(src_dir, out_dir, split, n):
    """n evenly spaced rows (the first n questions, for SQuAD JSON) of a split, in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(f"{src_dir}/{split}.jsonl"):
        with open(f"{src_dir}/{split}.jsonl") as f:
            rows = [line for line in f if line.strip()]
        # evenly spaced rows, not the first n: some files are ordered by label (rt-snippets)
        rows = [rows[i * len(rows) // n] for i in range(n)] if n < len(rows) else rows
        path = f"{out_dir}/{split}.jsonl"
        with open(path, "w") as f:
            f.writelines(rows)
        return path
    with open(f"{src_dir}/{split}.json") as f:
        data = json.load(f)
    kept, left = [], n
    for art in data["data"]:
        paras = []
        for p in art["paragraphs"]:
            qas = p["qas"][:left]
            left -= len(qas)
            if qas:
                paras.append({**p, "qas": qas})
        if paras:
            kept.append({**art, "paragraphs": paras})
    path = f"{out_dir}/{split}.json"
    with open(path, "w") as f:
        json.dump({"version": data.get("version", "1.1"), "data": kept}, f)
    return path


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- the references

def optimizer_for(model, head_prefix, a):
    groups = {}
    for n, p in model.named_parameters():
        head = n.startswith(head_prefix)
        decay = p.ndim >= 2
        groups.setdefault((head, decay), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": a.lr_head if head else a.lr,
                               "weight_decay": 0.01 if decay else 0.0}
                              for (head, decay), ps in groups.items()], lr=a.lr)


def train_loop(model, head_prefix, n_train, make_batch, evaluate, a):
    from transformers import get_linear_schedule_with_warmup
    opt = optimizer_for(model, head_prefix, a)
    steps = a.epochs * -(-n_train // a.batch_size)
    sched = get_linear_schedule_with_warmup(opt, round(0.1 * steps), steps)
    best, t0, rng = None, time.time(), random.Random(a.seed)
    for epoch in range(a.epochs):
        model.train()
        order = list(range(n_train))
        rng.shuffle(order)
        for s in range(0, n_train, a.batch_size):
            loss = model(**make_batch(order[s:s + a.batch_size])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            m = evaluate()
        print(f"transformers: epoch {epoch + 1} at {time.time() - t0:.0f}s: {m}", file=sys.stderr)
        best = m if best is None or m[a.metric] > best[a.metric] else best
    return best, time.time() - t0


def ref_regression(tok, model_dir, train, dev, a):
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    tr, dv = read_jsonl(train), read_jsonl(dev)

    def enc(rows):
        return tok([r["text"] for r in rows], truncation=True, max_length=a.max_length,
                   padding=True, return_tensors="pt")

    def batch(idx):  # num_labels=1 with float labels: transformers uses MSELoss
        rows = [tr[i] for i in idx]
        return {**enc(rows), "labels": torch.tensor([float(r["score"]) for r in rows])}

    def evaluate():
        pred = [v for s in range(0, len(dv), 128)
                for v in model(**enc(dv[s:s + 128])).logits.squeeze(-1).tolist()]
        return regression_metrics([float(r["score"]) for r in dv], pred)
    return train_loop(model, "classifier", len(tr), batch, evaluate, a)


def ref_tagging(tok, model_dir, train, dev, a):
    from transformers import BertForTokenClassification
    tr, dv = read_jsonl(train), read_jsonl(dev)
    tags = sorted({t for r in tr for t in r["tags"]}, key=lambda t: (t != "O", t[2:], t))
    index = {t: i for i, t in enumerate(tags)}
    model = BertForTokenClassification.from_pretrained(model_dir, num_labels=len(tags))

    def enc(rows, with_labels):
        b = tok([r["tokens"] for r in rows], is_split_into_words=True, truncation=True,
                max_length=a.max_length, padding=True, return_tensors="pt")
        firsts, labels = [], torch.full(b["input_ids"].shape, -100)
        for i, r in enumerate(rows):
            seen, f = set(), []
            for t, w in enumerate(b.word_ids(i)):
                if w is not None and w not in seen:
                    seen.add(w)
                    f.append((t, w))
                    labels[i, t] = index[r["tags"][w]]
            firsts.append(f)
        return ({**b, "labels": labels} if with_labels else dict(b)), firsts

    def evaluate():
        gold, pred = [], []
        for s in range(0, len(dv), 64):
            rows = dv[s:s + 64]
            b, firsts = enc(rows, False)
            best = model(**b).logits.argmax(-1)
            for i, r in enumerate(rows):
                p = ["O" if "O" in index else tags[0]] * len(r["tokens"])
                for t, w in firsts[i]:
                    p[w] = tags[best[i, t]]
                gold.append(r["tags"])
                pred.append(repair_bio(p) if is_bio(tags) else p)
        return entity_scores(gold, pred) if is_bio(tags) else token_scores(gold, pred)
    return train_loop(model, "classifier", len(tr), lambda idx: enc([tr[i] for i in idx],
                                                                     True)[0], evaluate, a)


def ref_qa(tok, model_dir, train, dev, a):
    from transformers import BertForQuestionAnswering
    from train.tasks.qa import answer_positions
    model = BertForQuestionAnswering.from_pretrained(model_dir)
    tr, dv = read_squad(train), read_squad(dev)
    tok._tokenizer.enable_truncation(a.max_length, stride=a.doc_stride, strategy="only_second")

    def windows(examples):  # the same windows as minibert: tokenizers' overflow with stride
        out = []
        for i, ex in enumerate(examples):
            e = tok._tokenizer.encode(ex.question, ex.context)
            out += [(i, w) for w in [e] + e.overflowing]
        return out
    tw, dw = windows(tr), windows(dv)
    pos = [answer_positions(w, tr[i].answers[0][1], tr[i].answers[0][1] + len(tr[i].answers[0][0]))
           for i, w in tw]

    def pad(ws):
        T = max(len(w.ids) for w in ws)
        ids = torch.tensor([w.ids + [0] * (T - len(w.ids)) for w in ws])
        tt = torch.tensor([w.type_ids + [0] * (T - len(w.ids)) for w in ws])
        am = torch.tensor([[1] * len(w.ids) + [0] * (T - len(w.ids)) for w in ws])
        return {"input_ids": ids, "token_type_ids": tt, "attention_mask": am}

    def batch(idx):
        return {**pad([tw[i][1] for i in idx]), "start_positions": torch.tensor(
            [pos[i][0] for i in idx]), "end_positions": torch.tensor([pos[i][1] for i in idx])}

    def evaluate():
        per = {}
        for s in range(0, len(dw), 32):
            ws = dw[s:s + 32]
            out = model(**pad([w for _, w in ws]))
            for (i, w), st, en in zip(ws, out.start_logits, out.end_logits):
                per.setdefault(i, []).append((w, st, en))
        preds = {}
        for i, wins in per.items():
            _, k, x, y = best_span(wins, a.max_answer_len)
            o = wins[k][0].offsets
            preds[dv[i].id] = dv[i].context[o[x][0]:o[y][1]]
        return squad_scores(preds, {ex.id: [t for t, _ in ex.answers] for ex in dv})
    return train_loop(model, "qa_outputs", len(tw), batch, evaluate, a)


# ---------------------------------------------------------------- minibert

def run_minibert(task, train, dev, extra, out, a):
    cmd = [sys.executable, "-P", "-m", "train.cli", "finetune", "--task", task, "--model", a.model,
           "--train", train, "--dev", dev, "--out", out, "--epochs", str(a.epochs),
           "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--lr-head", str(a.lr_head),
           "--max-length", str(a.max_length), "--eval-every", "none", "--seed", str(a.seed),
           "--log-every", "10", "--threads", str(a.threads),
           # QA's own flags: finetune refuses them with another task
           *(["--doc-stride", str(a.doc_stride), "--max-answer-len", str(a.max_answer_len)]
             if task == "qa" else []),
           # the reference's recipe: one lr for the whole backbone, batches in shuffled order
           "--layer-lr-decay", "1.0", "--no-group-by-length", *extra]
    print(" ".join(cmd), file=sys.stderr)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    with open(f"{out}/results.json") as f:
        return json.load(f)["dev"], time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="weights/minilm-l6")
    p.add_argument("--only", default="regression,wnut,wnut-crf,pos,qa")
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--max-eval", type=int, default=300)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--lr-head", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--doc-stride", type=int, default=128)
    p.add_argument("--max-answer-len", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--out", default="runs/bench-tasks")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = []
    for name in a.only.split(","):
        task, src, extra, metric = TASKS[name]
        d = f"{a.out}/data/{name}"
        train, dev = subset(src, d, "train", a.max_train), subset(src, d, "dev", a.max_eval)
        mb, mb_s = run_minibert(task, train, dev, extra, f"{a.out}/{name}", a)
        ref, ref_s = (None, 0.0)
        if not a.skip_reference and name != "wnut-crf":  # the CRF row compares with "wnut"
            a.metric = metric
            fn = {"regression": ref_regression, "qa": ref_qa}.get(task, ref_tagging)
            ref, ref_s = fn(tok, a.model, train, dev, a)
        rows.append((name, metric, mb[metric], ref[metric] if ref else None, mb_s, ref_s))
        print(json.dumps({"task": name, "metric": metric, "minibert": mb.get(metric),
                          "transformers": ref[metric] if ref else None,
                          "minibert_s": round(mb_s), "transformers_s": round(ref_s)}), flush=True)
    print(f"\n{'task':12s} {'metric':9s} {'minibert':>9s} {'transformers':>13s} "
          f"{'minibert s':>11s} {'ref s':>7s}")
    for name, metric, m, r, ms, rs in rows:
        scale = 1 if metric == "f1" and name == "qa" else 100  # everything in points
        rr = f"{r * scale:13.2f}" if r is not None else f"{'(see wnut)':>13s}"
        print(f"{name:12s} {metric:9s} {m * scale:9.2f} {rr} {ms:11.0f} {rs:7.0f}")


if __name__ == "__main__":
    main()
