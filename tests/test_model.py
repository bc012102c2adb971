"""minibert's encoder against transformers' `BertModel` on the real MiniLM checkpoint.

The reference is transformers with `attn_implementation="eager"` (explicit softmax). Both minibert
attention paths are compared with it, on a padded batch of sentence pairs of different lengths, and
with each other.

Which positions are compared: in fp64 every position, padded ones included, agrees to ~1e-14, so
both implementations compute the same function everywhere. In fp32 the padded positions of the
short row are ill-conditioned (each of them attends only to keys it has nothing in common with):
transformers' own fp32 output there is ~1e-5 away from the fp64 value, as far as minibert's is, and
transformers' eager and sdpa paths differ by 1.3e-5 there. So fp32 comparisons use real tokens
only, which is all any caller reads (mean pooling and the MLM loss mask padding out).
"""

import copy

import pytest
import torch
from conftest import ATOL_FP32, ATOL_FP64
from transformers import BertModel

import minibert

ATTENTION = ["eager", "sdpa"]


def _run(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


@pytest.fixture(scope="module")
def hf_minilm(minilm_original_dir):
    return {impl: BertModel.from_pretrained(minilm_original_dir, attn_implementation=impl).eval()
            for impl in ATTENTION}


def test_pair_batch_is_padded_and_has_two_segments(pair_batch):
    # The comparisons below only mean something if the batch exercises padding and segment B.
    mask = pair_batch["attention_mask"]
    assert (mask == 0).any() and (mask.sum(1) != mask.size(1)).sum() >= 2
    assert (pair_batch["token_type_ids"] == 1).any()


@pytest.fixture(scope="module")
def ours_minilm(minilm_original_dir, minilm_dir):
    """minibert on the published directory and on our imported copy, each attention path."""
    paths = {"published": minilm_original_dir, "imported": minilm_dir}
    return {(ckpt, impl): minibert.load_encoder(path, attention=impl)
            for ckpt, path in paths.items() for impl in ATTENTION}


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("checkpoint", ["published", "imported"])
@torch.no_grad()
def test_last_hidden_state_matches_transformers(checkpoint, attention, ours_minilm, hf_minilm,
                                                pair_batch):
    ours = ours_minilm[checkpoint, attention]
    h = _run(ours, pair_batch)  # (B, T, C)
    ref = hf_minilm["eager"](**pair_batch)
    real = pair_batch["attention_mask"].bool()
    torch.testing.assert_close(h[real], ref.last_hidden_state[real], atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(ours.pool(h), ref.pooler_output, atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("attention", ATTENTION)
@torch.no_grad()
def test_fp64_matches_transformers_at_every_position(attention, ours_minilm, hf_minilm,
                                                     pair_batch):
    ours = copy.deepcopy(ours_minilm["published", attention]).double()
    ref = copy.deepcopy(hf_minilm["eager"]).double()(**pair_batch).last_hidden_state
    torch.testing.assert_close(_run(ours, pair_batch), ref, atol=ATOL_FP64, rtol=0)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_eager_and_sdpa_agree(mode, minilm_dir, ours_minilm, pair_batch):
    # In train mode only dropout would make the paths differ; with it off they must still agree,
    # which checks that train mode takes the same code path (sdpa with dropout_p=0, etc.).
    out = {}
    for impl in ATTENTION:
        if mode == "eval":
            m = ours_minilm["imported", impl]
        else:
            m = minibert.load_encoder(minilm_dir, attention=impl, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0).train()
        out[impl] = _run(m, pair_batch)
    real = pair_batch["attention_mask"].bool()
    torch.testing.assert_close(out["eager"][real], out["sdpa"][real], atol=ATOL_FP32, rtol=0)


@torch.no_grad()
def test_fully_padded_row(ours_minilm, hf_minilm, pair_batch):
    """A row whose attention_mask is all zero has no real token, so no defined output.

    The two paths give different (finite) values there, and so does transformers, for the same
    reason: the eager path fills masked scores with the most negative float, so a row with every
    key masked averages all values uniformly; torch's SDPA gives such a row an attention output of
    zero. Each minibert path matches transformers' path of the same kind, the row is finite (never
    NaN, which would poison a batch's loss), and the other rows are unaffected.
    """
    batch = {k: v.clone() for k, v in pair_batch.items()}
    batch["attention_mask"][1] = 0
    others = torch.tensor([0, 2])
    real = pair_batch["attention_mask"].bool()[others]
    for impl in ATTENTION:
        ours = ours_minilm["published", impl]
        h = _run(ours, batch)
        assert torch.isfinite(h).all()
        ref = hf_minilm[impl](**batch).last_hidden_state
        torch.testing.assert_close(h[1], ref[1], atol=ATOL_FP32, rtol=0)
        alone = _run(ours, {k: v[others] for k, v in pair_batch.items()})
        torch.testing.assert_close(h[others][real], alone[real], atol=ATOL_FP32, rtol=0)
