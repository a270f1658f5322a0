"""Redis for services that share state across processes: ``--redis URL`` and a lasting link.

Chat and guess both take ``--redis redis://HOST:PORT[/DB]``. What they share
is here: checking the URL, declaring the option (the runner lets two services
declare it when both declarations are the same), and :class:`RedisLink`, which
keeps a client connected for the life of the service.

coredis (the client, an optional dependency: ``pip install 'trionet[redis]'``)
runs on Trio natively, but a client only works inside ``async with``: its
connection pool is a task group. So a service holds the client in one
long-lived task (its :meth:`~trionet.Service.run_background`), and
:meth:`RedisLink.run` is that task's loop: connect, run the service's
*session* until Redis fails, then wait and connect again, with a back-off
from 0.1 s doubling to 5 s. An outage is logged once when it starts and once
when it ends, however many attempts fail in between; the service keeps
serving from its local state meanwhile.
"""

from __future__ import annotations

import importlib.util
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from ._metrics import redis_reporter

if TYPE_CHECKING:
    import coredis

__all__ = [
    "RedisLink",
    "add_redis_argument",
    "check_redis_url",
    "redis_errors",
    "validate_redis_url",
]

log = logging.getLogger("trionet")

#: Seconds before the first reconnection attempt; doubled after each failure.
BACKOFF_FIRST: Final = 0.1
#: The longest wait between two attempts.
BACKOFF_MAX: Final = 5.0
#: Seconds a connection attempt may take (an unreachable host never answers).
CONNECT_TIMEOUT: Final = 2.0

#: What ``--help`` says of ``--redis`` (chat and guess must declare it alike).
_HELP: Final = (
    "share state through the Redis at URL (redis://HOST:PORT[/DB]): every process "
    "started with the same URL serves one chat room and one set of guess STATS, "
    "and --workers above 1 is allowed (default: off, state lives in this process)"
)


def check_redis_url(url: str) -> str:
    """Return ``url`` if it is ``redis://HOST[:PORT][/DB]``; ``ValueError`` saying why not.

    Also checks that the Redis client is installed, so a missing package is
    one clear line at start-up, not a traceback on the first connection.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    path = parts.path.lstrip("/")
    if (
        parts.scheme != "redis"
        or not parts.hostname
        or port == -1
        or (path and not (path.isascii() and path.isdigit()))
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"--redis needs a URL like redis://HOST:PORT[/DB], got {url!r}")
    if importlib.util.find_spec("coredis") is None:
        raise ValueError("--redis needs the coredis package: pip install 'trionet[redis]'")
    return url


def validate_redis_url(inst: Any, attr: Any, url: str | None) -> None:
    """An attrs validator for a service's ``redis`` field (``None``: off)."""
    if url is not None:
        check_redis_url(url)


def add_redis_argument(group: Any) -> None:
    """Declare ``--redis URL`` on a service's option group (same words for every service)."""
    group.add_argument("--redis", metavar="URL", default=None, help=_HELP)


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "Redis is unreachable or failed", not a bug of ours."""
    import coredis.exceptions

    return (coredis.exceptions.RedisError, OSError, trio.TooSlowError, trio.BrokenResourceError)


def _only(group: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """True if ``group`` is one of ``kinds``, or an exception group made only of them."""
    if isinstance(group, BaseExceptionGroup):
        return all(_only(e, kinds) for e in group.exceptions)
    return isinstance(group, kinds)


#: A session: given a connected client and ``ready`` (call it once set up),
#: works until Redis fails (it raises) or the link is cancelled.
Session = Callable[["coredis.Redis[str]", Callable[[], None]], Awaitable[None]]


class RedisLink:
    """A Redis client kept connected for a service, reconnecting by itself.

    Args:
      url: ``redis://HOST:PORT[/DB]`` (see :func:`check_redis_url`).
      who: the service's name, for the log (``chat: Redis ... unreachable``).
    """

    def __init__(self, url: str, who: str) -> None:
        self.url = url
        self.who = who
        #: Is a session running on a live connection right now?
        self.up = False
        self._outage = False  # logged as started, not yet as over
        # The server's readiness and metrics (found when the link starts).
        self._report: Callable[[str, bool], None] | None = None

    def _set_up(self, up: bool) -> None:
        changed = up != self.up
        self.up = up
        if changed and self._report is not None:
            self._report(self.who, up)

    def client(self) -> coredis.Redis[str]:
        """A new client for :attr:`url` (enter it with ``async with`` before use)."""
        import coredis

        return coredis.Redis.from_url(
            self.url,
            decode_responses=True,
            connect_timeout=CONNECT_TIMEOUT,
            # Our own deadlines bound each call (a blocking XREAD waits for
            # seconds on purpose): no read timeout underneath them.
            stream_timeout=None,
        )

    def _down(self, exc: BaseException) -> None:
        self._set_up(False)
        if not self._outage:
            self._outage = True
            log.warning(
                "%s: Redis at %s unreachable (%s): serving this process's clients alone, "
                "reconnecting in the background",
                self.who,
                self.url,
                _reason(exc),
            )

    async def run(self, session: Session, *, task_status: trio.TaskStatus[None]) -> None:
        """Connect and run ``session`` until cancelled, reconnecting after each failure.

        ``task_status.started()`` is called when the first session calls
        ``ready``, or when the first attempt fails: a service starts even if
        Redis is down (degraded), rather than block its start-up.
        """
        started = False
        self._report = redis_reporter()
        self.up = False
        if self._report is not None:
            self._report(self.who, False)  # not ready until the first session is

        def ready() -> None:
            nonlocal started
            self._set_up(True)
            if self._outage:
                self._outage = False
                log.info("%s: Redis at %s reachable again", self.who, self.url)
            if not started:
                started = True
                task_status.started()

        expected = redis_errors()
        delay = BACKOFF_FIRST
        while True:
            try:
                async with self.client() as client:
                    with trio.fail_after(CONNECT_TIMEOUT):
                        await client.ping()
                    delay = BACKOFF_FIRST
                    await session(client, ready)
            except Exception as exc:  # (an ExceptionGroup too; never Cancelled)
                if _only(exc, expected):
                    self._down(exc)
                else:
                    # A bug, not an outage: show it, but keep the service up.
                    self._set_up(False)
                    log.exception("%s: the Redis link failed; reconnecting", self.who)
            finally:
                self._set_up(False)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)


def _reason(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__
