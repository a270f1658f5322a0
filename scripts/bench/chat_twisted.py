"""Baseline for scripts/bench/chat.py: a Twisted ``LineReceiver`` chat.

``sendLine`` per recipient, the classic Twisted chat. Speaks the subset of
the chat protocol the benchmark uses (WELCOME, /nick, JOIN, MSG, LEAVE).
Twisted is needed only here; bench/chat.py installs it on demand.

Usage: python scripts/bench/chat_twisted.py [--nodelay] PORT
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineReceiver

#: ``--nodelay``: disable Nagle's algorithm as Trio does by default (Twisted does not).
NODELAY = "--nodelay" in sys.argv
WELCOME = "WELCOME trionet chat — send /nick <name> to join".encode()


class Chat(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 4096

    def __init__(self, members: dict[bytes, Chat]) -> None:
        self.members = members
        self.nick: bytes | None = None

    def connectionMade(self) -> None:
        if NODELAY:
            self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]
        self.sendLine(WELCOME)

    def broadcast(self, line: bytes, skip: Chat | None) -> None:
        for member in self.members.values():
            if member is not skip:
                member.sendLine(line)

    def lineReceived(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if line.startswith(b"/nick "):
            self.nick = line[6:].strip()
            self.members[self.nick] = self
            self.sendLine(b"OK nick " + self.nick)
            self.broadcast(b"JOIN " + self.nick, self)
        elif self.nick is not None and line:
            self.broadcast(b"MSG " + self.nick + b" " + line, self)

    def connectionLost(self, reason: Any = None) -> None:
        if self.nick is not None and self.members.get(self.nick) is self:
            del self.members[self.nick]
            self.broadcast(b"LEAVE " + self.nick, None)


class ChatFactory(protocol.Factory):
    def __init__(self) -> None:
        self.members: dict[bytes, Chat] = {}

    def buildProtocol(self, addr: Any) -> Chat:
        return Chat(self.members)


if __name__ == "__main__":
    port = int(next(a for a in sys.argv[1:] if a != "--nodelay"))
    reactor.listenTCP(port, ChatFactory(), interface="127.0.0.1")  # type: ignore[attr-defined]
    print("listening", flush=True)
    reactor.run()  # type: ignore[attr-defined]
