"""The runner: listeners, limits, timeouts, crash isolation, graceful shutdown.

Structure (Hypercorn's trio worker uses the same shape)::

    connection nursery            <- every connection's task lives here
        accept nursery            <- one accept loop per listener, one reaper per service
            ... until shutdown() ...
        (accept nursery cancelled: listeners closed at once)
        idle connections cancelled, busy ones given `grace` seconds
        remaining connections cancelled; each says "BYE shutdown"

Each connection runs inside its own cancel scope: the idle and line
timeouts cancel it (one reaper task per service watches every connection's
waits), and so does shutdown. When the scope fires, the handler unwinds
cleanly (nurseries inside it included) and the runner, not the handler,
sends the ``BYE`` line and closes the stream. A handler that raises is
logged with its traceback and only its own connection ends.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import trio

from ._connection import Connection
from ._logs import log_access, next_conn_number
from ._metrics import Metrics, set_redis_reporter
from ._proxy_stream import HEADER_TIMEOUT, read_proxy_header_or_why, report_refusal
from ._service import Service
from ._tls import HANDSHAKE_TIMEOUT, accept_tls, transport_for
from ._transport import format_peer, peer_host

__all__ = ["Server", "StartupError", "serve"]

log = logging.getLogger("trionet")

# accept() errors that mean "out of resources right now": wait and retry
# rather than crash the server (trio.serve_listeners does the same).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_SLEEP = 0.1
# Bound on time spent saying goodbye (BYE line, TLS close) to one client.
_GOODBYE_TIMEOUT = 1.0


class StartupError(OSError):
    """A service could not start: its message names the service and the address.

    ``cannot start chat on 127.0.0.1:7003: address already in use``
    """

    def __init__(self, service: str, host: str, port: int, reason: str) -> None:
        shown = f"[{host}]" if ":" in host else host
        super().__init__(f"cannot start {service} on {shown}:{port}: {reason}")
        self.service = service
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])

    @staticmethod
    def find(exc: BaseException) -> StartupError | None:
        """The :class:`StartupError` in ``exc`` (an exception group, maybe), if any."""
        if isinstance(exc, StartupError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                if (found := StartupError.find(inner)) is not None:
                    return found
        return None

    @staticmethod
    def report(exc: BaseException) -> bool:
        """Log the :class:`StartupError` in ``exc`` in its one line; ``False`` if none is."""
        error = StartupError.find(exc)
        if error is not None:
            log.error("%s", error)
        return error is not None


@runtime_checkable
class AnswersRequests(Protocol):
    """A listener that answers requests of its own before it hands a stream
    over, if ever (the chat's web page): the server lets those requests
    finish when it closes, within its grace, and tells it whether the close
    is a retirement (a reload, where the listening socket lives on in the
    next generation) or a shutdown."""

    async def wait_requests_done(self) -> None:
        """Return once no request is under way (closed: within its own deadline)."""

    def set_retiring(self, retiring: bool) -> None:
        """``True`` before a retirement's close; ``False`` at a shutdown."""


def _reason(exc: OSError) -> str:
    text = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    return text[:1].lower() + text[1:]


def _is_disconnect(exc: BaseException) -> bool:
    """True if ``exc`` only says the peer went away (not a handler bug)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e) for e in exc.exceptions)
    return isinstance(exc, trio.BrokenResourceError | ConnectionError)


class _AcceptErrors:
    """Logs accept() running out of descriptors once per episode, with a count.

    With the process at its open-file limit every accept fails at once; a
    line per failure would flood the log ten times a second for as long as
    the clients stay. The first failure is logged, the rest are counted,
    and the first successful accept closes the episode with a summary.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self.failures = 0
        self.started = 0.0

    def failed(self, exc: OSError) -> None:
        if not self.failures:
            self.started = trio.current_time()
            log.error(
                "%s: accept failed (%s: %s); retrying every %.1fs until descriptors free up",
                self.service,
                errno.errorcode.get(exc.errno or 0, exc.errno),
                _reason(exc),
                _ACCEPT_RETRY_SLEEP,
            )
        self.failures += 1

    def succeeded(self) -> None:
        if self.failures:
            log.warning(
                "%s: accepting again after %d failed accept(s) over %.1fs",
                self.service,
                self.failures,
                trio.current_time() - self.started,
            )
            self.failures = 0


class Server:
    """Runs one or more services, each on its own listeners, under one nursery.

    Args:
      services: the services to run.
      host: address to bind TCP listeners to (a service's own ``host`` wins).
      grace: seconds busy connections may finish their work on shutdown.
      listeners: optional ready-made listeners per service name (for
        instance :class:`trionet.testing.MemoryListener`); services with
        none get TCP listeners on their host and port.
      announce: log each ``listening on`` line at INFO (a worker process,
        whose parent announced the sockets, logs them at DEBUG).
      on_listening: called once every listener is open, before anything is
        served (the runner drops root privileges there).
      metrics: where to count connections, bytes, ends (see
        :mod:`trionet._metrics`); ``None`` counts nothing.

    Use :meth:`run` with ``nursery.start`` (it returns :attr:`addresses`)
    and :meth:`shutdown` to stop gracefully. :meth:`reload` changes the
    settings new connections get; :meth:`retire` stops accepting but lets
    the open connections run on for a while (a worker replaced on reload).
    """

    def __init__(
        self,
        services: Sequence[Service],
        *,
        host: str = "127.0.0.1",
        grace: float = 5.0,
        listeners: Mapping[str, Sequence[trio.abc.Listener[Any]]] | None = None,
        announce: bool = True,
        on_listening: Callable[[], object] | None = None,
        metrics: Metrics | None = None,
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
        self._extra: set[int] = set()  # ids of listeners from open_extra_listeners
        # Listeners with requests of their own that a shutdown lets finish (chat's
        # web page), found when the listeners open.
        self._finishing: list[AnswersRequests] = []
        self._announce = announce
        self._on_listening = on_listening
        self._connections: set[Connection] = set()
        self._by_service: dict[str, set[Connection]] = {s.name: set() for s in services}
        self._active: dict[str, int] = {s.name: 0 for s in services}
        self._per_address: dict[str, dict[str, int]] = {s.name: {} for s in services}
        self._shutdown = trio.Event()
        self._all_closed = trio.Event()
        # Set by shutdown() and retire(): the accept loops stop.
        self._stop_accepting = trio.Event()
        # Set once they have stopped: nothing more is accepted here.
        self._not_accepting = trio.Event()
        self._retire_grace = 0.0
        # Set when retiring may end: the last connection closed, or shutdown().
        self._retired = trio.Event()
        self._reapers: trio.Nursery | None = None
        #: Where connections are counted (``None``: nowhere).
        self.metrics = metrics
        self._listening = False
        # Service name -> is its Redis link up? (services with one only)
        self._redis: dict[str, bool] = {}

    @property
    def connection_count(self) -> int:
        """Connections currently being served (all services)."""
        return len(self._connections)

    def connection_counts(self) -> dict[str, int]:
        """Clients each service holds a slot for (TLS handshakes under way included)."""
        return dict(self._active)

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`shutdown` was called."""
        return self._shutdown.is_set()

    def shutdown(self) -> None:
        """Begin a graceful shutdown; :meth:`run` returns when it is complete."""
        self._shutdown.set()
        for listener in self._finishing:
            listener.set_retiring(False)
        self._stop_accepting.set()
        self._retired.set()
        if self.metrics is not None:
            self.metrics.set_ready(False)

    def retire(self, grace: float) -> None:
        """Stop accepting; let open connections run on for up to ``grace`` seconds.

        Once the last one has ended, or ``grace`` has passed, the rest goes
        as in :meth:`shutdown` (busy work gets ``grace`` of the server, then
        ``BYE shutdown``). A worker of the previous generation does this on
        reload: the listening sockets stay open in the new workers, so no
        client is refused, and nobody connected is cut off at once.
        """
        if not self._stop_accepting.is_set():
            self._retire_grace = grace
            for listener in self._finishing:
                listener.set_retiring(True)
            self._stop_accepting.set()
            if self.metrics is not None:
                self.metrics.set_ready(False)

    async def wait_not_accepting(self) -> None:
        """Return once the accept loops have stopped (after :meth:`retire` or a shutdown)."""
        await self._not_accepting.wait()

    def reload(self, settings: Mapping[str, Mapping[str, Any]]) -> None:
        """Apply new settings (service name -> ``Service`` field -> value) to new connections.

        Meant for the common options (:data:`RELOADABLE`): limits apply from
        the next accept on; TLS settings to the next handshake; ``max_line``
        and the timeouts to connections accepted from now on (the ones
        already open keep the timeouts they started with: a new reaper
        watches the new ones).
        """
        by_name = {s.name: s for s in self.services}
        for name, changes in settings.items():
            service = by_name[name]
            for field, value in changes.items():
                setattr(service, field, value)
            # A fresh set of connections, with its own reaper and timeouts;
            # the old reaper keeps the old ones until they are all gone.
            fresh: set[Connection] = set()
            self._by_service[name] = fresh
            if self._reapers is not None:
                self._reapers.start_soon(self._reap, service, fresh)

    def readiness(self) -> str | None:
        """Why the server is not ready to serve (``None``: it is).

        Ready means every service listens, none is draining, and every
        Redis link a service uses is up: what ``/readyz`` answers.
        """
        if self._shutdown.is_set():
            return "draining: shutting down"
        if self._stop_accepting.is_set():
            return "draining: replaced by a new generation of workers"
        if not self._listening:
            return "starting"
        down = sorted(name for name, up in self._redis.items() if not up)
        if down:
            return f"Redis link down ({', '.join(down)})"
        return None

    def _redis_changed(self, service: str, up: bool) -> None:
        # Called by trionet._redis.RedisLink (through a context variable).
        self._redis[service] = up
        if self.metrics is not None:
            self.metrics.redis_changed(service, up)

    async def _open_listeners(self, service: Service) -> list[trio.abc.Listener[Any]]:
        given = self._given_listeners.get(service.name)
        host = service.host or self.host
        listeners: list[trio.abc.Listener[Any]]
        if given is not None:
            listeners = list(given)
        else:
            try:
                listeners = list(await trio.open_tcp_listeners(service.effective_port, host=host))
            except OSError as exc:
                raise StartupError(
                    service.name, host, service.effective_port, _reason(exc)
                ) from exc
        try:
            inherited = {
                label: self._given_listeners[key]
                for label in service.extra_ports()
                if (key := f"{service.name} {label}") in self._given_listeners
            }
            if inherited:  # a worker: the parent opened them
                extra = await service.open_extra_listeners(host, inherited)
            else:
                extra = await service.open_extra_listeners(host)
            # They speak their own protocol (chat's web page does its own
            # TLS, as HTTPS): the service's TLS wraps its own listeners only.
            self._extra.update(map(id, extra))
            listeners += extra
        except BaseException:
            for listener in listeners:
                await listener.aclose()
            raise
        return listeners

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`shutdown` completes.

        With ``await nursery.start(server.run)`` the result is
        :attr:`addresses` (name → list of bound ``(host, port)``), so port 0
        can be used and the real port read back. A listener that cannot be
        opened raises :exc:`StartupError` before anything is served.
        """
        # Code under this task that cannot see the server (the TLS handshake,
        # chat's web page, Redis links) finds its metrics and reporter here.
        set_redis_reporter(self._redis_changed)
        if self.metrics is not None:
            self.metrics.activate()
            self.metrics.declare(self.services)
        opened: list[tuple[Service, trio.abc.Listener[Any]]] = []
        try:
            for service in self.services:
                for listener in await self._open_listeners(service):
                    opened.append((service, listener))
        except BaseException:
            for _, listener in opened:
                await listener.aclose()
            raise
        if self._on_listening is not None:
            try:
                self._on_listening()
            except BaseException:
                for _, listener in opened:
                    await listener.aclose()
                raise
        self._finishing = [
            listener for _, listener in opened if isinstance(listener, AnswersRequests)
        ]
        if self._stop_accepting.is_set() and not self._shutdown.is_set():
            # retire() came during start-up, before these were known: they
            # close as in a retirement too (a shutdown() later undoes it).
            for finishing in self._finishing:
                finishing.set_retiring(True)
        for service, listener in opened:
            sock = getattr(listener, "socket", None)
            # An extra listener (chat's web page) names itself: "chat web".
            label = " ".join(filter(None, [service.name, getattr(listener, "label", None)]))
            if sock is not None:
                host, port = sock.getsockname()[:2]
                self.addresses.setdefault(label, []).append((host, port))
                shown = f"[{host}]" if ":" in host else host
                tls = " (tls)" if service.tls_context is not None else ""
                log.log(
                    logging.INFO if self._announce else logging.DEBUG,
                    "%s listening on %s:%d%s",
                    label,
                    shown,
                    port,
                    tls,
                )
            else:
                self.addresses.setdefault(label, [])
                log.info("%s listening on %r", label, listener)

        async with trio.open_nursery() as background:
            try:
                for service in self.services:
                    await background.start(service.run_background)
            except BaseException:
                for _, listener in opened:
                    await listener.aclose()
                raise
            await self._serve(opened, task_status)
            # Every connection has ended: background work may stop now.
            background.cancel_scope.cancel()

    async def _serve(
        self,
        opened: list[tuple[Service, trio.abc.Listener[Any]]],
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as reapers:
                self._reapers = reapers
                for service in self.services:
                    reapers.start_soon(self._reap, service, self._by_service[service.name])
                async with trio.open_nursery() as accepting:
                    for service, listener in opened:
                        accepting.start_soon(self._accept_loop, service, listener, connections)
                    task_status.started(self.addresses)
                    self._listening = True
                    if self.metrics is not None and not self._stop_accepting.is_set():
                        self.metrics.set_ready(True)
                    await self._stop_accepting.wait()
                    accepting.cancel_scope.cancel()
                self._not_accepting.set()
                if not self._shutdown.is_set():
                    log.info(
                        "retiring: listeners closed here, %d connection(s) may run on for %gs",
                        self.connection_count,
                        self._retire_grace,
                    )
                    # Every connection holding a slot counts, including one
                    # accepted just before the loops stopped whose task has not
                    # started yet (or is in its TLS handshake or PROXY header):
                    # it is served, not met with the shutdown's BYE. So does a
                    # request under way on a listener of its own (the web page).
                    # A shutdown() meanwhile ends the wait at once.
                    async with trio.open_nursery() as waiting:
                        waiting.start_soon(_cancel_when, self._shutdown, waiting.cancel_scope)
                        with trio.move_on_after(self._retire_grace):
                            if any(self._active.values()):
                                await self._retired.wait()
                            await self._requests_done()
                        waiting.cancel_scope.cancel()
                    self.shutdown()  # the rest is an ordinary shutdown
                log.info(
                    "shutting down: listeners closed, %d connection(s) open", self.connection_count
                )
                # Reapers stop when the drain begins: from then on every
                # waiting connection is ended anyway.
                reapers.cancel_scope.cancel()
                self._reapers = None
            await self._drain()

    async def _reap(self, service: Service, mine: set[Connection]) -> None:
        """End the connections in ``mine`` whose wait or line has lasted too long.

        One task per service instead of a deadline per connection: waits
        stay as cheap as a float store, and idle connections cost no timer
        memory. It wakes at the next due expiry, but at most once per
        1/1000 of the shorter timeout, so a scan over many connections
        stays rare. The timeouts are the service's when the reaper starts;
        after a reload a new reaper watches the new connections and this one
        returns once its last connection is gone.
        """
        # A connection records when it started waiting on its client: for
        # input (``_wait_since``), for room to send (its transport's
        # ``send_stalled_since``), and when the line it is waiting to
        # complete began (``_line_since``); infinity otherwise. This reaper
        # cancels the connection's scope once a wait has lasted the idle
        # timeout or a line the line timeout; the handler unwinds and the
        # runner says BYE. This costs a few float stores per wait (a cancel
        # scope per wait cost a fifth of echo's round-trip rate) and no
        # memory per idle connection.
        #
        # Consequences: time spent working for the client never counts as
        # idle; a send that makes no progress (the client stopped reading)
        # counts as waiting on it; a request that arrives in the very
        # instant the deadline or a shutdown hits may go unanswered, but the
        # client still gets its BYE (nothing was half-sent).
        idle = service.effective_idle_timeout
        line = service.effective_line_timeout
        if idle is None and line is None:
            return
        idle_after = idle if idle is not None else float("inf")
        line_after = line if line is not None else float("inf")
        granularity = min(idle_after, line_after) / 1000
        while mine or mine is self._by_service[service.name]:
            now = trio.current_time()
            next_due = now + min(idle_after, line_after)
            for conn in mine:
                due = conn._idle_since() + idle_after
                if due <= now:
                    conn._expire("idle-timeout")
                    continue
                next_due = min(next_due, due)
                due = conn._line_since + line_after
                if due <= now:
                    conn._expire("line-timeout")
                else:
                    next_due = min(next_due, due)
            await trio.sleep_until(max(next_due, now + granularity))

    async def _drain(self) -> None:
        for conn in list(self._connections):
            conn._request_shutdown()
        with trio.move_on_after(self.grace):
            if self._connections:
                await self._all_closed.wait()
            await self._requests_done()
        for conn in list(self._connections):
            conn._scope.cancel()

    async def _requests_done(self) -> None:
        """Wait for the requests under way on listeners that answer their own
        (closed by now: each returns within its own deadline)."""
        for listener in self._finishing:
            await listener.wait_requests_done()

    async def _accept_loop(
        self,
        service: Service,
        listener: trio.abc.Listener[Any],
        connections: trio.Nursery,
    ) -> None:
        errors = _AcceptErrors(service.name)
        extra = id(listener) in self._extra
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                        errors.failed(exc)
                        await trio.sleep(_ACCEPT_RETRY_SLEEP)
                        continue
                    raise
                errors.succeeded()
                # Read each time: a reload may bring a new certificate.
                tls = None if extra else service.tls_context
                peer = format_peer(stream)
                if self._active[service.name] >= service.max_connections:
                    connections.start_soon(self._turn_away, service, stream, peer, None, tls)
                    continue
                # The service's slot is taken here, for every path: the
                # connection holds a descriptor from now on (with the PROXY
                # protocol, also while its header is read).
                self._active[service.name] += 1
                if service.proxy_protocol and not extra:
                    # The real peer is in the header: the per-address limit
                    # applies once it is read.
                    connections.start_soon(
                        self._read_proxy_header, service, stream, peer, tls, connections
                    )
                else:
                    self._admit(service, stream, peer, tls, connections)

    def _admit(
        self,
        service: Service,
        stream: trio.abc.Stream,
        peer: str,
        tls: ssl.SSLContext | None,
        connections: trio.Nursery,
    ) -> None:
        """Serve ``stream`` from ``peer``, which holds a service slot, or turn it
        away (giving the slot back) if its address is at its limit."""
        per_address = self._per_address[service.name]
        key = peer_host(peer)
        if key is not None and per_address.get(key, 0) >= service.effective_max_per_address:
            self._free_slot(service)
            connections.start_soon(self._turn_away, service, stream, peer, key, tls)
        else:
            if key is not None:
                per_address[key] = per_address.get(key, 0) + 1
            connections.start_soon(self._run_connection, service, stream, peer, key, tls)

    async def _read_proxy_header(
        self,
        service: Service,
        stream: trio.abc.Stream,
        peer: str,
        tls: ssl.SSLContext | None,
        connections: trio.Nursery,
    ) -> None:
        """Read the PROXY header (before TLS), then admit the client it names."""
        failure = "abandoned: the server is shutting down"
        header, quiet = None, False
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_when, self._shutdown, nursery.cancel_scope)
            with trio.move_on_after(HEADER_TIMEOUT) as deadline:
                header, stream, failure, quiet = await read_proxy_header_or_why(
                    stream, peer, service.proxy_from
                )
            if deadline.cancelled_caught:
                failure = f"no complete PROXY header within {HEADER_TIMEOUT:g}s"
            nursery.cancel_scope.cancel()
        if header is None:
            self._free_slot(service)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            report_refusal(
                log,
                service.name,
                peer,
                failure,
                quiet=quiet,
                started=started,
                tls=False,
                metrics=self.metrics,
                service=service.name,
            )
            return
        self._admit(service, stream, header.peer or peer, tls, connections)

    async def _turn_away(
        self,
        service: Service,
        stream: trio.abc.Stream,
        peer: str,
        address: str | None,
        tls: ssl.SSLContext | None,
    ) -> None:
        """Say ``BYE busy`` and close: the server is full, or ``address`` is at its limit."""
        started = trio.current_time()
        sent = 0
        with trio.CancelScope(shield=True), trio.move_on_after(_GOODBYE_TIMEOUT):
            try:
                if service.line_based:
                    if tls is not None:  # the BYE goes inside TLS too
                        stream = trio.SSLStream(transport_for(stream), tls, server_side=True)
                    await stream.send_all(b"BYE busy\n")
                    sent = len(b"BYE busy\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                await stream.aclose()  # bounded above; for TLS, sends close_notify
        reason = "busy" if address is None else "per-address"
        if self.metrics is not None:
            self.metrics.turned_away_client(service.name, reason)
        why = "server full" if address is None else f"address limit for {address}"
        log_access(
            service.name,
            peer,
            conn=next_conn_number(),
            tls=tls is not None,
            end=reason,
            duration=trio.current_time() - started,
            bytes_out=sent,
            message=f"{service.name} {peer} turned away ({why}): "
            f"{self._active[service.name]}/{service.max_connections} connections in use",
        )

    async def _run_connection(
        self,
        service: Service,
        stream: trio.abc.Stream,
        peer: str,
        key: str | None,
        tls: ssl.SSLContext | None,
    ) -> None:
        if tls is not None:
            # The handshake runs here, in the connection's own task, so a slow
            # one never holds up accepting. A failure is logged and closed.
            # Its deadline: its own, or the idle timeout if that is shorter.
            timeout = min(HANDSHAKE_TIMEOUT, service.effective_idle_timeout or HANDSHAKE_TIMEOUT)
            tls_stream = await accept_tls(
                tls, stream, service.name, self._shutdown, timeout=timeout, peer=peer
            )
            if tls_stream is None:
                self._release(service, key)
                return
            stream = tls_stream
        conn = Connection(
            stream,
            max_line=service.max_line,
            on_line_error=service.on_line_error,
            quit_command=service.quit_command if service.line_based else None,
            on_quit=service.on_quit,
            service=service.name,
            conn_id=next_conn_number(),
        )
        conn._peer = peer
        self._connections.add(conn)
        mine = self._by_service[service.name]
        mine.add(conn)
        started = trio.current_time()
        end = "closed"
        if self.metrics is not None:
            self.metrics.opened(service.name)
        try:
            try:
                with conn._scope:
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
                if conn._scope.cancelled_caught:
                    end = conn._expired or "shutdown"
                else:
                    end = conn.end_reason or ("eof" if conn.eof_received else "closed")
                    await self._say_goodbye(conn, None)  # replies still queued
            # No goodbye after a send cut short: the client would read
            # "BYE" glued to half a line or into a file's bytes.
            if (
                end in ("shutdown", "idle-timeout", "line-timeout")
                and service.line_based
                and not conn._send_interrupted
            ):
                await self._say_goodbye(conn, f"BYE {end}")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_GOODBYE_TIMEOUT):
                await conn.stream.aclose()  # bounded above; for TLS, sends close_notify
            self._connections.discard(conn)
            mine.discard(conn)
            self._release(service, key)
            if not self._connections and self._shutdown.is_set():
                self._all_closed.set()
            duration = trio.current_time() - started
            if self.metrics is not None:
                self.metrics.ended_connection(
                    service.name, end, duration, conn.bytes_in, conn.bytes_out
                )
            log_access(
                service.name,
                conn.peer,
                conn=conn.id,
                tls=isinstance(conn.stream, trio.SSLStream),
                end=end,
                duration=duration,
                bytes_in=conn.bytes_in,
                bytes_out=conn.bytes_out,
            )

    def _free_slot(self, service: Service) -> None:
        """Give back a connection's slot of ``service`` (taken at accept)."""
        self._active[service.name] -= 1
        if self._stop_accepting.is_set() and not any(self._active.values()):
            self._retired.set()  # retiring: the last connection is over

    def _release(self, service: Service, key: str | None) -> None:
        """Give back the slots a connection held (its service's, its address's)."""
        self._free_slot(service)
        if key is not None:
            per_address = self._per_address[service.name]
            per_address[key] -= 1
            if not per_address[key]:
                del per_address[key]

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


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


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
    call its :meth:`~Server.shutdown`. To run services as a program (logging,
    signals, command-line options) use :func:`trionet.run`.
    """
    server = Server(services, host=host, grace=grace)
    await server.run(task_status=task_status)
