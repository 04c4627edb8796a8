"""What the server and a runner process say to each other: tagged msgpack structs, one per message kind.

Frames travel over a socket pair with ``multiprocessing.connection`` framing. Requests carry an ``id`` that the
replies name; a generation answers with one ``Piece`` per output, sent by the runner thread as it is sampled
(batching pieces per step through a writer thread cost more in hand-offs than it saved in writes). Errors cross as the class name from :mod:`slmops.types.errors` and the
one-line message, and are raised again on the server side as the same class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import msgspec

from slmops.engine.client import ModelSpec, ModelStatus, ModelUnloaded, Request
from slmops.engine.outputs import Output
from slmops.types import errors


class Load(msgspec.Struct, tag=True):
    id: int
    spec: ModelSpec
    options: dict[str, Any] | None = None


class Run(msgspec.Struct, tag=True):
    id: int
    spec: ModelSpec
    req: Request


class Cancel(msgspec.Struct, tag=True):
    id: int


class Embed(msgspec.Struct, tag=True):
    id: int
    spec: ModelSpec
    inputs: list[str]
    options: dict[str, Any] | None = None
    truncate: bool = True


class Tokenize(msgspec.Struct, tag=True):
    id: int
    spec: ModelSpec
    text: str


class Detokenize(msgspec.Struct, tag=True):
    id: int
    spec: ModelSpec
    tokens: list[int]


class Status(msgspec.Struct, tag=True):
    id: int


class Shutdown(msgspec.Struct, tag=True):
    """Finish the running requests, refuse new ones, exit."""

    id: int


class Piece(msgspec.Struct, tag=True):
    id: int
    out: Output


class Reply(msgspec.Struct, tag=True):
    id: int
    value: Any = None


class Statuses(msgspec.Struct, tag=True):
    id: int
    models: list[ModelStatus]


class Failure(msgspec.Struct, tag=True):
    id: int
    kind: str
    message: str


ToRunner = Load | Run | Cancel | Embed | Tokenize | Detokenize | Status | Shutdown
FromRunner = Piece | Reply | Statuses | Failure


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(f"cannot send {type(obj).__name__} to a runner")


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is Path:
        return Path(obj)
    raise NotImplementedError(f"cannot decode {kind}")


encode = msgspec.msgpack.Encoder(enc_hook=_enc_hook).encode
decode_to_runner = msgspec.msgpack.Decoder(ToRunner, dec_hook=_dec_hook).decode
decode_from_runner = msgspec.msgpack.Decoder(FromRunner, dec_hook=_dec_hook).decode


def _classes(cls: type[Exception]) -> Iterator[type[Exception]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _classes(sub)


_KNOWN: dict[str, type[Exception]] = {c.__name__: c for c in (*_classes(errors.SlmopsError), ModelUnloaded)}


def failure(req_id: int, err: BaseException) -> Failure:
    """An exception as it crosses the pipe: errors of the tree keep their class, anything else becomes an engine
    error (its message is llama.cpp's or Python's, never a traceback)."""
    kind = type(err).__name__
    if _KNOWN.get(kind) is not type(err):
        kind = "EngineError"
    return Failure(req_id, kind, str(err) or type(err).__name__)


def from_failure(f: Failure) -> Exception:
    """The exception a ``Failure`` stands for, carrying the runner's message as is."""
    cls = _KNOWN.get(f.kind, errors.EngineError)
    err = cls.__new__(cls)
    err.args = (f.message,)
    return err
