"""The runner: listeners, limits, timeouts, crash isolation, graceful shutdown.

Structure (Hypercorn's trio worker uses the same shape)::

    connection nursery            <- every connection's task lives here
        accept nursery            <- one accept loop per listener
            ... until shutdown() ...
        (accept nursery cancelled: listeners closed at once)
        idle connections cancelled, busy ones given `grace` seconds
        remaining connections cancelled; each says "BYE shutdown"

Each connection runs inside its own cancel scope (``conn.cancel_scope``):
the idle timeout is that scope's deadline, and shutdown cancels it. When
the scope fires, the handler unwinds cleanly (nurseries inside it included)
and the runner, not the handler, sends the ``BYE`` line and closes the
stream. A handler that raises is logged with its traceback and only its own
connection ends.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from ._connection import Connection, format_peer
from ._service import Service
from ._tls import accept_tls, transport_for

__all__ = ["Server", "serve"]

log = logging.getLogger("trionet")
access_log = logging.getLogger("trionet.access")

# accept() errors that mean "out of resources right now": wait and retry
# rather than crash the server (trio.serve_listeners does the same).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_SLEEP = 0.1
# Bound on time spent saying goodbye (BYE line, TLS close) to one client.
_GOODBYE_TIMEOUT = 1.0


def _is_disconnect(exc: BaseException) -> bool:
    """True if ``exc`` only says the peer went away (not a handler bug)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e) for e in exc.exceptions)
    return isinstance(exc, trio.BrokenResourceError | ConnectionError)


class Server:
    """Runs one or more services, each on its own listeners, under one nursery.

    Args:
      services: the services to run.
      host: address to bind TCP listeners to.
      grace: seconds busy connections may finish their work on shutdown.
      listeners: optional ready-made listeners per service name (for
        instance :class:`trionet.testing.MemoryListener`); services with
        none get TCP listeners on ``host`` and their port.

    Use :meth:`run` with ``nursery.start`` (it returns :attr:`addresses`)
    and :meth:`shutdown` to stop gracefully.
    """

    def __init__(
        self,
        services: Sequence[Service],
        *,
        host: str = "127.0.0.1",
        grace: float = 5.0,
        listeners: Mapping[str, Sequence[trio.abc.Listener[Any]]] | None = None,
    ) -> None:
        names = [s.name for s in services]
        if len(set(names)) != len(names):
            raise ValueError(f"each service may run once, got {names}")
        if not grace >= 0:
            raise ValueError(f"grace must be >= 0, got {grace}")
        self.services = list(services)
        self.host = host
        self.grace = grace
        #: Bound ``(host, port)`` addresses per service name, once started.
        self.addresses: dict[str, list[tuple[str, int]]] = {}
        self._given_listeners = dict(listeners or {})
        self._connections: set[Connection] = set()
        self._by_service: dict[str, set[Connection]] = {s.name: set() for s in services}
        self._active: dict[str, int] = {s.name: 0 for s in services}
        self._shutdown = trio.Event()
        self._all_closed = trio.Event()

    @property
    def connection_count(self) -> int:
        """Connections currently being served (all services)."""
        return len(self._connections)

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`shutdown` was called."""
        return self._shutdown.is_set()

    def shutdown(self) -> None:
        """Begin a graceful shutdown; :meth:`run` returns when it is complete."""
        self._shutdown.set()

    async def _open_listeners(self, service: Service) -> list[trio.abc.Listener[Any]]:
        given = self._given_listeners.get(service.name)
        if given is not None:
            return list(given)
        listeners: list[trio.abc.Listener[Any]] = list(
            await trio.open_tcp_listeners(service.effective_port, host=self.host)
        )
        try:
            listeners += await service.open_extra_listeners(self.host)
        except BaseException:
            for listener in listeners:
                await listener.aclose()
            raise
        return listeners

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`shutdown` completes.

        With ``await nursery.start(server.run)`` the result is
        :attr:`addresses` (name → list of bound ``(host, port)``), so port 0
        can be used and the real port read back.
        """
        opened: list[tuple[Service, trio.abc.Listener[Any]]] = []
        try:
            for service in self.services:
                for listener in await self._open_listeners(service):
                    opened.append((service, listener))
        except BaseException:
            for _, listener in opened:
                await listener.aclose()
            raise
        for service, listener in opened:
            sock = getattr(listener, "socket", None)
            # An extra listener (chat's web page) names itself: "chat web".
            label = " ".join(filter(None, [service.name, getattr(listener, "label", None)]))
            if sock is not None:
                host, port = sock.getsockname()[:2]
                self.addresses.setdefault(label, []).append((host, port))
                shown = f"[{host}]" if ":" in host else host
                tls = " (tls)" if service.tls_context is not None else ""
                log.info("%s listening on %s:%d%s", label, shown, port, tls)
            else:
                self.addresses.setdefault(service.name, [])
                log.info("%s listening on %r", service.name, listener)

        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                for service, listener in opened:
                    accepting.start_soon(self._accept_loop, service, listener, connections)
                for service in self.services:
                    # Like the accept loops, reapers stop when shutdown begins:
                    # from then on every waiting connection is ended anyway.
                    accepting.start_soon(self._reap_idle, service)
                task_status.started(self.addresses)
                await self._shutdown.wait()
                log.info(
                    "shutting down: listeners closed, %d connection(s) open", self.connection_count
                )
                accepting.cancel_scope.cancel()
            await self._drain()

    async def _reap_idle(self, service: Service) -> None:
        """End ``service``'s connections that have waited on their client too long.

        One task per service instead of a deadline per connection: waits
        stay as cheap as a float store, and idle connections cost no timer
        memory. It wakes at the next due expiry, but at most once per
        1/1000 of the timeout, so a scan over many connections stays rare.
        """
        idle = service.effective_idle_timeout
        if idle is None:
            return
        mine = self._by_service[service.name]
        granularity = idle / 1000
        while True:
            now = trio.current_time()
            next_due = now + idle
            for conn in mine:
                due = conn.wait_since + idle
                if due <= now:
                    conn.expire()
                elif due < next_due:
                    next_due = due
            await trio.sleep_until(max(next_due, now + granularity))

    async def _drain(self) -> None:
        for conn in list(self._connections):
            conn.request_shutdown()
        if self._connections:
            with trio.move_on_after(self.grace):
                await self._all_closed.wait()
        for conn in list(self._connections):
            conn.cancel_scope.cancel()

    async def _accept_loop(
        self,
        service: Service,
        listener: trio.abc.Listener[Any],
        connections: trio.Nursery,
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                        log.error(
                            "%s: accept failed (%s); retrying in %.1fs",
                            service.name,
                            errno.errorcode.get(exc.errno or 0, exc.errno),
                            _ACCEPT_RETRY_SLEEP,
                        )
                        await trio.sleep(_ACCEPT_RETRY_SLEEP)
                        continue
                    raise
                if self._active[service.name] >= service.max_connections:
                    connections.start_soon(self._turn_away, service, stream)
                else:
                    self._active[service.name] += 1
                    connections.start_soon(self._run_connection, service, stream)

    async def _turn_away(self, service: Service, stream: trio.abc.Stream) -> None:
        peer = format_peer(stream)
        with trio.CancelScope(shield=True), trio.move_on_after(_GOODBYE_TIMEOUT):
            try:
                if service.line_based:
                    if service.tls_context is not None:  # the BYE goes inside TLS too
                        stream = trio.SSLStream(
                            transport_for(stream), service.tls_context, server_side=True
                        )
                    await stream.send_all(b"BYE busy\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                await stream.aclose()  # bounded above; for TLS, sends close_notify
        access_log.info(
            "%s %s turned away: %d/%d connections in use",
            service.name,
            peer,
            self._active[service.name],
            service.max_connections,
        )

    async def _run_connection(self, service: Service, stream: trio.abc.Stream) -> None:
        if service.tls_context is not None:
            # The handshake runs here, in the connection's own task, so a slow
            # one never holds up accepting. A failure is logged and closed.
            tls_stream = await accept_tls(service, stream, self._shutdown)
            if tls_stream is None:
                self._active[service.name] -= 1
                return
            stream = tls_stream
        conn = Connection(
            stream,
            max_line=service.max_line,
            on_line_error=service.on_line_error,
            service=service.name,
        )
        conn.peer  # noqa: B018 - read the address now, while the socket is connected
        self._connections.add(conn)
        self._by_service[service.name].add(conn)
        started = trio.current_time()
        end = "closed"
        try:
            try:
                with conn.cancel_scope:
                    await service.handle(conn)
            except Exception as exc:
                end = self._classify_failure(conn, exc)
            except BaseExceptionGroup as group:
                # The server itself is being cancelled while the handler's
                # own nursery also had a failure: the group mixes Cancelled
                # with ordinary errors. Log the errors as for one connection
                # and let only the cancellation travel on, so one
                # connection's failure never becomes the server's.
                cancelled, others = group.split(trio.Cancelled)
                if others is not None:
                    if not isinstance(others, Exception):
                        raise  # KeyboardInterrupt and the like: not ours to swallow
                    end = self._classify_failure(conn, others)
                if cancelled is not None:
                    raise cancelled from None
            else:
                if conn.cancel_scope.cancelled_caught:
                    end = "shutdown" if conn.shutting_down else "idle-timeout"
                else:
                    end = conn.end_reason or ("eof" if conn.eof_received else "closed")
                    await self._say_goodbye(conn, None)  # replies still queued
            # No goodbye after a send cut short: the client would read
            # "BYE" glued to half a line or into a file's bytes.
            if (
                end in ("shutdown", "idle-timeout")
                and service.line_based
                and not conn.send_interrupted
            ):
                await self._say_goodbye(conn, f"BYE {end}")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_GOODBYE_TIMEOUT):
                await conn.stream.aclose()  # bounded above; for TLS, sends close_notify
            self._connections.discard(conn)
            self._by_service[service.name].discard(conn)
            self._active[service.name] -= 1
            if not self._connections and self._shutdown.is_set():
                self._all_closed.set()
            access_log.info(
                "%s %s #%d end=%s duration=%.3fs in=%d out=%d%s",
                service.name,
                conn.peer,
                conn.id,
                end,
                trio.current_time() - started,
                conn.bytes_in,
                conn.bytes_out,
                " tls" if isinstance(conn.stream, trio.SSLStream) else "",
            )

    @staticmethod
    def _classify_failure(conn: Connection, exc: Exception) -> str:
        if _is_disconnect(exc):
            return "reset"
        conn.log.error("handler crashed", exc_info=exc)
        return "error"

    @staticmethod
    async def _say_goodbye(conn: Connection, line: str | None) -> None:
        """Send what is still queued, then ``line``; bounded, never raises."""
        quiet = contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError
        )
        with trio.CancelScope(shield=True), trio.move_on_after(_GOODBYE_TIMEOUT), quiet:
            if line is not None:
                conn.write_line(line)
            await conn.flush()


async def serve(
    services: Sequence[Service],
    *,
    host: str = "127.0.0.1",
    grace: float = 5.0,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``services`` on ``host`` until cancelled.

    ``await nursery.start(serve, [EchoService(port=0)])`` returns the bound
    addresses per service name. Cancelling the surrounding scope stops
    everything at once; for a graceful stop use :class:`Server` directly and
    call its :meth:`~Server.shutdown`.
    """
    server = Server(services, host=host, grace=grace)
    await server.run(task_status=task_status)
