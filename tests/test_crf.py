"""The CRF against brute force: on tiny cases every one of the K^L tag sequences is enumerated and
scored from the definition, so log Z, the gold score and the Viterbi path have an independent
reference that shares no recursion with train/tasks/crf.py."""

import itertools

import pytest
import torch

from train.tasks.crf import CRF, FORBIDDEN, bio_penalties

# float64 everywhere: the brute force and the recursion then agree to rounding (~1e-12); 1e-9
# leaves room for the different order of summation and would still catch any wrong term.
TOL = 1e-9


def random_crf(K, penalties=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    crf = CRF(K, penalties).double()
    with torch.no_grad():
        for p in (crf.transitions, crf.start, crf.end):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return crf


def brute_score(crf, em, seq):
    """s(y) straight from its definition, for one sentence em (L, K)."""
    trans = crf.transitions + crf.trans_penalty
    s = crf.start[seq[0]] + crf.start_penalty[seq[0]] + em[0, seq[0]]
    for t in range(1, len(seq)):
        s = s + trans[seq[t - 1], seq[t]] + em[t, seq[t]]
    return s + crf.end[seq[-1]]


def all_scores(crf, em, n):
    K = em.shape[1]
    seqs = list(itertools.product(range(K), repeat=n))
    return seqs, torch.stack([brute_score(crf, em[:n], s) for s in seqs])


def batch(lengths, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    em = torch.randn(len(lengths), L, K, generator=g, dtype=torch.float64) * 2
    mask = torch.arange(L) < torch.tensor(lengths)[:, None]
    return em, mask


@pytest.mark.parametrize("K,lengths", [(3, [4, 1, 3]), (4, [3, 2]), (2, [5, 5, 2])])
def test_forward_score_and_viterbi_equal_enumeration(K, lengths):
    crf = random_crf(K)
    em, mask = batch(lengths, K)
    logz = crf.log_partition(em, mask)
    paths = crf.viterbi(em, mask)
    g = torch.Generator().manual_seed(2)
    gold = torch.randint(0, K, mask.shape, generator=g)
    gold_score = crf.score(em, gold, mask)
    for b, n in enumerate(lengths):
        seqs, scores = all_scores(crf, em[b], n)
        assert logz[b].item() == pytest.approx(torch.logsumexp(scores, 0).item(), abs=TOL)
        assert tuple(paths[b]) == seqs[int(scores.argmax())]
        want = brute_score(crf, em[b, :n], gold[b, :n].tolist())
        assert gold_score[b].item() == pytest.approx(want.item(), abs=TOL)


def test_padding_changes_nothing():
    # the same sentence alone and next to a longer one: the same log Z and the same path
    K = 3
    crf = random_crf(K)
    em, mask = batch([2, 5], K)
    alone = crf.log_partition(em[:1, :2], mask[:1, :2])
    assert crf.log_partition(em, mask)[0].item() == pytest.approx(alone.item(), abs=TOL)
    assert crf.viterbi(em, mask)[0] == crf.viterbi(em[:1, :2], mask[:1, :2])[0]


def test_nll_is_a_log_probability_and_has_gradients():
    K = 3
    crf = random_crf(K)
    em, mask = batch([3], K)
    em.requires_grad_(True)
    seqs, scores = all_scores(crf, em[0].detach(), 3)
    # sum over all sequences of p(y) = 1
    total = sum(torch.exp(-crf.nll(em.detach(), torch.tensor([s]), mask)) for s in seqs)
    assert total.item() == pytest.approx(1.0, abs=1e-9)
    crf.nll(em, torch.tensor([[0, 1, 2]]), mask).backward()
    assert em.grad.abs().sum() > 0 and crf.transitions.grad.abs().sum() > 0


TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def valid_bio(seq):
    prev = "O"
    for t in seq:
        if t.startswith("I-") and prev[2:] != t[2:]:
            return False
        prev = t
    return True


def test_bio_penalties_forbid_exactly_the_invalid_transitions():
    trans, start = bio_penalties(TAGS)
    for i, a in enumerate(TAGS):
        for j, b in enumerate(TAGS):
            # a -> b is valid when b does not continue an entity, or continues a's
            ok = not b.startswith("I-") or (a != "O" and a[2:] == b[2:])
            assert (trans[i, j] == FORBIDDEN) == (not ok), (a, b)
    assert [s == FORBIDDEN for s in start.tolist()] == [t.startswith("I-") for t in TAGS]


def test_constrained_crf_equals_enumeration_of_valid_sequences():
    K = len(TAGS)
    crf = random_crf(K, bio_penalties(TAGS), seed=3)
    em, mask = batch([4, 2], K, seed=4)
    em[:, :, 2] += 5.0  # make I-PER tempting everywhere: an unconstrained decoder would take it
    logz = crf.log_partition(em, mask)
    for b, (path, n) in enumerate(zip(crf.viterbi(em, mask), [4, 2])):
        seqs, scores = all_scores(crf, em[b], n)
        ok = torch.tensor([valid_bio([TAGS[i] for i in s]) for s in seqs])
        # forbidden paths are ~1e4 below the rest: exp() of that is 0 even in float64
        assert logz[b].item() == pytest.approx(torch.logsumexp(scores[ok], 0).item(), abs=TOL)
        assert valid_bio([TAGS[i] for i in path])
        best_valid = max((s for s, k in zip(seqs, ok) if k),
                         key=lambda s: brute_score(crf, em[b, :n], s).item())
        assert tuple(path) == best_valid
