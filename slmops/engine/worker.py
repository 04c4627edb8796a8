"""A runner process: one model's in-process :class:`Engine`, served over the socket the server handed it.

Started by :class:`slmops.engine.process.RunnerProcess` as ``python -c "... preload(); ... main(sys.argv)" FD NAME``
(the backend's libraries load before numpy; see ``process._BOOT``); its engine config is the first frame on the
socket, so a runner can start before the server has read its settings. The reading thread never blocks on model
work, so cancels and status queries are answered while requests run. Prompt preparation and other calls run on
short-lived threads; generated pieces are sent by the batching runner's own thread the moment they are sampled (one
small write, no thread hand-off: measured, each hand-off cost more than the write). When the server goes away the
socket closes and the process exits.
"""

from __future__ import annotations

import os
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable

import msgspec

from slmops.engine import messages as msg
from slmops.engine.client import EngineConfig, ModelUnloaded


class Worker:
    def __init__(self, conn: Connection, engine: Any):
        self.conn = conn
        self.engine = engine
        self._send_lock = threading.Lock()
        self._cancels: dict[int, Callable[[], None] | None] = {}  # None: starting, not cancellable yet
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._closing = False

    def serve(self) -> None:
        while True:
            try:
                m = msg.decode_to_runner(self.conn.recv_bytes())
            except (EOFError, OSError):
                os._exit(0)  # the server is gone: nothing left to serve
            self._dispatch(m)

    def _dispatch(self, m: msg.ToRunner) -> None:
        if isinstance(m, msg.Cancel):
            self._cancel(m.id)
        elif isinstance(m, msg.Status):
            self._send(msg.Statuses(m.id, self.engine.loaded()))
        elif self._closing:
            self._send(msg.failure(m.id, ModelUnloaded("the runner is shutting down")))
        elif isinstance(m, msg.Shutdown):
            self._closing = True
            self._spawn(self._shutdown, m.id)
        elif isinstance(m, msg.Run):
            with self._lock:
                self._cancels[m.id] = None
            self._spawn(self._run, m)
        else:
            self._spawn(self._call, m.id, self._handler(m))

    def _handler(self, m: msg.ToRunner) -> Callable[[], Any]:
        e = self.engine
        if isinstance(m, msg.Load):
            return lambda: e.load(m.spec, m.options)
        if isinstance(m, msg.Embed):
            return lambda: e.embed(m.spec, m.inputs, m.options, m.truncate)
        if isinstance(m, msg.Tokenize):
            return lambda: e.tokenize(m.spec, m.text)
        if isinstance(m, msg.Detokenize):
            return lambda: e.detokenize(m.spec, m.tokens)
        raise TypeError(f"unexpected message {type(m).__name__}")

    @staticmethod
    def _spawn(fn: Callable[..., None], *args: Any) -> None:
        threading.Thread(target=fn, args=args, daemon=True).start()

    def _send(self, frame: msg.FromRunner) -> None:
        data = msg.encode(frame)
        try:
            with self._send_lock:
                self.conn.send_bytes(data)
        except OSError:
            os._exit(0)  # the server is gone

    def _call(self, req_id: int, fn: Callable[[], Any]) -> None:
        try:
            reply: msg.FromRunner = msg.Reply(req_id, fn())
        except BaseException as err:
            reply = msg.failure(req_id, err)
        self._send(reply)

    def _run(self, m: msg.Run) -> None:
        def emit(item: object) -> None:  # on the batching runner's thread
            if isinstance(item, BaseException):
                self._forget(m.id)
                self._send(msg.failure(m.id, item))
            else:
                if item.done:
                    self._forget(m.id)
                self._send(msg.Piece(m.id, item))
        try:
            cancel = self.engine.start(m.spec, m.req, emit)
        except BaseException as err:
            self._forget(m.id)
            self._send(msg.failure(m.id, err))
            return
        with self._lock:
            if m.id in self._cancelled:
                self._cancelled.discard(m.id)
                self._cancels.pop(m.id, None)
            elif m.id in self._cancels:
                self._cancels[m.id] = cancel
                return
            else:
                return  # already finished
        cancel()

    def _cancel(self, req_id: int) -> None:
        with self._lock:
            fn = self._cancels.get(req_id)
            if fn is None:
                if req_id in self._cancels:
                    self._cancelled.add(req_id)  # still preparing: _run cancels it once it has started
                return
            del self._cancels[req_id]
        fn()

    def _forget(self, req_id: int) -> None:
        with self._lock:
            self._cancels.pop(req_id, None)

    def _shutdown(self, req_id: int) -> None:
        self.engine.close()
        self._send(msg.Reply(req_id))
        os._exit(0)


def main(argv: list[str]) -> None:
    """``argv``: the socket's file descriptor (and a name for ``ps``). Everything is imported before the engine
    config is read from the socket, so a runner started ahead of its config (``spawn.boot``) only loads."""
    from slmops.engine.engine import Engine

    conn = Connection(int(argv[1]))
    try:
        config = msgspec.json.decode(conn.recv_bytes(), type=EngineConfig)
    except (EOFError, OSError):
        os._exit(0)  # the server went away before it needed this runner
    Worker(conn, Engine(config)).serve()


if __name__ == "__main__":
    main(sys.argv)
