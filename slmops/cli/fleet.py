"""`slmops fleet …`: run the control plane, and operate a fleet through it.

``serve`` and ``keys`` act on the control plane's database (they run on its host: the first admin key has no API
to come from); every other command talks to a running control plane through :class:`slmops.client.FleetClient`
at ``SLMOPS_FLEET_HOST`` with the key in ``SLMOPS_FLEET_KEY`` (or ``--key``). Release and channel commands live
in ``cli/fleet_releases.py`` and register onto ``app``; they get their client from :func:`client` too. Both print
through ``cli/fleet_output.py``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Optional, TypeVar

import typer

from slmops.cli.common import console, err_console, settings
from slmops.cli.fleet_output import JSON_OPT, ago, listing, print_json, tag_text, table, when
from slmops.cli.serving import check_port, run_app
from slmops.types.errors import InvalidInput, Unauthenticated

if TYPE_CHECKING:
    from slmops.client.fleet import FleetClient
    from slmops.fleet.control.db import Database

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, help="Operate a fleet: the control plane and its devices, releases, "
                                             "channels, blueprints and ledger.")
keys_app = typer.Typer(no_args_is_help=True, help="Operator API keys (on the control-plane host): create (shown "
                                                  "once), list, revoke.")
tokens_app = typer.Typer(no_args_is_help=True, help="One-time enrolment tokens for new devices.")
devices_app = typer.Typer(help="Enrolled devices: list (the default), show, tag, revoke.")
groups_app = typer.Typer(no_args_is_help=True, help="Groups: devices selected by their tags.")
blueprints_app = typer.Typer(no_args_is_help=True, help="Blueprint layers: baseline, group:<name>, device:<id>.")
ledger_app = typer.Typer(help="The hash-chained record of every change: list (the default), verify.")
app.add_typer(keys_app, name="keys")
app.add_typer(tokens_app, name="tokens")
app.add_typer(devices_app, name="devices")
app.add_typer(groups_app, name="groups")
app.add_typer(blueprints_app, name="blueprints")
app.add_typer(ledger_app, name="ledger")

DB_OPT = typer.Option(None, "--db", help="Database URL (or SLMOPS_FLEET_DB; default SQLite in SLMOPS_HOME).")


_KEY: ContextVar[str | None] = ContextVar("fleet_key", default=None)  # --key of this invocation


@app.callback()
def _options(key: Optional[str] = typer.Option(None, "--key", help="Operator key (or SLMOPS_FLEET_KEY).")) -> None:
    _KEY.set(key)


# -- wiring -------------------------------------------------------------------------------------------------

def base_url() -> str:
    host, port = settings()["SLMOPS_FLEET_HOST"]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def client() -> "FleetClient":
    """The control plane named by SLMOPS_FLEET_HOST, with the key from --key or SLMOPS_FLEET_KEY."""
    from slmops.client.fleet import FleetClient
    key = _KEY.get() or settings()["SLMOPS_FLEET_KEY"]
    if not key:
        raise Unauthenticated("no operator key: set SLMOPS_FLEET_KEY or pass --key; make one with "
                              "`slmops fleet keys create NAME --role operator` on the control-plane host")
    return FleetClient(base_url(), key)


def _db_url(db: str | None) -> str:
    from slmops.fleet.control.db import database_url
    cfg = settings()
    return database_url(db or cfg["SLMOPS_FLEET_DB"], cfg.home)


def _on_db(db: str | None, work: Callable[["Database"], Awaitable[T]]) -> T:
    """Run ``work`` against the control plane's database (brought up to date first)."""
    from slmops.fleet.control.db import Database

    async def run() -> T:
        database = Database(_db_url(db))
        try:
            await database.migrate()
            return await work(database)
        finally:
            await database.close()
    return asyncio.run(run())


def _host_actor() -> str:
    return f"host:{getpass.getuser()}"[:64]


def _pairs(items: Iterable[str], what: str, removable: bool = False) -> dict[str, Any]:
    """``k=v`` arguments; with ``removable``, ``k=`` means remove ``k`` (None)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{what} {item!r}: write it as key=value" + (" (key= removes it)" if removable else ""))
        out[key] = value if value or not removable else None
    return out


# -- serve --------------------------------------------------------------------------------------------------

@app.command("serve")
def serve(host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default: SLMOPS_FLEET_HOST)."),
          port: Optional[int] = typer.Option(None, "--port", help="Port (default: SLMOPS_FLEET_HOST's, 11500)."),
          db: Optional[str] = DB_OPT,
          insecure_registries: bool = typer.Option(False, "--insecure-registries",
                                                   help="Check release variants in registries over plain HTTP.")
          ) -> None:
    """Start the control plane (its database is migrated at start)."""
    from sqlalchemy.engine import make_url

    from slmops.fleet.control.app import ControlPlane, create_app
    from slmops.fleet.control.db import Database
    from slmops.store.registry_auth import RegistryConfig

    cfg = settings()
    bind_host, bind_port = cfg["SLMOPS_FLEET_HOST"]
    bind_host, bind_port = host or bind_host, port or bind_port
    url = _db_url(db)
    check_port(bind_host, bind_port, "pass --port or set SLMOPS_FLEET_HOST")
    plane = ControlPlane(Database(url), trusted_keys=tuple(cfg["SLMOPS_FLEET_TRUSTED_KEYS"]),
                         allow_private_registries=cfg["SLMOPS_ALLOW_PRIVATE_REGISTRIES"],
                         registry_insecure=insecure_registries)
    # registry logins as `slmops pull` has them (registries.json under SLMOPS_HOME, or SLMOPS_REGISTRY_*)
    plane.extras["registry_config"] = RegistryConfig.from_settings(cfg, insecure=insecure_registries)
    plane.rollout_tick_s = cfg["SLMOPS_FLEET_TICK"]
    plane.poll_interval_s = cfg["SLMOPS_FLEET_POLL"]
    plane.root_key = cfg["SLMOPS_FLEET_ROOT_KEY"] or cfg["SLMOPS_HOME"] / "fleet-root.key"
    plane.metadata_ttl_s = cfg["SLMOPS_FLEET_METADATA_TTL"]
    if plane.root_key.exists():  # a bad key file: one line here rather than a failed startup
        from slmops.fleet.control.trust import load_root_key
        load_root_key(plane.root_key)
    shown = f"[{bind_host}]" if ":" in bind_host else bind_host
    err_console.print(f"slmops fleet control plane on http://{shown}:{bind_port} (database "
                      f"{make_url(url).render_as_string(hide_password=True)})", markup=False, soft_wrap=True)
    run_app(create_app(plane), bind_host, bind_port, cfg["SLMOPS_DEBUG"], access_log=False)


# -- keys (on the control-plane host) -----------------------------------------------------------------------

REMOTE_OPT = typer.Option(False, "--remote", help="Go through the control plane's API with an admin key instead "
                                                  "of its database.")


@keys_app.command("create")
def keys_create(name: str = typer.Argument(..., help="A label for the key: who or what uses it."),
                role: str = typer.Option(..., "--role", help="admin, operator or viewer."),
                db: Optional[str] = DB_OPT, remote: bool = REMOTE_OPT) -> None:
    """Create a key and print it: it is shown this once; only a salted hash is kept."""
    if remote:
        with client() as c:
            secret = c.create_key(name, role).key or ""
    else:
        from slmops.fleet.control.operators import create_key
        secret = _on_db(db, lambda d: create_key(d, name, role, _host_actor()))
    if sys.stdout.isatty():
        err_console.print(f"Created fleet key {name} with role {role}. Copy it now; it is not shown again:",
                          markup=False)
    print(secret)


@keys_app.command("list")
def keys_list(db: Optional[str] = DB_OPT, remote: bool = REMOTE_OPT, as_json: bool = JSON_OPT) -> None:
    """List keys (never their secrets)."""
    if remote:
        with client() as c:
            found = c.keys()
    else:
        from slmops.fleet.control.operators import list_keys
        found = _on_db(db, list_keys)
    listing(found, as_json, ("NAME", "ROLE", "ID", "CREATED", "STATE"),
            lambda k: (k.name, k.role, k.id, when(k.created_at), "revoked" if k.revoked else "active"))


@keys_app.command("revoke")
def keys_revoke(name: str = typer.Argument(..., help="Key name or id."), db: Optional[str] = DB_OPT,
                remote: bool = REMOTE_OPT) -> None:
    """Revoke a key; every replica of the control plane refuses it within a second."""
    if remote:
        with client() as c:
            gone = c.revoke_key(name)
    else:
        from slmops.fleet.control.operators import revoke_key
        gone = _on_db(db, lambda d: revoke_key(d, name, _host_actor()))
    console.print(f"revoked {gone.name}", markup=False)


# -- enrolment tokens ---------------------------------------------------------------------------------------

@tokens_app.command("create")
def tokens_create(expires: str = typer.Option("1h", "--expires", help="Lifetime: 10m, 1h, 7d (1m to 30d)."),
                  tag: list[str] = typer.Option([], "--tag", help="key=value given to the device; repeatable.")
                  ) -> None:
    """Make a one-time enrolment token and print it (shown this once)."""
    with client() as c:
        made = c.create_token(expires, _pairs(tag, "tag"))
    err_console.print(f"token {made.id}, valid until {when(made.expires_at)} UTC, for one device:", markup=False)
    print(made.token)


@tokens_app.command("list")
def tokens_list(as_json: bool = JSON_OPT) -> None:
    """List tokens: expiry, tags, whether used (never the secret)."""
    with client() as c:
        found = c.tokens()
    listing(found, as_json, ("ID", "EXPIRES", "TAGS", "USED BY", "CREATED BY"),
            lambda t: (t.id, when(t.expires_at), tag_text(t.tags), t.used_by, t.created_by))


@tokens_app.command("revoke")
def tokens_revoke(token_id: str = typer.Argument(..., help="The token's id (tok_…).")) -> None:
    """Delete a token so that it can no longer enrol a device."""
    with client() as c:
        c.delete_token(token_id)
    console.print(f"revoked {token_id}", markup=False)


# -- devices ------------------------------------------------------------------------------------------------

GROUP_OPT = typer.Option(None, "--group", help="Only devices in this group.")
CLASS_OPT = typer.Option(None, "--class", help="Only this hardware class (cpu-x86_64 …).")
RELEASE_OPT = typer.Option(None, "--release", help="Only devices running NAME or NAME:VERSION.")
HEALTH_OPT = typer.Option(None, "--health", help="ok, degraded, failing or unknown.")
SEEN_OPT = typer.Option(None, "--seen-within", help="Only devices seen within this long (10m, 1h, 7d).")


@devices_app.callback(invoke_without_command=True)
def _devices_default(ctx: typer.Context, group: Optional[str] = GROUP_OPT, hardware_class: Optional[str] = CLASS_OPT,
                     release: Optional[str] = RELEASE_OPT, health: Optional[str] = HEALTH_OPT,
                     seen_within: Optional[str] = SEEN_OPT, as_json: bool = JSON_OPT) -> None:
    if ctx.invoked_subcommand is None:
        devices_list(group, hardware_class, release, health, seen_within, as_json)


@devices_app.command("list")
def devices_list(group: Optional[str] = GROUP_OPT, hardware_class: Optional[str] = CLASS_OPT,
                 release: Optional[str] = RELEASE_OPT, health: Optional[str] = HEALTH_OPT,
                 seen_within: Optional[str] = SEEN_OPT, as_json: bool = JSON_OPT) -> None:
    """List devices, sorted by id."""
    with client() as c:
        found = list(c.all_devices(group=group, hardware_class=hardware_class, release=release, health=health,
                                   seen_within=seen_within))
    listing(found, as_json, ("ID", "NAME", "CLASS", "RELEASE", "HEALTH", "LAST SEEN", "GROUPS", "TAGS"),
            lambda d: (d.id, d.name + (" (revoked)" if d.revoked else ""), d.hardware_class, d.running_release,
                       d.health, ago(d.last_seen), ",".join(d.groups) or "-", tag_text(d.tags)))


@devices_app.command("show")
def devices_show(device_id: str = typer.Argument(...), as_json: bool = JSON_OPT) -> None:
    """One device: identity, class, tags, groups, what it runs."""
    with client() as c:
        d = c.device(device_id)
    if as_json:
        return print_json(d)
    _show_device(d)


def _show_device(d: Any) -> None:
    rows = [("id", d.id), ("name", d.name), ("hardware class", d.hardware_class), ("agent", d.agent_version or "-"),
            ("tags", tag_text(d.tags)), ("groups", ", ".join(d.groups) or "-"), ("enrolled", when(d.enrolled_at)),
            ("last seen", f"{when(d.last_seen)} ({ago(d.last_seen)})"), ("running", d.running_release or "-"),
            ("health", d.health), ("desired version", str(d.desired_version)),
            ("revoked", "yes" if d.revoked else "no")]
    for k, v in rows:
        console.print(f"  {k:<18}{v}", markup=False, soft_wrap=True)


@devices_app.command("tag")
def devices_tag(device_id: str = typer.Argument(...),
                tags: list[str] = typer.Argument(..., help="key=value to set, key= to remove.")) -> None:
    """Set or remove tags (the `class` tag overrides the hardware class)."""
    with client() as c:
        d = c.tag_device(device_id, _pairs(tags, "tag", removable=True))
    console.print(f"{d.id}: tags {tag_text(d.tags)}; groups {', '.join(d.groups) or '-'}", markup=False)


@devices_app.command("revoke")
def devices_revoke(device_id: str = typer.Argument(...)) -> None:
    """Revoke a device (admin): its requests are refused from now on."""
    with client() as c:
        d = c.revoke_device(device_id)
    console.print(f"revoked {d.id} ({d.name})", markup=False)


# -- groups -------------------------------------------------------------------------------------------------

@groups_app.command("put")
def groups_put(name: str = typer.Argument(...),
               select: list[str] = typer.Option([], "--select", help="key=value a device's tags must have; "
                                                                   "repeatable (all must match).")) -> None:
    """Create or change a group."""
    with client() as c:
        g = c.put_group(name, _pairs(select, "--select"))
    console.print(f"group {g.name}: {tag_text(g.selector) if g.selector else 'every device'} ({g.devices} devices)",
                  markup=False)


@groups_app.command("list")
def groups_list(as_json: bool = JSON_OPT) -> None:
    """List groups with their selectors and device counts."""
    with client() as c:
        found = c.groups()
    listing(found, as_json, ("NAME", "SELECTOR", "DEVICES"), lambda g: (g.name, tag_text(g.selector), g.devices))


@groups_app.command("show")
def groups_show(name: str = typer.Argument(...), as_json: bool = JSON_OPT) -> None:
    """A group and its devices."""
    with client() as c:
        g = c.group(name)
        members = list(c.all_devices(group=name))
    if as_json:
        return print_json({**g.model_dump(mode="json"), "members": [d.id for d in members]})
    console.print(f"group {g.name}: {tag_text(g.selector) if g.selector else 'every device'}", markup=False)
    table(("ID", "NAME", "CLASS", "RELEASE", "HEALTH"),
           [(d.id, d.name, d.hardware_class, d.running_release, d.health) for d in members])


@groups_app.command("rm")
def groups_rm(name: str = typer.Argument(...)) -> None:
    """Delete a group (refused while it has a blueprint layer)."""
    with client() as c:
        c.delete_group(name)
    console.print(f"deleted group {name}", markup=False)


# -- blueprints ---------------------------------------------------------------------------------------------

@blueprints_app.command("put")
def blueprints_put(layer: str = typer.Argument(..., help="baseline, group:<name> or device:<id>."),
                   file: Path = typer.Argument(..., help="The layer: YAML or JSON, a partial deployment config "
                                                         "plus `channel`."),
                   priority: int = typer.Option(0, "--priority", help="Among group layers, higher wins.")) -> None:
    """Create or replace a layer; checked as a deployment config before anything is stored."""
    with client() as c:
        b = c.put_blueprint(layer, _read_layer(file), priority)
    console.print(f"blueprint {b.layer} stored (priority {b.priority})", markup=False)


def _read_layer(file: Path) -> dict[str, Any]:
    from slmops.config.deploy import _parse  # the deployment config's strict parsing: keys twice are an error
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInput(f"{file}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    data = _parse(file.name, text, json_only=file.suffix.lower() == ".json")
    if data is None:
        data = {}
    if isinstance(data, dict) and set(data) == {"deployment"}:
        data = data["deployment"]
    if not isinstance(data, dict):
        raise InvalidInput(f"{file.name}: the top level must be a mapping (model, hardware, optimization, api, "
                           "performance, channel)")
    return data


@blueprints_app.command("list")
def blueprints_list(as_json: bool = JSON_OPT) -> None:
    """List layers, lowest precedence first."""
    with client() as c:
        found = c.blueprints()
    listing(found, as_json, ("LAYER", "PRIORITY", "KEYS", "UPDATED", "BY"),
            lambda b: (b.layer, b.priority, ", ".join(sorted(_leaves(b.config))), when(b.updated_at), b.updated_by))


@blueprints_app.command("show")
def blueprints_show(layer: str = typer.Argument(...), as_json: bool = JSON_OPT) -> None:
    """Print a layer's config (YAML, or JSON with --json)."""
    import yaml
    with client() as c:
        b = c.blueprint(layer)
    if as_json:
        return print_json(b)
    print(yaml.safe_dump(b.config, sort_keys=False, default_flow_style=False).rstrip() if b.config else "{}")


@blueprints_app.command("rm")
def blueprints_rm(layer: str = typer.Argument(...)) -> None:
    """Delete a layer."""
    with client() as c:
        c.delete_blueprint(layer)
    console.print(f"deleted blueprint {layer}", markup=False)


def _leaves(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf (a non-mapping value) of ``config``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# -- effective config ---------------------------------------------------------------------------------------

@app.command("config")
def config_cmd(device_id: str = typer.Argument(...), as_json: bool = JSON_OPT) -> None:
    """A device's effective configuration: each value with the layer it came from."""
    with client() as c:
        eff = c.device_config(device_id)
    if as_json:
        return print_json(eff)
    rows = []
    for key, value in sorted(_leaves(eff.config).items()):
        rows.append((key, json.dumps(value) if not isinstance(value, str) else value, _source(eff.sources, key)))
    if not rows:
        console.print(f"{device_id}: no blueprint layer applies (defaults everywhere)", markup=False)
        return
    table(("KEY", "VALUE", "LAYER"), rows)


def _source(sources: dict[str, str], key: str) -> str:
    """The layer of ``key``, or of its nearest parent the sources name."""
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return "-"


# -- ledger -------------------------------------------------------------------------------------------------

AFTER_OPT = typer.Option(0, "--after", help="Only entries after this seq.")
LIMIT_OPT = typer.Option(100, "--limit", help="At most this many entries (1-1000).")
SUBJECT_OPT = typer.Option(None, "--subject", help="Only entries about this subject (device:<id>, group:<name>…).")


@ledger_app.callback(invoke_without_command=True)
def _ledger_default(ctx: typer.Context, after: int = AFTER_OPT, limit: int = LIMIT_OPT,
                    subject: Optional[str] = SUBJECT_OPT, as_json: bool = JSON_OPT) -> None:
    if ctx.invoked_subcommand is None:
        ledger_list(after, limit, subject, as_json)


@ledger_app.command("list")
def ledger_list(after: int = AFTER_OPT, limit: int = LIMIT_OPT, subject: Optional[str] = SUBJECT_OPT,
                as_json: bool = JSON_OPT) -> None:
    """Entries oldest first: who did what to which subject."""
    with client() as c:
        found = c.ledger(after, limit, subject)
    listing(found, as_json, ("SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT"),
            lambda x: (x.seq, when(x.at), x.actor, x.action, x.subject))


@ledger_app.command("verify")
def ledger_verify() -> None:
    """Check the hash chain; exit 1 and name the first bad entry when it does not hold."""
    with client() as c:
        verdict = c.verify_ledger()
    if not verdict.ok:
        err_console.print(f"ledger broken after {verdict.entries} good entries: {verdict.problem}", markup=False,
                          soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"ledger intact: {verdict.entries} entries", markup=False)


# `slmops fleet releases …` and `slmops fleet channels …` register onto `app` there.
from slmops.cli import fleet_releases  # noqa: E402,F401
from slmops.cli import fleet_rollouts  # noqa: E402
from slmops.cli import fleet_feedback  # noqa: E402
from slmops.cli import fleet_sim  # noqa: E402,F401  (registers `slmops fleet simulate` onto app)

app.add_typer(fleet_rollouts.rollout_app, name="rollout")
app.add_typer(fleet_feedback.app, name="feedback")
