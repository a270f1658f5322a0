"""trionet: network services on Trio's structured concurrency.

The public API, re-exported from small private modules:

* :class:`Service` — subclass it and write ``handle(conn)``: that is a service.
* :class:`Connection` — what ``handle`` receives: lines, raw bytes, limits.
* :func:`run` — run services as a program: logging, signals, exit status,
  and with ``argv`` the whole command line of ``python -m trionet.serve``.
* :class:`Server` / :func:`serve` — run services inside your own Trio code
  (limits, timeouts, graceful shutdown, crash isolation, access logs);
  :class:`Metrics` — what a server counts for Prometheus (``Server(metrics=...)``).
* :class:`LineBuffer` — the sans-I/O line framer underneath.
* :mod:`trionet.testing` — memory listeners and a scripted client for tests.
"""

from ._connection import Connection, LineError
from ._framing import DEFAULT_MAX_LINE, BadEncoding, LineBuffer, LineEvent, LineTooLong
from ._metrics import Metrics
from ._plugins import PluginError
from ._runner import ConfigError, build_services, run
from ._server import Server, StartupError, serve
from ._service import DEFAULT_MAX_CONNECTIONS, Service
from ._transport import RECEIVE_SIZE, format_peer

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_LINE",
    "RECEIVE_SIZE",
    "BadEncoding",
    "ConfigError",
    "Connection",
    "LineBuffer",
    "LineError",
    "LineEvent",
    "LineTooLong",
    "Metrics",
    "PluginError",
    "Server",
    "Service",
    "StartupError",
    "build_services",
    "format_peer",
    "run",
    "serve",
]

__version__ = "0.1.0"
