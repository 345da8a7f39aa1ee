"""Requests (GETs of batches, POSTs of feedback) over keep-alive HTTP/1.1 connections, one per thread,
with the standard library.

The client pulls megabytes of batch bytes per request. http.client reads a body with Content-Length
straight into one preallocated buffer; httpx (h11 underneath) receives it in 64 KiB events that are
copied into a buffer, out of it and joined again, which cost the client ~8x the CPU per range body.
Each thread keeps its own connection because an `http.client.HTTPConnection` is not thread-safe.
"""

from __future__ import annotations

import http.client
import threading
from urllib.parse import urlencode, urlsplit

from service.errors import ServiceError


class TransportError(ServiceError, OSError):
    """The request did not get an HTTP response (refused, reset, timed out, malformed)."""


class KeepAliveConnections:
    def __init__(self, url: str, timeout: float, token: str | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {url!r}: expected http://HOST[:PORT][/PATH] or https://...")
        self.url = url.rstrip("/")
        self._connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port, self._base = parts.hostname, parts.port, parts.path.rstrip("/")
        self._timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connection_class(self._host, self._port, timeout=self._timeout)
            self._local.connection = connection
            with self._lock:
                self._all.append(connection)
        return connection

    def request(self, path: str, params: dict | None = None, accept: str = "*/*",
                json_body: bytes | None = None) -> tuple[int, bytes | bytearray]:
        """(status, body) of GET path?params, or of a POST of `json_body` when one is given. Raises
        TransportError when no response came back."""
        target = self._base + path + ("?" + urlencode(params) if params else "")
        connection = self._connection()
        headers = {"Accept": accept, **self._headers}
        if json_body is not None:
            headers["Content-Type"] = "application/json"
        try:
            connection.request("GET" if json_body is None else "POST", target, body=json_body, headers=headers)
            response = connection.getresponse()
            length = response.getheader("Content-Length")
            body = response.read() if length is None else _read_exactly(response, int(length))
        except (OSError, http.client.HTTPException) as e:
            connection.close()  # the next request on this thread opens a fresh connection
            raise TransportError(f"{type(e).__name__}: {e}") from e
        return response.status, body

    def close(self) -> None:
        with self._lock:
            for connection in self._all:
                connection.close()
            self._all.clear()


def _read_exactly(response: http.client.HTTPResponse, length: int) -> bytearray:
    body = bytearray(length)
    view, got = memoryview(body), 0
    while got < length:
        n = response.readinto(view[got:])
        if not n:
            raise http.client.IncompleteRead(bytes(view[:got]), length - got)
        got += n
    return body
