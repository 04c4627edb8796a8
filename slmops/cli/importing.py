"""``slmops import --from-ollama [DIR]``: adopt the models of an existing Ollama store, names and digests kept."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from slmops.cli.common import audit, console, err_console, human_size, store
from slmops.store.importing import ALREADY, IMPORTED, KEPT, SKIPPED, ImportResult, import_ollama
from slmops.types.errors import InvalidInput, SlmopsError


def ollama_models_dir() -> Path:
    """Where Ollama keeps its models: ``OLLAMA_MODELS`` (Ollama's own variable, read here at the edge), else
    ``~/.ollama/models``."""
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


def import_cmd(
    directory: Optional[Path] = typer.Argument(None, metavar="DIR",
                                               help="Ollama's models folder (default: OLLAMA_MODELS, else "
                                                    "~/.ollama/models)."),
    from_ollama: bool = typer.Option(False, "--from-ollama", help="Import from an Ollama model store."),
    force: bool = typer.Option(False, "--force", help="Replace a model slmops already has under the same name "
                                                      "when it differs from Ollama's."),
) -> None:
    """Import every model of another store: hard links where possible, each digest verified, names kept."""
    if not from_ollama:
        raise InvalidInput("say where to import from: `slmops import --from-ollama [DIR]`")
    source = directory.expanduser() if directory is not None else ollama_models_dir()
    s = store()
    try:
        results = import_ollama(s, source, force, report=lambda r: _report(r, source))
    except SlmopsError as err:
        audit("import", model=None, status=1, error=str(err), source=str(source))
        raise
    counts = {outcome: sum(r.outcome == outcome for r in results) for outcome in (IMPORTED, ALREADY, KEPT, SKIPPED)}
    if not results:
        console.print(f"no models found in {source}", markup=False, soft_wrap=True)
    else:
        console.print(", ".join(f"{n} {outcome}" for outcome, n in counts.items() if n or outcome == IMPORTED))
    if counts[IMPORTED] and s.trust is not None:
        err_console.print("note: SLMOPS_TRUSTED_KEYS is set and imported models carry no slmops signature: they "
                          "will not load until signed (`slmops sign NAME --key KEY` with a trusted key)",
                          markup=False, soft_wrap=True)
    if any(r.failed for r in results):
        raise typer.Exit(1)


def _report(r: ImportResult, source: Path) -> None:
    """A line per model as it is done, and an audit record, as every management action from the CLI has."""
    if r.outcome == IMPORTED:
        console.print(f"imported {r.what} ({human_size(r.size)}, {r.how or 'blobs already in the store'})",
                      markup=False, soft_wrap=True)
    elif r.outcome == ALREADY:
        console.print(f"{r.what} is already there", markup=False, soft_wrap=True)
    else:
        err_console.print(f"warning: {r.outcome} {r.what}: {r.reason}", markup=False, soft_wrap=True)
    audit("import", model=r.what, status=1 if r.failed else 0, outcome=r.outcome, source=str(source),
          **({"error": r.reason} if r.failed else {}))


__all__ = ["import_cmd", "ollama_models_dir"]
