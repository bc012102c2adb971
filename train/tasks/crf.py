"""A linear-chain conditional random field over per-word tag scores (Lafferty et al. 2001), the
layer that Lample et al. 2016 put on top of a neural tagger and that BERT taggers often add.

A tag sequence y_1..y_L of a sentence with emission scores E (L, K) scores

    s(y) = start[y_1] + sum_t E[t, y_t] + sum_{t>1} trans[y_{t-1}, y_t] + end[y_L]

and p(y | E) = exp(s(y)) / Z with Z = sum over all K^L sequences of exp(s(y')). Training minimises
-log p(gold) = log Z - s(gold). log Z comes from the forward algorithm, in log space so that it
neither overflows nor underflows:

    alpha_1[j] = start[j] + E[1, j]
    alpha_t[j] = logsumexp_i(alpha_{t-1}[i] + trans[i, j]) + E[t, j]
    log Z      = logsumexp_j(alpha_L[j] + end[j])

Viterbi decoding is the same recursion with max instead of logsumexp, keeping the argmax
(backpointers) to read the best sequence backwards. Both run batched over sentences of different
lengths: `mask` (B, L) is True on real words, which must form a prefix of each row; at padded steps
alpha is carried over unchanged and the backpointer is the identity, so padding changes nothing.

BIO constraints (`bio_penalties`): O -> I-X, B-X -> I-Y, I-X -> I-Y (Y != X) and start -> I-X are
invalid. They get a fixed score of -1e4 added (a buffer, not learned). -1e4 rather than -inf keeps
log Z finite even for a row where every path is penalised, and exp(-1e4) is exactly 0 in float32,
so the forbidden paths add nothing to Z. tests/test_crf.py checks log Z, the gold score and Viterbi
against enumeration of all K^L sequences.

Limits: first-order transitions only; the loops run over the sentence length in Python (fine for
tagging, where L is the number of words).
"""

import torch
import torch.nn as nn

FORBIDDEN = -1e4


def bio_penalties(tags):
    """(trans (K, K), start (K,)) penalties: FORBIDDEN where a BIO transition is invalid, else 0."""
    K = len(tags)
    trans, start = torch.zeros(K, K), torch.zeros(K)
    for j, t in enumerate(tags):
        if not t.startswith("I-"):
            continue
        start[j] = FORBIDDEN  # an entity cannot begin with I-
        for i, prev in enumerate(tags):
            if prev[2:] != t[2:] or prev == "O":  # only B-X and I-X may precede I-X
                trans[i, j] = FORBIDDEN
    return trans, start


def _at_least_fp32(x):
    # the recursion sums many terms: never run it in fp16/bf16 (autocast may hand us those)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class CRF(nn.Module):
    def __init__(self, n_tags, penalties=None):
        super().__init__()
        self.transitions = nn.Parameter(torch.zeros(n_tags, n_tags))  # [from, to]
        self.start = nn.Parameter(torch.zeros(n_tags))
        self.end = nn.Parameter(torch.zeros(n_tags))
        trans_pen, start_pen = penalties if penalties is not None else \
            (torch.zeros(n_tags, n_tags), torch.zeros(n_tags))
        # Buffers, not parameters: saved with the head so a reloaded model decodes the same way.
        self.register_buffer("trans_penalty", trans_pen.clone())
        self.register_buffer("start_penalty", start_pen.clone())

    def _scores(self):
        return self.transitions + self.trans_penalty, self.start + self.start_penalty

    def log_partition(self, emissions, mask):
        """log Z for each row: emissions (B, L, K), mask (B, L) bool -> (B,)."""
        trans, start = self._scores()
        alpha = start + emissions[:, 0]  # (B, K)
        for t in range(1, emissions.shape[1]):
            # (B, K, 1) + (K, K) + (B, 1, K): every previous tag i times every next tag j
            nxt = torch.logsumexp(alpha.unsqueeze(2) + trans + emissions[:, t].unsqueeze(1), dim=1)
            alpha = torch.where(mask[:, t, None], nxt, alpha)  # (B, K)
        return torch.logsumexp(alpha + self.end, dim=1)  # (B,)

    def score(self, emissions, tags, mask):
        """s(tags) for each row: emissions (B, L, K), tags (B, L) long, mask (B, L) -> (B,)."""
        trans, start = self._scores()
        m = mask.to(emissions.dtype)  # (B, L)
        emit = emissions.gather(2, tags.unsqueeze(2)).squeeze(2)  # (B, L)
        s = start[tags[:, 0]] + (emit * m).sum(1)
        s = s + (trans[tags[:, :-1], tags[:, 1:]] * m[:, 1:]).sum(1)  # transitions into real words
        last = tags.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)  # (B,)
        return s + self.end[last]

    def nll(self, emissions, tags, mask):
        """Mean over rows of -log p(tags | emissions)."""
        emissions = _at_least_fp32(emissions)
        return (self.log_partition(emissions, mask) - self.score(emissions, tags, mask)).mean()

    @torch.no_grad()
    def viterbi(self, emissions, mask):
        """The best tag sequence of each row, as lists of its real length."""
        trans, start = self._scores()
        emissions = _at_least_fp32(emissions)
        B, L, K = emissions.shape
        best = start + emissions[:, 0]  # (B, K): best score of a path ending in each tag
        back = []
        identity = torch.arange(K, device=emissions.device).expand(B, K)
        for t in range(1, L):
            cand = best.unsqueeze(2) + trans  # (B, K_prev, K_next)
            top, arg = cand.max(dim=1)  # (B, K) each
            keep = mask[:, t, None]
            best = torch.where(keep, top + emissions[:, t], best)
            back.append(torch.where(keep, arg, identity))  # padding points to itself
        tag = (best + self.end).argmax(1)  # (B,)
        path = [tag]
        for arg in reversed(back):
            tag = arg.gather(1, tag.unsqueeze(1)).squeeze(1)
            path.append(tag)
        path = torch.stack(path[::-1], dim=1).tolist()  # (B, L)
        return [p[:n] for p, n in zip(path, mask.sum(1).tolist())]
