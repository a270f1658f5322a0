"""Chat in a browser: the page on ``GET /`` and the line protocol over a WebSocket at ``/ws``.

Nothing here knows the chat's rules. A :class:`WebListener` is an ordinary
:class:`trio.abc.Listener` whose :meth:`~WebListener.accept` returns a
:class:`trio.abc.Stream` per upgraded WebSocket (:class:`WebSocketStream`),
one text message per line each way. The trionet :class:`~trionet.Server`
serves those streams with the chat's normal handler, so every rule a TCP
member lives by (nicks, flood control, slow consumers, idle timeout,
``BYE shutdown``, the connection limit) holds for a browser member with no
code of its own.

The HTTP side (reading a request, serving the page, 404/405, the WebSocket
handshake) runs in the listener's own background tasks, so ``accept`` only
ever hands out finished WebSockets and a slow or hostile HTTP client never
holds up the server's accept loop. A request must name the page's own
address (or a configured name) in ``Host`` (:func:`served_names`: DNS
rebinding), and every connection the listener holds counts against the
per-address limit from the moment it is accepted::

    WebListener.run                       (the listener's nursery)
        accept loop on the TCP listener
        one task per TCP connection:
            read the request head           <- bounded by the handshake deadline
            GET /   -> the page, close
            GET /ws -> WebSocket handshake, hand the stream to accept()
            ... then only trio-websocket's reader task, until the WebSocket closes

The chat opens its listeners in :meth:`trionet.Service.open_extra_listeners`
and runs their background work in :meth:`trionet.Service.run_background`,
which the server starts before it accepts and cancels after the last
connection has ended. Closing the listener stops its accepting at once and
lets the requests under way finish (:class:`WebListener` says how; the
server waits for them within its grace); WebSockets already handed out live
on until the server closes them (they still have to say ``BYE shutdown``),
and ``run`` returns when the last one is gone.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import importlib.resources
import ipaddress
import logging
import math
import re
import ssl
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Protocol, TypeVar

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from ..._logs import log_access, next_conn_number
from ..._metrics import current_metrics
from ..._proxy import Network
from ..._proxy_stream import (
    HEADER_TIMEOUT,
    ReplayStream,
    read_proxy_header_or_why,
    report_refusal,
)
from ..._transport import format_peer, peer_host
from .frames import FrameWatch, close_frame

__all__ = [
    "MessageSocket",
    "WebListener",
    "WebSocketStream",
    "load_page",
    "message_limit",
    "open_web_listeners",
    "served_names",
]

log = logging.getLogger("trionet.web")

#: Seconds a client has to send its request head (and read the page, or
#: finish the WebSocket handshake): slow-loris clients are dropped after it.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Longest request head accepted (request line and headers).
MAX_HEAD: Final = 8192
#: Connections the web listener holds at once (requests being read or
#: answered, handshakes, open WebSockets), by default (the chat passes its
#: ``max_connections``); more are closed at once. From one address at most
#: ``max_per_address``, so one address cannot fill them and hold the page
#: shut for everyone.
MAX_PENDING: Final = 1000
#: Close codes of a client that broke the protocol (wsproto's verdicts):
#: trio-websocket closes the TCP stream without a close frame for these.
_PROTOCOL_ERRORS: Final = (1002, 1007)
#: Seconds a graceful WebSocket close may wait for the peer's reply.
CLOSE_TIMEOUT: Final = 2.0
#: Once the listener closes, seconds a connection that has sent nothing yet
#: (or is still sending its PROXY header) has left before it is dropped: its
#: bytes may be on their way, or waiting unread (see WebListener.aclose).
CLOSE_LINGER: Final = 0.5

_T = TypeVar("_T")

_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


def message_limit(max_line: int) -> int:
    """The largest WebSocket message accepted, for a service's line limit.

    A message longer than the line limit still arrives whole and gets
    ``ERR line-too-long`` from the line framer, like a long TCP line; only
    a message past this (much larger) bound closes the WebSocket (code 1009),
    since a WebSocket message, unlike a TCP line, must be held whole to be
    decoded.
    """
    return max(4 * max_line, 64 * 1024)


class MessageSocket(Protocol):
    """What :class:`WebSocketStream` needs of a WebSocket (trio-websocket's
    ``WebSocketConnection`` has it; tests may pass a fake)."""

    async def get_message(self) -> str | bytes:
        """The next message; raises ``ConnectionClosed`` once closed."""
        ...

    async def send_message(self, message: str | bytes) -> None:
        """Send one message; raises ``ConnectionClosed`` once closed."""
        ...

    async def aclose(self) -> None:
        """Close (gracefully when not cancelled)."""
        ...


class WebSocketStream(trio.abc.Stream):
    """A byte stream of lines over a WebSocket of text messages.

    Incoming: each message becomes its bytes plus ``b"\\n"`` (a message
    holding an LF therefore counts as several lines, exactly as those bytes
    would over TCP; a binary message is taken as the bytes of a line, so
    invalid UTF-8 gets ``ERR bad-encoding``). Outgoing: bytes are split on
    LF and each complete line goes out as one text message without its LF;
    a partial line waits for the rest. The close of the WebSocket is end of
    input; sending after it raises :class:`trio.BrokenResourceError`.
    """

    def __init__(
        self,
        ws: MessageSocket,
        transport_stream: trio.abc.Stream | None = None,
        frames: FrameWatch | None = None,
    ) -> None:
        self.ws = ws
        #: The TCP stream underneath, for the access log's peer address
        #: (:func:`trionet.format_peer` follows ``transport_stream``).
        self.transport_stream = transport_stream
        #: Told when the message now arriving began (``math.inf``: none is),
        #: e.g. :meth:`trionet.Connection.line_started`, so the line timeout
        #: holds for a message trickling in. ``frames`` follows the client's
        #: bytes for it.
        self.line_clock: Callable[[float], None] | None = None
        self._frames = frames
        if frames is not None:
            frames.on_change = self._report_line
        self._incoming = b""  # the rest of a message larger than max_bytes
        self._outgoing = bytearray()  # a line still waiting for its LF
        self._eof = False
        self._closed = False
        self._receiving = False
        self._sending = False

    def _check(self, busy: bool, what: str) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if busy:
            raise trio.BusyResourceError(f"another task is already {what} on this stream")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next bytes: a whole message and its LF, or ``max_bytes`` of it."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._check(self._receiving, "receiving")
        self._receiving = True
        try:
            if self._incoming or self._eof:
                await trio.lowlevel.checkpoint()
            else:
                if self._frames is not None:
                    # Said again before each wait: the connection forgets
                    # it whenever it hands out a line.
                    self._report_line(self._frames.since)
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed:
                    self._eof = True
                else:
                    data = message.encode() if isinstance(message, str) else message
                    self._incoming = data + b"\n"
            n = len(self._incoming) if max_bytes is None else max_bytes
            chunk, self._incoming = self._incoming[:n], self._incoming[n:]
            return chunk
        finally:
            self._receiving = False

    def _report_line(self, since: float) -> None:
        if self.line_clock is not None:
            self.line_clock(since)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send every complete line in ``data`` as one text message each."""
        self._check(self._sending, "sending")
        self._sending = True
        try:
            self._outgoing += data
            *lines, rest = self._outgoing.split(b"\n")
            self._outgoing = rest
            if not lines:
                await trio.lowlevel.checkpoint()
            for line in lines:
                try:
                    await self.ws.send_message(line.decode("utf-8", "replace"))
                except ConnectionClosed as exc:
                    raise trio.BrokenResourceError("the WebSocket is closed") from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """Return at once: the WebSocket's own lock orders its writers."""
        self._check(self._sending, "sending")
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Close the WebSocket gracefully: it has no half-close."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close the WebSocket: a close handshake within :data:`CLOSE_TIMEOUT`
        seconds, or at once (TCP close) when cancelled, as under
        :func:`trio.aclose_forcefully`."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        # trio-websocket waits for the peer's close reply with no bound; when
        # the wait ends early it still closes the TCP stream.
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self.ws.aclose()


class _Replay(trio.abc.Stream):
    """The TCP stream as trio-websocket sees it.

    It first gives back the request head the listener already read to route
    it (trio-websocket parses the same bytes again for the handshake). It
    shows every byte after the head to a :class:`FrameWatch` (for the line
    timeout), and when trio-websocket closes the stream after the client
    broke the protocol, it first sends the close frame (code 1002, or 1007
    for bad UTF-8) that trio-websocket leaves out.
    """

    def __init__(self, stream: trio.abc.Stream, head: bytes, head_size: int) -> None:
        self.stream = stream
        self._head = head
        self.frames = FrameWatch()
        # Frames sent along with the head, and bytes not yet shown to the
        # watch (those before the WebSocket was accepted).
        self._frame_bytes: bytes | bytearray = head[head_size:]
        #: The WebSocket on top, once accepted.
        self.ws: WebSocketConnection | None = None
        self._closing_sent = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        chunk: bytes | bytearray
        if self._head:
            n = len(self._head) if max_bytes is None else max_bytes
            chunk, self._head = self._head[:n], self._head[n:]
            await trio.lowlevel.checkpoint()
        else:
            chunk = await self.stream.receive_some(max_bytes)
            self._frame_bytes += chunk
        if self._frame_bytes and self.ws is not None:
            self.frames.feed(self._frame_bytes, trio.current_time())
            self._frame_bytes = b""
        return chunk

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # trio-websocket sends each frame in one call: a close frame's
        # first byte is FIN plus opcode 8.
        self._closing_sent |= bytes(data[:1]) == b"\x88"
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        reason = None if self.ws is None else self.ws.closed
        if reason is not None and reason.code in _PROTOCOL_ERRORS and not self._closing_sent:
            self._closing_sent = True
            with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(*_GONE):
                await self.stream.send_all(close_frame(reason.code, "protocol error"))
        await self.stream.aclose()


def _current(setting: _T | Callable[[], _T]) -> _T:
    """A limit given as a value, or as a function read each time (a reload changes it)."""
    return setting() if callable(setting) else setting


def _linger(scope: trio.CancelScope) -> None:
    """Give what ``scope`` waits for :data:`CLOSE_LINGER` more at most."""
    scope.deadline = min(scope.deadline, trio.current_time() + CLOSE_LINGER)


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


def load_page() -> bytes:
    """The whole HTTP response for ``GET /``: headers and the page.

    The page's one inline ``<script>`` and ``<style>`` are allowed by their
    hashes in a Content-Security-Policy that allows nothing else: no other
    script, no inline event handler, no connection but to this server. The
    page already shows every received text as text; the policy is a second
    wall should a future edit get that wrong.
    """
    html = importlib.resources.files(__package__).joinpath("static/chat.html").read_text("utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.S)
    style = re.search(r"<style>(.*?)</style>", html, re.S)
    if script is None or style is None:  # pragma: no cover - the packaged page has both
        raise RuntimeError("chat.html needs one inline <script> and one <style>")
    csp = (
        f"default-src 'none'; script-src {_csp_hash(script[1])}; "
        f"style-src {_csp_hash(style[1])}; connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return _response(
        200,
        html.encode(),
        "text/html; charset=utf-8",
        [("Content-Security-Policy", csp), ("Cache-Control", "no-store")],
    )


_REASONS: Final = {
    200: "OK",
    307: "Temporary Redirect",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def _response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    headers: list[tuple[str, str]] | None = None,
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "X-Content-Type-Options: nosniff",
        "Referrer-Policy: no-referrer",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers or []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _error(status: int, text: str, headers: list[tuple[str, str]] | None = None) -> bytes:
    return _response(status, f"{status} {text}\n".encode(), headers=headers)


class _Refused(Exception):
    """A request answered with an HTTP error instead of the page or a WebSocket."""

    def __init__(self, status: int, text: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(status, text)
        self.status = status
        self.response = _error(status, text, headers)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """``(method, path, headers)`` of a request head; :class:`_Refused` if malformed.

    Only what routing needs: the WebSocket handshake itself is parsed again,
    strictly, by trio-websocket (h11 under wsproto).
    """
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Refused(400, "bad request")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _Refused(400, "bad request")
        headers[name.lower()] = value.strip()
    return method, target.partition("?")[0], headers


def _local_ip(stream: trio.abc.Stream) -> str | None:
    """The address the client reached (under TLS too); ``None`` off a socket."""
    seen: Any = stream
    for _ in range(8):
        sock = getattr(seen, "socket", None)
        if sock is not None:
            try:
                return str(sock.getsockname()[0])
            except (OSError, IndexError, TypeError):
                return None
        seen = getattr(seen, "transport_stream", None)
        if seen is None:
            break
    return None


def served_names(local_ip: str | None, names: Iterable[str] = ()) -> frozenset[str]:
    """The host names a request may give in ``Host`` for a page served on ``local_ip``.

    The address's literal (IPv6 in brackets), ``localhost`` when it is a
    loopback address (or unknown: a stream in memory), and ``names`` (the
    chat's ``--web-host-name``). Anything else is what a browser sends after
    a DNS-rebinding attack: a page on ``evil.example`` whose name now
    resolves to this address, so it counts as that page's own origin.
    """
    allowed = {name.lower().rstrip(".") for name in names}
    if local_ip is None:
        allowed.add("localhost")
        return frozenset(allowed)
    try:
        ip = ipaddress.ip_address(local_ip.partition("%")[0])
    except ValueError:
        return frozenset(allowed)
    if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack socket
        ip = ip.ipv4_mapped
    allowed.add(f"[{ip}]" if ip.version == 6 else str(ip))
    if ip.is_loopback:
        allowed.add("localhost")
    return frozenset(allowed)


def _host_name(host: str) -> str | None:
    """The name part of a ``Host`` header (port dropped), lower-case; ``None`` if malformed."""
    host = host.lower()
    if host.startswith("["):  # [IPv6]:port
        end = host.find("]") + 1
        name, port = host[:end], host[end:]
    else:
        name, colon, digits = host.partition(":")
        port = colon + digits
    if not name or (port and not (port.startswith(":") and port[1:].isdigit())):
        return None
    return name


def _same_origin(headers: dict[str, str]) -> bool:
    """False for a browser page from another site opening our WebSocket.

    A page the user visits elsewhere could otherwise join (and read) a chat
    that listens only on the user's own machine. Clients that are not
    browsers send no ``Origin`` and are let in, as over TCP.
    """
    origin = headers.get("origin")
    if origin is None:
        return True
    host = headers.get("host", "").lower()
    return origin.lower() in (f"http://{host}", f"https://{host}")


def _address(stream: trio.abc.Stream) -> str | None:
    """The client's IP address, the key of the per-address limit (``None`` in memory)."""
    return peer_host(format_peer(stream))


class WebListener(trio.abc.Listener[trio.abc.Stream]):
    """HTTP and WebSocket on top of ``transport`` (a TCP listener, or any other).

    Run :meth:`run` in a nursery (or use :func:`open_web_listeners`); then
    :meth:`accept` returns one :class:`WebSocketStream` per WebSocket opened
    on ``/ws``.

    ``max_pending`` and ``max_per_address`` may be numbers or functions
    returning one, asked at each connection (the chat passes functions that
    read its settings, so that a reload changes them).

    ``proxy``, asked at each connection (a reload may change the answer):
    the networks allowed to send a PROXY protocol header, or ``None`` when
    no header is expected. With a list, every connection must start with
    one, from one of those networks (before TLS); the address it names is
    the client's for the per-address limit, the access lines and the chat.

    Closing (:meth:`aclose`) is graceful, so that a reload drops nobody: a
    request already under way is still answered (within its handshake
    deadline), except a WebSocket, which gets ``503`` and a ``Retry-After``
    (the page reconnects, to the listener that took over). A connection that
    has not sent a byte yet (a browser opens one ahead of its request) keeps
    its handshake deadline to send it when the listener retires
    (:meth:`set_retiring`: a reload; the server's grace bounds the wait), and
    :data:`CLOSE_LINGER` otherwise (a shutdown: an idle connection must not
    hold it up). :meth:`wait_requests_done` waits for the requests under way
    (the server does, within its grace).
    """

    #: Logged and reported by the server as "chat web".
    label: Final = "web"
    #: The service whose metrics count what this listener refuses.
    service: Final = "chat"

    def __init__(
        self,
        transport: trio.abc.Listener[Any],
        *,
        page: bytes | None = None,
        max_message_size: int = 64 * 1024,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        name: str = "chat web",
        host_names: Iterable[str] = (),
        max_pending: int | Callable[[], int] = MAX_PENDING,
        max_per_address: int | Callable[[], int | None] | None = None,
        proxy: Callable[[], Sequence[Network] | None] | None = None,
    ) -> None:
        self.transport = transport
        self.page = load_page() if page is None else page
        self.max_message_size = max_message_size
        self.handshake_timeout = handshake_timeout
        self.name = name
        #: Names a request's ``Host`` may give besides the address (see
        #: :func:`served_names`).
        self.host_names = tuple(host_names)
        #: Connections held at once (requests, handshakes, open WebSockets),
        #: or a function giving it.
        self.max_pending = max_pending
        #: ... of which from one address (``None``: no limit of its own).
        self.max_per_address = max_per_address
        self.proxy = proxy
        self._per_address: dict[str, int] = {}
        self._held = 0  # connections held: pending, answered or upgraded
        # Unbuffered: a WebSocket is handed over only when the server takes it.
        self._ready_send, self._ready = trio.open_memory_channel[WebSocketStream](0)
        self._accepting = trio.CancelScope()
        self._closing = False
        self._retiring = False  # see set_retiring
        # The waits for a connection's first bytes: its PROXY header's, its
        # request's (closing cuts these short, to CLOSE_LINGER, unless retiring).
        self._first_waits: set[trio.CancelScope] = set()
        # Requests under way: accepted, not yet answered or handed over.
        self._requests = 0
        self._requests_done = trio.Event()
        self._requests_done.set()

    @property
    def socket(self) -> trio.socket.SocketType | None:
        """The listening socket, for the server's ``listening on`` log line."""
        transport = getattr(self.transport, "transport_listener", self.transport)  # under TLS
        return getattr(transport, "socket", None)

    async def accept(self) -> WebSocketStream:
        """The next WebSocket opened on ``/ws``, handshake done."""
        try:
            return await self._ready.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("the web listener is closed") from None

    async def aclose(self) -> None:
        """Stop accepting at once; let the requests under way end (see the class).

        A connection that has sent nothing yet, or is still sending its PROXY
        header, has :data:`CLOSE_LINGER` more (unless the listener retires:
        :meth:`set_retiring`): a request already sent but not read yet (the
        kernel holds it, or its task has not run) is still answered, and an
        idle one is not waited for. WebSockets already
        accepted are not affected: whoever accepted them closes them.
        Everything before the last ``await`` is synchronous, so this works
        under cancellation too (the server closes its listeners that way).
        """
        self._closing = True
        self._ready.close()
        self._accepting.cancel()
        if not self._retiring:
            self._linger_all()
        await self.transport.aclose()

    def set_retiring(self, retiring: bool) -> None:
        """Say whether closing is a retirement (``True``: a reload) or a shutdown.

        When retiring, a connection that has sent nothing yet keeps its whole
        handshake deadline to send its request, which is then answered: on a
        reload the listening socket lives on in the next generation, so a
        browser's connection opened ahead of its request must not be dropped
        for coming to the old one. Otherwise it gets :data:`CLOSE_LINGER`.
        Turning it off after the close (a shutdown during a retirement)
        applies the linger at once. The server calls this.
        """
        self._retiring = retiring
        if self._closing and not retiring:
            self._linger_all()

    def _linger_all(self) -> None:
        for scope in self._first_waits:
            _linger(scope)

    async def wait_requests_done(self) -> None:
        """Return once no request is under way (page, error, WebSocket handshake).

        Open WebSockets do not count: they are members, ended by the server
        like its other connections. Each request is bounded by the handshake
        deadline, so after :meth:`aclose` this returns within it.
        """
        await self._requests_done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The background work; returns once closed and every WebSocket is gone."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept_loop, nursery)
            task_status.started()

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        with self._accepting:
            while True:
                try:
                    stream = await self.transport.accept()
                except trio.ClosedResourceError:
                    return
                except OSError as exc:  # out of descriptors and the like
                    log.error("%s: accept failed (%s); retrying", self.name, exc)
                    await trio.sleep(0.1)
                    continue
                if self._held >= _current(self.max_pending):
                    await trio.aclose_forcefully(stream)
                    continue
                proxy_from = self.proxy() if self.proxy is not None else None
                # Behind a balancer the socket's address is the balancer's:
                # the client's is known once its header is read.
                address = None if proxy_from is not None else _address(stream)
                if not self._count(address):
                    await trio.aclose_forcefully(stream)
                    continue
                self._held += 1
                if not self._requests:
                    self._requests_done = trio.Event()
                self._requests += 1
                scope = trio.CancelScope(deadline=trio.current_time() + self.handshake_timeout)
                # The wait for the first byte: once one has come (the raw
                # first byte, under TLS), closing no longer cuts it short.
                first = trio.CancelScope()
                self._first_waits.add(first)
                if isinstance(stream, _TLSOrPlainHTTP):
                    stream.began = functools.partial(self._began, first)
                nursery.start_soon(self._serve, stream, scope, first, address, proxy_from)

    def _began(self, first: trio.CancelScope) -> None:
        """A connection's first byte came (under TLS, its first raw byte): its
        request is under way.

        Under TLS the wait for the first byte (``first``) also holds the
        handshake, which runs inside the first read: a close's linger, if it
        already cut that wait short, must not cut the handshake short too.
        The handshake deadline still holds.
        """
        self._first_waits.discard(first)
        first.deadline = math.inf

    def _count(self, address: str | None) -> bool:
        """Count a connection from ``address``, if it is not at its limit."""
        if address is None:
            return True
        held = self._per_address.get(address, 0)
        limit = _current(self.max_per_address)
        if limit is not None and held >= limit:
            return False
        self._per_address[address] = held + 1
        return True

    async def _serve(
        self,
        stream: trio.abc.Stream,
        scope: trio.CancelScope,
        first: trio.CancelScope,
        address: str | None,
        proxy_from: Sequence[Network] | None,
    ) -> None:
        """One TCP connection: the page, an error, or a WebSocket until it closes."""
        under_way = True

        def request_over() -> None:
            nonlocal under_way
            if under_way:
                under_way = False
                self._requests -= 1
                if not self._requests:
                    self._requests_done.set()

        try:
            if proxy_from is not None:
                proxied = await self._proxy_header(stream, scope, proxy_from)
                if proxied is None:
                    return
                stream = proxied
                client = _address(stream)
                if not self._count(client):
                    await trio.aclose_forcefully(stream)
                    return
                address = client
            await self._serve_one(stream, scope, first, request_over)
        finally:
            request_over()
            self._first_waits.discard(first)
            self._held -= 1
            if address is not None:
                self._per_address[address] -= 1
                if not self._per_address[address]:
                    del self._per_address[address]

    async def _proxy_header(
        self, stream: trio.abc.Stream, scope: trio.CancelScope, proxy_from: Sequence[Network]
    ) -> trio.abc.Stream | None:
        """Read the PROXY header, before TLS: the stream that names its client,
        or ``None`` once the connection is closed (refused, logged).

        As the server does on the chat's own port (trionet._server): only
        ``proxy_from`` may send one, within :data:`HEADER_TIMEOUT` seconds
        (and the handshake's deadline).
        """
        tls = stream if isinstance(stream, _TLSOrPlainHTTP) else None
        raw = stream if tls is None else tls.transport_stream
        peer = format_peer(raw)
        started = trio.current_time()
        failure, quiet = "the listener is closing", False
        # A scope of its own (the handshake's is entered later), which a
        # close cuts short like the wait for a request's first byte.
        reading = trio.CancelScope(deadline=min(scope.deadline, started + HEADER_TIMEOUT))
        if self._closing and not self._retiring:  # closed since the accept
            _linger(reading)
        self._first_waits.add(reading)
        try:
            with reading:
                header, raw, failure, quiet = await read_proxy_header_or_why(raw, peer, proxy_from)
                if header is not None:
                    # (a socket's header was peeked, so nothing to replay)
                    raw = ReplayStream(raw, b"", header.peer or peer)
                    if tls is None:
                        return raw
                    tls.transport_stream = raw  # TLS has not begun
                    return tls
            if reading.cancelled_caught and trio.current_time() >= reading.deadline:
                limit = min(HEADER_TIMEOUT, self.handshake_timeout)
                failure = f"no complete PROXY header within {limit:g}s"
        finally:
            self._first_waits.discard(reading)
        await trio.aclose_forcefully(stream)
        report_refusal(
            log,
            self.name,
            peer,
            failure,
            quiet=quiet,
            started=started,
            tls=tls is not None,
            metrics=current_metrics(),
            service=self.service,
        )
        return None

    async def _serve_one(
        self,
        stream: trio.abc.Stream,
        scope: trio.CancelScope,
        first: trio.CancelScope,
        request_over: Callable[[], None],
    ) -> None:
        peer = format_peer(stream)
        try:
            # trio-websocket's reader task lives in this nursery for as long
            # as the WebSocket does.
            async with trio.open_nursery() as nursery:
                handed_over = False
                try:
                    with scope:
                        handed_over = await self._handle_request(nursery, stream, peer, first)
                finally:
                    request_over()
                    if not handed_over:
                        # Ends the reader task of a handshake cut short too.
                        await trio.aclose_forcefully(stream)
            # The reader task has ended, so the WebSocket is over. Close the
            # TCP stream in case nobody did: trio-websocket leaves it open
            # after refusing a message over the size limit (code 1009).
            await trio.aclose_forcefully(stream)
        except* _GONE:
            pass  # the client went away mid-request: nothing to tell anyone
        except* Exception as group:
            # Never let one connection's bug end the listener (in a system
            # task it would end the whole program).
            log.error("%s %s: request failed", self.name, peer, exc_info=group)

    def _access(
        self,
        stream: trio.abc.Stream,
        peer: str,
        method: str,
        path: str,
        status: int,
        started: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """One access line for a request answered here (a WebSocket gets the chat's own)."""
        log_access(
            self.name,
            peer,
            conn=next_conn_number(),
            tls=isinstance(stream, trio.SSLStream | _TLSOrPlainHTTP),
            end=f"http-{status}",
            duration=trio.current_time() - started,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            message=f"{self.name} {peer} {method} {path} {status}",
            method=method,
            path=path,
            status=status,
        )

    async def _handle_request(
        self, nursery: trio.Nursery, stream: trio.abc.Stream, peer: str, first: trio.CancelScope
    ) -> bool:
        """Answer one request; ``True`` once a WebSocket was handed to :meth:`accept`."""
        started = trio.current_time()
        # From its first byte on, the request is under way: closing the
        # listener no longer cuts it short.
        head = await self._read_head(stream, first, functools.partial(self._began, first))
        if head is None:
            return False
        method = path = "-"
        try:
            if len(head) > MAX_HEAD:
                raise _Refused(431, "request head too large")
            head_size = head.index(b"\r\n\r\n") + 4
            method, path, headers = _parse_head(head[: head_size - 4])
            if method != "GET":
                raise _Refused(405, "method not allowed", [("Allow", "GET")])
            names = served_names(_local_ip(stream), self.host_names)
            if _host_name(headers.get("host", "")) not in names:
                # Before anything else: a DNS-rebinding page gets nothing.
                raise _Refused(403, "unknown host")
            if path == "/":
                self._access(stream, peer, method, path, 200, started, len(head), len(self.page))
                await stream.send_all(self.page)
                return False
            if path != "/ws":
                raise _Refused(404, "not found")
            if "websocket" not in headers.get("upgrade", "").lower():
                raise _Refused(426, "this is a WebSocket", [("Upgrade", "websocket")])
            if not _same_origin(headers):
                raise _Refused(403, "WebSocket from another origin")
            if self._closing:
                # Nobody here will take it: the page tries again, and reaches
                # the listener that took over (a reload) or learns it is down.
                raise _Refused(503, "closing: try again", [("Retry-After", "1")])
        except _Refused as refused:
            sent = len(refused.response)
            self._access(stream, peer, method, path, refused.status, started, len(head), sent)
            await stream.send_all(refused.response)
            return False
        # The handshake proper (and its 400 for a malformed one) is
        # trio-websocket's; its reader task joins this connection's nursery.
        replay = _Replay(stream, head, head_size)
        request = await wrap_server_stream(nursery, replay, max_message_size=self.max_message_size)
        ws = await request.accept()
        replay.ws = ws
        adapter = WebSocketStream(ws, transport_stream=stream, frames=replay.frames)
        try:
            await self._ready_send.send(adapter)
        except trio.BrokenResourceError:  # the listener closed meanwhile
            await trio.aclose_forcefully(adapter)
            return False
        return True

    @staticmethod
    async def _read_head(
        stream: trio.abc.Stream,
        first: trio.CancelScope | None = None,
        began: Callable[[], None] | None = None,
    ) -> bytes | None:
        """Bytes up to and including the blank line ending the head (and any
        bytes after it); longer than :data:`MAX_HEAD` if it does not end in
        time; ``None`` if the client closed first, or if ``first`` (the wait
        for the first bytes) was cut short. ``began`` is called once they
        have come."""
        buf = bytearray()
        while True:
            # Resume the search a little before the new bytes: the blank
            # line may straddle two reads.
            start = max(0, len(buf) - 3)
            if first is not None and not buf:
                with first:
                    chunk = await stream.receive_some(4096)
                if first.cancelled_caught:
                    return None  # the listener closed and nothing came in time
                if began is not None:
                    began()
            else:
                chunk = await stream.receive_some(4096)
            if not chunk:
                return None
            buf += chunk
            if buf.find(b"\r\n\r\n", start) >= 0 or len(buf) > MAX_HEAD:
                return bytes(buf)


_SANE_HOST: Final = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_SANE_TARGET: Final = re.compile(r"/[!-~]*")


class _TLSListener(trio.abc.Listener[trio.abc.Stream]):
    """TLS on ``transport_listener``, like :class:`trio.SSLListener`, except that
    a plain-HTTP request (someone typed ``http://``) is answered in plain text.

    Over plain TCP a browser's request to a TLS port is refused by OpenSSL and
    the browser shows an empty-response page with no hint; here it gets a
    redirect to ``https://`` on the same address (or a short text saying to
    use it), so the person lands on the page.
    """

    def __init__(
        self,
        transport_listener: trio.abc.Listener[Any],
        context: ssl.SSLContext,
        name: str = "chat web",
    ):
        self.transport_listener = transport_listener  # WebListener.socket looks for it
        self.context = context
        self.name = name

    async def accept(self) -> trio.abc.Stream:
        """The next connection; its first bytes are looked at on first use."""
        stream = await self.transport_listener.accept()
        return _TLSOrPlainHTTP(stream, self.context, self.name)

    async def aclose(self) -> None:
        """Close the TCP listener."""
        await self.transport_listener.aclose()


class _TLSOrPlainHTTP(trio.abc.Stream):
    """A server-side TLS stream that first looks at what the client sent.

    The look happens on the first :meth:`receive_some`, in the connection's
    own task and under its handshake deadline (never in the accept loop). A
    ClientHello goes on into a :class:`trio.SSLStream` (the bytes read are
    replayed to it); a request line in capitals (plain HTTP) is answered with
    ``307`` to the same ``Host`` over ``https://`` (or ``400`` and a text when
    the request names no usable host) and the stream then reports itself
    broken, which ends the connection quietly. Anything else goes to TLS,
    whose handshake fails as before.
    """

    def __init__(
        self, transport_stream: trio.abc.Stream, context: ssl.SSLContext, name: str
    ) -> None:
        self.transport_stream = transport_stream  # format_peer follows it
        self.context = context
        self.name = name
        self._started = trio.current_time()
        self._tls: trio.SSLStream[trio.abc.Stream] | None = None
        self._answered = False  # plain HTTP was answered: the stream is done
        #: Called at the first raw byte (the listener's "under way": see WebListener.aclose).
        self.began: Callable[[], None] | None = None

    async def _start(self) -> trio.SSLStream[trio.abc.Stream]:
        if self._answered:
            raise trio.BrokenResourceError("plain HTTP on the HTTPS port")
        if self._tls is None:
            first = await self.transport_stream.receive_some(MAX_HEAD)
            if first and self.began is not None:
                self.began()
            replay = ReplayStream(self.transport_stream, bytes(first))
            if first[:1].isupper():  # a method (GET); a ClientHello starts with 0x16
                self._answered = True
                await self._answer_plain_http(replay)
                raise trio.BrokenResourceError("plain HTTP on the HTTPS port")
            self._tls = trio.SSLStream(
                replay, self.context, server_side=True, https_compatible=True
            )
        return self._tls

    async def _answer_plain_http(self, replay: trio.abc.Stream) -> None:
        head = await WebListener._read_head(replay)
        response = _error(400, "this port speaks HTTPS: use https:// in the address")
        if head is not None and len(head) <= MAX_HEAD and b"\r\n\r\n" in head:
            try:
                _, target, headers = _parse_head(head[: head.index(b"\r\n\r\n")])
            except _Refused:
                pass
            else:
                host = headers.get("host", "")
                if _SANE_HOST.fullmatch(host):
                    where = f"https://{host}{target if _SANE_TARGET.fullmatch(target) else '/'}"
                    response = _response(
                        307,
                        f"This port speaks HTTPS: {where}\n".encode(),
                        headers=[("Location", where), ("Cache-Control", "no-store")],
                    )
        await self.transport_stream.send_all(response)
        status = int(response.split(b" ", 2)[1])
        peer = format_peer(self.transport_stream)
        log_access(
            self.name,
            peer,
            conn=next_conn_number(),
            tls=False,
            end=f"http-{status}",
            duration=trio.current_time() - self._started,
            bytes_in=len(head or b""),
            bytes_out=len(response),
            message=f"{self.name} {peer} plain HTTP on the HTTPS port {status}",
            status=status,
        )

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Decrypted bytes (the first call decides between TLS and plain HTTP)."""
        return await (await self._start()).receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send ``data``."""
        await (await self._start()).send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        """As :class:`trio.SSLStream`'s."""
        await (await self._start()).wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close TLS (and the TCP stream), or only the TCP stream if TLS never began."""
        if self._tls is None:
            await self.transport_stream.aclose()
        else:
            await self._tls.aclose()


async def open_web_listeners(
    host: str,
    port: int,
    *,
    max_message_size: int = 64 * 1024,
    tls: ssl.SSLContext | None = None,
    transports: Sequence[trio.abc.Listener[Any]] | None = None,
    host_names: Iterable[str] = (),
    max_pending: int | Callable[[], int] = MAX_PENDING,
    max_per_address: int | Callable[[], int | None] | None = None,
    proxy: Callable[[], Sequence[Network] | None] | None = None,
) -> list[WebListener]:
    """Listen for HTTP on ``host:port`` (0: a free port); one listener per address.

    With ``tls`` (the chat's own TLS context) the page is served over HTTPS
    and the WebSocket is ``wss://``. ``host_names``, ``max_pending`` and
    ``max_per_address`` are :class:`WebListener`'s. Run each listener's
    :meth:`WebListener.run` in a nursery (the chat does it in its
    ``run_background``) before accepting from it. ``transports``: listeners
    opened already (a worker's, from its parent) instead of ``host:port``.
    ``proxy``: :class:`WebListener`'s (the PROXY protocol).
    """
    page = load_page()
    listeners: list[trio.abc.Listener[Any]]
    if transports is not None:
        listeners = list(transports)
    else:
        listeners = list(await trio.open_tcp_listeners(port, host=host))
    if tls is not None:
        listeners = [_TLSListener(tcp, tls) for tcp in listeners]
    return [
        WebListener(
            transport,
            page=page,
            max_message_size=max_message_size,
            host_names=host_names,
            max_pending=max_pending,
            max_per_address=max_per_address,
            proxy=proxy,
        )
        for transport in listeners
    ]
