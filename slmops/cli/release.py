"""``slmops release``: the CI/CD pipeline of a Modelfile, from create to a rollout, as one command a job runs.

    slmops release assistant:1.4.0 -f Modelfile --registry registry.example.com/models \\
        --variant cpu=q8_0 --allow-requantize --golden golden.jsonl --key release.pem --to edge --json

Each step is printed with its result as it ends; the first that fails stops the run with a one-line reason and
exit 1. With ``--json`` the steps go to stderr and the summary to stdout, written before the verdict so a failed
run still leaves it. The control plane is ``--fleet`` (default ``SLMOPS_FLEET_HOST``) with the operator key in
``SLMOPS_FLEET_KEY``; registry logins come from ``SLMOPS_REGISTRY_USERNAME``/``SLMOPS_REGISTRY_PASSWORD`` or
``registries.json``, as for ``slmops push``. The steps themselves live in :mod:`slmops.ops.release`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from slmops.cli.common import audited, console, err_console, local_engine, settings, store
from slmops.types.errors import InvalidInput, SlmopsError, Unauthenticated
from slmops.types.name import ModelName

if TYPE_CHECKING:
    from slmops.ops.release import PublishPlan, StepResult


def release_cmd(
    release: str = typer.Argument(..., help="NAME:VERSION of the release (assistant:1.4.0); the version is also "
                                            "the models' tag in the registry."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="The Modelfile to release (default: Modelfile)."),
    model: Optional[str] = typer.Option(None, "--model", help="Release a model already in the store (one `slmops "
                                                              "tune` made) instead of a Modelfile."),
    registry: str = typer.Option(..., "--registry", help="HOST[:PORT]/NAMESPACE the variants are pushed under."),
    variant: Optional[list[str]] = typer.Option(None, "--variant", help="HARDWARE=TYPE: a hardware key (cpu, cuda, "
                                                "cpu-aarch64, *) and its quantization (q8_0, q4_k_m …, or as-is); "
                                                "repeatable; default *=as-is."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize",
                                          help="Allow quantizing an already-quantized FROM model."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Model the gate compares perplexity with "
                                                                    "(default: the model the Modelfile makes)."),
    max_ppl_increase: float = typer.Option(1.0, "--max-ppl-increase", help="Gate: most perplexity increase "
                                                                           "(percent) of a variant over the baseline."),
    golden: Optional[Path] = typer.Option(None, "--golden", help="Golden prompts, JSON lines of {prompt, expect | "
                                          "expect_regex, max_tokens}: gated here on every variant and shipped with "
                                          "the release for the devices' smoke test."),
    heldout: Optional[Path] = typer.Option(None, "--heldout", help="Gate on held-out conversations: a dataset "
                                           "folder (`slmops feedback dataset`) or a JSONL of {messages} lines."),
    max_heldout_increase: float = typer.Option(0.0, "--max-heldout-increase", help="Gate: most perplexity "
                                               "increase (percent) of the held-out answers over the baseline."),
    min_golden_score: float = typer.Option(1.0, "--min-golden-score", min=0.0, max=1.0,
                                           help="Gate: share of the golden prompts each variant must pass."),
    ctx: int = typer.Option(512, "--ctx", help="Gate: tokens per perplexity window."),
    windows: int = typer.Option(0, "--windows", help="Gate: score only this many windows (0: the whole text)."),
    key: Path = typer.Option(..., "--key", help="Signing key: EC private key (PEM, P-256 or P-384)."),
    password: Optional[str] = typer.Option(None, "--password", envvar="SLMOPS_SIGNING_PASSWORD",
                                           help="The signing key's password, if it has one."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow plain HTTP to the registry."),
    fleet_url: Optional[str] = typer.Option(None, "--fleet", help="Control plane URL (default: SLMOPS_FLEET_HOST); "
                                                                  "operator key in SLMOPS_FLEET_KEY."),
    channel: str = typer.Option("canary", "--channel", help="Channel the release is published to."),
    to: Optional[str] = typer.Option(None, "--to", help="Group a rollout of the release starts in."),
    no_rollout: bool = typer.Option(False, "--no-rollout", help="Publish to the channel only; start no rollout."),
    waves: Optional[str] = typer.Option(None, "--waves", help="Rollout waves, cumulative percent (default "
                                                              "1,10,50,100)."),
    bake: str = typer.Option("60s", "--bake", help="How long each rollout wave must pass its gates."),
    notes: str = typer.Option("", "--notes", help="Release notes."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the inputs and the control plane, say what each "
                                                          "step would do, change nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout (steps on stderr)."),
) -> None:
    """Create, quantize, gate, sign, push, publish to a channel and start a rollout, stopping at the first failure.

    Reruns go on from where a run stopped: what was made, gated and signed before is not done again."""
    from slmops.ops.release import GatePlan, ReleasePipeline, ReleasePlan, VariantPlan, Wiring
    from slmops.store.registry_auth import RegistryConfig

    name, _, version = release.partition(":")
    if not version:
        raise InvalidInput(f"{release!r} is not NAME:VERSION (assistant:1.4.0)")
    if file is not None and model is not None:
        raise InvalidInput("release a Modelfile (-f) or a model (--model), not both")
    gate = GatePlan(max_ppl_increase, _golden(golden), min_golden_score, ctx, windows,
                    ModelName.parse(baseline) if baseline else None, _heldout(heldout), max_heldout_increase)
    plan = ReleasePlan(name, version, None if model else file or Path("Modelfile"), registry,
                       tuple(VariantPlan.parse(v) for v in variant or ["*=as-is"]),
                       key, gate, _publish(release, fleet_url, channel, to, no_rollout, waves, bake, notes),
                       allow_requantize, password or None, ModelName.parse(model) if model else None)
    cfg = settings()
    wiring = Wiring(RegistryConfig.from_settings(cfg, insecure=insecure), lambda: _fleet(plan.publish.fleet_url),
                    local_engine, cfg.home / "releases" / f"{name}-{version}.json")
    out = err_console if as_json else console
    with audited("release", release, dry_run=dry_run):
        summary = ReleasePipeline(store(), plan, wiring, lambda r: _print_step(out, r)).run(dry_run)
        if as_json:
            print(json.dumps(summary.to_json(), indent=2))
        if not summary.ok:
            nothing = ", nothing pushed" if _before_push(summary.failed_step) else ""
            raise SlmopsError(f"release {release} stopped at {summary.failed_step}{nothing}: {summary.reason}")


def _before_push(step: str | None) -> bool:
    """A run that stopped before its push has sent nothing anywhere."""
    from slmops.ops.release import STEPS
    return step in STEPS and STEPS.index(step) < STEPS.index("push")


def _golden(path: Path | None) -> tuple:
    """The release's golden prompts, read as ``slmops fleet releases create --golden`` reads them."""
    if path is None:
        return ()
    from slmops.api.fleet import Golden
    from slmops.cli.fleet_releases import read_golden as read
    return tuple(Golden.model_validate(g) for g in read(path))


def _heldout(path: Path | None) -> tuple:
    """Held-out conversations: a dataset folder's (checked against its provenance), or a JSONL file's."""
    if path is None:
        return ()
    from slmops.ops.dataset import conversations, load

    if path.is_dir():
        rows = load(path).heldout
    else:
        try:
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            answered = all(r["messages"][-1]["role"] == "assistant" and isinstance(r["messages"][-1]["content"], str)
                           for r in rows)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError):
            answered = False
        if not answered:
            raise InvalidInput(f"--heldout {path}: give a dataset folder or a JSONL of {{\"messages\": [...]}} "
                               "lines, each ending with the answer")
    if not rows:
        raise InvalidInput(f"--heldout {path} holds no conversations")
    return tuple(tuple(c) for c in conversations(rows))


def _publish(release: str, url: str | None, channel: str, to: str | None, no_rollout: bool, waves: str | None,
             bake: str, notes: str) -> "PublishPlan":
    """Where and how the release is published; the rollout's options are checked as `fleet rollout start`'s."""
    from slmops.cli.fleet import base_url
    from slmops.cli.fleet_rollouts import parse_percents, rollout_request
    from slmops.ops.release import PublishPlan

    if to is None and not no_rollout:
        raise InvalidInput("name the group a rollout starts in with --to GROUP, or pass --no-rollout")
    if to is not None and no_rollout:
        raise InvalidInput("--to and --no-rollout contradict each other; pass one")
    rollout = None if no_rollout else rollout_request({"release": release, "group": to, "bake": bake,
                                                "waves": parse_percents(waves) if waves else None})
    return PublishPlan((url or base_url()).rstrip("/"), channel, rollout, notes)


def _fleet(url: str):  # type: ignore[no-untyped-def]
    from slmops.client.fleet import FleetClient
    key = settings()["SLMOPS_FLEET_KEY"]
    if not key:
        raise Unauthenticated("no operator key for the control plane: set SLMOPS_FLEET_KEY (make one with "
                              "`slmops fleet keys create NAME --role operator` on the control-plane host)")
    return FleetClient(url, key)


def _print_step(out, result: "StepResult") -> None:  # type: ignore[no-untyped-def]
    took = f" ({result.seconds:.1f} s)" if result.seconds >= 0.1 else ""
    out.print(f"{result.step:<9}{result.status:<9}{result.detail}{took}", markup=False, soft_wrap=True)
