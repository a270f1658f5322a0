"""systemd integration: socket activation and readiness notification, by hand.

Both are tiny protocols, documented in ``sd_listen_fds(3)`` and
``sd_notify(3)``; writing them out spares a C library (libsystemd) or a
dependency for a few lines.

*Socket activation.* systemd (or ``systemd-socket-activate``) opens the
listening sockets and starts the service with them as descriptors 3, 4, ...
and three variables: ``LISTEN_PID`` (the process they are meant for: a
child that inherited the environment must not take them), ``LISTEN_FDS``
(how many) and ``LISTEN_FDNAMES`` (``FileDescriptorName=`` of each,
colon-separated). :func:`activated_sockets` reads them once and removes
them from the environment, so worker processes do not see them.

*Notification.* With ``NOTIFY_SOCKET`` set (``Type=notify`` units), the
service sends datagrams of ``KEY=VALUE`` lines to that AF_UNIX socket:
``READY=1`` once it serves, ``RELOADING=1`` and ``READY=1`` around a reload,
``STOPPING=1``, ``STATUS=...`` (shown by ``systemctl status``) and
``WATCHDOG=1`` keep-alives every half of ``WATCHDOG_USEC``. A name starting
with ``@`` is in the abstract namespace (a leading NUL byte instead).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Final

import trio

__all__ = [
    "ActivationError",
    "Notifier",
    "activated_sockets",
    "assign_sockets",
]

log = logging.getLogger("trionet")

#: The first descriptor systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START: Final = 3
_LISTEN_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_NOTIFY_VARS: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class ActivationError(ValueError):
    """Sockets passed by systemd that cannot be given to the services run."""


def activated_sockets() -> list[tuple[str | None, socket.socket]]:
    """The listening sockets systemd passed to this process, with their names.

    Empty when the process was not socket-activated (or the variables are
    meant for another process). An unnamed socket (no ``LISTEN_FDNAMES``,
    or systemd's placeholder ``unknown``) has the name ``None``. The
    variables are removed from the environment either way.
    """
    pid, count, names = (os.environ.pop(name, None) for name in _LISTEN_VARS)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        raise ActivationError(f"bad LISTEN_PID/LISTEN_FDS: {pid!r}/{count!r}") from None
    labels: list[str | None] = [
        None if not name or name == "unknown" else name for name in (names or "").split(":")
    ]
    labels += [None] * (n - len(labels))
    found = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"passed descriptor {fd} is not a socket: {exc}") from None
        if sock.type != socket.SOCK_STREAM:
            raise ActivationError(f"passed descriptor {fd} is not a stream socket")
        os.set_inheritable(fd, False)  # ours now: a worker gets it explicitly or not at all
        found.append((labels[i], sock))
    return found


def assign_sockets(
    passed: list[tuple[str | None, socket.socket]], services: list[str]
) -> dict[str, list[socket.socket]]:
    """Give each passed socket to its service: by name, or the one service run.

    Raises :class:`ActivationError` for a named socket no service has, or
    unnamed sockets when there are several services to choose from. A
    service given no socket opens its own port as usual.
    """
    out: dict[str, list[socket.socket]] = {}
    for name, sock in passed:
        if name is None:
            if len(services) != 1:
                raise ActivationError(
                    "an unnamed socket was passed but several services run "
                    f"({', '.join(services)}): name each socket after its service "
                    "(FileDescriptorName= in the .socket unit)"
                )
            name = services[0]
        elif name not in services:
            raise ActivationError(
                f"a socket named {name!r} was passed but no such service runs "
                f"(services: {', '.join(services)})"
            )
        out.setdefault(name, []).append(sock)
    return out


class Notifier:
    """Sends ``sd_notify`` messages to ``NOTIFY_SOCKET``; does nothing without it.

    Sending never blocks and never raises: a full or vanished socket only
    costs a debug line (systemd is then not listening anyway).
    """

    def __init__(self, address: str | None = None, watchdog_usec: str | None = None) -> None:
        self._sock: socket.socket | None = None
        self._address: str | bytes = ""
        self.watchdog_interval: float | None = None
        if address and address[0] in "/@":
            # A leading '@' names a socket in the abstract namespace.
            self._address = "\0" + address[1:] if address[0] == "@" else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        elif address:
            log.warning("NOTIFY_SOCKET %r is not a unix socket path: not notifying", address)
        if self._sock is not None and watchdog_usec:
            try:
                self.watchdog_interval = int(watchdog_usec) / 1e6 / 2
            except ValueError:
                log.warning("WATCHDOG_USEC %r is not a number: no watchdog pings", watchdog_usec)

    @classmethod
    def from_environ(cls) -> Notifier:
        """Read (and remove, so workers do not notify too) ``NOTIFY_SOCKET`` and the watchdog."""
        address, usec, pid = (os.environ.pop(name, None) for name in _NOTIFY_VARS)
        if pid is not None and pid != str(os.getpid()):
            usec = None  # the watchdog is some other process's duty
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram."""
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            level = logging.DEBUG if exc.errno in (errno.EAGAIN, errno.ENOBUFS) else logging.WARNING
            log.log(level, "sd_notify to %s failed: %s", self._address, exc)

    def ready(self, status: str | None = None) -> None:
        """``READY=1`` (with a ``STATUS=`` line when given)."""
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        """``RELOADING=1``, with the clock reading ``Type=notify-reload`` asks for."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """``STOPPING=1``."""
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        """``STATUS=text``."""
        self.send(f"STATUS={text}")

    async def keep_alive(self, status: Callable[[], str]) -> None:
        """Send ``WATCHDOG=1`` every half ``WATCHDOG_USEC``, and ``STATUS=`` when it changes.

        ``status`` is called (no arguments) for the current status text; it
        is checked every second, or at each watchdog ping if those are more
        frequent. Runs until cancelled; returns at once without a socket.
        """
        if self._sock is None:
            return
        period = min(1.0, self.watchdog_interval or 1.0)
        next_ping = trio.current_time()
        shown = None
        while True:
            text = status()
            if text != shown:
                self.status(text)
                shown = text
            if self.watchdog_interval is not None and trio.current_time() >= next_ping:
                self.send("WATCHDOG=1")
                next_ping = trio.current_time() + self.watchdog_interval
            await trio.sleep(period)
