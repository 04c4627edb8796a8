"""The variant policy of this machine: hardware detection feeds :func:`slmops.store.variants.choose`, and derived
variants are made with llama.cpp's quantizer or exported to ONNX Runtime GenAI. Injected into :class:`Store` by :func:`slmops.local.open_store`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from slmops.store.variants import Derivation, Offer, Variant, choose, order
from slmops.types import quant


class MachinePolicy:
    """``preferred``/``fallback``: the deployment config's hardware order (``SLMOPS_HARDWARE_*``); ``probe``:
    hardware detection, called only when a pull has variants to choose from."""

    def __init__(self, preferred: str | None = None, fallback: tuple[str, ...] = (),
                 probe: Callable[[], Offer] | None = None, quantization: str = "auto"):
        """``quantization`` (the deployment config's): prefer variants of that type among those allowed."""
        self.accelerators = order(preferred, fallback)
        self._probe = probe or _detect_offer
        self.quantization = quantization

    def plan(self, model: str, variants: list[Variant], pinned: str | None) -> Derivation:
        offer = self._probe()
        if self.quantization != "auto" and pinned is None:
            typed = [v for v in variants if (v.quantize or v.name.rsplit("-", 1)[-1]) == self.quantization]
            variants = [v for v in typed if offer.why_not(v) is None] or variants
        choice = choose(model, variants, offer, self.accelerators, pinned)
        v = choice.variant
        if v.export is not None:
            return Derivation(choice, _exporter(v.export), folder=True)
        return Derivation(choice, _quantizer(quant.parse(v.quantize)) if v.quantize else None)


def _detect_offer() -> Offer:
    from slmops.ops.hw import detect, offer
    return offer(detect())


def _quantizer(qtype: str) -> Callable[[Path, Path], None]:
    """The catalog vouches for its derived variants, so requantizing the shipped file is allowed here."""
    def produce(src: Path, out: Path) -> None:
        from slmops.engine.llamacpp.bindings import quantize_file
        quantize_file(src, out, quant.FTYPES[qtype], allow_requantize=True)
    return produce


def _exporter(precision: str) -> Callable[[Path, Path], None]:
    def produce(src: Path, out: Path) -> None:
        from slmops.ops.onnx_export import export
        export(src, out, precision=precision)
    return produce
