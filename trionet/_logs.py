"""The program's log: text or JSON lines, the access log, and quiet third-party libraries.

``--log-format text`` (the default) writes lines for eyes; ``--log-format
json`` one JSON object per line for a log shipper (journald, vector,
fluent-bit), made by python-json-logger. Either way the time is ISO 8601
with the zone, so lines from hosts in different zones sort together.

**The access log** is the ``trionet.access`` logger: one line per
connection, whatever ended it (served, turned away, a failed TLS
handshake, a request to chat's web page). :func:`log_access` writes them
all, so every kind has the same fields: ``service``, ``worker``, ``conn``,
``peer``, ``tls``, ``end``, ``duration``, ``bytes_in``, ``bytes_out``
(JSON keys; the text line shows them in its message). Its level is set on
its own logger, so ``--access-log on|off`` and ``--log-level`` are
independent: ``--log-level WARNING`` no longer hides it.

**Connection ids** (``conn``) are unique across worker processes and
restarts: a random tag drawn once per process, then a counter
(``k3f9xa-17``). The tag is random rather than the pid because pids are
reused when a worker is replaced. A connection's own logger
(:func:`connection_log`, ``Connection.log``) starts each line with
``[service #id peer]``.

**Third-party libraries** (coredis, trio-websocket) log in their own ways:
a traceback per retry, or ``NoneType: None`` from a ``logging.exception``
called outside an ``except``. Their records are made one line each and
rate-limited by :class:`Bursts`: the first of a burst of the same message
passes, the rest are counted, and the end of the burst is one line with
the count. A Redis outage is then two lines, not one per retry.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import sys
import time
from datetime import datetime
from typing import Any, Final

__all__ = [
    "ACCESS_LOGGER",
    "Bursts",
    "conn_label",
    "connection_log",
    "flush_bursts",
    "log_access",
    "next_conn_number",
    "setup_logging",
]

#: The logger every access line goes to.
ACCESS_LOGGER: Final = "trionet.access"
access_log = logging.getLogger(ACCESS_LOGGER)

#: Drawn once per process: with the counter, a connection id no other
#: process (worker, restarted worker, another host) hands out.
_PROCESS_TAG: Final = "".join(
    secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(6)
)
_numbers = itertools.count(1)

#: The process's worker number for the log (0 without workers); set by
#: :func:`setup_logging`.
_worker = 0

#: Seconds without a repeat after which a burst of one message is over.
BURST_QUIET: Final = 10.0
#: The rate limiter :func:`setup_logging` installed (see :func:`flush_bursts`).
_bursts: Bursts | None = None


def flush_bursts(*, final: bool = False) -> None:
    """Log the end of the third-party bursts that are over (the runner calls it every second).

    ``final``: the process is about to exit, so every burst is over.
    """
    if _bursts is not None:
        _bursts.flush(final=final)


def next_conn_number() -> int:
    """A connection number no other connection of this process has (the server's)."""
    return next(_numbers)


def conn_label(number: int) -> str:
    """The connection id shown in logs: this process's tag and ``number``."""
    return f"{_PROCESS_TAG}-{number}"


class _ConnectionLog(logging.LoggerAdapter[logging.Logger]):
    # The tag starts the text; the fields go to a JSON log as they are.
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra: Any = self.extra
        kwargs["extra"] = {**extra["fields"], **kwargs.get("extra", {})}
        return f"{extra['tag']} {msg}", kwargs


def connection_log(
    service: str, number: int, peer: str, parent: logging.Logger | None = None
) -> logging.LoggerAdapter[logging.Logger]:
    """A connection's logger (``Connection.log``): lines start with ``[service #id peer]``.

    A JSON log gets ``service``, ``conn`` and ``peer`` as fields. ``parent``
    defaults to ``trionet.SERVICE`` (``trionet`` without a service).
    """
    base = parent or logging.getLogger(f"trionet.{service}" if service else "trionet")
    label = conn_label(number)
    tag = f"[{service or 'conn'} #{label} {peer}]"
    return _ConnectionLog(
        base, {"tag": tag, "fields": {"service": service, "conn": label, "peer": peer}}
    )


def log_access(
    service: str,
    peer: str,
    *,
    conn: int,
    tls: bool,
    end: str,
    duration: float,
    bytes_in: int = 0,
    bytes_out: int = 0,
    message: str | None = None,
    **more: Any,
) -> None:
    """Write one access line; every kind of connection ending goes through here.

    ``message`` replaces the standard text (``SERVICE PEER #ID end=...``)
    for lines that read better in their own words (turned away, failed
    handshake); the fields are the same. ``more`` adds fields of its own
    (the web page's ``method``, ``path``, ``status``).
    """
    if not access_log.isEnabledFor(logging.INFO):
        return
    label = conn_label(conn)
    if message is None:
        message = (
            f"{service} {peer} #{label} end={end} duration={duration:.3f}s "
            f"in={bytes_in} out={bytes_out}{' tls' if tls else ''}"
        )
    fields = {
        "service": service,
        "worker": _worker,
        "conn": label,
        "peer": peer,
        "tls": tls,
        "end": end,
        "duration": round(duration, 6),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        **more,
    }
    access_log.info("%s", message, extra=fields)


# -- formats ----------------------------------------------------------------------------


def _iso_time(record: logging.LogRecord) -> str:
    # Local time with its offset, to the millisecond: 2026-12-02T15:17:14.123+00:00.
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: [worker N] MESSAGE``, the time ISO 8601 with its zone."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso_time(record)


def json_formatter() -> logging.Formatter:
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message`` and extras.

    The extras are the record's own fields (an access line's, a connection
    logger's ``conn``...); a traceback goes in ``exc_info`` as one string.
    """
    from pythonjsonlogger.json import JsonFormatter

    class _Json(JsonFormatter):
        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
            return _iso_time(record)

    return _Json(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        json_ensure_ascii=False,
    )


class _WorkerField(logging.Filter):
    """Gives every record a ``worker`` field (JSON shows it on every line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker"):
            record.worker = _worker
        return True


# -- third-party libraries ---------------------------------------------------------------

_DIGITS = re.compile(r"\d+")


class Bursts(logging.Filter):
    """Makes other libraries' records one line each, and rate-limits their bursts.

    Records of loggers outside ``trionet`` are keyed by logger, level and
    message with its digits blanked (``Retry attempt 3`` and ``Retry
    attempt 4`` are one message). The first record of a key passes; repeats
    within :data:`BURST_QUIET` seconds of the previous one are counted and
    dropped; once a key has been quiet that long, :meth:`flush` (called on
    every record and by the runner every second) logs one line saying how
    many were dropped over how long.

    A record's traceback becomes ``: ExcType: text`` on its line (and
    ``NoneType: None``, a traceback of no exception, is dropped).
    """

    def __init__(self, quiet: float = BURST_QUIET, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.quiet = quiet
        self.clock = clock
        # key -> [first seen, last seen, repeats dropped, the latest record]
        self._open: dict[tuple[str, int, str], list[Any]] = {}
        self._flushing = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self._flushing or record.name == "trionet" or record.name.startswith("trionet."):
            return True
        now = self.clock()
        self.flush(now)
        _one_line(record)
        key = (record.name, record.levelno, _DIGITS.sub("#", record.getMessage()))
        burst = self._open.get(key)
        if burst is None:
            self._open[key] = [now, now, 0, record]
            return True
        burst[1] = now
        burst[2] += 1
        burst[3] = record  # the summary shows the latest
        return False

    def flush(self, now: float | None = None, *, final: bool = False) -> None:
        """Close the bursts quiet for long enough (``final``: all of them).

        One summary line each, if any of its records was dropped.
        """
        if not self._open:
            return
        now = self.clock() if now is None else now
        over = [k for k, b in self._open.items() if final or now - b[1] >= self.quiet]
        for key in over:
            first, last, dropped, record = self._open.pop(key)
            if dropped:
                self._flushing = True
                try:
                    logging.getLogger(record.name).log(
                        record.levelno,
                        "%s (repeated %d more time(s) over %.1fs)",
                        record.getMessage(),
                        dropped,
                        last - first,
                    )
                finally:
                    self._flushing = False


def _one_line(record: logging.LogRecord) -> None:
    """Fold a third-party record's traceback and newlines into its message."""
    message = record.getMessage()
    exc = record.exc_info
    if exc and exc[0] is not None:
        message = f"{message}: {exc[0].__name__}: {exc[1]}"
    record.msg = " | ".join(part for part in message.splitlines() if part.strip()) or message
    record.args = None
    record.exc_info = None
    record.exc_text = None
    record.stack_info = None


# -- set-up ------------------------------------------------------------------------------


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    logging.getLogger("trionet").critical("uncaught exception", exc_info=(kind, exc, tb))


def setup_logging(
    level: str = "INFO",
    *,
    fmt: str = "text",
    access: bool = True,
    worker: int | None = None,
) -> None:
    """Log to stderr in ``fmt`` (``text`` or ``json``), unless the program set up logging.

    ``access`` switches the access log on or off whatever ``level`` is.
    ``worker`` is the worker number (``None``: not a worker); text lines
    then start with ``[worker N]``.
    """
    global _worker, _bursts
    _worker = worker or 0
    access_logger = logging.getLogger(ACCESS_LOGGER)
    access_logger.setLevel(logging.INFO if access else logging.CRITICAL + 1)
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "trionet", False)]
    if root.handlers and not ours:  # the program has set up logging itself
        if level != "INFO":
            logging.getLogger("trionet").setLevel(level)
        return
    for handler in ours:  # set up again (tests, a second run in one process)
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.trionet = True  # type: ignore[attr-defined]
    if fmt == "json":
        handler.setFormatter(json_formatter())
        # An exception nothing caught would print a bare traceback: one line too.
        sys.excepthook = _log_uncaught
    else:
        who = "" if worker is None else f"[worker {worker}] "
        handler.setFormatter(TextFormatter(f"%(asctime)s %(levelname)s %(name)s: {who}%(message)s"))
    _bursts = Bursts()
    handler.addFilter(_WorkerField())
    handler.addFilter(_bursts)
    root.addHandler(handler)
    root.setLevel(level)
