"""The model store: ``<root>/manifests`` + ``<root>/blobs``, Ollama's layout.

``Store(root)`` is always constructed with its root; nothing here reads configuration or knows the engine.
Writers order their steps so a kill at any instant is harmless: blobs first (each complete once it has its name),
the manifest last (one atomic rename). Unreferenced blobs are removed under an exclusive lock that every writer
holds shared, so garbage collection never races a pull or create that is about to reference a blob.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from slmops.store import folders, manifests as mt
from slmops.store.atomic import atomic_writer, remove_abandoned_temps
from slmops.store.blobs import BlobStore
from slmops.store.catalog import Catalog, CatalogEntry
from slmops.store.gguf import GGUFInfo, inspect_gguf
from slmops.store.manifests import Layer, Manifest, ManifestStore
from slmops.store.network import check_registry_host
from slmops.store.sealed import KEY_HELP, scratch
from slmops.store.variants import Derivation, VariantPolicy
from slmops.store.sources import Source, default_sources
from slmops.types.digest import Digest
from slmops.types.errors import ConfigError, InvalidInput, ModelNotFound, SlmopsError, SourceError
from slmops.types.name import DEFAULT_HOST, ModelName, Reference

if TYPE_CHECKING:  # the registry client (httpx, TLS) loads with the first registry pull, not with every store
    from slmops.store.registry_auth import RegistryConfig

ProgressFn = Callable[[str, int, int | None], None]
"""``progress(status, completed_bytes, total_bytes)``; ``total`` is None for phases without a size."""


def _no_progress(status: str, completed: int, total: int | None) -> None:
    pass


@dataclass
class ModelRecord:
    name: ModelName
    digest: Digest
    size: int
    modified_at: datetime
    manifest: Manifest


@dataclass(frozen=True)
class Runnable:
    """What running a stored model takes, read from one manifest after every blob was checked: the weights'
    path and GGUF header, and the layers the engine applies over them."""

    name: ModelName
    model_path: Path
    info: GGUFInfo
    template: str | None
    system: str | None
    params: dict[str, Any]
    messages: list[dict[str, Any]]
    adapters: list[Path]
    format: str = "gguf"  # "onnx": an ONNX Runtime GenAI folder, whose ``files`` the runtime reads
    files: dict[str, Path] = field(default_factory=dict)


class Store:
    def __init__(self, root: Path, catalog: Catalog | None = None, sources: dict[str, Source] | None = None,
                 allow_internal_registries: bool = False, trust: Callable[["Store", ModelName], None] | None = None,
                 key: bytes | None = None, variants: VariantPolicy | None = None):
        """``trust``: a signature policy (raises for a model it does not trust), checked on load, pull and create.
        ``key``: seal new blobs with it (encryption at rest), and open sealed ones.
        ``variants``: chooses which variant of a catalog model a pull stores; without one, the shipped file."""
        self.variants = variants
        self.allow_internal_registries = allow_internal_registries
        self.trust = trust
        self.root = Path(root)
        self.blobs = BlobStore(self.root / "blobs", key)
        self.manifests = ManifestStore(self.root / "manifests")
        self.catalog = catalog or Catalog.builtin()
        self.sources = sources or default_sources()
        self.gguf_cache = self.root / "cache" / "gguf"

    # -- locking -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Hold while adding blobs and the manifest that references them."""
        return self._lock(exclusive=False)

    # -- reading -------------------------------------------------------------------------------------------
    def manifest(self, name: ModelName) -> Manifest:
        return self.manifests.get(name)

    def exists(self, name: ModelName) -> bool:
        return self.manifests.path(name).is_file()

    def record(self, name: ModelName) -> ModelRecord:
        m = self.manifest(name)
        path = self.manifests.path(name)
        return ModelRecord(
            name=name,
            digest=Digest.of_bytes(path.read_bytes()),
            size=sum(l.size for l in m.all_layers()),
            modified_at=datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc),
            manifest=m,
        )

    def list(self) -> list[ModelRecord]:
        out = []
        for name in self.manifests.names():
            with contextlib.suppress(Exception):
                out.append(self.record(name))
        return sorted(out, key=lambda r: r.modified_at, reverse=True)

    def blob_path(self, digest: Digest) -> Path:
        return self.blobs.path(digest)

    def read_text(self, manifest: Manifest, media_type: str) -> str | None:
        layer = manifest.layer(media_type)
        return self.blobs.read_bytes(layer.blob).decode() if layer else None

    def read_json(self, manifest: Manifest, media_type: str) -> Any:
        text = self.read_text(manifest, media_type)
        return json.loads(text) if text is not None else None

    def config(self, name: ModelName) -> dict[str, Any]:
        """The model's config blob (format, family, and for catalog pulls the source and variant)."""
        try:
            return json.loads(self.blobs.read_bytes(self.manifest(name).config.blob))
        except (OSError, ValueError):
            return {}

    def variant(self, name: ModelName) -> tuple[str, str] | None:
        """Which catalog variant a pull stored, and why."""
        cfg = self.config(name)
        return (cfg["variant"], cfg.get("variant_reason", "")) if cfg.get("variant") else None

    def inspect(self, name: ModelName, manifest: Manifest | None = None) -> GGUFInfo:
        """The model's header: a GGUF's, or what an ONNX folder's ``genai_config.json`` says."""
        manifest = manifest or self.manifest(name)
        if folders.is_folder_model(manifest):
            return folders.inspect_stored(self, manifest, name.display)
        return inspect_gguf(self.model_path(name, manifest), self.gguf_cache, self.blobs.key)

    def verify(self, name: ModelName, manifest: Manifest | None = None) -> None:
        """Every blob of the model still matches its digest, and the trust policy accepts it: a corrupted, swapped
        or unsigned file must not reach llama.cpp."""
        self.verify_blobs(name, manifest)
        if self.trust is not None:
            self.trust(self, name)

    def verify_blobs(self, name: ModelName, manifest: Manifest | None = None) -> None:
        """Hashing only files that changed since they were last checked (remembered by file identity)."""
        for layer in (manifest or self.manifest(name)).all_layers():
            self.blobs.verify(layer.blob, self.root / "cache" / "verified", f"blob of {name.display}")

    def manifest_bytes(self, name: ModelName) -> bytes:
        try:
            return self.manifests.path(name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFound(name.display) from None

    def signature_path(self, name: ModelName) -> Path:
        """Beside the model, never inside what is signed."""
        *folders, tag = name.path_parts
        return self.root.joinpath("signatures", *folders, tag + ".sig")

    def model_path(self, name: ModelName, manifest: Manifest | None = None) -> Path:
        manifest = manifest or self.manifest(name)
        layer = manifest.layer(mt.MODEL)
        if layer is None and folders.is_folder_model(manifest):
            raise InvalidInput(f'"{name.display}" is an ONNX Runtime GenAI model; this works on GGUF models only')
        if layer is None:
            raise InvalidInput(f'"{name.display}" has no model layer')
        return self.blobs.path(layer.blob)

    def runnable(self, name: ModelName) -> Runnable:
        """``name`` ready to run: its manifest read once, every blob checked against its digest and the trust
        policy (a corrupted, swapped or unsigned file must not reach llama.cpp), then the weights' header read."""
        manifest = self.manifest(name)
        self.verify(name, manifest)
        if folders.is_folder_model(manifest):
            files = {n: self.blob_path(l.blob) for n, l in folders.file_layers(manifest).items()}
            path, fmt = files[folders.CONFIG], "onnx"
        else:
            files, path, fmt = {}, self.model_path(name, manifest), "gguf"
        return Runnable(
            name=name,
            model_path=path,
            format=fmt,
            files=files,
            template=self.read_text(manifest, mt.TEMPLATE),
            system=self.read_text(manifest, mt.SYSTEM),
            params=self.read_json(manifest, mt.PARAMS) or {},
            messages=self.read_json(manifest, mt.MESSAGES) or [],
            adapters=[self.blob_path(l.blob) for l in manifest.layers if l.media_type == mt.ADAPTER],
            info=self.inspect(name, manifest),
        )

    # -- writing -------------------------------------------------------------------------------------------
    def put_json_layer(self, media_type: str, value: Any) -> Layer:
        return self.put_text_layer(media_type, json.dumps(value, indent=None, separators=(",", ":")))

    def put_text_layer(self, media_type: str, text: str) -> Layer:
        digest, size = self.blobs.put_bytes(text.encode())
        return Layer(mediaType=media_type, digest=str(digest), size=size)

    def config_layer(self, info: GGUFInfo, layers: list[Layer], extra: dict[str, Any] | None = None) -> Layer:
        config = {
            "model_format": "onnx" if any(l.media_type == mt.FILE for l in layers) else "gguf",
            "model_family": info.architecture,
            "model_families": [info.architecture],
            "model_type": info.parameter_size,
            "file_type": info.file_type,
            "architecture": "amd64" if os.uname().machine == "x86_64" else os.uname().machine,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [l.digest for l in layers]},
            **(extra or {}),
        }
        layer = self.put_json_layer(mt.CONFIG_MEDIA_TYPE, config)
        return layer

    def write_manifest(self, name: ModelName, layers: list[Layer], config: Layer) -> Manifest:
        manifest = Manifest(config=config, layers=layers)
        self.manifests.put(name, manifest)
        return manifest

    def import_gguf(self, open_stream, what: str, expected: Digest | None, progress: ProgressFn,
                    total: int | None) -> tuple[Layer, GGUFInfo]:
        """Store a GGUF blob, then validate it; an invalid file is removed again unless another model uses it."""
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            progress("verifying sha256 digest" if expected else "copying model", done, total)

        existed = expected is not None and self.blobs.has(expected)
        with open_stream() as src:
            digest, size = self.blobs.put_stream(src, expected, tick, what=what)
        try:
            info = inspect_gguf(self.blobs.path(digest), self.gguf_cache, self.blobs.key)
        except Exception:
            if not existed and digest not in self._referenced():
                self.blobs.remove(digest)
            raise
        return Layer(mediaType=mt.MODEL, digest=str(digest), size=size), info

    def import_derived(self, produce: Callable[[Path], None], what: str,
                       progress: ProgressFn = _no_progress) -> tuple[Layer, GGUFInfo]:
        """Store a GGUF that ``produce`` writes to the path it is given (a quantized model). In a sealed store it is
        written to memory, so no plaintext reaches the disk; else to a temp file in the store."""
        with scratch(self.root, private=self.blobs.key is not None) as out:
            produce(out)
            size = out.stat().st_size
            return self.import_gguf(lambda: open(out, "rb"), what, None, progress, size)

    def _plan(self, entry: CatalogEntry, variant: str | None) -> Derivation | None:
        if self.variants is not None and entry.variants:
            return self.variants.plan(entry.name.display, entry.variants, variant)
        if entry.variants and not any(v.format == "gguf" and v.quantize is None for v in entry.variants):
            raise InvalidInput(f"{entry.name.display} is made on pull ({', '.join(v.name for v in entry.variants)}), "
                               "which needs a store opened with a variant policy")
        if variant is not None:
            known = ", ".join(v.name for v in entry.variants)
            raise InvalidInput(f"{entry.name.display} has no variant {variant!r}" +
                               (f"; choose one of {known}" if known else "; it has no variants"))
        return None

    def pull(self, name: ModelName | Reference, progress: ProgressFn = _no_progress, variant: str | None = None,
             registry: RegistryConfig | None = None) -> Manifest:
        """Fetch a model: from a registry when the reference names one (a host, a scheme or a manifest digest) and
        the catalog does not know it (:mod:`slmops.store.pulling`), else from the catalog. ``registry``: logins,
        CAs and ``insecure`` for a registry pull; without it, anonymous HTTPS."""
        ref = name if isinstance(name, Reference) else Reference.of(name)
        if ref.remote and (ref.digest or ref.scheme or self.catalog.lookup(ref.name) is None):
            if variant is not None:
                raise InvalidInput(f"variants are chosen for catalog models only; {ref.display} comes from a "
                                   "registry as it is")
            from slmops.store.pulling import pull_from_registry
            from slmops.store.registry_auth import RegistryConfig
            return pull_from_registry(self, ref, progress, registry or RegistryConfig())
        return self._pull_catalog(ref.name, progress, variant)

    def _pull_catalog(self, name: ModelName, progress: ProgressFn, variant: str | None) -> Manifest:
        """A catalog model; with variants, the one the variant policy picks for this machine (or ``variant``)
        is stored under ``name`` and its config records which one and why."""
        if name.host != DEFAULT_HOST:
            check_registry_host(name.host, self.allow_internal_registries)
        entry = self.catalog.lookup(name)
        if entry is None:
            raise ModelNotFound(name.display)
        source = self.sources.get(entry.source.get("type", ""))
        if source is None:
            raise SourceError(f"unknown source type {entry.source.get('type')!r} for {name.display}")
        plan = self._plan(entry, variant)
        with self.writing(), tempfile.TemporaryDirectory(prefix="slmops-pull-") as tmp:
            remove_abandoned_temps(self.root)
            progress("pulling manifest", 0, None)
            fetched = source.fetch(entry.source, Path(tmp), lambda s: progress(s, 0, None))
            model, info = self.import_gguf(fetched.open, name.display, entry.digest, progress,
                                           entry.size or fetched.size)
            extra: dict[str, Any] = {"source": entry.source.get("type")}
            models = [model]
            if plan is not None:
                if plan.folder:
                    models, info = self._export(model, info, plan, name.display, progress, Path(tmp))
                    extra.update(file_type=info.file_type, parameter_count=info.parameter_count)
                elif plan.produce is not None:
                    model, info = self._derive(model, plan, name.display, progress)
                    models = [model]
                extra.update(variant=plan.choice.variant.name, variant_reason=plan.choice.why)
            layers = [*models, *self._catalog_layers(entry, info, fetched.license)]
            config = self.config_layer(info, layers, extra)
            progress("writing manifest", 0, None)
            manifest = self.write_manifest(name, layers, config)
        if plan is not None and plan.produce is not None:
            self._drop_unreferenced(entry.digest)
        if self.trust is not None:
            try:
                self.trust(self, name)
            except SlmopsError:
                self.remove(name)  # an untrusted model is not kept
                raise
        progress("success", 0, None)
        return manifest

    def _derive(self, base: Layer, plan: Derivation, what: str, progress: ProgressFn) -> tuple[Layer, GGUFInfo]:
        assert plan.produce is not None
        progress(f"making variant {plan.choice.variant.name}", 0, None)
        with self.blobs.plain(base.blob, f"model of {what}") as src:
            return self.import_derived(lambda out: plan.produce(src, out), f"{what} ({plan.choice.variant.name})",
                                       progress)

    def _export(self, base: Layer, base_info: GGUFInfo, plan: Derivation, what: str, progress: ProgressFn,
                work: Path) -> tuple[list[Layer], GGUFInfo]:
        """An ONNX variant: the shipped GGUF exported to an ONNX Runtime GenAI folder in the pull's work folder,
        whose files become the model's layers. Its size and precision come from the GGUF and the variant."""
        assert plan.produce is not None
        variant = plan.choice.variant
        progress(f"making variant {variant.name}", 0, None)
        out = work / "onnx"
        with self.blobs.plain(base.blob, f"model of {what}") as src:
            # The exporter runs in child processes: a sealed store's memfd is named through this process's /proc.
            plan.produce(Path(str(src).replace("/proc/self/", f"/proc/{os.getpid()}/", 1)), out)
        layers, info = folders.import_folder(self, out, f"{what} ({variant.name})", progress)
        info.file_type = (variant.export or "onnx").upper()
        info.parameter_count = base_info.parameter_count
        return layers, info

    def _drop_unreferenced(self, digest: Digest) -> None:
        """The shipped file a variant was made from goes, unless a model still uses it."""
        with self._lock(exclusive=True):
            if digest not in self._referenced():
                self.blobs.remove(digest)

    def _catalog_layers(self, entry: CatalogEntry, info: GGUFInfo, license_text: str | None) -> list[Layer]:
        layers = []
        template = entry.template or info.chat_template
        if template:
            layers.append(self.put_text_layer(mt.TEMPLATE, template))
        if entry.system:
            layers.append(self.put_text_layer(mt.SYSTEM, entry.system))
        if entry.params:
            layers.append(self.put_json_layer(mt.PARAMS, entry.params))
        if license_text:
            layers.append(self.put_text_layer(mt.LICENSE, license_text))
        return layers

    def copy(self, src: ModelName, dst: ModelName) -> None:
        with self.writing():
            self.manifests.put(dst, self.manifest(src))
            sig = self.signature_path(src)
            if sig.is_file():  # the signature covers content, not names: it holds for the copy
                self.signature_path(dst).parent.mkdir(parents=True, exist_ok=True)
                with atomic_writer(self.signature_path(dst)) as f:
                    f.write(sig.read_bytes())

    def remove(self, name: ModelName) -> list[Digest]:
        """Delete a model and every blob no other manifest references; returns the blobs removed."""
        with self._lock(exclusive=True):
            self.manifests.delete(name)
            self.signature_path(name).unlink(missing_ok=True)
            return self._collect_garbage()

    def reseal(self, seal: bool, progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """Rewrite every blob sealed with the store key (``seal``) or plain; returns (rewritten, total). Holds the
        store exclusively, so no blob is removed or added while it is rewritten. Blobs sealed already are checked
        first to open with this key, and nothing is rewritten unless all do: with another key, "all sealed" would
        be untrue and an unseal would stop half done."""
        with self._lock(exclusive=True):
            digests = sorted(self.blobs.digests(), key=str)
            self._check_sealed_with_this_key(digests)
            changed = 0
            for i, digest in enumerate(digests, 1):
                changed += self.blobs.reseal(digest, seal)
                if progress:
                    progress(i, len(digests))
        return changed, len(digests)

    def _check_sealed_with_this_key(self, digests: list[Digest]) -> None:
        sealed_ = [d for d in digests if self.blobs.is_sealed(d)]
        foreign = [d for d in sealed_ if not self.blobs.opens(d)]
        if not foreign:
            return
        if self.blobs.key is None:
            raise ConfigError(f"{len(foreign)} blob(s) are sealed and no store key is set; {KEY_HELP}; nothing "
                              "was changed")
        raise ConfigError(f"{len(foreign)} of {len(sealed_)} sealed blob(s) do not open with this store key: they "
                          f"are sealed with another key (or damaged); {KEY_HELP}; nothing was changed")

    def prune(self) -> list[Digest]:
        with self._lock(exclusive=True):
            remove_abandoned_temps(self.root)
            self._drop_partials()
            return self._collect_garbage()

    def _drop_partials(self) -> None:
        """Give up the bytes interrupted registry pulls kept for a resume. A pull still writing one holds its
        lock, and its file is left alone."""
        folder = self.blobs.root / "partial"
        for path in folder.glob("*.partial") if folder.is_dir() else ():
            with contextlib.suppress(OSError), open(path, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                path.unlink()

    def _referenced(self) -> set[Digest]:
        refs: set[Digest] = set()
        for n in self.manifests.names():
            with contextlib.suppress(Exception):
                refs.update(l.blob for l in self.manifests.get(n).all_layers())
        return refs

    def _collect_garbage(self) -> list[Digest]:
        unused = sorted(self.blobs.digests() - self._referenced())
        for d in unused:
            self.blobs.remove(d)
        if unused and self.gguf_cache.is_dir():
            shutil.rmtree(self.gguf_cache, ignore_errors=True)  # entries are rebuilt on demand
        return unused
