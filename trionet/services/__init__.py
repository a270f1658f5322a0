"""The services shipped with trionet, one module each.

Every module here defines one :class:`trionet.Service` subclass, exposed as
the module attribute ``SERVICE``, and the client for it as
``client_main(argv: list[str]) -> int``, used by ``python -m trionet.client``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .._service import Service

__all__ = ["SERVICE_NAMES", "load_module", "service_classes"]

#: Every service trionet knows of, in port order.
SERVICE_NAMES = ("echo", "guess", "chat", "files", "calc")


def load_module(name: str) -> ModuleType | None:
    """Import ``trionet.services.<name>``; ``None`` if it does not exist."""
    if name not in SERVICE_NAMES:
        raise KeyError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            return None
        raise


def service_classes() -> dict[str, type[Service]]:
    """The service classes that exist, by name, in port order."""
    found: dict[str, type[Service]] = {}
    for name in SERVICE_NAMES:
        module = load_module(name)
        if module is not None:
            found[name] = module.SERVICE
    return found
