"""``python -m trionet.serve``: run trionet's services from the command line.

Like ``twistd``, this runs named services in one process, each on its own
listener, under one nursery. SIGINT or SIGTERM starts a graceful shutdown
(listeners close at once, work in flight gets ``--grace`` seconds, every
client gets ``BYE shutdown``) and the process exits 0; a second signal
stops at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import types
from collections.abc import Sequence
from typing import Any

import trio

from ._framing import DEFAULT_MAX_LINE
from ._plugins import builtin_names, load_service
from ._server import Server, StartupError, serve
from ._service import DEFAULT_LINE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, Service

__all__ = ["build_parser", "main", "services_from_args"]

log = logging.getLogger("trionet")


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


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535, got {text}")
    return value


def build_parser(classes: dict[str, type[Service]]) -> argparse.ArgumentParser:
    """The ``trionet.serve`` argument parser for the given service classes."""
    table = "\n".join(f"  {c.name:<6} port {c.default_port}  {c.summary}" for c in classes.values())
    parser = argparse.ArgumentParser(
        prog="python -m trionet.serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run trionet services. With no SERVICE, every service runs, each on its\n"
            "default port. SIGINT/SIGTERM shut down gracefully (exit status 0).\n\n"
            f"services:\n{table}"
        ),
        epilog=(
            "Each service logs '<service> listening on <host>:<port>' at start (with\n"
            "--port 0 that is how to learn the port) and one access-log line per\n"
            "connection. Logs go to stderr."
        ),
    )
    parser.add_argument(
        "services",
        nargs="*",
        metavar="SERVICE",
        help=f"services to run: {', '.join(classes)} (default: all)",
    )
    common = parser.add_argument_group("options for every service")
    common.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    common.add_argument(
        "--port",
        type=_port,
        default=None,
        help="port to listen on, only with a single SERVICE; 0 picks a free one "
        "(default: the service's own port)",
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
        "--max-per-address",
        type=_positive_int,
        default=None,
        metavar="N",
        help="clients served at once from one IP address; more are sent 'BYE busy' "
        "(default: half of --max-connections)",
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
        "--grace",
        type=_non_negative,
        default=5.0,
        metavar="SECONDS",
        help="on shutdown, time given to work in flight before clients are sent "
        "'BYE shutdown' (default: %(default)s)",
    )
    common.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity on stderr (default: %(default)s)",
    )
    for cls in classes.values():
        group = parser.add_argument_group(f"{cls.name} options")
        cls.add_arguments(group)
        if not group._group_actions:
            parser._action_groups.remove(group)
    return parser


def services_from_args(
    args: argparse.Namespace, classes: dict[str, type[Service]], parser: argparse.ArgumentParser
) -> list[Service]:
    """Instantiate the services named in ``args`` (all when none)."""
    names = list(dict.fromkeys(args.services)) or list(classes)
    unknown = [n for n in names if n not in classes]
    if unknown:
        parser.error(f"unknown service {unknown[0]!r} (choose from {', '.join(classes)})")
    if args.port is not None and len(names) != 1:
        parser.error("--port needs exactly one SERVICE (each service has its own port)")
    common: dict[str, Any] = {
        "port": args.port,
        "max_connections": args.max_connections,
        "idle_timeout": args.idle_timeout,
        "max_line": args.max_line,
        "line_timeout": args.line_timeout,
        "max_per_address": args.max_per_address,
    }
    services = []
    for name in names:
        try:
            services.append(classes[name].from_args(args, **common))
        except ValueError as exc:
            parser.error(f"{name}: {exc}")
    return services


async def _watch_signals(
    server: Server, cancel: trio.CancelScope, *, task_status: trio.TaskStatus[None]
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if not server.shutting_down:
                log.info("%s received: shutting down gracefully", signal.Signals(signum).name)
                server.shutdown()
            else:
                log.warning("%s received again: stopping now", signal.Signals(signum).name)
                cancel.cancel()


async def _run(server: Server) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, server, nursery.cancel_scope)
        await server.run()
        nursery.cancel_scope.cancel()


def _first_os_error(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _first_os_error(inner)) is not None:
                return found
    return None


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trionet.serve`` and ``trionet-serve``."""
    classes = {name: load_service(name) for name in builtin_names()}
    parser = build_parser(classes)
    args = parser.parse_args(argv)
    services = services_from_args(args, classes, parser)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _raise_fd_limit(services)
    server = Server(services, host=args.host, grace=args.grace)
    try:
        trio.run(_run, server)
    except BaseException as exc:
        error = _first_os_error(exc)
        if not isinstance(error, StartupError):
            raise
        log.error("%s", error)
        return 1
    log.info("stopped")
    return 0


class _CallableModule(types.ModuleType):
    """Keeps ``trionet.serve`` callable once this module is imported.

    Importing the submodule ``trionet.serve`` makes Python bind the package
    attribute ``trionet.serve`` to this module, shadowing the
    :func:`trionet.serve` coroutine function re-exported by the package: a
    program that ran ``import trionet.serve`` anywhere would then find
    ``nursery.start(trionet.serve, ...)`` failing with "not callable".
    Making the module callable, forwarding to the function, keeps both
    spellings working whatever was imported first.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return serve(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
