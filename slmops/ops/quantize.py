"""Quantize a stored model into a new one with llama.cpp's quantizer; the source stays as it was.

Requantizing (a source that is already quantized, such as the shipped Q4_1) compounds rounding errors, so it takes
an explicit ``allow_requantize`` and comes with a warning; going to a type with at least as many bits per weight
(Q4_1 → Q8_0) keeps quality, which ``slmops eval`` can show. The output is written through
:meth:`Store.import_derived`: in memory for a sealed store, and sealed on its way in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slmops.store import manifests as mt
from slmops.store.gguf import GGUFInfo
from slmops.store.manifests import Layer, Manifest
from slmops.store.store import Store
from slmops.types import quant
from slmops.types.errors import InvalidInput
from slmops.types.name import ModelName

TensorProgress = Callable[[int, int], None]
Warn = Callable[[str], None]


def check(source_type: str, qtype: str, allow_requantize: bool) -> str | None:
    """Refuse a requantize that was not asked for; return the warning for one that was."""
    if not quant.is_quantized(source_type):
        return None
    if not allow_requantize:
        raise InvalidInput(f"the source is already quantized ({source_type}) and requantizing loses quality; pass "
                           "--allow-requantize to do it anyway, or start from an F16 or F32 model")
    if quant.loses_nothing(source_type, qtype):
        return f"requantizing {source_type} to {qtype.upper()}: more bits per weight, so only rounding is lost"
    return (f"requantizing {source_type} to {qtype.upper()} compounds rounding errors; check the result with "
            "`slmops eval NEW --baseline SOURCE`")


def quantize_layer(store: Store, layer: Layer, info: GGUFInfo, qtype: str, allow_requantize: bool,
                   what: str, progress: TensorProgress | None = None,
                   warn: Warn | None = None) -> tuple[Layer, GGUFInfo]:
    """A new model layer holding ``layer``'s model quantized to ``qtype``."""
    # llama.cpp loads only when a model is quantized
    from slmops.engine.llamacpp.bindings import quantize_file

    qtype = quant.parse(qtype)
    note = check(info.file_type, qtype, allow_requantize)
    if note and warn:
        warn(note)
    with store.blobs.plain(layer.blob, f"model of {what}") as src:
        def produce(out: Path) -> None:
            quantize_file(src, out, quant.FTYPES[qtype], allow_requantize, progress)
        return store.import_derived(produce, what)


def quantize_model(store: Store, src: ModelName, dst: ModelName, qtype: str, allow_requantize: bool = False,
                   progress: TensorProgress | None = None, warn: Warn | None = None) -> Manifest:
    """``dst``: ``src`` with its weights quantized; template, system, parameters, messages and licence kept."""
    if src == dst:
        raise InvalidInput(f"quantize writes a new model; give a name other than {src.display} with -o")
    manifest = store.manifest(src)
    store.verify(src, manifest)  # a damaged or untrusted source is not a starting point
    model = manifest.layer(mt.MODEL)
    if model is None:
        raise InvalidInput(f'"{src.display}" has no model layer')
    with store.writing():
        new, info = quantize_layer(store, model, store.inspect(src), qtype, allow_requantize, dst.display,
                                   progress, warn)
        layers = [new if layer.media_type == mt.MODEL else layer for layer in manifest.layers]
        config = store.config_layer(info, layers, {"quantized_from": src.display})
        return store.write_manifest(dst, layers, config)
