"""`slmops fleet feedback export`: the rated feedback devices uploaded (their blueprints opted in), as JSONL on
stdout, streamed as the control plane reads it. Needs the operator role; the control plane records each export in
its ledger. Registered onto :data:`slmops.cli.fleet.app`.

    slmops fleet feedback export --release smol:1.2.0 --since 7d > feedback.jsonl
"""

from __future__ import annotations

import sys
from typing import Optional

import httpx
import typer

from slmops.cli.feedback import parse_since
from slmops.client import errors

app = typer.Typer(no_args_is_help=True, help="Rated feedback devices uploaded (blueprint privacy.feedback: true).")


@app.command("export")
def export(release: Optional[str] = typer.Option(None, "--release", help="Only this release (NAME:VERSION)."),
           since: Optional[str] = typer.Option(None, "--since", help="Only ratings since: 24h, 7d, 2026-12-01."))\
        -> None:
    """Write the uploaded ratings as JSONL on stdout: {"messages", "rating", "release", "at", ...} a line."""
    from slmops.cli.fleet import client

    params = {k: v for k, v in {"release": release, "since": parse_since(since) if since else None}.items()
              if v is not None}
    out = sys.stdout.buffer
    with client() as c:
        try:
            # FleetClient answers with parsed models; an export is streamed, so it goes through its connection
            with c._http.stream("GET", "/fleet/v1/feedback", params=params) as r:
                if r.status_code >= 400:
                    r.read()
                    errors.checked(r, c.base_url)
                for chunk in r.iter_bytes():
                    out.write(chunk)
        except httpx.HTTPError as err:
            raise errors.transport_error(err, c.base_url, "start it with `slmops fleet serve` or set "
                                         "SLMOPS_FLEET_HOST", "check that it runs and that SLMOPS_FLEET_HOST names "
                                         "it") from None
    out.flush()
