"""Real server processes for tests: started with their output in a log file, ready once an HTTP URL answers, and
stopped for sure (terminate, wait, kill).

A process that exits before it answers, or never answers within a generous deadline, is stopped and fails the test
with the tail of its log, not with a bare connection error. Subclass :class:`ServerProcess` to pick the command,
the port and the environment; call :meth:`~ServerProcess.wait_ready` when the server should be up (separately from
starting, so that several can start at once)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx


def answered(response: httpx.Response) -> bool:
    """Any HTTP answer at all: the server is up, whatever it thinks of the request."""
    return True


def ok(response: httpx.Response) -> bool:
    return response.status_code == 200


class ServerProcess:
    """``cmd`` running in the background, its stdout and stderr in ``log``; ``url`` is where it serves."""

    def __init__(self, cmd: Sequence[str], log: Path, url: str, env: Mapping[str, str] | None = None):
        self.url = url
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, path: str = "/health", ready: Callable[[httpx.Response], bool] = ok,
                   verify: Any = True, within: float = 60.0) -> None:
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
                raise RuntimeError(f"`{command}` did not start at {self.url}: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, within: float = 15.0) -> None:
        """Terminate, wait up to ``within`` seconds, then kill. Stopping twice is harmless."""
        if self._log.closed:
            return
        self.proc.terminate()
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
