"""``slmops feedback …``: rate an answer, and export the ratings this device kept as JSONL for fine-tuning.

``add`` goes through the running server's ``POST /api/feedback``, so the server alone decides whether the device
opted in (its setting, or the fleet's blueprint) and which release a served name runs. ``export`` and ``clear`` read
and change ``SLMOPS_HOME/feedback`` directly: they need no server, and whoever can read that folder can read the
records anyway.

    slmops feedback add smollm2:135m --rating -1 --prompt "2+2?" --response "5" --comment "wrong sum"
    slmops feedback export --release smol:1.2.0 --since 7d > feedback.jsonl
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import httpx
import typer

from slmops.cli.common import console, settings
from slmops.types.errors import InvalidInput, SlmopsError

app = typer.Typer(no_args_is_help=True, help="Rated feedback kept on this device (with privacy.feedback: true): "
                                             "add, export as JSONL, clear.")

RATINGS = {"1": 1, "+1": 1, "up": 1, "good": 1, "-1": -1, "down": -1, "bad": -1}
_DAYS = re.compile(r"^(\d+(?:\.\d+)?)d$")


def parse_rating(text: str) -> int:
    rating = RATINGS.get(text.strip().lower())
    if rating is None:
        raise InvalidInput(f"--rating {text!r}: use 1 (or good, up) for a good answer, -1 (or bad, down) for a bad one")
    return rating


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: a time ago (``90m``, ``24h``, ``7d``) or a UTC date or time (``2026-12-01``,
    ``2026-12-01T08:00:00Z``); seconds since the epoch."""
    from slmops.config.settings import parse_duration

    now = time.time() if now is None else now
    text = text.strip()
    days = _DAYS.match(text)
    try:
        ago = float(days.group(1)) * 86400 if days else parse_duration(text)
        if ago >= 0:
            return now - ago
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"--since {text!r}: use a time ago such as 24h or 7d, or a date such as 2026-12-01") \
            from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


@app.command("add")
def add(model: str = typer.Argument(..., help="The model (served name) that gave the answer."),
        rating: str = typer.Option(..., "--rating", help="1 (good, up) or -1 (bad, down)."),
        prompt: str = typer.Option(..., "--prompt", help="What was asked."),
        response: str = typer.Option(..., "--response", help="The answer being rated."),
        comment: Optional[str] = typer.Option(None, "--comment", help="Why, in your words."),
        tags: list[str] = typer.Option([], "--tag", help="A label such as wrong-fact (repeatable).")) -> None:
    """Rate one answer; the running server keeps it under the model's release, if this device opted in."""
    from slmops.cli.serve import base_url

    body: dict[str, Any] = {"model": model, "prompt": prompt, "response": response, "rating": parse_rating(rating),
                            "tags": tags}
    if comment is not None:
        body["comment"] = comment
    url = base_url()
    key = settings()["SLMOPS_API_KEY"]
    try:
        r = httpx.post(f"{url}/api/feedback", json=body, timeout=30, verify=False,
                       headers={"Authorization": f"Bearer {key}"} if key else {})
    except httpx.HTTPError:
        raise SlmopsError(f"could not connect to a running slmops server at {url}; start one with `slmops "
                          "serve`") from None
    if r.status_code >= 400:
        from slmops.client.errors import BY_STATUS, message_of
        raise BY_STATUS.get(r.status_code, SlmopsError)(message_of(r))
    answer = r.json()
    console.print(f"kept {answer['id']} under {answer['release']}", markup=False)


@app.command("export")
def export(release: Optional[str] = typer.Option(None, "--release", help="Only this release (or model name)."),
           since: Optional[str] = typer.Option(None, "--since", help="Only ratings since: 24h, 7d, 2026-12-01."))\
        -> None:
    """Write the kept ratings as JSONL on stdout: {"messages", "rating", "release", "at", ...} a line."""
    from slmops.store.feedback import FeedbackLog, export_line

    after = parse_since(since) if since else None
    out = sys.stdout.buffer
    for record in FeedbackLog(settings().home / "feedback").records(release, after):
        out.write(export_line(record))
    out.flush()


@app.command("dataset")
def dataset(exports: list[Path] = typer.Argument(..., help="Feedback exports (JSONL) to build from."),
            out: Path = typer.Option(..., "--out", "-o", help="Folder to write the dataset to."),
            heldout: float = typer.Option(0.2, "--heldout", help="Share of the well-rated answers kept out of "
                                                                  "training, for the gate."),
            release: Optional[str] = typer.Option(None, "--release", help="Only this release's ratings."),
            json_: bool = typer.Option(False, "--json", help="Print the provenance as JSON.")) -> None:
    """Build a fine-tuning dataset: deduplicated, split into train and held-out, with every rating's provenance."""
    from slmops.ops.dataset import build

    ds = build(exports, out, heldout, release)
    if json_:
        print(json.dumps(ds.provenance, indent=2))
        return
    c = ds.provenance["counts"]
    console.print(f"wrote {out}: {c['train']} to train on, {c['heldout']} held out, {c['rejected']} rated -1 kept "
                  f"aside; {c['duplicates']} duplicate(s) and {c['conflicting']} contradicting rating(s) dropped; "
                  f"dataset {ds.digest}", markup=False)


@app.command("clear")
def clear(release: str = typer.Option(..., "--release", help="The release (or model name) whose ratings go."),
          yes: bool = typer.Option(False, "--yes", help="Do not ask first.")) -> None:
    """Delete the ratings kept for a release (export them first)."""
    from slmops.store.feedback import FeedbackLog

    if not yes and not typer.confirm(f"delete every rating kept for {release}?"):
        raise typer.Exit(1)
    removed = FeedbackLog(settings().home / "feedback").clear(release)
    console.print(f"deleted {removed} rating(s) of {release}", markup=False)
