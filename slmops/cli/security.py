"""``slmops keys`` and ``slmops audit``: API keys for the server, and checking the audit log's chain."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer

from slmops.cli.common import audit_log, audited, console, key_store, print_table, store
from slmops.security.audit import verify
from slmops.security.roles import ROLES
from slmops.types.errors import ConfigError, InvalidInput, ModelNotFound, NotFound
from slmops.types.name import ModelName

keys = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log.", no_args_is_help=True)
store_app = typer.Typer(help="Encryption at rest of the model store (SLMOPS_STORE_KEY).", no_args_is_help=True)


@keys.command("create")
def create(name: str = typer.Option(..., "--name", help="A label for the key (who or what uses it)."),
           role: str = typer.Option("user", "--role", help=f"One of: {', '.join(ROLES)}."),
           rpm: Optional[int] = typer.Option(None, "--rpm", help="Requests per minute for this key (default: "
                                                                 "SLMOPS_RATE_LIMIT)."),
           tpm: Optional[int] = typer.Option(None, "--tpm", help="Tokens per minute for this key (default: "
                                                                 "SLMOPS_TOKEN_LIMIT).")) -> None:
    """Create a key and print it. It is shown this once; only a salted hash is kept."""
    with audited("keys create", name=name, role_granted=role):
        secret = key_store().create(name, role, _limit("--rpm", rpm, "SLMOPS_RATE_LIMIT"),
                                    _limit("--tpm", tpm, "SLMOPS_TOKEN_LIMIT"))
    if sys.stdout.isatty():
        console.print(f"Created key [bold]{name}[/bold] with role {role}. Copy it now; it is not shown again:")
    print(secret)


def _limit(option: str, value: int | None, default: str) -> int:
    """A limit given on the command line; 0 is what a key stores for "the server's default", so an explicit 0
    (or less) would silently mean no limit of its own: refused."""
    if value is None:
        return 0
    if value <= 0:
        raise InvalidInput(f"{option} must be a positive number per minute, got {value}; leave it out to use the "
                           f"server's default ({default})")
    return value


@keys.command("list")
def list_keys() -> None:
    """List keys: name, role, id and limits (never the secret)."""
    rows = [("NAME", "ROLE", "ID", "CREATED", "RPM", "TPM")]
    for k in key_store().keys():
        created = datetime.fromtimestamp(k.created, timezone.utc).strftime("%Y-%m-%d %H:%M")
        rows.append((k.name, k.role, k.id, created, str(k.requests_per_minute or "-"),
                     str(k.tokens_per_minute or "-")))
    print_table(rows)


@keys.command("revoke")
def revoke(name: str = typer.Argument(..., help="Key name or id.")) -> None:
    """Revoke a key; a running server refuses it from its next request."""
    with audited("keys revoke", name=name):
        gone = key_store().revoke(name)
    console.print(f"revoked {gone.name}", markup=False)


@audit_app.command("verify")
def verify_cmd() -> None:
    """Check the hash chain (and HMACs, with SLMOPS_AUDIT_KEY) across rotated files, and that the head names its
    last record (so records cut from the end show); names the first bad line."""
    log = audit_log()
    if log is None:
        raise ConfigError("the audit log is off (SLMOPS_AUDIT=false)")
    verdict = verify(log)
    if verdict.missing:  # not "intact": a log deleted whole, head and all, looks like one never written
        raise NotFound(verdict.problem)
    if not verdict.ok:
        console.print(f"audit log TAMPERED: {verdict.problem}", markup=False)
        raise typer.Exit(1)
    signed = " and HMACs" if log.key else ""
    console.print(f"audit log intact: {verdict.records} records in {verdict.files} file(s), hash chain{signed} "
                  "verified", markup=False)


def sign_cmd(model: str = typer.Argument(..., help="Model to sign."),
             key: Path = typer.Option(..., "--key", help="EC private key (PEM, P-256 or P-384)."),
             password: Optional[str] = typer.Option(None, "--password", envvar="SLMOPS_SIGNING_PASSWORD",
                                                    help="The key's password, if it has one.")) -> None:
    """Sign a model's manifest and every blob (OpenSSF model-signing format); the signature is kept beside it."""
    from slmops.security.signing import sign

    name = ModelName.parse(model)
    s = store()
    if not s.exists(name):
        raise ModelNotFound(name.display)
    with audited("sign", model):
        sign(s, name, key, password)
    console.print(f"signed {name.display}", markup=False)


def verify_cmd_model(model: str = typer.Argument(..., help="Model to check."),
                     keys_: list[Path] = typer.Option(..., "--key", help="Trusted public key (PEM); repeatable.")
                     ) -> None:
    """Check a model's signature against public keys and its blobs against their digests."""
    from slmops.security.signing import verify

    name = ModelName.parse(model)
    s = store()
    s.verify_blobs(name)
    key = verify(s, name, list(keys_))
    console.print(f"{name.display}: signature verified with {key.name}", markup=False)


def _reseal(seal: bool) -> None:
    s = store()
    if s.blobs.key is None:
        raise ConfigError("no store key is set; set SLMOPS_STORE_KEY (64 hex digits, `openssl rand -hex 32`) or "
                          "SLMOPS_STORE_KEY_FILE first")
    action = "store seal" if seal else "store unseal"
    with audited(action):
        changed, total = s.reseal(seal)
    state = "sealed" if seal else "plain"
    console.print(f"{changed} blob(s) rewritten {state}; all {total} blob(s) are now {state}", markup=False)


@store_app.command("seal")
def seal_cmd() -> None:
    """Encrypt every plain blob already in the store with the store key (new blobs are sealed as they arrive)."""
    _reseal(True)


@store_app.command("unseal")
def unseal_cmd() -> None:
    """Decrypt every sealed blob back to a plain file (the store key is needed to read them)."""
    _reseal(False)
