"""`slmops agent …`: the device's side of the fleet. ``enrol`` makes the device's key (here, never sent) and joins a
control plane with a one-time token; ``desired`` shows what the control plane wants this device to run; ``run``
is the agent beside ``slmops serve`` (poll, verify, stage in the idle slot, smoke-test, switch, report: see
``slmops.fleet.agent.loop``); ``status`` reads its state file.

The device's identity lives in ``SLMOPS_HOME/fleet/``: ``device.key`` (Ed25519, mode 0600), ``device.json``
(device id, control plane URL, hardware class) and ``root.json`` (the fleet's root of trust, from enrolment), all
written atomically, so a device enrolled once stays enrolled across restarts and a second ``enrol`` says so
instead of making another identity.
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
    if enrolled.trust_root is not None:  # root.json (and a fresh trust.json) first: device.json says "enrolled"
        from slmops.fleet.agent.trust import TrustStore
        TrustStore(enrolled.trust_root, folder=folder).save()
    ident = {"device_id": enrolled.device_id, "control": url, "hardware_class": enrolled.hardware_class,
             "poll_interval_s": enrolled.poll_interval_s}
    with atomic_writer(folder / "device.json") as f:
        f.write(json.dumps(ident, indent=2).encode())
    console.print(f"enrolled as {enrolled.device_id} (hardware class {enrolled.hardware_class}) with {url}",
                  markup=False, soft_wrap=True)
    if enrolled.trust_root is None:
        console.print("warning: the control plane sent no trust root (root.json), so this device can activate "
                      "nothing it serves; upgrade the control plane and enrol again", markup=False, soft_wrap=True)


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


# -- running beside `slmops serve` ------------------------------------------------------------------------------

def _seconds(text: str, option: str) -> float:
    from slmops.config.settings import parse_duration

    try:
        value = parse_duration(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise InvalidInput(f"{option} {text!r}: give a positive duration such as 30s, 2m or 1h")
    return value


def _local_url(given: str | None) -> tuple[str, bool | str]:
    """``--serve-url``, else the server SLMOPS_HOST names (HTTPS with SLMOPS_TLS_CERT, trusted as its own CA);
    and what to verify its TLS with."""
    from slmops.cli.serve import base_url

    cert = settings()["SLMOPS_TLS_CERT"]
    if given:
        return (given.rstrip("/") if "://" in given else f"http://{given}"), str(cert) if cert else True
    url = base_url()
    return (url.replace("http://", "https://", 1), str(cert)) if cert else (url, True)


@app.command("run")
def run(once: bool = typer.Option(False, "--once", help="One poll and apply, one report, then exit."),
        serve_url: Optional[str] = typer.Option(None, "--serve-url", help="The local `slmops serve` (default: "
                                                "SLMOPS_HOST)."),
        insecure_registries: bool = typer.Option(False, "--insecure-registries",
                                                 help="Pull release variants over plain HTTP."),
        poll: Optional[str] = typer.Option(None, "--poll", help="Poll interval (jittered, longer while the "
                                           "control plane is away; default: what it said at enrolment, else 30s)."),
        window: str = typer.Option("60s", "--window", help="Report window."),
        health_window: str = typer.Option("2m", "--health-window", help="How long the previous release stays "
                                          "loaded after a switch, to switch back to on failures."),
        smoke_threshold: float = typer.Option(1.0, "--smoke-threshold", min=0.0, max=1.0,
                                              help="Share of a release's golden prompts that must pass.")) -> None:
    """Run beside `slmops serve` (same SLMOPS_HOME): apply the desired state through A/B slots, report aggregates."""
    import logging

    from slmops.cli.common import store
    from slmops.client.device import DeviceClient
    from slmops.client.local import LocalClient
    from slmops.fleet.agent.loop import Agent, AgentOptions
    from slmops.fleet.agent.staging import Stager
    from slmops.fleet.agent.trust import TrustStore
    from slmops.fleet.deviceauth import DeviceKey
    from slmops.store.registry_auth import RegistryConfig
    from slmops.store.store import Store

    ident, cfg = load_identity(), settings()
    every = _seconds(poll, "--poll") if poll else float(ident.get("poll_interval_s") or AgentOptions.poll_interval_s)
    options = AgentOptions(poll_interval_s=every, window_s=_seconds(window, "--window"),
                           health_window_s=_seconds(health_window, "--health-window"), smoke_threshold=smoke_threshold)
    served = store()  # as the server opens it: sealed blobs, private registries; signatures are the stager's
    pulls = Store(served.root, allow_internal_registries=served.allow_internal_registries, key=served.blobs.key)
    stager = Stager(pulls, RegistryConfig.from_settings(cfg, insecure=insecure_registries),
                    cfg["SLMOPS_TRUSTED_KEYS"] or ())
    trust = TrustStore.load(identity_dir())
    key = DeviceKey.load(identity_dir() / "device.key")
    url, verify = _local_url(serve_url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll would drown what the agent decides

    async def go() -> None:
        async with DeviceClient(ident["control"], key, ident["device_id"]) as cp, \
                LocalClient(url, cfg["SLMOPS_API_KEY"], verify=verify) as local:
            await Agent(cp, local, stager, trust, cfg.home, options).run(once=once)

    try:
        asyncio.run(go())
    except KeyboardInterrupt:  # state is saved after every change: nothing to finish
        pass


@app.command("status")
def status(json_: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """What the agent serves and has applied, from its state file (no network)."""
    import time

    from slmops.fleet.agent.state import AgentState, state_file

    st = AgentState.load(state_file(settings().home))
    if json_:
        doc = st.to_json()
        doc["queue"] = len(st.queue)
        print(json.dumps(doc, indent=2))
        return

    def line(text: str) -> None:
        console.print(text, markup=False, soft_wrap=True)

    active = st.slot(st.active)
    line(f"served   {st.served or '-'} -> " + (f"slot {st.active}: {active.model} ({active.release})" if active
                                                  else "nothing yet"))
    idle = st.slot(st.idle) if st.active else None
    line(f"idle     slot {st.idle}: " + (f"{idle.model} ({idle.release})" if idle else "empty"))
    if st.pending is not None:
        line(f"health   window of {st.pending.release} open for {time.time() - st.pending.since:.0f} s; "
             f"switches back to slot {st.pending.previous or '-'} on failures")
    line(f"health   {st.health}; desired version {st.applied_version} applied")
    for key, when in sorted(st.failed.items(), key=lambda kv: kv[1]):
        line(f"failed   {key.split('@')[0]} ({time.time() - when:.0f} s ago)")
    line(f"reports  {len(st.queue)} window(s) queued" + (f", {st.dropped} dropped" if st.dropped else ""))
    if st.last_error:
        line(f"last     {st.last_error}")
