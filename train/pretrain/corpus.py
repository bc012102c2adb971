"""Pretraining data: tokenize a corpus once into a memory-mapped token file, pack it into
fixed-length sequences, and serve masked batches that are a pure function of (seed, epoch, batch).

1. Token cache. Each corpus file (one document per line; blank lines are not documents) is
   tokenized once, without special tokens, into a flat binary file of uint16 ids (uint32 when the
   vocabulary has more than 65535 tokens), read back with `numpy.memmap` so a corpus larger than
   memory costs only the pages touched. Document boundaries live in `offsets.npy`: document d is
   tokens[offsets[d]:offsets[d+1]]. The cache is keyed by the corpus file (size, mtime) and the
   tokenizer (sha256 of its tokenizer.json), so editing either re-tokenizes and nothing stale is
   read. It lives in `token_cache_dir()`: `--cache-dir`, else `$MINIBERT_CACHE/tokens` (by default
   ~/.cache/minibert/tokens), never beside the user's corpus; `minibert pretrain` prints where.
   Each file is written atomically, the meta file last.

2. Packing, RoBERTa's FULL-SENTENCES (Liu et al. 2019, section 4.2): documents are laid end to
   end, with one [SEP] after each, into a stream; sequence i is [CLS] + stream[i*L : (i+1)*L] +
   [SEP] with L = max_len - 2. A sequence may cross a document boundary (the [SEP] inside marks
   it) and a document may span sequences. Nothing is padded except the last sequence, so no
   compute goes to padding, and every token appears in exactly one sequence
   (tests/test_pretrain_data.py). We chose this over BERT's sentence-pair packing because
   RoBERTa found it at least as good without next-sentence prediction, and it needs no sentence
   splitter. Limit: a sequence may start or end mid-word, and attention crosses documents.

3. Batches. The order of sequences in epoch e is a permutation drawn from (seed, e); batch b of
   it is masked with a generator seeded from (seed, e, b). So a resumed run sees exactly the
   batches and masks the killed run would have seen.
"""

import hashlib
import os

import numpy as np
import torch

from minibert.fetch import cache_dir as minibert_cache_dir
from minibert.io import atomic_open, atomic_write_json, load_json
from train.data.examples import decode_line
from train.loop.progress import Progress
from train.pretrain.masking import IGNORE


def _dtype_for(vocab_size):
    return np.uint16 if vocab_size <= 65535 else np.uint32


def token_cache_dir(cache_dir=None):
    """Where token caches go: the given directory, else `tokens/` in minibert's cache."""
    return cache_dir or os.path.join(minibert_cache_dir(), "tokens")


def cache_paths(corpus, tok, cache_dir=None):
    """(tokens, offsets, meta) paths of `corpus` tokenized by `tok`; the key says which file
    version and which tokenizer made them."""
    st = os.stat(corpus)
    h = hashlib.sha256()
    h.update(f"{os.path.abspath(corpus)}|{st.st_size}|{st.st_mtime_ns}|".encode())
    h.update(tok.tok.to_str().encode())  # the whole pipeline: vocabulary and normalisation
    key = h.hexdigest()[:16]
    stem = os.path.join(token_cache_dir(cache_dir), f"{os.path.basename(corpus)}.{key}")
    return stem + ".tokens", stem + ".offsets.npy", stem + ".json"


def tokenize_to_cache(corpus, tok, cache_dir=None, lines_per_batch=1000, log=None):
    """Tokenize `corpus` once (a cache hit returns at once); returns (tokens memmap, offsets,
    meta). `log`: a stream for the progress bar (None: silent)."""
    tokens_path, offsets_path, meta_path = cache_paths(corpus, tok, cache_dir)
    dtype = _dtype_for(tok.vocab_size)
    cached = None
    if os.path.exists(meta_path):
        try:
            cached = _read_cache(tokens_path, offsets_path, meta_path)
        except (OSError, ValueError, KeyError, TypeError):  # a cache damaged after it was made
            if log is not None:
                print(f"token cache {meta_path[:-len('.json')]}.*: damaged; tokenizing {corpus} "
                      "again", file=log, flush=True)
            os.remove(meta_path)
    if cached is None:
        lengths = []
        bar = Progress(os.path.getsize(corpus), f"tokenize {corpus} (bytes)", file=log)
        with open(corpus, "rb") as f, atomic_open(tokens_path, "wb") as out:
            done, line = 0, 0
            while True:
                raw = [f.readline() for _ in range(lines_per_batch)]
                raw = [r for r in raw if r]
                if not raw:
                    break
                done += sum(len(r) for r in raw)
                docs = [decode_line(r, corpus, line + n).strip() for n, r in enumerate(raw, 1)]
                docs = [s for s in docs if s]
                line += len(raw)
                for enc in tok.tok.encode_batch(docs, add_special_tokens=False):
                    out.write(np.asarray(enc.ids, dtype=dtype).tobytes())
                    lengths.append(len(enc.ids))
                bar.update(done, docs=len(lengths))
        bar.close()
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)  # (n_docs + 1,)
        np.cumsum(lengths, out=offsets[1:])
        with atomic_open(offsets_path, "wb") as out:
            np.save(out, offsets)
        # written last: its presence says the two files above are complete
        atomic_write_json(meta_path, {"corpus": os.path.abspath(corpus), "tokenizer": tok.source,
                                      "dtype": np.dtype(dtype).name, "n_docs": len(lengths),
                                      "n_tokens": int(offsets[-1])})
        cached = _read_cache(tokens_path, offsets_path, meta_path)
    if cached[2]["n_tokens"] == 0:
        raise ValueError(f"{corpus}: no tokens (an empty file, or only blank lines)")
    return cached


def _read_cache(tokens_path, offsets_path, meta_path):
    """(tokens memmap, offsets, meta) of a cache, checked to agree with itself."""
    meta = load_json(meta_path)
    offsets = np.load(offsets_path)  # allow_pickle is off: a pickle is refused, not loaded
    n, width = int(meta["n_tokens"]), np.dtype(meta["dtype"]).itemsize
    if (offsets.dtype != np.int64 or offsets.shape != (meta["n_docs"] + 1,) or offsets[-1] != n
            or os.path.getsize(tokens_path) != n * width):
        raise ValueError(f"{meta_path}: its files disagree")
    tokens = np.memmap(tokens_path, dtype=meta["dtype"], mode="r", shape=(n,)) if n else \
        np.zeros(0, dtype=meta["dtype"])  # an empty file cannot be mapped
    return tokens, offsets, dict(meta, cache=os.path.dirname(tokens_path))


class Packing:
    """FULL-SENTENCES packing of one token file; `packing[i]` is sequence i as an int64 array."""

    def __init__(self, tokens, offsets, max_len, cls_id, sep_id):
        self.tokens, self.offsets = tokens, offsets
        self.cls_id, self.sep_id = cls_id, sep_id
        self.L = max_len - 2  # slots between [CLS] and the closing [SEP]
        n_docs = len(offsets) - 1
        # in the stream, document d starts after the d boundary [SEP]s that precede it
        self.doc_start = offsets[:-1] + np.arange(n_docs)  # (n_docs,) stream positions
        self.stream_len = int(offsets[-1]) + n_docs  # every token plus one [SEP] per document

    def __len__(self):
        return -(-self.stream_len // self.L)  # the last sequence may be short

    def __getitem__(self, i):
        s, e = i * self.L, min((i + 1) * self.L, self.stream_len)  # stream range [s, e)
        parts = [np.array([self.cls_id])]
        d = int(np.searchsorted(self.doc_start, s, side="right")) - 1  # document holding s
        while d < len(self.doc_start) and self.doc_start[d] < e:
            a = self.doc_start[d]
            doc_end = a + (self.offsets[d + 1] - self.offsets[d])  # stream pos of its [SEP]
            lo, hi = max(s, a), min(e, doc_end)
            if hi > lo:
                t0 = self.offsets[d] + (lo - a)
                parts.append(np.asarray(self.tokens[t0:t0 + (hi - lo)]))
            if s <= doc_end < e:
                parts.append(np.array([self.sep_id]))  # the document boundary
            d += 1
        parts.append(np.array([self.sep_id]))
        return np.concatenate(parts).astype(np.int64)


class BatchIndices(list):
    """A list of sequence indices that also knows which (epoch, batch) it is: the trainer treats
    it as a plain list; collate reads the two numbers to seed the masking."""

    def __init__(self, indices, epoch, number, shard=()):
        super().__init__(indices)
        self.epoch, self.number = epoch, number
        self.shard = shard  # (rank, world) for one data-parallel rank's part, else ()

    def part(self, rank, world):
        """Rank `rank`'s strided share of this batch (train/loop/distributed.py). The share keeps
        the batch's numbers and adds its own, so each rank masks its sequences with a stream
        of its own rather than repeating rank 0's mask pattern."""
        return BatchIndices(self[rank::world], self.epoch, self.number, (rank, world))


def _seed(*numbers):
    """One 63-bit seed from several integers, well mixed (nearby tuples give unrelated seeds).
    SeedSequence takes non-negative entries only; n -> 2|n| (+1 if negative) keeps them distinct."""
    entropy = [2 * n if n >= 0 else -2 * n - 1 for n in numbers]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1)


class MLMData:
    """Packed sequences of one or more token files, in shuffled, dynamically masked batches."""

    def __init__(self, packings, batch_size, seed, masker, pad_id, shuffle=True):
        self.packings, self.batch_size, self.seed = packings, batch_size, seed
        self.masker, self.pad_id, self.shuffle = masker, pad_id, shuffle
        self.starts = np.cumsum([0] + [len(p) for p in packings])  # (n_files + 1,)

    def __len__(self):
        return int(self.starts[-1])

    def sequence(self, i):
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.packings[f][i - int(self.starts[f])]

    def batches(self, epoch):
        n = len(self)
        if self.shuffle:
            order = np.random.default_rng(_seed(self.seed, epoch)).permutation(n)
        else:
            order = np.arange(n)
        return [BatchIndices(order[i:i + self.batch_size].tolist(), epoch, b)
                for b, i in enumerate(range(0, n, self.batch_size))]

    def collate(self, idx):
        seqs = [self.sequence(i) for i in idx]
        B, T = len(seqs), max(len(s) for s in seqs)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
        for r, s in enumerate(seqs):
            input_ids[r, :len(s)] = torch.from_numpy(s)
            attention_mask[r, :len(s)] = 1
        g = torch.Generator().manual_seed(_seed(self.seed, idx.epoch, idx.number, *idx.shard))
        corrupted, labels = self.masker(input_ids, g)
        return {"input_ids": corrupted, "attention_mask": attention_mask, "labels": labels}

    @staticmethod
    def count_items(batch):
        """What the masked-LM loss is a mean over: the masked positions. Accumulated batches are
        weighted by it (train/loop/accumulate.py), so that they add up to one big batch."""
        return int((batch["labels"] != IGNORE).sum())


def load_corpus(paths, tok, max_len, cache_dir=None, log=None):
    """Tokenize (or read from cache) and pack each file: a list of Packing. With a `log`
    stream, each file's size and the cache it lives in are reported there."""
    packings = []
    for path in paths:
        tokens, offsets, meta = tokenize_to_cache(path, tok, cache_dir, log=log)
        if log is not None:
            print(f"{path}: {meta['n_docs']:,} documents, {meta['n_tokens']:,} tokens "
                  f"({meta['dtype']}, token cache {meta['cache']})", file=log, flush=True)
        packings.append(Packing(tokens, offsets, max_len, tok.cls_id, tok.sep_id))
    return packings
