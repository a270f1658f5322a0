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
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self

import attrs
import trio

from ._connection import Connection
from ._framing import DEFAULT_MAX_LINE, BadEncoding, LineTooLong
from ._proxy import Network, parse_networks
from ._tls import server_context

__all__ = ["DEFAULT_LINE_TIMEOUT", "DEFAULT_MAX_CONNECTIONS", "RELOADABLE", "Service"]

DEFAULT_MAX_CONNECTIONS = 1000
#: Seconds a line may take from its first byte to its end. Real clients send
#: a line in one go (terminals and netcat send it on Enter); only a slowloris
#: attacker, or a person typing in a raw character-mode telnet, comes near.
DEFAULT_LINE_TIMEOUT = 60.0
#: Who may send a PROXY protocol header unless told otherwise: this host.
DEFAULT_PROXY_FROM = "127.0.0.0/8,::1"

#: The ``Service`` fields a reload (SIGHUP) changes in a running process:
#: limits, timeouts and TLS. Other options (a service's own, host, port)
#: need a restart, or a new generation of workers.
RELOADABLE = (
    "max_line",
    "idle_timeout",
    "line_timeout",
    "max_connections",
    "max_per_address",
    "tls_cert",
    "tls_key",
    "tls_context",
    "proxy_protocol",
    "proxy_from",
)


def _positive(inst: Any, attr: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attr.name} must be at least 1, got {value}")


def _port(inst: Any, attr: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and not 0 <= value <= 65535:
        raise ValueError(f"port must be 0..65535, got {value}")


def _optional_positive(inst: Any, attr: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None:
        _positive(inst, attr, value)  # type: ignore[arg-type]


def _non_negative(inst: Any, attr: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{attr.name} must be >= 0 (0 turns it off), got {value}")


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
        closes a connection, and answers :attr:`quit_command`; raw-byte
        services (echo) are closed silently.
      quit_command: the line (first word, any case) that ends a session:
        the connection answers it through :meth:`on_quit` (``BYE``) and
        ends the input, so ``async for line in conn`` simply stops.
        ``None`` turns it off.
      default_idle_timeout: seconds, used when ``idle_timeout`` is ``None``.
      summary: one line for ``--help``'s list of services; empty means the
        first line of the class docstring is shown instead.

    Options common to all services (instance attributes):
      host: address to listen on; ``None`` for the server's.
      port: ``None`` for ``default_port``; 0 picks a free port.
      max_line: the longest line accepted, in bytes.
      idle_timeout: seconds without input before the client is dropped;
        ``None`` for the service default, 0 to turn it off.
      line_timeout: seconds a line may take from its first byte to its LF
        (a client trickling bytes never goes idle); 0 turns it off.
      max_connections: clients served at once; more are turned away.
      max_per_address: clients served at once from one IP address; ``None``
        for half of ``max_connections`` (room for hundreds of clients
        behind one NAT, while no single address can take every slot).
      tls_cert, tls_key: PEM certificate (chain) and private key files; with
        both, the service speaks TLS instead of plain TCP on all its
        listeners (see :mod:`trionet._tls`).
      tls_context: the server's :class:`ssl.SSLContext`, built from those
        files when the service is created; pass one instead for settings of
        your own.
      proxy_protocol: every connection on the service's own listeners
        starts with a PROXY protocol header (v1 or v2) from a load
        balancer; the client address in it is the connection's peer (for
        ``max_per_address``, the logs). See :mod:`trionet._proxy`.
      proxy_from: the addresses allowed to send that header (networks, or
        text such as ``"10.0.0.0/8,127.0.0.1"``); a connection from
        anywhere else is refused, so no client chooses its own address.
    """

    name: ClassVar[str] = "service"
    default_port: ClassVar[int] = 0
    line_based: ClassVar[bool] = True
    quit_command: ClassVar[str | None] = "QUIT"
    default_idle_timeout: ClassVar[float] = 300.0
    #: One line for ``--help`` (empty: the class docstring's first line).
    summary: ClassVar[str] = ""
    #: Figures of its own the service reports as metrics: name -> help text.
    #: Each becomes ``trionet_<name>`` with a ``service`` label; a name
    #: ending in ``_total`` is a counter, any other a gauge. Their values
    #: come from :meth:`metric_values`.
    metric_help: ClassVar[Mapping[str, str]] = {}

    host: str | None = None
    port: int | None = attrs.field(default=None, validator=_port)
    max_line: int = attrs.field(default=DEFAULT_MAX_LINE, validator=_positive)
    idle_timeout: float | None = attrs.field(default=None, validator=_timeout)
    line_timeout: float = attrs.field(default=DEFAULT_LINE_TIMEOUT, validator=_non_negative)
    max_connections: int = attrs.field(default=DEFAULT_MAX_CONNECTIONS, validator=_positive)
    max_per_address: int | None = attrs.field(default=None, validator=_optional_positive)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_context: ssl.SSLContext | None = attrs.field(
        default=attrs.Factory(_load_tls, takes_self=True), repr=False
    )
    proxy_protocol: bool = False
    proxy_from: tuple[Network, ...] = attrs.field(
        default=DEFAULT_PROXY_FROM, converter=parse_networks
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

    @property
    def effective_line_timeout(self) -> float | None:
        """Line timeout in seconds, or ``None`` when switched off (or not a line service)."""
        return (self.line_timeout or None) if self.line_based else None

    @property
    def effective_max_per_address(self) -> int:
        """Clients allowed at once from one address."""
        if self.max_per_address is not None:
            return self.max_per_address
        return max(1, self.max_connections // 2)

    async def handle(self, conn: Connection) -> None:
        """Serve one connection; return (or raise) to end it."""
        raise NotImplementedError

    async def on_quit(self, conn: Connection, reason: str) -> None:
        """Answer :attr:`quit_command` (``reason`` is the rest of its line).

        The default sends ``BYE``. Override to do more (chat announces the
        member's departure with the reason) or to answer differently.
        """
        await conn.send_line("BYE")

    async def run_background(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Work the service does while it runs, beside its connections.

        The server starts this before it accepts anyone (call
        ``task_status.started()`` once ready: e.g. connected to Redis), keeps
        it running while connections are served and drained, and cancels it
        only after the last connection has ended, so a departing client can
        still be announced through it. The default does nothing.
        """
        task_status.started()

    def metric_values(self) -> Mapping[str, float]:
        """The current value of each figure in :attr:`metric_help` (missing ones are 0).

        Called when metrics are read (at each scrape, or every second in a
        worker process), never per message: keep plain numbers and return
        them here. A ``_total`` figure is a running total that only grows.
        """
        return {}

    def workers_problem(self, workers: int) -> str | None:
        """Why this service cannot run in ``workers`` processes (``None``: it can).

        Each worker process has its own copy of the service's state. A
        service whose connections share state that must stay one (a chat
        room, statistics) returns the reason when ``workers`` is above 1.
        """
        return None

    def extra_ports(self) -> dict[str, int]:
        """Ports this service listens on besides its own, by label (default: none).

        Chat's browser page is ``{"web": PORT}``. With ``--workers`` the
        parent opens these like the service's own port and hands them to
        every worker, which gets them in :meth:`open_extra_listeners`.
        """
        return {}

    async def open_extra_listeners(
        self, host: str, inherited: Mapping[str, Sequence[trio.abc.Listener[Any]]] | None = None
    ) -> list[trio.abc.Listener[Any]]:
        """Listeners this service needs besides its TCP port (default: none).

        Their connections are served by :meth:`handle` exactly like TCP ones
        (limits, timeouts, shutdown). A listener may carry a ``label``
        attribute (e.g. ``"web"``): its address is then logged and reported
        as ``"<name> <label>"``. Chat's browser page uses this.

        ``inherited`` (label of :meth:`extra_ports` → listening sockets) is
        given in a worker process: serve those instead of opening new ones.
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
