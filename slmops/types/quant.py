"""Quantization types by name, as ``llama-quantize`` and ``ollama create -q`` spell them, with llama.cpp's
``llama_ftype`` numbers (a stable enum of ``llama.h``), so settings and the deployment config can check a name
without loading llama.cpp.

Importance-matrix types (IQ*) are left out: they need calibration data slmops does not ship.
"""

from __future__ import annotations

from slmops.types.errors import InvalidInput

FTYPES: dict[str, int] = {
    "f32": 0, "f16": 1, "bf16": 32, "q8_0": 7,
    "q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13,
    "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
}
UNQUANTIZED = {"f32", "f16", "bf16"}
BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_1": 6, "q5_0": 5.5, "q5_k_m": 5.7,
        "q5_k_s": 5.5, "q4_1": 5, "q4_0": 4.5, "q4_k_m": 4.9, "q4_k_s": 4.6, "q3_k_l": 4.3, "q3_k_m": 3.9,
        "q3_k_s": 3.5, "q2_k": 3.4}  # bits per weight, the order quality follows


def parse(name: str) -> str:
    key = name.strip().lower()
    if key not in FTYPES:
        raise InvalidInput(f"unknown quantization type {name!r}; use one of {', '.join(FTYPES)}")
    return key


def of_file_type(file_type: str) -> str:
    """The type name of a GGUF's ``general.file_type`` as :mod:`slmops.store.gguf` reports it (``Q4_1``,
    ``ALL_F32``, ``F16``)."""
    key = file_type.lower().removeprefix("all_")
    return key if key in FTYPES else file_type.lower()


def is_quantized(file_type: str) -> bool:
    return of_file_type(file_type) not in UNQUANTIZED


def loses_nothing(source: str, target: str) -> bool:
    """Whether re-encoding ``source`` weights as ``target`` keeps them (within rounding): a type with at least as
    many bits per weight. Q4_1 → Q8_0 keeps quality; Q8_0 → Q4_0 does not."""
    return BITS.get(target, 0) >= BITS.get(of_file_type(source), 99)
