"""BERT's masking (train/pretrain/masking.py): proportions, what is never masked, whole words, the
sparse loss against transformers' BertForMaskedLM.

Proportions are checked statistically. For a rate p measured over n independent draws the
standard error is sqrt(p (1 - p) / n); every check allows 5 standard errors, which a correct
implementation exceeds with probability under 1e-6, while a wrong rule (say 15% [MASK] instead of
80% of 15%, or masking specials) misses by dozens of standard errors. The draws are seeded, so a
run is repeatable anyway; the tolerance says how far from the truth a seed may land.
"""

import math

import torch

from conftest import ATOL_FP32

from minibert.checkpoint import save_model
from minibert.config import BertConfig
from minibert.model import BertForMLM
from train.pretrain.masking import IGNORE, Masker, mlm_loss_dense, mlm_loss_sparse

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)
# 5 specials, 45 word starts, 50 continuation pieces
VOCAB = SPECIALS + [f"w{i}" for i in range(45)] + [f"##p{i}" for i in range(50)]
N_SIGMA = 5


def within(observed, p, n):
    return abs(observed - p) <= N_SIGMA * math.sqrt(p * (1 - p) / n)


def batch_with_specials(B=64, T=256, seed=0):
    """Random ordinary tokens framed as packed sequences: [CLS] ... [SEP] ... [SEP] [PAD]..."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(VOCAB), (B, T), generator=g)
    ids[:, 0] = CLS
    ids[:, T // 2] = SEP
    ids[:, -20] = SEP
    ids[:, -19:] = PAD
    ids[::7, 10] = UNK
    return ids


def test_proportions_follow_bert():
    ids = batch_with_specials()
    masker = Masker(VOCAB, range(5), MASK, mask_prob=0.15)
    out, labels = masker(ids, torch.Generator().manual_seed(1))
    candidate = ids >= 5
    chosen = labels != IGNORE
    n = int(candidate.sum())
    assert within(chosen.sum().item() / n, 0.15, n)
    m = int(chosen.sum())
    assert torch.equal(labels[chosen], ids[chosen])  # the label is the original token
    became_mask = (out[chosen] == MASK).float().mean().item()
    unchanged = (out[chosen] == ids[chosen]).float().mean().item()
    # a random replacement equal to the original by chance counts as unchanged: 10% * 1/95
    p_same = 0.1 + 0.1 / (len(VOCAB) - 5)
    assert within(became_mask, 0.8, m)
    assert within(unchanged, p_same, m)
    assert within(1 - became_mask - unchanged, 0.1 - 0.1 / (len(VOCAB) - 5), m)
    # positions not chosen are untouched
    assert torch.equal(out[~chosen], ids[~chosen])


def test_specials_and_padding_never_masked_and_never_drawn():
    masker = Masker(VOCAB, range(5), MASK, mask_prob=0.9)  # high rate: many chances to fail
    for seed in range(5):
        ids = batch_with_specials(B=16, T=64, seed=seed)
        out, labels = masker(ids, torch.Generator().manual_seed(seed))
        special = ids < 5
        assert (labels[special] == IGNORE).all()
        assert torch.equal(out[special], ids[special])
        replaced = (labels != IGNORE) & (out != MASK) & (out != ids)
        assert replaced.any()
        assert (out[replaced] >= 5).all()  # random replacements are ordinary tokens


def test_same_seed_same_masks_other_seed_other_masks():
    ids = batch_with_specials(B=8, T=64)
    masker = Masker(VOCAB, range(5), MASK)
    a = masker(ids, torch.Generator().manual_seed(3))
    b = masker(ids, torch.Generator().manual_seed(3))
    c = masker(ids, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_whole_word_masking_masks_words_together():
    ids = batch_with_specials()
    masker = Masker(VOCAB, range(5), MASK, mask_prob=0.15, whole_word=True)
    out, labels = masker(ids, torch.Generator().manual_seed(2))
    chosen = labels != IGNORE
    cont = ids >= 50  # ##pieces
    # a continuation piece is chosen exactly when the piece before it is (within a word)
    prev_chosen = chosen[:, :-1]
    inside = cont[:, 1:] & (ids[:, :-1] >= 5)  # continuation whose predecessor is a real token
    assert torch.equal(chosen[:, 1:][inside], prev_chosen[inside])
    # the rate applies to words: count word starts (ordinary, non-## tokens)
    starts = (ids >= 5) & ~cont
    n = int(starts.sum())
    assert within(chosen[starts].float().mean().item(), 0.15, n)
    # and pieces of one word are corrupted independently, 80/10/10, as BERT's release did
    assert within((out[chosen] == MASK).float().mean().item(), 0.8, int(chosen.sum()))


def test_sparse_loss_equals_transformers_masked_lm_loss(tmp_path):
    """The sparse loss (the head on masked positions only) against transformers'
    BertForMaskedLM(labels=...), which decodes every position and ignores label -100: same loss,
    same gradient, and the accuracy counts transformers' argmax hits."""
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    mlm = BertForMLM(cfg).eval()
    with torch.no_grad():  # BERT's init has zero biases and unit LayerNorms: make each count
        for p in mlm.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    save_model(mlm, str(tmp_path))
    ref = BertForMaskedLM.from_pretrained(str(tmp_path)).eval()
    ids = batch_with_specials(B=4, T=48)
    attention = (ids != PAD).long()
    out, labels = Masker(VOCAB, range(5), MASK)(ids, torch.Generator().manual_seed(0))
    assert IGNORE == -100  # transformers' ignored label
    sparse, correct, n = mlm_loss_sparse(mlm, out, attention, labels)
    want = ref(input_ids=out, attention_mask=attention, labels=labels)
    assert n == int((labels != IGNORE).sum()) > 0
    # fp32, two implementations of the same sums: the logits agree to ATOL_FP32 (conftest), and a
    # mean of log-softmaxes moves by at most twice the largest logit difference (~1e-6 here)
    torch.testing.assert_close(sparse, want.loss, rtol=0, atol=ATOL_FP32)
    # and against minibert's own dense reference, beside it in masking.py
    torch.testing.assert_close(sparse, mlm_loss_dense(mlm, out, attention, labels), rtol=0,
                               atol=ATOL_FP32)
    # gradients agree too: the sparse path must not cut the graph anywhere (the word embeddings
    # get gradients through the input and through the tied decoder, in both models)
    g_sparse = torch.autograd.grad(sparse, mlm.bert.embeddings.word.weight)[0]
    g_ref = torch.autograd.grad(want.loss, ref.bert.embeddings.word_embeddings.weight)[0]
    assert ref.cls.predictions.decoder.weight is ref.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(g_sparse, g_ref, rtol=1e-4, atol=1e-6)
    # accuracy counts argmax hits at the masked positions of transformers' full logits
    where = labels != IGNORE
    assert int(correct) == int((want.logits[where].argmax(-1) == labels[where]).sum())
