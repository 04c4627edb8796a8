"""A device's hardware class, and which of a release's variants suits it.

The class is ``<accelerator>-<arch>``, read from the profile the device sent at enrolment (what ``slmops hw
--json`` prints: :meth:`slmops.ops.hw.Hardware.to_json`, bare or under a ``hardware`` key):

- accelerator: ``cuda`` when an NVIDIA GPU is listed and this llama.cpp build offloads to a GPU; ``gpu`` for
  another GPU with offload; ``npu`` when ONNX Runtime reports one of :data:`slmops.ops.hw.NPU_PROVIDERS`;
  else ``cpu``. A GPU the build cannot use counts for nothing: the device would run the model on its CPU.
- arch: the CPU architecture with its aliases folded (``amd64``/``x64`` -> ``x86_64``, ``arm64`` ->
  ``aarch64``), so a Mac, a Windows box and a Linux one of the same kind share a class; ``unknown`` when absent.

An operator's ``class`` tag overrides the profile (same charset as tag keys), for boards the profile misreads.
The profile comes from the device over the wire, so odd shapes give ``cpu-unknown`` rather than an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from slmops.api.fleet import TAG_RE
from slmops.ops.hw import NPU_PROVIDERS
from slmops.types.errors import InvalidInput

CLASS_TAG = "class"
ANY = "*"
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "x86-64": "x86_64", "i386": "x86", "i686": "x86",
                 "arm64": "aarch64", "armv8": "aarch64", "aarch64_be": "aarch64"}
_ARCH_RE = re.compile(r"^[a-z0-9_]{1,32}$")


def hardware_class(profile: Mapping[str, Any], tags: Mapping[str, Any]) -> str:
    """The device's class: the ``class`` tag when set, else ``<accelerator>-<arch>`` from ``profile``."""
    override = tags.get(CLASS_TAG) if tags else None
    if override is not None:
        return check_class(override)
    hw = profile.get("hardware") if isinstance(profile.get("hardware"), Mapping) else profile
    return f"{_accelerator(hw)}-{_arch(hw)}"


def check_class(value: Any) -> str:
    """``value`` when it is a usable class name (the tag grammar), else :class:`InvalidInput`."""
    if not isinstance(value, str) or not TAG_RE.match(value):
        raise InvalidInput(f"tag {CLASS_TAG}: {value!r} is not a hardware class; use lowercase letters, digits and "
                           "._/- (64 at most), such as cuda-x86_64")
    return value


def pick_variant(device_class: str, keys: Sequence[str]) -> str | None:
    """The variant key for ``device_class`` among ``keys``: the exact class (``cuda-x86_64``), else its accelerator
    (``cuda``, the part before the first ``-``), else ``*``, else None (the release has nothing for it)."""
    accelerator = device_class.partition("-")[0]
    for wanted in (device_class, accelerator, ANY):
        if wanted in keys:
            return wanted
    return None


def _accelerator(hw: Mapping[str, Any]) -> str:
    gpus = [g for g in _list(hw.get("gpus")) if isinstance(g, Mapping)]
    if gpus and hw.get("llama_gpu_offload") is True:
        return "cuda" if any(_nvidia(g) for g in gpus) else "gpu"
    providers = _list(hw.get("onnx_providers"))
    if any(p in NPU_PROVIDERS for p in providers if isinstance(p, str)):
        return "npu"
    return "cpu"


def _nvidia(gpu: Mapping[str, Any]) -> bool:
    vendor, name = gpu.get("vendor"), gpu.get("name")
    return (isinstance(vendor, str) and vendor.lower() == "nvidia") or \
        (isinstance(name, str) and "nvidia" in name.lower())


def _arch(hw: Mapping[str, Any]) -> str:
    cpu = hw.get("cpu")
    raw = cpu.get("architecture") if isinstance(cpu, Mapping) else None
    if not isinstance(raw, str):
        return "unknown"
    arch = raw.strip().lower()
    arch = _ARCH_ALIASES.get(arch, arch)
    if arch.startswith(("armv6", "armv7")):
        arch = arch[:5]  # armv7l, armv7hl: one class
    return arch if _ARCH_RE.match(arch) else "unknown"


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []
