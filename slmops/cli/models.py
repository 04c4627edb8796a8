"""Model management commands: pull, push, list, show, rm, cp, create."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn, \
    TransferSpeedColumn

from slmops.cli.common import (PullBar, audited, console, err_console, human_ago, human_size, print_table, settings,
                               store)
from slmops.modelfile import parse, render
from slmops.store import manifests as mt
from slmops.store.pushing import push_to_registry
from slmops.store.registry_auth import RegistryConfig
from slmops.types.errors import SlmopsError
from slmops.types.name import ModelName, Reference


def pull(model: str = typer.Argument(..., help="Model name: a catalog name (smollm2:135m) or "
                                            "[http(s)://]host[:port]/namespace/model[:tag|@sha256:...]"),
         variant: str = typer.Option(None, "--variant",
                                     help="Pin a catalog variant (e.g. cpu-q8_0) instead of the one chosen for "
                                          "this machine."),
         insecure: bool = typer.Option(False, "--insecure",
                                       help="Allow plain HTTP to the registry (as ollama pull --insecure).")) -> None:
    """Fetch a model from a registry, or from its source in the built-in catalog, into the local store."""
    bars = LayerBars()
    s = store()
    ref = Reference.parse(model)
    registry = RegistryConfig.from_settings(settings(), insecure=insecure)
    try:
        with audited("pull", model, variant=variant):
            s.pull(ref, bars, variant=variant, registry=registry)
    finally:
        bars.close()
    chosen = s.variant(ref.name)
    if chosen:
        err_console.print(f"variant {chosen[0]}: {chosen[1]}", markup=False, soft_wrap=True)


def push(model: str = typer.Argument(..., help="Model name with its registry: host[:port]/namespace/model[:tag] "
                                            "(slmops cp a model to such a name first)"),
         insecure: bool = typer.Option(False, "--insecure",
                                       help="Allow plain HTTP to the registry (as ollama push --insecure).")) -> None:
    """Upload a model (and its signature, if it has one) to a registry; blobs the registry has are skipped."""
    bars = LayerBars()
    s = store()
    ref = Reference.parse(model)
    registry = RegistryConfig.from_settings(settings(), insecure=insecure)
    try:
        with audited("push", model):
            push_to_registry(s, ref, bars, registry)
    finally:
        bars.close()


class LayerBars:
    """``ollama pull``'s output: a line per phase, and a bar per layer while layers download (each status with
    a size is one layer). Off a terminal, each layer's line is printed once instead of a bar."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID | None] = {}
        self._last = ""

    def __call__(self, status: str, completed: int, total: int | None) -> None:
        if not total:
            self._stop()
            if status != self._last:
                err_console.print(status, markup=False)
                self._last = status
            return
        self._last = status
        if not self._tty:
            if status not in self._tasks:
                err_console.print(status, markup=False)
                self._tasks[status] = None
            return
        if self._progress is None:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), console=err_console)
            self._progress.start()
        task = self._tasks.get(status)
        if task is None:
            task = self._tasks[status] = self._progress.add_task(status, total=total)
        self._progress.update(task, completed=completed, total=total)

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._tasks.clear()

    def close(self) -> None:
        self._stop()


def list_models() -> None:
    """List the models in the store."""
    rows = [(r.name.display, r.digest.hex[:12], human_size(r.size), human_ago(r.modified_at)) for r in store().list()]
    print_table([("NAME", "ID", "SIZE", "MODIFIED"), *rows])


def show(
    model: str = typer.Argument(...),
    modelfile: bool = typer.Option(False, "--modelfile", help="Show the Modelfile of the model."),
    parameters: bool = typer.Option(False, "--parameters", help="Show its parameters."),
    template: bool = typer.Option(False, "--template", help="Show its chat template."),
    system: bool = typer.Option(False, "--system", help="Show its system message."),
    license: bool = typer.Option(False, "--license", help="Show its license."),
    files: bool = typer.Option(False, "--files", help="List its knowledge files (FILE), with size and chunks."),
) -> None:
    """Show information about a model."""
    from slmops.modelfile import build

    s = store()
    name = ModelName.parse(model)
    mf = build.to_modelfile(s, name)
    if modelfile:
        header = (f'# Modelfile generated by "slmops show"\n# To build a new Modelfile based on this, keep FROM '
                  f"{name.display} or point FROM at a .gguf file\n")
        console.print(render(mf, header), end="", markup=False, soft_wrap=True)
    elif parameters:
        for line in parameter_lines(mf.parameters):
            console.print(line, markup=False)
    elif template:
        console.print(mf.template or "", markup=False, soft_wrap=True)
    elif system:
        console.print(mf.system or "", markup=False, soft_wrap=True)
    elif license:
        console.print("\n".join(mf.licenses), markup=False, soft_wrap=True)
    elif files:
        _show_files(s, name)
    else:
        _show_info(s, name, mf)


def parameter_lines(params: dict, indent: str = "") -> list[str]:
    """One line per value (repeatable ``stop`` included), strings quoted, as ``ollama show`` prints them."""
    return [f"{indent}{key:<30}{json.dumps(v) if isinstance(v, str) else v}"
            for key, value in params.items() for v in (value if isinstance(value, list) else [value])]


def _show_info(s, name: ModelName, mf) -> None:
    info = s.inspect(name)
    meta = info.metadata
    arch = info.architecture
    rows = [("architecture", arch), ("parameters", info.parameter_size),
            ("context length", str(info.context_length or "")),
            ("embedding length", str(meta.get(f"{arch}.embedding_length", ""))), ("quantization", info.file_type),
            ("format", s.config(name).get("model_format", "gguf"))]
    chosen = s.variant(name)
    if chosen:
        rows.append(("variant", chosen[0]))
    console.print("  Model")
    for k, v in rows:
        console.print(f"    {k:<20}{v}", markup=False)
    if chosen:
        console.print(f"    {'':<20}({chosen[1]})", markup=False, soft_wrap=True)
    if mf.parameters:
        console.print("\n  Parameters")
        for line in parameter_lines(mf.parameters, "    "):
            console.print(line, markup=False)
    if mf.system:
        console.print("\n  System")
        for line in mf.system.splitlines()[:2]:
            console.print(f"    {line}", markup=False)
    made = _made_from(s.config(name))
    if made:
        console.print("\n  Made from")
        for k, v in made:
            console.print(f"    {k:<20}{v}", markup=False, soft_wrap=True)
    for lic in mf.licenses[:1]:
        console.print("\n  License")
        for line in [l for l in lic.splitlines() if l.strip()][:2]:
            console.print(f"    {line.strip()}", markup=False)
    console.print()


def _made_from(config: dict) -> list[tuple[str, str]]:
    """What a model made here (pruned, distilled, tuned) says it came from, as its config records it."""
    rows = []
    if "pruned_from" in config:
        rows.append(("pruned from", f"{config['pruned_from']} (blocks {', '.join(map(str, config['pruned_blocks']))} "
                                    "dropped)"))
    if "distilled_from" in config:
        rows.append(("distilled", f"{config['student']} toward {config['distilled_from']}"))
    if "tuned_from" in config:
        d, t = config["dataset"], config["tune"]
        rows += [("tuned from", f"{config['tuned_from']['model']} ({config['tuned_from']['digest'][:19]})"),
                 ("feedback", f"{d['counts']['train']} answers trained on, {d['counts']['heldout']} held out, from "
                              + ", ".join(sorted(d["releases"]))),
                 ("dataset", d["digest"]),
                 ("training", f"LoRA rank {t['rank']}, {t['steps']} steps, loss {t['loss_first']:.3f} -> "
                              f"{t['loss_last']:.3f}")]
    return rows


def _show_files(s, name: ModelName) -> None:
    from slmops.store import knowledge

    manifest = s.manifest(name)
    listed = knowledge.list_files(s, manifest, f'"{name.display}"')
    index = knowledge.read_index(s, manifest, f'"{name.display}"')
    if index is None:
        err_console.print(f'"{name.display}" has no knowledge files', markup=False)
        return
    print_table([("NAME", "SIZE", "CHUNKS", "DIGEST"),
                 *[(f.name, human_size(f.size), str(f.chunks), f.digest.removeprefix("sha256:")[:12]) for f in listed]])
    e = index.embedding
    console.print(f"embedded with {e.model} ({e.dimension} dimensions, {e.digest.removeprefix('sha256:')[:12]})",
                  markup=False, soft_wrap=True)


def rm(models: list[str] = typer.Argument(..., help="One or more model names.")) -> None:
    """Remove models; blobs no other model uses are deleted."""
    from slmops.server.slots import SlotTable
    s, slots = store(), SlotTable.load(settings().home / "slots.json")  # as `slmops serve` resolves names
    for m in models:
        with audited("rm", m):
            slots.check_removable(ModelName.parse(m))
            s.remove(ModelName.parse(m))
        console.print(f"deleted '{m}'", markup=False)


def cp(source: str, destination: str) -> None:
    """Copy a model under a new name (no data is duplicated)."""
    with audited("cp", f"{source} -> {destination}"):
        store().copy(ModelName.parse(source), ModelName.parse(destination))
    console.print(f"copied '{source}' to '{destination}'", markup=False)


def create(
    model: str = typer.Argument(..., help="Name of the new model."),
    file: Path = typer.Option(Path("Modelfile"), "--file", "-f", help="Path to the Modelfile."),
    quantize: str = typer.Option(None, "--quantize", "-q", help="Quantize the FROM model to this type (q8_0, q4_k_m ...)."),
    allow_requantize: bool = typer.Option(False, "--allow-requantize",
                                          help="With --quantize, allow an already-quantized FROM model."),
) -> None:
    """Create a model from a Modelfile."""
    from slmops.modelfile import build

    name = ModelName.parse(model)
    try:
        text = file.read_text()
    except OSError:
        raise SlmopsError(f"cannot read Modelfile {file}; pass its path with -f") from None
    mf = parse(text)
    bar = PullBar()
    s = store()
    embedder = _Embedder(s)
    try:
        with audited("create", model):
            build.create(s, name, mf, file.resolve().parent, bar, quantize=_quantizer(s, name, quantize, allow_requantize),
                         embed=embedder)
    finally:
        bar.close()
        embedder.close()


class _Embedder:
    """Knowledge embeddings for ``create``, on an engine in this process, started only when a FILE needs one."""

    def __init__(self, s) -> None:  # type: ignore[no-untyped-def]
        self._store = s
        self._engine = None
        self._specs: dict = {}

    def __call__(self, model: str, texts: list[str]) -> list[list[float]]:
        from slmops.cli.common import local_engine
        from slmops.engine.client import spec_from_store
        if self._engine is None:
            self._engine = local_engine()
        if model not in self._specs:
            self._specs[model] = spec_from_store(self._store, ModelName.parse(model))
        vectors, _, _ = self._engine.embed(self._specs[model], texts)
        return vectors

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()


def _quantizer(s, name: ModelName, qtype: str | None, allow: bool):  # type: ignore[no-untyped-def]
    if qtype is None:
        return None
    from slmops.cli.ops import warn
    from slmops.ops.quantize import quantize_layer
    return lambda layer, info: quantize_layer(s, layer, info, qtype, allow, name.display, warn=warn)


def prune() -> None:
    """Delete blobs no model references and files left by interrupted pulls."""
    removed = store().prune()
    console.print(f"removed {len(removed)} unused blob(s)")


__all__ = ["cp", "create", "list_models", "prune", "pull", "push", "rm", "show", "mt"]
