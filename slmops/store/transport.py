"""The HTTP transport registry clients use: httpx's own, with socket reads of up to 1 MiB.

httpcore reads 64 KiB at a time; a model blob is hundreds of MiB, and each read is a trip through h11, httpx and
the pull's queue. Reading up to 1 MiB cut a 98 MB loopback pull's receive work by about a third (measured with
``bench/pull_bench.py``). Everything else — TLS, pooling, timeouts, how httpx maps errors — is httpx's.

Each read then passes through about five fresh 1 MiB buffers (the socket read, h11's buffer and slices of it,
httpcore's copy), freed when the pull's threads are done with them. glibc's malloc, until its thresholds have
risen, hands such memory back to the kernel and faults it in again on the next read: ~20,000 page faults in a
98 MB pull in a fresh process, some 40 ms on 2 cores. :func:`keep_freed_memory` sets the thresholds where glibc's
dynamic tuning takes them itself once a 32 MiB block is freed, and the faults are gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ssl
import typing

import httpcore
import httpx

READ_BYTES = 1 << 20
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)  # httpx's defaults
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h


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
    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max(max_bytes, READ_BYTES), timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _BulkStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


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
