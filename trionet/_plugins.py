"""Finding services and their clients: entry points, and ``module:Class``.

A service is found by name through the ``trionet.services`` entry-point
group, and its command-line client through ``trionet.clients``; trionet's
own five register themselves there exactly like a third-party plugin does
(see ``pyproject.toml``), so nothing here lists them by name. A service can
also be named by its import path, ``package.module:ClassName``, which needs
no packaging at all.

Clients have a group of their own so that ``python -m trionet.client NAME``
imports only the client module asked for, never the server's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ._service import Service

__all__ = [
    "CLIENT_GROUP",
    "SERVICE_GROUP",
    "PluginError",
    "builtin_names",
    "client_names",
    "load_client",
    "load_service",
    "service_names",
]

SERVICE_GROUP = "trionet.services"
CLIENT_GROUP = "trionet.clients"


class PluginError(LookupError):
    """A service or client that cannot be found or loaded; the message says why."""


def _group(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep)  # the first installed wins, as importlib does
    return found


def _is_builtin(ep: EntryPoint) -> bool:
    return ep.value.startswith("trionet.")


def service_names() -> list[str]:
    """Every installed service name: trionet's own first, then plugins, by name."""
    eps = _group(SERVICE_GROUP)
    return sorted(eps, key=lambda n: (not _is_builtin(eps[n]), n))


def builtin_names() -> list[str]:
    """trionet's own services in port order (what runs when none is named)."""
    eps = {n: ep for n, ep in _group(SERVICE_GROUP).items() if _is_builtin(ep)}
    if not eps:
        raise PluginError(
            "no services are registered: trionet is not installed "
            "(run scripts/serve, or pip install -e . in the source tree)"
        )
    return sorted(eps, key=lambda n: load_service(n).default_port)


def client_names() -> list[str]:
    """Every name ``python -m trionet.client`` knows, trionet's own first."""
    eps = _group(CLIENT_GROUP)
    return sorted(eps, key=lambda n: (not _is_builtin(eps[n]), n))


def _load_path(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


def load_service(spec: str) -> type[Service]:
    """The service class for a registered name or a ``module:Class`` path."""
    if ":" in spec:
        obj = _load_path(spec)
        where = spec
    else:
        eps = _group(SERVICE_GROUP)
        if spec not in eps:
            known = ", ".join(service_names()) or "none"
            raise PluginError(f"unknown service {spec!r} (installed: {known})")
        try:
            obj = eps[spec].load()
        except Exception as exc:
            raise PluginError(f"service {spec!r} failed to load: {exc}") from exc
        where = eps[spec].value
    if not (isinstance(obj, type) and issubclass(obj, Service)):
        raise PluginError(f"{where} is not a trionet.Service subclass")
    return obj


def load_client(name: str) -> Callable[[list[str]], int]:
    """The ``main(argv) -> exit status`` of the client registered as ``name``."""
    eps = _group(CLIENT_GROUP)
    if name not in eps:
        known = ", ".join(client_names()) or "none"
        raise PluginError(f"unknown client {name!r} (installed: {known})")
    func: Callable[[list[str]], int] = eps[name].load()
    return func
