"""`slmops fleet releases …` and `slmops fleet channels …`: publish releases (one model per hardware variant, in a
registry) and move channels forward. Registered onto :data:`slmops.cli.fleet.app`.

    slmops fleet releases create smol:1.2.0 --variant cpu=registry.example/ml/smol:1.2.0-cpu \\
        --variant cuda=registry.example/ml/smol:1.2.0-cuda --golden golden.jsonl
    slmops fleet channels set stable smol:1.2.0
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from slmops.cli.common import console
from slmops.cli.fleet import app, client
from slmops.cli.fleet_output import JSON_OPT, listing, print_json, when
from slmops.types.errors import InvalidInput

releases_app = typer.Typer(no_args_is_help=True, help="Releases: NAME:VERSION, one model per hardware variant in "
                                                      "a registry; a release never changes.")
channels_app = typer.Typer(no_args_is_help=True, help="Channels (stable, canary …): each points at a release and "
                                                      "only moves forward.")
app.add_typer(releases_app, name="releases")
app.add_typer(channels_app, name="channels")


def _split(release: str) -> tuple[str, str]:
    name, sep, version = release.partition(":")
    if not sep or not name or not version:
        raise InvalidInput(f"{release!r} is not NAME:VERSION (smol:1.2.0)")
    return name, version


def _variants(items: list[str]) -> list[dict[str, Any]]:
    """``HARDWARE=REFERENCE`` arguments."""
    out = []
    for item in items:
        hardware, sep, reference = item.partition("=")
        if not sep or not hardware or not reference:
            raise InvalidInput(f"--variant {item!r}: write it as HARDWARE=HOST/NAMESPACE/MODEL:TAG (cpu=…, "
                               "cuda-x86_64=…, *=…)")
        out.append({"hardware": hardware, "reference": reference})
    return out


def read_golden(path: Path) -> list[dict[str, Any]]:
    """Golden prompts, one JSON object a line ({"prompt": …, "expect": …}); checked here to name the line."""
    from slmops.api.fleet import Golden

    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInput(f"{path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(Golden.model_validate(json.loads(line)).model_dump(exclude_none=True))
        except ValueError as err:  # JSON and validation errors alike
            problem = err.errors()[0] if isinstance(err, ValidationError) else {"msg": str(err), "loc": ()}
            where = ".".join(str(p) for p in problem.get("loc", ()))
            raise InvalidInput(f"{path.name} line {n}: {where + ': ' if where else ''}{problem['msg']}") from None
    return out


@releases_app.command("create")
def releases_create(release: str = typer.Argument(..., help="NAME:VERSION"),
                    variant: list[str] = typer.Option(..., "--variant", help="HARDWARE=HOST/NAMESPACE/MODEL:TAG"
                                                      "[@sha256:…]; repeatable (cpu, cuda, cpu-aarch64, *)."),
                    golden: Optional[Path] = typer.Option(None, "--golden", help="Golden prompts: JSON lines of "
                                                          "{prompt, expect | expect_regex, max_tokens}."),
                    notes: str = typer.Option("", "--notes", help="Release notes."),
                    as_json: bool = JSON_OPT) -> None:
    """Publish a release; each variant is pinned by digest (and its signature checked) before anything is stored.

    The control plane resolves every variant in its registry; with trusted keys, each must be signed by one."""
    name, version = _split(release)
    with client() as c:
        made = c.create_release(name, version, _variants(variant), read_golden(golden) if golden else [], notes)
    if as_json:
        return print_json(made)
    console.print(f"release {made.release} created", markup=False)
    _print_variants(made)


def _print_variants(info: Any) -> None:
    """One line per variant, never cut: a reference pinned by digest is longer than a terminal is wide."""
    width = max(len(v.hardware) for v in info.variants) + 2
    for v in info.variants:
        console.print(f"  {v.hardware:<{width}}{v.reference}  {'signed' if v.signed else 'unsigned'}", markup=False,
                      soft_wrap=True)


@releases_app.command("list")
def releases_list(name: Optional[str] = typer.Option(None, "--name", help="Only releases of this model name."),
                  as_json: bool = JSON_OPT) -> None:
    """Releases, oldest first."""
    with client() as c:
        found = c.releases(name)
    listing(found, as_json, ("RELEASE", "VARIANTS", "GOLDEN", "CREATED", "BY"),
            lambda r: (r.release, ",".join(v.hardware for v in r.variants), len(r.golden), when(r.created_at),
                       r.created_by))


@releases_app.command("show")
def releases_show(release: str = typer.Argument(..., help="NAME:VERSION"), as_json: bool = JSON_OPT) -> None:
    """A release: its variants (references pinned by digest), golden prompts and notes."""
    name, version = _split(release)
    with client() as c:
        r = c.release(name, version)
    if as_json:
        return print_json(r)
    console.print(f"release {r.release}, created {when(r.created_at)} UTC by {r.created_by}", markup=False)
    _print_variants(r)
    for g in r.golden:
        expect = f"expect {g.expect!r}" if g.expect is not None else f"expect_regex {g.expect_regex!r}"
        console.print(f"  golden: {g.prompt!r} -> {expect}", markup=False, soft_wrap=True)
    if r.notes:
        console.print(r.notes, markup=False, soft_wrap=True)


@channels_app.command("set")
def channels_set(channel: str = typer.Argument(..., help="The channel: stable, canary …"),
                 release: str = typer.Argument(..., help="NAME:VERSION, newer than where the channel is.")) -> None:
    """Point a channel at a release. Channels only move forward: to go back, publish a new version."""
    with client() as c:
        info = c.set_channel(channel, release)
    console.print(f"channel {info.name} -> {info.release}", markup=False)


@channels_app.command("list")
def channels_list(as_json: bool = JSON_OPT) -> None:
    """Channels and the release each points at."""
    with client() as c:
        found = c.channels()
    listing(found, as_json, ("CHANNEL", "RELEASE", "UPDATED"), lambda ch: (ch.name, ch.release, when(ch.updated_at)))
