"""Shared plumbing for the command-line clients.

Clients report every failure as one line on stderr and a distinct exit
status, never a traceback: a person running ``python -m trionet.client``
wants to know *what* went wrong (nothing listening, connection dropped),
not where in our code we noticed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Final

import trio

__all__ = [
    "EXIT_DROPPED",
    "EXIT_OK",
    "EXIT_PROTOCOL",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "ClientError",
    "add_address_arguments",
    "connect",
    "run_client",
]

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2  # argparse's own status for bad options
EXIT_REFUSED: Final = 3  # could not connect
EXIT_DROPPED: Final = 4  # the connection broke mid-session
EXIT_PROTOCOL: Final = 5  # the server said something we do not understand
EXIT_INTERRUPTED: Final = 130


class ClientError(Exception):
    """A failure to report as one line and an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def add_address_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Add ``--host`` and ``--port`` with the service's defaults."""
    parser.add_argument("--host", default="127.0.0.1", help="server address (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=default_port, help="server port (default: %(default)s)"
    )


async def connect(host: str, port: int, service: str) -> trio.SocketStream:
    """Open a TCP connection, turning failures into a :class:`ClientError`."""
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
