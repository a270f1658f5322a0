"""The one entry point: run services as a program, with or without a command line.

:func:`run` is what ``python -m trionet.serve`` is built on, and what a
user's own script calls::

    sys.exit(trionet.run([ShoutService], argv=sys.argv[1:]))

It sets up logging (unless the program already did), runs the services
under one :class:`~trionet.Server`, turns SIGINT/SIGTERM into a graceful
shutdown (a second signal stops at once), reports a service that cannot
start in one line (exit status 1), and returns 0 after a clean stop, with
no traceback on Ctrl-C.

With ``argv`` it also reads the command line and, with ``--config FILE``,
a TOML file. Options are layered, each layer overriding the one before:
built-in defaults, the file's ``[common]`` table, the file's table for the
service, then the flags actually given on the command line.

Operating it (see docs/deploy.md): SIGHUP reloads (the file and the TLS
files are read again: limits, timeouts and certificates apply to new
connections; with workers, a new generation takes over), sockets passed by
systemd are used (socket activation), systemd is told when the process is
ready, reloading or stopping (``NOTIFY_SOCKET``), and ``--user`` drops root
once the sockets are open and the TLS key read.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import signal
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import attrs
import trio

from ._framing import DEFAULT_MAX_LINE
from ._logs import flush_bursts, setup_logging
from ._metrics import CONTENT_TYPE, Metrics
from ._monitor import MonitorOptions, serve_monitor
from ._plugins import PluginError, builtin_names, load_service, service_names
from ._privileges import Identity, PrivilegeError, drop_privileges, resolve_identity
from ._proxy import parse_networks
from ._server import Server, StartupError
from ._service import (
    DEFAULT_LINE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PROXY_FROM,
    RELOADABLE,
    Service,
)
from ._systemd import ActivationError, Notifier, activated_sockets, assign_sockets
from ._tls import server_context
from ._workers import (
    CANNOT_START,
    EarlyHangup,
    ParentLink,
    ReloadQueue,
    inherited_config,
    inherited_listeners,
    run_workers,
    worker_index,
)

__all__ = ["ConfigError", "build_parser", "build_services", "run", "serve_forever"]

log = logging.getLogger("trionet")

#: Options of the server as a whole (one value for the process).
_SERVER_DESTS: Final = (
    "grace",
    "log_level",
    "workers",
    "metrics_port",
    "metrics_host",
    "log_format",
    "access_log",
    "reload_grace",
    "user",
    "group",
)
#: Seconds the previous generation of workers may keep its connections on reload.
DEFAULT_RELOAD_GRACE: Final = 30.0
#: Options every service has (``Service`` fields), by argparse dest.
_SERVICE_DESTS: Final = (
    "host",
    "max_connections",
    "max_per_address",
    "idle_timeout",
    "line_timeout",
    "max_line",
    "tls_cert",
    "tls_key",
    "proxy_protocol",
    "proxy_from",
)
_CONFIG_EXAMPLE: Final = """\
config file (--config FILE, TOML; command-line flags override it):
  [common]                      # options for every service (and the server)
  services = ["chat", "calc"]   # what to run when no SERVICE is named
  host = "0.0.0.0"
  idle-timeout = 600
  grace = 10

  [chat]                        # one table per service: host, port, its options
  port = 7003
  rate = 5

  [calc]
  port = 0                      # any free port; the log says which
Keys are the long option names without the dashes; an unknown table or key
is an error that names it."""

_SPEC: Final = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class ConfigError(ValueError):
    """A bad ``--config`` file or a bad ``--port`` mapping: the message says what."""


# -- option types --------------------------------------------------------------------


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {text}")
    return value


def _port_spec(text: str) -> tuple[str | None, int]:
    name, eq, number = text.rpartition("=")
    try:
        return (name if eq else None), _port_number(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PORT or NAME=PORT, got {text!r}") from None


def _networks(text: str) -> str:
    try:
        parse_networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _workers(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    return _positive_int(text)


# -- the parser ----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    # A service that cannot start stops the process with status 1 (see
    # PROTOCOL.md): a bad option is one way of not starting.
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


class _SharedGroup:
    """An argument group that lets two services declare the same option.

    Chat and guess both take ``--redis``: the first declaration wins and the
    second is skipped when it names the same destination (a real conflict,
    the same flag for two different things, still raises).
    """

    def __init__(self, parser: argparse.ArgumentParser, title: str) -> None:
        self._parser = parser
        self._group = parser.add_argument_group(title)
        self.dests: set[str] = set()

    def add_argument(self, *flags: str, **kwargs: Any) -> Any:
        known = {s: a for a in self._parser._actions for s in a.option_strings}
        clash = [known[f] for f in flags if f in known]
        if clash:
            dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
            if all(a.dest == dest for a in clash):
                self.dests.add(dest)
                return clash[0]
        action = self._group.add_argument(*flags, **kwargs)
        self.dests.add(action.dest)
        return action

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)


def _summary(cls: type[Service]) -> str:
    """The service's one line for ``--help``: ``summary``, else its docstring's first."""
    if cls.summary:
        return cls.summary
    doc = cls.__dict__.get("__doc__") or ""  # the class's own, never Service's
    return doc.strip().partition("\n")[0].strip()


def build_parser(
    classes: dict[str, type[Service]], *, prog: str = "python -m trionet.serve"
) -> tuple[argparse.ArgumentParser, dict[str, set[str]]]:
    """The command-line parser for ``classes``, and each service's own option dests."""
    table = "\n".join(
        f"  {c.name:<6} port {c.default_port:<5} {_summary(c)}" for c in classes.values()
    )
    parser = _Parser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run trionet services. With no SERVICE, every built-in runs, each on its\n"
            "default port. SERVICE is a name below, an installed plugin's name, or\n"
            "package.module:ClassName. SIGINT/SIGTERM shut down gracefully (exit 0;\n"
            "a second signal stops at once); SIGHUP reloads (--config and the TLS\n"
            "files are read again; new limits, timeouts and certificates apply to new\n"
            "connections); a service that cannot start exits 1.\n\n"
            f"services:\n{table}"
        ),
        epilog=(
            "Each service logs 'NAME listening on HOST:PORT' at start (with port 0 that\n"
            "is how to learn the port) and one access-log line per connection. Logs go\n"
            "to stderr (--log-format json: one JSON object per line). Under systemd,\n"
            "sockets it passes (socket activation) are served instead of opening ports,\n"
            "and NOTIFY_SOCKET is told READY/RELOADING/STOPPING. Deploying, metrics,\n"
            f"reloads and log shipping: docs/deploy.md.\n\n{_CONFIG_EXAMPLE}"
        ),
    )
    parser.add_argument(
        "services",
        nargs="*",
        metavar="SERVICE",
        help=f"services to run (default: {', '.join(classes) or 'every built-in'})",
    )
    server = parser.add_argument_group("the server")
    server.add_argument(
        "--config",
        metavar="FILE",
        help="read options from a TOML file (see below); flags given here override it; "
        "read again on SIGHUP",
    )
    server.add_argument(
        "--grace",
        type=_non_negative,
        default=5.0,
        metavar="SECONDS",
        help="on shutdown, time given to work in flight before clients are sent "
        "'BYE shutdown' (default: %(default)s)",
    )
    server.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="worker processes sharing the listening sockets; 'auto' is one per core "
        "(default: %(default)s)",
    )
    server.add_argument(
        "--reload-grace",
        type=_non_negative,
        default=DEFAULT_RELOAD_GRACE,
        metavar="SECONDS",
        help="with --workers, on SIGHUP: how long the previous workers may keep their "
        "connections before those are sent 'BYE shutdown' (default: %(default)s)",
    )
    server.add_argument(
        "--user",
        metavar="NAME",
        default=None,
        help="once the sockets are open and the TLS files read, run as this user "
        "(start as root to bind ports below 1024; workers run as it too)",
    )
    server.add_argument(
        "--group",
        metavar="NAME",
        default=None,
        help="with --user: the group to run as (default: the user's own)",
    )
    server.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity on stderr; the access log has its own switch (default: %(default)s)",
    )
    server.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="'json': one JSON object per line, for log shippers (default: %(default)s)",
    )
    server.add_argument(
        "--access-log",
        default="on",
        choices=["on", "off"],
        help="one line per connection, whatever --log-level is (default: %(default)s)",
    )
    server.add_argument(
        "--metrics-port",
        type=_port_number,
        default=None,
        metavar="PORT",
        help="serve HTTP GET /metrics (Prometheus), /healthz and /readyz on this port "
        "(with --workers, the parent's port covers every worker) (default: off)",
    )
    server.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address of --metrics-port (default: %(default)s)",
    )
    common = parser.add_argument_group("options for every service")
    common.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    common.add_argument(
        "--port",
        type=_port_spec,
        action="append",
        default=[],
        metavar="[NAME=]PORT",
        help="PORT alone with a single SERVICE; NAME=PORT (repeatable) with several, e.g. "
        "--port chat=17003 --port calc=0; 0 picks a free port (alone, one for each "
        "service; the 'listening on' lines say which) (default: each service's own)",
    )
    common.add_argument(
        "--max-connections",
        type=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="clients served at once per service; the next one is sent 'BYE busy' "
        "and closed (echo: closed) (default: %(default)s)",
    )
    common.add_argument(
        "--max-per-address",
        type=_positive_int,
        default=None,
        metavar="N",
        help="clients served at once from one IP address; more are sent 'BYE busy' "
        "(default: half of --max-connections)",
    )
    common.add_argument(
        "--idle-timeout",
        type=_non_negative,
        default=None,
        metavar="SECONDS",
        help="drop a client that sends nothing for this long, with 'BYE idle-timeout' "
        "(echo: silently); 0 turns it off (default: 300, chat 3600)",
    )
    common.add_argument(
        "--line-timeout",
        type=_non_negative,
        default=DEFAULT_LINE_TIMEOUT,
        metavar="SECONDS",
        help="a line must arrive whole within this long of its first byte, or the client "
        "is sent 'BYE line-timeout' and closed (stops clients that trickle bytes to hold "
        "a slot); 0 turns it off (default: %(default)s)",
    )
    common.add_argument(
        "--max-line",
        type=_positive_int,
        default=DEFAULT_MAX_LINE,
        metavar="BYTES",
        help="longest line accepted, terminator excluded; longer lines get "
        "'ERR line-too-long' and are skipped (default: %(default)s)",
    )
    common.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=None,
        help="PEM certificate (chain): the services speak TLS instead of plain TCP "
        "(with --tls-key; default: plain TCP)",
    )
    common.add_argument(
        "--tls-key", metavar="FILE", default=None, help="PEM private key for --tls-cert"
    )
    common.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="behind a load balancer (haproxy send-proxy / send-proxy-v2): every connection "
        "starts with a PROXY protocol header, version 1 or 2, naming the real client; that "
        "address counts for --max-per-address and the logs. A connection without a valid "
        "header within a few seconds is closed",
    )
    common.add_argument(
        "--proxy-from",
        metavar="CIDR[,CIDR...]",
        type=_networks,
        default=DEFAULT_PROXY_FROM,
        help="with --proxy-protocol: the balancers' addresses; a connection from anywhere "
        "else is refused and logged (a client must not choose its own address) "
        "(default: %(default)s)",
    )
    own: dict[str, set[str]] = {}
    for cls in classes.values():
        group = _SharedGroup(parser, f"{cls.name} options")
        cls.add_arguments(group)  # type: ignore[arg-type]
        if not group._group._group_actions:
            parser._action_groups.remove(group._group)
        own[cls.name] = group.dests
    return parser, own


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """The options actually given in ``argv`` (not their defaults), by dest."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        return vars(parser.parse_args(argv))
    finally:
        for action, default in saved:
            action.default = default


# -- the config file ---------------------------------------------------------------------


def _read_config(path: str, data: bytes | None = None) -> tuple[dict[str, Any], bytes]:
    """The file's tables, and its bytes (``data``: the bytes read already)."""
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        return tomllib.loads(data.decode()), data
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _config_value(path: str, where: str, key: str, action: argparse.Action, value: Any) -> Any:
    """``value`` from the file, checked and converted as the flag's own text would be."""
    what = f"config file {path}: [{where}] {key}"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{what}: expected true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(value, dict):
        raise ConfigError(f"{what}: expected a value, got a table")

    def one(item: Any) -> Any:
        text = str(item).lower() if isinstance(item, bool) else str(item)
        try:
            converted = action.type(text) if callable(action.type) else text
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{what}: {exc or 'invalid value'} ({item!r})") from None
        if action.choices is not None and converted not in action.choices:
            raise ConfigError(f"{what}: {item!r} is not one of {list(action.choices)}")
        return converted

    if isinstance(action, argparse._AppendAction):  # a repeatable flag: a list
        items = value if isinstance(value, list) else [value]
        return [one(v) for v in items]
    n = action.nargs
    if (isinstance(n, int) and n > 1) or n in ("+", "*"):
        if not isinstance(value, list) or (isinstance(n, int) and len(value) != n):
            raise ConfigError(f"{what}: expected a list of {n} values, got {value!r}")
        return [one(v) for v in value]
    return one(value)


@attrs.define
class _Plan:
    """What to run: the classes, and each one's options after every layer."""

    classes: dict[str, type[Service]]
    options: dict[str, argparse.Namespace]
    server: argparse.Namespace
    #: The config file's bytes as read (workers get this very copy).
    config: bytes | None = None


def _by_flag(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        s[2:]: a
        for a in parser._actions
        for s in a.option_strings
        if s.startswith("--") and a.dest not in ("help", "config", "port")
    }


def _plan(
    given: Sequence[Service | type[Service]] | None,
    argv: Sequence[str],
    config_data: bytes | None = None,
) -> tuple[_Plan, dict[str, Service]]:
    """Parse ``argv`` (and the config file it names) into what to run.

    ``config_data``: the config file's contents, read already (a worker
    gets the copy its parent checked, not whatever the file holds now).
    """
    instances = {s.name: s for s in given or [] if isinstance(s, Service)}
    available: dict[str, type[Service]] = {
        s.name: (type(s) if isinstance(s, Service) else s) for s in given or []
    }
    if given is None:
        for name in service_names():
            available[name] = load_service(name)
    # module:Class services named on the command line or in the config file
    # must be known before the parser is built (their options join it).
    config_path = _config_path(argv)
    config, raw = _read_config(config_path, config_data) if config_path else ({}, None)
    common_table = config.get("common", {})
    if not isinstance(common_table, dict):
        raise ConfigError(f"config file {config_path}: 'common' must be a table")
    listed = common_table.get("services", [])
    if not isinstance(listed, list) or not all(isinstance(s, str) for s in listed):
        raise ConfigError(f"config file {config_path}: [common] services must be a list of names")
    for token in [*argv, *listed]:
        if _SPEC.fullmatch(token):
            cls = load_service(token)
            known = available.setdefault(cls.name, cls)
            if known is not cls:
                # Running one of them silently would run the wrong code: the
                # user's class named here, or the installed one, unannounced.
                raise PluginError(
                    f"two different services are named {cls.name!r}: "
                    f"{_where(known)} (installed or given first) and {token} "
                    f"({_where(cls)}); give one another name (its 'name' class attribute)"
                )
    prog = "python -m trionet.serve" if given is None else os.path.basename(sys.argv[0])
    parser, own = build_parser(available, prog=prog)
    args = parser.parse_args(argv)
    explicit = _explicit(parser, argv)

    names = [_name_of(s, available) for s in dict.fromkeys(args.services or listed)]
    if not names:
        names = builtin_names() if given is None else list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise PluginError(f"unknown service {unknown[0]!r} (available: {', '.join(available)})")

    flags = _by_flag(parser)
    shared = {*_SERVER_DESTS, *_SERVICE_DESTS}
    for table, values in config.items():
        if table == "common":
            continue
        if table not in available:
            raise ConfigError(f"config file {config_path}: unknown service table [{table}]")
        if not isinstance(values, dict):
            raise ConfigError(f"config file {config_path}: {table} must be a table")

    def layer(
        ns: argparse.Namespace, where: str, values: dict[str, Any], allowed: set[str]
    ) -> None:
        given = vars(ns).setdefault("given", set())
        for key, value in values.items():
            if where == "common" and key == "services":
                continue
            if key == "port" and where != "common":
                ns.port_number = _config_value(config_path or "", where, key, _PORT_ACTION, value)
                continue
            action = flags.get(key)
            if action is None or action.dest not in allowed:
                raise ConfigError(f"config file {config_path}: [{where}] unknown key {key!r}")
            setattr(ns, action.dest, _config_value(config_path or "", where, key, action, value))
            given.add(action.dest)

    server_ns = copy.copy(args)
    layer(server_ns, "common", common_table, shared)
    for dest in _SERVER_DESTS:
        if dest in explicit:
            setattr(server_ns, dest, explicit[dest])

    ports = _ports(args.port, names)
    options: dict[str, argparse.Namespace] = {}
    for name in names:
        ns = copy.copy(args)
        ns.port_number = None
        layer(ns, "common", common_table, shared)
        table = config.get(name, {})
        layer(ns, name, table, shared - set(_SERVER_DESTS) | own.get(name, set()))
        for dest, value in explicit.items():
            if dest not in ("services", "port", "config"):
                setattr(ns, dest, value)
                ns.given.add(dest)
        if name in ports:
            ns.port_number = ports[name]
        options[name] = ns
    plan = _Plan({n: available[n] for n in names}, options, server_ns, raw)
    return plan, instances


_PORT_ACTION = argparse.Action(["--port"], "port", type=_port_number)


def _where(cls: type[Service]) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _config_path(argv: Sequence[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.partition("=")[2]
    return None


def _name_of(token: str, available: dict[str, type[Service]]) -> str:
    if _SPEC.fullmatch(token):
        return load_service(token).name
    return token


def _ports(specs: Iterable[tuple[str | None, int]], names: list[str]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for name, port in specs:
        if name is None:
            if len(names) != 1 and port == 0:
                # "Any free port" makes sense for every service at once.
                ports.update(dict.fromkeys(names, 0))
                continue
            if len(names) != 1:
                raise ConfigError(
                    f"--port {port} with several services: one port cannot serve them "
                    "all; use --port NAME=PORT for each (e.g. --port chat=17003), or "
                    "--port 0 for a free port each"
                )
            name = names[0]
        elif name not in names:
            raise ConfigError(f"--port {name}={port}: {name} is not one of the services run")
        ports[name] = port
    return ports


def _build(plan: _Plan, instances: dict[str, Service]) -> list[Service]:
    services = []
    for name, cls in plan.classes.items():
        ns = plan.options[name]
        common: dict[str, Any] = {dest: getattr(ns, dest) for dest in _SERVICE_DESTS}
        common["port"] = ns.port_number
        try:
            if name in instances:
                # A ready instance keeps its settings but for the common
                # options the file or the command line gave.
                changes = {d: common[d] for d in _SERVICE_DESTS if d in ns.given}
                if ns.port_number is not None:
                    changes["port"] = ns.port_number
                service = attrs.evolve(instances[name], **changes)
            else:
                service = cls.from_args(ns, **common)
        except (ValueError, TypeError) as exc:
            port = cls.default_port if ns.port_number is None else ns.port_number
            raise StartupError(name, ns.host or "127.0.0.1", port, str(exc)) from exc
        services.append(service)
    return services


# -- running -------------------------------------------------------------------------------


class ReloadError(Exception):
    """The configuration read on SIGHUP cannot be used: the message says why."""


@attrs.define
class _Reloader:
    """Reads the configuration again on SIGHUP (blocking: run it in a thread).

    With ``argv`` the whole plan is made again (the config file is read
    again; the flags, unchanged, still win) and the services built (which
    reads the TLS files and checks every option) but only to take their
    :data:`~trionet._service.RELOADABLE` settings. Without ``argv``
    (``run(services)``), the TLS files are read again.
    """

    given: Sequence[Service | type[Service]] | None
    argv: list[str] | None
    running: list[Service]
    plan: _Plan | None = None

    def settings(self, *, all_options: bool = False) -> tuple[dict[str, dict[str, Any]], Any]:
        """The new settings per service, and the new server options (or ``None``).

        ``all_options``: everything will apply (a new generation of workers
        starts from the new configuration), so only what cannot change (the
        sockets' hosts and ports) is warned about.
        """
        if self.argv is None:
            return {
                s.name: {"tls_context": server_context(s.tls_cert, s.tls_key)}
                for s in self.running
                if s.tls_cert is not None and s.tls_key is not None
            }, None
        try:
            plan, instances = _plan(self.given, self.argv)
            built = _build(plan, instances)
        except (ConfigError, PluginError) as exc:
            raise ReloadError(str(exc)) from None
        except StartupError as exc:
            raise ReloadError(f"{exc.service}: {exc.reason}") from None
        except SystemExit:  # argparse (the argv is the one that worked at start)
            raise ReloadError("the command line no longer parses") from None
        names = [s.name for s in self.running]
        if [s.name for s in built] != names:
            raise ReloadError(
                f"the services to run changed ({', '.join(names)} -> "
                f"{', '.join(s.name for s in built)}): that needs a restart"
            )
        for old, new in zip(self.running, built, strict=True):
            if (old.host, old.effective_port) != (new.host, new.effective_port):
                log.warning(
                    "reload: %s keeps its address; a new host or port needs a restart", old.name
                )
            if not all_options and self.plan is not None:
                self._warn_unapplied(old.name, self.plan.options[old.name], plan.options[old.name])
        if self.plan is not None:
            # A new generation of workers takes the log level and the user;
            # one process keeps them, and the parent keeps its worker count.
            fixed = ["workers"] if all_options else ["workers", "log_level", "user", "group"]
            changed = [d for d in fixed if getattr(plan.server, d) != getattr(self.plan.server, d)]
            if changed:
                log.warning(
                    "reload: %s changed but applies only after a restart",
                    ", ".join("--" + d.replace("_", "-") for d in changed),
                )
        self.plan = plan
        settings = {s.name: {f: getattr(s, f) for f in RELOADABLE} for s in built}
        return settings, plan.server

    def check(self) -> bytes | None:
        """For a new generation of workers: raise if the configuration cannot be used.

        Returns the config file's bytes as read and checked: the new workers
        build their services from that very copy.
        """
        self.settings(all_options=True)
        return self.plan.config if self.plan is not None else None

    @staticmethod
    def _warn_unapplied(name: str, before: argparse.Namespace, after: argparse.Namespace) -> None:
        applied = {*RELOADABLE, *_SERVER_DESTS, "given", "services", "port", "port_number", "host"}
        changed = sorted(
            d for d, v in vars(after).items() if d not in applied and vars(before).get(d) != v
        )
        if changed:
            log.warning(
                "reload: %s: %s changed but applies only after a restart",
                name,
                ", ".join("--" + d.replace("_", "-") for d in changed),
            )


def _status(server: Server) -> str:
    counts = server.connection_counts()
    detail = ", ".join(f"{name} {n}" for name, n in counts.items())
    return f"{sum(counts.values())} connection(s) open ({detail})"


async def _reload(
    server: Server, reloader: _Reloader, notifier: Notifier, reloads: ReloadQueue
) -> None:
    async with reloads.turn():
        notifier.reloading()
        try:
            settings, options = await trio.to_thread.run_sync(reloader.settings)
        except (ReloadError, ValueError) as exc:
            log.error("reload failed: %s; the running configuration stays", exc)
        else:
            try:
                server.reload(settings)
            except Exception:  # a bug of ours: say so, but SIGHUP never stops the server
                log.exception("reload failed part way; some settings may be the new ones")
            else:
                if options is not None:
                    server.grace = options.grace
                log.info("reloaded: new connections get the new settings")
        notifier.ready(_status(server))


async def _watch_signals(
    server: Server,
    nursery: trio.Nursery,
    reloader: _Reloader | None,
    notifier: Notifier,
    reloads: ReloadQueue,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if reloader is None:
                    log.info(
                        "SIGHUP ignored: a worker reloads when its parent (pid %d) does",
                        os.getppid(),
                    )
                elif not server.shutting_down and reloads.request("SIGHUP received"):
                    nursery.start_soon(_reload, server, reloader, notifier, reloads)
            elif not server.shutting_down:
                log.info("%s received: shutting down gracefully", name)
                notifier.stopping()
                server.shutdown()
            else:
                log.warning("%s received again: stopping now", name)
                nursery.cancel_scope.cancel()


async def _housekeeping(server: Server, refresh: bool) -> None:
    """Every second: close third-party log bursts; in a worker, publish the services' figures."""
    while True:
        await trio.sleep(1.0)
        flush_bursts()
        if refresh and server.metrics is not None:
            server.metrics.refresh(server.services)


async def _serve_until_signalled(
    server: Server,
    link: ParentLink | None,
    reloader: _Reloader | None,
    notifier: Notifier,
    reload_grace: float,
    monitor: MonitorOptions | None,
) -> None:
    reloads = ReloadQueue()
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, server, nursery, reloader, notifier, reloads)
        if link is not None:
            nursery.start_soon(link.watch, server, reload_grace)
        metrics = server.metrics
        if monitor is not None and metrics is not None:

            async def render() -> tuple[bytes, str]:
                return metrics.render(server.services), CONTENT_TYPE

            async def readiness() -> str | None:
                return server.readiness()

            await nursery.start(serve_monitor, monitor.host, monitor.port, render, readiness)
        # A worker's figures reach its parent's scrape only through its files.
        nursery.start_soon(_housekeeping, server, link is not None)

        async def serve(*, task_status: trio.TaskStatus[None]) -> None:
            await server.run(task_status=task_status)
            nursery.cancel_scope.cancel()

        await nursery.start(serve)
        if link is not None:
            await link.ready()
            nursery.start_soon(link.report, server)
        notifier.ready(_status(server))
        nursery.start_soon(notifier.keep_alive, lambda: _status(server))
        early = EarlyHangup.take() and not server.shutting_down
        if early and reloader is not None and reloads.request("SIGHUP received during start-up"):
            nursery.start_soon(_reload, server, reloader, notifier, reloads)


def _privilege_error(exc: BaseException) -> PrivilegeError | None:
    """The :class:`PrivilegeError` in ``exc`` (an exception group, maybe), if any."""
    if isinstance(exc, PrivilegeError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _privilege_error(inner)) is not None:
                return found
    return None


def _setup_logging(level: str, fmt: str = "text", access: bool = True) -> None:
    setup_logging(level, fmt=fmt, access=access, worker=worker_index())


def _raise_fd_limit(services: Sequence[Service]) -> None:
    """Let the process hold every connection it is configured to accept.

    The usual soft limit of 1024 descriptors is below the default
    ``--max-connections`` of 1000 per service times five services; raise it
    towards the hard limit (which needs no privilege) and warn if that is
    still short.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Unix
        return
    needed = sum(s.max_connections for s in services) + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning(
            "open-file limit %d is below the %d descriptors --max-connections may need",
            target,
            needed,
        )


def build_services(
    argv: Sequence[str], services: Sequence[Service | type[Service]] | None = None
) -> list[Service]:
    """The services ``run(services, argv=argv)`` would run, built but not started.

    For tests and tools: every layer applies (defaults, ``--config``, flags).
    Raises :exc:`ConfigError`, :exc:`~trionet.PluginError` or
    :exc:`~trionet.StartupError`; a bad flag exits like argparse does.
    """
    plan, instances = _plan(services, list(argv))
    return _build(plan, instances)


def run(
    services: Sequence[Service | type[Service]] | None = None,
    *,
    argv: Sequence[str] | None = None,
    host: str = "127.0.0.1",
    grace: float = 5.0,
    log_level: str = "INFO",
) -> int:
    """Run ``services`` as a program; return the exit status (0 after a clean stop).

    Args:
      services: service instances or classes (classes are built with their
        defaults, or from the command line). ``None`` means the installed
        services: the ones named on the command line, or every built-in.
      argv: command-line arguments (e.g. ``sys.argv[1:]``); ``None`` reads
        none. With it, every option of ``python -m trionet.serve`` works:
        ports (``--port NAME=PORT``), timeouts, limits, TLS, ``--config``,
        and each service's own options. For a ready instance only the
        common options given there replace its settings.
      host, grace, log_level: used when ``argv`` is ``None``.

    Logging is set up on stderr unless the program configured it already.
    SIGINT or SIGTERM starts a graceful shutdown (listeners close, work in
    flight gets ``grace`` seconds, clients get ``BYE shutdown``); a second
    signal stops at once. SIGHUP reloads (see :class:`_Reloader`). A
    service that cannot start (address in use, a bad option) is reported
    in one line and the status is 1.
    """
    EarlyHangup.install()
    reload_grace, user, group = DEFAULT_RELOAD_GRACE, None, None
    try:
        if argv is None:
            items = list(services or [])
            built = [s if isinstance(s, Service) else s() for s in items]
            level, workers = log_level, 1
            reloader = _Reloader(None, None, built)
            fmt, access, monitor = "text", True, None
        else:
            plan, instances = _plan(services, list(argv), inherited_config())
            host = plan.server.host
            grace = plan.server.grace
            level, workers = plan.server.log_level, plan.server.workers
            reload_grace, user, group = (
                plan.server.reload_grace,
                plan.server.user,
                plan.server.group,
            )
            fmt, access = plan.server.log_format, plan.server.access_log == "on"
            port = plan.server.metrics_port
            monitor = None if port is None else MonitorOptions(port, plan.server.metrics_host)
            _setup_logging(level, fmt, access)
            built = _build(plan, instances)
            reloader = _Reloader(services, list(argv), built, plan)
        if group is not None and user is None:
            raise ConfigError("--group needs --user")
        identity = resolve_identity(user, group) if user is not None else None
    except (ConfigError, PluginError, PrivilegeError) as exc:
        print(f"trionet: error: {exc}", file=sys.stderr)
        return 1
    except StartupError as exc:
        _setup_logging(log_level)
        log.error("%s", exc)
        return 1
    _setup_logging(level, fmt, access)
    worker = inherited_listeners()
    if worker is not None:  # started by a parent with --workers: serve its sockets
        listeners, link = worker
        if identity is not None:  # the TLS files were read (the services are built)
            try:
                _drop(identity)
            except PrivilegeError as exc:
                log.error("%s", exc)
                return 1
        # Its metrics go to files its parent reads (PROMETHEUS_MULTIPROC_DIR).
        return serve_forever(
            built,
            host=host,
            grace=grace,
            listeners=listeners,
            link_fd=link,
            reload_grace=reload_grace,
            metrics=monitor is not None,
        )
    notifier = Notifier.from_environ()
    try:
        passed = assign_sockets(activated_sockets(), [s.name for s in built])
    except ActivationError as exc:
        log.error("socket activation: %s", exc)
        return 1
    if workers > 1:
        # The parent stays root (it reads no client's byte, and starts the
        # workers of the next reload, which read the TLS key again); each
        # worker drops by itself.
        return run_workers(
            built,
            host=host,
            grace=grace,
            workers=workers,
            reload_grace=reload_grace,
            config=reloader.plan.config if reloader.plan is not None else None,
            check_reload=reloader.check,
            given_sockets=passed,
            notifier=notifier,
            monitor=monitor,
        )
    listeners = {
        name: [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in socks]
        for name, socks in passed.items()
    }
    return serve_forever(
        built,
        host=host,
        grace=grace,
        listeners=listeners or None,
        announce=True,
        reloader=reloader,
        notifier=notifier,
        identity=identity,
        monitor=monitor,
    )


def _drop(identity: Identity) -> None:
    if drop_privileges(identity):
        log.info(
            "running as user %s (uid %d), group %s (gid %d)",
            identity.user,
            identity.uid,
            identity.group,
            identity.gid,
        )


def serve_forever(
    services: Sequence[Service],
    *,
    host: str = "127.0.0.1",
    grace: float = 5.0,
    listeners: Mapping[str, Sequence[trio.SocketListener]] | None = None,
    link_fd: int | None = None,
    announce: bool | None = None,
    reloader: _Reloader | None = None,
    notifier: Notifier | None = None,
    identity: Identity | None = None,
    reload_grace: float = DEFAULT_RELOAD_GRACE,
    monitor: MonitorOptions | None = None,
    metrics: bool = False,
) -> int:
    """Run ready ``services`` in this process until a signal; return the exit status.

    ``listeners`` are sockets opened already (a worker's, from its parent,
    or systemd's); ``link_fd`` is a worker's link to its parent (see
    :mod:`trionet._workers`). ``reloader`` answers SIGHUP (a worker has
    none: its parent reloads), ``notifier`` tells systemd, and
    ``identity`` is who to become once every listener is open.
    ``monitor`` serves /metrics and the health checks; ``metrics`` counts
    without serving them (a worker, whose parent serves them).
    """
    _raise_fd_limit(services)
    server = Server(
        services,
        host=host,
        grace=grace,
        listeners=listeners,
        announce=listeners is None if announce is None else announce,
        on_listening=None if identity is None else lambda: _drop(identity),
        metrics=Metrics() if monitor is not None or metrics else None,
    )
    link = ParentLink(link_fd) if link_fd is not None else None
    try:
        trio.run(
            _serve_until_signalled,
            server,
            link,
            reloader,
            notifier or Notifier(),
            reload_grace,
            monitor,
        )
    except KeyboardInterrupt:
        # Ctrl-C before the signal handler was installed, or after it was
        # removed: nothing was serving, so there is nothing to report.
        log.info("interrupted")
        return 0
    except BaseException as exc:
        # In a worker the same would happen in every worker: CANNOT_START
        # tells the parent to stop rather than restart it forever.
        if StartupError.report(exc):
            return 1 if link is None else CANNOT_START
        privilege = _privilege_error(exc)
        if privilege is None:
            raise
        log.error("%s", privilege)
        return 1 if link is None else CANNOT_START
    finally:
        flush_bursts(final=True)
    log.info("stopped")
    return 0
