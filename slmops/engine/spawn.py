"""Starting a runner's interpreter, apart from :mod:`slmops.engine.process`.

``slmops serve`` starts its first runner before anything else (:func:`boot`), and on a cold start the runner's
side — its imports, the model's load, the KV cache's allocation — is the longer of the two paths to the first
token. This module imports only the standard library, so the spawn waits for nothing: importing ``process``
first (msgspec and the engine's message types) put it ~50 ms later.
"""

from __future__ import annotations

import socket
import subprocess
import sys

SPARE = "(spare)"  # a runner started before any model needs one (ProcessEngine.prestart, boot)
# A runner imports its backend (whose native libraries load before anything imports numpy: see
# slmops.engine.llamacpp.preload), then waits for its engine config, the first frame on its socket.
BOOT = ("import sys; from slmops.engine.backend import preload; preload(); "
        "from slmops.engine.worker import main; main(sys.argv)")
booted: list[tuple[subprocess.Popen, socket.socket]] = []  # started by boot(), not yet a RunnerProcess


def spawn(name: str) -> tuple[subprocess.Popen, socket.socket]:
    ours, theirs = socket.socketpair()
    with theirs:
        proc = subprocess.Popen([sys.executable, "-c", BOOT, str(theirs.fileno()), name],  # the name, for `ps`
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
    return proc, ours


def boot() -> None:
    """Start a runner's interpreter now, before anything knows its model or engine config: it imports its
    backend while this process imports and reads its settings, and the next runner started takes it over
    (``slmops serve`` calls this first thing; nothing else needs to). Unclaimed, it exits with this process."""
    booted.append(spawn(SPARE))


def discard_booted() -> None:
    """Stop the runners :func:`boot` started that nothing took (models run in this process)."""
    while booted:
        proc, sock = booted.pop()
        sock.close()
        proc.kill()  # it has loaded nothing yet
        proc.wait()


def claim_or_spawn(name: str) -> tuple[subprocess.Popen, socket.socket]:
    """A booted runner still alive, else a new one."""
    while booted:
        proc, sock = booted.pop()
        if proc.poll() is None:
            return proc, sock
        sock.close()
    return spawn(name)
