"""Redis for services that share state across processes: ``--redis URL`` and a lasting link.

Chat and guess both take ``--redis URL`` (``redis://[:PASSWORD@]HOST:PORT[/DB]``,
or ``rediss://`` for TLS, with ``--redis-cafile FILE`` to trust a private
certificate authority). What they share is here: checking the URL,
declaring the options (the runner lets two services declare them when both
declarations are the same), and :class:`RedisLink`, which keeps a client
connected for the life of the service.

coredis (the client, an optional dependency: ``pip install 'trionet[redis]'``)
runs on Trio natively, but a client only works inside ``async with``: its
connection pool is a task group. So a service holds the client in one
long-lived task (its :meth:`~trionet.Service.run_background`), and
:meth:`RedisLink.run` is that task's loop: connect, run the service's
*session* until Redis fails, then wait and connect again, with a back-off
from 0.1 s doubling to a bound. An outage is logged once when it starts
(with the reason) and once when it ends (with how long it lasted, and what
the service says it could not do meanwhile), however many attempts fail in
between: coredis's own retries are off (the link retries) and its lines
about lost connections are filtered out (:class:`_QuietCoredis`).

The password never reaches the log: every line names the URL as
:func:`shown_url` gives it (``redis://:***@HOST:PORT``).
"""

from __future__ import annotations

import importlib.util
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from ._metrics import redis_reporter
from ._server import StartupError

if TYPE_CHECKING:
    import coredis

__all__ = [
    "RedisLink",
    "RedisRefused",
    "add_redis_argument",
    "check_redis_url",
    "redis_errors",
    "shown_url",
    "validate_redis_url",
]

log = logging.getLogger("trionet")

#: Seconds before the first reconnection attempt; doubled after each failure.
BACKOFF_FIRST: Final = 0.1
#: The longest wait between two attempts (a service may ask for less).
BACKOFF_MAX: Final = 5.0
#: Seconds a connection attempt may take (an unreachable host never answers).
CONNECT_TIMEOUT: Final = 2.0
#: Connections a link's client keeps to Redis at most.
MAX_CONNECTIONS: Final = 4

#: What ``--help`` says of ``--redis`` (chat and guess must declare it alike).
_HELP: Final = (
    "share state through the Redis at URL (redis://[:PASSWORD@]HOST:PORT[/DB], or "
    "rediss:// for TLS): every process started with the same URL serves one chat room "
    "and one set of guess STATS, and --workers above 1 is allowed (default: off, state "
    "lives in this process)"
)
_CAFILE_HELP: Final = (
    "with a rediss:// --redis URL: trust the certificate authority in this PEM file "
    "(default: the system's)"
)
_URL_FORM: Final = "redis://[:PASSWORD@]HOST:PORT[/DB] (or rediss://)"


def check_redis_url(url: str) -> str:
    """``url`` if it is ``redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB]``, else ``ValueError``.

    Also checks that the Redis client is installed, so a missing package is
    one clear line at start-up, not a traceback on the first connection. The
    error never quotes a password.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    path = parts.path.lstrip("/")
    if (
        parts.scheme not in ("redis", "rediss")
        or not parts.hostname
        or port == -1
        or (path and not (path.isascii() and path.isdigit()))
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"--redis needs a URL like {_URL_FORM}, got {shown_url(url)!r}")
    if importlib.util.find_spec("coredis") is None:
        raise ValueError("--redis needs the coredis package: pip install 'trionet[redis]'")
    return url


def shown_url(url: str) -> str:
    """``url`` fit for a log line: any password replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


def validate_redis_url(inst: Any, attr: Any, url: str | None) -> None:
    """An attrs validator for a service's ``redis`` field (``None``: off)."""
    if url is not None:
        check_redis_url(url)


def validate_redis_cafile(inst: Any, attr: Any, cafile: str | None) -> None:
    """An attrs validator for ``redis_cafile``: only with ``rediss://``, and readable."""
    if cafile is None:
        return
    url = getattr(inst, "redis", None)
    if url is None or urllib.parse.urlsplit(url).scheme != "rediss":
        raise ValueError("--redis-cafile needs a rediss:// --redis URL (TLS to Redis)")
    try:
        ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--redis-cafile {cafile}: {exc}") from None


def add_redis_argument(group: Any) -> None:
    """Declare ``--redis URL`` and ``--redis-cafile FILE`` (same words for every service)."""
    group.add_argument("--redis", metavar="URL", default=None, help=_HELP)
    group.add_argument("--redis-cafile", metavar="FILE", default=None, help=_CAFILE_HELP)


def redis_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "Redis is unreachable or failed", not a bug of ours."""
    import coredis.exceptions

    return (coredis.exceptions.RedisError, OSError, trio.TooSlowError, trio.BrokenResourceError)


def _only(group: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """True if ``group`` is one of ``kinds``, or an exception group made only of them."""
    if isinstance(group, BaseExceptionGroup):
        return all(_only(e, kinds) for e in group.exceptions)
    return isinstance(group, kinds)


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc`` (an exception group, or its causes)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None


class _QuietCoredis(logging.Filter):
    """Drops coredis's own lines about connections lost or refused.

    They repeat on every attempt during an outage (one with a stray
    ``NoneType: None`` traceback); the link logs the outage itself, once.
    """

    _NOISE: Final = ("Connection closed unexpectedly", "Connection attempt failed", "Retry attempt")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not message.startswith(self._NOISE)


_QUIET: Final = _QuietCoredis()


class RedisRefused(StartupError):
    """Redis refused this service (a wrong or missing password): it does not start."""

    def __init__(self, service: str, url: str, reason: str) -> None:
        OSError.__init__(self, f"cannot start {service}: the Redis at {shown_url(url)} {reason}")
        self.service = service


#: A session: given a connected client and ``ready`` (call it once set up),
#: works until Redis fails (it raises) or the link is cancelled.
Session = Callable[["coredis.Redis[str]", Callable[[], None]], Awaitable[None]]


class RedisLink:
    """A Redis client kept connected for a service, reconnecting by itself.

    Args:
      url: see :func:`check_redis_url`.
      who: the service's name, for the log (``chat: Redis ... unreachable``).
      cafile: with ``rediss://``: the certificate authority to trust
        (``None``: the system's).
      backoff_max: the longest wait between two attempts, in seconds.
      name: the connections' name in Redis (``CLIENT LIST``), if any; a
        callable, asked at each connection (chat numbers its sessions).
      note: what the service has to say when the link is back (``""``:
        nothing), appended to that log line.
    """

    def __init__(
        self,
        url: str,
        who: str,
        *,
        cafile: str | None = None,
        backoff_max: float = BACKOFF_MAX,
        name: Callable[[], str] | None = None,
        note: Callable[[], str] | None = None,
    ) -> None:
        self.url = url
        #: The URL as the log shows it (no password).
        self.shown = shown_url(url)
        self.who = who
        self.cafile = cafile
        self.backoff_max = backoff_max
        self._name = name
        self._note = note
        #: Is a session running on a live connection right now?
        self.up = False
        self._outage: float | None = None  # when it started (logged), if one is going on
        logging.getLogger("coredis").addFilter(_QUIET)
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
        from coredis.retry import NoRetryPolicy

        extra: dict[str, Any] = {}
        if urllib.parse.urlsplit(self.url).scheme == "rediss":
            extra["ssl_context"] = ssl.create_default_context(cafile=self.cafile)
        return coredis.Redis.from_url(
            self.url,
            decode_responses=True,
            connect_timeout=CONNECT_TIMEOUT,
            # Our own deadlines bound each call (a blocking XREAD waits for
            # seconds on purpose): no read timeout underneath them.
            stream_timeout=None,
            # The link reconnects (and logs it once): no retries underneath.
            retry_policy=NoRetryPolicy(),
            # coredis multiplexes calls on a connection; without a bound a
            # burst of concurrent calls (50 members joining at once) opens a
            # connection each, every one a handshake. A blocking XREAD holds
            # one for itself: a few are plenty.
            max_connections=MAX_CONNECTIONS,
            client_name=self._name() if self._name is not None else None,
            **extra,
        )

    def _down(self, exc: BaseException) -> None:
        self._set_up(False)
        if self._outage is None:
            self._outage = trio.current_time()
            log.warning(
                "%s: Redis at %s unreachable (%s): serving this process's clients alone, "
                "reconnecting in the background",
                self.who,
                self.shown,
                _reason(exc),
            )

    async def run(self, session: Session, *, task_status: trio.TaskStatus[None]) -> None:
        """Connect and run ``session`` until cancelled, reconnecting after each failure.

        ``task_status.started()`` is called when the first session calls
        ``ready``, or when the first attempt fails: a service starts even if
        Redis is down (degraded), rather than block its start-up. A Redis
        that refuses the password on the first attempt raises
        :exc:`RedisRefused` instead: that is a mistake to fix, not an outage.
        """
        import coredis.exceptions

        started = False
        self._report = redis_reporter()
        self.up = False
        if self._report is not None:
            self._report(self.who, False)  # not ready until the first session is

        def ready() -> None:
            nonlocal started
            self._set_up(True)
            if self._outage is not None:
                lasted = trio.current_time() - self._outage
                self._outage = None
                note = self._note() if self._note is not None else ""
                log.info(
                    "%s: Redis at %s reachable again after %.1fs%s",
                    self.who,
                    self.shown,
                    lasted,
                    f"; {note}" if note else "",
                )
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
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    # Cancelled: a call that failed because of it (coredis
                    # closes a connection when a blocking call is cancelled)
                    # must not turn the cancellation into an error.
                    if isinstance(exc, BaseExceptionGroup):
                        cancelled, rest = exc.split(trio.Cancelled)
                        if cancelled is not None and rest is not None and _only(rest, expected):
                            raise cancelled from None
                    raise
                refused = _find(exc, coredis.exceptions.AuthenticationError)
                if refused is not None and not started:
                    if isinstance(refused, coredis.exceptions.AuthenticationRequiredError):
                        why = "asks for a password: give it in the URL (redis://:PASSWORD@...)"
                    else:
                        why = f"refused the password ({refused})"
                    raise RedisRefused(self.who, self.url, why) from None
                if _only(exc, expected):
                    self._down(refused or exc)
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
            delay = min(delay * 2, self.backoff_max)


def _reason(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    # coredis wraps the socket's error ("Unable to establish a connection to
    # HOST:PORT"): the cause says why ("Connection refused").
    cause = exc.__cause__
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause):
        text = f"{text}: {cause}"
    return text
