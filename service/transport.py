"""Requests (GETs of batches, POSTs of feedback) over keep-alive HTTP/1.1 connections, one per thread,
with the standard library.

The client pulls megabytes of batch bytes per request. http.client reads a body with Content-Length
straight into one preallocated buffer; httpx (h11 underneath) receives it in 64 KiB events that are
copied into a buffer, out of it and joined again, which cost the client ~8x the CPU per range body.
Each thread keeps its own connection because an `http.client.HTTPConnection` is not thread-safe.

Several URLs (`"http://a:8000,http://b:8000"` or a list) are replicas of one service, all serving the same
bytes for a step: a request goes to the current one, and a request that got no answer or a 5xx moves
the current one to the next, so the caller's retry (StreamClient's backoff) lands elsewhere, at the step
it was at.
"""

from __future__ import annotations

import http.client
import threading
from typing import Sequence
from urllib.parse import urlencode, urlsplit

from service.errors import ServiceError


class TransportError(ServiceError, OSError):
    """The request did not get an HTTP response (refused, reset, timed out, malformed)."""


class UrlError(ServiceError, ValueError):
    """A service URL that is not http(s)://HOST[:PORT][/PATH]."""


class KeepAliveConnections:
    def __init__(self, urls: str | Sequence[str], timeout: float, token: str | None = None):
        self.urls = [url.strip().rstrip("/") for url in (urls.split(",") if isinstance(urls, str) else urls)
                     if url.strip()]
        if not self.urls:
            raise UrlError(f"url {urls!r}: expected http://HOST[:PORT][/PATH] (several: comma-separated)")
        self._targets = [_target(url) for url in self.urls]
        self._timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._current = 0  # which URL requests go to; moved on by a failure
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The URL requests go to now."""
        return self.urls[self._current]

    def _connection(self, index: int) -> http.client.HTTPConnection:
        connections = self._local.__dict__.setdefault("connections", {})
        connection = connections.get(index)
        if connection is None:
            connection_class, host, port, _ = self._targets[index]
            connection = connections[index] = connection_class(host, port, timeout=self._timeout)
            with self._lock:
                self._all.append(connection)
        return connection

    def request(self, path: str, params: dict | None = None, accept: str = "*/*",
                json_body: bytes | None = None, method: str | None = None) -> tuple[int, bytes | bytearray]:
        """(status, body) of GET path?params, or of a POST of `json_body` when one is given (or `method`).
        Raises TransportError when no response came back. Either, or a 5xx, moves on to the next URL."""
        index = self._current
        target = self._targets[index][3] + path + ("?" + urlencode(params) if params else "")
        connection = self._connection(index)
        headers = {"Accept": accept, **self._headers}
        if json_body is not None:
            headers["Content-Type"] = "application/json"
        try:
            method = method or ("GET" if json_body is None else "POST")
            connection.request(method, target, body=json_body, headers=headers)
            response = connection.getresponse()
            length = response.getheader("Content-Length")
            body = response.read() if length is None else _read_exactly(response, int(length))
        except (OSError, http.client.HTTPException) as e:
            connection.close()  # the next request on this thread opens a fresh connection
            self._move_on(index)
            raise TransportError(f"{self.urls[index]}: {type(e).__name__}: {e}") from e
        if response.status >= 500:
            self._move_on(index)
        return response.status, body

    def _move_on(self, failed: int) -> None:
        if self._current == failed:  # not moved already by another thread's failure
            self._current = (failed + 1) % len(self.urls)

    def close(self) -> None:
        with self._lock:
            for connection in self._all:
                connection.close()
            self._all.clear()


def _target(url: str) -> tuple[type, str, int | None, str]:
    """(connection class, host, port, base path) of one URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlError(f"url {url!r}: expected http://HOST[:PORT][/PATH] or https://...")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return connection_class, parts.hostname, parts.port, parts.path.rstrip("/")


def _read_exactly(response: http.client.HTTPResponse, length: int) -> bytearray:
    body = bytearray(length)
    view, got = memoryview(body), 0
    while got < length:
        n = response.readinto(view[got:])
        if not n:
            raise http.client.IncompleteRead(bytes(view[:got]), length - got)
        got += n
    return body
