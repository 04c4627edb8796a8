"""Real server processes for tests: started with their output in a log file, ready once an HTTP URL answers, and
stopped for sure (terminate, wait, kill).

A process that exits before it answers, or never answers within a generous deadline, is stopped and fails the test
with the tail of its log, not with a bare connection error. Subclass :class:`ServerProcess` to pick the command,
the port and the environment; call :meth:`~ServerProcess.wait_ready` when the server should be up (separately from
starting, so that several can start at once)."""

from __future__ import annotations

import signal

import httpx

from slmops.fleet.sim.services import Process, ok  # noqa: F401 - ok: the default readiness test, for callers


def answered(response: httpx.Response) -> bool:
    """Any HTTP answer at all: the server is up, whatever it thinks of the request."""
    return True


class ServerProcess(Process):
    """``cmd`` running in the background, its stdout and stderr in ``log``; ``url`` is where it serves
    (:class:`slmops.fleet.sim.services.Process`, stopped sooner: tests start many)."""

    def log_tail(self, chars: int = 3000) -> str:
        return self.tail(chars)

    def stop(self, sig: int = signal.SIGTERM, within: float = 15.0) -> None:
        super().stop(sig, within)
