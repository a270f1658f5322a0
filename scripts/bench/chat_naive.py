"""Baseline for scripts/bench/chat.py: the naive Trio chat design.

Each member has a memory channel and a writer task that does one
``send_all`` per message: no write coalescing. Speaks the subset of the chat
protocol the benchmark uses (WELCOME, /nick, JOIN, MSG, LEAVE).

Usage: python scripts/bench/chat_naive.py PORT
"""

from __future__ import annotations

import math
import sys

import trio

members: dict[str, trio.MemorySendChannel[bytes]] = {}


def broadcast(data: bytes, skip: str | None) -> None:
    for nick, channel in members.items():
        if nick != skip:
            channel.send_nowait(data)


async def writer(stream: trio.SocketStream, receive: trio.MemoryReceiveChannel[bytes]) -> None:
    try:
        async for data in receive:
            await stream.send_all(data)  # one system call per message
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the reader sees the end too


async def handle(stream: trio.SocketStream) -> None:
    send, receive = trio.open_memory_channel[bytes](math.inf)
    nick: str | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, stream, receive)
            send.send_nowait("WELCOME trionet chat — send /nick <name> to join\n".encode())
            buf = b""
            try:
                while data := await stream.receive_some(65536):
                    *lines, buf = (buf + data).split(b"\n")
                    for raw in lines:
                        line = raw.decode().rstrip("\r")
                        if line.startswith("/nick "):
                            nick = line[6:].strip()
                            members[nick] = send
                            send.send_nowait(f"OK nick {nick}\n".encode())
                            broadcast(f"JOIN {nick}\n".encode(), nick)
                        elif nick is not None and line:
                            broadcast(f"MSG {nick} {line}\n".encode(), nick)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()
    finally:
        if nick is not None and members.get(nick) is send:
            del members[nick]
            broadcast(f"LEAVE {nick}\n".encode(), None)


async def main(port: int) -> None:
    print("listening", flush=True)
    await trio.serve_tcp(handle, port, host="127.0.0.1")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
