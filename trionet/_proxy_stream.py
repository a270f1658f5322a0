"""Reading a PROXY protocol header off an accepted stream, before anything else.

The header is followed at once by the client's own bytes (a request line,
or a TLS ClientHello), often in the same TCP segment. Whatever reads the
header must leave those bytes for the next reader, and the next reader may
be TLS, which wants the socket itself. So on a TCP socket the header is
*peeked* (``MSG_PEEK``) and exactly its length taken off: the stream after
is the untouched ``trio.SocketStream``, with every fast path under it. Any
other stream (memory streams in tests) is read normally and, if it read
past the header, wrapped in :class:`ReplayStream`, which hands those bytes
out first.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import trio

from ._logs import log_access, next_conn_number
from ._proxy import (
    MAX_HEADER,
    Network,
    ProxyHeader,
    ProxyProtocolError,
    address_allowed,
    parse_proxy_header,
)
from ._transport import peer_host

if TYPE_CHECKING:
    from ._metrics import Metrics

__all__ = [
    "HEADER_TIMEOUT",
    "NoHeader",
    "ReplayStream",
    "read_proxy_header",
    "read_proxy_header_or_why",
    "report_refusal",
]

#: Seconds a connection has to deliver its PROXY header. A balancer sends
#: it at once, as it connects; a client that got past --proxy-from and
#: says nothing is holding a descriptor for free.
HEADER_TIMEOUT: Final = 5.0


class NoHeader(ProxyProtocolError):
    """The peer closed without sending a byte (a TCP health check does that)."""


async def read_proxy_header(stream: trio.abc.Stream) -> tuple[ProxyHeader, trio.abc.Stream]:
    """Read the header at the start of ``stream``: the header, and the stream to go on with.

    Raises :class:`~trionet._proxy.ProxyProtocolError` for a bad header or
    a peer that closes first. No deadline of its own: the caller sets one.
    """
    if type(stream) is trio.SocketStream:
        return await _peek_header(stream.socket), stream
    buffer = bytearray()
    while True:
        data = await stream.receive_some(MAX_HEADER - len(buffer))
        if not data:
            if not buffer:
                raise NoHeader("closed before sending anything")
            raise ProxyProtocolError("closed before a complete PROXY header")
        buffer += data
        header = parse_proxy_header(buffer)
        if header is not None:
            rest = bytes(buffer[header.length :])
            return header, (ReplayStream(stream, rest) if rest else stream)
        if len(buffer) >= MAX_HEADER:  # (parse_proxy_header refuses sooner)
            raise ProxyProtocolError("PROXY header too long")


async def read_proxy_header_or_why(
    stream: trio.abc.Stream, peer: str, proxy_from: Iterable[Network]
) -> tuple[ProxyHeader | None, trio.abc.Stream, str, bool]:
    """The header of a connection from ``peer``, if it may send one, or why not.

    Only sources in ``proxy_from`` may (from anywhere else the connection
    is refused unread: any client could claim any address). No deadline
    of its own: the caller sets one. Returns (header, stream to go on
    with, why, quiet): with no header, ``why`` says what went wrong for a
    log line, and ``quiet`` that the peer only connected and closed (a
    balancer's health check: no warning due, see :func:`report_refusal`).
    """
    if peer == "disconnected":  # gone before we looked at it
        return None, stream, "closed before sending anything", True
    if not address_allowed(peer_host(peer), proxy_from):
        return None, stream, "not a --proxy-from address, so its PROXY header is not trusted", False
    try:
        header, stream = await read_proxy_header(stream)
    except NoHeader as exc:
        return None, stream, str(exc), True
    except ProxyProtocolError as exc:
        return None, stream, str(exc), False
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return None, stream, "connection lost before a complete PROXY header", False
    return header, stream, "", False


def report_refusal(
    log: logging.Logger,
    name: str,
    peer: str,
    why: str,
    *,
    quiet: bool,
    started: float,
    tls: bool,
    metrics: Metrics | None,
    service: str,
) -> None:
    """Say that the connection from ``peer`` on listener ``name`` was closed for its header.

    A quiet one (a health check) is an ordinary access line; any other a
    warning on ``log``, counted in ``metrics`` for ``service``.
    """
    if quiet:
        log_access(
            name,
            peer,
            conn=next_conn_number(),
            tls=tls,
            end="eof",
            duration=trio.current_time() - started,
            message=f"{name} {peer} {why}",
        )
    else:
        log.warning("%s %s refused: %s", name, peer, why)
        if metrics is not None:
            metrics.proxy_refused_client(service)


async def _peek_header(sock: trio.socket.SocketType) -> ProxyHeader:
    taken = b""  # header bytes already taken off the socket
    while True:
        peeked = await sock.recv(MAX_HEADER - len(taken), socket.MSG_PEEK)
        if not peeked:
            if not taken:
                raise NoHeader("closed before sending anything")
            raise ProxyProtocolError("closed before a complete PROXY header")
        header = parse_proxy_header(taken + peeked)
        # Complete: take exactly the rest of the header. Incomplete: all that
        # is there is header, so take it (and the next peek waits for more
        # instead of returning the same bytes again).
        want = len(peeked) if header is None else header.length - len(taken)
        while want:
            got = await sock.recv(want)
            if not got:
                raise ProxyProtocolError("closed before a complete PROXY header")
            taken += got
            want -= len(got)
        if header is not None:
            return header


class ReplayStream(trio.abc.HalfCloseableStream):
    """``stream``, with ``first`` handed out before anything it receives.

    ``peer``: the client's address as the logs show it, when it is not the
    socket's (the one a PROXY header named): ``format_peer`` reports it.
    """

    def __init__(self, stream: trio.abc.Stream, first: bytes, peer: str | None = None) -> None:
        #: The stream underneath (``format_peer`` and TLS look through it).
        self.transport_stream = stream
        #: What ``format_peer`` reports for this stream (``None``: look underneath).
        self.trionet_peer = peer
        self._first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._first:
            await trio.lowlevel.checkpoint()
            n = len(self._first) if max_bytes is None else max_bytes
            data, self._first = self._first[:n], self._first[n:]
            return data
        return await self.transport_stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        inner: Any = self.transport_stream
        if isinstance(inner, trio.abc.HalfCloseableStream):
            await inner.send_eof()
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
