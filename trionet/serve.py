"""``python -m trionet.serve``: run trionet's services from the command line.

Like ``twistd``, this runs named services in one process, each on its own
listener, under one nursery; it is :func:`trionet.run` with the command
line, over every installed service (``python -m trionet.serve --help``).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from typing import Any

from ._runner import run
from ._server import serve

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m trionet.serve`` and ``trionet-serve``."""
    return run(None, argv=sys.argv[1:] if argv is None else argv)


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
