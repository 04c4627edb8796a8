"""The real processes a simulation runs against: ``slmops fleet serve``, a ``docker-registry`` holding the releases'
small signed variants, and (for ``--db postgresql``) a throw-away PostgreSQL cluster.

Every process runs on loopback on a free port with its files in the run's temporary folder, writes its output to a
log there, and is stopped for sure (the control plane with SIGINT first, so its report batcher writes what is
queued). A process that does not come up says so with the tail of its log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx

from slmops.types.errors import ConfigError, SourceError

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA = "application/vnd.docker.container.image.v1+json"
MODEL_MEDIA = "application/vnd.ollama.image.model"
CpuMeter = Callable[[], "float | None"]  # CPU seconds some process(es) used so far; None when unknown
PG_BIN = Path(os.environ.get("SLMOPS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux /proc), None where that cannot be read."""
    fields = _stat(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid``, its children alive now, and those it has reaped (a PostgreSQL postmaster and its
    backends, however often they come and go)."""
    own = _stat(pid)
    if own is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(int(v) for v in own[11:15]) / tick  # utime, stime, cutime, cstime
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (so ``[0]`` is the state, ``[1]`` the parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def ok(response: httpx.Response) -> bool:
    return response.status_code == 200


class Process:
    """``cmd`` running in the background, its stdout and stderr in ``log``; ``url`` is where it serves. The one
    wrapper of a served process, for the simulator and the test suite alike (``tests/procs.py``)."""

    def __init__(self, cmd: Sequence[str | Path], log: Path, url: str, env: Mapping[str, str] | None = None):
        self.url = url
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, path: str = "/health", ready: Callable[[httpx.Response], bool] = ok, verify: Any = True,
                   within: float = 60.0) -> None:
        """Return once ``GET url+path`` gets an answer ``ready`` accepts. If the process exits first, or ``within``
        seconds pass (a deadline for a hung start, not a speed check), stop it and raise with its log's tail."""
        deadline = time.monotonic() + within
        while True:
            try:
                if ready(httpx.get(self.url + path, timeout=1, verify=verify)):
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                command = " ".join([Path(self.proc.args[0]).name, *self.proc.args[1:]])
                raise SourceError(f"`{command}` did not start at {self.url}: {self.tail()}")
            time.sleep(0.05)

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, sig: int = signal.SIGTERM, within: float = 30.0) -> None:
        """Send ``sig``, wait up to ``within`` seconds, then kill. Stopping twice is harmless."""
        if self._log.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(within)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ControlPlane(Process):
    """``slmops fleet serve`` with its own SLMOPS_HOME; ``tick``: the rollout driver's period (SLMOPS_FLEET_TICK)."""

    def __init__(self, folder: Path, db_url: str, tick: float, trusted_key: Path | None):
        home = folder / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.db_url = db_url
        self.env = {**os.environ, "SLMOPS_HOME": str(home), "SLMOPS_FLEET_DB": db_url, "SLMOPS_CONFIG": "",
                    "SLMOPS_ALLOW_PRIVATE_REGISTRIES": "true", "SLMOPS_FLEET_TICK": f"{tick:g}s",
                    "SLMOPS_FLEET_TRUSTED_KEYS": str(trusted_key or "")}
        cmd = [sys.executable, "-m", "slmops.cli.main", "fleet", "serve", "--host", "127.0.0.1", "--port",
               str(self.port), "--insecure-registries"]
        super().__init__(cmd, folder / "control-plane.log", f"http://127.0.0.1:{self.port}", self.env)

    def stop(self, sig: int = signal.SIGINT, within: float = 60.0) -> None:
        super().stop(sig, within)  # SIGINT: uvicorn's graceful shutdown, the batcher writes what is queued


class Registry(Process):
    """Debian's ``docker-registry`` (Distribution 2.8) on a free loopback port, storage in ``folder``."""

    def __init__(self, folder: Path):
        binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
        if not Path(binary).exists():
            raise ConfigError("docker-registry is not installed: apt-get install -y --no-install-recommends "
                              "docker-registry")
        folder.mkdir(parents=True, exist_ok=True)
        self.host = f"127.0.0.1:{free_port()}"
        config = {"version": 0.1, "log": {"level": "warn"},
                  "storage": {"filesystem": {"rootdirectory": str(folder / "storage")}},
                  "http": {"addr": self.host, "secret": secrets.token_hex(16)}}
        (folder / "config.yml").write_text(json.dumps(config))  # JSON is YAML
        super().__init__([binary, "serve", str(folder / "config.yml")], folder / "registry.log",
                         f"http://{self.host}")
        self.wait_ready("/v2/", within=30)

    def push(self, repo: str, tag: str, model: bytes) -> tuple[bytes, dict[str, bytes]]:
        """An Ollama-style model (config + one model layer) under ``repo:tag``; the manifest and its blobs."""
        config = json.dumps({"model_format": "gguf", "model_family": "llama", "file_type": "Q8_0"}).encode()
        blobs = {_sha(config): config, _sha(model): model}
        manifest = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                               "config": {"mediaType": CONFIG_MEDIA, "digest": _sha(config), "size": len(config)},
                               "layers": [{"mediaType": MODEL_MEDIA, "digest": _sha(model), "size": len(model)}]},
                              indent=2).encode()
        with httpx.Client(base_url=self.url, timeout=60) as c:
            for digest, content in blobs.items():
                start = c.post(f"/v2/{repo}/blobs/uploads/")
                _expect(start, 202)
                location = httpx.URL(str(start.url.join(start.headers["location"])))
                _expect(c.put(location.copy_merge_params({"digest": digest}), content=content,
                              headers={"Content-Type": "application/octet-stream"}), 201)
            _expect(c.put(f"/v2/{repo}/manifests/{tag}", content=manifest,
                          headers={"Content-Type": DOCKER_MANIFEST}), 201)
        return manifest, blobs


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _expect(r: httpx.Response, status: int) -> None:
    if r.status_code != status:
        raise SourceError(f"registry answered {r.status_code} to {r.request.method} {r.request.url.path}: "
                          f"{r.text[:200]}")


@dataclass
class SigningKey:
    """An EC P-256 key pair (PEM files) that signs the variants; the control plane trusts its public half."""

    private: Path
    public: Path

    @classmethod
    def make(cls, folder: Path) -> SigningKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        out = cls(folder / "release.key", folder / "release.pub")
        out.private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        out.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))
        return out

    def sign(self, manifest: bytes, blobs: dict[str, bytes]) -> str:
        """A model-signing bundle (base64) over ``manifest.json`` and ``blobs/sha256-<hex>``: the folder a release
        signature covers (``slmops.security.signing``), so the control plane verifies it without the weights."""
        from model_signing import hashing, signing

        with tempfile.TemporaryDirectory(prefix="slmops-sim-sign-") as tmp:
            view = Path(tmp) / "view"
            (view / "blobs").mkdir(parents=True)
            (view / "manifest.json").write_bytes(manifest)
            for digest, content in blobs.items():
                (view / "blobs" / digest.replace(":", "-")).write_bytes(content)
            signing.Config().use_elliptic_key_signer(private_key=self.private).set_hashing_config(
                hashing.Config()).sign(view, Path(tmp) / "model.sig")
            return base64.b64encode((Path(tmp) / "model.sig").read_bytes()).decode("ascii")


class Postgres:
    """A throw-away PostgreSQL cluster (fsync off, loopback, trust): for ``--db postgresql`` runs. ``initdb``
    refuses root, so as root the folder belongs to ``postgres`` and the commands run through ``runuser``."""

    def __init__(self, bindir: Path = PG_BIN, user: str = "postgres"):
        self.bindir, self.user = bindir, user
        self.root = Path(tempfile.mkdtemp(prefix="slmops-sim-pg-"))
        self.port = free_port()
        missing = [b for b in ("initdb", "pg_ctl", "psql") if not (bindir / b).exists()]
        if missing:
            shutil.rmtree(self.root, ignore_errors=True)
            raise ConfigError(f"PostgreSQL binaries not found in {bindir}: install postgresql-15 or set "
                              "SLMOPS_TEST_PG_BIN, or pass --db with a database URL")
        (self.root / "sock").mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.root, user)
            shutil.chown(self.root / "sock", user)
        try:
            self._run("initdb", "-D", str(self.root / "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                      "--no-locale", "--no-sync")
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root / 'sock'} -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                      "-o", opts, "start")
            self._run("psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c",
                      "CREATE DATABASE fleet")
        except BaseException:
            self.stop()
            raise
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/fleet"

    def cpu_seconds(self) -> float | None:
        """CPU seconds the cluster (postmaster and backends alive now) has used."""
        try:
            pid = int((self.root / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return tree_cpu_seconds(pid)

    def _run(self, binary: str, *args: str) -> None:
        cmd = [str(self.bindir / binary), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root, check=False)
        if done.returncode:
            raise SourceError(f"{binary} failed: {(done.stderr or done.stdout).strip()[-500:]}")

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
            except SourceError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


async def admin_key(db_url: str) -> str:
    """A new admin key, made on the control plane's database as ``slmops fleet keys create`` makes it on the
    control-plane host (the server has migrated the database by the time it answers)."""
    from slmops.fleet.control.db import Database
    from slmops.fleet.control.operators import create_key

    db = Database(db_url)
    try:
        return await create_key(db, f"sim-{secrets.token_hex(3)}", "admin", "host:simulator")
    finally:
        await db.close()


def admin(url: str, key: str) -> Any:
    """The typed operators' client of the control plane at ``url`` (synchronous; the runner calls it in a thread)."""
    from slmops.client.fleet import FleetClient
    return FleetClient(url, key, timeout=120)
