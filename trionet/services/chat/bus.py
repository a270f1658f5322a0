"""One chat room across processes: the room's events through a Redis Stream.

With ``--redis URL`` every process keeps its own :class:`~.room.Room` for
the members it serves and mirrors the others' members as *ghosts* (see the
room's docstring). This module moves what happens between the processes;
the room stays synchronous, so every rule of the protocol is still decided
in one step, locally.

**The stream** (``trionet:chat:stream``). Every event of this process's
members (``JOIN``, ``NICK``, ``MSG``, ``ACTION``, ``PRIV``, ``LEAVE``) is
applied to the local room at once and queued; a flusher appends everything
queued in one call (one Lua script: the nick bookkeeping of those events and
the events themselves, a line each, in stream entries of up to 16 KB,
``XADD ... MAXLEN ~``, atomically), without waiting for the previous call's
reply: up to ``IN_FLIGHT`` calls at once, in order on the connection that
carries all of this process's writes (claims and syncs too), so Redis runs
them in the order they were made. Events leave the queue when their call is
answered; each call carries this process's next flush number, and the script
skips a number it has run, so a call sent again after its reply was lost
(the last flush at shutdown does that) never repeats its lines. Each process reads the stream with
``XREAD BLOCK`` from the last id it has seen and applies the other
processes' events to its room (its own are skipped: they were applied
already). One stream, one writer per process writing in order, one reader
per process reading in order: each sender's order is kept everywhere, and a
member's ``JOIN`` is always before its ``MSG``. Why a stream and not
pub/sub: a reader that reconnects continues from its last id and loses
nothing, and the stream is the history too; why many events per entry:
coredis's cost is per argument and per entry, not per byte
(docs/protocol/chat.md and docs/benchmarks.md have the measurements).

**Nicks** (the hash ``trionet:chat:nicks``: nick key → ``"<token> <nick>"``,
the token being ``<process>/<n>``). ``/nick`` first *claims* the nick in
Redis (set if free, atomically; :meth:`RoomBus.claim`), and only then joins
the local room; a leave or rename releases the claim in the flush that
publishes it, and only if the token still matches, so a quick re-claim of
the same nick is never undone.

**Liveness** (:class:`Liveness`: one period ``L``, 6 s). Every ``L/3`` each
process runs the *sync* script, which in one atomic step: stamps the process
in the sorted set ``trionet:chat:alive`` with Redis's clock; makes sure each
of its members' claims is there (re-claiming after an outage, announcing
``JOIN`` for any the others could not know); drops its own claims no member
holds any more (announcing ``LEAVE``); and reaps the processes found dead,
announcing each of their members' ``LEAVE`` once (the script is atomic, so
exactly one process does it). Dead means: stamp older than ``L`` *and* no
connection in Redis's ``CLIENT LIST`` for ``2L/3`` (seen by the caller, who
names the suspects to reap), or stamp older than ``10L``. If nobody synced
for ``L`` (Redis was paused, restarted or cut off from everyone) every
process gets a fresh stamp instead: nobody is judged on a clock that stood
still. A process killed with ``kill -9`` has its members announced within
about ``2L``; one cut off from Redis, or stopped, keeps its connections
open in Redis and so its members.

**Outages**. While Redis is unreachable each process serves its own members
(the local room works: nicks are checked locally only), and the link logs
the outage once and its end once (:class:`~trionet._redis.RedisLink`; the
end's line says how many messages were not relayed). What its members say
meanwhile is not published; what others said is received afterwards if the
stream survived. When Redis is back the sync re-claims this process's
nicks; a nick another process took meanwhile is a clash: the member of the
process that finds it taken is renamed ``nick-2`` (``NICK old new`` to
everyone, that member included). If the stream still holds the last event
this process read, reading continues from there; if not (Redis restarted
empty, or this process fell further behind than the stream keeps), a fresh
snapshot of the nicks is taken: newcomers are announced at once, but a
ghost missing from it is kept until its process has synced again (its
claims are then whole: a ghost still missing has left) or for ``L`` at most,
so that nobody is announced leaving just because Redis forgot them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from ..._redis import RedisLink, redis_errors
from .room import ChatError, Ghost, Room, RoomEvent
from .text import MAX_NICK, nick_key, valid_nick

if TYPE_CHECKING:
    import coredis

__all__ = ["STREAM_MAXLEN", "RoomBus", "rename_candidate"]

log = logging.getLogger("trionet.chat")

#: Entries the stream keeps (``MAXLEN ~``: Redis trims whole blocks, so a bit
#: more). An entry is a batch of one process's events: one event when the room
#: is quiet, up to ENTRY_BYTES of them when it is busy; so the stream holds at
#: least this many events and at most about 16 MB.
STREAM_MAXLEN: Final = 1_000
#: Entries one ``XREAD`` returns at most; below the cap, so a full read is
#: the only sign that the reader may have fallen behind what the stream keeps.
READ_COUNT: Final = 500
#: Events one flush appends at most (one script call).
FLUSH_BATCH: Final = 500
#: Flushes (script calls) in flight at once, their replies not in yet.
IN_FLIGHT: Final = 4
#: Bytes of event lines in one stream entry at most (one line more may pass it):
#: a flush appends as many entries as it needs.
ENTRY_BYTES: Final = 16 << 10
#: Bytes of unpublished events held while Redis is slow; over it, messages are
#: dropped (nick changes never: the sync repairs them anyway).
MAX_QUEUED: Final = 8 << 20
#: How long an ``XREAD`` blocks, in ms; also how soon a dead link is noticed.
BLOCK_MS: Final = 2_000
#: The liveness period, in seconds (``--redis-liveness``): a process silent
#: this long is *suspect*. Everything else is a fraction or a multiple of it
#: (see :class:`Liveness`).
LIVENESS: Final = 6.0
#: Seconds one Redis call may take before the link counts as failed.
CALL_TIMEOUT: Final = 5.0
#: Seconds a ``/nick`` waits for its claim before it goes ahead locally.
CLAIM_TIMEOUT: Final = 2.0

# Nick values in the hash are "<process>/<n> <nick>"; these Lua helpers read them.
_LUA_HELPERS: Final = """
local function owner(v) return string.match(v, '^([^/]*)/') end
local function token(v) return string.match(v, '^(%S*)') end
local function nick(v) return string.match(v, ' (.*)$') end
"""

# Redis's clock in ms, as a string (stamps of the liveness set).
_LUA_NOW: Final = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: nicks, alive. ARGV: nick key, value, this process.
# Set the nick if it is free or already this process's; 1 if set. (A claim
# before this process's first sync registers it as alive, so that nobody
# takes its claim for an orphan's.)
_CLAIM: Final = (
    _LUA_HELPERS
    + _LUA_NOW
    + """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and owner(cur) ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'NX', string.format('%d', now_ms()), ARGV[3])
return 1
"""
)

# KEYS: stream, nicks, this process's last flush number (a string key).
# ARGV: process, maxlen, flush number, n, then n entries (events, one a line,
# see _event_line), then per nick change three values: op ('D' release, 'U'
# update), nick key, value ("<token>" or "<token> <nick>"). A change applies
# only if the hash still holds that token. An entry holds many events: one
# XADD, and one entry for each reader to parse, per batch. A flush whose
# number is not above the last one applied does nothing and returns 0: it
# was run already, only its reply was lost (see RoomBus._last_flush).
_PUBLISH: Final = (
    _LUA_HELPERS
    + """
local seq = tonumber(ARGV[3])
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
if seq <= last then return 0 end
redis.call('SET', KEYS[3], ARGV[3], 'EX', 86400)
local n = tonumber(ARGV[4])
for i = 5 + n, #ARGV, 3 do
  local op, key, val = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local cur = redis.call('HGET', KEYS[2], key)
  if cur and token(cur) == token(val) then
    if op == 'D' then redis.call('HDEL', KEYS[2], key)
    else redis.call('HSET', KEYS[2], key, val) end
  end
end
for i = 5, 4 + n do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'p', ARGV[1], 'b', ARGV[i])
end
return 1
"""
)

# KEYS: nicks, stream, alive (sorted set: process -> last sync, Redis ms),
# clock (the last sync of any process). ARGV: process, maxlen, suspect after
# (ms), dead after (ms), last id read ('' if none), '1' to return the hash,
# processes to reap (space-separated: suspects that the caller saw without a
# connection long enough), then triples: mode ('E' ensure / 'K' keep), nick
# key, value ("<token> <nick>" / "<token>").
# Returns {stream still holds the last id (0/1), clashes (key, value, ...),
# the hash if asked (key, value, ...), the newest stream id, suspects, and
# with the hash the processes that have synced (their claims in it are whole:
# a sync ensures all of a process's claims at once)}.
_SYNC: Final = (
    _LUA_HELPERS
    + _LUA_NOW
    + """
local me = ARGV[1]
local function xadd(who, line)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'p', who, 'e', line)
end
local now = now_ms()
local suspect_ms, dead_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local before = tonumber(redis.call('GET', KEYS[4]) or '0')
redis.call('SET', KEYS[4], string.format('%d', now))
-- Nobody synced for a whole period: Redis was paused, restarted or cut off
-- from everyone, so the stamps say nothing about the processes. Each gets
-- a fresh period to show it is alive; nobody is judged this round.
local fresh = now - before > suspect_ms
if fresh then
  for _, p in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
    redis.call('ZADD', KEYS[3], string.format('%d', now), p)
  end
end
redis.call('ZADD', KEYS[3], string.format('%d', now), me)
local dead, suspects = {}, {}
if not fresh then
  local limit = string.format('%d', now - dead_ms)
  for _, p in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', limit)) do dead[p] = true end
  for p in string.gmatch(ARGV[7], '%S+') do
    local s = redis.call('ZSCORE', KEYS[3], p)
    if s and tonumber(s) < now - suspect_ms then dead[p] = true end
  end
  dead[me] = nil
  for p in pairs(dead) do redis.call('ZREM', KEYS[3], p) end
  limit = '(' .. string.format('%d', now - suspect_ms)
  suspects = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', limit)
end
local continuous = 0
if ARGV[5] ~= '' and #redis.call('XRANGE', KEYS[2], ARGV[5], ARGV[5]) == 1 then
  continuous = 1
end
local mine, clashes = {}, {}
for i = 8, #ARGV, 3 do
  local mode, key, val = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  mine[key] = true
  if mode == 'E' then
    local cur = redis.call('HGET', KEYS[1], key)
    if not cur then
      redis.call('HSET', KEYS[1], key, val)
      xadd(me, 'JOIN ' .. nick(val))
    elseif owner(cur) == me then
      if cur ~= val then redis.call('HSET', KEYS[1], key, val) end
    else
      table.insert(clashes, key); table.insert(clashes, cur)
    end
  end
end
local all = redis.call('HGETALL', KEYS[1])
local alive = {[me] = true}
local snapshot = {}
for i = 1, #all, 2 do
  local key, val = all[i], all[i + 1]
  local who = owner(val) or ''
  local gone
  if who == me then
    gone = not mine[key]
  else
    if alive[who] == nil then
      alive[who] = not dead[who] and (fresh or redis.call('ZSCORE', KEYS[3], who) ~= false)
    end
    gone = not alive[who]
  end
  if gone then
    redis.call('HDEL', KEYS[1], key)
    xadd(who, 'LEAVE ' .. (nick(val) or key))
  elseif ARGV[6] == '1' then
    table.insert(snapshot, key); table.insert(snapshot, val)
  end
end
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local last
if #newest == 1 then
  last = newest[1][1]
else  -- an empty stream: an entry to hold a position by
  last = redis.call('XADD', KEYS[2], '*', 'p', me, 'e', 'HELLO')
end
local synced = {}
if ARGV[6] == '1' then synced = redis.call('ZRANGE', KEYS[3], 0, -1) end
return {continuous, clashes, snapshot, last, suspects, synced}
"""
)


class Liveness:
    """How a process shows it is alive, and how long the others wait before they doubt it.

    One number, the *period* (``--redis-liveness``, 6 s by default), sets
    them all, so tests can run the same rules faster:

    * every ``period / 3`` each process syncs (its stamp in the sorted set
      ``alive`` is set to Redis's clock) and reconnects at least this often
      while Redis is unreachable;
    * a process whose stamp is older than ``period`` is a *suspect*. It is
      dead only if it also has no connection to Redis (``CLIENT LIST``:
      each process names its connections) for ``2 * period / 3``: a process
      killed has none at once; a process merely cut off from Redis, or
      stopped, still has its old ones, so its members are not shown leaving;
    * a suspect for ``10 * period`` is dead even with a connection (a host
      that vanished leaves its connections open in Redis until TCP
      keepalive closes them);
    * after Redis lost the room (restarted empty), the members of other
      processes are kept until their process has synced again (and so
      claimed all its members again), for at most a ``period``; then those
      not claimed are announced as gone.

    With the default that is a ``kill -9`` announced within about 12 s
    (PROTOCOL.md promises 15), and a cut of up to a minute hidden.
    """

    def __init__(self, period: float = LIVENESS) -> None:
        if not period > 0:
            raise ValueError(f"the liveness period must be > 0, got {period}")
        self.period = period
        self.tick = period / 3
        self.suspect_ms = round(period * 1000)
        self.dead_ms = round(period * 10_000)
        self.unconnected = 2 * period / 3
        self.reclaim = period


def rename_candidate(nick: str, n: int) -> str:
    """The ``n``-th name tried for a member whose nick clashed: ``nick-n``, within 32 chars."""
    suffix = f"-{n}"
    return nick[: MAX_NICK - len(suffix)] + suffix


def _cancelled(exc: BaseException) -> bool:
    """Is ``exc`` (or any exception in the group) a cancellation?"""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[0] is not None
    return isinstance(exc, trio.Cancelled)


async def _client_list(client: coredis.Redis[str]) -> tuple[Any, ...]:
    """``CLIENT LIST``, or nothing where the Redis does not allow it (some hosted ones)."""
    import coredis.exceptions

    try:
        with trio.fail_after(CALL_TIMEOUT):
            return tuple(await client.client_list())
    except coredis.exceptions.ResponseError:
        return ()


def _event_line(ms: int, to: str, line: str) -> str:
    """One event in a batch: ``<ms or -> <to or -> <line>`` (lines hold no LF)."""
    return f"{ms or '-'} {to or '-'} {line}"


def _events(fields: Any) -> list[tuple[str, str, str]]:
    """A stream entry's events as (ms, to, line): a batch, or one event (the syncs' own)."""
    batch = fields.get("b")
    if batch is None:
        return [(str(fields.get("ms") or "-"), str(fields.get("to") or "-"), str(fields.get("e")))]
    events = []
    for event in str(batch).split("\n"):
        ms, _, rest = event.partition(" ")
        to, _, line = rest.partition(" ")
        events.append((ms, to, line))
    return events


def _stream_entries(batch: list[_Entry]) -> list[str]:
    """The events of ``batch`` as stream entries of about ENTRY_BYTES each."""
    entries: list[str] = []
    lines: list[str] = []
    size = 0
    for line, *_ in batch:
        if not line:
            continue
        lines.append(line)
        size += len(line) + 1
        if size > ENTRY_BYTES:
            entries.append("\n".join(lines))
            lines, size = [], 0
    if lines:
        entries.append("\n".join(lines))
    return entries


def _is_message(event: str) -> bool:
    """Is this queued event (see _event_line) a message (MSG, ACTION, PRIV)?"""
    return event.split(" ", 3)[2:3] in (["MSG"], ["ACTION"], ["PRIV"])


def _split_value(value: str) -> tuple[str, str, str]:
    """``"<process>/<n> <nick>"`` → (process, token, nick)."""
    token, _, nick = value.partition(" ")
    return token.partition("/")[0], token, nick


# A queued event: its line in a batch ('' for a nick change alone), then op
# ('' none, 'D' release, 'U' update), nick key, value (see _PUBLISH).
_Entry = tuple[str, str, str, str]
#: Events that are messages (what an outage's log line counts).
_MESSAGES: Final = frozenset({"MSG", "ACTION", "PRIV"})
#: Connection names in Redis: this, the process's id, ``-`` the session's number.
_NAME: Final = "trionet-chat-"


class RoomBus:
    """Connects a :class:`Room` to the other processes serving the same room through Redis.

    Create it with the room (it sets ``room.on_event``), run :meth:`run` as
    the service's background task, and call :meth:`claim` /
    :meth:`settle` around a ``/nick`` (see ``ChatService._read``).

    Args:
      room: this process's room.
      url: ``redis://HOST:PORT[/DB]``.
      history: public messages to load into the room's history at start.
      maxlen: events the stream keeps (tests lower it).
      prefix: the keys' prefix (rooms on one Redis need different ones, or DBs).
      cafile: with ``rediss://``: the certificate authority to trust.
      liveness: the liveness period in seconds (see :class:`Liveness`).
    """

    def __init__(
        self,
        room: Room,
        url: str,
        *,
        history: int = 0,
        maxlen: int = STREAM_MAXLEN,
        prefix: str = "trionet:chat",
        cafile: str | None = None,
        liveness: float = LIVENESS,
    ) -> None:
        self.room = room
        room.on_event = self._on_event
        self.live = Liveness(liveness)
        #: This process's id in Redis (random: pids repeat across hosts).
        self.process = secrets.token_hex(6)
        self._sessions = 0  # connections' names end with the session's number
        self.link = RedisLink(
            url,
            "chat",
            cafile=cafile,
            backoff_max=self.live.tick,
            name=self._next_name,
            note=self._note,
        )
        self.history = history
        self.maxlen = maxlen
        self._stream = f"{prefix}:stream"
        self._nicks = f"{prefix}:nicks"
        self._alive = f"{prefix}:alive"
        self._flushed = f"{prefix}:flushed:{self.process}"
        self._clock = f"{prefix}:clock"
        self._client: coredis.Redis[str] | None = None
        # The session's connection for this process's writes (see _write).
        self._writes: Any = None
        self._up = False  # publishing: a session is running
        self._queue: list[_Entry] = []
        # The flushes sent and not answered yet, in order: (flush number, how
        # many of the queue's first events it carries). Numbered so that one
        # sent again after its reply was lost is not run twice.
        self._calls: deque[tuple[int, int]] = deque()
        self._flushes = itertools.count(1)
        self._queued_bytes = 0
        self._wake = trio.Event()
        self._tokens = itertools.count(1)
        # Nick key → token: claims of this process's members; claims awaited
        # by a /nick in progress; claims released but not yet flushed.
        self._claims: dict[str, str] = {}
        self._claiming: dict[str, str] = {}
        self._releasing: dict[str, str] = {}
        self._last_id: str | None = None
        self._synced = False  # reached Redis at least once
        self._history_loaded = False
        #: Messages of this process's members not published (outage, or Redis too slow).
        self.unpublished = 0
        #: ... and those in calls sent but never answered when the link failed:
        #: Redis may have run them or not, nobody can tell.
        self.maybe_unpublished = 0
        self._slow_logged = False
        self._stream_lost = False  # the room's stream was gone when we came back
        # Suspects (see Liveness) seen without a connection: since when.
        self._unconnected: dict[str, float] = {}
        # Ghosts kept after Redis lost the room, until their process claims
        # them again: key -> (ghost, when they are given up).
        self._unconfirmed: dict[str, tuple[Ghost, float]] = {}

    def _next_name(self) -> str:
        """The next session's connection name (``CLIENT LIST`` shows it)."""
        self._sessions += 1
        return f"{_NAME}{self.process}-{self._sessions}"

    def _note(self) -> str:
        """What the link's "reachable again" line adds: what the outage cost."""
        n, self.unpublished = self.unpublished, 0
        maybe, self.maybe_unpublished = self.maybe_unpublished, 0
        note = f"{n} message(s) of this process's members not relayed to the other processes"
        if maybe:
            note += (
                f" (and {maybe} more sent just as the link failed: relayed or not, Redis "
                "never answered)"
            )
        if self._stream_lost:
            note += (
                "; the room's stream had moved past this process's place (Redis restarted "
                "empty, or trimmed it): the members were read again"
            )
        return note

    # -- the room's side (synchronous) ---------------------------------------------

    def _token(self) -> str:
        return f"{self.process}/{next(self._tokens)}"

    def _on_event(self, event: RoomEvent) -> None:
        """A local member did something: keep the claims straight, queue it for the others."""
        kind = event.kind
        op = key = value = ""
        if kind == "JOIN":
            nkey = nick_key(event.nick)
            self._claims[nkey] = self._claiming.pop(nkey, "") or self._token()
            line = f"JOIN {event.nick}"
        elif kind == "NICK":
            okey, nkey = nick_key(event.nick), nick_key(event.arg)
            line = f"NICK {event.nick} {event.arg}"
            token = self._claims.pop(okey, None) or self._token()
            if okey == nkey:  # only the case changed: same claim, new spelling
                self._claims[nkey] = token
                op, key, value = "U", nkey, f"{token} {event.arg}"
            else:
                self._claims[nkey] = self._claiming.pop(nkey, "") or self._token()
                op, key, value = "D", okey, token
        elif kind == "LEAVE":
            key = nick_key(event.nick)
            token = self._claims.pop(key, "")
            line = f"LEAVE {event.nick} {event.arg}" if event.arg else f"LEAVE {event.nick}"
            op, value = ("D", token) if token else ("", "")
        elif kind == "PRIV":
            line = f"PRIV {event.nick} {event.target} {event.arg}"
        else:  # MSG, ACTION
            line = f"{kind} {event.nick} {event.arg}"
        if not self._up:
            # Not published: the sync after the outage repairs the nicks;
            # messages are lost to the other processes.
            if kind in _MESSAGES:
                self.unpublished += 1
            return
        line = _event_line(event.ms, event.origin, line)
        size = len(line)
        if op == "D":
            self._releasing[key] = value
        elif kind in _MESSAGES and self._queued_bytes + size > MAX_QUEUED:
            self.unpublished += 1
            if not self._slow_logged:
                self._slow_logged = True
                log.warning("chat: Redis is not keeping up: messages not published to others")
            return
        self._queue.append((line, op, key, value))
        self._queued_bytes += size
        self._wake.set()

    def _release(self, key: str, token: str) -> None:
        """Give back a claim no member took (a ``/nick`` that did not happen)."""
        if self._up:
            self._releasing[key] = token
            self._queue.append(("", "D", key, token))
            self._wake.set()

    # -- claims (awaited by a /nick) -------------------------------------------------

    async def claim(self, name: str) -> str | None:
        """Claim ``name`` across processes for a ``/nick``; its token, or ``None`` if taken.

        The caller has checked the nick locally (:meth:`Room.check_nick`);
        after the room has taken it (or refused), it calls :meth:`settle`.
        While Redis is unreachable the claim is local only: the sync makes it
        (or finds the clash) once Redis is back.
        """
        key = nick_key(name)
        if key in self._claiming:  # another member of ours is claiming it right now
            return None
        token = self._token()
        self._claiming[key] = token
        if self._writes is None or not self.link.up:
            # (Not before the session's first sync either: that sync is what
            # makes this process's claims whole, which others rely on.)
            return token
        try:
            with trio.fail_after(CLAIM_TIMEOUT):
                ok: Any = await self._write(
                    _CLAIM, [self._nicks, self._alive], [key, f"{token} {name}", self.process]
                )
        except Exception:
            # The link is failing (or closing under us): local for now, the
            # sync claims it (or finds the clash) when Redis is back.
            return token
        except BaseException:
            if self._claiming.get(key) == token:
                del self._claiming[key]
            raise
        if not ok:
            if self._claiming.get(key) == token:
                del self._claiming[key]
            return None
        return token

    def settle(self, name: str, token: str) -> None:
        """After the room took (or refused) a claimed nick: release it if unused."""
        key = nick_key(name)
        if self._claiming.get(key) == token:
            del self._claiming[key]
            self._release(key, token)

    # -- the background task --------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The link to Redis, for the life of the service (its ``run_background``).

        On cancellation (the server stopped after its last connection ended)
        the events still queued (those members' ``LEAVE``) are published on a
        fresh connection within 5 s, and this process's liveness key removed.
        """
        log.info("chat: sharing the room through Redis at %s as %s", self.link.shown, self.process)
        try:
            await self.link.run(self._session, task_status=task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self._last_flush()

    async def _last_flush(self) -> None:
        queue, self._queue = self._queue, []
        if not self._synced:
            return
        self._up = False
        # Flushes still unanswered when the session ended went out again with
        # their own numbers: if Redis ran one before the connection closed (its
        # reply lost on the way), the script skips it instead of repeating its
        # lines to everyone. What was never sent gets new numbers.
        batches: list[tuple[int, list[_Entry]]] = []
        start = 0
        for number, n in self._calls:
            batches.append((number, queue[start : start + n]))
            start += n
        for at in range(start, len(queue), FLUSH_BATCH):
            batches.append((next(self._flushes), queue[at : at + FLUSH_BATCH]))
        self._calls.clear()
        with trio.move_on_after(5.0):
            try:
                async with self.link.client() as client:
                    for number, batch in batches:
                        await self._publish(client, number, batch)
                    await client.zrem(self._alive, [self.process])
            except redis_errors() as exc:
                log.warning("chat: could not publish the last leaves to Redis: %s", exc)

    @property
    def _sent(self) -> int:
        """The queue's first events, in flushes not answered yet."""
        return sum(n for _, n in self._calls)

    @property
    def _in_flight(self) -> int:
        """Flushes (script calls) sent and not answered yet."""
        return len(self._calls)

    async def _session(self, client: coredis.Redis[str], ready: Callable[[], None]) -> None:
        self._client = client
        self._up = True
        self._calls.clear()
        try:
            with trio.fail_after(CALL_TIMEOUT):
                self._writes = await client.connection_pool.get_connection()
                await client.script_load(_PUBLISH)  # (the last flush's EVALSHA)
                if self._sessions > 1:
                    await self._close_old_connections(client)
            await self._sync(client, first=True)
            if not self._history_loaded:
                await self._load_history(client)
            self._slow_logged = False
            ready()
            self._stream_lost = False
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop, client)
                nursery.start_soon(self._flush_loop, client)
                nursery.start_soon(self._tick_loop, client)
        except BaseException as exc:
            if not _cancelled(exc):
                # Redis failed: what was queued will not be published (the
                # next sync repairs the nicks; the messages are lost to the
                # others). On cancellation the last flush publishes it.
                sent = self._sent  # (in calls not answered: run or not, unknown)
                self.maybe_unpublished += sum(1 for e in self._queue[:sent] if _is_message(e[0]))
                self.unpublished += sum(1 for e in self._queue[sent:] if _is_message(e[0]))
                self._queue.clear()
                self._calls.clear()
                self._queued_bytes = 0
                self._releasing.clear()
            raise
        finally:
            self._up = False
            self._client = None
            if self._writes is not None:
                client.connection_pool.release(self._writes)
                self._writes = None

    def _write(self, script: str, keys: list[str], args: list[str | int]) -> Any:
        """Start a call of ``script`` on the session's connection for writes (await the reply).

        Every write of this process (claims, syncs, flushes) goes through
        this one connection, sent in the order the calls are made (coredis
        queues a request for the socket when it is created), and Redis runs
        one connection's commands in the order it receives them: so a call
        held up in the network (a cut link) can never land after a later
        one. ``EVAL``, not ``EVALSHA``: a script missing from Redis (``SCRIPT
        FLUSH``) would fail one call and perhaps not the next.
        """
        return self._writes.create_request(b"EVAL", script, len(keys), *keys, *args)

    async def _close_old_connections(self, client: coredis.Redis[str]) -> None:
        """Close this process's connections of earlier sessions that Redis still holds.

        After a network cut Redis keeps the connections it lost sight of
        (until TCP keepalive), and they would keep this process looking
        alive (see :class:`Liveness`) even after a later ``kill -9``.
        """
        import coredis.exceptions

        mine = f"{_NAME}{self.process}-"
        current = f"{mine}{self._sessions}"
        for info in await _client_list(client):
            name = str(info.get("name", ""))
            if name.startswith(mine) and name != current:
                # (gone meanwhile, or CLIENT KILL not allowed on this Redis)
                with contextlib.suppress(coredis.exceptions.ResponseError):
                    await client.client_kill(identifier=int(info["id"]))

    async def _sync(self, client: coredis.Redis[str], *, first: bool = False) -> None:
        """Run the sync script (see the module docstring), then act on what it found."""
        want_snapshot = first or self._last_id is None or bool(self._unconfirmed)
        reply = await self._run_sync(client, want_snapshot, [])
        suspects = [str(p) for p in reply[4]]
        if not suspects:
            self._unconnected.clear()
        else:
            reap = await self._reapable(client, suspects)
            if reap:
                reply = await self._run_sync(client, want_snapshot, reap)
        self._synced = True
        continuous, clashes, snapshot, newest, _, synced = reply
        if want_snapshot:
            ghosts = {}
            for key, value in zip(snapshot[::2], snapshot[1::2], strict=True):
                origin, _, nick = _split_value(str(value))
                if origin != self.process and valid_nick(nick):
                    ghosts[str(key)] = Ghost(nick, origin)
            if not (continuous and self._last_id is not None):
                # No position to continue from: reading starts after the
                # snapshot, which is the picture of the others.
                self._stream_lost = self._last_id is not None
                self._last_id = str(newest)
                self._merge_ghosts(ghosts)
            self._confirm_ghosts(ghosts, {str(p) for p in synced})
        if clashes:
            await self._resolve(client, [str(c) for c in clashes])

    async def _run_sync(
        self, client: coredis.Redis[str], want_snapshot: bool, reap: list[str]
    ) -> Any:
        entries: list[str] = []
        for key, nick in self.room.local_nicks().items():
            token = self._claims.get(key) or self._claims.setdefault(key, self._token())
            entries += ["E", key, f"{token} {nick}"]
        for pending in (self._claiming, self._releasing):
            for key, token in pending.items():
                entries += ["K", key, token]
        args = [
            self.process,
            self.maxlen,
            self.live.suspect_ms,
            self.live.dead_ms,
            self._last_id or "",
            "1" if want_snapshot else "0",
            " ".join(reap),
            *entries,
        ]
        with trio.fail_after(CALL_TIMEOUT):
            return await self._write(
                _SYNC, [self._nicks, self._stream, self._alive, self._clock], args
            )

    async def _reapable(self, client: coredis.Redis[str], suspects: list[str]) -> list[str]:
        """The suspects that have had no connection to Redis long enough to be dead."""
        connected = {
            name[len(_NAME) :].partition("-")[0]
            for info in await _client_list(client)
            if (name := str(info.get("name", ""))).startswith(_NAME)
        }
        now = trio.current_time()
        for process in list(self._unconnected):
            if process not in suspects or process in connected:
                del self._unconnected[process]
        return [
            p
            for p in suspects
            if p not in connected
            and now - self._unconnected.setdefault(p, now) >= self.live.unconnected
        ]

    def _merge_ghosts(self, ghosts: dict[str, Ghost]) -> None:
        """A fresh picture of the others after the room's stream was lost.

        Who is new is announced at once; who is missing is *kept* for a
        while (Redis may have restarted empty, and their processes have not
        claimed them again yet) and given up only if still missing then.
        """
        room = self.room
        until = trio.current_time() + self.live.reclaim
        for key, ghost in room.ghosts.items():
            now = ghosts.get(key)
            if now is None:  # (kept since an earlier loss: waited for afresh)
                self._unconfirmed[key] = (ghost, until)
            elif now.origin != ghost.origin:
                room.remote_leave(ghost.origin, ghost.nick)
        for ghost in ghosts.values():
            room.remote_join(ghost.origin, ghost.nick)

    def _confirm_ghosts(self, ghosts: dict[str, Ghost], synced: set[str]) -> None:
        """Settle the kept ghosts: claimed again, gone meanwhile, or given up.

        A ghost missing from the hash although its process has synced since
        is gone (that sync claimed all the process's members at once); one
        whose process has not synced yet is waited for until it is due.
        """
        if not self._unconfirmed:
            return
        now = trio.current_time()
        current = self.room.ghosts
        for key, (ghost, until) in list(self._unconfirmed.items()):
            here, there = current.get(key), ghosts.get(key)
            if here is None or here.origin != ghost.origin:
                del self._unconfirmed[key]  # left (or renamed) meanwhile: announced then
            elif there is not None and there.origin == ghost.origin:
                del self._unconfirmed[key]
            elif ghost.origin in synced or now >= until:
                del self._unconfirmed[key]
                self.room.remote_leave(ghost.origin, ghost.nick)

    async def _resolve(self, client: coredis.Redis[str], clashes: list[str]) -> None:
        """Rename each of our members whose nick another process holds."""
        for key, value in zip(clashes[::2], clashes[1::2], strict=True):
            member = self.room.member(key)
            if member is None or member.nick is None:
                continue
            old = member.nick
            for n in range(2, 1000):
                candidate = rename_candidate(old, n)
                try:
                    self.room.check_nick(member, candidate)
                except ChatError:
                    continue
                token = await self.claim(candidate)
                if token is None:
                    continue
                try:
                    if self.room.member(key) is member:
                        log.info("chat: %s was taken on another process: now %s", old, candidate)
                        self.room.force_rename(member, candidate)
                finally:
                    self.settle(candidate, token)
                break
            origin, _, nick = _split_value(value)
            self.room.remote_join(origin, nick)

    async def _load_history(self, client: coredis.Redis[str]) -> None:
        """Fill the room's history from the stream's last public messages."""
        entries: list[tuple[int, str, str, str]] = []
        end = "+"
        while len(entries) < self.history:
            with trio.fail_after(CALL_TIMEOUT):
                page = await client.xrevrange(self._stream, end=end, start="-", count=500)
            for entry in page:
                fields = entry.field_values
                if fields.get("p") == self.process:
                    continue
                for ms, _, line in reversed(_events(fields)):
                    kind, _, rest = line.partition(" ")
                    if kind in ("MSG", "ACTION"):
                        nick, _, text = rest.partition(" ")
                        entries.append((int(ms) if ms.isdigit() else 0, kind, nick, text))
            if len(page) < 500:
                break
            end = "(" + str(page[-1].identifier)
        entries.reverse()
        self.room.load_history(entries[-self.history :] if self.history else [])
        self._history_loaded = True

    async def _flush_loop(self, client: coredis.Redis[str]) -> None:
        """Publish what is queued as soon as it is queued, up to IN_FLIGHT calls at once.

        The calls go out in order on the session's connection for writes
        (see :meth:`_write`): this process's events reach the stream in the
        order they happened, however many calls are in flight. What is
        queued while IN_FLIGHT calls wait for their replies goes in the next.
        """
        slots = trio.Semaphore(IN_FLIGHT)
        send, receive = trio.open_memory_channel[tuple[Any, float]](IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._replies, receive, slots)
            while True:
                if self._sent >= len(self._queue):
                    self._wake = trio.Event()
                    await self._wake.wait()
                await slots.acquire()
                # The events leave the queue only once their call is
                # answered: if the service stops meanwhile (its members'
                # LEAVEs are in it), the last flush still has them.
                sent = self._sent
                batch = self._queue[sent : sent + FLUSH_BATCH]
                number = next(self._flushes)
                request = self._write(
                    _PUBLISH,
                    [self._stream, self._nicks, self._flushed],
                    self._publish_args(number, batch),
                )
                self._calls.append((number, len(batch)))
                send.send_nowait((request, trio.current_time() + CALL_TIMEOUT))

    async def _replies(
        self, receive: trio.MemoryReceiveChannel[tuple[Any, float]], slots: trio.Semaphore
    ) -> None:
        """The flushes' replies, in order: each call's events leave the queue."""
        async for request, deadline in receive:
            with trio.fail_at(deadline):
                await request
            _, n = self._calls.popleft()
            batch = self._queue[:n]
            del self._queue[:n]
            self._queued_bytes -= sum(len(e[0]) for e in batch)
            for _, op, key, value in batch:
                if op == "D" and self._releasing.get(key) == value:
                    del self._releasing[key]
            slots.release()

    def _publish_args(self, number: int, batch: list[_Entry]) -> list[str | int]:
        """The publish script's ARGV for flush ``number`` of ``batch`` (see _PUBLISH)."""
        entries = _stream_entries(batch)
        args: list[str | int] = [self.process, self.maxlen, number, len(entries), *entries]
        for _, op, key, value in batch:
            if op:
                args += [op, key, value]
        return args

    async def _publish(self, client: coredis.Redis[str], number: int, batch: list[_Entry]) -> None:
        """Flush ``number``, of ``batch``, awaited (the last flush's way)."""
        with trio.fail_after(CALL_TIMEOUT):
            # EVALSHA (the script is loaded once per Redis, again after a restart).
            await client.register_script(_PUBLISH)(
                keys=[self._stream, self._nicks, self._flushed],
                args=self._publish_args(number, batch),
            )

    async def _tick_loop(self, client: coredis.Redis[str]) -> None:
        while True:
            delay = self.live.tick
            if self._unconfirmed:  # settle them as soon as they are due
                due = min(until for _, until in self._unconfirmed.values())
                delay = max(0.0, min(delay, due - trio.current_time()))
            await trio.sleep(delay)
            await self._sync(client)

    async def _read_loop(self, client: coredis.Redis[str]) -> None:
        """Apply the other processes' events, in stream order."""
        stream = self._stream
        # At most what the stream keeps: then a batch that is not full proves
        # nothing was trimmed between our last event and it.
        count = min(READ_COUNT, self.maxlen)
        while True:
            last = self._last_id or "$"
            with trio.fail_after(BLOCK_MS / 1000 + CALL_TIMEOUT):
                reply = await client.xread({stream: last}, count=count, block=BLOCK_MS)
            entries = reply.get(stream) if reply else None
            if not entries:
                continue
            if len(entries) == count and self._last_id is not None:
                # A full batch: we may be further behind than the stream
                # keeps. If our last event is gone, events after it may be too.
                with trio.fail_after(CALL_TIMEOUT):
                    kept = await client.xrange(stream, last, last)
                if not kept:
                    log.warning(
                        "chat: fell more than %d stream entries behind the room: skipping ahead",
                        self.maxlen,
                    )
                    self._last_id = None
                    await self._sync(client, first=True)
                    continue
            for entry in entries:
                self._apply(entry.field_values)
            self._last_id = str(entries[-1].identifier)

    def _apply(self, fields: Any) -> None:
        """One entry of the stream, applied to the local room (ours are skipped)."""
        origin = fields.get("p")
        if origin == self.process or origin is None:
            return
        room = self.room
        for ms, to, line in _events(fields):
            kind, _, rest = line.partition(" ")
            if kind in ("MSG", "ACTION"):
                nick, _, text = rest.partition(" ")
                room.remote_relay(origin, kind, nick, text, int(ms) if ms.isdigit() else 0)
            elif kind == "JOIN":
                room.remote_join(origin, rest)
            elif kind == "NICK":
                old, _, new = rest.partition(" ")
                room.remote_nick(origin, old, new)
            elif kind == "LEAVE":
                nick, _, reason = rest.partition(" ")
                room.remote_leave(origin, nick, reason)
            elif kind == "PRIV" and to == self.process:
                sender, _, rest = rest.partition(" ")
                target, _, text = rest.partition(" ")
                room.remote_whisper(sender, target, text)
        # Anything else (HELLO, the stream's first entry) is not for the room.
