"""`slmops agent …`: the device's side of the fleet. ``enrol`` makes the device's key (here, never sent) and joins a
control plane with a one-time token; ``desired`` shows what the control plane wants this device to run.

The device's identity lives in ``SLMOPS_HOME/fleet/``: ``device.key`` (Ed25519, mode 0600) and ``device.json``
(device id, control plane URL, hardware class), both written atomically, so a device enrolled once stays
enrolled across restarts and a second ``enrol`` says so instead of making another identity.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any, Optional

import typer

import slmops
from slmops.cli.common import console, settings
from slmops.store.atomic import atomic_writer
from slmops.types.errors import ConfigError, InvalidInput

app = typer.Typer(no_args_is_help=True, help="The device side of a fleet: enrol with a control plane, see the "
                                             "desired state.")


def identity_dir() -> Path:
    return settings().home / "fleet"


def control_url(given: str | None) -> str:
    """``--control`` as given (``http://`` added to a bare host:port), else SLMOPS_FLEET_HOST as the operators'
    commands reach it."""
    from slmops.cli.fleet import base_url

    if given:
        return given.rstrip("/") if "://" in given else f"http://{given}"
    return base_url()


def load_identity() -> dict[str, Any]:
    path = identity_dir() / "device.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("this device is not enrolled; run `slmops agent enrol --token TOKEN` with a token from "
                          "`slmops fleet tokens create`") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is unreadable ({err}); remove it and enrol again") from None


def _tags(pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f'tag "{pair}": write KEY=VALUE')
        tags[key] = value
    return tags


@app.command("enrol")
def enrol(token: str = typer.Option(..., "--token", help="One-time enrolment token from an operator."),
          control: Optional[str] = typer.Option(None, "--control", help="Control plane URL (or SLMOPS_FLEET_HOST)."),
          name: Optional[str] = typer.Option(None, "--name", help="Device name (default: the host name)."),
          tag: list[str] = typer.Option([], "--tag", help="KEY=VALUE, repeatable: tags groups select on.")) -> None:
    """Make this device's key and enrol it; the private key never leaves SLMOPS_HOME/fleet/device.key."""
    from slmops.client.device import DeviceClient
    from slmops.fleet.deviceauth import DeviceKey
    from slmops.ops.hw import detect

    folder = identity_dir()
    if (folder / "device.json").exists():
        ident = load_identity()
        raise InvalidInput(f"this device is already enrolled as {ident['device_id']} with {ident['control']}; "
                           f"remove {folder} to enrol it again as a new device")
    key_path = folder / "device.key"
    key = DeviceKey.load(key_path) if key_path.exists() else DeviceKey.generate()
    if not key_path.exists():
        key.save(key_path)
    url = control_url(control)

    async def go() -> Any:
        async with DeviceClient(url, key) as cp:
            return await cp.enrol(token, name=name or socket.gethostname(), hardware=detect().to_json(),
                                  agent_version=slmops.__version__, tags=_tags(tag))

    enrolled = asyncio.run(go())
    ident = {"device_id": enrolled.device_id, "control": url, "hardware_class": enrolled.hardware_class}
    with atomic_writer(folder / "device.json") as f:
        f.write(json.dumps(ident, indent=2).encode())
    console.print(f"enrolled as {enrolled.device_id} (hardware class {enrolled.hardware_class}) with {url}",
                  markup=False, soft_wrap=True)


@app.command("desired")
def desired(json_: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Ask the control plane what this device should run now (one signed poll)."""
    from slmops.client.device import DeviceClient
    from slmops.fleet.deviceauth import DeviceKey

    ident = load_identity()
    key = DeviceKey.load(identity_dir() / "device.key")

    async def go() -> Any:
        async with DeviceClient(ident["control"], key, ident["device_id"], sessions=False) as cp:  # one request
            state, _ = await cp.desired(None)
            return state

    state = asyncio.run(go())
    if json_:
        print(state.model_dump_json(indent=2))
        return
    target = state.release
    console.print(f"device {state.device_id}, desired version {state.version}", markup=False, soft_wrap=True)
    console.print(f"release  {target.release} ({target.variant}: {target.reference})" if target else
                  "release  none (no channel in its blueprint, or no variant for its hardware class)", markup=False, soft_wrap=True)
    console.print("config   " + json.dumps(state.config, sort_keys=True), markup=False, soft_wrap=True)
