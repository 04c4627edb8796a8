"""Ollama's ``keep_alive``: how long a model stays loaded after its last use.

A use renews its model's timer when it ends: a duration from then, a negative one for ever, 0 as soon as nothing
else uses the model. :class:`Expiry` keeps the timers and says which ran out; the loaded-model table
(:class:`slmops.server.loaded.LoadedModels`) knows what is in use and unloads. Who may choose a keep-alive is the
caller's rights' business (:class:`slmops.server.admission.Admission`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from slmops.config.settings import parse_duration
from slmops.types.errors import InvalidInput


def keep_alive_seconds(value: Any, default: float) -> float:
    """Ollama's ``keep_alive``: a duration string or seconds; 0 unloads; negative keeps the model forever."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise InvalidInput("keep_alive must be a duration such as 5m or a number of seconds")
    try:
        seconds = float(value) if isinstance(value, (int, float)) else parse_duration(value)
    except ValueError as err:
        raise InvalidInput(str(err)) from None
    if not math.isfinite(seconds):  # JSON's 1e999 and NaN: say -1 to keep a model loaded for ever
        raise InvalidInput("keep_alive must be a finite duration; use -1 to keep the model loaded")
    return seconds


class Expiry:
    """When each model's keep-alive runs out, by ``clock`` (seconds); a model without a timer never expires."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._at: dict[str, float] = {}

    def renew(self, name: str, keep_alive: float) -> None:
        """``name`` was just used with ``keep_alive`` seconds (negative: for ever)."""
        self._at[name] = math.inf if keep_alive < 0 else self.clock() + keep_alive

    def forget(self, name: str) -> None:
        self._at.pop(name, None)

    def at(self, name: str) -> float:
        """When ``name`` expires; ``math.inf``: never."""
        return self._at.get(name, math.inf)

    def due(self) -> list[str]:
        """The models whose keep-alive has run out by now."""
        now = self.clock()
        return [name for name, when in self._at.items() if when <= now]


__all__ = ["Expiry", "keep_alive_seconds"]
