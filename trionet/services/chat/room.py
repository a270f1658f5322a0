"""The chat room: members, nicks, the relay rules, and the log they read from.

The room knows no transport. What the room sends lives in two places:

* **The log**: every line relayed to the room (``JOIN``, ``MSG``, ``ACTION``,
  ``NICK``, ``LEAVE``) is appended once, as encoded bytes, to one buffer
  shared by every member (with where each line ends). A member is a
  **cursor** into it: the log position up to which its writer has sent.
  Bytes relayed to a hundred members are held once, not a hundred times,
  and the log is trimmed from the front to the slowest member's cursor.
  Nobody gets a copy of its own message: each member keeps the positions of
  its own lines still ahead of it, and its writer steps over them, copying
  what is due as one slice of the buffer per run between them, whatever the
  number of lines (a busy room's writer would otherwise touch every line for
  every member: the room's main cost per message).
* **A private queue per member** for what is for it alone (``OK``, ``ERR``,
  ``WHO``, ``PRIV``, ``HELP``, ``HIST``, ``BYE``). Each private item records
  the log position at which it was queued, and the writer interleaves the
  two by that position: a member receives lines in exactly the order the
  room produced them (a newcomer's ``OK nick`` before any traffic, a
  ``PRIV`` after the ``MSG`` its sender said first).

Each member's writer (:meth:`Member.pump`) sleeps on a Trio event until the
room appends to the log or queues something for it, then sends everything
from its cursor to the end in one write, and moves its cursor.

**Slow consumers.** What the server holds for a member is the log past its
cursor plus its private queue (:attr:`Member.pending`); a member more than
its ``sendq`` bytes behind is evicted: closed without ``BYE``, the others
told ``LEAVE <nick> slow-consumer``. The room never waits for a member: a
stalled reader only holds the log back until it is evicted. Checking every
member on every line would cost O(members) per line, so the room checks
them all only once the log has grown by the smallest headroom any member
had at the last check (or by 64 KiB, to trim the log): nobody can have
gone over its bound in between.

**Consistency.** Joins, renames, messages, leaves and evictions are
synchronous: each runs to completion without an ``await``, so no other
operation can interleave with one, and each member reads one ordered
stream. Together that gives the guarantees the protocol needs for free: a
member is added to the room (and the others told ``JOIN``) in the same step,
so nobody ever receives a ``MSG`` from a nick that was neither there when it
joined (what ``/who`` lists) nor announced since by ``JOIN`` or ``NICK``; a
member leaves in one step, with one ``LEAVE``, so every ``JOIN`` is matched
by exactly one ``LEAVE``.

**Other processes** (``--redis``, see :mod:`.bus`). Members served by
other processes are *ghosts* here: a nick and the process it lives on,
nothing to write to. They take part in every synchronous rule (nick
uniqueness, ``/who``, ``/msg``), so the room stays synchronous. What this
process's members do is reported to :attr:`Room.on_event` as a
:class:`RoomEvent` (the bus publishes it); what other processes' members
did comes back through the ``remote_*`` methods, which relay it here like
a local member's line. They check the process each ghost belongs to, and
make the same announcements whatever order the news arrives in (a repeated
``JOIN`` is ignored, a ``LEAVE`` of nobody too), so every ``JOIN`` is still
matched by one ``LEAVE`` and no ``MSG`` comes from a nick nobody announced.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, NamedTuple

import trio

from .text import echoed, nick_key, sanitize, valid_nick

__all__ = [
    "DEFAULT_HISTORY",
    "DEFAULT_HISTORY_REPLY",
    "HELP",
    "MAX_WRITE",
    "ChatError",
    "Ghost",
    "Member",
    "Room",
    "RoomEvent",
]

#: The one-line answer to ``/help``.
HELP: Final = "HELP /nick /me /msg /who /history /help /quit"
#: Public messages the room keeps for ``/history`` unless told otherwise.
DEFAULT_HISTORY: Final = 100
#: Lines ``/history`` answers with when it is given no count.
DEFAULT_HISTORY_REPLY: Final = 20
#: The most a writer sends in one write. Joining a member's share of the log
#: makes a copy of it; bounding the copy keeps a burst from costing members x
#: traffic again while the copies wait on the sockets. Anything a room sends
#: in one scheduling round is normally far less: one write per burst.
MAX_WRITE: Final = 64 * 1024
#: Check every member (evictions) and trim the log at least this often, in bytes.
_SCAN_STEP: Final = 64 * 1024


class RoomEvent(NamedTuple):
    """Something one of this process's members did, for other processes to relay."""

    #: ``JOIN``, ``NICK``, ``MSG``, ``ACTION``, ``PRIV`` or ``LEAVE``.
    kind: str
    #: Who did it (for ``NICK``: the old nick).
    nick: str
    #: ``NICK``: the new nick; ``MSG``/``ACTION``/``PRIV``: the text; ``LEAVE``: the reason.
    arg: str = ""
    #: ``MSG``/``ACTION``: when, in ms since the epoch (for ``HIST``).
    ms: int = 0
    #: ``PRIV``: the ghost it is for, and the process that ghost lives on.
    target: str = ""
    origin: str = ""


class Ghost(NamedTuple):
    """A member of the room served by another process: its nick and that process."""

    nick: str
    origin: str


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


class Member:
    """One client of a :class:`Room`: its nick, its cursor, its private queue.

    Created for every connection, nick or not; it reads the log only while it
    is in the room (from joining to leaving). Its single writer,
    :meth:`pump`, is the only code that takes from it; :meth:`take` does the
    same at once, for tests and for transports that need no writer task.

    Args:
      room: the room it belongs to.
      sendq: bytes the server may hold for it before it is evicted.
      on_evict: called once on eviction (the handler cancels its tasks there).
    """

    __slots__ = (
        "_closed",
        "_in_room",
        "_off",
        "_own",
        "_private",
        "_private_bytes",
        "_seq",
        "_stop_off",
        "_stop_seq",
        "_wake",
        "evicted",
        "nick",
        "on_evict",
        "room",
        "sendq",
    )

    def __init__(self, room: Room, sendq: int, on_evict: Callable[[], None] | None = None) -> None:
        if sendq < 1:
            raise ValueError(f"sendq must be >= 1, got {sendq}")
        self.room = room
        #: The member's nick, ``None`` until it has one (kept after it leaves).
        self.nick: str | None = None
        self.sendq = sendq
        self.on_evict = on_evict
        self.evicted = False
        self._closed = False
        self._in_room = False
        # The cursor: the next log entry to send (a sequence number counted
        # from the room's first entry ever) and the log's byte offset there.
        self._seq = room._end_seq
        self._off = room._end_off
        # Out of the room, where its view of the log ends (for one that left:
        # where it left; for one without a nick: nowhere past its cursor).
        self._stop_seq = self._seq
        self._stop_off = self._off
        # Sequence numbers of its own lines in the log not passed yet (skipped).
        self._own: deque[int] = deque()
        # (log sequence number when queued, data): sent after the log up to there.
        self._private: deque[tuple[int, bytes]] = deque()
        self._private_bytes = 0
        # Set while the writer sleeps; whoever gives it work sets the event.
        self._wake: trio.Event | None = None

    @property
    def pending(self) -> int:
        """Bytes the server holds for this member: log past its cursor + private queue.

        Bytes being written count until the write returns (the cursor moves
        then), so a writer stalled on a full socket still counts them.
        """
        end = self.room._end_off if self._in_room else self._stop_off
        return end - self._off + self._private_bytes

    def close(self) -> None:
        """Accept no more private lines; :meth:`pump` returns once all due is sent."""
        self._closed = True
        self._wakeup()

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- the writer ---------------------------------------------------------------

    def _due(self) -> bool:
        """Is anything due: private lines, or log past the cursor in its view?"""
        if self._private:
            return True
        return self._seq < (self.room._end_seq if self._in_room else self._stop_seq)

    def _gather(self, max_bytes: float) -> tuple[list[bytes], int, int, int, bool]:
        """What is due next, in order, about ``max_bytes`` at most.

        Returns (parts, cursor after them, its offset, private items taken,
        whether more is due). Nothing moves: :meth:`_commit` does that once
        the parts are sent.
        """
        first = self.room._first_seq
        limit = self.room._end_seq if self._in_room else self._stop_seq
        # Trimming never passes a cursor that still has log to read.
        assert self._seq >= first or self._seq >= limit, "cursor behind the log"
        parts: list[bytes] = []
        i, off, size = self._seq - first, self._off, 0
        taken = 0
        for at, data in self._private:
            # The log up to where this private item was queued, then the
            # item. (A reply queued before joining, or after leaving, is
            # clamped into the member's view of the log.)
            i, off, size = self._copy_log(i, min(at, limit) - first, off, parts, size, max_bytes)
            if size >= max_bytes:
                return parts, i + first, off, taken, True
            parts.append(data)
            size += len(data)
            taken += 1
        i, off, size = self._copy_log(i, limit - first, off, parts, size, max_bytes)
        return parts, i + first, off, taken, i + first < limit

    def _copy_log(
        self, i: int, stop: int, off: int, parts: list[bytes], size: int, max_bytes: float
    ) -> tuple[int, int, int]:
        """Append log entries ``i`` to ``stop`` (list indexes) to ``parts``, within the size.

        Lines are added until ``size`` reaches ``max_bytes`` (the last one
        may pass it). Returns the index reached, the log offset there and
        the new size.
        """
        room = self.room
        log, first, own = room._log, room._first_seq, self._own
        k = 0  # the next of its own lines at or after i
        while k < len(own) and own[k] < i + first:
            k += 1
        with memoryview(room._buf) as buf:
            while i < stop and size < max_bytes:
                end = stop
                if k < len(own) and own[k] - first < end:
                    end = own[k] - first
                    if end == i:  # its own line: step over it
                        off = log[i]
                        i += 1
                        k += 1
                        continue
                if log[end - 1] - off > max_bytes - size:
                    # Up to the first line that reaches the bound, included.
                    end = bisect.bisect_left(log, off + max_bytes - size, i, end) + 1
                end_off = log[end - 1]
                base = room._buf_base
                parts.append(bytes(buf[off - base : end_off - base]))
                size += end_off - off
                i, off = end, end_off
        return i, off, size

    def _commit(self, seq: int, off: int, taken: int) -> None:
        if self.evicted:
            return
        # Never backwards: joining may have moved the cursor to the log's end
        # while the writer was sending replies queued before the nick.
        if seq > self._seq:
            self._seq, self._off = seq, off
        own = self._own
        while own and own[0] < self._seq:
            own.popleft()
        for _ in range(taken):
            self._private_bytes -= len(self._private.popleft()[1])

    def take(self) -> bytes:
        """Everything due now, as one chunk, and move past it (no waiting)."""
        parts, seq, off, taken, _ = self._gather(float("inf"))
        self._commit(seq, off, taken)
        return b"".join(parts)

    async def pump(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """The writer: send what is due, coalesced, until :meth:`close`.

        Each wake-up sends everything from the cursor to the end of the log
        (with the private items interleaved) in one call of ``send``, up to
        :data:`MAX_WRITE` bytes a call.
        """
        while True:
            if not self._due():
                if self._closed or self.evicted:
                    return
                await self._sleep()
                continue
            parts, seq, off, taken, more = self._gather(MAX_WRITE)
            if parts:
                await send(parts[0] if len(parts) == 1 else b"".join(parts))
            self._commit(seq, off, taken)
            if more:
                # A backlog larger than one write: let others run between
                # writes (a send the kernel takes whole does not yield).
                await trio.lowlevel.checkpoint()

    async def _sleep(self) -> None:
        self._wake = wake = trio.Event()
        room = self.room
        if self._in_room:
            room._waiting.add(self)
        try:
            await wake.wait()
        finally:
            self._wake = None
            room._waiting.discard(self)


class Room:
    """One chat room: nick → member, the log, and the relay rules of PROTOCOL.md.

    Args:
      history: public messages kept for ``/history`` (0 keeps none).
      clock: the wall clock for ``HIST`` time stamps, in seconds since the
        epoch (tests pass their own).
    """

    def __init__(
        self, *, history: int = DEFAULT_HISTORY, clock: Callable[[], float] = time.time
    ) -> None:
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history}")
        # nick_key(nick) → member; only members with a nick are in the room.
        self._members: dict[str, Member] = {}
        # Members that left but whose writers still send what was due (their
        # cursors hold the log back until the handler forgets them).
        self._draining: set[Member] = set()
        # Members in the room whose writers sleep with nothing to send.
        self._waiting: set[Member] = set()
        self._log: list[int] = []  # where each line ends (a log offset), from _first_seq
        # The log's bytes from the start of _log[0]; at log offset _buf_base.
        self._buf = bytearray()
        self._buf_base = 0
        self._first_seq = 0  # sequence number of _log[0]
        self._end_seq = 0  # sequence number of the next entry
        self._end_off = 0  # bytes ever appended
        # Check every member once the log grows past this offset.
        self._scan_after = _SCAN_STEP
        self._scanning = False
        self._history: deque[tuple[int, str, str, str]] = deque(maxlen=history)
        self._clock = clock
        # nick_key(nick) → the members other processes serve (``--redis``).
        self._ghosts: dict[str, Ghost] = {}
        #: Told of every change this process's members make (the bus publishes it).
        self.on_event: Callable[[RoomEvent], None] | None = None
        #: Messages this process's members sent (MSG, ACTION, PRIV), for metrics.
        self.messages = 0
        #: Members evicted as slow consumers, for metrics.
        self.evictions = 0

    def __len__(self) -> int:
        """Members this process serves (ghosts not counted)."""
        return len(self._members)

    def __contains__(self, member: object) -> bool:
        return isinstance(member, Member) and member._in_room

    def nicks(self) -> list[str]:
        """The nicks in the room, ghosts included, sorted ignoring case (as ``WHO`` lists them)."""
        names = [m.nick for m in self._members.values() if m.nick]
        names += [g.nick for g in self._ghosts.values()]
        return sorted(names, key=str.lower)

    @property
    def ghosts(self) -> dict[str, Ghost]:
        """A copy of nick key → :class:`Ghost`: the members other processes serve."""
        return dict(self._ghosts)

    def local_nicks(self) -> dict[str, str]:
        """Nick key → nick of every member this process serves."""
        return {key: m.nick for key, m in self._members.items() if m.nick}

    def member(self, nick: str) -> Member | None:
        """The member of this process called ``nick`` (any case), if any."""
        return self._members.get(nick_key(nick))

    def _emit(self, event: RoomEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    @property
    def log_bytes(self) -> int:
        """Bytes the log holds (what the slowest cursor has not passed, roughly)."""
        return len(self._buf)

    # -- the log ------------------------------------------------------------------

    def _append(self, data: bytes, sender: Member | None) -> None:
        """Relay ``data`` to every member in the room but ``sender``."""
        members = self._members
        if len(members) <= (sender is not None and sender._in_room):
            return  # nobody to tell
        self._end_seq += 1
        self._end_off += len(data)
        self._log.append(self._end_off)
        self._buf += data
        skipped = False
        if sender is not None:
            if sender._seq == self._end_seq - 1 and not sender._private:
                # The sender had read everything: its cursor moves past its own
                # line at once, and its writer need not wake up for nothing.
                sender._seq, sender._off = self._end_seq, self._end_off
                skipped = True
            else:
                sender._own.append(self._end_seq - 1)
        waiting = self._waiting
        if waiting:
            for m in waiting:
                if not (skipped and m is sender):
                    m._wake.set()  # type: ignore[union-attr]  # set while waiting
            waiting.clear()
            if skipped and sender is not None and sender._wake is not None:
                waiting.add(sender)
        if self._end_off > self._scan_after and not self._scanning:
            self._scan()

    def _scan(self) -> None:
        """Evict members over their bound, trim the log, plan the next scan."""
        self._scanning = True
        try:
            while True:
                end = self._end_off
                over = [
                    m for m in self._members.values() if end - m._off + m._private_bytes > m.sendq
                ]
                if not over:
                    break
                # Each eviction appends a LEAVE, which may push others over:
                # check again until nobody is.
                for m in over:
                    self._evict(m)
            low = self._end_seq
            headroom = _SCAN_STEP
            for m in self._members.values():
                low = min(low, m._seq)
                headroom = min(headroom, m.sendq - (end - m._off + m._private_bytes))
            for m in self._draining:
                low = min(low, m._seq)
            if low > self._first_seq:
                cut = self._log[low - self._first_seq - 1]
                del self._log[: low - self._first_seq]
                del self._buf[: cut - self._buf_base]
                self._buf_base = cut
                self._first_seq = low
            self._scan_after = end + headroom
        finally:
            self._scanning = False

    def _queue(self, member: Member, data: bytes) -> None:
        """Queue ``data`` for ``member`` alone, after what the room sent so far."""
        if member._closed or member.evicted:
            return  # going away: dropped
        member._private.append((self._end_seq, data))
        member._private_bytes += len(data)
        headroom = member.sendq - member.pending
        if headroom < 0:
            self._evict(member)
            return
        if member._in_room:
            self._scan_after = min(self._scan_after, self._end_off + headroom)
        member._wakeup()

    def _evict(self, member: Member) -> None:
        if member.evicted:
            return
        member.evicted = True
        member._closed = True
        self.evictions += 1
        was_in = member._in_room
        if was_in:
            assert member.nick is not None
            del self._members[nick_key(member.nick)]
            member._in_room = False
        self._draining.discard(member)
        self._waiting.discard(member)
        member._stop_seq, member._stop_off = member._seq, member._off
        member._private.clear()
        member._private_bytes = 0
        member._wakeup()
        if member.on_evict is not None:
            member.on_evict()
        if was_in:
            assert member.nick is not None
            self._emit(RoomEvent("LEAVE", member.nick, "slow-consumer"))
            self._append(_line(f"LEAVE {member.nick} slow-consumer"), None)
        self._clear_if_empty()

    def _clear_if_empty(self) -> None:
        if not self._members and not self._draining:
            self._log.clear()
            self._buf.clear()
            self._buf_base = self._end_off
            self._first_seq = self._end_seq

    def forget(self, member: Member) -> None:
        """The member's connection is over: leave silently if still in, free its cursor."""
        self.leave(member)
        member.close()
        # Nothing more is due to it: its cursor no longer holds the log back.
        member._stop_seq, member._stop_off = member._seq, member._off
        self._draining.discard(member)
        self._waiting.discard(member)
        self._clear_if_empty()

    # -- operations ---------------------------------------------------------------

    def reply(self, member: Member, line: str) -> None:
        """Send ``line`` to ``member`` alone; evict it if that puts it over its bound."""
        self._queue(member, _line(line))

    def check_nick(self, member: Member, name: str) -> bool:
        """Could ``member`` take ``name`` now? ``ChatError`` if not.

        Returns whether ``name`` is new to the member ignoring case (a
        rename that only changes case needs no claim across processes).
        """
        if not valid_nick(name):
            raise ChatError("bad-nick")
        key = nick_key(name)
        holder = self._members.get(key)
        if (holder is not None and holder is not member) or key in self._ghosts:
            raise ChatError("nick-taken", name)
        return holder is None

    def set_nick(self, member: Member, name: str) -> None:
        """Join the room as ``name``, or rename; ``ChatError`` if refused."""
        if member.evicted:
            # Its handler is being cancelled but may still be working through
            # lines it had already read: an evicted member never joins.
            return
        self.check_nick(member, name)
        key = nick_key(name)
        old = member.nick if member._in_room else None
        if old is not None:
            del self._members[nick_key(old)]
        member.nick = name
        self._members[key] = member
        if old is None:
            # Joining: the member's view of the log starts here.
            member._in_room = True
            member._seq, member._off = self._end_seq, self._end_off
            self._draining.discard(member)
            if member._wake is not None:
                self._waiting.add(member)
            self._scan_after = min(self._scan_after, self._end_off + member.sendq - member.pending)
        # The others are told first: if the reply then overflows the member's
        # own queue, its eviction is announced under the nick they now know.
        if old is None:
            # Reported before it is relayed: relaying may evict a slow member,
            # and other processes must hear of the join before any leave.
            self._emit(RoomEvent("JOIN", name))
            self._append(_line(f"JOIN {name}"), member)
        elif old != name:
            self._emit(RoomEvent("NICK", old, name))
            self._append(_line(f"NICK {old} {name}"), member)
        if member._in_room:  # (announcing it may have evicted the member itself)
            self.reply(member, f"OK nick {name}")

    def force_rename(self, member: Member, name: str) -> None:
        """Rename ``member`` without asking it (a nick clash between processes).

        Everyone, the member included, is told ``NICK old new``: that line
        is how the member learns its new nick. The caller has checked that
        ``name`` is valid and free.
        """
        if not member._in_room or member.nick is None:
            return
        old = member.nick
        del self._members[nick_key(old)]
        member.nick = name
        self._members[nick_key(name)] = member
        self._emit(RoomEvent("NICK", old, name))
        self._append(_line(f"NICK {old} {name}"), None)

    def _require(self, member: Member) -> str:
        if not member._in_room:
            raise ChatError("no-nick")
        assert member.nick is not None
        return member.nick

    def _relay(self, member: Member, kind: str, text: str) -> None:
        nick = self._require(member)
        if text := sanitize(text):
            self.messages += 1
            if self._history.maxlen or self.on_event is not None:
                ms = int(self._clock() * 1000)
                if self._history.maxlen:
                    self._history.append((ms, kind, nick, text))
                if self.on_event is not None:  # (no event built per message without it)
                    self.on_event(RoomEvent(kind, nick, text, ms))
            self._append(_line(f"{kind} {nick} {text}"), member)

    def say(self, member: Member, text: str) -> None:
        """Relay ``text`` as ``MSG`` to everyone else (nothing if empty once sanitized)."""
        self._relay(member, "MSG", text)

    def act(self, member: Member, text: str) -> None:
        """Relay ``/me text`` as ``ACTION`` to everyone else."""
        self._relay(member, "ACTION", text)

    def whisper(self, member: Member, target: str, text: str) -> None:
        """Send ``PRIV`` to the member called ``target`` only."""
        nick = self._require(member)
        key = nick_key(target)
        other = self._members.get(key)
        if other is None:
            ghost = self._ghosts.get(key)
            if ghost is None:
                raise ChatError("no-such-nick", echoed(target))
            if text := sanitize(text):
                self.messages += 1
                # Delivered by the process the ghost lives on.
                self._emit(RoomEvent("PRIV", nick, text, target=ghost.nick, origin=ghost.origin))
            return
        if text := sanitize(text):
            self.messages += 1
            self.reply(other, f"PRIV {nick} {text}")

    def who(self, member: Member) -> None:
        """Reply with ``WHO`` and the sorted nicks, the asker included."""
        self._require(member)
        self.reply(member, " ".join(["WHO", *self.nicks()]))

    def history(self, member: Member, count: int | None = None) -> None:
        """Reply with the last ``count`` public messages as ``HIST`` lines, then ``OK``.

        ``count`` defaults to :data:`DEFAULT_HISTORY_REPLY`; it is capped by
        what the room keeps. Oldest first; one private item, so nothing the
        room says in between can split it.
        """
        self._require(member)
        kept = len(self._history)
        n = min(DEFAULT_HISTORY_REPLY if count is None else count, kept)
        lines = [
            f"HIST {ms} {kind} {nick} {text}\n"
            for ms, kind, nick, text in itertools.islice(self._history, kept - n, None)
        ]
        lines.append(f"OK history {n}\n")
        self._queue(member, "".join(lines).encode())

    def leave(self, member: Member, reason: str = "") -> None:
        """Remove ``member`` and tell the others; a no-op if it is not in the room.

        What was due to the member up to here is still sent (its writer
        drains it); nothing after. Synchronous on purpose: a handler calls
        it in a ``finally`` while it is being cancelled (idle timeout,
        dropped connection).
        """
        if not member._in_room:
            return
        assert member.nick is not None
        del self._members[nick_key(member.nick)]
        member._in_room = False
        member._stop_seq, member._stop_off = self._end_seq, self._end_off
        self._waiting.discard(member)
        self._draining.add(member)
        reason = sanitize(reason)
        line = f"LEAVE {member.nick} {reason}" if reason else f"LEAVE {member.nick}"
        self._emit(RoomEvent("LEAVE", member.nick, reason))
        self._append(_line(line), None)

    # -- other processes' members (--redis) ---------------------------------------

    def _free(self, key: str) -> bool:
        return key not in self._members and key not in self._ghosts

    def remote_join(self, origin: str, nick: str) -> None:
        """``nick`` of process ``origin`` joined: a ghost, announced as ``JOIN``.

        Ignored if that ghost is here already (news may come twice), or if
        the nick is someone else's here: a clash between processes, which
        the process that fails to claim the nick resolves by renaming.
        """
        if not valid_nick(nick):
            return
        key = nick_key(nick)
        ghost = self._ghosts.get(key)
        if ghost is not None:
            if ghost.origin == origin and ghost.nick != nick:
                self._ghosts[key] = Ghost(nick, origin)
                self._append(_line(f"NICK {ghost.nick} {nick}"), None)
            return
        if key in self._members:
            return
        self._ghosts[key] = Ghost(nick, origin)
        self._append(_line(f"JOIN {nick}"), None)

    def remote_nick(self, origin: str, old: str, new: str) -> None:
        """A ghost of ``origin`` renamed itself ``old`` → ``new``."""
        okey = nick_key(old)
        ghost = self._ghosts.get(okey)
        if ghost is None or ghost.origin != origin:
            # Its JOIN never reached us (or its old nick is someone else's
            # here): the new nick is news.
            self.remote_join(origin, new)
            return
        nkey = nick_key(new)
        if not valid_nick(new) or (nkey != okey and not self._free(nkey)):
            del self._ghosts[okey]
            self._append(_line(f"LEAVE {ghost.nick}"), None)
            return
        del self._ghosts[okey]
        self._ghosts[nkey] = Ghost(new, origin)
        if ghost.nick != new:
            self._append(_line(f"NICK {ghost.nick} {new}"), None)

    def remote_relay(self, origin: str, kind: str, nick: str, text: str, ms: int) -> None:
        """A ghost of ``origin`` said something (``kind`` is ``MSG`` or ``ACTION``).

        A speaker the room has not heard of is announced first (``JOIN``):
        nobody here ever receives a ``MSG`` from a nick never announced.
        """
        key = nick_key(nick)
        ghost = self._ghosts.get(key)
        if ghost is None:
            self.remote_join(origin, nick)
            ghost = self._ghosts.get(key)
        if ghost is None or ghost.origin != origin or not (text := sanitize(text)):
            return
        if self._history.maxlen:
            self._history.append((ms, kind, ghost.nick, text))
        self._append(_line(f"{kind} {ghost.nick} {text}"), None)

    def remote_whisper(self, sender: str, target: str, text: str) -> None:
        """``/msg`` from another process's member to ``target``, if it is one of ours."""
        member = self._members.get(nick_key(target))
        if member is not None and valid_nick(sender) and (text := sanitize(text)):
            self.reply(member, f"PRIV {sender} {text}")

    def remote_leave(self, origin: str, nick: str, reason: str = "") -> None:
        """A ghost of ``origin`` left (or its process died); a no-op for an unknown one."""
        key = nick_key(nick)
        ghost = self._ghosts.get(key)
        if ghost is None or ghost.origin != origin:
            return
        del self._ghosts[key]
        reason = sanitize(reason)
        line = f"LEAVE {ghost.nick} {reason}" if reason else f"LEAVE {ghost.nick}"
        self._append(_line(line), None)

    def set_ghosts(self, ghosts: dict[str, Ghost]) -> None:
        """Make the ghosts exactly ``ghosts`` (key → ghost), announcing each difference.

        For a fresh picture of the other processes (a snapshot from Redis
        after an outage): who is gone gets ``LEAVE``, who is new ``JOIN``.
        A nick one of this process's members holds is left out (a clash the
        claims resolve).
        """
        for key, ghost in list(self._ghosts.items()):
            now = ghosts.get(key)
            if now is None or now.origin != ghost.origin:
                del self._ghosts[key]
                self._append(_line(f"LEAVE {ghost.nick}"), None)
        for ghost in ghosts.values():
            self.remote_join(ghost.origin, ghost.nick)

    def load_history(self, entries: list[tuple[int, str, str, str]]) -> None:
        """Merge ``entries`` (ms, kind, nick, text) into the history, by time."""
        if not self._history.maxlen:
            return
        merged = sorted([*entries, *self._history], key=lambda e: e[0])
        self._history.clear()
        self._history.extend(merged)
