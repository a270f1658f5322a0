"""Baseline for scripts/bench/chat.py: the chat server before the room became a log.

A copy of trionet's chat as it was before issue 12 (the room, ``ChannelMember``
and the handler), kept here so that the benchmark can run the old design
beside the new one in the same run. Each member has its own queue (a Trio
memory channel) holding its own copy of every relayed line, and a writer
task that sends everything queued in one write. Its memory grows with
members x traffic, which is what the log replaced.

Usage: python scripts/bench/chat_fanout.py [--sendq BYTES] PORT  (0: any free port)
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import ClassVar, Final, Protocol

import attrs
import trio

import trionet
from trionet._connection import Connection
from trionet._framing import BadEncoding, LineTooLong
from trionet._service import Service
from trionet.services.chat.flood import TokenBucket
from trionet.services.chat.text import (
    Me,
    Message,
    Nick,
    Private,
    Quit,
    Unknown,
    Who,
    nick_key,
    parse_line,
    sanitize,
    valid_nick,
)

WELCOME: Final = "WELCOME trionet chat — send /nick <name> to join"
DEFAULT_SENDQ: Final = 1 << 20
DRAIN_TIMEOUT: Final = 5.0
_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


class Member(Protocol):
    """What the room needs of a member."""

    #: The member's nick, ``None`` until it has one (kept after it leaves).
    nick: str | None

    def deliver(self, data: bytes) -> bool:
        """Queue encoded lines without waiting; ``False`` if over the bound."""
        ...

    def evict(self) -> None:
        """Disconnect the member (it is over its bound); must not block or raise."""
        ...


class ChatError(Exception):
    """A request the room refuses: becomes ``ERR <code> [arg]``."""

    def __init__(self, code: str, arg: str = "") -> None:
        super().__init__(code, arg)
        self.code = code
        self.arg = arg

    @property
    def line(self) -> str:
        """The ``ERR`` line for the client."""
        return f"ERR {self.code} {self.arg}" if self.arg else f"ERR {self.code}"


def _line(text: str) -> bytes:
    return (text + "\n").encode()


class Room:
    """One chat room: nick → member, and the relay rules of PROTOCOL.md."""

    def __init__(self) -> None:
        # nick_key(nick) → member; only members with a nick are in the room.
        self._members: dict[str, Member] = {}

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member: object) -> bool:
        nick = getattr(member, "nick", None)
        return nick is not None and self._members.get(nick_key(nick)) is member

    def nicks(self) -> list[str]:
        """The nicks in the room, sorted ignoring case (as ``WHO`` lists them)."""
        return sorted((m.nick for m in self._members.values() if m.nick), key=str.lower)

    # -- sending ------------------------------------------------------------------

    def reply(self, member: Member, line: str) -> None:
        """Send ``line`` to ``member`` alone (a reply); evict it if over its bound."""
        if not member.deliver(_line(line)):
            self._evict([member])

    def _broadcast(self, data: bytes, skip: Member | None) -> None:
        over: list[Member] = []
        for m in self._members.values():
            if m is not skip and not m.deliver(data):
                over.append(m)
        if over:
            self._evict(over)

    def _evict(self, members: Iterable[Member]) -> None:
        # A worklist, not recursion: announcing one eviction may push another
        # member over its bound, and so on; each is handled once, in order.
        todo = list(members)
        done: set[int] = set()
        while todo:
            m = todo.pop(0)
            if id(m) in done:
                continue
            done.add(id(m))
            was_in = m in self
            if was_in:
                assert m.nick is not None
                del self._members[nick_key(m.nick)]
            m.evict()
            if was_in:
                data = _line(f"LEAVE {m.nick} slow-consumer")
                todo.extend(o for o in self._members.values() if not o.deliver(data))

    # -- operations ---------------------------------------------------------------

    def set_nick(self, member: Member, name: str) -> None:
        """Join the room as ``name``, or rename; ``ChatError`` if refused."""
        if not valid_nick(name):
            raise ChatError("bad-nick")
        key = nick_key(name)
        holder = self._members.get(key)
        if holder is not None and holder is not member:
            raise ChatError("nick-taken", name)
        old = member.nick if member in self else None
        if old is not None:
            del self._members[nick_key(old)]
        member.nick = name
        self._members[key] = member
        # The others are told first: if the reply then overflows the member's
        # own queue, its eviction is announced under the nick they now know.
        if old is None:
            self._broadcast(_line(f"JOIN {name}"), member)
        elif old != name:
            self._broadcast(_line(f"NICK {old} {name}"), member)
        if member in self:  # (announcing it may have evicted the member itself)
            self.reply(member, f"OK nick {name}")

    def _require(self, member: Member) -> str:
        if member not in self:
            raise ChatError("no-nick")
        assert member.nick is not None
        return member.nick

    def say(self, member: Member, text: str) -> None:
        """Relay ``text`` as ``MSG`` to everyone else (nothing if empty once sanitized)."""
        nick = self._require(member)
        if text := sanitize(text):
            self._broadcast(_line(f"MSG {nick} {text}"), member)

    def act(self, member: Member, text: str) -> None:
        """Relay ``/me text`` as ``ACTION`` to everyone else."""
        nick = self._require(member)
        if text := sanitize(text):
            self._broadcast(_line(f"ACTION {nick} {text}"), member)

    def whisper(self, member: Member, target: str, text: str) -> None:
        """Send ``PRIV`` to the member called ``target`` only."""
        nick = self._require(member)
        other = self._members.get(nick_key(target))
        if other is None:
            raise ChatError("no-such-nick", sanitize(target))
        if text := sanitize(text):
            self.reply(other, f"PRIV {nick} {text}")

    def who(self, member: Member) -> None:
        """Reply with ``WHO`` and the sorted nicks, the asker included."""
        self._require(member)
        self.reply(member, " ".join(["WHO", *self.nicks()]))

    def leave(self, member: Member, reason: str = "") -> None:
        """Remove ``member`` and tell the others; a no-op if it is not in the room.

        Synchronous on purpose: a handler calls it in a ``finally`` while it
        is being cancelled (idle timeout, dropped connection).
        """
        if member not in self:
            return
        assert member.nick is not None
        del self._members[nick_key(member.nick)]
        reason = sanitize(reason)
        line = f"LEAVE {member.nick} {reason}" if reason else f"LEAVE {member.nick}"
        self._broadcast(_line(line), None)


class ChannelMember:
    """A member whose queue is a Trio memory channel bounded in bytes.

    :meth:`deliver` puts data in the channel with ``send_nowait`` and counts
    the bytes pending; :meth:`pump` (the member's single writer task) takes
    everything queued at once and hands it to ``send`` in one call, so a
    burst of lines costs one system call, not one per line. Bytes count as
    pending until ``send`` returns: they are held by the server until then.
    """

    def __init__(self, sendq: int, on_evict: Callable[[], None] | None = None) -> None:
        if sendq < 1:
            raise ValueError(f"sendq must be >= 1, got {sendq}")
        self.nick: str | None = None
        self.sendq = sendq
        #: Bytes queued or being sent.
        self.pending = 0
        self.evicted = False
        #: Called once on eviction (the handler cancels its tasks there).
        self.on_evict = on_evict
        self._closed = False
        self._send, self._receive = trio.open_memory_channel[bytes](math.inf)

    def deliver(self, data: bytes) -> bool:
        """Queue ``data``; ``False`` if that would put it over ``sendq`` bytes."""
        if self._closed:
            return True  # going away: drop silently
        pending = self.pending + len(data)
        if pending > self.sendq:
            return False
        self.pending = pending
        self._send.send_nowait(data)
        return True

    def close(self) -> None:
        """Accept nothing more; :meth:`pump` ends once the queue is sent."""
        if not self._closed:
            self._closed = True
            self._send.close()

    def evict(self) -> None:
        """Close and call ``on_evict`` (once)."""
        if not self.evicted:
            self.evicted = True
            self.close()
            if self.on_evict is not None:
                self.on_evict()

    async def pump(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """The writer: send queued data, coalesced, until :meth:`close`."""
        receive = self._receive
        while True:
            try:
                first = await receive.receive()
            except trio.EndOfChannel:
                return
            parts = [first]
            try:
                while True:
                    parts.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                pass
            data = first if len(parts) == 1 else b"".join(parts)
            await send(data)
            self.pending -= len(data)


@attrs.define(kw_only=True, eq=False)
class FanoutChatService(Service):
    """One chat room with flood control and slow-consumer eviction."""

    name: ClassVar[str] = "chat"
    default_port: ClassVar[int] = 7003
    line_based: ClassVar[bool] = True
    default_idle_timeout: ClassVar[float] = 3600.0
    summary: ClassVar[str] = "a chat room: /nick, messages, /me, /msg, /who, /quit"

    #: Lines per second refilled into each client's bucket (0: no limit).
    rate: float = 1e6
    #: Lines a client may send at once.
    burst: float = 1e6
    #: Bytes of pending output per client before it is evicted.
    sendq: int = attrs.field(default=DEFAULT_SENDQ, validator=attrs.validators.ge(1))
    room: Room = attrs.field(factory=Room)
    _members: dict[Connection, ChannelMember] = attrs.field(factory=dict, init=False)

    async def handle(self, conn: Connection) -> None:
        """Serve one client: a reader (this task) and a writer, under one nursery."""
        member = ChannelMember(self.sendq)
        self._members[conn] = member
        try:
            async with trio.open_nursery() as nursery:
                member.on_evict = nursery.cancel_scope.cancel
                nursery.start_soon(self._write, conn, member, nursery.cancel_scope)
                self.room.reply(member, WELCOME)
                try:
                    await self._read(conn, member)
                except _GONE:
                    # A reset is a drop like EOF. Caught here, in the task
                    # where it happens, so it cannot reach the runner mixed
                    # with a Cancelled in one exception group; the writer has
                    # nobody left to write to.
                    conn.end_reason = "reset"
                    nursery.cancel_scope.cancel()
                    return
                # /quit or EOF: leave now, then let the writer send what is
                # queued (BYE, last replies), within a bound.
                self.room.leave(member, "")
                member.close()
                nursery.cancel_scope.deadline = trio.current_time() + DRAIN_TIMEOUT
        finally:
            # Runs under cancellation too (idle timeout, shutdown, reset):
            # leave() is synchronous, so the others always get the LEAVE.
            self.room.leave(member, "")
            member.close()
            del self._members[conn]
            if member.evicted:
                conn.end_reason = "slow-consumer"
                conn.log.info("evicted: over %d bytes of pending output", self.sendq)

    @staticmethod
    async def _write(conn: Connection, member: ChannelMember, scope: trio.CancelScope) -> None:
        """The writer task; a broken connection ends the whole session quietly."""
        try:
            # The writer yields each time it takes from its channel, so its
            # sends skip Trio's extra yield after a send the kernel took at
            # once: one scheduler round trip per burst instead of two.
            await member.pump(functools.partial(conn.send_all, checkpoint=False))
        except _GONE:
            conn.end_reason = "reset"
            scope.cancel()

    async def _read(self, conn: Connection, member: ChannelMember) -> None:
        """Map each line to a room operation until ``/quit`` or end of input."""
        room = self.room
        bucket = TokenBucket(self.rate, self.burst, trio.current_time())
        while (line := await conn.receive_line()) is not None:
            cmd = parse_line(line)
            if cmd is None:
                continue
            if isinstance(cmd, Quit):
                # /quit is never rate-limited: leaving must always work.
                room.leave(member, cmd.reason)
                room.reply(member, "BYE")
                conn.end_reason = "quit"
                return
            if not bucket.take(trio.current_time()):
                room.reply(member, "ERR rate-limited")
                continue
            joined = member in room
            try:
                match cmd:
                    case Message(text):
                        room.say(member, text)
                    case Me(text):
                        room.act(member, text)
                    case Private(target, text):
                        room.whisper(member, target, text)
                    case Nick(name):
                        room.set_nick(member, name)
                        if not joined:
                            # A fresh bucket on joining: lines spent getting a
                            # nick do not eat into the burst for the room.
                            bucket = TokenBucket(self.rate, self.burst, trio.current_time())
                    case Who():
                        room.who(member)
                    case Unknown(word):
                        word = sanitize(word)
                        raise ChatError("unknown-command", word)
            except ChatError as err:
                room.reply(member, err.line)

    async def on_line_error(self, conn: Connection, event: LineTooLong | BadEncoding) -> None:
        """Queue the ``ERR`` line for the writer instead of sending it here."""
        member = self._members.get(conn)
        if member is not None:
            self.room.reply(member, event.reply)
        await trio.lowlevel.checkpoint()


async def main(port: int, sendq: int) -> None:
    # Flood control raised, as bench/chat.py does for trionet.
    service = FanoutChatService(port=port, rate=1e6, burst=1e6, sendq=sendq)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.Server([service], host="127.0.0.1").run)
        host, bound = addresses["chat"][0]
        print(f"chat listening on {host}:{bound}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sendq", type=int, default=DEFAULT_SENDQ)
    p.add_argument("port", type=int)
    a = p.parse_args()
    trio.run(main, a.port, a.sendq)
