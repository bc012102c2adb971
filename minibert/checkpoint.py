"""Loading and saving checkpoints in Hugging Face's BERT layout, safetensors only (never pickle).

A checkpoint directory holds `config.json`, `model.safetensors` and a tokenizer (`tokenizer.json`
and/or `vocab.txt`). Published checkpoints spell the same tensors in several ways; `_canonical`
folds them into one spelling:
- `bert.` prefix (BertForMaskedLM, BertForPreTraining) or none (BertModel);
- `LayerNorm.gamma` / `LayerNorm.beta` (TF-era conversions) for `.weight` / `.bias`;
- `embeddings.position_ids`: a buffer some versions save, always 0..T-1, dropped;
- `cls.predictions.decoder.weight` present or absent: tied to the word embeddings either way;
- `cls.seq_relationship.*`: the next-sentence-prediction head, reported and dropped;
- `classifier.*`, `qa_outputs.*`: the task head of a fine-tuned `BertFor*`, reported and dropped.
Then `_NAME_MAP` says which canonical tensors make each minibert parameter. Anything missing,
unexpected or of the wrong shape is collected and raised as one error naming every key.
"""

import os
import re

import torch
from safetensors import SafetensorError, safe_open

from minibert.config import BertConfig
from minibert.errors import CheckpointError, missing_from_checkpoint
from minibert.io import atomic_save_safetensors
from minibert.model import BertEncoder, BertForMLM


# minibert name -> Hugging Face name(s), per block `{i}` where it applies. A tuple means the
# minibert tensor is the concatenation (along dim 0, the output features) of those tensors: our
# fused qkv projection is query, key and value stacked.
_EMBED_MAP = {
    "embeddings.word.weight": "embeddings.word_embeddings.weight",
    "embeddings.position.weight": "embeddings.position_embeddings.weight",
    "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
    "embeddings.ln.weight": "embeddings.LayerNorm.weight",
    "embeddings.ln.bias": "embeddings.LayerNorm.bias",
}
_BLOCK_MAP = {
    "attn.qkv.{p}": tuple(f"attention.self.{n}.{{p}}" for n in ("query", "key", "value")),
    "attn.proj.{p}": "attention.output.dense.{p}",
    "ln_attn.{p}": "attention.output.LayerNorm.{p}",
    "mlp.fc_in.{p}": "intermediate.dense.{p}",
    "mlp.fc_out.{p}": "output.dense.{p}",
    "ln_mlp.{p}": "output.LayerNorm.{p}",
}
_POOLER_MAP = {"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"}
_HEAD_MAP = {
    "dense.weight": "cls.predictions.transform.dense.weight",
    "dense.bias": "cls.predictions.transform.dense.bias",
    "ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "bias": "cls.predictions.bias",
}


def _encoder_map(n_layers):
    """{minibert encoder name: HF name or tuple of HF names}, HF names without the `bert.` prefix."""
    m = dict(_EMBED_MAP)
    for i in range(n_layers):
        for ours, theirs in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                key = f"blocks.{i}." + ours.format(p=p)
                if isinstance(theirs, tuple):
                    m[key] = tuple(f"encoder.layer.{i}." + t.format(p=p) for t in theirs)
                else:
                    m[key] = f"encoder.layer.{i}." + theirs.format(p=p)
    return m


def _canonical(raw, path):
    """Fold every published spelling into one: no `bert.` prefix, `.weight/.bias` for LayerNorm.
    Returns (tensors, notes) where notes lists what was dropped and why."""
    out, notes = {}, []
    for name, t in raw.items():
        k = name[len("bert."):] if name.startswith("bert.") else name
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        if k == "embeddings.position_ids":
            continue  # a 0..T-1 index buffer, not a weight
        if k.startswith("cls.seq_relationship."):
            notes.append(f"{name}: next-sentence-prediction head, not used")
            continue
        if k.startswith(("classifier.", "qa_outputs.")):  # BertFor{SequenceClassification, ...}
            notes.append(f"{name}: a task head of transformers' BertFor* classes, not used")
            continue
        if k in out:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice under different spellings")
        out[k] = t
    # The decoder is tied to the word embeddings; a checkpoint may store a copy. Same for its bias.
    dec = out.pop("cls.predictions.decoder.weight", None)
    if dec is not None and "embeddings.word_embeddings.weight" in out:
        if not torch.equal(dec, out["embeddings.word_embeddings.weight"]):
            notes.append("cls.predictions.decoder.weight differs from the word embeddings; "
                         "minibert ties them and uses the word embeddings")
    dec_bias = out.pop("cls.predictions.decoder.bias", None)
    if dec_bias is not None and "cls.predictions.bias" not in out:
        out["cls.predictions.bias"] = dec_bias
    elif dec_bias is not None and not torch.equal(dec_bias, out["cls.predictions.bias"]):
        notes.append("cls.predictions.decoder.bias differs from cls.predictions.bias; minibert "
                     "has one output bias and uses cls.predictions.bias")
    return out, notes


def read_safetensors(path, keys_only=False):
    """All tensors of a safetensors file, on the CPU (no pickle involved), or with keys_only
    their names alone (read from the header). A file cut short or not safetensors at all is a
    CheckpointError that names it."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys()) if keys_only else {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it may be "
                              "truncated: copy or download it again") from None


def weights_path(ckpt_dir):
    """`ckpt_dir/model.safetensors`, which must exist. A pickle beside it is named, never read."""
    path = os.path.join(ckpt_dir, "model.safetensors")
    if not os.path.exists(path):
        if os.path.exists(path + ".index.json"):
            raise CheckpointError(f"{path}.index.json: a checkpoint sharded over several files; "
                                  "minibert reads one model.safetensors: save it again with "
                                  "transformers' save_pretrained(..., max_shard_size='100GB')")
        bin_ = os.path.exists(os.path.join(ckpt_dir, "pytorch_model.bin"))
        raise missing_from_checkpoint(ckpt_dir, "no model.safetensors" + (
            "; it holds pytorch_model.bin, a pickle, which minibert never reads: convert it "
            "with transformers (save_pretrained(..., safe_serialization=True))" if bin_ else ""))
    return path


def has_mlm_head(ckpt_dir):
    """Whether the checkpoint stores a masked-LM head (cls.predictions.*)."""
    return any(k.startswith("cls.predictions.")
               for k in read_safetensors(weights_path(ckpt_dir), keys_only=True))


def has_pooler(ckpt_dir):
    """Whether the checkpoint stores BERT's pooler (BertForMaskedLM checkpoints have none)."""
    return any(k.endswith("pooler.dense.weight")
               for k in read_safetensors(weights_path(ckpt_dir), keys_only=True))


def read_pooler(ckpt_dir):
    """The checkpoint's pooler, {"weight", "bias"}, as `BertEncoder.pooler` (a Linear) holds it."""
    path = weights_path(ckpt_dir)
    tensors, _ = _canonical(read_safetensors(path), path)
    missing = [theirs for theirs in _POOLER_MAP.values() if theirs not in tensors]
    if missing:
        raise CheckpointError(f"{path}: no pooler ({missing[0]})")
    return {ours.removeprefix("pooler."): tensors[theirs] for ours, theirs in _POOLER_MAP.items()}


# the note of a checkpoint without a pooler (BertForMaskedLM's): embed and fill-mask leave it out
POOLER_ABSENT = "pooler absent (as in BertForMaskedLM checkpoints); initialised fresh"


def load_state_into(model, ckpt_dir, with_head, allow_missing_head=False):
    """Load `ckpt_dir/model.safetensors` into a BertEncoder (with_head=False) or BertForMLM.
    Returns notes, "PATH: what", on what was dropped or created fresh, and why."""
    path = weights_path(ckpt_dir)
    tensors, notes = _canonical(read_safetensors(path), path)

    enc = model.bert if with_head else model
    mapping = {"bert." + k if with_head else k: v
               for k, v in _encoder_map(enc.config.num_hidden_layers).items()}
    optional = {}  # minibert names that may be absent: they keep their fresh initialisation
    pooler = {("bert." if with_head else "") + k: v for k, v in _POOLER_MAP.items()}
    mapping.update(pooler)
    optional.update(dict.fromkeys(pooler, POOLER_ABSENT))
    head_keys = [k for k in tensors if k.startswith("cls.predictions.")]
    if with_head:
        if not head_keys and not allow_missing_head:
            raise CheckpointError(f"{path}: no masked-LM head (no cls.predictions.* tensors): an "
                                  "encoder-only checkpoint cannot predict masked tokens; use one "
                                  "saved with its head, such as a `minibert pretrain` run")
        head = {"head." + k: v for k, v in _HEAD_MAP.items()}
        mapping.update(head)
        if allow_missing_head:
            optional.update(dict.fromkeys(head, "no MLM head (cls.predictions.*) in the "
                                                "checkpoint; created fresh"))
    elif head_keys:
        notes.append(f"MLM head ({len(head_keys)} cls.predictions.* tensors) not used by "
                            "the encoder")
        for k in head_keys:
            del tensors[k]

    own = model.state_dict()
    state, problems, used, fresh = {}, [], set(), set()
    for ours, theirs in mapping.items():
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        absent = [n for n in names if n not in tensors]
        if absent:
            if ours in optional:
                fresh.add(optional[ours])
            else:
                problems.extend(f"missing: {n} (expected shape {_part_shape(own[ours], len(names))})"
                                for n in absent)
            continue
        parts = [tensors[n] for n in names]
        wrong_type = [n for n, t in zip(names, parts) if not t.is_floating_point()]
        problems.extend(f"wrong dtype: {n} is {tensors[n].dtype}, expected floating point"
                        for n in wrong_type)
        want = _part_shape(own[ours], len(names))
        wrong = [(n, t) for n, t in zip(names, parts) if tuple(t.shape) != want]
        problems.extend(f"wrong shape: {n} expected {want}, found {tuple(t.shape)}"
                        for n, t in wrong)
        used.update(names)
        if not wrong:  # parts of different shapes would not even concatenate
            state[ours] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    for n in sorted(set(tensors) - used):
        problems.append(f"unexpected: {n} {tuple(tensors[n].shape)}")
    if problems:
        raise CheckpointError(f"{path} does not fit the model in {ckpt_dir}/config.json:\n  "
                              + "\n  ".join(problems))
    notes.extend(sorted(fresh))
    model.load_state_dict(state, strict=False)  # fresh (optional) params keep their init
    return [f"{path}: {n}" for n in notes]


def _part_shape(param, n_parts):
    """Shape of one of the n tensors concatenated (dim 0) into `param`."""
    shape = list(param.shape)
    shape[0] //= n_parts
    return tuple(shape)


def load_model(ckpt_dir, with_head=False, allow_missing_head=False, notes=None, **overrides):
    """Build a model from `ckpt_dir/config.json` and load its weights. `overrides` replace config
    fields (for example `attention="eager"` or dropout rates for fine-tuning). Loading prints
    nothing: what was dropped or created fresh is appended to the list `notes`, when given, for
    the command to report."""
    cfg_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: " + (
            "a file; give the checkpoint directory that holds it" if os.path.exists(ckpt_dir)
            else "no such checkpoint directory"))
    if not os.path.exists(cfg_path):
        raise missing_from_checkpoint(ckpt_dir, "no config.json; a checkpoint directory holds "
                                      "config.json, model.safetensors and tokenizer.json or "
                                      "vocab.txt")
    cfg = BertConfig.from_json(cfg_path)
    if overrides:
        cfg = BertConfig(**{**cfg.__dict__, **overrides})
    # Building initialises every weight at random, though the checkpoint overwrites all but an
    # absent pooler or head; on a forked CPU generator (the model is built on the CPU), so that
    # loading leaves the caller's random stream where it was, and a seeded caller still gets
    # the same fresh pooler or head.
    with torch.random.fork_rng(devices=[]):
        model = BertForMLM(cfg) if with_head else BertEncoder(cfg)
    found = load_state_into(model, ckpt_dir, with_head, allow_missing_head)
    if notes is not None:
        notes.extend(found)
    return model.eval()


def check_vocabulary(config, tokenizer, ckpt_dir):
    """The tokenizer's ids must index the embedding: a vocabulary larger than the config's
    vocab_size would look rows up past its end (a smaller one is fine: rows left unused)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{tokenizer.source}: {tokenizer.vocab_size} tokens, but "
                              f"{ckpt_dir}/config.json has vocab_size {config.vocab_size}: the "
                              "tokenizer belongs to another model")


def hf_state_dict(model):
    """minibert's weights under Hugging Face's canonical names (`bert.` prefix, `cls.predictions.*`
    when the model has an MLM head). The tied decoder weight is not stored, as transformers does."""
    with_head = isinstance(model, BertForMLM)
    enc = model.bert if with_head else model
    own = model.state_dict()
    out = {}
    mapping = {**_encoder_map(enc.config.num_hidden_layers), **_POOLER_MAP}
    for ours, theirs in mapping.items():
        t = own[("bert." if with_head else "") + ours]
        if isinstance(theirs, tuple):
            for n, part in zip(theirs, t.chunk(len(theirs), 0)):
                out["bert." + n] = part
        else:
            out["bert." + theirs] = t
    if with_head:
        for ours, theirs in _HEAD_MAP.items():
            out[theirs] = own["head." + ours]
    return out


def save_model(model, out_dir, tokenizer=None, pooler=True):
    """Write `out_dir` in the Hugging Face layout, every file atomically. config.json's
    `architectures` says what is there: BertForMaskedLM with an MLM head, else BertModel.
    pooler=False leaves BERT's pooler out, as transformers' BertForMaskedLM does: for a pooler
    never loaded nor trained, so that the next load says it is fresh instead of reading noise
    as trained weights. Returns the names of the files written."""
    os.makedirs(out_dir, exist_ok=True)
    arch = "BertForMaskedLM" if isinstance(model, BertForMLM) else "BertModel"
    model.config.save_json(os.path.join(out_dir, "config.json"), arch)
    state = {k: v for k, v in hf_state_dict(model).items()
             if pooler or not k.startswith("bert.pooler.")}
    atomic_save_safetensors(os.path.join(out_dir, "model.safetensors"), state,
                            metadata={"format": "pt"})
    written = ["config.json", "model.safetensors"]
    if tokenizer is not None:
        # what transformers truncates to: the positions the model has
        written += tokenizer.save(out_dir, model_max_length=model.config.max_position_embeddings)
    return written
