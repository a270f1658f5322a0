"""The chat room: members, nicks, the who-list and the relay rules.

The room knows no transport. A member is anything with a ``nick`` that
accepts encoded lines into its own bounded queue without waiting
(:class:`Member`): :meth:`Member.deliver` returns ``False`` when the
member's queue is over its bound, and the room then evicts it. A TCP
connection (see :class:`ChannelMember` and the handler in
:mod:`trionet.services.chat.server`), a WebSocket or a bus to another process can
all be members of the same room.

Why every room operation is synchronous: joins, renames, messages, leaves
and evictions each run to completion without an ``await``, so no other
operation can interleave with one. Every member's queue is FIFO. Together
that gives the consistency the protocol needs for free: a member is added
to the room (and the others told ``JOIN``) in the same step, so nobody
ever receives a ``MSG`` from a nick that was neither there when it joined
(what ``/who`` lists) nor announced since by ``JOIN`` or ``NICK``; a member
leaves in one step, with one ``LEAVE``, so every ``JOIN`` is matched by
exactly one ``LEAVE``. And because broadcasting never awaits a member's socket,
one stalled reader cannot delay anybody else: it only grows its own queue
until it is evicted.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import trio

from .text import nick_key, sanitize, valid_nick

__all__ = ["ChannelMember", "ChatError", "Member", "Room"]


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
