"""`minibert tokenizer train`: an uncased WordPiece vocabulary learned from your own text.

Follows BERT's tokenizer (Devlin et al. 2019; Wu et al. 2016 for WordPiece), with the text
pipeline and the `[CLS] A [SEP]` template of minibert/tokenizer.py, so that a trained tokenizer
and a loaded one read text the same way. The vocabulary is learned by
`tokenizers.trainers.WordPieceTrainer`, which, like Hugging Face's BERT tokenizer training, runs
a BPE-style merge count and then stores the pieces as a WordPiece vocabulary.

Special tokens come first, in BERT's order with [PAD] = 0 (the embedding row the model zeroes):
[PAD] [UNK] [CLS] [SEP] [MASK].

Limits: uncased only; the trainer reads the whole corpus into its word counts (fine for the
millions of words this project trains on, not for a web crawl).
"""

import os
import sys
from dataclasses import dataclass

from train.command import option

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

from minibert.tokenizer import SPECIALS, Tokenizer, bert_normalization, build_wordpiece
from train.command import add_dataclass_flags, dataclass_from_args, print_config
from train.data.examples import decode_line
from train.loop.rundir import check_not_a_model



@dataclass
class TokenizerTrainConfig:
    corpus: list[str] = option(None, "text files to learn the vocabulary from")
    out: str = option(None, "directory for tokenizer.json, vocab.txt and tokenizer_config.json")
    vocab_size: int = option(16384, "vocabulary size, special tokens included (BERT: 30522; a "
                             "small model on a small corpus does better with fewer, commoner "
                             "pieces)")
    min_frequency: int = option(2, "a merge must be seen this often: a piece seen once is noise")
    limit_alphabet: int = option(1000, "keep the most frequent characters only (BERT's vocabulary "
                                 "has about 1000); rarer ones become [UNK]")


def train_tokenizer(corpus, vocab_size, min_frequency=2, limit_alphabet=1000):
    """Learn a WordPiece vocabulary from the files in `corpus`; returns a minibert Tokenizer."""
    for path in corpus:
        if os.path.isdir(path):
            raise ValueError(f"{path}: a directory; give its files, e.g. {path}/*.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        # else the trainer learns nothing and says nothing; a BOM and Unicode spaces are blank too
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            if not any(line.strip() for line in f):  # stops at the first line with text
                raise ValueError(f"{path}: no text to learn from (empty, or blank lines only)")
    if vocab_size <= len(SPECIALS):
        raise ValueError(f"--vocab-size {vocab_size} leaves no room beside {len(SPECIALS)} "
                         "special tokens")
    if limit_alphabet < 1:  # 0 keeps no character, so no piece can be learned
        raise ValueError(f"--limit-alphabet {limit_alphabet}: must be at least 1 (the number of "
                         "characters kept)")
    tok = HFTokenizer(WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    bert_normalization(tok, lowercase=True)  # the same pipeline a loaded vocab.txt gets
    trainer = WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                               special_tokens=list(SPECIALS), limit_alphabet=limit_alphabet,
                               continuing_subword_prefix="##", show_progress=sys.stderr.isatty())
    try:
        tok.train(list(corpus), trainer)
    except Exception as e:  # noqa: BLE001 (the Rust trainer's errors name no file)
        for path in corpus:  # find the line it choked on: not UTF-8 is the usual cause
            with open(path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    decode_line(raw, path, n)
        raise ValueError(f"{', '.join(corpus)}: {e}") from None
    # The trainer numbers tokens in hash order where it has no other, so two runs that learn the
    # same tokens give them different ids. One fixed order instead: the specials first ([PAD] at
    # pad_token_id 0, whose row the model zeroes), then the rest sorted; and the vocabulary is
    # read as a vocab.txt is. (Which of two equally frequent merges the trainer keeps at the end
    # of the vocabulary is hash order too, and cannot be fixed from here: a run that must repeat
    # exactly reuses a tokenizer, --tokenizer.)
    rest = sorted(t for t in tok.get_vocab() if t not in SPECIALS)
    if not rest:  # text of control characters alone, say: the normalizer drops them all
        raise ValueError(f"{', '.join(corpus)}: no text to learn from (no token was learned)")
    vocab = {t: i for i, t in enumerate([*SPECIALS, *rest])}
    return Tokenizer(build_wordpiece(vocab), source="trained on " + ", ".join(corpus))


def cmd_tokenizer_train(args):
    cfg = dataclass_from_args(TokenizerTrainConfig, args)
    print_config(cfg, "tokenizer train config")
    # an earlier tokenizer there may be written over; a model's vocabulary may not
    check_not_a_model(cfg.out, ("config.json", "model.safetensors", "pytorch_model.bin"))
    try:
        tok = train_tokenizer(cfg.corpus, cfg.vocab_size, cfg.min_frequency, cfg.limit_alphabet)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"minibert tokenizer train: {e}") from None
    tok.save(cfg.out)
    if tok.vocab_size > cfg.vocab_size:  # the trainer keeps every character, whatever the size
        print(f"minibert tokenizer train: {tok.vocab_size} tokens, more than --vocab-size "
              f"{cfg.vocab_size}: the corpus's characters and their ## forms alone take that "
              "many (a lower --limit-alphabet keeps fewer)", file=sys.stderr)
    print(f"tokenizer: {tok.vocab_size} tokens written to {cfg.out}/tokenizer.json and "
          "vocab.txt", file=sys.stderr)


def register(sub):
    t = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(
        dest="tokenizer_command", required=True, metavar="ACTION")
    p = t.add_parser("train", help="learn an uncased WordPiece vocabulary from text files")
    add_dataclass_flags(p, TokenizerTrainConfig, skip=("corpus", "out"))
    # one or more files after one flag, as `--corpus a.txt b.txt`
    p.add_argument("--corpus", nargs="+", required=True, help="text files")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_tokenizer_train)
