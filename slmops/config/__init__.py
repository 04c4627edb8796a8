"""Settings read at the edges; see :mod:`slmops.config.settings`."""

from slmops.config.settings import SETTINGS, Settings, parse_duration

__all__ = ["SETTINGS", "Settings", "parse_duration"]
