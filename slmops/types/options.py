"""Ollama's generation options: names, types and defaults (Ollama ``api/types.go`` ``DefaultOptions``).

Options arrive from Modelfile PARAMETERs, request ``options`` and ``/set parameter``; they are layered
(model params, then request) and split into what needs a context (:class:`LoadParams`) and what only the sampler
needs (:class:`SamplingParams`). Unknown names are an error naming the valid ones, except in requests to the
server, which drop them as Ollama does (:func:`split_unknown`); Ollama options that llama.cpp on this build does
not use (``main_gpu``, ``mirostat`` ...) are accepted and reported back as ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from slmops.types.errors import InvalidOption

_INT, _FLOAT, _BOOL, _STRS = int, float, bool, list

SAMPLING: dict[str, tuple[type, Any]] = {
    "temperature": (_FLOAT, 0.8),
    "top_k": (_INT, 40),
    "top_p": (_FLOAT, 0.9),
    "min_p": (_FLOAT, 0.0),
    "typical_p": (_FLOAT, 1.0),
    "repeat_penalty": (_FLOAT, 1.1),
    "repeat_last_n": (_INT, 64),
    "presence_penalty": (_FLOAT, 0.0),
    "frequency_penalty": (_FLOAT, 0.0),
    "seed": (_INT, -1),
    "stop": (_STRS, []),
    "num_predict": (_INT, -1),
}
LOAD: dict[str, tuple[type, Any]] = {
    "num_ctx": (_INT, 0),  # 0: the server's SLMOPS_CONTEXT_LENGTH
    "num_batch": (_INT, 512),
    "num_thread": (_INT, 0),  # 0: physical cores
    "num_gpu": (_INT, -1),  # layers offloaded to the GPU; -1: what the server's placement chose
}
ACCEPTED_IGNORED: dict[str, type] = {
    "num_keep": _INT, "main_gpu": _INT, "use_mmap": _BOOL, "use_mlock": _BOOL, "numa": _BOOL,
    "low_vram": _BOOL, "vocab_only": _BOOL, "f16_kv": _BOOL, "logits_all": _BOOL, "penalize_newline": _BOOL,
    "tfs_z": _FLOAT, "mirostat": _INT, "mirostat_tau": _FLOAT, "mirostat_eta": _FLOAT,
}
KNOWN = {**{k: t for k, (t, _) in SAMPLING.items()}, **{k: t for k, (t, _) in LOAD.items()}, **ACCEPTED_IGNORED}


def physical_cores() -> int:
    import psutil  # the machine's cores matter only where a model runs

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _coerce(name: str, kind: type, value: Any) -> Any:
    """Accept what JSON clients and Modelfiles send: numbers as strings, one stop string or a list."""
    try:
        if kind is _STRS:
            if isinstance(value, str):
                return [value]
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
            raise TypeError
        if kind is _BOOL:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise TypeError
        if isinstance(value, bool):
            raise TypeError
        if kind is _INT:
            number = float(value)
            if number != int(number):
                raise TypeError
            return int(number)
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise TypeError
        return number
    except (TypeError, ValueError, OverflowError):  # OverflowError: 1e999 parses as infinity
        what = {_INT: "an integer", _FLOAT: "a number", _BOOL: "true or false", _STRS: "a string or list of strings"}
        raise InvalidOption(f'option "{name}" must be {what[kind]}, got {value!r}'[:300]) from None


def split_unknown(options: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the options this engine knows, the names it does not). Request options from clients are read as Ollama
    reads them: an unknown name is ignored (clients send options of newer or other servers), while a Modelfile
    or the CLI's ``/set parameter`` still refuses one, where it is a typo someone can fix."""
    known = {k: v for k, v in options.items() if k in KNOWN}
    return known, [k for k in options if k not in KNOWN]


def validate(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Check names and types; returns (typed options, names accepted but ignored)."""
    out: dict[str, Any] = {}
    ignored: list[str] = []
    for name, value in (options or {}).items():
        kind = KNOWN.get(name)
        if kind is None:
            raise InvalidOption(f'unknown option "{name}"; valid options: {", ".join(sorted(KNOWN))}'[:400])
        if value is None:
            continue
        out[name] = _coerce(name, kind, value)
        if name in ACCEPTED_IGNORED:
            ignored.append(name)
    return out, ignored


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1
    stop: tuple[str, ...] = field(default_factory=tuple)
    num_predict: int = -1
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob plus the k most likely


KV_TYPES = ("f16", "q8_0")


@dataclass(frozen=True)
class LoadParams:
    """What a llama.cpp context is built with; the server's placement gives the defaults, a request may override
    the first four."""

    num_ctx: int
    num_batch: int = 512
    num_thread: int = 0
    num_gpu: int = 0  # layers offloaded to the GPU (a number past the layer count offloads all)
    kv_type: str = "f16"  # KV cache element type: f16, or q8_0 to halve its memory

    @property
    def threads(self) -> int:
        return self.num_thread or physical_cores()


def merge(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later layers win; every layer is validated."""
    out: dict[str, Any] = {}
    for layer in layers:
        typed, _ = validate(layer)
        out.update(typed)
    return out


def to_sampling(options: Mapping[str, Any], logprobs: int | None = None) -> SamplingParams:
    values = {k: options[k] for k in SAMPLING if k in options}
    if "stop" in values:
        values["stop"] = tuple(s for s in values["stop"] if s)
    params = SamplingParams(**values, logprobs=logprobs)
    _check_ranges(params)
    return params


def to_load(options: Mapping[str, Any], base: LoadParams, max_ctx: int) -> LoadParams:
    """``base``: the engine's defaults (placement and settings); request or Modelfile options override them."""
    num_ctx = options.get("num_ctx") or base.num_ctx
    if num_ctx < 16:
        raise InvalidOption(f"num_ctx must be at least 16, got {num_ctx}")
    num_ctx = min(num_ctx, max_ctx)
    batch = options.get("num_batch", base.num_batch)
    if batch < 1:
        raise InvalidOption(f"num_batch must be at least 1, got {batch}")
    threads = options.get("num_thread", base.num_thread)
    if not 0 <= threads <= 1024:
        raise InvalidOption(f"num_thread must be between 0 and 1024, got {threads}")
    gpu = options.get("num_gpu", -1)
    if gpu < -1:
        raise InvalidOption(f"num_gpu must be -1 (the server's choice), 0 or a number of layers, got {gpu}")
    return replace(base, num_ctx=num_ctx, num_batch=min(batch, num_ctx), num_thread=threads,
                   num_gpu=base.num_gpu if gpu == -1 else gpu)


def _check_ranges(p: SamplingParams) -> None:
    if p.temperature < 0:
        raise InvalidOption("temperature must be 0 or more")
    if not 0 <= p.top_p <= 1 or not 0 <= p.min_p <= 1:
        raise InvalidOption("top_p and min_p must be between 0 and 1")
    if p.repeat_penalty <= 0:
        raise InvalidOption("repeat_penalty must be greater than 0")
    if p.repeat_last_n < -1:
        raise InvalidOption("repeat_last_n must be -1 (whole context), 0 (off) or more")
    if p.num_predict < -2:
        raise InvalidOption("num_predict must be -1 (until done), -2 (fill context) or more")


def sampling_fields() -> list[str]:
    return [f.name for f in fields(SamplingParams)]
