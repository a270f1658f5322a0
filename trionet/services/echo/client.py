"""The echo client: ``python -m trionet.client echo``."""

from __future__ import annotations

import argparse
import os
import sys

import trio

from ..._client import EXIT_OK, add_address_arguments, connect_args, run_client
from .server import CHUNK, EchoService

__all__ = ["client_main"]


def client_main(argv: list[str]) -> int:
    """``python -m trionet.client echo``: stdin to the server, the echo to stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m trionet.client echo",
        description=(
            "Send standard input to an echo server and write what comes back to "
            "standard output, byte for byte (binary safe). At the end of input the "
            "client half-closes the connection and exits once the server has sent "
            "everything back (over TLS, which cannot half-close: once every byte "
            "sent has come back)."
        ),
        epilog="exit status: 0 done, 3 cannot connect, 4 connection lost"
        ", 10 TLS handshake failed (certificate not trusted or not for --host)",
    )
    add_address_arguments(parser, EchoService.default_port)
    args = parser.parse_args(argv)

    async def main() -> int:
        stream = await connect_args(args, "echo")
        stdin_fd = sys.stdin.fileno()
        stdout = sys.stdout.buffer
        sent = received = 0
        all_sent = False
        # TLS cannot half-close, so over TLS the client itself ends the
        # exchange once every byte it sent has come back.
        receiving = trio.CancelScope()

        async def pump_stdin() -> None:
            nonlocal sent, all_sent
            # Reads of stdin block (a terminal, a pipe): run them in a thread
            # rather than make stdin non-blocking, which would leak into the
            # parent shell sharing the same file description.
            while chunk := await trio.to_thread.run_sync(
                os.read, stdin_fd, CHUNK, abandon_on_cancel=True
            ):
                await stream.send_all(chunk)
                sent += len(chunk)
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
                return
            all_sent = True
            if received >= sent:
                receiving.cancel()

        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(pump_stdin)
            with receiving:
                while data := await stream.receive_some(CHUNK):
                    received += len(data)
                    await trio.to_thread.run_sync(stdout.write, data)
                    if all_sent and received >= sent:
                        break
            await trio.to_thread.run_sync(stdout.flush)
            nursery.cancel_scope.cancel()
        return EXIT_OK

    return run_client(main, "echo")
