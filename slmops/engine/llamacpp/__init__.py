"""The llama.cpp backend: the only package that imports ``llama_cpp``.

:mod:`.bindings` wraps llama.cpp's C API (model, context, batch, memory, sampler chains, quantize);
:mod:`.model` loads a GGUF model and serves it as a :class:`slmops.engine.backend.BackendModel` with a batched
decoder; :mod:`.grammar` and :mod:`.gbnf` compile constraints to GBNF within safety limits; :mod:`.perplexity`
scores text for ``slmops eval``. Importing this package loads nothing native: the functions below do, when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slmops.engine.llamacpp.backend import LlamaCppBackend


def create_backend(verbose: bool | None = None) -> "LlamaCppBackend":
    from slmops.engine.llamacpp.backend import LlamaCppBackend

    return LlamaCppBackend(verbose)


def preload() -> None:
    """What a runner process imports as it starts, before it knows its model or engine config: llama.cpp's
    libraries, then this backend's modules. llama.cpp loads before anything imports numpy: with a CUDA build of
    llama.cpp, numpy's bundled OpenBLAS loaded first made every model load segfault (seen on an H100)."""
    import llama_cpp  # noqa: F401

    from slmops.engine.llamacpp import backend  # noqa: F401


def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can offload layers to a GPU; False when it is absent or broken."""
    try:
        import llama_cpp
        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001 - a broken or absent build simply cannot offload
        return False
