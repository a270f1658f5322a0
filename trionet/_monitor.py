"""The monitoring endpoint: ``--metrics-port`` serving /metrics, /healthz and /readyz.

A tiny HTTP/1.1 server on Trio, in the event loop it reports on (no
thread, no framework): a scrape is one request of a few hundred bytes,
answered with one buffer. It is strict, because nothing but monitoring
tools should talk to it: ``GET`` or ``HEAD`` only, no request body, a
``Host`` header on HTTP/1.1, a head of at most 8 KiB within 10 seconds;
anything else gets a 4xx and the connection is closed. Keep-alive works
(Prometheus reuses its connection between scrapes).

* ``GET /metrics``: the Prometheus text format.
* ``GET /healthz``: 200 as long as the event loop answers.
* ``GET /readyz``: 200 when the process serves, 503 and the reason when
  not (starting, draining, a Redis link down).

:func:`parse_request` is the sans-I/O part: bytes in, a request or an error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import trio

from ._server import StartupError, _reason

__all__ = ["BadRequest", "MonitorOptions", "Request", "parse_request", "serve_monitor"]


@attrs.frozen
class MonitorOptions:
    """``--metrics-port`` and ``--metrics-host``: where to serve /metrics and the health checks."""

    port: int
    host: str = "127.0.0.1"


log = logging.getLogger("trionet")

#: Longest request head accepted.
MAX_HEAD: Final = 8192
#: Seconds a client has to send a whole request head (and to wait between two).
REQUEST_TIMEOUT: Final = 10.0
#: Monitoring connections served at once; more are closed at once.
MAX_CLIENTS: Final = 32

_REQUEST_LINE = re.compile(rb"([A-Z]+) (/[!-~]*) HTTP/1\.([01])")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

#: ``/metrics``'s body and content type.
MetricsSource = Callable[[], Awaitable[tuple[bytes, str]]]
#: ``None`` when ready, else why not.
ReadinessSource = Callable[[], Awaitable[str | None]]


@attrs.frozen
class Request:
    """A parsed request head."""

    method: str
    path: str
    keep_alive: bool


class BadRequest(ValueError):
    """A request this server refuses; ``status`` is the answer."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def parse_request(head: bytes) -> Request:
    """Parse a request head (up to and without its blank line); :class:`BadRequest` if bad."""
    lines = head.split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise BadRequest(400, "malformed request line")
    method, target, minor = match.groups()
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest(400, "malformed header line")
        key = name.lower()
        if key in headers and key in (b"host", b"content-length"):
            raise BadRequest(400, f"repeated {name.decode()} header")
        headers[key] = value.strip(b" \t")
    if minor == b"1" and b"host" not in headers:
        raise BadRequest(400, "HTTP/1.1 request without Host")
    if b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0":
        raise BadRequest(400, "a request body is not accepted here")
    if method not in (b"GET", b"HEAD"):
        raise BadRequest(405, "only GET and HEAD")
    connection = headers.get(b"connection", b"").lower()
    keep_alive = b"close" not in connection if minor == b"1" else b"keep-alive" in connection
    path = target.partition(b"?")[0].decode("ascii")
    return Request(method.decode("ascii"), path, keep_alive)


def _response(
    status: int, body: bytes, content_type: str, *, head_only: bool = False, close: bool = False
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head_only else body)


async def _read_head(stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
    """The next request head from ``stream`` (``None`` at a clean EOF between requests)."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            if len(head) > MAX_HEAD:
                raise BadRequest(431, "request head too large")
            return head
        if len(buffer) > MAX_HEAD:
            raise BadRequest(431, "request head too large")
        data = await stream.receive_some(4096)
        if not data:
            if buffer:
                raise BadRequest(400, "request cut short")
            return None
        buffer += data


class _Endpoint:
    def __init__(self, metrics: MetricsSource, readiness: ReadinessSource) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.clients = 0

    async def answer(self, request: Request) -> tuple[int, bytes, str]:
        text = "text/plain; charset=utf-8"
        if request.path == "/healthz":
            return 200, b"ok\n", text
        if request.path not in ("/metrics", "/readyz"):
            return 404, b"not found: try /metrics, /healthz or /readyz\n", text
        try:
            if request.path == "/metrics":
                body, content_type = await self.metrics()
                return 200, body, content_type
            why = await self.readiness()
        except Exception as exc:
            # E.g. a worker's metric file read while the worker creates it:
            # answer (the next scrape will do), never drop the request.
            log.warning("metrics endpoint: %s failed: %r", request.path, exc)
            if request.path == "/metrics":
                return 500, f"cannot collect the metrics: {exc!r}\n".encode(), text
            why = f"cannot read the workers' state: {exc!r}"
        if why is None:
            return 200, b"ready\n", text
        return 503, f"not ready: {why}\n".encode(), text

    async def serve(self, stream: trio.abc.Stream) -> None:
        buffer = bytearray()
        try:
            while True:
                try:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        head = await _read_head(stream, buffer)
                    if head is None:
                        return
                    request = parse_request(head)
                except BadRequest as exc:
                    body = f"{exc}\n".encode()
                    await stream.send_all(
                        _response(exc.status, body, "text/plain; charset=utf-8", close=True)
                    )
                    return
                status, body, content_type = await self.answer(request)
                await stream.send_all(
                    _response(
                        status,
                        body,
                        content_type,
                        head_only=request.method == "HEAD",
                        close=not request.keep_alive,
                    )
                )
                if not request.keep_alive:
                    return
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # A bug here must never take the server it monitors down with it.
            log.exception("metrics endpoint: request failed")
        finally:
            self.clients -= 1
            await trio.aclose_forcefully(stream)

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # out of descriptors: the services come first
                    log.warning("metrics endpoint: accept failed (%s)", _reason(exc))
                    await trio.sleep(0.5)
                    continue
                if self.clients >= MAX_CLIENTS:
                    await trio.aclose_forcefully(stream)
                    continue
                self.clients += 1
                nursery.start_soon(self.serve, stream)


async def serve_monitor(
    host: str,
    port: int,
    metrics: MetricsSource,
    readiness: ReadinessSource,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the monitoring endpoint on ``host:port`` until cancelled.

    Logs ``metrics listening on HOST:PORT`` and passes the bound addresses
    to ``task_status.started``. An address that cannot be bound raises
    :class:`~trionet.StartupError` (service ``metrics``).
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise StartupError("metrics", host, port, _reason(exc)) from exc
    endpoint = _Endpoint(metrics, readiness)
    addresses: list[tuple[str, int]] = []
    for listener in listeners:
        bound: Any = listener.socket.getsockname()
        addresses.append((bound[0], bound[1]))
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        log.info("metrics listening on %s:%d", shown, bound[1])
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(endpoint.accept_loop, listener, nursery)
        task_status.started(addresses)
