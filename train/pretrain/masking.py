"""BERT's masked-language-model corruption, and the loss computed only where it matters.

Masking (Devlin et al. 2019, section 3.1 and appendix A.1): a fraction `mask_prob` of the tokens
is chosen for prediction; of those, 80% become [MASK], 10% a random token and 10% stay as they
are, so that the model cannot learn that only [MASK] positions need a good representation.
Special tokens ([CLS], [SEP], [PAD], [MASK], [UNK]) are never chosen: predicting them teaches
nothing. Each position is chosen independently (a Bernoulli draw, as Hugging Face's
DataCollatorForLanguageModeling does), so the count per sequence varies around mask_prob * T.

Whole-word masking (Google's later BERT release): the draw is made once per word and every piece
of the word follows it; a piece starting with `##` belongs to the word before it. mask_prob is
then the fraction of *words*, so the fraction of tokens is a little higher.

The masking is dynamic (RoBERTa, Liu et al. 2019): drawn anew for every batch, from a
torch.Generator the caller seeds, so a given (seed, epoch, batch) always gets the same masks.

Sparse prediction: the decoder (C -> V, the largest matmul of a small BERT) runs only at the
~15% masked positions. `mlm_loss_dense` is the plain reference that decodes every position;
tests/test_masking.py holds the two equal.
"""

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions that are not predicted: F.cross_entropy's ignore_index


class Masker:
    """Everything the corruption needs to know about the vocabulary, computed once."""

    def __init__(self, vocab, special_ids, mask_id, mask_prob=0.15, whole_word=False):
        """`vocab` is the list of token strings by id."""
        self.mask_id, self.mask_prob, self.whole_word = mask_id, mask_prob, whole_word
        V = len(vocab)
        self.is_special = torch.zeros(V, dtype=torch.bool)  # (V,)
        self.is_special[list(special_ids)] = True
        # random replacements come from ordinary tokens only: a random [CLS] mid-sentence would
        # be a signal the model never sees at fine-tuning time
        self.random_pool = (~self.is_special).nonzero().flatten()  # (V - n_special,)
        self.is_continuation = torch.tensor([t.startswith("##") for t in vocab])  # (V,)

    def __call__(self, input_ids, generator):
        """(B, T) ids -> (corrupted ids (B, T), labels (B, T): the original id or IGNORE)."""
        B, T = input_ids.shape
        candidate = ~self.is_special[input_ids]  # (B, T): padding and specials excluded
        u = torch.rand((B, T), generator=generator)  # (B, T)
        if self.whole_word:
            # every piece reads the draw of the first piece of its word: the position of the
            # latest word start at or before it (a running max over start positions)
            start = candidate & ~self.is_continuation[input_ids]  # (B, T)
            pos = torch.arange(T).expand(B, T)
            first = torch.cummax(torch.where(start, pos, 0), dim=1).values  # (B, T)
            u = u.gather(1, first)
        chosen = candidate & (u < self.mask_prob)  # (B, T)
        labels = torch.where(chosen, input_ids, IGNORE)

        # one more uniform draw splits the chosen positions 80 / 10 / 10
        r = torch.rand((B, T), generator=generator)
        to_mask = chosen & (r < 0.8)
        to_random = chosen & (r >= 0.8) & (r < 0.9)  # the remaining 10% stay unchanged
        pick = torch.randint(len(self.random_pool), (B, T), generator=generator)
        corrupted = torch.where(to_mask, self.mask_id, input_ids)
        corrupted = torch.where(to_random, self.random_pool[pick], corrupted)
        return corrupted, labels


def mlm_loss_sparse(mlm, input_ids, attention_mask, labels):
    """Cross-entropy at masked positions, decoding only those: (M, C) -> (M, V), M = #masked.

    Returns (mean loss, number correct, M). The encoder still runs on every position (attention
    needs them all); only the head is restricted.
    """
    hidden = mlm.bert(input_ids, attention_mask)  # (B, T, C)
    where = labels != IGNORE  # (B, T)
    selected = hidden[where]  # (M, C)
    target = labels[where]  # (M,)
    logits = mlm.head(selected).float()  # (M, V); fp32 for the softmax under bf16 autocast
    if target.numel() == 0:  # nothing masked (a tiny batch): a zero loss, not a NaN mean
        return logits.sum() * 0.0, torch.zeros((), dtype=torch.long), 0
    loss = F.cross_entropy(logits, target)
    correct = (logits.argmax(-1) == target).sum()
    return loss, correct, target.numel()


def mlm_loss_dense(mlm, input_ids, attention_mask, labels):
    """The reference: logits at every position (B, T, V), unpredicted ones ignored by the loss."""
    logits = mlm(input_ids, attention_mask).float()  # (B, T, V)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE)
