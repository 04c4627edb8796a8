"""Build a model in the store from a Modelfile (``slmops create``), and the reverse (``show --modelfile``).

Like Ollama: FROM an existing model inherits its layers; FROM a ``.gguf`` path imports the file (validated first),
FROM a folder an ONNX Runtime GenAI model (a blob per file, :mod:`slmops.store.folders`);
PARAMETERs merge over the base's, TEMPLATE/SYSTEM/MESSAGEs replace the base's, LICENSEs and ADAPTERs add layers.
FILEs add knowledge to the base's (a file of the same name replaces the base's), embedded by the EMBEDDING model
(else the base's, else :data:`slmops.modelfile.knowledge.DEFAULT_EMBEDDING_MODEL`): a layer per file and one
index (:mod:`slmops.store.knowledge`). Every file is read and chunked before anything is written.
The manifest is written last, so an interrupted create leaves no model behind.
"""

from __future__ import annotations

import json
from typing import Callable
from pathlib import Path

from slmops.modelfile import knowledge as kn
from slmops.modelfile.template import ChatTemplate
from slmops.modelfile.parser import Modelfile
from slmops.store import folders, knowledge as ks, manifests as mt
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
           quantize: Requantize | None = None, embed: kn.Embedder | None = None) -> Manifest:
    """``base_dir`` resolves relative paths; ``None`` (the HTTP API) allows model names and blob digests only.
    ``quantize`` turns the base model layer into a quantized one (``create --quantize``), before anything else is
    written, so a refused quantization leaves no model behind. ``embed`` computes knowledge embeddings; FILE
    needs it."""
    if mf.template is not None:
        ChatTemplate.compile(mf.template)  # reject an unusable template before anything is written
    files = _knowledge_files(mf, base_dir)
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
        layers += _knowledge(store, base_layers, mf.embedding, files, embed, progress, pull_missing)
        config = store.config_layer(info, layers)
        progress("writing manifest", 0, None)
        manifest = store.write_manifest(name, layers, config)
    progress("success", 0, None)
    return manifest


def _knowledge_files(mf: Modelfile, base_dir: Path | None) -> list[tuple[str, bytes, list[ks.Chunk]]]:
    """Each FILE's name, bytes and chunks; any file that cannot be used stops here, before the store is touched."""
    if not mf.files:
        return []
    if base_dir is None:
        raise InvalidInput("FILE reads a file on the machine that builds the model; build it with `slmops create` "
                           "and push it, or create FROM a model that has the knowledge")
    out: list[tuple[str, bytes, list[ks.Chunk]]] = []
    for value in mf.files:
        p = Path(value).expanduser()
        path = p if p.is_absolute() else base_dir / p
        kn.check_name(path.name)
        if any(name == path.name for name, _, _ in out):
            raise ModelfileError(f"FILE {path.name} is named twice; knowledge files are known by their file name")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelfileError(f"FILE {value} does not exist") from None
        except OSError as err:
            raise ModelfileError(f"FILE {value} cannot be read ({err.strerror or err})") from None
        out.append((path.name, data, kn.prepare(path.name, data)))
    return out


def _knowledge(store: Store, base_layers: list[Layer], embedding: str | None,
               files: list[tuple[str, bytes, list[ks.Chunk]]], embed: kn.Embedder | None,
               progress: ProgressFn, pull_missing: bool) -> list[Layer]:
    """The knowledge layers of the new model: the base's files (less those a FILE replaces) and the new ones, and
    one index. Base chunks are embedded again only when the embedding model changes."""
    base_index_layer = next((l for l in base_layers if l.media_type == mt.KNOWLEDGE_INDEX), None)
    base = ks.KnowledgeIndex.from_bytes(store.blobs.read_bytes(base_index_layer.blob), "the FROM model") \
        if base_index_layer is not None else None
    if not files and (embedding is None or base is None or embedding == base.embedding.model):
        if embedding is not None and base is None:
            raise ModelfileError("EMBEDDING names the model that embeds knowledge files; add FILE lines")
        return [l for l in base_layers if l.media_type in (mt.KNOWLEDGE_FILE, mt.KNOWLEDGE_INDEX)]
    if embed is None:
        raise InvalidInput("knowledge files need an embedding model to run here; build with `slmops create`")
    model = embedding or (base.embedding.model if base is not None else kn.DEFAULT_EMBEDDING_MODEL)
    identity = _embedding_model(store, model, progress, pull_missing)
    replaced = {name for name, _, _ in files}
    kept_files = [l for l in base_layers if l.media_type == mt.KNOWLEDGE_FILE and ks.file_title(l) not in replaced]
    old = list(base.without(replaced).chunks) if base is not None else []
    reuse = base is not None and base.embedding.digest == identity.digest
    new = [c for _, _, chunks in files for c in chunks]
    todo = new if reuse else old + new
    if not todo:  # the same weights under another name: nothing to embed again
        return [l for l in base_layers if l.media_type in (mt.KNOWLEDGE_FILE, mt.KNOWLEDGE_INDEX)]
    progress(f"embedding {len(todo)} chunks with {model}", 0, None)
    vectors: list[list[float]] = []
    for i in range(0, len(todo), 32):
        vectors += embed(model, [kn.embedding_text(c) for c in todo[i:i + 32]])
    if len(vectors) != len(todo) or not vectors or len(vectors[0]) < 1:
        raise InvalidInput(f"{model} gave {len(vectors)} embeddings for {len(todo)} chunks")
    identity = ks.EmbeddingModel(identity.model, identity.digest, len(vectors[0]))
    if reuse and base is not None and base.embedding.dimension != identity.dimension:
        raise InvalidInput(f"{model} gave {identity.dimension} dimensions, the FROM model's knowledge "
                           f"{base.embedding.dimension}")
    index = ks.KnowledgeIndex.build(identity, todo, vectors)
    if reuse and base is not None:
        index = base.without(replaced).plus(index)
    layers = kept_files + [ks.file_layer(store, name, data) for name, data, _ in files]
    return layers + [ks.index_layer_of(store, index)]


def _embedding_model(store: Store, model: str, progress: ProgressFn, pull_missing: bool) -> ks.EmbeddingModel:
    """The embedding model's identity (its weights' digest), pulled from the catalog first if it is missing."""
    name = _stored(store, model, "EMBEDDING", progress, pull_missing)
    weights = store.manifest(name).layer(mt.MODEL)
    if weights is None:
        raise InvalidInput(f'EMBEDDING: "{name.display}" has no GGUF model layer to embed with')
    return ks.EmbeddingModel(name.display, weights.digest, 0)


def _stored(store: Store, text: str, keyword: str, progress: ProgressFn, pull_missing: bool) -> ModelName:
    """The model a Modelfile line names, pulled from the catalog first if the store lacks it (as Ollama does)."""
    try:
        name = ModelName.parse(text)
    except SlmopsError as err:
        raise ModelfileError(f"{keyword}: {err}") from None
    if not store.exists(name):
        if not (pull_missing and store.catalog.lookup(name)):
            raise ModelNotFound(name.display)
        store.pull(name, progress)
    return name


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
    base = _stored(store, mf.from_, "FROM", progress, pull_missing)
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
