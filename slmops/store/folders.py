"""Models stored as a folder of files: ONNX Runtime GenAI models (``genai_config.json``, ``model.onnx`` and its
``.data``, tokenizer files, chat template).

Each file is a blob and a layer of media type :data:`slmops.store.manifests.FILE` that carries its file name in the
OCI title annotation (as ``oras push`` names files), so such a model is pushed, pulled, signed and verified like
any other: every byte the runtime reads is a blob named by its digest. The runtime gets the files back as a folder
of links (:func:`slmops.store.sealed.plain_folder`).

What the store knows of such a model comes from its ``genai_config.json``, checked before a manifest names it:
it must parse, name a decoder file the folder holds, and give a context length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from slmops.store import manifests as mt
from slmops.store.gguf import GGUFInfo
from slmops.store.manifests import Layer, Manifest
from slmops.types.errors import InvalidModelFile

if TYPE_CHECKING:
    from slmops.store.store import Store

CONFIG = "genai_config.json"
TEMPLATE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
MAX_FILES = 64
MAX_CONFIG_BYTES = 1 << 20


def title(layer: Layer | Any) -> str:
    """A file layer's file name (``org.opencontainers.image.title``); "" when it has none."""
    annotations = getattr(layer, "annotations", None) or {}
    return str(annotations.get(mt.TITLE, ""))


def is_folder_model(manifest: Manifest) -> bool:
    return any(l.media_type == mt.FILE for l in manifest.layers)


def file_layers(manifest: Manifest) -> dict[str, Layer]:
    """The files by name, checked: a stored manifest may have come from a registry."""
    named = [(title(l), l) for l in manifest.layers if l.media_type == mt.FILE]
    check_names([n for n, _ in named], "the model")
    return dict(named)


def check_names(names: list[str], what: str) -> None:
    """Plain, distinct file names: a name is a path in the folder the runtime reads, so no separators or dots."""
    if len(names) > MAX_FILES:
        raise InvalidModelFile(f"{what} has {len(names)} files; a model folder holds at most {MAX_FILES}")
    for name in names:
        if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
            raise InvalidModelFile(f"{what} has a file named {name!r}; file names must be plain names")
    if len(set(names)) != len(names):
        raise InvalidModelFile(f"{what} names a file twice")
    if CONFIG not in names:
        raise InvalidModelFile(f"{what} has no {CONFIG}; an ONNX Runtime GenAI model folder needs one")


def parse_config(data: bytes, names: list[str], what: str) -> dict[str, Any]:
    """``genai_config.json``, checked: it parses and names a decoder file that the folder holds."""
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidModelFile(f"{CONFIG} of {what} is over {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(data)
        model = config["model"]
        decoder = model["decoder"]["filename"]
        int(model["context_length"])
    except (ValueError, KeyError, TypeError):
        raise InvalidModelFile(f"{CONFIG} of {what} is not an ONNX Runtime GenAI config (model.decoder.filename "
                               "and model.context_length are needed)") from None
    if decoder not in names:
        raise InvalidModelFile(f"{CONFIG} of {what} names {decoder}, which the folder does not hold")
    return config


def info_of(config: dict[str, Any], template: str | None, stored: dict[str, Any]) -> GGUFInfo:
    """What ``show`` and ``/api/show`` say of the model, in the form they say it of a GGUF. ``stored``: the model's
    config blob, which records the precision and size when slmops made the folder."""
    model = config["model"]
    arch = str(model.get("type") or "onnx")
    decoder = model.get("decoder", {})
    metadata = {"general.architecture": arch, "general.format": "onnx",
                f"{arch}.context_length": int(model["context_length"])}
    for key, name in (("hidden_size", "embedding_length"), ("num_hidden_layers", "block_count"),
                      ("num_attention_heads", "attention.head_count"),
                      ("num_key_value_heads", "attention.head_count_kv")):
        if isinstance(decoder.get(key), int):
            metadata[f"{arch}.{name}"] = decoder[key]
    if isinstance(model.get("vocab_size"), int):
        metadata[f"{arch}.vocab_size"] = model["vocab_size"]
    return GGUFInfo(architecture=arch, file_type=str(stored.get("file_type") or "onnx"),
                    parameter_count=int(stored.get("parameter_count") or 0),
                    context_length=int(model["context_length"]), chat_template=template, metadata=metadata)


def folder_template(files: dict[str, bytes | Path], read: Callable[[bytes | Path], bytes]) -> str | None:
    """The chat template a folder ships: ``chat_template.jinja``, else ``tokenizer_config.json``'s."""
    if TEMPLATE in files:
        return read(files[TEMPLATE]).decode("utf-8", "replace")
    if TOKENIZER_CONFIG in files:
        try:
            value = json.loads(read(files[TOKENIZER_CONFIG])).get("chat_template")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    return None


def import_folder(store: "Store", folder: Path, what: str,
                  progress: Callable[[str, int, int | None], None]) -> tuple[list[Layer], GGUFInfo]:
    """Store every file of ``folder`` as a blob and return their layers (sorted by name) and the model's info.
    The folder is checked before any blob is written, so a folder that is no model adds nothing."""
    entries = sorted(p for p in folder.iterdir())
    for p in entries:
        if p.is_symlink() or not p.is_file():
            raise InvalidModelFile(f"{what} holds {p.name}, which is not a plain file; a model folder holds "
                                   "files only")
    names = [p.name for p in entries]
    check_names(names, what)
    config = parse_config((folder / CONFIG).read_bytes(), names, what)
    total = sum(p.stat().st_size for p in entries)
    layers, done = [], 0
    for p in entries:
        with p.open("rb") as f:
            digest, size = store.blobs.put_stream(f, None, lambda n: None, what=f"{p.name} of {what}")
        done += size
        progress("copying model", done, total)
        layers.append(Layer(mediaType=mt.FILE, digest=str(digest), size=size, annotations={mt.TITLE: p.name}))
    template = folder_template({p.name: p for p in entries}, lambda p: p.read_bytes())
    return layers, info_of(config, template, {})


def inspect_stored(store: "Store", manifest: Manifest, what: str) -> GGUFInfo:
    files = file_layers(manifest)
    names = list(files)
    config = parse_config(store.blobs.read_bytes(files[CONFIG].blob), names, what)
    template = folder_template({n: l.blob for n, l in files.items()},  # type: ignore[misc]
                               lambda d: store.blobs.read_bytes(d))
    try:
        stored = json.loads(store.blobs.read_bytes(manifest.config.blob))
    except (OSError, ValueError):
        stored = {}
    return info_of(config, template, stored if isinstance(stored, dict) else {})
