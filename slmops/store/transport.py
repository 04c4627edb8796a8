"""The HTTP transport registry clients use: httpx's own, with socket reads of up to 1 MiB.

httpcore reads 64 KiB at a time; a model blob is hundreds of MiB, and each read is a trip through h11, httpx and
the pull's queue. Reading up to 1 MiB cut a 98 MB loopback pull's receive work by about a third (measured with
``bench/pull_bench.py``). Everything else — TLS, pooling, timeouts, how httpx maps errors — is httpx's.
"""

from __future__ import annotations

import ssl
import typing

import httpcore
import httpx

READ_BYTES = 1 << 20
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)  # httpx's defaults


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
        super().__init__(verify=ssl_context, limits=LIMITS)
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context, max_connections=LIMITS.max_connections,
            max_keepalive_connections=LIMITS.max_keepalive_connections, keepalive_expiry=LIMITS.keepalive_expiry,
            network_backend=_BulkBackend())
