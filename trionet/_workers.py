"""Worker processes: one set of listening sockets, served by N processes.

The parent opens every listening socket once and starts N workers that
serve those very sockets (inherited descriptors, not ``SO_REUSEPORT``: with
a socket per worker, connections queued on a dying worker's socket are
reset; with one shared socket any live worker accepts them). A worker is
the same program started again (``sys.orig_argv``) with the descriptors
named in the environment, so it builds exactly the services the parent
did and serves them with the ordinary runner.

The parent:

* restarts a worker that dies (logged; a worker that keeps dying right
  after it starts is restarted with a growing back-off),
* forwards SIGINT/SIGTERM once to every worker, which then shuts down
  gracefully (``BYE shutdown`` within ``--grace``), and exits 0 when all
  have; a second signal kills them at once,
* holds the write end of a pipe whose read end every worker watches: if
  the parent dies, even by ``kill -9``, the pipe reports end-of-file and
  each worker shuts down by itself. No worker outlives its parent.

Workers run in their own process group, so a Ctrl-C on the terminal
reaches only the parent, which forwards it once.

With ``--metrics-port`` the parent serves /metrics and the health checks:
each worker writes its metrics to files in a directory the parent made
(``PROMETHEUS_MULTIPROC_DIR``, see :mod:`trionet._metrics`), and a scrape
of the parent adds them up, replaced workers' counts included.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import Final

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

__all__ = [
    "CANNOT_START",
    "WORKER_ENV",
    "inherited_listeners",
    "run_workers",
    "watch_parent",
    "worker_index",
]

log = logging.getLogger("trionet")

#: The environment variable that makes a process a worker: JSON
#: ``{"fds": {service: [fd, ...]}, "parent": fd, "index": i}`` (a service's
#: extra ports are keyed ``"<service> <label>"``, e.g. ``"chat web"``).
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


def _open_sockets(service: Service, host: str, port: int | None = None) -> list[socket.socket]:
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


def worker_index() -> int | None:
    """This worker's number (1, 2, ...), or ``None`` outside a worker."""
    spec = os.environ.get(WORKER_ENV)
    return int(json.loads(spec)["index"]) if spec else None


def inherited_listeners() -> tuple[dict[str, list[trio.SocketListener]], int] | None:
    """In a worker: the listeners the parent opened, and the parent-watch descriptor."""
    spec = os.environ.get(WORKER_ENV)
    if not spec:
        return None
    info = json.loads(spec)
    listeners = {
        name: [trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))]
        for name, fds in info["fds"].items()
        for fd in fds[:1]
    }
    for name, fds in info["fds"].items():
        for fd in fds[1:]:
            sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
            listeners[name].append(trio.SocketListener(sock))
    return listeners, int(info["parent"])


async def watch_parent(fd: int, server: Server) -> None:
    """Shut ``server`` down gracefully once the parent is gone (its pipe says EOF)."""
    os.set_blocking(fd, False)
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            if not os.read(fd, 64):
                break
        except BlockingIOError:
            continue
    if not server.shutting_down:
        log.warning("the parent process is gone: shutting down")
        server.shutdown()


def run_workers(
    services: Sequence[Service],
    *,
    host: str,
    grace: float,
    workers: int,
    monitor: MonitorOptions | None = None,
) -> int:
    """Open the listeners, run ``workers`` processes on them, supervise; the exit status.

    With ``monitor``, serve every worker's metrics and the health checks there.
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
            sockets[service.name] = _open_sockets(service, host)
            # (chat's web page: "chat web", served by every worker too)
            for label, port in service.extra_ports().items():
                sockets[f"{service.name} {label}"] = _open_sockets(service, host, port)
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
    try:
        return trio.run(_supervise, sockets, workers, grace, monitor, metrics_dir)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:
        if not StartupError.report(exc):
            raise
        return 1
    finally:
        for socks in sockets.values():
            for sock in socks:
                sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


class _Supervisor:
    def __init__(
        self,
        sockets: dict[str, list[socket.socket]],
        count: int,
        grace: float,
        metrics_dir: str | None = None,
    ) -> None:
        self.sockets = sockets
        self.count = count
        self.grace = grace
        self.stopping = False
        self.failed = False  # a worker could not start: the parent exits 1
        self.procs: dict[int, trio.Process] = {}
        #: Workers that died and were replaced (a metric).
        self.restarts = 0
        self.metrics_dir = metrics_dir
        # The pipe every worker watches: the parent keeps the write end
        # open for its whole life and never writes.
        self.watch_r, self.watch_w = os.pipe()

    def _env(self, index: int) -> dict[str, str]:
        spec = {
            "fds": {name: [s.fileno() for s in socks] for name, socks in self.sockets.items()},
            "parent": self.watch_r,
            "index": index,
        }
        return {**os.environ, WORKER_ENV: json.dumps(spec)}

    async def keep_running(self, index: int) -> None:
        """Run worker ``index``; restart it whenever it dies, until we stop."""
        backoff = _BACKOFF_FIRST
        fds = [s.fileno() for socks in self.sockets.values() for s in socks]
        while not self.stopping:
            started = trio.current_time()
            proc = await trio.lowlevel.open_process(
                [sys.executable, *sys.orig_argv[1:]],
                env=self._env(index),
                pass_fds=[*fds, self.watch_r],
                process_group=0,  # Ctrl-C on the terminal reaches the parent only
            )
            self.procs[index] = proc
            log.info("worker %d started (pid %d)", index, proc.pid)
            code = await proc.wait()
            del self.procs[index]
            if self.metrics_dir is not None:
                mark_worker_dead(proc.pid, self.metrics_dir)
            if code == CANNOT_START and not self.stopping:
                log.error("worker %d cannot start (its error is above): stopping", index)
                self.failed = self.stopping = True
                self.signal_all(signal.SIGTERM)
                return
            if self.stopping:
                log.info("worker %d (pid %d) stopped", index, proc.pid)
                return
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            if trio.current_time() - started >= _HEALTHY_AFTER:
                backoff = _BACKOFF_FIRST
            log.error(
                "worker %d (pid %d) died (%s); restarting in %.1fs", index, proc.pid, how, backoff
            )
            self.restarts += 1
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def signal_all(self, signum: int) -> None:
        for proc in list(self.procs.values()):
            if proc.returncode is None:
                proc.send_signal(signum)

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


async def _supervise(
    sockets: dict[str, list[socket.socket]],
    count: int,
    grace: float,
    monitor: MonitorOptions | None = None,
    metrics_dir: str | None = None,
) -> int:
    sup = _Supervisor(sockets, count, grace, metrics_dir)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as outer:

                async def forward() -> None:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if not sup.stopping:
                            sup.stopping = True
                            log.info("%s received: stopping %d worker(s) gracefully", name, count)
                            # Nothing will accept from here on: close our copies
                            # so new clients are refused, not queued.
                            for socks in sup.sockets.values():
                                for sock in socks:
                                    sock.close()
                            sup.signal_all(signal.SIGTERM)
                        else:
                            log.warning("%s received again: killing the workers", name)
                            sup.signal_all(signal.SIGKILL)

                outer.start_soon(forward)
                if monitor is not None:
                    await outer.start(sup.serve_monitor, monitor)
                # Each slot's task returns once we stop and its worker has exited.
                async with trio.open_nursery() as slots:
                    for index in range(1, count + 1):
                        slots.start_soon(sup.keep_running, index)
                outer.cancel_scope.cancel()
    finally:
        sup.signal_all(signal.SIGKILL)
        os.close(sup.watch_w)
        os.close(sup.watch_r)
    if sup.failed:
        return 1
    log.info("stopped")
    return 0
