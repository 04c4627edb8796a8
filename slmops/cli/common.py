"""What every CLI command shares: settings read once at start-up, the store, output helpers, the pull bar."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from functools import lru_cache

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from slmops.config.settings import Settings
from slmops.store.store import Store

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings.from_env()


def store() -> Store:
    return Store(settings().models_dir)


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
