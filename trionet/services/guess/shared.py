"""guess's STATS shared by every process through Redis (``--redis URL``).

The numbers live in one Redis hash, ``trionet:guess:stats`` (``played``,
``won``, ``attempts``, ``best``). A win or a give-up never waits for Redis:
it is added to a local batch (:meth:`SharedStats.record_win`, synchronous),
and a background task applies the batch in one call, a small Lua script
(``HINCRBY`` each counter, ``best`` kept as the minimum). ``STATS`` asks that
same task, which applies what is pending and returns the totals in that one
call, so a client always counts its own just-finished round.

Each batch carries an id the script remembers for an hour (``SET NX``): a
batch whose reply was lost with the connection is sent again on reconnection
and counted once. While Redis is unreachable the batch keeps growing (four
numbers, whatever the traffic) and ``STATS`` answers this process's own
numbers (logged once per outage); nothing is lost when Redis is back, unless
Redis itself lost the hash.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ..._redis import RedisLink, redis_errors
from .rules import Stats

if TYPE_CHECKING:
    import coredis

__all__ = ["SharedStats"]

log = logging.getLogger("trionet.guess")

#: Seconds ``STATS`` waits for Redis before it answers with local numbers.
READ_TIMEOUT: Final = 1.0
#: Seconds one batch may take before the link counts as failed.
CALL_TIMEOUT: Final = 5.0

# KEYS: the hash. ARGV: batch id, played, won, attempts, best ('' if none).
# Applies the batch once (a batch sent again after a lost reply is skipped)
# and returns the totals.
_APPLY: Final = """
if ARGV[1] ~= '' and redis.call('SET', KEYS[1] .. ':batch:' .. ARGV[1], 1, 'NX', 'EX', 3600) then
  redis.call('HINCRBY', KEYS[1], 'played', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'won', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'attempts', ARGV[4])
  if ARGV[5] ~= '' then
    local best = redis.call('HGET', KEYS[1], 'best')
    if not best or tonumber(ARGV[5]) < tonumber(best) then
      redis.call('HSET', KEYS[1], 'best', ARGV[5])
    end
  end
end
return redis.call('HMGET', KEYS[1], 'played', 'won', 'attempts', 'best')
"""


@attrs.define(eq=False)
class _Read:
    done: trio.Event = attrs.field(factory=trio.Event)
    totals: Stats | None = None


class SharedStats:
    """Statistics of every process using one Redis; see the module docstring.

    Args:
      url: see :func:`~trionet._redis.check_redis_url`.
      cafile: with ``rediss://``: the certificate authority to trust.
      key: the hash's name.
    """

    def __init__(
        self, url: str, *, key: str = "trionet:guess:stats", cafile: str | None = None
    ) -> None:
        self.link = RedisLink(url, "guess", cafile=cafile)
        self.key = key
        self._pending = Stats()  # recorded here, not yet applied in Redis
        self._batch: tuple[str, Stats] | None = None  # sent, reply not yet seen
        self._reads: list[_Read] = []
        self._wake = trio.Event()
        self._prefix = secrets.token_hex(6)
        self._batches = 0
        self._outage_noted = False

    def record_win(self, attempts: int) -> None:
        """A round won in ``attempts`` guesses (applied in Redis soon after)."""
        self._pending.record_win(attempts)
        self._wake.set()

    def record_give_up(self) -> None:
        """A round given up."""
        self._pending.record_give_up()
        self._wake.set()

    async def totals(self, local: Stats) -> Stats:
        """Every process's statistics; ``local`` (this process's) while Redis is unreachable."""
        if self.link.up:
            read = _Read()
            self._reads.append(read)
            self._wake.set()
            with trio.move_on_after(READ_TIMEOUT):
                await read.done.wait()
            if read.totals is not None:
                self._outage_noted = False
                return read.totals
        if not self._outage_noted:
            self._outage_noted = True
            log.warning("guess: Redis unreachable: STATS shows this process's numbers only")
        return local

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply batches and answer reads, for the life of the service (its ``run_background``)."""
        log.info("guess: sharing STATS through Redis at %s", self.link.shown)
        try:
            await self.link.run(self._session, task_status=task_status)
        finally:
            # Stopped after the last connection ended: apply the last rounds,
            # on a fresh connection, within 2 s.
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                if self._batch is not None or self._pending.played:
                    try:
                        async with self.link.client() as client:
                            while self._batch is not None or self._pending.played:
                                await self._apply(client)
                    except redis_errors() as exc:
                        log.warning("guess: could not apply the last rounds in Redis: %s", exc)

    async def _session(self, client: coredis.Redis[str], ready: Callable[[], None]) -> None:
        with trio.fail_after(CALL_TIMEOUT):
            await client.script_load(_APPLY)  # (EVALSHA from here on)
        ready()
        while True:
            await self._apply(client)
            if not self._pending.played and not self._reads:
                self._wake = trio.Event()
                await self._wake.wait()

    async def _apply(self, client: coredis.Redis[str]) -> None:
        if self._batch is None and self._pending.played:
            self._batches += 1
            self._batch = (f"{self._prefix}:{self._batches}", self._pending)
            self._pending = Stats()
        reads, self._reads = self._reads, []
        batch_id, batch = self._batch or ("", Stats())
        args: list[str | int] = [
            batch_id,
            batch.played,
            batch.won,
            batch.total_attempts,
            "" if batch.best is None else batch.best,
        ]
        try:
            with trio.fail_after(CALL_TIMEOUT):
                reply: Any = await client.register_script(_APPLY)(keys=[self.key], args=args)
        except BaseException:
            for read in reads:  # they answer with their local numbers
                read.done.set()
            raise
        # Applied (or found applied before): the batch is done.
        self._batch = None
        played, won, attempts, best = (None if v is None else int(v) for v in reply)
        totals = Stats(played=played or 0, won=won or 0, best=best, total_attempts=attempts or 0)
        for read in reads:
            read.totals = totals
            read.done.set()
