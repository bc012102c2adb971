"""The distillation losses, each the formula of its paper, on plain tensors.

- Soft targets (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", section 2):
  T^2 * KL(softmax(z_t / T) || softmax(z_s / T)). Dividing the logits by T > 1 softens both
  distributions, so that the small probabilities a teacher gives to wrong labels (which ones it
  finds plausible) weigh in. The soft term's gradients scale as 1/T^2; the factor T^2 keeps its
  weight against the hard term the same whatever T is.
- The mix (DistilBERT, Sanh et al. 2019; Hinton et al.): alpha * hard + (1 - alpha) * soft, where
  `hard` is the task's own loss on the gold labels (cross-entropy, a CRF's NLL, MSE).
- Regression has no distribution to soften: its soft term is MSE(student, teacher), without T.
- Tagging: the KL per token, on the head's emission scores at the words' first pieces (the
  labelled positions), averaged over them. With a CRF this distils the emissions only: the
  transition scores learn from the hard loss alone, and the teacher's sequence-level
  distribution (emissions and transitions together) is not matched.
- Hidden states (TinyBERT, Jiao et al. 2020, its hidden-states loss): MSE(h_s W, h_t) at real
  tokens, W a learned projection from the student's width to the teacher's (the caller applies
  it), here on the last layer only.
- Attention (MiniLM, Wang et al. 2020, its self-attention distribution transfer): KL(A_t || A_s)
  between the last layers' attention distributions, averaged over heads and real query
  positions. It needs the same number of heads; MiniLM's value-relation term is not here.
"""

import math

import torch
import torch.nn.functional as F


def soft_kl(student_logits, teacher_logits, temperature, mask=None):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per row of (..., K), averaged over
    the rows where `mask` (...) is True (all rows without one)."""
    T = temperature
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=-1)  # (..., K)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)  # (..., K)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (...,) one KL per row
    if mask is None:
        return T * T * kl.mean()
    m = mask.to(kl.dtype)
    return T * T * (kl * m).sum() / m.sum().clamp(min=1)


def soft_mse(student_pred, teacher_pred):
    """Regression's soft term: the mean squared distance to the teacher's predictions (B,)."""
    return F.mse_loss(student_pred.float(), teacher_pred.float())


def mix(hard, soft, alpha):
    """alpha * hard + (1 - alpha) * soft: alpha = 1 is fine-tuning, alpha = 0 imitation alone."""
    return alpha * hard + (1 - alpha) * soft


def soft_outputs(kind, out):
    """(what a head's output dict offers for imitation, the mask of its valid rows or None):
    the logits (B, K) of a classifier, the predictions (B,) of a regressor, the emission scores
    of a tagger's words (B, W, K) with the mask of real words (B, W)."""
    if kind == "classification":
        return out["logits"], None
    if kind == "regression":
        return out["predictions"], None
    return out["word_logits"], out["word_mask"]


def soft_loss(kind, student_out, teacher, teacher_mask, temperature):
    """The soft term of `kind` between a head's outputs and the teacher's (see soft_outputs);
    `teacher_mask` (B, W) leaves out tagging words the teacher has no scores for."""
    s, s_mask = soft_outputs(kind, student_out)
    if kind == "regression":
        return soft_mse(s, teacher)
    mask = s_mask if teacher_mask is None else s_mask & teacher_mask
    return soft_kl(s, teacher, temperature, mask)


def hidden_mse(student_h, teacher_h, key_mask):
    """MSE of (B, T, C) hidden states over the real tokens (key_mask (B, T) True) and channels."""
    m = key_mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
    sq = (student_h.float() - teacher_h.float()).pow(2) * m  # (B, T, C)
    return sq.sum() / (m.sum() * student_h.size(-1)).clamp(min=1)


def attention_log_probs(qkv, nh, hs, key_mask):
    """log softmax(q k^T / sqrt(hs)) over the real keys, from a block's qkv projection output
    (B, T, 3 nh hs): q and k are its first two slices of width nh * hs (SelfAttention's split;
    a pruned layer has nh below the config's head count). Returns (B, nh, T, T)."""
    B, T, _ = qkv.shape
    q, k, _ = qkv.float().split(nh * hs, dim=-1)  # 2 x (B, T, nh * hs), v unused
    q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    with torch.autocast(qkv.device.type, enabled=False):  # fp32 under the run's bf16 autocast
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
        # the most negative finite number, as attention_eager: padded keys get probability 0
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        return F.log_softmax(scores, dim=-1)


def attention_kl(teacher_logp, student_logp, key_mask):
    """KL(A_t || A_s) per head and query row of (B, nh, T, T) log-probabilities, averaged over
    the heads and the real query positions (key_mask (B, T) True)."""
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # (B, nh, T)
    m = key_mask[:, None, :].to(kl.dtype).expand_as(kl)  # (B, nh, T): real queries
    return (kl * m).sum() / m.sum().clamp(min=1)
