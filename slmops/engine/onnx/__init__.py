"""The ONNX Runtime GenAI backend: the only package that imports ``onnxruntime_genai`` or ``onnxruntime``.

:mod:`.providers` finds the execution providers present and orders them (NPU, GPU, CPU); :mod:`.model` loads a
model folder on the first that takes it; :mod:`.generate` runs its requests round-robin on one thread;
:mod:`.backend` compiles constraints for llguidance. The runtime is an optional extra: importing this package loads
nothing native, and without the extra :func:`create_backend` says how to install it.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import TYPE_CHECKING

from slmops.types.errors import EngineError

if TYPE_CHECKING:
    from slmops.engine.onnx.backend import OnnxBackend
    from slmops.engine.onnx.providers import Provider

MISSING = "this model is an ONNX Runtime GenAI model; install the extra with `pip install 'slmops[onnx]'`"


def installed() -> bool:
    """Whether the runtime is installed (found, not loaded)."""
    return find_spec("onnxruntime_genai") is not None


def create_backend(verbose: bool | None = None) -> "OnnxBackend":
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise EngineError(MISSING) from None
    from slmops.engine.onnx.backend import OnnxBackend

    return OnnxBackend(verbose)


def available_providers() -> "tuple[Provider, ...]":
    """The execution providers present here, in the order a model tries them (the CPU last). Not named
    ``providers``: that is the submodule's name, which importing it sets on this package."""
    from slmops.engine.onnx.providers import available

    return available()


def runtime_providers() -> tuple[str, ...]:
    """ONNX Runtime's own names for the providers present (``CUDAExecutionProvider``...), empty without it: what
    a hardware report lists, without importing the runtime anywhere else."""
    from slmops.engine.onnx.providers import runtime_providers

    return runtime_providers()
