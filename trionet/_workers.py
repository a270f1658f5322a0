"""Worker processes: one set of listening sockets, served by N processes.

The parent opens every listening socket once and starts N workers that
serve those very sockets (inherited descriptors, not ``SO_REUSEPORT``: with
a socket per worker, connections queued on a dying worker's socket are
reset; with one shared socket any live worker accepts them). A worker is
the same program started again (``sys.orig_argv``) with the descriptors
named in the environment, so it builds exactly the services the parent
did and serves them with the ordinary runner.

Each worker also gets one end of a socket pair, its *link* to the parent.
The worker says ``ready`` on it once it serves and ``open N`` when its
count of connections changes; the parent says ``retire`` on it. Either
side sees end-of-file when the other is gone.

The parent:

* restarts a worker that dies (logged; a worker that keeps dying right
  after it starts is restarted with a growing back-off),
* forwards SIGINT/SIGTERM once to every worker, which then shuts down
  gracefully (``BYE shutdown`` within ``--grace``), and exits 0 when all
  have; a second signal kills them at once,
* on SIGHUP, checks the configuration again and starts a new *generation*
  of workers on the same sockets; once all of them are ready it retires
  the old ones, which stop accepting and finish their connections (for up
  to ``--reload-grace`` seconds, then ``BYE shutdown``). The sockets never
  close, so no client is refused; a generation that fails to start is
  retired in turn and the old one carries on.
* keeps its end of every link open for its whole life: if the parent
  dies, even by ``kill -9``, each worker's link reports end-of-file and the
  worker shuts down by itself. No worker outlives its parent.

Workers run in their own process group, so a Ctrl-C on the terminal
reaches only the parent, which forwards it once.

With ``--metrics-port`` the parent serves /metrics and the health checks:
each worker writes its metrics to files in a directory the parent made
(``PROMETHEUS_MULTIPROC_DIR``, see :mod:`trionet._metrics`), and a scrape
of the parent adds them up, replaced workers' counts included.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final

import attrs
import trio

from ._metrics import (
    CONTENT_TYPE,
    MULTIPROC_ENV,
    mark_worker_dead,
    multiprocess_readiness,
    multiprocess_registry,
    read_retrying,
)
from ._monitor import MonitorOptions, serve_monitor
from ._server import Server, StartupError, _reason
from ._service import Service
from ._systemd import Notifier

__all__ = [
    "CANNOT_START",
    "WORKER_ENV",
    "EarlyHangup",
    "ParentLink",
    "ReloadQueue",
    "inherited_config",
    "inherited_listeners",
    "open_sockets",
    "run_workers",
    "worker_index",
]

log = logging.getLogger("trionet")

#: The environment variable that makes a process a worker: JSON
#: ``{"fds": {service: [fd, ...]}, "link": fd, "index": i, "generation": g,
#: "config": fd}`` (a service's extra ports are keyed ``"<service> <label>"``,
#: e.g. ``"chat web"``).
WORKER_ENV: Final = "TRIONET_WORKER"

#: A worker's exit status when a service cannot start in it (EX_CONFIG): the
#: same would happen in every worker (a refused Redis password), so the
#: parent stops them all and exits 1 instead of restarting them forever.
CANNOT_START: Final = 78

#: A worker that dies sooner than this after starting is restarted after a
#: back-off that doubles each time, up to _BACKOFF_MAX seconds.
_HEALTHY_AFTER: Final = 2.0
_BACKOFF_FIRST: Final = 0.1
_BACKOFF_MAX: Final = 10.0
#: Seconds a new generation has to get ready on reload before it is given up.
_READY_TIMEOUT: Final = 60.0
#: The longest message on a link (they are a few bytes).
_MAX_MESSAGE: Final = 256


def open_sockets(service: Service, host: str, port: int | None = None) -> list[socket.socket]:
    """Bind and listen on every address ``host`` resolves to, as Trio would.

    ``port``: one of the service's :meth:`~Service.extra_ports` (default:
    its own port).
    """
    host = service.host or host
    port = service.effective_port if port is None else port
    socks: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
        )
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(socket.SOMAXCONN)
            if port == 0:  # every later address of this service gets the same port
                port = sock.getsockname()[1]
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise StartupError(service.name, host, port, _reason(exc)) from exc
    return socks


class EarlyHangup:
    """A SIGHUP that comes before the process can reload: remembered, never fatal.

    SIGHUP's default action ends the process, and a ``systemctl reload`` or
    a closing terminal may come at any moment, start-up included. From the
    start of ``run()`` until the reload handler is in place this handler
    only takes note; the reload happens as soon as the process serves.
    (Trio's signal receiver puts it back when it closes.)
    """

    pending = False

    @classmethod
    def install(cls) -> None:
        """Catch SIGHUP from now on (from the main thread; elsewhere a no-op).

        A worker starts with SIGHUP blocked (see :func:`run_workers`): one
        sent while it started is still pending and is noted here.
        """
        with contextlib.suppress(ValueError):  # not the main thread: not ours to set
            signal.signal(signal.SIGHUP, cls._note)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    @classmethod
    def _note(cls, signum: int, frame: object) -> None:
        cls.pending = True

    @classmethod
    def take(cls) -> bool:
        """Whether a SIGHUP came early (and forget it)."""
        pending, cls.pending = cls.pending, False
        return pending


class ReloadQueue:
    """Reloads run one at a time; SIGHUPs during one make at most one more.

    A burst of signals (``pkill -HUP`` hitting every process, a script
    reloading in a loop) would otherwise queue a reload per signal. One
    that waits reads the configuration as it is when its turn comes, so a
    second waiting one would add nothing.
    """

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._queued = False

    def request(self, why: str) -> bool:
        """True if a reload should be started; otherwise one already waits (logged)."""
        if self._queued:
            log.info("%s: a reload is already waiting its turn", why)
            return False
        log.info("%s: reloading", why)
        self._queued = True
        return True

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold this while reloading."""
        async with self._lock:
            self._queued = False
            yield


def worker_index() -> int | None:
    """This worker's number (1, 2, ...), or ``None`` outside a worker."""
    spec = os.environ.get(WORKER_ENV)
    return int(json.loads(spec)["index"]) if spec else None


def inherited_config() -> bytes | None:
    """In a worker: the config file's contents as the parent read and checked them."""
    spec = os.environ.get(WORKER_ENV)
    fd = json.loads(spec).get("config") if spec else None
    if fd is None:
        return None
    # pread at offset 0: the descriptor (and its offset) is shared by every
    # worker of the generation.
    return os.pread(fd, os.fstat(fd).st_size, 0)


def _snapshot(data: bytes | None) -> int | None:
    """A descriptor holding ``data`` for workers to read (an anonymous memory file)."""
    if data is None:
        return None
    fd = os.memfd_create("trionet-config", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def inherited_listeners() -> tuple[dict[str, list[trio.SocketListener]], int] | None:
    """In a worker: the listeners the parent opened, and the link's descriptor."""
    spec = os.environ.get(WORKER_ENV)
    if not spec:
        return None
    info = json.loads(spec)
    listeners = {
        name: [
            trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
            for fd in fds
        ]
        for name, fds in info["fds"].items()
    }
    return listeners, int(info["link"])


class ParentLink:
    """A worker's end of its link to the parent (see the module's docstring)."""

    def __init__(self, fd: int) -> None:
        self._sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))

    async def _say(self, message: str) -> None:
        # OSError: the parent is gone; watch() sees it and shuts down.
        with contextlib.suppress(OSError):
            await self._sock.send(f"{message}\n".encode())

    async def ready(self) -> None:
        """Tell the parent this worker serves."""
        await self._say("ready")

    async def report(self, server: Server) -> None:
        """Tell the parent the number of open connections when it changes (once a second)."""
        told = -1
        while True:
            count = server.connection_count
            if count != told:
                await self._say(f"open {count}")
                told = count
            await trio.sleep(1)

    async def watch(self, server: Server, reload_grace: float) -> None:
        """Retire ``server`` when the parent says so; shut it down once the parent is gone."""
        pending = b""
        while True:
            try:
                data = await self._sock.recv(_MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            *lines, pending = (pending + data).split(b"\n")
            pending = pending[-_MAX_MESSAGE:]
            if b"retire" in lines and not server.shutting_down:
                server.retire(reload_grace)
                # Said once it is true: an accept loop may still take a
                # connection queued before it sees the retirement.
                await server.wait_not_accepting()
                log.info("replaced by a new generation of workers: no longer accepting")
        if not server.shutting_down:
            log.warning("the parent process is gone: shutting down")
            server.shutdown()


def run_workers(
    services: Sequence[Service],
    *,
    host: str,
    grace: float,
    workers: int,
    reload_grace: float = 30.0,
    config: bytes | None = None,
    check_reload: Callable[[], bytes | None] | None = None,
    given_sockets: dict[str, list[socket.socket]] | None = None,
    notifier: Notifier | None = None,
    monitor: MonitorOptions | None = None,
) -> int:
    """Open the listeners, run ``workers`` processes on them, supervise; the exit status.

    ``config`` is the config file's contents (``None``: no file): workers
    read this copy, not the file, so a worker restarted later runs what its
    generation was checked with. ``check_reload`` (blocking; run in a
    thread on SIGHUP) reads the configuration again and raises if it
    cannot be used; the new generation starts only if it returns, with the
    config it returned. ``given_sockets`` are listening sockets opened
    already (socket activation): a service with some uses them instead of
    opening its own. With ``monitor``, serve every worker's metrics and the
    health checks there.
    """
    for service in services:
        problem = service.workers_problem(workers)
        if problem is not None:
            # Not an address problem, so not StartupError's "cannot start NAME
            # on ADDRESS" shape; the line still names the service and address.
            log.error(
                "%s cannot run in %d worker processes on %s:%d: %s",
                service.name,
                workers,
                service.host or host,
                service.effective_port,
                problem,
            )
            return 1
    sockets: dict[str, list[socket.socket]] = {}
    try:
        for service in services:
            given = (given_sockets or {}).get(service.name)
            sockets[service.name] = given or open_sockets(service, host)
            # (chat's web page: "chat web", served by every worker too)
            for label, port in service.extra_ports().items():
                sockets[f"{service.name} {label}"] = open_sockets(service, host, port)
    except StartupError as exc:
        log.error("%s", exc)
        for socks in sockets.values():
            for sock in socks:
                sock.close()
        return 1
    for name, socks in sockets.items():
        for sock in socks:
            bound_host, port = sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            log.info("%s listening on %s:%d", name, shown, port)
    metrics_dir = None
    if monitor is not None:
        # Made before any worker starts: each finds it in its environment.
        metrics_dir = tempfile.mkdtemp(prefix="trionet-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    sup = _Supervisor(
        sockets, workers, reload_grace, check_reload, notifier or Notifier(), metrics_dir
    )
    sup.configs[0] = _snapshot(config)
    # SIGHUP stays blocked in the parent, in every thread it starts (they
    # inherit the mask) and so in every worker from its first instruction:
    # a blocked signal is only held pending, across fork and exec too. The
    # parent takes its own with sigwait; a worker unblocks it once its
    # handler is in place. Otherwise SIGHUP's default action would kill a
    # starting worker (``pkill -HUP -f trionet`` reaches workers too, and a
    # reload is exactly when workers start).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        return trio.run(sup.run, monitor)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:
        if not StartupError.report(exc):
            raise
        return 1
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for socks in sockets.values():
            for sock in socks:
                sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@attrs.define(eq=False)
class _Worker:
    index: int
    generation: int
    proc: trio.Process
    link: trio.socket.SocketType
    ready: trio.Event = attrs.Factory(trio.Event)
    open: int = 0


@attrs.define(eq=False)
class _Launch:
    """One generation starting up: done when all are ready, or one failed."""

    count: int
    ready: int = 0
    failure: str | None = None
    done: trio.Event = attrs.Factory(trio.Event)

    def one_ready(self) -> None:
        self.ready += 1
        if self.ready == self.count:
            self.done.set()

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        self.done.set()


class _Supervisor:
    def __init__(
        self,
        sockets: dict[str, list[socket.socket]],
        count: int,
        reload_grace: float,
        check_reload: Callable[[], bytes | None] | None,
        notifier: Notifier,
        metrics_dir: str | None = None,
    ) -> None:
        self.sockets = sockets
        self.count = count
        self.reload_grace = reload_grace
        self.check_reload = check_reload
        self.notifier = notifier
        self.stopping = False
        self.workers: set[_Worker] = set()
        #: Generations whose workers are restarted when they die: the
        #: current one, and during a reload the one starting up.
        self.live: set[int] = set()
        self.current = 0
        self.newest = 0  # generation numbers are never reused
        self.reloads = ReloadQueue()
        self._fds = [s.fileno() for socks in sockets.values() for s in socks]
        #: Per generation: the descriptor of its config snapshot (or None).
        self.configs: dict[int, int | None] = {}
        self.failed = False  # a worker could not start: the parent exits 1
        #: Workers that died and were replaced (a metric).
        self.restarts = 0
        self.metrics_dir = metrics_dir

    def _env(self, index: int, generation: int, link: int) -> dict[str, str]:
        spec = {
            "fds": {name: [s.fileno() for s in socks] for name, socks in self.sockets.items()},
            "link": link,
            "index": index,
            "generation": generation,
            "config": self.configs.get(generation),
        }
        return {**os.environ, WORKER_ENV: json.dumps(spec)}

    async def _spawn(self, index: int, generation: int) -> _Worker:
        ours, theirs = socket.socketpair()
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, *sys.orig_argv[1:]],
                env=self._env(index, generation, theirs.fileno()),
                pass_fds=[*self._fds, theirs.fileno(), *self._config_fds(generation)],
                process_group=0,  # Ctrl-C on the terminal reaches the parent only
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return _Worker(index, generation, proc, trio.socket.from_stdlib_socket(ours))

    def _config_fds(self, generation: int) -> list[int]:
        fd = self.configs.get(generation)
        return [] if fd is None else [fd]

    def _forget_config(self, generation: int) -> None:
        fd = self.configs.pop(generation, None)
        if fd is not None:
            os.close(fd)

    async def _listen(self, worker: _Worker, launch: _Launch | None) -> None:
        """Read what ``worker`` says on its link until it exits."""
        pending = b""
        while True:
            try:
                data = await worker.link.recv(_MAX_MESSAGE)
            except OSError:
                return
            if not data:
                return
            *lines, pending = (pending + data).split(b"\n")
            pending = pending[-_MAX_MESSAGE:]
            for line in lines:
                word, _, arg = line.decode(errors="replace").partition(" ")
                if word == "ready" and not worker.ready.is_set():
                    worker.ready.set()
                    if launch is not None:
                        launch.one_ready()
                elif word == "open" and arg.isdigit():
                    worker.open = int(arg)

    async def keep_running(self, index: int, generation: int, launch: _Launch | None) -> None:
        """Run worker ``index`` of ``generation``; restart it while that generation lives."""
        backoff = _BACKOFF_FIRST
        while not self.stopping and generation in self.live:
            started = trio.current_time()
            worker = await self._spawn(index, generation)
            self.workers.add(worker)
            log.info(
                "worker %d started (pid %d%s)",
                index,
                worker.proc.pid,
                f", generation {generation}" if generation else "",
            )
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._listen, worker, launch)
                    code = await worker.proc.wait()
                    nursery.cancel_scope.cancel()
            finally:
                self.workers.discard(worker)
                worker.link.close()
                if self.metrics_dir is not None:
                    mark_worker_dead(worker.proc.pid, self.metrics_dir)
            if self.stopping:
                log.info("worker %d (pid %d) stopped", index, worker.proc.pid)
                return
            if generation not in self.live:
                log.info(
                    "worker %d (pid %d) of generation %d finished",
                    index,
                    worker.proc.pid,
                    generation,
                )
                return
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            if launch is not None and generation and not worker.ready.is_set():
                # A new generation that cannot start: give the reload up
                # rather than restart it (the old generation still serves).
                launch.fail(f"worker {index} (pid {worker.proc.pid}) exited ({how}) at start")
                return
            if code == CANNOT_START:
                log.error("worker %d cannot start (its error is above): stopping", index)
                self.failed = self.stopping = True
                self.signal_all(signal.SIGTERM)
                return
            if trio.current_time() - started >= _HEALTHY_AFTER:
                backoff = _BACKOFF_FIRST
            log.error(
                "worker %d (pid %d) died (%s); restarting in %.1fs",
                index,
                worker.proc.pid,
                how,
                backoff,
            )
            self.restarts += 1
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def signal_all(self, signum: int) -> None:
        for worker in list(self.workers):
            if worker.proc.returncode is None:
                worker.proc.send_signal(signum)

    async def retire(self, generation: int) -> None:
        """Tell every worker of ``generation`` to stop accepting and finish its connections."""
        self.live.discard(generation)
        self._forget_config(generation)  # none of its workers is started again
        for worker in list(self.workers):
            if worker.generation == generation:
                with contextlib.suppress(OSError):  # it is exiting anyway
                    await worker.link.send(b"retire\n")

    def status(self) -> str:
        """One line for ``systemctl status``."""
        serving = [w for w in self.workers if w.generation == self.current]
        draining = [w for w in self.workers if w.generation != self.current]
        text = (
            f"{len(serving)} worker(s) serving, "
            f"{sum(w.open for w in self.workers)} connection(s) open"
        )
        if draining:
            text += f"; {len(draining)} old worker(s) finishing"
        return text

    async def serve_monitor(
        self, monitor: MonitorOptions, *, task_status: trio.TaskStatus[list[tuple[str, int]]]
    ) -> None:
        """/metrics and the health checks for every worker, from their metric files."""
        assert self.metrics_dir is not None
        registry = multiprocess_registry(self.metrics_dir, lambda: self.restarts)

        async def render() -> tuple[bytes, str]:
            from prometheus_client import generate_latest

            # Reading the workers' files is disk I/O: not on the event loop.
            text = await trio.to_thread.run_sync(read_retrying, lambda: generate_latest(registry))
            return text, CONTENT_TYPE

        async def readiness() -> str | None:
            if self.stopping:
                return "draining: shutting down"
            return await trio.to_thread.run_sync(
                read_retrying, lambda: multiprocess_readiness(registry)
            )

        await serve_monitor(monitor.host, monitor.port, render, readiness, task_status=task_status)

    async def reload(self, slots: trio.Nursery) -> None:
        """SIGHUP: a new generation on the same sockets, then retire the old one."""
        async with self.reloads.turn():
            if self.stopping:
                return
            self.notifier.reloading()
            config = None
            if self.check_reload is not None:
                try:
                    config = await trio.to_thread.run_sync(self.check_reload)
                except Exception as exc:
                    log.error("reload failed: %s; the running workers carry on", exc)
                    self.notifier.ready(self.status())
                    return
            old, new = self.current, self.newest + 1
            self.newest = new
            launch = _Launch(self.count)
            self.configs[new] = _snapshot(config)
            self.live.add(new)
            for index in range(1, self.count + 1):
                slots.start_soon(self.keep_running, index, new, launch)
            with trio.move_on_after(_READY_TIMEOUT):
                await launch.done.wait()
            if self.stopping:
                return
            if launch.failure is not None or launch.ready < self.count:
                why = launch.failure or f"not ready within {_READY_TIMEOUT:g}s"
                log.error("reload failed: %s; the running workers carry on", why)
                await self.retire(new)
            else:
                self.current = new
                await self.retire(old)
                log.info(
                    "reloaded: generation %d serves; generation %d finishes its connections "
                    "(up to %gs)",
                    new,
                    old,
                    self.reload_grace,
                )
            self.notifier.ready(self.status())

    async def run(self, monitor: MonitorOptions | None = None) -> int:
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                async with trio.open_nursery() as outer:
                    # Each slot's task returns once we stop and its worker has exited.
                    async with trio.open_nursery() as slots:

                        async def forward() -> None:
                            async for signum in received:
                                name = signal.Signals(signum).name
                                if not self.stopping:
                                    self.stop(name)
                                else:
                                    log.warning("%s received again: killing the workers", name)
                                    self.signal_all(signal.SIGKILL)

                        outer.start_soon(forward)
                        outer.start_soon(self._hangups, outer, slots)
                        if monitor is not None:
                            await outer.start(self.serve_monitor, monitor)
                        launch = _Launch(self.count)
                        self.live.add(0)
                        for index in range(1, self.count + 1):
                            slots.start_soon(self.keep_running, index, 0, launch)
                        outer.start_soon(self._announce, launch, outer, slots)
                    outer.cancel_scope.cancel()
        finally:
            self.signal_all(signal.SIGKILL)
            for generation in list(self.configs):
                self._forget_config(generation)
        if self.failed:
            return 1
        log.info("stopped")
        return 0

    async def _hangups(self, outer: trio.Nursery, slots: trio.Nursery) -> None:
        """Reload on each SIGHUP (blocked in this process: taken with sigwait in a thread)."""
        while True:
            await trio.to_thread.run_sync(signal.sigwait, {signal.SIGHUP}, abandon_on_cancel=True)
            if not self.stopping and self.reloads.request("SIGHUP received"):
                outer.start_soon(self.reload, slots)

    async def _announce(self, launch: _Launch, outer: trio.Nursery, slots: trio.Nursery) -> None:
        await launch.done.wait()
        self.notifier.ready(self.status())
        early = EarlyHangup.take() and not self.stopping
        if early and self.reloads.request("SIGHUP received during start-up"):
            outer.start_soon(self.reload, slots)
        await self.notifier.keep_alive(self.status)

    def stop(self, name: str) -> None:
        self.stopping = True
        self.notifier.stopping()
        log.info("%s received: stopping %d worker(s) gracefully", name, len(self.workers))
        # Nothing will accept from here on: close our copies so new clients
        # are refused, not queued.
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        self.signal_all(signal.SIGTERM)
