"""How `slmops fleet …` commands print: tables never cut off a terminal (scripts read them), ``--json`` as the API
returns it, times in UTC, tags as ``k=v``."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from slmops.cli.common import console, human_ago

T = TypeVar("T")

JSON_OPT = typer.Option(False, "--json", help="Print JSON instead of a table.")


def when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def ago(ts: float) -> str:
    return human_ago(datetime.fromtimestamp(ts, timezone.utc))


def tag_text(tags: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "-"


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> None:
    """Columns as the rest of the CLI prints them; off a terminal, as wide as the rows (never cut)."""
    out = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    head = list(header)
    for name in head:
        out.add_column(name, no_wrap=True)
    rows = [[("-" if c is None else str(c)) for c in row] for row in rows]
    for row in rows:
        out.add_row(*(Text(c) for c in row))
    if console.is_terminal:
        console.print(out)
        return
    wide = Console(width=sum(max(len(x) for x in col) for col in zip(head, *rows)) + 2 * len(head),
                   file=io.StringIO(), highlight=False, color_system=None)
    wide.print(out)
    for line in wide.file.getvalue().splitlines():  # type: ignore[attr-defined]
        print(line.rstrip())


def print_json(value: Any) -> None:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if hasattr(v, "model_dump") else v for v in value]
    print(json.dumps(value, indent=2, sort_keys=False))


def listing(found: Sequence[T], as_json: bool, header: Iterable[str], row: Callable[[T], Iterable[Any]]) -> None:
    """What a ``list`` command found: JSON with ``--json``, else a table of one ``row`` each."""
    if as_json:
        print_json(found)
    else:
        table(header, [row(x) for x in found])
