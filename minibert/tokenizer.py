"""A thin layer over Hugging Face `tokenizers`: BERT's WordPiece, batched, padded, as LongTensors.

It loads `tokenizer.json` when the checkpoint has one, else builds BERT's pipeline from
`vocab.txt` (BertNormalizer: clean text, split CJK characters, strip accents, lowercase, as
`tokenizer_config.json` says; then BertPreTokenizer on whitespace and punctuation; then WordPiece
with `##` continuations; [CLS], [SEP], [MASK]... written in a text are those tokens). Either way
the ids equal `transformers.BertTokenizerFast` (tests/test_tokenizer.py).

Truncation is longest-first: for a pair, tokens are taken from the longer side until it fits.
Padding is dynamic: to the longest sequence in the batch, never to a fixed length.
"""

import json
import os

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from minibert.errors import CheckpointError, missing_from_checkpoint
from minibert.io import load_json_object

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Tokenizer:
    def __init__(self, tok: HFTokenizer, source="tokenizer"):
        self.tok = tok
        self.source = source
        # A published tokenizer.json may carry its own padding/truncation (MiniLM's truncates at
        # 128). We decide both per call, so clear them.
        self.tok.no_padding()
        self.tok.no_truncation()
        ids = {s: tok.token_to_id(s) for s in SPECIALS}
        missing = [s for s, i in ids.items() if i is None]
        if missing:
            raise CheckpointError(f"{source}: vocabulary lacks BERT's special tokens {missing}")
        self.pad_id, self.unk_id = ids["[PAD]"], ids["[UNK]"]
        self.cls_id, self.sep_id, self.mask_id = ids["[CLS]"], ids["[SEP]"], ids["[MASK]"]
        self.special_ids = sorted(ids.values())

    @classmethod
    def from_dir(cls, path):
        tj, vt, tc = (os.path.join(path, f) for f in ("tokenizer.json", "vocab.txt",
                                                       "tokenizer_config.json"))
        config = read_tokenizer_config(tc)
        if os.path.exists(tj):
            try:
                tok = HFTokenizer.from_file(tj)
            except Exception as e:  # tokenizers raises a bare Exception that names no file
                raise CheckpointError(f"{tj}: not a readable tokenizer.json ({e})") from None
            # transformers reads a BERT checkpoint's tokenizer with its BERT class (named in
            # tokenizer_config.json, or by config.json's model_type when it names none), which sets
            # the normalizer from tokenizer_config.json (BERT's defaults for keys it lacks) over
            # what tokenizer.json says, and puts [CLS] A [SEP] around the pieces: so do we.
            named = config.get("tokenizer_class")
            if named in ("BertTokenizer", "BertTokenizerFast") or named is None and \
                    model_type(path) == "bert":
                if isinstance(tok.normalizer, normalizers.BertNormalizer):
                    bert_normalization(tok, **normalizer_options(config, tc))
                if tok.post_processor is None:
                    bert_template(tok)
            return cls(tok, source=tj)
        if os.path.exists(vt):
            tok = build_wordpiece(read_vocab(vt), **normalizer_options(config, tc))
            add_tokens(tok, config, path)  # what transformers added to the vocabulary beside it
            return cls(tok, source=vt)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: " + (
                "a file; give the directory that holds it" if os.path.exists(path)
                else "no such checkpoint directory"))
        raise missing_from_checkpoint(path, "neither tokenizer.json nor vocab.txt")

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encodings(self, texts, pairs=None, max_length=512):
        """The raw `tokenizers.Encoding`s, for callers that need offsets or word ids."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts, not one string")
        if max_length < (2 if pairs is None else 3):  # below, tokenizers would not truncate at all
            raise ValueError(f"max_length={max_length} leaves no room for a token beside "
                             f"[CLS] and [SEP]" + (" and the pair's [SEP]" if pairs else ""))
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        self.tok.enable_truncation(max_length=max_length, strategy="longest_first")
        try:
            inputs = list(texts) if pairs is None else list(zip(texts, pairs))
            return self.tok.encode_batch(inputs)
        finally:
            self.tok.no_truncation()

    def encode_batch(self, texts, pairs=None, max_length=512, return_offsets=False):
        """texts (and optional pairs) -> dict of LongTensors (B, T), padded to the longest."""
        encs = self.encodings(texts, pairs, max_length)
        return self.collate(encs, return_offsets)

    def collate(self, encs, return_offsets=False):
        B, T = len(encs), max((len(e.ids) for e in encs), default=0)  # no texts: (0, 0)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        token_type_ids = torch.zeros((B, T), dtype=torch.long)
        for i, e in enumerate(encs):
            n = len(e.ids)
            input_ids[i, :n] = torch.tensor(e.ids)
            attention_mask[i, :n] = 1
            token_type_ids[i, :n] = torch.tensor(e.type_ids)
        out = {"input_ids": input_ids, "attention_mask": attention_mask,
               "token_type_ids": token_type_ids}
        if return_offsets:  # character (start, end) of each token in its text; (0, 0) for specials
            offsets = torch.zeros((B, T, 2), dtype=torch.long)
            for i, e in enumerate(encs):
                if e.offsets:
                    offsets[i, :len(e.offsets)] = torch.tensor(e.offsets)
            out["offsets"] = offsets
        return out

    def decode(self, ids):
        return self.tok.decode(list(ids))

    def id_to_token(self, i):
        return self.tok.id_to_token(i)

    def save(self, out_dir, model_max_length=512):
        """tokenizer.json, vocab.txt and tokenizer_config.json into out_dir; returns their names."""
        from minibert.io import atomic_write_text
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "tokenizer.json"), self.tok.to_str())
        # line i is id i: an id no token has (a vocab.txt that listed a token twice, whose
        # later line wins, as in transformers) gets a placeholder no text can produce
        tokens = {i: t for t, i in self.tok.get_vocab(with_added_tokens=True).items()}
        lines = [tokens.get(i, f"[unused-id-{i}]") for i in range(max(tokens) + 1)]
        atomic_write_text(os.path.join(out_dir, "vocab.txt"), "".join(t + "\n" for t in lines))
        # transformers rebuilds BERT's normalizer from these keys, ignoring tokenizer.json's: they
        # must say what ours does, or a cased model is read lowercased there.
        config = {"tokenizer_class": "BertTokenizer", "model_max_length": model_max_length}
        norm = self.tok.normalizer
        if isinstance(norm, normalizers.BertNormalizer):
            config.update(do_lower_case=norm.lowercase, strip_accents=norm.strip_accents,
                          tokenize_chinese_chars=norm.handle_chinese_chars)
        atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"),
                          json.dumps(config, indent=2) + "\n")
        return ["tokenizer.json", "vocab.txt", "tokenizer_config.json"]


def read_vocab(path):
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def read_tokenizer_config(path):
    """transformers' `tokenizer_config.json` as a dict; {} when there is none."""
    return load_json_object(path, CheckpointError) if os.path.exists(path) else {}


def model_type(path):
    """config.json's model_type in a checkpoint directory (BERT's when it names none, as
    minibert/config.py reads it); None without a readable one (a tokenizer's own directory)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d.get("model_type", "bert") if isinstance(d, dict) else None


def add_tokens(tok: HFTokenizer, config, path):
    """The tokens a vocab.txt checkpoint added after its vocabulary, as transformers saved them:
    added_tokens.json ({token: id}), or tokenizer_config.json's added_tokens_decoder ({id:
    {"content", "special", "normalized"}}). Each must get the id it was saved with."""
    added = {int(i): t for i, t in config.get("added_tokens_decoder", {}).items()
             if isinstance(t, dict) and "content" in t}
    extra = os.path.join(path, "added_tokens.json")
    if os.path.exists(extra):
        added.update({i: {"content": t} for t, i in load_json_object(extra, CheckpointError)
                      .items() if isinstance(i, int)})
    for i, t in sorted(added.items()):
        if tok.token_to_id(t["content"]) == i:
            continue  # in the vocabulary already (BERT's specials, listed there too)
        special = bool(t.get("special", False))
        tok.add_tokens([AddedToken(t["content"], special=special,
                                   normalized=t.get("normalized", not special))])
        if tok.token_to_id(t["content"]) != i:
            raise CheckpointError(f"{path}: added token {t['content']!r} was saved with id {i}, "
                                  f"and follows the vocabulary at {tok.token_to_id(t['content'])}")


def normalizer_options(config, path):
    """bert_normalization's keywords from a tokenizer config read from `path`: do_lower_case,
    strip_accents (None: strip when lowercasing) and tokenize_chinese_chars, where it has them."""
    options = {}
    for key, ours, none_ok in (("do_lower_case", "lowercase", False),
                               ("strip_accents", "strip_accents", True),
                               ("tokenize_chinese_chars", "chinese_chars", False)):
        if key in config:
            if not (isinstance(config[key], bool) or none_ok and config[key] is None):
                raise CheckpointError(f"{path}: {key}={config[key]!r} must be true or false"
                                      + (" or null" if none_ok else ""))
            options[ours] = config[key]
    return options


def bert_normalization(tok: HFTokenizer, lowercase=True, strip_accents=None, chinese_chars=True):
    """BERT's text pipeline around a WordPiece model: BertNormalizer (clean control characters,
    space around CJK characters, lowercase and strip accents; strip_accents=None strips them when
    lowercasing, as BERT does), BertPreTokenizer (split on whitespace and punctuation), and the
    `##`-joining decoder. `minibert tokenizer train` sets it before learning a vocabulary, so a
    trained tokenizer reads text exactly as a loaded one."""
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=chinese_chars,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")


def bert_template(tok: HFTokenizer):
    """BERT's special tokens around the pieces: [CLS] A [SEP], and [CLS] A [SEP] B [SEP] with
    segment 1 for B. Needs [CLS] and [SEP] in the vocabulary."""
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])


def build_wordpiece(vocab, lowercase=True, strip_accents=None, chinese_chars=True):
    """BERT's tokenizer around a WordPiece vocabulary ({token: id}), as vocab.txt describes it."""
    tok = HFTokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    bert_normalization(tok, lowercase, strip_accents, chinese_chars)
    # "[MASK]" in a text is the mask token, not "[", "mask", "]": matched before normalization
    # (lowercasing would make it "[mask]"), as transformers registers BERT's special tokens.
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in SPECIALS if s in vocab])
    bert_template(tok)
    return tok
