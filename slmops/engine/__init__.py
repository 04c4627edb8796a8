"""Inference: the ``Backend`` protocol (:mod:`.backend`) with llama.cpp as its implementation (:mod:`.llamacpp`,
the only package that imports llama.cpp's bindings), the batching runner, the in-process Engine and the runner
processes the server uses.

Knows nothing of HTTP; the server and CLI reach it through the ``EngineClient`` protocol (:mod:`.client`).
Names are imported lazily so that a parent process that only talks to runners never loads llama.cpp.
"""

from importlib import import_module

_HOMES = {"Engine": "engine", "LoadedModel": "model", "ModelSpec": "client", "Request": "client",
          "EngineConfig": "client", "EngineClient": "client", "spec_from_store": "client", "Output": "outputs",
          "Stats": "outputs", "ProcessEngine": "process"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(name)
    return getattr(import_module(f"slmops.engine.{_HOMES[name]}"), name)
