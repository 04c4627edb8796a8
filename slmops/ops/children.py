"""Steps that need PyTorch and transformers run as ``python -m <module> ...`` in a child process.

The caller (the CLI, a server thread) then never imports torch, never inherits what those libraries patch or
print, and a step that runs out of memory takes down only its child. Children run offline (no hub is reachable,
and none is needed: every input is a local file). A child reports progress as JSON lines on stdout, which reach
``on_line`` as they come; its last stderr line is the error when it fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmops.types.errors import SourceError

OnLine = Callable[[dict[str, Any]], None]


def require(modules: tuple[str, ...], what: str, extras: str) -> None:
    """Fail before any work when an extra is missing, naming what to install."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SourceError(f"{what} needs {', '.join(missing)}; install them with: pip install 'slmops[{extras}]'")


def run(module: str, args: list[str], cwd: Path, what: str, on_line: OnLine | None = None,
        python: str = sys.executable) -> dict[str, Any] | None:
    """Run ``python -m module *args`` in ``cwd``; return the last JSON line it printed (its result), if any."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([python, "-m", module, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last: dict[str, Any] | None = None
    assert proc.stdout is not None and proc.stderr is not None
    errors: deque[str] = deque(maxlen=20)  # drained as it comes: a chatty child must not fill the pipe and stall
    drain = threading.Thread(target=errors.extend, args=(proc.stderr,), daemon=True)
    drain.start()
    for line in proc.stdout:
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a library's own print
        if isinstance(item, dict):
            last = item
            if on_line is not None:
                on_line(item)
    code = proc.wait()
    drain.join()
    if code != 0:
        tail = next((e.strip() for e in reversed(errors) if e.strip()), f"exit status {code}")
        raise SourceError(f"{what} failed: {tail[:300]}")
    return last


def report(**item: Any) -> None:
    """The child's side of ``on_line``: one JSON object per line, flushed at once."""
    print(json.dumps(item), flush=True)
