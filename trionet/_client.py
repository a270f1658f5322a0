"""Shared plumbing for the command-line clients.

Clients report every failure as one line on stderr and a distinct exit
status, never a traceback: a person running ``python -m trionet.client``
wants to know *what* went wrong (nothing listening, connection dropped,
a certificate that does not verify), not where in our code we noticed.

Every client gets ``--host``, ``--port``, ``--tls`` and ``--cafile`` from
:func:`add_address_arguments` and opens its connection with
:func:`connect_args`, so TLS works the same way in all of them.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from ._socket import SSLSocketStream
from ._tls import TLSConfigError, client_context, describe_tls_error

__all__ = [
    "EXIT_DROPPED",
    "EXIT_OK",
    "EXIT_PROTOCOL",
    "EXIT_REFUSED",
    "EXIT_TLS",
    "EXIT_USAGE",
    "ClientError",
    "add_address_arguments",
    "connect",
    "connect_args",
    "run_client",
]

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2  # argparse's own status for bad options
EXIT_REFUSED: Final = 3  # could not connect
EXIT_DROPPED: Final = 4  # the connection broke mid-session
EXIT_PROTOCOL: Final = 5  # the server said something we do not understand
EXIT_TLS: Final = 10  # the TLS handshake failed (certificate not trusted, wrong host, ...)
EXIT_INTERRUPTED: Final = 130


class ClientError(Exception):
    """A failure to report as one line and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def add_address_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Add ``--host``, ``--port``, ``--tls`` and ``--cafile`` (read by :func:`connect_args`)."""
    parser.add_argument("--host", default="127.0.0.1", help="server address (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=default_port, help="server port (default: %(default)s)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="talk TLS; the server's certificate must be valid for --host (default: off)",
    )
    parser.add_argument(
        "--cafile",
        metavar="FILE",
        default=None,
        help="PEM file of the certificate authorities to trust; implies --tls "
        "(default: the system's trust store)",
    )


async def connect_args(args: argparse.Namespace, service: str) -> trio.abc.Stream:
    """:func:`connect` with the options :func:`add_address_arguments` added."""
    return await connect(args.host, args.port, service, tls=args.tls, cafile=args.cafile)


async def connect(
    host: str, port: int, service: str, *, tls: bool = False, cafile: str | None = None
) -> trio.abc.Stream:
    """Open a TCP connection (over TLS with ``tls``); failures become :class:`ClientError`.

    With ``tls`` the handshake is done here, so a certificate that does not
    verify (against ``cafile``, or the system's trust store, and for the
    name or address ``host``) is reported now, with :data:`EXIT_TLS`. A TLS
    stream cannot half-close (``send_eof``): check for
    :class:`trio.abc.HalfCloseableStream`.
    """
    ctx: ssl.SSLContext | None = None
    if tls or cafile is not None:
        try:
            ctx = client_context(cafile)
        except TLSConfigError as exc:
            raise ClientError(f"{service}: {exc}", EXIT_USAGE) from None
    stream = await _connect_tcp(host, port, service)
    if ctx is None:
        return stream
    # The certificate must name --host (a DNS name or an IP address).
    try:
        with trio.fail_after(10):
            return await SSLSocketStream.open(stream, ctx, host)
    except trio.TooSlowError:
        raise ClientError(
            f"{service}: TLS handshake with {host}:{port} timed out", EXIT_TLS
        ) from None
    except (ssl.SSLError, OSError) as exc:
        if isinstance(exc, ssl.SSLCertVerificationError):
            what = "certificate verification failed for"
        else:
            what = "handshake failed with"
        reason = describe_tls_error(exc)
        raise ClientError(f"{service}: TLS {what} {host}:{port}: {reason}", EXIT_TLS) from None


async def _connect_tcp(host: str, port: int, service: str) -> trio.SocketStream:
    """Open the TCP connection, turning failures into a :class:`ClientError`."""
    try:
        with trio.fail_after(10):
            return await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise ClientError(
            f"{service}: timed out connecting to {host}:{port}", EXIT_REFUSED
        ) from None
    except OSError as exc:
        # Trio reports "all attempts failed"; the first attempt's own error
        # (e.g. "Connection refused") is what a person wants to read.
        cause = exc.__cause__
        while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        inner = cause if isinstance(cause, OSError) else exc
        if inner.errno and inner.errno > 0:  # trio's own text repeats the address
            reason = os.strerror(inner.errno)
        else:  # name resolution (socket.gaierror) and the like
            reason = inner.strerror or str(inner)
        raise ClientError(
            f"{service}: cannot connect to {host}:{port}: {reason}", EXIT_REFUSED
        ) from None


def run_client(main: Callable[[], Awaitable[int]], service: str) -> int:
    """Run an async client ``main`` and map failures to exit statuses."""
    try:
        return trio.run(main)
    except ClientError as exc:
        print(exc, file=sys.stderr)
        return exc.status
    except (trio.BrokenResourceError, ConnectionError) as exc:
        print(f"{service}: connection lost: {exc}", file=sys.stderr)
        return EXIT_DROPPED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:
        # A failure in one of several tasks arrives wrapped in a group.
        first = group.exceptions[0]
        if isinstance(first, ClientError):
            print(first, file=sys.stderr)
            return first.status
        if isinstance(first, trio.BrokenResourceError | ConnectionError):
            print(f"{service}: connection lost: {first}", file=sys.stderr)
            return EXIT_DROPPED
        if isinstance(first, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        raise
