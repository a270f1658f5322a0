"""chat: a line-based chat room (port 7003).

The handler only maps lines to room operations (:mod:`.room`); the
rules live in pure modules (:mod:`.text`, :mod:`.flood`).

Each connection runs two tasks under one nursery:

* the reader (the handler itself) parses lines and calls the room, which
  appends to its shared log or to the member's private queue and never
  waits;
* the writer (:meth:`Member.pump`) is the only task that sends on the
  socket. It wakes when there is something for it and sends everything
  from its cursor in the log to the end in one write (``send_all``; on
  plain TCP the connection writes to the descriptor itself).

Because only the writer sends, replies to the client itself (``OK``,
``WHO``, every ``ERR``, the framing errors of :meth:`ChatService.on_line_error`
included) go through the member's private queue too: a second task calling
``send_all`` while the writer is sending would raise ``BusyResourceError``.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final, Self

import attrs
import trio

from ..._connection import Connection
from ..._framing import BadEncoding, LineTooLong
from ..._redis import add_redis_argument, validate_redis_cafile, validate_redis_url
from ..._service import Service
from .bus import LIVENESS, RoomBus
from .flood import TokenBucket
from .room import DEFAULT_HISTORY, HELP, ChatError, Member, Room
from .text import (
    BadRequest,
    Help,
    History,
    Me,
    Message,
    Nick,
    Private,
    Unknown,
    Who,
    echoed,
    parse_line,
)
from .web import WebListener, WebSocketStream, message_limit, open_web_listeners

__all__ = ["WELCOME", "ChatService"]

WELCOME: Final = "WELCOME trionet chat — send /nick <name> to join"
DEFAULT_RATE: Final = 5.0
DEFAULT_BURST: Final = 10.0
#: 8 MiB: far above what a burst that flood control allows puts in the log
#: (100 members x 10 lines x 4 KB is 4 MB), so only a client that stopped
#: reading gets there.
DEFAULT_SENDQ: Final = 8 << 20
#: After ``/quit`` or EOF, how long the writer may take to send what is queued
#: (``BYE``, the last replies) before the connection is closed anyway.
DRAIN_TIMEOUT: Final = 5.0
#: What a transport raises when the peer is gone.
_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


@attrs.define(kw_only=True, eq=False)
class ChatService(Service):
    """One chat room with flood control and slow-consumer eviction."""

    name: ClassVar[str] = "chat"
    default_port: ClassVar[int] = 7003
    line_based: ClassVar[bool] = True
    default_idle_timeout: ClassVar[float] = 3600.0
    summary: ClassVar[str] = "a chat room: /nick, messages, /me, /msg, /who, /history, /quit"
    #: ``/quit [reason]`` ends a session (the connection's built-in quit).
    quit_command: ClassVar[str | None] = "/quit"
    metric_help: ClassVar[Mapping[str, str]] = {
        "chat_members": "Members in the room served by this process (ghosts not counted).",
        "chat_messages_total": "Messages (MSG, ACTION, PRIV) sent by this process's members.",
        "chat_evictions_total": "Members evicted as slow consumers.",
    }

    #: Lines per second refilled into each client's bucket (0: no limit).
    rate: float = attrs.field(default=DEFAULT_RATE, validator=attrs.validators.ge(0))
    #: Lines a client may send at once.
    burst: float = attrs.field(default=DEFAULT_BURST, validator=attrs.validators.ge(1))
    #: Bytes of pending output per client before it is evicted.
    sendq: int = attrs.field(default=DEFAULT_SENDQ, validator=attrs.validators.ge(1))
    #: Public messages kept for ``/history`` (0 keeps none).
    history: int = attrs.field(default=DEFAULT_HISTORY, validator=attrs.validators.ge(0))
    #: Wall clock for ``HIST`` time stamps (seconds since the epoch); tests pass their own.
    clock: Callable[[], float] = time.time
    #: HTTP port of the browser page and its WebSocket (``None``: off; 0: any free port).
    web_port: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional([attrs.validators.ge(0), attrs.validators.le(65535)]),
    )
    #: Host names the browser page may be reached by besides its address
    #: (``--web-host-name``; see :func:`.web.served_names`).
    web_host_names: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    #: ``redis://HOST:PORT[/DB]``: share the room with every process using it (``None``: off).
    redis: str | None = attrs.field(default=None, validator=validate_redis_url)
    #: With a ``rediss://`` URL: the certificate authority to trust (``None``: the system's).
    redis_cafile: str | None = attrs.field(default=None, validator=validate_redis_cafile)
    #: With ``redis``: the liveness period in seconds (see :class:`.bus.Liveness`).
    redis_liveness: float = attrs.field(default=LIVENESS, validator=attrs.validators.gt(0))
    room: Room = attrs.field()
    _members: dict[Connection, Member] = attrs.field(factory=dict, init=False)
    _web: list[WebListener] = attrs.field(factory=list, init=False)
    #: The room's link to the other processes (with ``redis``).
    bus: RoomBus | None = attrs.field(default=None, init=False)

    @room.default
    def _make_room(self) -> Room:
        return Room(history=self.history, clock=self.clock)

    @redis_liveness.validator
    def _liveness_needs_redis(self, attr: Any, value: float) -> None:
        if self.redis is None and value != LIVENESS:
            raise ValueError("--redis-liveness needs --redis (it would be ignored)")

    def __attrs_post_init__(self) -> None:
        if self.redis is not None:
            self.bus = RoomBus(
                self.room,
                self.redis,
                history=self.history,
                cafile=self.redis_cafile,
                liveness=self.redis_liveness,
            )

    async def run_background(self, *, task_status: trio.TaskStatus[None]) -> None:
        """The web listeners' HTTP work, and with ``redis`` the room's link to the
        other processes (see :mod:`.bus`), for as long as the server runs."""
        async with trio.open_nursery() as nursery:
            for listener in self._web:
                await nursery.start(listener.run)
            if self.bus is not None:
                await nursery.start(self.bus.run)
            task_status.started()

    async def handle(self, conn: Connection) -> None:
        """Serve one client: a reader (this task) and a writer, under one nursery."""
        member = Member(self.room, self.sendq)
        self._members[conn] = member
        if isinstance(conn.stream, WebSocketStream):
            # A message trickling in must end within the line timeout, as a
            # TCP line must: the stream says when the one arriving began.
            conn.stream.line_clock = conn.line_started
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
            # forget() is synchronous, so the others always get the LEAVE.
            self.room.forget(member)
            del self._members[conn]
            if member.evicted:
                conn.end_reason = "slow-consumer"
                conn.log.info("evicted: over %d bytes of pending output", self.sendq)

    @staticmethod
    async def _write(conn: Connection, member: Member, scope: trio.CancelScope) -> None:
        """The writer task; a broken connection ends the whole session quietly."""
        try:
            # The writer yields each time it waits for the room, so its
            # sends skip Trio's extra yield after a send the kernel took at
            # once: one scheduler round trip per burst instead of two.
            await member.pump(functools.partial(conn.send_all, checkpoint=False))
        except _GONE:
            conn.end_reason = "reset"
            scope.cancel()

    async def _read(self, conn: Connection, member: Member) -> None:
        """Map each line to a room operation until ``/quit`` or end of input."""
        room = self.room
        bucket = TokenBucket(self.rate, self.burst, trio.current_time())
        async for line in conn:
            cmd = parse_line(line)
            if cmd is None:
                continue
            if not bucket.take(trio.current_time()):
                room.reply(member, "ERR rate-limited")
                continue
            joined = member in room
            try:
                if not joined and not isinstance(cmd, Nick | Help):
                    # Before a nick only /nick, /help (and /quit) do anything;
                    # unknown commands too get no-nick, not unknown-command.
                    raise ChatError("no-nick")
                match cmd:
                    case Message(text):
                        room.say(member, text)
                    case Me(text):
                        room.act(member, text)
                    case Private(target, text):
                        room.whisper(member, target, text)
                    case Nick(name):
                        await self._set_nick(member, name)
                        if not joined:
                            # A fresh bucket on joining: lines spent getting a
                            # nick do not eat into the burst for the room.
                            bucket = TokenBucket(self.rate, self.burst, trio.current_time())
                    case Who():
                        room.who(member)
                    case Help():
                        room.reply(member, HELP)
                    case History(count):
                        room.history(member, count)
                    case BadRequest(reason):
                        raise ChatError("bad-request", reason)
                    case Unknown(word):
                        raise ChatError("unknown-command", echoed(word))
            except ChatError as err:
                room.reply(member, err.line)

    async def _set_nick(self, member: Member, name: str) -> None:
        """``/nick``: with other processes, claim the nick across them first."""
        room, bus = self.room, self.bus
        if bus is None or not room.check_nick(member, name):
            room.set_nick(member, name)
            return
        # The claim is the one await between reading /nick and joining; the
        # reader reads nothing else meanwhile, so this member's later lines
        # (and its JOIN before its MSG) keep their order everywhere.
        token = await bus.claim(name)
        if token is None:
            raise ChatError("nick-taken", name)
        try:
            room.set_nick(member, name)
        finally:
            bus.settle(name, token)

    async def on_quit(self, conn: Connection, reason: str) -> None:
        """``/quit [reason]``: leave with the reason, then ``BYE`` through the writer.

        The connection answers /quit before the rate limit applies: leaving
        must always work.
        """
        member = self._members.get(conn)
        if member is not None:
            self.room.leave(member, reason)
            self.room.reply(member, "BYE")

    def extra_ports(self) -> dict[str, int]:
        """With ``web_port``: ``{"web": web_port}`` (the parent of workers opens it)."""
        return {} if self.web_port is None else {"web": self.web_port}

    async def open_extra_listeners(
        self, host: str, inherited: Mapping[str, Sequence[trio.abc.Listener[Any]]] | None = None
    ) -> list[trio.abc.Listener[Any]]:
        """With ``web_port``: the page and WebSocket listener(s) of :mod:`.web`.

        In a worker (``inherited``) they serve the sockets the parent opened.
        """
        if self.web_port is None:
            return []
        limit = message_limit(self.max_line)
        self._web = await open_web_listeners(
            host,
            self.web_port,
            max_message_size=limit,
            tls=self.tls_context,
            transports=(inherited or {}).get("web"),
            host_names=self.web_host_names,
            # Handshakes count like connections: one address may hold no
            # more of them (with its WebSockets) than of connections. All
            # three are read at each connection: a reload may change them.
            max_pending=lambda: self.max_connections,
            max_per_address=lambda: self.effective_max_per_address,
            proxy=lambda: self.proxy_from if self.proxy_protocol else None,
        )
        return list(self._web)

    async def on_line_error(self, conn: Connection, event: LineTooLong | BadEncoding) -> None:
        """Queue the ``ERR`` line for the writer instead of sending it here."""
        member = self._members.get(conn)
        if member is not None:
            self.room.reply(member, event.reply)

    def metric_values(self) -> Mapping[str, float]:
        """Members, messages and evictions (the room keeps plain counts)."""
        room = self.room
        return {
            "chat_members": len(room),
            "chat_messages_total": room.messages,
            "chat_evictions_total": room.evictions,
        }

    def workers_problem(self, workers: int) -> str | None:
        """One room per process would split the room: more than one worker needs Redis."""
        if workers > 1 and self.redis is None:
            return (
                "the chat room lives in one process, so --workers above 1 would split it "
                "into separate rooms (share it through Redis with --redis)"
            )
        return None

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add ``--rate``, ``--burst``, ``--sendq``, ``--history``, ``--web-port``,
        ``--web-host-name``, ``--redis``."""
        group.add_argument(
            "--rate",
            type=float,
            default=DEFAULT_RATE,
            metavar="LINES",
            help="flood control: lines per second refilled per client; a line over "
            "the rate gets 'ERR rate-limited'; 0 turns it off (default: %(default)s)",
        )
        group.add_argument(
            "--burst",
            type=float,
            default=DEFAULT_BURST,
            metavar="LINES",
            help="flood control: lines a client may send at once (default: %(default)s)",
        )
        group.add_argument(
            "--sendq",
            type=int,
            default=DEFAULT_SENDQ,
            metavar="BYTES",
            help="output the server holds for one client before it is disconnected "
            "as a slow consumer (default: %(default)s, 8 MiB)",
        )
        group.add_argument(
            "--history",
            type=int,
            default=DEFAULT_HISTORY,
            metavar="N",
            help="public messages kept for /history; 0 keeps none (default: %(default)s)",
        )
        group.add_argument(
            "--web-port",
            type=int,
            default=None,
            metavar="PORT",
            help="also serve the chat in a browser: the page on http://HOST:PORT/ and "
            "the line protocol over a WebSocket at /ws; 0 picks a free port (default: off)",
        )
        group.add_argument(
            "--web-host-name",
            dest="web_host_names",
            action="append",
            default=[],
            metavar="NAME",
            help="a host name the browser page is reached by (repeatable); requests naming "
            "any other host than the address itself (and localhost on loopback) get 403, "
            "which keeps pages elsewhere out even after DNS rebinding",
        )
        add_redis_argument(group)
        group.add_argument(
            "--redis-liveness",
            type=float,
            default=LIVENESS,
            metavar="SECONDS",
            help="with --redis: a chat process silent this long is suspected dead, and "
            "announced gone once it also has no connection to Redis for 2/3 of it "
            "(default: %(default)s; lower only for tests)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace, **common: Any) -> Self:
        """Build the service from ``trionet.serve``'s parsed options."""
        return cls(
            rate=args.rate,
            burst=args.burst,
            sendq=args.sendq,
            history=args.history,
            web_port=args.web_port,
            web_host_names=args.web_host_names or (),
            redis=getattr(args, "redis", None),
            redis_cafile=getattr(args, "redis_cafile", None),
            redis_liveness=getattr(args, "redis_liveness", LIVENESS),
            **common,
        )
