"""``python -m trionet.client SERVICE ...``: the command-line clients.

Each service brings its own client, registered under the ``trionet.clients``
entry-point group (plugins too); this module only dispatches to it, so
``python -m trionet.client guess --help`` is that client's own help.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ._plugins import PluginError, client_names, load_client

__all__ = ["main"]


def _usage() -> str:
    return (
        "usage: python -m trionet.client SERVICE [options]\n\n"
        f"SERVICE is one of: {', '.join(client_names())}\n"
        "'python -m trionet.client SERVICE --help' explains each client.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trionet.client`` and ``trionet``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    # Import only the client asked for: start-up time is part of every
    # command a person or a script runs.
    try:
        client_main = load_client(name)
    except PluginError as exc:
        print(f"{exc}\n\n{_usage()}", end="", file=sys.stderr)
        return 2
    return client_main(rest)


if __name__ == "__main__":
    sys.exit(main())
