"""TLS for services and clients: contexts, the server-side handshake, error texts.

A service with ``tls_cert`` and ``tls_key`` speaks TLS on all its listeners:
the runner hands each accepted stream to :func:`accept_tls`, in the
connection's own task (a slow handshake never holds up accepting), and
serves the resulting :class:`trio.SSLStream` exactly like a plain stream.
Every rule of the line services (limits, idle timeout, ``BYE``) therefore
holds inside TLS.

The handshake has its own short deadline (:data:`HANDSHAKE_TIMEOUT`, or the
service's idle timeout if shorter): a client that connects and never
finishes it is idle and is dropped. A failed handshake (plain text sent to
a TLS port, a certificate the client rejects, a reset part way) is one
access-log line, never a traceback, and the server carries on.

Under the TLS layer a plain TCP socket is read and written through
:class:`~trionet._socket.SocketTransport` (``os.read``/``os.write`` on the
descriptor, Trio only for waits), which saves a pass through Trio's
scheduler per message compared with :class:`trio.SocketStream`.

Clients (:func:`trionet._client.connect`) verify the server's certificate
against ``--cafile`` or the system's trust store and the name or address
they connected to, over :class:`~trionet._socket.SSLSocketStream`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from typing import Any, Final

import trio

from ._logs import log_access, next_conn_number
from ._metrics import current_metrics
from ._socket import SocketTransport
from ._transport import format_peer

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "TLSConfigError",
    "accept_tls",
    "client_context",
    "describe_tls_error",
    "server_context",
    "transport_for",
]

#: Seconds a client has to complete its TLS handshake.
HANDSHAKE_TIMEOUT: Final = 10.0

# OpenSSL's reasons when the bytes received are not TLS at all.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"}


class TLSConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def _read_pem(path: str, what: str) -> bytes:
    # Read the file ourselves first: OpenSSL's own errors do not say which
    # of the two files is missing or unreadable.
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSConfigError(f"cannot read TLS {what} {path}: {exc.strerror or exc}") from None


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context from PEM files: TLS 1.2 or later, the stdlib's default ciphers.

    ``cert`` holds the certificate (and any intermediates after it), ``key``
    its private key. Raises :class:`TLSConfigError` naming the file at fault.
    """
    cert_pem, key_pem = _read_pem(cert, "certificate"), _read_pem(key, "key")
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise TLSConfigError(f"TLS certificate {cert}: no PEM certificate in it")
    if b"PRIVATE KEY-----" not in key_pem:
        raise TLSConfigError(f"TLS key {key}: no PEM private key in it")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"TLS key {key} does not match certificate {cert}") from None
        raise TLSConfigError(
            f"cannot load TLS certificate {cert} with key {key}: {_reason_text(exc)}"
        ) from None
    except OSError as exc:  # e.g. the file vanished between the two reads
        raise TLSConfigError(f"cannot load TLS certificate {cert}: {exc}") from None
    return ctx


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the server: ``cafile`` or the system's trust store."""
    if cafile is not None:
        _read_pem(cafile, "CA file")
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def transport_for(stream: trio.abc.Stream) -> trio.abc.Stream:
    """The stream to put under :class:`trio.SSLStream`: plain sockets get a lean transport.

    A :class:`SocketTransport` without checkpoints of its own: SSLStream
    makes every transport call holding a lock whose acquisition was one.
    """
    if type(stream) is trio.SocketStream:
        return SocketTransport(stream, checkpoints=False)
    return stream


def _reason_text(exc: ssl.SSLError) -> str:
    if exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc.strerror or exc)


def describe_tls_error(exc: BaseException) -> str:
    """Say in a few words why a TLS handshake failed (for one log or error line)."""
    # SSLStream reports every failure as BrokenResourceError; the cause says why.
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return str(cause.verify_message or cause.reason)
    if isinstance(cause, ssl.SSLError):
        if cause.reason in _NOT_TLS:
            return "not TLS (plain text sent to a TLS port?)"
        if cause.reason == "UNEXPECTED_EOF_WHILE_READING" or isinstance(
            cause, ssl.SSLEOFError | ssl.SSLZeroReturnError
        ):
            return "closed by the peer during the handshake"
        return _reason_text(cause)
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno).lower()
    return str(cause) or type(cause).__name__


def _ack_now(stream: trio.abc.Stream) -> None:
    # OpenSSL sends the TLS 1.3 session tickets with the first reply, so
    # after reading the client's Finished the server has nothing to send and
    # the kernel delays its ACK (40 ms); a client without TCP_NODELAY (most
    # scripts) holds its first request back until that ACK (Nagle). Quick-ACK
    # mode sends it now. Linux only; harmless where it fails.
    sock = getattr(stream, "socket", None)
    if sock is not None and hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def accept_tls(
    ctx: ssl.SSLContext,
    stream: trio.abc.Stream,
    name: str,
    shutdown: trio.Event | None = None,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
    peer: str | None = None,
) -> trio.SSLStream[Any] | None:
    """Do the server side of the TLS handshake on ``stream`` for the service ``name``.

    Returns the ready :class:`trio.SSLStream`, or ``None`` when the
    handshake failed, timed out or was cut by ``shutdown``: then the stream
    is closed and the failure was logged in one access-log line. Only a
    cancellation of the caller's own scope propagates. ``peer`` is the
    address to log (default: the stream's; behind a PROXY header, the client's).
    """
    peer = peer or format_peer(stream)
    started = trio.current_time()
    tls = trio.SSLStream(transport_for(stream), ctx, server_side=True, https_compatible=False)
    # Stays the reason unless the handshake ends by itself (shutdown cancels it).
    failure: str | None = "abandoned: the server is shutting down"
    try:
        async with trio.open_nursery() as nursery:
            if shutdown is not None:
                nursery.start_soon(_cancel_on, shutdown, nursery.cancel_scope)
            try:
                with trio.fail_after(timeout):
                    await tls.do_handshake()
            except trio.TooSlowError:
                failure = f"timed out after {timeout:g}s"
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                failure = describe_tls_error(exc)
            else:
                failure = None
                _ack_now(stream)
            nursery.cancel_scope.cancel()
    except BaseException:  # the caller itself is cancelled
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(tls)
        raise
    if failure is None:
        return tls
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(tls)
    if (metrics := current_metrics()) is not None:
        metrics.tls_failed(name)
    log_access(
        name,
        peer,
        conn=next_conn_number(),
        tls=True,
        end="tls-failed",
        duration=trio.current_time() - started,
        message=f"{name} {peer} tls handshake failed: {failure}",
        error=failure,
    )
    return None
