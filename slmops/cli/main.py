"""The ``slmops`` command. Each noun lives in its own module; this one wires them and maps errors to exit codes.

Every user-facing error is one line on stderr and a non-zero exit; tracebacks only with SLMOPS_DEBUG=1.

A command imports only its own module: ``slmops serve`` does not load what the model, fleet or release commands
need (help, and a name that is no command, register them all). ``slmops serve`` starts its first runner process
before anything else (:func:`slmops.engine.spawn.boot`), so the runner imports llama.cpp while the server imports
and reads its settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer

# Every command, in the order help lists them: (name, module under slmops.cli, its command function or Typer group)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("pull", "models", "pull"), ("push", "models", "push"), ("list", "models", "list_models"),
    ("ls", "models", "list_models"), ("show", "models", "show"), ("rm", "models", "rm"), ("cp", "models", "cp"),
    ("create", "models", "create"), ("prune", "models", "prune"), ("import", "importing", "import_cmd"),
    ("run", "run", "run"), ("serve", "serve", "serve"), ("ps", "serve", "ps"), ("keys", "security", "keys"),
    ("audit", "security", "audit_app"), ("store", "security", "store_app"), ("sign", "security", "sign_cmd"),
    ("verify", "security", "verify_cmd_model"), ("quantize", "ops", "quantize_cmd"), ("eval", "ops", "eval_cmd"),
    ("bench", "ops", "bench_cmd"), ("optimize", "ops", "optimize_cmd"), ("release", "release", "release_cmd"),
    ("shrink", "shrink", "shrink_cmd"), ("distill", "shrink", "distill_cmd"), ("tune", "tune", "tune_cmd"),
    ("hw", "hw", "hw_cmd"), ("fleet", "fleet", "app"), ("agent", "agent", "app"), ("feedback", "feedback", "app"),
)
HIDDEN = {"ls"}


def build_app(command: str | None = None) -> typer.Typer:
    """The command tree. With ``command`` (what this invocation runs), only its module is imported; without one,
    or with a name that is no command, every module is."""
    import typer

    from slmops.cli.common import console, settings, use_config
    from slmops.config.settings import SETTINGS

    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Run small language models locally; Ollama- and OpenAI-compatible.")
    only = command if any(command == name for name, _, _ in COMMANDS) else None
    for name, module, attr in COMMANDS:
        if only is not None and name != only:
            continue
        target = getattr(importlib.import_module(f"slmops.cli.{module}"), attr)
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=name)
        else:
            app.command(name, hidden=name in HIDDEN)(target)

    @app.command("version")
    def version() -> None:
        """Print the version."""
        import slmops
        console.print(f"slmops version {slmops.__version__}")

    @app.command("env")
    def env(config_file: Path = typer.Option(None, "--config", help="Deployment config to apply (or SLMOPS_CONFIG).")
            ) -> None:
        """Print every SLMOPS_* setting: effective value, where it came from, and what it does."""
        use_config(config_file)
        cfg = settings()
        for s in SETTINGS:
            value = cfg[s.name]
            shown = f"{value[0]}:{value[1]}" if s.name in ("SLMOPS_HOST", "SLMOPS_FLEET_HOST") else \
                ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            if s.secret:
                shown = "(set, hidden)" if value not in (None, "") else "None"
            console.print(f"{s.name}={shown}  ({cfg.origins[s.name]})  # {s.help}", markup=False, soft_wrap=True)

    return app


def __getattr__(name: str) -> object:
    if name == "app":  # the whole command tree, for what inspects it (tests, documentation)
        return build_app()
    raise AttributeError(name)


def boot_runner(argv: list[str]) -> None:
    """``slmops serve``: start the first runner process now, before the server imports its own modules; it takes
    its engine config once the server has read its settings. Not for help, nor in the control-plane install (no
    llama.cpp: the command refuses with one line, and a runner would fail to start)."""
    if argv[1:2] != ["serve"] or "--help" in argv or importlib.util.find_spec("llama_cpp") is None:
        return
    from slmops.engine.spawn import boot
    boot()


def main() -> None:
    debug = os.environ.get("SLMOPS_DEBUG", "").lower() in ("1", "true", "yes", "on")
    boot_runner(sys.argv)
    import typer
    import typer.exceptions

    from slmops.cli.common import CONTROL_PLANE_ONLY, engine_missing, err_console
    from slmops.types.errors import SlmopsError

    try:
        app = build_app(sys.argv[1] if len(sys.argv) > 1 else None)
        code = app(standalone_mode=False)  # without standalone mode, click returns an Exit's code
        if isinstance(code, int) and code:
            sys.exit(code)
    except SlmopsError as err:
        err_console.print(f"Error: {err}", markup=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except (typer.Abort, typer.Exit) as exc:
        sys.exit(getattr(exc, "exit_code", 1))
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        # typer bundles its own click: its usage errors derive from TyperException, not from click's classes
        if isinstance(err, typer.exceptions.TyperException) and hasattr(err, "show"):
            err.show()
            sys.exit(err.exit_code)
        if engine_missing(err):  # a model command in the control-plane install
            err_console.print(f"Error: {CONTROL_PLANE_ONLY}", markup=False, soft_wrap=True)
            sys.exit(1)
        if debug:
            raise
        err_console.print(f"Error: {type(err).__name__}: {err} (set SLMOPS_DEBUG=1 for a traceback)", markup=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
