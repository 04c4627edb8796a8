"""The server's engine: each loaded model runs in its own runner process (:mod:`slmops.engine.worker`).

A native crash in the backend (llama.cpp: a segfault, an abort) ends only that process. Its in-flight requests fail
with a :class:`RunnerCrashed` that names the signal; other models keep serving, and the next request for the model
starts a fresh runner. Eviction asks a runner to finish its running requests and exit, as unloading does in process.
The parent never loads a backend: it forwards requests and dispatches replies from one reading thread per runner.
A runner's engine config is the first message it reads, so one can start before the config is known: ``slmops
serve`` boots its first runner (:func:`slmops.engine.spawn.boot`) before it imports anything else, and the first
runner it needs takes that process over.
"""

from __future__ import annotations

import itertools
import queue
import signal
import threading
from collections import OrderedDict
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterator

import msgspec

from slmops.engine import messages as msg
from slmops.engine.client import (Cancel, Emit, EngineConfig, ModelSpec, ModelStatus, ModelUnloaded, Request,
                                  stream_from, until_loaded, until_loaded_call)
from slmops.engine.outputs import Output
from slmops.engine.spawn import SPARE, claim_or_spawn
from slmops.types.errors import EngineError, InvalidInput, RunnerCrashed, RunnerOutOfMemory


def _how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _crashed(name: str, code: int) -> RunnerCrashed:
    """What a runner's requests fail with when it dies. SIGKILL, which nothing in slmops sends a runner, is on
    Linux most often the kernel's OOM killer: counted as out of memory, so a fleet's OOM gate sees it."""
    if code == -signal.SIGKILL:
        return RunnerOutOfMemory(f'the runner for model "{name}" stopped (killed by SIGKILL: most likely out of '
                                 "memory) and its requests failed; free memory or lower num_ctx/num_parallel, then "
                                 "send the request again")
    return RunnerCrashed(f'the runner for model "{name}" stopped ({_how_it_ended(code)}) and its requests failed; '
                         "send the request again to restart it")


class RunnerProcess:
    """One runner process and the pipe to it. Thread-safe: many requests share the pipe, each under its id."""

    def __init__(self, name: str, config: EngineConfig):
        self.name = name
        self.proc, ours = claim_or_spawn(name)
        self.conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._pending: dict[int, Emit] = {}  # request id -> where its replies go (called on the reading thread)
        self._ids = itertools.count(1)
        self.ended: Exception | None = None
        self.shutting_down = False
        try:
            self.conn.send_bytes(msgspec.json.encode(config))  # what the runner waits for once it has imported
        except OSError:
            pass  # it has exited: the reading thread reports how
        threading.Thread(target=self._read, name=f"runner-{name}", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self.ended is None

    # -- requests ------------------------------------------------------------------------------------------
    def call(self, make: Callable[[int], msg.ToRunner], timeout: float | None = None) -> Any:
        """Send one request and wait for its single reply."""
        inbox: queue.Queue = queue.Queue()
        req_id = self._open(inbox.put)
        try:
            self._send(make(req_id))
            item = inbox.get(timeout=timeout)
        finally:
            self._pending.pop(req_id, None)
        if isinstance(item, BaseException):
            raise item
        return item

    def send(self, make: Callable[[int], msg.ToRunner]) -> None:
        """Send one request whose reply nobody waits for (a load begun ahead: a later load of the same model
        waits for it in the runner, and reports any error itself)."""
        req_id = self._open(lambda item: self._pending.pop(req_id, None))
        self._try_send(make(req_id))

    def start(self, spec: ModelSpec, req: Request, emit: Emit) -> Cancel:
        """Send a generation; its pieces reach ``emit`` on the reading thread as they arrive."""
        def deliver(item: object) -> None:
            if isinstance(item, BaseException) or getattr(item, "done", False):
                self._pending.pop(req_id, None)
            emit(item)

        req_id = self._open(deliver)
        try:
            self._send(msg.Run(req_id, spec, req))
        except BaseException:
            self._pending.pop(req_id, None)
            raise

        def cancel() -> None:
            if self._pending.pop(req_id, None) is not None and self.alive:
                self._try_send(msg.Cancel(req_id))
        return cancel

    def status(self) -> list[ModelStatus]:
        try:
            models = self.call(msg.Status, timeout=5).models
        except (queue.Empty, EngineError, ModelUnloaded):
            return []
        return [replace(m, pid=self.proc.pid) for m in models]

    def shutdown(self) -> None:
        """Let running requests finish, then wait for the process to exit."""
        self.shutting_down = True
        if self.alive:
            try:
                self.call(msg.Shutdown)
            except (EngineError, ModelUnloaded):
                pass
        self.proc.wait()

    # -- plumbing ------------------------------------------------------------------------------------------
    def _open(self, deliver: Emit) -> int:
        if self.ended is not None:
            raise self.ended
        req_id = next(self._ids)
        self._pending[req_id] = deliver
        if self.ended is not None:  # ended while registering: the reader may have missed this request
            self._pending.pop(req_id, None)
            raise self.ended
        return req_id

    def _send(self, m: msg.ToRunner) -> None:
        try:
            data = msg.encode(m)
        except OverflowError:
            raise InvalidInput("the request holds an integer too large to be a token, option or count") from None
        try:
            with self._send_lock:
                self.conn.send_bytes(data)
        except OSError:
            raise self.ended or ModelUnloaded(self.name) from None

    def _try_send(self, m: msg.ToRunner) -> None:
        try:
            self._send(m)
        except (EngineError, ModelUnloaded):
            pass

    def _read(self) -> None:
        try:
            while True:
                reply = msg.decode_from_runner(self.conn.recv_bytes())
                if isinstance(reply, msg.Piece):
                    self._deliver(reply.id, reply.out)
                elif isinstance(reply, msg.Failure):
                    self._deliver(reply.id, msg.from_failure(reply))
                else:
                    self._deliver(reply.id, reply)
        except (EOFError, OSError):
            pass
        code = self.proc.wait()
        self.ended = ModelUnloaded(self.name) if self.shutting_down else _crashed(self.name, code)
        for deliver in list(self._pending.values()):
            deliver(self.ended)
        self.conn.close()

    def _deliver(self, req_id: int, item: Any) -> None:
        deliver = self._pending.get(req_id)
        if deliver is not None:
            deliver(item.value if isinstance(item, msg.Reply) else item)


class ProcessEngine:
    """An ``EngineClient`` with one runner process per loaded model, at most ``max_loaded`` of them (LRU)."""

    def __init__(self, config: EngineConfig, start: Callable[[str, EngineConfig], RunnerProcess] = RunnerProcess):
        self.config = config
        self._start = start
        self._runners: OrderedDict[str, RunnerProcess] = OrderedDict()
        self._spare: RunnerProcess | None = None
        self._spare_used = False
        self._lock = threading.Lock()

    def prestart(self, spec: ModelSpec | None = None) -> None:
        """Start a runner before any model needs one (as the server starts): the first model then skips the
        process start and imports (about half a second here) and only loads. One spare at most, never replaced
        once a model has taken it, so an idle server holds one small process more, not one per model. With
        ``spec`` (the model the server loads at start), its own runner starts and begins loading it at once."""
        with self._lock:
            if spec is not None and spec.name not in self._runners:
                runner = self._runners[spec.name] = self._start(spec.name, self.config)
                runner.send(lambda i: msg.Load(i, spec, None))
            elif spec is None and self._spare is None and not self._spare_used:
                self._spare = self._start(SPARE, self.config)

    def _runner(self, name: str) -> RunnerProcess:
        with self._lock:
            runner = self._runners.get(name)
            if runner is not None and runner.alive and not runner.shutting_down:
                self._runners.move_to_end(name)
                return runner
            self._runners.pop(name, None)
            while len(self._runners) >= self.config.max_loaded:
                _, old = self._runners.popitem(last=False)
                old.shutdown()
            spare, self._spare = self._spare, None
            self._spare_used = self._spare_used or spare is not None
            if spare is not None and spare.alive:
                spare.name = name
                runner = spare
            else:
                runner = self._start(name, self.config)
            self._runners[name] = runner
            return runner

    def _retrying(self, name: str, fn: Callable[[RunnerProcess], Any]) -> Any:
        """A runner evicted between lookup and request answers ModelUnloaded: start it again (a crash is not
        retried: the request may be what crashed it)."""
        return until_loaded_call(name, lambda: fn(self._runner(name)))

    def load(self, spec: ModelSpec, options: dict[str, Any] | None = None) -> int:
        return self._retrying(spec.name, lambda r: r.call(lambda i: msg.Load(i, spec, options)))

    def run(self, spec: ModelSpec, req: Request) -> Iterator[Output]:
        return until_loaded(spec.name, lambda: stream_from(lambda emit: self.start(spec, req, emit)))

    def start(self, spec: ModelSpec, req: Request, emit: Emit) -> Cancel:
        return self._runner(spec.name).start(spec, req, emit)

    def embed(self, spec: ModelSpec, inputs: list[str], options: dict[str, Any] | None = None,
              truncate: bool = True) -> tuple[list[list[float]], int, int]:
        return tuple(self._retrying(  # msgpack hands back the tuple as a list
            spec.name, lambda r: r.call(lambda i: msg.Embed(i, spec, inputs, options, truncate))))

    def tokenize(self, spec: ModelSpec, text: str) -> list[int]:
        return self._retrying(spec.name, lambda r: r.call(lambda i: msg.Tokenize(i, spec, text)))

    def detokenize(self, spec: ModelSpec, tokens: list[int]) -> str:
        return self._retrying(spec.name, lambda r: r.call(lambda i: msg.Detokenize(i, spec, tokens)))

    def loaded(self) -> list[ModelStatus]:
        with self._lock:
            runners = [r for r in self._runners.values() if r.alive and not r.shutting_down]
        return [m for r in runners for m in r.status()]

    def unload(self, name: str) -> bool:
        with self._lock:
            runner = self._runners.pop(name, None)
        if runner is None or not runner.alive:
            return False
        had_model = bool(runner.status())
        runner.shutdown()
        return had_model

    def close(self) -> None:
        with self._lock:
            spare, self._spare, self._spare_used = self._spare, None, True
        if spare is not None:
            spare.shutdown()
        for name in list(self._runners):
            self.unload(name)

