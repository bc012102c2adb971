"""The model commands: `minibert embed`, `minibert fill-mask` and `minibert weights import`.

`embed` is compared with sentence-transformers running the published all-MiniLM-L6-v2 directory
(its modules.json says: BertModel, mean pooling, L2 normalisation; max_seq_length 256, which is
also embed's default --max-length). `fill-mask` is compared with transformers' BertForMaskedLM.
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import ATOL_FP32, randomize_
from safetensors.torch import load_file, save_file

import minibert
from train.cli import main

TEXTS = [
    "A man is playing a guitar.",
    "The new movie is awesome, I loved every minute of it!",
    "Résumé: 3 years at Café Déjà Vu (2019-2022).",
    " ".join(["This sentence is repeated to pass the 256-token limit."] * 40),  # truncated
    "ok",
]


def _stdout_json_lines(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines()]


def test_embed_matches_sentence_transformers(minilm_dir, minilm_original_dir, capsys):
    from sentence_transformers import SentenceTransformer

    # --batch-size 2: several batches, each padded differently.
    argv = ["embed", minilm_dir, "--batch-size", "2"]
    for t in TEXTS:
        argv += ["--text", t]
    (vectors,) = _stdout_json_lines(capsys, argv)
    st = SentenceTransformer(minilm_original_dir, device="cpu")
    assert st.max_seq_length == 256
    ref = st.encode(TEXTS, normalize_embeddings=True, convert_to_tensor=True)  # (B, 384)
    torch.testing.assert_close(torch.tensor(vectors), ref.cpu(), atol=ATOL_FP32, rtol=0)


def test_embed_subprocess_stdout_is_pure_json(minilm_dir, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-P", "-m", "train.cli", "embed", minilm_dir,
                        "--text", "Hello world.", "--text", "A second, longer sentence."],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    vectors = json.loads(r.stdout)  # the whole of stdout is one JSON document
    assert len(vectors) == 2 and all(len(v) == 384 for v in vectors)
    assert torch.linalg.vector_norm(torch.tensor(vectors), dim=-1).sub(1).abs().max() < 1e-6
    assert "minibert:" in r.stderr  # logs went to stderr
    # Same numbers as running the command in this process.
    (inproc,) = _stdout_json_lines(capsys, ["embed", minilm_dir, "--text", "Hello world.",
                                            "--text", "A second, longer sentence."])
    assert inproc == vectors


@pytest.fixture(scope="module")
def tiny_mlm_dir(minilm_original_dir, tmp_path_factory):
    """A tiny random BertForMaskedLM with MiniLM's 30522-token tokenizer, made by transformers.

    Weights are randomised at scale O(1) (conftest.randomize_) so the predicted distributions are
    peaked and the top tokens are well separated, not all ~1/V."""
    d = tmp_path_factory.mktemp("tiny_mlm")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
    hf = randomize_(transformers.BertForMaskedLM(cfg), seed=2).eval()
    hf.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm_original_dir, f), d)
    return str(d), hf


def test_fill_mask_prints_one_json_line_per_text(tiny_mlm_dir, minilm_hf_tokenizer, capsys):
    d, hf = tiny_mlm_dir
    texts = ["The capital of France is [MASK].", "[MASK] and [MASK] went up the hill."]
    lines = _stdout_json_lines(capsys, ["fill-mask", d, *texts, "--top-k", "3"])
    assert [line["text"] for line in lines] == texts
    for text, line in zip(texts, lines):
        enc = minilm_hf_tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = hf(**enc).logits[0]  # (T, V)
        where = (enc["input_ids"][0] == minilm_hf_tokenizer.mask_token_id).nonzero().flatten()
        top = logits[where].softmax(-1).topk(3)  # (n_masks, 3)
        assert len(line["masks"]) == len(where) == text.count("[MASK]")
        for got, probs, ids in zip(line["masks"], top.values, top.indices):
            assert [g["token"] for g in got] == minilm_hf_tokenizer.convert_ids_to_tokens(ids)
            # probabilities are printed rounded to 4 decimals
            for g, p in zip(got, probs.tolist()):
                assert abs(g["prob"] - p) <= 0.5e-4 + ATOL_FP32
        assert got[0]["prob"] > 0.01  # a peaked distribution, so the ranking means something


def test_fill_mask_reads_text_flags_and_stdin(tiny_mlm_dir, capsys, monkeypatch):
    """`--text` and stdin, as embed and predict take them: the same answers as positional texts."""
    d, _ = tiny_mlm_dir
    texts = ["The capital of France is [MASK].", "[MASK] and [MASK] went up the hill."]
    capsys.readouterr()
    assert main(["fill-mask", d, texts[0]]) == 0
    assert "pooler" not in capsys.readouterr().err  # a BertForMaskedLM has none; none is used
    positional = _stdout_json_lines(capsys, ["fill-mask", d, *texts])
    flags = _stdout_json_lines(capsys, ["fill-mask", "--model", d, texts[0], "--text", texts[1]])
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(texts) + "\n"))
    piped = _stdout_json_lines(capsys, ["fill-mask", "--model", d])
    assert positional == flags == piped and len(positional) == 2


def test_fill_mask_answers_only_tokens_the_tokenizer_has(tmp_path, capsys):
    """A model with more embedding rows than its tokenizer has tokens (a padded vocabulary):
    the rows without a token are left out, not printed as null, and the rest sum to 1."""
    from tests.tiny import WORDS, make_checkpoint
    d = make_checkpoint(tmp_path / "padded", mlm=True, vocab_size=len(WORDS) + 5 + 64)
    (line,) = _stdout_json_lines(capsys, ["fill-mask", str(d), "the [MASK] was good",
                                          "--top-k", "1000"])
    (guesses,) = line["masks"]
    assert len(guesses) == len(WORDS) + 5 and all(g["token"] is not None for g in guesses)
    assert abs(sum(g["prob"] for g in guesses) - 1) < 1e-4 * len(guesses)


def test_fill_mask_without_mask_is_an_error(tiny_mlm_dir, capsys, monkeypatch):
    with pytest.raises(SystemExit, match=r"text 1: no \[MASK\]"):
        main(["fill-mask", tiny_mlm_dir[0], "no mask here"])
    # a later text without one (a trailing blank line, say) is refused before any answer
    monkeypatch.setattr("sys.stdin", io.StringIO("the [MASK] was good\n\n"))
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"stdin:2: no \[MASK\] in ''"):
        main(["fill-mask", "--model", tiny_mlm_dir[0]])
    assert capsys.readouterr().out == ""


def test_text_that_is_not_utf8_is_named(tiny_dir, capsys, monkeypatch):
    # bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)
    bad = b"caf\xe9 good".decode("utf-8", "surrogateescape")
    with pytest.raises(SystemExit, match=r"embed: --text 2: not UTF-8 \(byte 0xe9 at character "
                                         r"4\)"):
        main(["embed", "--model", tiny_dir, "--text", "fine", "--text", bad])
    monkeypatch.setattr("sys.stdin", io.StringIO("fine\n" + bad + "\n"))
    with pytest.raises(SystemExit, match=r"fill-mask: stdin:2: not UTF-8 \(byte 0xe9"):
        main(["fill-mask", "--model", tiny_dir])


def test_output_into_a_closed_pipe_ends_quietly(tiny_dir):
    # `minibert embed ... | head -c 10`: the reader leaves, minibert stops without a traceback,
    # with the status SIGPIPE would give (the `head` end of the pipe decides the shell's status)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-P", "-m", "train.cli", "embed", "--model", tiny_dir]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before minibert writes
    _, err = p.communicate("\n".join(["a good film"] * 2000).encode(), timeout=300)
    assert p.returncode == 141 and b"Traceback" not in err, err.decode()[-2000:]


def test_a_model_that_is_not_bert_is_refused(tmp_path, capsys):
    # RoBERTa's weights have BERT's names but count positions from pad + 1: loaded as BERT they
    # would give wrong vectors without a word
    from tests.tiny import make_checkpoint
    for key, value, why in [("model_type", "roberta", "model_type 'roberta': not a BERT"),
                            ("position_embedding_type", "relative_key",
                             "position_embedding_type 'relative_key'"),
                            # transformers masks a decoder's attention causally; ours is both ways
                            ("is_decoder", True, "is_decoder / add_cross_attention")]:
        d = make_checkpoint(tmp_path / str(value))
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        capsys.readouterr()
        assert main(["embed", "--model", str(d), "--text", "a"]) == 2
        assert f"config.json: {why}" in capsys.readouterr().err
    assert main(["embed", "--model", str(d / "model.safetensors"), "--text", "a"]) == 2
    assert "model.safetensors: a file; give the checkpoint directory" in capsys.readouterr().err


def test_weights_import_of_a_directory(tiny_mlm_dir, tmp_path, capsys):
    """`weights import DIR DEST` re-spells an old-style checkpoint (no `bert.` prefix,
    LayerNorm.gamma/beta, position_ids) into canonical names and writes a manifest."""
    d, hf = tiny_mlm_dir
    src = tmp_path / "old_style"
    src.mkdir()
    for f in ("config.json", "tokenizer.json", "vocab.txt"):
        shutil.copy(os.path.join(d, f), src)
    sd = {k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
          .replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
    sd["embeddings.position_ids"] = torch.arange(64)[None]
    save_file(sd, src / "model.safetensors")

    main(["weights", "import", str(src), str(tmp_path / "dest")])
    dest = tmp_path / "dest"
    keys = set(load_file(dest / "model.safetensors"))
    assert {k for k in keys if not k.startswith(("bert.", "cls.predictions."))} == set()
    assert not any("gamma" in k or "beta" in k or "position_ids" in k for k in keys)
    # BertForMaskedLM stores no pooler: none is written (not the random one loading made)
    assert not any("pooler" in k for k in keys) and "pooler" not in str(list(sd))
    assert {k for k in keys if k.startswith("cls.predictions.")} == {
        "cls.predictions.bias", "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
        "cls.predictions.transform.LayerNorm.bias"}
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["source"] == {"directory": str(src)}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest, name

    ids = torch.tensor([[101, 1996, 3007, 103, 102]])
    with torch.no_grad():
        torch.testing.assert_close(minibert.load_mlm(dest)(ids), hf(ids).logits,
                                   atol=ATOL_FP32, rtol=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """tests/tiny.py's 2-layer BERT with an MLM head: 64 positions, a 27-token vocabulary."""
    from tests.tiny import make_checkpoint
    return str(make_checkpoint(tmp_path_factory.mktemp("tiny") / "mlm", mlm=True))


def test_texts_longer_than_the_model_are_cut_at_its_positions(tiny_dir, capsys):
    long = "good movie " * 100  # 200 tokens; the model has 64 positions
    (cut,) = _stdout_json_lines(capsys, ["embed", tiny_dir, "--text", long])  # --max-length 256
    (at_64,) = _stdout_json_lines(capsys, ["embed", tiny_dir, "--text", long, "--max-length",
                                           "64"])
    assert cut == at_64
    (line,) = _stdout_json_lines(capsys, ["fill-mask", tiny_dir, "the [MASK] was " + long])
    assert len(line["masks"]) == 1
    with pytest.raises(SystemExit, match=r"no \[MASK\] in .* within its first 64 tokens"):
        main(["fill-mask", tiny_dir, long + "the [MASK]"])  # the mask lies past position 64


@pytest.mark.parametrize("argv,flag", [
    (["embed", "--text", "good", "--batch-size", "0"], "--batch-size"),
    (["embed", "--text", "good", "--batch-size", "-1"], "--batch-size"),
    (["embed", "--text", "good", "--max-length", "1"], "--max-length"),
    (["embed", "--text", "good", "--max-length", "0"], "--max-length"),
    (["fill-mask", "good [MASK]", "--top-k", "0"], "--top-k"),
    (["fill-mask", "good [MASK]", "--top-k", "-3"], "--top-k"),
])
def test_counts_and_lengths_below_their_minimum_are_refused(tiny_dir, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:  # argparse: status 2, one line naming the flag
        main([argv[0], tiny_dir, *argv[1:]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: '{argv[-1]}': give an integer" in err and "Traceback" not in err


def test_weights_import_names_a_damaged_or_pickled_checkpoint(tiny_dir, tmp_path, capsys):
    from tests.test_bad_inputs import check

    cut = tmp_path / "cut"
    shutil.copytree(tiny_dir, cut)
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:500])
    check("import-truncated", ["weights", "import", cut, tmp_path / "d1"],
          cut / "model.safetensors", capsys)
    binary = tmp_path / "bin"
    shutil.copytree(tiny_dir, binary)
    os.remove(binary / "model.safetensors")
    (binary / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    check("import-bin-only", ["weights", "import", binary, tmp_path / "d2"],
          "pytorch_model.bin, a pickle", capsys)
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()


def test_weights_import_names_a_file_dest_and_lists_only_what_it_wrote(tmp_path, capsys):
    from tests.tiny import make_checkpoint
    src = make_checkpoint(tmp_path / "src")
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="afile: a file, not a directory"):
        main(["weights", "import", str(src), str(tmp_path / "afile")])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "leftover.bin").write_text("junk")  # there before: not part of the import
    assert main(["weights", "import", str(src), str(dest)]) == 0
    files = json.loads((dest / "manifest.json").read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors", "tokenizer.json",
                             "tokenizer_config.json", "vocab.txt"]
    assert main(["weights", "import", str(src), str(dest)]) == 0  # an import again: fine
    (dest / "task.json").write_text("{}")  # a fine-tuned model: its head would no longer fit
    with pytest.raises(SystemExit, match="dest/task.json: .* holds a fine-tuned model or a "
                                         "training run"):
        main(["weights", "import", str(src), str(dest)])


def test_a_cache_that_cannot_be_a_directory_is_named(tmp_path, monkeypatch):
    from minibert.errors import FetchError
    from minibert.fetch import cache_dir
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("MINIBERT_CACHE", str(tmp_path / "afile"))
    with pytest.raises(FetchError, match=r"^\$MINIBERT_CACHE=.*afile: cannot be the cache"):
        cache_dir()


def test_stdin_is_read_as_utf8_whatever_the_locale(monkeypatch):
    """Python decodes stdin with the locale's codec: strictly under en_US.UTF-8 (a traceback on
    a bad byte), as Latin-1 under a Latin-1 locale (other vectors, silently). minibert reads the
    bytes as UTF-8 itself; a closed stdin is a missing input, not an AttributeError."""
    import io
    from minibert.commands import read_stdin_lines

    def stdin(data, encoding):
        return io.TextIOWrapper(io.BytesIO(data), encoding=encoding, errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin("café\r\nnaïve\n\nend".encode(), "latin-1"))
    assert read_stdin_lines("embed") == ["café", "naïve", "", "end"]
    monkeypatch.setattr(sys, "stdin", stdin(b"good\n\xff bad\n", "utf-8"))
    with pytest.raises(SystemExit, match=r"^minibert embed: stdin:2: not UTF-8 \(byte 0xff"):
        read_stdin_lines("embed")
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(SystemExit, match="give --text, or pipe texts in"):
        read_stdin_lines("embed")
