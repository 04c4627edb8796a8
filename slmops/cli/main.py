"""The ``slmops`` command. Each noun lives in its own module; this one wires them and maps errors to exit codes.

Every user-facing error is one line on stderr and a non-zero exit; tracebacks only with SLMOPS_DEBUG=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
import typer.exceptions

import slmops
from slmops.cli import agent, feedback, fleet, hw, importing, models, ops, release, run, security, serve, shrink, tune
from slmops.cli.common import CONTROL_PLANE_ONLY, console, engine_missing, err_console, settings, use_config
from slmops.config.settings import SETTINGS
from slmops.types.errors import SlmopsError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run small language models locally; Ollama- and OpenAI-compatible.")
app.command("pull")(models.pull)
app.command("push")(models.push)
app.command("list")(models.list_models)
app.command("ls", hidden=True)(models.list_models)
app.command("show")(models.show)
app.command("rm")(models.rm)
app.command("cp")(models.cp)
app.command("create")(models.create)
app.command("prune")(models.prune)
app.command("import")(importing.import_cmd)
app.command("run")(run.run)
app.command("serve")(serve.serve)
app.command("ps")(serve.ps)
app.add_typer(security.keys, name="keys")
app.add_typer(security.audit_app, name="audit")
app.add_typer(security.store_app, name="store")
app.command("sign")(security.sign_cmd)
app.command("verify")(security.verify_cmd_model)
app.command("quantize")(ops.quantize_cmd)
app.command("eval")(ops.eval_cmd)
app.command("bench")(ops.bench_cmd)
app.command("optimize")(ops.optimize_cmd)
app.command("release")(release.release_cmd)
app.command("shrink")(shrink.shrink_cmd)
app.command("distill")(shrink.distill_cmd)
app.command("tune")(tune.tune_cmd)
app.command("hw")(hw.hw_cmd)
app.add_typer(fleet.app, name="fleet")
app.add_typer(agent.app, name="agent")
app.add_typer(feedback.app, name="feedback")


@app.command("version")
def version() -> None:
    """Print the version."""
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


def main() -> None:
    debug = os.environ.get("SLMOPS_DEBUG", "").lower() in ("1", "true", "yes", "on")
    try:
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
