"""The service base class: what a trionet service is.

A service is an attrs class. Its *instance* is the shared state of one
running service (options, a chat room, server-wide statistics) and its
:meth:`Service.handle` coroutine runs once per connection, receiving a
:class:`~trionet.Connection`. That is the whole contract: writing a new
service means subclassing :class:`Service`, setting ``name`` and
``default_port``, and writing ``handle``. The runner supplies the rest:
listening, connection limits, idle timeout, line limits, graceful shutdown,
crash isolation and access logs.

Per-connection state lives in ``handle``'s local variables, or in a small
per-connection object ``handle`` creates (Twisted's Protocol/Factory split:
the Service is the factory and holds what connections share).
"""

from __future__ import annotations

import argparse
import ssl
from typing import Any, ClassVar, Self

import attrs
import trio

from ._connection import Connection
from ._framing import DEFAULT_MAX_LINE, BadEncoding, LineTooLong
from ._tls import server_context

__all__ = ["DEFAULT_MAX_CONNECTIONS", "Service"]

DEFAULT_MAX_CONNECTIONS = 1000


def _positive(inst: Any, attr: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attr.name} must be at least 1, got {value}")


def _port(inst: Any, attr: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and not 0 <= value <= 65535:
        raise ValueError(f"port must be 0..65535, got {value}")


def _timeout(inst: Any, attr: attrs.Attribute[float | None], value: float | None) -> None:
    if value is not None and not value >= 0:  # also rejects NaN
        raise ValueError(f"{attr.name} must be >= 0 (0 turns it off), got {value}")


def _load_tls(service: Service) -> ssl.SSLContext | None:
    # Built when the service is created, so a missing or bad file is
    # reported before anything listens (as a ValueError naming the file).
    if service.tls_cert is None and service.tls_key is None:
        return None
    if service.tls_cert is None or service.tls_key is None:
        raise ValueError("TLS needs both a certificate and a key (tls_cert and tls_key)")
    return server_context(service.tls_cert, service.tls_key)


@attrs.define(kw_only=True, eq=False)
class Service:
    """Base class of every trionet service.

    Class attributes (set them in subclasses):
      name: the service name used on the command line and in logs.
      default_port: the port it listens on unless told otherwise.
      line_based: ``True`` for line protocols. The runner then says
        ``BYE busy`` / ``BYE idle-timeout`` / ``BYE shutdown`` before it
        closes a connection; raw-byte services (echo) are closed silently.
      default_idle_timeout: seconds, used when ``idle_timeout`` is ``None``.

    Options common to all services (instance attributes):
      port: ``None`` for ``default_port``; 0 picks a free port.
      max_line: the longest line accepted, in bytes.
      idle_timeout: seconds without input before the client is dropped;
        ``None`` for the service default, 0 to turn it off.
      max_connections: clients served at once; more are turned away.
      tls_cert, tls_key: PEM certificate (chain) and private key files; with
        both, the service speaks TLS instead of plain TCP on all its
        listeners (see :mod:`trionet._tls`).
      tls_context: the server's :class:`ssl.SSLContext`, built from those
        files when the service is created; pass one instead for settings of
        your own.
    """

    name: ClassVar[str] = "service"
    default_port: ClassVar[int] = 0
    line_based: ClassVar[bool] = True
    default_idle_timeout: ClassVar[float] = 300.0
    #: One line for ``--help`` and the README's table.
    summary: ClassVar[str] = ""

    port: int | None = attrs.field(default=None, validator=_port)
    max_line: int = attrs.field(default=DEFAULT_MAX_LINE, validator=_positive)
    idle_timeout: float | None = attrs.field(default=None, validator=_timeout)
    max_connections: int = attrs.field(default=DEFAULT_MAX_CONNECTIONS, validator=_positive)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_context: ssl.SSLContext | None = attrs.field(
        default=attrs.Factory(_load_tls, takes_self=True), repr=False
    )

    @property
    def effective_port(self) -> int:
        """The port to bind: ``port`` if given, else ``default_port``."""
        return self.default_port if self.port is None else self.port

    @property
    def effective_idle_timeout(self) -> float | None:
        """Idle timeout in seconds, or ``None`` when switched off."""
        t = self.default_idle_timeout if self.idle_timeout is None else self.idle_timeout
        return t or None

    async def handle(self, conn: Connection) -> None:
        """Serve one connection; return (or raise) to end it."""
        raise NotImplementedError

    async def open_extra_listeners(self, host: str) -> list[trio.abc.Listener[Any]]:
        """Listeners this service needs besides its TCP port (default: none).

        Their connections are served by :meth:`handle` exactly like TCP ones
        (limits, timeouts, shutdown). A listener may carry a ``label``
        attribute (e.g. ``"web"``): its address is then logged and reported
        as ``"<name> <label>"``. Chat's browser page uses this.
        """
        return []

    async def on_line_error(self, conn: Connection, event: LineTooLong | BadEncoding) -> None:
        """Answer a framing error; the default sends PROTOCOL.md's ``ERR`` line.

        Override to count, log or answer differently (Twisted's
        ``lineLengthExceeded``). The connection carries on afterwards.
        """
        await conn.send_line(event.reply)

    # -- command line -----------------------------------------------------------

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add this service's own options to the ``trionet.serve`` parser."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, **common: Any) -> Self:
        """Build the service from parsed options (``common`` holds the shared ones)."""
        return cls(**common)
