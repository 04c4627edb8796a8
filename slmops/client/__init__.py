"""Typed HTTP clients of slmops' APIs, sharing the wire types of ``slmops.api``; no engine imports, so they
install without llama.cpp."""

from __future__ import annotations

from slmops.client.device import DeviceClient
from slmops.client.fleet import FleetClient

__all__ = ["DeviceClient", "FleetClient"]
