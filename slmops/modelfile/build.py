"""Build a model in the store from a Modelfile (``slmops create``), and the reverse (``show --modelfile``).

Like Ollama: FROM an existing model inherits its layers; FROM a ``.gguf`` path imports the file (validated first),
FROM a folder an ONNX Runtime GenAI model (a blob per file, :mod:`slmops.store.folders`);
PARAMETERs merge over the base's, TEMPLATE/SYSTEM/MESSAGEs replace the base's, LICENSEs and ADAPTERs add layers.
The manifest is written last, so an interrupted create leaves no model behind.
"""

from __future__ import annotations

import json
from typing import Callable
from pathlib import Path

from slmops.modelfile.template import ChatTemplate
from slmops.modelfile.parser import Modelfile
from slmops.store import folders, manifests as mt
from slmops.store.gguf import GGUFInfo
from slmops.store.manifests import Layer, Manifest
from slmops.store.store import ProgressFn, Store, _no_progress
from slmops.types.digest import Digest
from slmops.types.errors import InvalidInput, ModelfileError, ModelNotFound, NotFound, SlmopsError, UntrustedModel
from slmops.types.name import ModelName


def _is_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.lower().endswith(".gguf") or "\\" in value


def _digest(value: str) -> Digest | None:
    """FROM/ADAPTER may name an uploaded blob by digest (``sha256:<hex>``), as Ollama's create API does."""
    return Digest.parse(value.removeprefix("@")) if value.lstrip("@").startswith("sha256") else None


def _folder(value: str, base_dir: Path | None) -> Path | None:
    """FROM a folder: an ONNX Runtime GenAI model (checked by :func:`slmops.store.folders.import_folder`)."""
    if base_dir is None or _digest(value) is not None:
        return None
    p = Path(value).expanduser()
    folder = p if p.is_absolute() else base_dir / p
    return folder if folder.is_dir() else None


def _file(store: Store, value: str, base_dir: Path | None, what: str) -> tuple[Path, Digest | None]:
    digest = _digest(value)
    if digest is not None:
        if not store.blobs.has(digest):
            raise NotFound(f"{what} blob {digest} not found; upload it first with POST /api/blobs/{digest}")
        return store.blob_path(digest), digest
    if base_dir is None:
        raise InvalidInput(f"{what} must be a model name or an uploaded blob digest, not a file path")
    p = Path(value).expanduser()
    file = p if p.is_absolute() else base_dir / p
    if not file.is_file():
        raise ModelfileError(f"{what} file {value} does not exist")
    return file, None


Requantize = Callable[[Layer, GGUFInfo], "tuple[Layer, GGUFInfo]"]


def create(store: Store, name: ModelName, mf: Modelfile, base_dir: Path | None,
           progress: ProgressFn = _no_progress, pull_missing: bool = True,
           quantize: Requantize | None = None) -> Manifest:
    """``base_dir`` resolves relative paths; ``None`` (the HTTP API) allows model names and blob digests only.
    ``quantize`` turns the base model layer into a quantized one (``create --quantize``), before anything else is
    written, so a refused quantization leaves no model behind."""
    if mf.template is not None:
        ChatTemplate.compile(mf.template)  # reject an unusable template before anything is written
    with store.writing():
        progress("reading model metadata", 0, None)
        base_layers, info = _base(store, mf, base_dir, progress, pull_missing)
        if quantize is not None:
            model = next((l for l in base_layers if l.media_type == mt.MODEL), None)
            if model is None:
                raise InvalidInput("--quantize works on GGUF models; this one is an ONNX Runtime GenAI folder")
            progress("quantizing model", 0, None)
            new, info = quantize(model, info)
            base_layers = [new if l is model else l for l in base_layers]
        layers = [l for l in base_layers if l.media_type in (mt.MODEL, mt.FILE, mt.ADAPTER, mt.LICENSE)]
        if mf.adapters and any(l.media_type == mt.FILE for l in layers):
            raise InvalidInput("ADAPTER works on GGUF models; ONNX Runtime GenAI models take no LoRA adapters here")
        kept = {l.media_type: l for l in base_layers}
        for path in mf.adapters:
            _refuse_unverifiable(store, "ADAPTER")
            file, digest = _file(store, path, base_dir, "ADAPTER")
            layer, _ = store.import_gguf(lambda f=file: f.open("rb"), path, digest, progress, file.stat().st_size)
            layers.append(Layer(mediaType=mt.ADAPTER, digest=layer.digest, size=layer.size))
        template = mf.template if mf.template is not None else _text(store, kept.get(mt.TEMPLATE))
        if template is None and info.chat_template:
            template = info.chat_template
        if template:
            layers.append(store.put_text_layer(mt.TEMPLATE, template))
        system = mf.system if mf.system is not None else _text(store, kept.get(mt.SYSTEM))
        if system:
            layers.append(store.put_text_layer(mt.SYSTEM, system))
        params = {**(json.loads(_text(store, kept.get(mt.PARAMS)) or "{}")), **mf.parameters}
        if params:
            layers.append(store.put_json_layer(mt.PARAMS, params))
        messages = mf.messages or json.loads(_text(store, kept.get(mt.MESSAGES)) or "[]")
        if messages:
            layers.append(store.put_json_layer(mt.MESSAGES, messages))
        for lic in mf.licenses:
            layers.append(store.put_text_layer(mt.LICENSE, lic))
        config = store.config_layer(info, layers)
        progress("writing manifest", 0, None)
        manifest = store.write_manifest(name, layers, config)
    progress("success", 0, None)
    return manifest


def _refuse_unverifiable(store: Store, what: str) -> None:
    if store.trust is not None:
        raise UntrustedModel(f"{what} from a file or blob carries no signature, and SLMOPS_TRUSTED_KEYS requires "
                             "one; create from a signed model instead")


def _text(store: Store, layer: Layer | None) -> str | None:
    return store.blobs.read_bytes(layer.blob).decode() if layer else None


def _base(store: Store, mf: Modelfile, base_dir: Path, progress: ProgressFn,
          pull_missing: bool) -> tuple[list[Layer], GGUFInfo]:
    if _is_path(mf.from_) or _digest(mf.from_):
        _refuse_unverifiable(store, "FROM")
        folder = _folder(mf.from_, base_dir)
        if folder is not None:
            return folders.import_folder(store, folder, mf.from_, progress)
        file, digest = _file(store, mf.from_, base_dir, "FROM")
        layer, info = store.import_gguf(lambda: file.open("rb"), mf.from_, digest, progress, file.stat().st_size)
        return [layer], info
    try:
        base = ModelName.parse(mf.from_)
    except SlmopsError as err:
        raise ModelfileError(f"FROM: {err}") from None
    if not store.exists(base):
        if not (pull_missing and store.catalog.lookup(base)):
            raise ModelNotFound(base.display)
        store.pull(base, progress)
    if store.trust is not None:
        store.trust(store, base)
    manifest = store.manifest(base)
    if manifest.layer(mt.MODEL) is None and not folders.is_folder_model(manifest):
        raise InvalidInput(f'"{base.display}" has no model layer')
    return manifest.layers, store.inspect(base, manifest)


def to_modelfile(store: Store, name: ModelName) -> Modelfile:
    m = store.manifest(name)
    mf = Modelfile(from_=name.display)
    mf.template = store.read_text(m, mt.TEMPLATE)
    mf.system = store.read_text(m, mt.SYSTEM)
    mf.parameters = store.read_json(m, mt.PARAMS) or {}
    mf.messages = store.read_json(m, mt.MESSAGES) or []
    mf.adapters = [str(store.blob_path(l.blob)) for l in m.layers if l.media_type == mt.ADAPTER]
    mf.licenses = [store.blobs.read_bytes(l.blob).decode() for l in m.layers if l.media_type == mt.LICENSE]
    return mf
