"""The HTTP transport registry clients use: httpx's own, with socket reads of up to 1 MiB, and a blob's body read
straight from the socket over plain HTTP.

httpcore reads 64 KiB at a time; a model blob is hundreds of MiB, and each read is a trip through h11, httpx and
the pull's queue. Reading up to 1 MiB cut a 98 MB loopback pull's receive work by about a third (measured with
``bench/pull_bench.py``). Everything else — TLS, pooling, timeouts, how httpx maps errors — is httpx's.

Each read then passes through about five fresh 1 MiB buffers (the socket read, h11's buffer and slices of it,
httpcore's copy), freed when the pull's threads are done with them. glibc's malloc, until its thresholds have
risen, hands such memory back to the kernel and faults it in again on the next read: ~20,000 page faults in a
98 MB pull in a fresh process, some 40 ms on 2 cores. :func:`keep_freed_memory` sets the thresholds where glibc's
dynamic tuning takes them itself once a 32 MiB block is freed, and the faults are gone.

Even so, h11 and httpcore copy every MiB about four times: receiving took 31–43 ms of CPU for a 98 MB blob
through httpx against 18–22 ms with bare ``recv``, CPU the hash and write threads need on 2 cores. Over plain HTTP
the stream therefore reads each response's head exactly — it peeks at the socket for the blank line that ends the
headers and takes no byte past it — so that :func:`iter_body` can hand a body with a ``Content-Length`` straight
from the socket to the caller: a whole loopback pull went from 0.73x to 0.85x of curl (``bench/pull_bench.py``).
h11 never sees those bytes, so that connection is closed with the response, not reused. Over TLS, or where a head
did not arrive in one piece, the body goes through httpx as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import socket
import ssl
import typing
from typing import Iterator

import httpcore
import httpx

READ_BYTES = 1 << 20
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)  # httpx's defaults
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
HEAD_PEEK = 64 << 10  # a response head longer than this goes through h11 as usual


@functools.cache
def keep_freed_memory() -> None:
    """Once per process, glibc's ``mallopt``: blocks under 32 MiB come from the heap, and up to 64 MiB of freed
    heap stay mapped for reuse. These are the ceilings of glibc's own dynamic thresholds (``mallopt(3)``), which
    a process reaches anyway once it frees a block of 32 MiB; setting them up front only skips the faults until
    then. Elsewhere (musl, macOS) nothing happens."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        mallopt = ctypes.CDLL(None).mallopt
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
        mallopt(M_TRIM_THRESHOLD, 64 << 20)


class _BulkStream(httpcore.NetworkStream):
    """An httpcore stream reading 1 MiB at a time, which over plain HTTP reads each response's head exactly (see
    the module's docstring): ``head_exact`` tells whether the last response's body is still all in the socket."""

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner
        sock = inner.get_extra_info("socket")
        self.socket: socket.socket | None = None if isinstance(sock, ssl.SSLSocket) else sock
        self._head_next = False
        self.head_exact = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._head_next and self.socket is not None:
            self._head_next = False
            try:
                self.socket.settimeout(timeout)
                seen = self.socket.recv(HEAD_PEEK, socket.MSG_PEEK)
                end = seen.find(b"\r\n\r\n")
                self.head_exact = end >= 0 and seen[9:10] != b"1"  # not a 1xx: the final head comes later
                return self.socket.recv(end + 4 if end >= 0 else len(seen))
            except socket.timeout as err:  # as httpcore's own read maps them
                raise httpcore.ReadTimeout(err) from err
            except OSError as err:
                raise httpcore.ReadError(err) from err
        return self._inner.read(max(max_bytes, READ_BYTES), timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)
        self._head_next, self.head_exact = True, False

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _BulkStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


def iter_body(r: httpx.Response, chunk: int = READ_BYTES) -> Iterator[bytes]:
    """The body of a streamed response, straight from the socket where the transport left all of it there (plain
    HTTP, an identity body of known length), else through httpx. Errors are httpx's either way."""
    stream = r.extensions.get("network_stream")
    length = r.headers.get("content-length", "")
    direct = (isinstance(stream, _BulkStream) and stream.head_exact and stream.socket is not None
              and length.isdigit() and r.headers.get("content-encoding", "identity") == "identity"
              and "transfer-encoding" not in r.headers and not r.is_stream_consumed)
    if not direct:
        yield from r.iter_bytes(chunk)
        return
    stream.head_exact = False  # the bytes are this iterator's: h11 never sees them, and the connection is not reused
    sock, left = stream.socket, int(length)
    while left:
        try:
            data = sock.recv(min(chunk, left))
        except socket.timeout:
            raise httpx.ReadTimeout("timed out reading the body") from None
        except OSError as err:
            raise httpx.ReadError(str(err)) from None
        if not data:
            return  # the peer closed early: the caller counts the bytes and says how many came
        left -= len(data)
        yield data


class _BulkBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        return _BulkStream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None
                            ) -> httpcore.NetworkStream:
        return _BulkStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class BulkTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` over :class:`_BulkBackend`. httpx takes no network backend, so the pool it built
    is replaced by one with the same limits and the backend."""

    def __init__(self, ssl_context: ssl.SSLContext):
        keep_freed_memory()
        super().__init__(verify=ssl_context, limits=LIMITS)
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context, max_connections=LIMITS.max_connections,
            max_keepalive_connections=LIMITS.max_keepalive_connections, keepalive_expiry=LIMITS.keepalive_expiry,
            network_backend=_BulkBackend())
