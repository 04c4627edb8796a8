"""Inference on llama.cpp: the adapter over llama.cpp's C API, the generation loop and the in-process Engine.

Knows nothing of HTTP; the server and CLI reach it through :class:`Engine`.
"""

from slmops.engine.engine import Engine, Request, spec_from_store
from slmops.engine.model import LoadedModel, ModelSpec
from slmops.engine.outputs import Output, Stats

__all__ = ["Engine", "LoadedModel", "ModelSpec", "Output", "Request", "Stats", "spec_from_store"]
