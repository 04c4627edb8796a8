"""Adopting the models of an existing Ollama store (``slmops import --from-ollama``).

An Ollama store has slmops's layout (``manifests/<host>/<namespace>/<model>/<tag>``, ``blobs/sha256-<hex>``), so a
model comes over as its blobs plus its manifest, the manifest kept byte for byte: the digest ``slmops list`` shows
is then the id ``ollama list`` shows. Each model is all or nothing: its new blobs are staged under temp names in
slmops's blob folder, hashed, and only when every one matches its digest (and the model layer is a valid GGUF) are
they renamed into place and the manifest written; a model that fails leaves nothing behind.

Blobs are hard links to Ollama's files where the file system allows, so adopting a store costs no space. Sharing
an inode with another tool is safe here because neither tool ever modifies a blob in place: both write a new file
and rename it, and both delete by unlinking their own name, so ``ollama rm`` or ``ollama prune`` leaves slmops's
link (and the data) alone, and ``slmops rm``, ``prune`` or ``store seal`` (which rewrites into a new file) never
touch Ollama's name. Should anything write into the shared inode anyway, :meth:`BlobStore.verify` notices: its
memo of a checked file includes ``st_ctime``, which every write moves, so the blob is hashed again before it loads.
A sealed store (store key set) never links: it gets sealed copies, as plaintext must not enter it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from slmops.store import manifests as mt
from slmops.store.atomic import TMP_PREFIX, fsync_dir, remove_abandoned_temps
from slmops.store.blobs import CHUNK, BlobStore
from slmops.store.gguf import inspect_gguf
from slmops.store.manifests import Layer, Manifest
from slmops.store.sealed import Passthrough, Sealer
from slmops.store.store import Store
from slmops.types.digest import Digest
from slmops.types.errors import InvalidInput, SlmopsError
from slmops.types.name import ModelName

MAX_MANIFEST = 4 << 20
"""A manifest is a few hundred bytes; anything this large is not one (and is not read whole into memory)."""

# link(2) errors that mean "not here, copy instead": another file system, a file system or a
# fs.protected_hardlinks policy that refuses links, an inode at its link limit.
_COPY_INSTEAD = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP}

IMPORTED, ALREADY, KEPT, SKIPPED = "imported", "already there", "kept", "skipped"


@dataclass(frozen=True)
class ImportResult:
    """One manifest of the Ollama store and what became of it."""

    what: str
    """The model's name, or the manifest's path under ``manifests/`` when it has no valid name."""
    outcome: str
    """``imported``, ``already there``, ``kept`` (a different model has the name; ``force`` replaces it), or
    ``skipped`` (it could not be imported; ``reason`` says why)."""
    size: int = 0
    how: str = ""
    """How its new blobs came in: ``linked``, ``copied``, ``sealed`` (joined when mixed), or ``""`` when the store
    already had them all."""
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome == SKIPPED


class _Skip(Exception):
    """This model cannot be imported, for the reason given; the others go on."""


@dataclass
class _Staged:
    """A complete, verified blob under a temp name in the blob folder, waiting for the rest of its model."""

    digest: Digest
    path: Path
    how: str

    def commit(self, target: Path) -> None:
        os.replace(self.path, target)
        fsync_dir(target.parent)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def import_ollama(store: Store, source: Path, force: bool = False,
                  report: Callable[[ImportResult], None] | None = None) -> list[ImportResult]:
    """Import every model under ``source`` (an Ollama ``models`` folder); ``report`` hears of each as it is done.
    A model slmops already has under the same name is left alone unless its manifest is the same (then it is
    ``already there``) or ``force`` is set."""
    manifests = source / "manifests"
    if not manifests.is_dir():
        raise InvalidInput(f"{source} is not an Ollama model store (it has no manifests folder); pass the folder "
                           "Ollama keeps its models in, or set OLLAMA_MODELS")
    if source.resolve() == store.root.resolve():
        raise InvalidInput(f"{source} is this slmops store itself; pass the folder Ollama keeps its models in")
    with store.writing():
        remove_abandoned_temps(store.blobs.root)
    results = []
    for path in _manifest_files(manifests):
        result = _import_one(store, source / "blobs", path, path.relative_to(manifests), force)
        results.append(result)
        if report is not None:
            report(result)
    return results


def _manifest_files(root: Path) -> Iterator[Path]:
    """Every file under ``manifests/``, except hidden ones (an editor's or Finder's, or a writer's temp file)."""
    for path in sorted(root.rglob("*")):
        if not any(part.startswith(".") for part in path.relative_to(root).parts) and path.is_file():
            yield path


def _import_one(store: Store, blobs: Path, path: Path, rel: Path, force: bool) -> ImportResult:
    what = "/".join(rel.parts)
    try:
        name = _name(rel)
        what = name.display
        data, manifest = _read(path)
        size = sum(l.size for l in manifest.all_layers())
        with store.writing():
            if store.exists(name):
                if store.manifests.digest(name) == Digest.of_bytes(data):
                    return ImportResult(what, ALREADY, size)
                if not force:
                    return ImportResult(what, KEPT, size, reason="slmops already has a different model under this "
                                        "name; --force replaces it")
            how = _adopt(store, blobs, name, manifest)
            if force:  # a signature of the model this one replaces says nothing about it
                store.signature_path(name).unlink(missing_ok=True)
            store.manifests.put_bytes(name, data)
        return ImportResult(what, IMPORTED, size, how)
    except _Skip as err:
        return ImportResult(what, SKIPPED, reason=str(err))
    except (SlmopsError, OSError) as err:
        return ImportResult(what, SKIPPED, reason=_one_line(err))


def _name(rel: Path) -> ModelName:
    if len(rel.parts) != 4:
        raise _Skip("not at manifests/<host>/<namespace>/<model>/<tag>, so it names no model")
    try:
        return ModelName.from_path_parts(*rel.parts)
    except SlmopsError as err:
        raise _Skip(f"its name is outside slmops's grammar ({err})") from None


def _read(path: Path) -> tuple[bytes, Manifest]:
    with open(path, "rb") as f:
        data = f.read(MAX_MANIFEST + 1)
    if len(data) > MAX_MANIFEST:
        raise _Skip(f"its manifest is over {MAX_MANIFEST >> 20} MiB, so it is not one")
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise _Skip(f"its manifest does not parse ({where + ': ' if where else ''}{first['msg']})") from None
    except SlmopsError as err:  # a digest outside sha256:<64 hex>
        raise _Skip(f"its manifest does not parse ({err})") from None
    if manifest.layer(mt.MODEL) is None:
        raise _Skip("it has no model layer (an Ollama cloud model?), so there is nothing to run")
    return data, manifest


def _adopt(store: Store, blobs: Path, name: ModelName, manifest: Manifest) -> str:
    """Stage the blobs the store lacks, check the model layer, then put them in place; returns how they came."""
    staged: dict[Digest, _Staged] = {}
    try:
        for layer in manifest.all_layers():
            if layer.blob not in staged and not store.blobs.has(layer.blob):
                staged[layer.blob] = _stage(store.blobs, blobs / layer.blob.filename, layer, name)
        model = manifest.layer(mt.MODEL)
        assert model is not None
        try:
            if model.blob in staged:  # no cache: it is keyed by path, and this path is about to change
                inspect_gguf(staged[model.blob].path, None, store.blobs.key)
            else:
                inspect_gguf(store.blobs.path(model.blob), store.gguf_cache, store.blobs.key)
        except SlmopsError as err:
            raise _Skip(f"its model layer is not a usable GGUF file ({err})") from None
        how = " and ".join(sorted({item.how for item in staged.values()}))
        while staged:
            item = staged.pop(next(iter(staged)))
            try:
                item.commit(store.blobs.path(item.digest))
            except BaseException:
                item.discard()
                raise
    except BaseException:
        for item in staged.values():
            item.discard()
        raise
    return how


def _stage(store: BlobStore, src: Path, layer: Layer, name: ModelName) -> _Staged:
    """Link (or copy, or seal) one blob to a temp name and hash it there, so what is checked is what is kept."""
    short = str(layer.blob)[:19]
    try:
        found = src.stat().st_size
    except FileNotFoundError:
        raise _Skip(f"blob {short} is missing from the Ollama store") from None
    if found != layer.size:  # a truncated blob is refused before it is read
        raise _Skip(f"blob {short} is {found} bytes, its manifest says {layer.size}; re-pull the model in Ollama")
    store.root.mkdir(parents=True, exist_ok=True)
    staged = _Staged(layer.blob, store.root / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}", "copied")
    if store.key is not None:
        staged.how = "sealed"
    else:
        try:
            os.link(src, staged.path)
            staged.how = "linked"
        except OSError as err:
            if err.errno not in _COPY_INSTEAD:
                raise
    try:
        digest, size = _hash(staged.path) if staged.how == "linked" else _copy(src, staged.path, store.key)
        if digest != layer.blob or size != layer.size:
            raise _Skip(f"blob {short} does not match its digest (Ollama's copy is damaged); re-pull the model "
                        f"in Ollama (`ollama pull {name.display}`)")
    except BaseException:
        staged.discard()
        raise
    return staged


def _hash(path: Path) -> tuple[Digest, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return Digest(h.hexdigest()), size


def _copy(src: Path, dst: Path, key: bytes | None) -> tuple[Digest, int]:
    """One pass: read, hash, write (sealed with ``key`` when there is one), fsync."""
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as inp, open(dst, "xb") as out:
        sink = Sealer(key, out) if key is not None else Passthrough(out)
        while chunk := inp.read(CHUNK):
            h.update(chunk)
            sink.write(chunk)
            size += len(chunk)
        sink.finish()
        out.flush()
        os.fsync(out.fileno())
    return Digest(h.hexdigest()), size


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


__all__ = ["ALREADY", "IMPORTED", "KEPT", "SKIPPED", "ImportResult", "import_ollama"]
