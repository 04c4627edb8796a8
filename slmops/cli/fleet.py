"""`slmops fleet …`: the control plane (serve, keys) and its operators' commands. (being written)"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Operate a fleet: the control plane and its devices, releases, "
                                             "channels, blueprints and ledger.")
