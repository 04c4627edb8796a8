"""What every CLI command shares: settings read once at start-up, the store, output helpers, the pull bar."""

from __future__ import annotations

import getpass
import importlib.util
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from slmops import wiring
from slmops.config.settings import Settings
from slmops.store.store import Store
from slmops.types.errors import SlmopsError

if TYPE_CHECKING:
    from slmops.engine.client import EngineConfig
    from slmops.engine.engine import Engine
    from slmops.ops.placement import Placement
    from slmops.security.audit import AuditLog
    from slmops.security.keys import KeyStore

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

# Import names of the libraries only the full install (slmops) has: the engine's first, then what serving, evaluating
# and reading models use. The control-plane install (slmops-control, packaging/control) leaves them all out.
ENGINE_MODULES = ("llama_cpp", "gguf", "numpy")
FULL_ONLY_MODULES = ENGINE_MODULES + ("jinja2", "jsonschema", "psutil", "pypdf")
CONTROL_PLANE_ONLY = "this is the control-plane install (slmops-control); install slmops for local models"


def engine_missing(err: BaseException) -> bool:
    """Whether ``err`` is a command reaching for a library of the full install in the control-plane install."""
    return isinstance(err, ModuleNotFoundError) and (err.name or "").partition(".")[0] in FULL_ONLY_MODULES


def require_engine() -> None:
    """Stop a model command in the control-plane install before it does anything (a pull would download first
    and fail after); a lookup only, nothing is imported."""
    if any(importlib.util.find_spec(name) is None for name in ENGINE_MODULES):
        raise SlmopsError(CONTROL_PLANE_ONLY)


@dataclass
class _Flags:
    """What the command line says about configuration before a command reads its settings."""

    config: Path | None = None  # --config FILE


_flags = _Flags()


@lru_cache(maxsize=1)
def settings() -> Settings:
    """``SLMOPS_*`` from the environment over the deployment config named by --config (or ``SLMOPS_CONFIG``), read
    once per command."""
    return wiring.read_settings(config=_flags.config)


def use_config(path: "Path | None") -> None:
    """``--config FILE``: the same as ``SLMOPS_CONFIG=FILE`` for this command. Nothing goes into the environment:
    runner processes get their settings in their engine config."""
    if path is not None:
        _flags.config = path
        settings.cache_clear()


def store() -> Store:
    require_engine()  # the store holds models: only an install that can run them has a use for one
    return wiring.open_store(settings())


def key_store() -> "KeyStore":
    return wiring.key_store(settings())


def audit_log() -> "AuditLog | None":
    """The audit log as configured, or None with SLMOPS_AUDIT=false."""
    return wiring.audit_log(settings())


def audit(action: str, **fields: object) -> None:
    """Record a management action taken from the command line (pull, create, rm, cp, key changes)."""
    log = audit_log()
    if log is not None:
        log.append(key="cli", role="local", client=f"local:{getpass.getuser()}", method="CLI", route=action,
                   **fields)


@contextmanager
def audited(action: str, model: str | None = None, **fields: object) -> Iterator[None]:
    """Audit an action whether it succeeds (status 0) or fails (status 1 and the error)."""
    try:
        yield
    except BaseException as err:
        audit(action, model=model, status=1, error=str(err) or type(err).__name__, **fields)
        raise
    audit(action, model=model, status=0, **fields)


def print_table(rows: Sequence[Sequence[object]], gap: int = 4) -> None:
    """Columns padded to their widest cell, header first, as ``ollama list`` prints them; cells are printed as
    they are (a model name with brackets is not console markup)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        console.print((" " * gap).join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), markup=False,
                      soft_wrap=True)


def human_size(n: int) -> str:
    """Decimal units, as ``ollama list`` prints them."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.0f} {unit}" if n / div >= 10 else f"{n / div:.1f} {unit}"
    return f"{n} B"


def human_ago(when: datetime) -> str:
    secs = (datetime.now(timezone.utc) - when).total_seconds()
    for unit, div in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if secs >= div:
            n = int(secs // div)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "Less than a minute ago" if secs >= 1 else "Less than a second ago"


class PullBar:
    """Ollama-like pull output: status lines, and a byte bar for phases with a size."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task = None
        self._last_status = ""

    def __call__(self, status: str, completed: int, total: int | None) -> None:
        if total:
            if self._progress is None:
                self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                          TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
                                          transient=False, disable=not sys.stderr.isatty())
                self._progress.start()
                self._task = self._progress.add_task(status, total=total)
            self._progress.update(self._task, completed=completed, description=status)
            return
        self._stop()
        if status != self._last_status:
            err_console.print(status)
            self._last_status = status

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self._stop()


def placement() -> "Placement":
    """Placement for this machine and the served model (``SLMOPS_MODEL``), if it is in the store."""
    return wiring.placement(settings(), store())


def engine_config(placed: "Placement | None" = None) -> "EngineConfig":
    """Engine settings for the server's runners and the CLI's in-process engine alike (see
    :func:`slmops.wiring.engine_config`)."""
    return wiring.engine_config(settings(), placed or placement())


def local_engine() -> "Engine":
    """An engine in this process (llama.cpp loads now), for commands that run a model themselves."""
    require_engine()
    from slmops.engine.engine import Engine
    return Engine(engine_config())
