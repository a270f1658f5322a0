"""Metrics for Prometheus: what a server counts, and how one process reports many.

:class:`Metrics` holds a server's counters, made with ``prometheus_client``
(label ``service`` on each). The server records a connection when it
*ends* (its end reason, duration and byte counts come from the access
log's own figures), so the per-message path pays nothing; the only other
records are per connection (opened, turned away, a failed TLS handshake)
or per state change (a Redis link going up or down, the server becoming
ready). Figures a service keeps itself (chat's members, messages and
evictions) are read from :meth:`Service.metric_values
<trionet.Service.metric_values>` when :meth:`Metrics.refresh` runs: at
each scrape in one process, every second in a worker.

**Worker processes.** ``prometheus_client``'s multi-process mode: the
parent makes a directory and names it in ``PROMETHEUS_MULTIPROC_DIR``
before it starts any worker; each worker's counters are then memory-mapped
files there, and the parent's scrape (:func:`multiprocess_registry`) adds
them up. Counter files outlive their worker, so a replaced worker's
connections still count; gauges are "live" (only running workers count:
the parent calls :func:`mark_worker_dead` when one exits). The mode is
chosen by ``prometheus_client`` when it is first imported, from the
environment, which is why a worker learns it from its environment and the
parent never creates metric objects of its own (its one figure, worker
restarts, is a collector reading a plain number).

The parent's readiness comes from the same files: ``trionet_ready`` (1 in
each worker that serves) and ``trionet_redis_up`` (the lowest over the
live workers).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

import attrs

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric


class Service(Protocol):
    """What metrics read of a service (:class:`trionet.Service` has it all).

    A protocol rather than the class itself, so this module needs nothing
    of the service layer (which needs TLS, which reports here).
    """

    @property
    def name(self) -> str: ...

    @property
    def tls_context(self) -> Any: ...

    @property
    def proxy_protocol(self) -> bool: ...

    @property
    def metric_help(self) -> Mapping[str, str]: ...

    def metric_values(self) -> Mapping[str, float]: ...


__all__ = [
    "CONTENT_TYPE",
    "MAX_END_REASONS",
    "MULTIPROC_ENV",
    "Metrics",
    "current_metrics",
    "mark_worker_dead",
    "multiprocess_readiness",
    "multiprocess_registry",
    "read_retrying",
    "redis_reporter",
    "set_redis_reporter",
]

_T = TypeVar("_T")

#: The directory of the worker processes' metric files.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
#: The Prometheus text format, as Prometheus 2 asks for it.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Connection durations: from a quick request (ms) to a long chat session (hours).
DURATION_BUCKETS: Final = (
    0.001,
    0.005,
    0.025,
    0.1,
    0.5,
    1.0,
    5.0,
    30.0,
    120.0,
    600.0,
    3600.0,
    14400.0,
)

#: Distinct ``end`` labels kept per service. A handler names its own end
#: reasons (``conn.end_reason``); one that put details in them would make a
#: series per connection, so past this many the rest count as ``other``.
MAX_END_REASONS: Final = 32

#: The running server's metrics, for code that has no handle on the server:
#: the TLS handshake and chat's web page (set by :meth:`Server.run`).
_current: contextvars.ContextVar[Metrics | None] = contextvars.ContextVar(
    "trionet_metrics", default=None
)
#: Told when a Redis link goes up or down: ``(service, up)`` (set by :meth:`Server.run`).
_redis_report: contextvars.ContextVar[Callable[[str, bool], None] | None] = contextvars.ContextVar(
    "trionet_redis_report", default=None
)


def current_metrics() -> Metrics | None:
    """The metrics of the server this task runs under (``None``: metrics are off)."""
    return _current.get()


def redis_reporter() -> Callable[[str, bool], None] | None:
    """Where a Redis link of the server this task runs under reports its state."""
    return _redis_report.get()


class Metrics:
    """The counters of one server (one process); ``registry`` is what a scrape reads.

    Create it in the process that records: in a worker, after
    ``PROMETHEUS_MULTIPROC_DIR`` is in the environment (it is: the parent
    sets it before starting workers).
    """

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        # A "_created" twin per series (the counter's start time) doubles what
        # Prometheus stores for nothing a rate() needs. (Process-wide.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self._counter, self._gauge = Counter, Gauge
        self.registry = r = CollectorRegistry(auto_describe=True)
        per_service = ["service"]
        self.open = Gauge(
            "trionet_connections_open",
            "Connections being served now.",
            per_service,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ended = Counter(
            "trionet_connections",
            "Connections served, by how they ended (the access log's end reasons).",
            ["service", "end"],
            registry=r,
        )
        self.turned_away = Counter(
            "trionet_turned_away",
            "Clients turned away: server full (busy) or over --max-per-address (per-address).",
            ["service", "reason"],
            registry=r,
        )
        self.bytes_in = Counter(
            "trionet_bytes_received", "Bytes received from clients.", per_service, registry=r
        )
        self.bytes_out = Counter(
            "trionet_bytes_sent", "Bytes sent to clients.", per_service, registry=r
        )
        self.duration = Histogram(
            "trionet_connection_duration_seconds",
            "How long connections lasted.",
            per_service,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.tls_failures = Counter(
            "trionet_tls_handshake_failures",
            "TLS handshakes that failed or timed out.",
            per_service,
            registry=r,
        )
        self.proxy_refused = Counter(
            "trionet_proxy_refused",
            "Connections closed before a PROXY header was accepted (from outside "
            "--proxy-from, a bad header, or none in time; not a health check's "
            "connect-and-close).",
            per_service,
            registry=r,
        )
        self.redis_up = Gauge(
            "trionet_redis_up",
            "1 while the service's Redis link is up (with workers: in every worker).",
            per_service,
            registry=r,
            multiprocess_mode="livemin",
        )
        self.ready = Gauge(
            "trionet_ready",
            "Processes serving and ready (every service listening, not draining).",
            registry=r,
            multiprocess_mode="livesum",
        )
        # A service's own figures (Service.metric_help): name -> metric, and
        # the running totals last added to each counter.
        self._own: dict[str, Any] = {}
        self._totals: dict[tuple[str, str], float] = {}
        # Each service's series, looked up once: labels() validates and
        # locks on every call, a dict lookup does not.
        self._series: dict[str, _Series] = {}
        self._ends: dict[tuple[str, str], Any] = {}

    def _of(self, service: str) -> _Series:
        series = self._series.get(service)
        if series is None:
            series = self._series[service] = _Series(
                self.open.labels(service),
                self.duration.labels(service),
                self.bytes_in.labels(service),
                self.bytes_out.labels(service),
            )
        return series

    # -- what the server records ----------------------------------------------------

    def opened(self, service: str) -> None:
        """A connection was accepted and will be served."""
        self._of(service).open.inc()

    def ended_connection(
        self, service: str, end: str, duration: float, bytes_in: int, bytes_out: int
    ) -> None:
        """A served connection ended (after :meth:`opened`)."""
        series = self._of(service)
        series.open.dec()
        ended = self._ends.get((service, end))
        if ended is None:
            if sum(s == service for s, _ in self._ends) >= MAX_END_REASONS:
                end = "other"
            ended = self._ends.get((service, end)) or self.ended.labels(service, end)
            self._ends[service, end] = ended
        ended.inc()
        series.duration.observe(duration)
        if bytes_in:
            series.bytes_in.inc(bytes_in)
        if bytes_out:
            series.bytes_out.inc(bytes_out)

    def turned_away_client(self, service: str, reason: str) -> None:
        """A client was turned away: ``busy`` or ``per-address``."""
        self.turned_away.labels(service, reason).inc()

    def proxy_refused_client(self, service: str) -> None:
        """A connection was refused for its PROXY header (or its lack of one)."""
        self.proxy_refused.labels(service).inc()

    def tls_failed(self, service: str) -> None:
        """A TLS handshake failed."""
        self.tls_failures.labels(service).inc()

    def redis_changed(self, service: str, up: bool) -> None:
        """The service's Redis link went up or down."""
        self.redis_up.labels(service).set(1 if up else 0)

    def set_ready(self, ready: bool) -> None:
        """This process serves (every listener open, not draining) or no longer."""
        self.ready.set(1 if ready else 0)

    def declare(self, services: Iterable[Service]) -> None:
        """Show every service's series from the start (at zero), not after its first use."""
        for service in services:
            self.open.labels(service.name)
            self.bytes_in.labels(service.name)
            self.bytes_out.labels(service.name)
            self.duration.labels(service.name)
            if service.tls_context is not None:
                self.tls_failures.labels(service.name)
            if service.proxy_protocol:
                self.proxy_refused.labels(service.name)
            for reason in ("busy", "per-address"):
                self.turned_away.labels(service.name, reason)
        self.refresh(services)

    def refresh(self, services: Iterable[Service]) -> None:
        """Read each service's own figures (:meth:`Service.metric_values`) into metrics.

        A name ending in ``_total`` is a running total (a counter: what it
        grew by since the last refresh is added); any other is a gauge.
        """
        for service in services:
            if not service.metric_help:
                continue
            values = service.metric_values()
            for name, help_text in service.metric_help.items():
                metric = self._own.get(name)
                if metric is None:
                    metric = self._own[name] = self._make(name, help_text)
                child = metric.labels(service.name)
                value = float(values.get(name, 0))
                if name.endswith("_total"):
                    key = (service.name, name)
                    grew = value - self._totals.get(key, 0.0)
                    if grew > 0:
                        child.inc(grew)
                        self._totals[key] = value
                else:
                    child.set(value)

    def _make(self, name: str, help_text: str) -> Any:
        full = f"trionet_{name}"
        if name.endswith("_total"):
            return self._counter(
                full[: -len("_total")], help_text, ["service"], registry=self.registry
            )
        return self._gauge(
            full, help_text, ["service"], registry=self.registry, multiprocess_mode="livesum"
        )

    def render(self, services: Sequence[Service] = ()) -> bytes:
        """The text format of everything, after a :meth:`refresh` (one process: cheap)."""
        from prometheus_client import generate_latest

        self.refresh(services)
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value (``None`` if absent): for tests and tools."""
        return self.registry.get_sample_value(name, labels)

    def activate(self) -> contextvars.Token[Metrics | None]:
        """Make these the metrics of the current task and the tasks it starts."""
        return _current.set(self)


@attrs.frozen
class _Series:
    """One service's series of the per-connection metrics."""

    open: Any
    duration: Any
    bytes_in: Any
    bytes_out: Any


def set_redis_reporter(report: Callable[[str, bool], None]) -> None:
    """Route the Redis links started from this task on to ``report`` (the server's)."""
    _redis_report.set(report)


# -- the parent of worker processes ------------------------------------------------------


class _Restarts:
    """A collector of one plain number: the workers the parent replaced."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily(
            "trionet_worker_restarts",
            "Worker processes that died and were replaced.",
            value=self.count(),
        )


def multiprocess_registry(path: str, restarts: Callable[[], int]) -> CollectorRegistry:
    """What the parent's scrape reads: every worker's files in ``path``, and its restarts."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    registry.register(_Restarts(restarts))
    return registry


def read_retrying(read: Callable[[], _T], attempts: int = 5) -> _T:
    """``read()`` of the workers' files, tried again if it catches a file half made.

    A worker creates its file and then writes its header: a read in between
    finds zero bytes (``struct.error``). That lasts microseconds, so a few
    quick retries get past it. Blocks: call it in a thread.
    """
    for _ in range(attempts - 1):
        try:
            return read()
        except Exception:
            time.sleep(0.01)
    return read()


def multiprocess_readiness(registry: CollectorRegistry) -> str | None:
    """Why the workers are not ready (``None``: ready), from their metric files.

    Reads files: call it in a thread.
    """
    ready = 0.0
    down: list[str] = []
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "trionet_ready":
                ready += sample.value
            elif sample.name == "trionet_redis_up" and sample.value < 1:
                down.append(sample.labels.get("service", "?"))
    if down:
        return f"Redis link down ({', '.join(sorted(down))})"
    if ready < 1:
        return "starting: no worker is serving yet"
    return None


def mark_worker_dead(pid: int, path: str) -> None:
    """Drop a dead worker's gauges (its counters stay: they still count)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
