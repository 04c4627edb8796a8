"""Variants of a catalog model and the choice among them: which build of a model suits this machine.

A catalog entry may list variants (``cpu-q4_1``, ``cpu-q8_0``, ``cuda-f16``, ``cpu-onnx-int4``), each for one
accelerator and model format, in the catalog's order of preference. One is the shipped file itself; the others are
derived from it on pull by quantizing (``quantize``) or exporting to ONNX Runtime GenAI (``export``), which the catalog only lists where it loses nothing that matters. The
deployment config (or ``SLMOPS_HARDWARE_PREFERRED``/``_FALLBACK``) orders accelerators, as the seed's
``preferred: npu, fallback: [gpu, cpu]``; the first accelerator this machine can use wins, and within it the first
variant whose CPU requirements are met. Every step is recorded as a reason, so ``show`` can say why.

Pure: what the machine offers comes in as :class:`Offer` (built from hardware detection by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from slmops.types.errors import InvalidInput

ACCELERATORS = ("npu", "gpu", "cpu")
FORMATS = ("gguf", "onnx")
ENGINE_MISSING = {"onnx": "ONNX Runtime GenAI is not installed (pip install 'slmops[onnx]')"}
DEFAULT_ORDER = ("npu", "gpu", "cpu")


@dataclass(frozen=True)
class Variant:
    name: str
    accelerator: str  # npu | gpu | cpu
    format: str = "gguf"  # gguf | onnx
    quantize: str | None = None  # derived from the shipped file by quantizing to this type; None: the file itself
    export: str | None = None  # an ONNX variant: exported from the shipped file at this precision (int4, int8, fp32)
    requires: tuple[str, ...] = ()  # CPU features it needs (e.g. avx2 for repacked kernels)
    description: str = ""

    @classmethod
    def parse(cls, name: str, data: Mapping[str, Any]) -> "Variant":
        acc = data.get("accelerator")
        if acc not in ACCELERATORS:
            raise InvalidInput(f"catalog variant {name}: accelerator must be one of {', '.join(ACCELERATORS)}")
        fmt = data.get("format", "gguf")
        if fmt not in FORMATS:
            raise InvalidInput(f"catalog variant {name}: format must be one of {', '.join(FORMATS)}")
        if (fmt == "onnx") != (data.get("export") is not None):
            raise InvalidInput(f"catalog variant {name}: an onnx variant is made by export (int4, int8 or fp32), "
                               "and only an onnx one")
        return cls(name=name, accelerator=acc, format=fmt, quantize=data.get("quantize"), export=data.get("export"),
                   requires=tuple(data.get("requires", ())), description=data.get("description", ""))


@dataclass(frozen=True)
class Offer:
    """What this machine can run: for each accelerator, ``None`` when usable, else why not; its CPU features;
    and the model formats the engine can load."""

    unavailable: Mapping[str, str | None]
    cpu_features: frozenset[str] = frozenset()
    formats: frozenset[str] = frozenset({"gguf"})

    def why_not(self, v: Variant) -> str | None:
        if v.format not in self.formats:
            return ENGINE_MISSING.get(v.format, f"slmops has no {v.format.upper()} engine")
        reason = self.unavailable.get(v.accelerator, f"no {v.accelerator.upper()} found")
        if reason:
            return reason
        missing = [f for f in v.requires if f not in self.cpu_features]
        return f"this CPU lacks {', '.join(missing)}" if missing else None


@dataclass(frozen=True)
class Choice:
    variant: Variant
    reasons: list[str] = field(default_factory=list)

    @property
    def why(self) -> str:
        return "; ".join(self.reasons)


def order(preferred: str | None, fallback: tuple[str, ...] | list[str] | None) -> list[str]:
    """Accelerators to try, in order; with nothing configured, the best first (npu, gpu, cpu)."""
    if not preferred and not fallback:
        return list(DEFAULT_ORDER)
    seq = ([preferred] if preferred else []) + list(fallback or ())
    for acc in seq:
        if acc not in ACCELERATORS:
            raise InvalidInput(f"unknown accelerator {acc!r}; use {', '.join(ACCELERATORS)}")
    return list(dict.fromkeys(seq))


def choose(model: str, variants: list[Variant], offer: Offer, accelerators: list[str],
           pinned: str | None = None) -> Choice:
    """The variant to pull for ``model``; raises when none of the allowed accelerators can run one."""
    if pinned is not None:
        v = next((x for x in variants if x.name == pinned), None)
        if v is None:
            raise InvalidInput(f"{model} has no variant {pinned!r}; choose one of {', '.join(x.name for x in variants)}")
        if v.format not in offer.formats:
            raise InvalidInput(f"variant {pinned} of {model} cannot run: {offer.why_not(v)}")
        why = offer.why_not(v)
        note = f" (note: {why})" if why else ""
        return Choice(v, [f"{v.name} pinned with --variant{note}"])
    reasons: list[str] = []
    for acc in accelerators:
        candidates = [v for v in variants if v.accelerator == acc]
        if not candidates:
            reasons.append(f"{acc}: {model} has no {acc} variant")
            continue
        for v in candidates:
            why = offer.why_not(v)
            if why is None:
                return Choice(v, reasons + [f"{v.name}: first {acc} variant this machine runs"])
            reasons.append(f"{v.name} skipped: {why}")
    tried = "; ".join(reasons)
    raise InvalidInput(f"no variant of {model} runs here with hardware order {', '.join(accelerators)} ({tried}); "
                       "add cpu to the fallback or pin one with --variant")


@dataclass(frozen=True)
class Derivation:
    """The variant a pull stores, why, and how to make it from the shipped file (``None``: the file itself)."""

    choice: Choice
    produce: Callable[[Path, Path], None] | None = None  # (plaintext source, output path)
    folder: bool = False  # ``produce`` writes a model folder (an ONNX export), not one GGUF file


class VariantPolicy(Protocol):
    """Chooses a variant for this machine; injected into :class:`Store` (built from hardware detection)."""

    def plan(self, model: str, variants: list[Variant], pinned: str | None) -> Derivation: ...
