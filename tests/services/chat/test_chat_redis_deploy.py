"""``--redis`` as hosted Redis needs it: a password, TLS (``rediss://``, ``--redis-cafile``).

Real processes on a real redis-server started with ``--requirepass`` or
``--tls-port`` (certificates from ``trustme``, tests/conftest.py). The
password must never reach a log line, through an outage too; a wrong one
stops the process at start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio

from tests.conftest import Opened, _free_port
from tests.services.chat.test_chat_redis import _connect
from trionet import StartupError
from trionet._redis import check_redis_url, shown_url
from trionet._runner import build_services
from trionet.services.chat.server import ChatService

PASSWORD = "pw-7Hq2xZ"


async def _two_talk(serve: Callable[..., Any], opened: Opened, *args: str) -> list[Any]:
    """Two chat processes started with ``args``; their members talk both ways, and leave."""
    processes = [serve("chat", "--port", "0", *args) for _ in range(2)]
    pa, pb = (p.port("chat") for p in processes)
    with trio.fail_after(60):
        alice = await _connect(opened, pa, "alice")
        bob = await _connect(opened, pb, "bob")
        await alice.expect("JOIN bob")
        await bob.send_line("hello over redis")
        await alice.expect("MSG bob hello over redis")
        await alice.send_line("hi bob")
        got = await bob.receive_line()
        while got != "MSG alice hi bob":  # (bob may first hear alice's JOIN)
            assert got == "JOIN alice", got
            got = await bob.receive_line()
    await alice.aclose()
    await bob.aclose()
    return processes


def test_urls_with_a_password_and_tls_are_accepted_and_shown_without_it() -> None:
    url = f"redis://:{PASSWORD}@10.0.0.5:6380/2"
    assert check_redis_url(url) == url
    assert shown_url(url) == "redis://:***@10.0.0.5:6380/2"
    assert shown_url("rediss://user:pw@h:1") == "rediss://user:***@h:1"
    assert shown_url("redis://h:1/0") == "redis://h:1/0"
    with pytest.raises(ValueError) as info:
        check_redis_url(f"redis://:{PASSWORD}@h:port")
    assert PASSWORD not in str(info.value)
    (chat,) = build_services(["chat", "--redis", "rediss://h:1"])
    assert isinstance(chat, ChatService) and chat.redis_cafile is None
    # --redis-cafile means TLS to Redis: with redis:// it would be ignored.
    with pytest.raises(StartupError, match="--redis-cafile needs a rediss://"):
        build_services(["chat", "--redis", "redis://h:1", "--redis-cafile", "/etc/hostname"])
    with pytest.raises(StartupError, match="--redis-liveness needs --redis"):
        build_services(["chat", "--redis-liveness", "2"])
    with pytest.raises(StartupError, match="--redis-cafile /nonexistent"):
        build_services(["chat", "--redis", "rediss://h:1", "--redis-cafile", "/nonexistent"])


async def test_a_password_protected_redis(
    redis_factory: Callable[..., Any], serve: Callable[..., Any], opened: Opened
) -> None:
    redis = redis_factory("--requirepass", PASSWORD)
    url = f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/3"
    a, b = await _two_talk(serve, opened, "--redis", url)
    # An outage and its recovery are logged with the URL: still no password.
    redis.kill()
    a.wait_for("unreachable")
    redis.start()
    a.wait_for("reachable again", timeout=30)
    for process in (a, b):
        assert process.stop() == 0
        assert process.count("redis://:\\*\\*\\*@127.0.0.1") >= 1
        assert not [line for line in process.lines if PASSWORD in line]


@pytest.mark.parametrize("service", ["chat", "guess"])
def test_a_wrong_password_stops_the_start(
    redis_factory: Callable[..., Any], serve: Callable[..., Any], service: str
) -> None:
    redis = redis_factory("--requirepass", PASSWORD)
    wrong = "not-the-pw-x9"
    for url, more in (
        (f"redis://:{wrong}@127.0.0.1:{redis.port}", ()),
        (f"redis://127.0.0.1:{redis.port}", ()),
        # Workers: each fails the same way; the parent stops, not restarts them.
        (f"redis://:{wrong}@127.0.0.1:{redis.port}", ("--workers", "2")),
    ):
        process = serve(service, "--port", "0", "--redis", url, *more)
        assert process.proc.wait(30) == 1
        process.wait_for("<eof>")
        text = "\n".join(process.lines)
        assert f"cannot start {service}: the Redis at" in text
        assert "refused the password" in text or "asks for a password" in text
        assert wrong not in text and "Traceback" not in text


async def test_redis_over_tls(
    redis_factory: Callable[..., Any], serve: Callable[..., Any], tls_files: Any, opened: Opened
) -> None:
    tls_port = _free_port()
    redis_factory(
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        tls_files.cert,
        "--tls-key-file",
        tls_files.key,
        "--tls-ca-cert-file",
        tls_files.ca,
        "--tls-auth-clients",
        "no",
    )
    url = f"rediss://localhost:{tls_port}"
    for process in await _two_talk(serve, opened, "--redis", url, "--redis-cafile", tls_files.ca):
        assert process.count("unreachable") == 0
        assert process.stop() == 0
    # Without trusting the test CA, the certificate is refused: degraded, and said why.
    untrusting = serve("chat", "--port", "0", "--redis", url)
    untrusting.wait_for("unreachable .*certificate verify failed")
    assert untrusting.stop() == 0
