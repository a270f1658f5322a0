"""``python -m trionet.client SERVICE ...``: the command-line clients.

Each service module brings its own client (``client_main``); this module
only dispatches to it, so ``python -m trionet.client guess --help`` is that
client's own help.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .services import SERVICE_NAMES, load_module

__all__ = ["main"]


def _usage(available: list[str]) -> str:
    return (
        "usage: python -m trionet.client SERVICE [options]\n\n"
        f"SERVICE is one of: {', '.join(available)}\n"
        "'python -m trionet.client SERVICE --help' explains each client.\n"
    )


def _available() -> list[str]:
    return [n for n in SERVICE_NAMES if load_module(n) is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trionet.client`` and ``trionet``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(_available()), end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    # Import only the client asked for: start-up time is part of every
    # command a person or a script runs.
    module = load_module(name) if name in SERVICE_NAMES else None
    if module is None:
        print(f"unknown service {name!r}\n\n{_usage(_available())}", end="", file=sys.stderr)
        return 2
    status: int = module.client_main(rest)
    return status


if __name__ == "__main__":
    sys.exit(main())
