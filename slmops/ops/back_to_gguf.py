"""Weights trained here (a Hugging Face folder a training child saved) back into the store as a GGUF of a chosen
type: llama.cpp's own converter (from the llama-cpp-python sdist the engine was built from) writes float16, then
llama.cpp quantizes that to the type the model had, so the result is compared with its source like for like.
Distillation and a merged LoRA both end here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from slmops.store import manifests as mt
from slmops.store.gguf import GGUFInfo
from slmops.store.manifests import Layer, Manifest
from slmops.store.store import Store
from slmops.types import quant
from slmops.types.errors import InvalidInput
from slmops.types.name import ModelName

Status = Callable[[str], None]


def gguf_weights(store: Store, name: ModelName, command: str) -> tuple[Manifest, Layer]:
    """``name``'s manifest (checked against its digests) and its GGUF weights; ``command`` says who refuses another
    kind of model."""
    manifest = store.manifest(name)
    store.verify(name, manifest)
    layer = manifest.layer(mt.MODEL)
    if layer is None or manifest.layer(mt.FILE) is not None:
        raise InvalidInput(f'"{name.display}" is not a GGUF model; {command} works on llama.cpp models')
    return manifest, layer


def own_type(store: Store, name: ModelName, advice: str = "") -> str:
    """The type ``name``'s weights are quantized back to after training, refused before any training when
    llama.cpp cannot write it."""
    qtype = quant.of_file_type(store.inspect(name).file_type)
    if qtype not in quant.FTYPES:
        raise InvalidInput(f'"{name.display}" is {qtype.upper()}, which llama.cpp cannot quantize back to{advice}')
    return qtype


def converter(work: Path) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` (``convert_lora_to_gguf.py`` lies beside it), unpacked under ``work``."""
    from slmops.store.sources import llama_converter

    return llama_converter(sys.executable, f"llama-cpp-python=={metadata.version('llama-cpp-python')}",
                           work / "converter")


def store_hf(store: Store, hf_dir: Path, qtype: str, what: str, work: Path,
             status: Status = lambda s: None) -> tuple[Layer, GGUFInfo]:
    """Convert ``hf_dir`` to float16 GGUF, quantize it to ``qtype`` into the store; call within ``store.writing()``."""
    from slmops.engine.llamacpp.bindings import quantize_file  # llama.cpp loads only to quantize
    from slmops.store.sources import to_gguf

    status("converting to GGUF with llama.cpp's converter")
    f16 = to_gguf(sys.executable, converter(work), hf_dir, work / f"{hf_dir.name}-f16.gguf", "f16", what)
    status(f"quantizing to {qtype.upper()}")
    return store.import_derived(lambda out: quantize_file(f16, out, quant.FTYPES[qtype], allow_requantize=False),
                                what)
