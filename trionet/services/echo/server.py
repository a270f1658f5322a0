"""echo: RFC 862 over TCP (port 7001).

Every byte received is sent back unchanged and in order; when the client
half-closes, whatever is pending is sent and the server closes. Idle
timeout and shutdown close silently: a ``BYE`` line would corrupt the echo.

The handler is four lines against :class:`~trionet.Connection`; its speed
(it beats Trio's tutorial echo server, see docs/benchmarks.md) comes from
the connection's socket fast path, which every service shares.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from ..._connection import Connection
from ..._service import Service

__all__ = ["EchoService"]

#: Bytes read per system call; large so bulk streams take few calls.
CHUNK = 65536


@attrs.define(kw_only=True, eq=False)
class EchoService(Service):
    """Sends every byte back (RFC 862)."""

    name: ClassVar[str] = "echo"
    default_port: ClassVar[int] = 7001
    line_based: ClassVar[bool] = False
    summary: ClassVar[str] = "every byte sent back unchanged (RFC 862)"

    async def handle(self, conn: Connection) -> None:
        # A client streaming without pause is still stopped by a shutdown
        # or a stalled send: the connection checks both at every call.
        while data := await conn.receive_some(CHUNK):
            await conn.send_all(data)
