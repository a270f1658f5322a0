"""Metrics and health checks: ``--metrics-port`` serving /metrics, /healthz, /readyz.

In memory: the counters a server keeps after connections (trionet.testing),
readiness as the server starts and drains, the request parser. Over real
processes: a scrape that ``promtool check metrics`` accepts, one scrape of a
``--workers`` parent covering every worker (a killed one included), Redis
readiness through an outage, and a real ``prometheus`` server scraping
trionet and answering a query with the value.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import trio
import trio.testing
from conftest import RedisServer, Serve, TLSFiles

from trionet import Connection, Server, Service
from trionet._metrics import MAX_END_REASONS, Metrics, read_retrying
from trionet._monitor import BadRequest, parse_request, serve_monitor
from trionet.services.chat.server import ChatService
from trionet.services.echo.server import EchoService
from trionet.testing import MemoryListener, open_memory_server

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


# -- in memory -------------------------------------------------------------------------


async def test_connections_are_counted_when_they_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    async with open_memory_server(EchoService(), metrics=metrics) as server:
        for _ in range(3):
            client = await server.connect()
            await client.send(b"hello")
            assert await client.receive_exactly(5) == b"hello"
            assert metrics.value("trionet_connections_open", service="echo") == 1
            await trio.sleep(2)  # (fake time: a 2-second connection)
            await client.send_eof()
            await client.expect_closed()
        await trio.testing.wait_all_tasks_blocked()
        assert metrics.value("trionet_connections_open", service="echo") == 0
        assert metrics.value("trionet_connections_total", service="echo", end="eof") == 3
        assert metrics.value("trionet_bytes_received_total", service="echo") == 15
        assert metrics.value("trionet_bytes_sent_total", service="echo") == 15
        count = metrics.value("trionet_connection_duration_seconds_count", service="echo")
        assert count == 3
        # Each lasted 2 s: in the (1, 5] bucket, not in (0.5, 1].
        assert (
            metrics.value("trionet_connection_duration_seconds_bucket", service="echo", le="1.0")
            == 0
        )
        assert (
            metrics.value("trionet_connection_duration_seconds_bucket", service="echo", le="5.0")
            == 3
        )
        held = await server.connect()
        await held.send(b"x")
        await held.receive_exactly(1)
    # Shutdown ended the last one.
    assert metrics.value("trionet_connections_total", service="echo", end="shutdown") == 1


class Labelled(Service):
    """A user's service with end reasons of its own: every line names one."""

    name: ClassVar[str] = "labelled"

    async def handle(self, conn: Connection) -> None:
        line = await conn.receive_line()
        conn.end_reason = line


async def test_a_users_end_reasons_are_counted_but_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    total = 2 * (MAX_END_REASONS + 5)  # "done" and MAX + 5 reasons of a kind
    async with open_memory_server(Labelled(), metrics=metrics) as server:
        for i in range(total):
            client = await server.connect()
            await client.send_line("done" if i % 2 else f"odd-{i}")
            await client.expect_closed()
        await trio.testing.wait_all_tasks_blocked()
    ends = {
        labels["end"]: value
        for labels, value in (
            (sample.labels, sample.value)
            for metric in metrics.registry.collect()
            for sample in metric.samples
            if sample.name == "trionet_connections_total"
        )
    }
    assert len(ends) == MAX_END_REASONS + 1  # and "other"
    assert ends["done"] == total // 2
    assert sum(ends.values()) == total
    assert ends["other"] == 6  # the reasons past the first 32


async def test_turned_away_clients_are_counted_by_reason(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    service = EchoService(max_connections=3, max_per_address=1)
    async with open_memory_server(service, metrics=metrics) as server:
        a = await server.connect(peer="10.0.0.1:1000")
        again = await server.connect(peer="10.0.0.1:1001")  # over its address's 1
        await again.expect_closed()
        b = await server.connect(peer="10.0.0.2:1000")
        c = await server.connect(peer="10.0.0.3:1000")
        full = await server.connect(peer="10.0.0.4:1000")  # over the 3 in all
        await full.expect_closed()
        await trio.testing.wait_all_tasks_blocked()
        assert metrics.value("trionet_turned_away_total", service="echo", reason="busy") == 1
        assert metrics.value("trionet_turned_away_total", service="echo", reason="per-address") == 1
        assert metrics.value("trionet_connections_open", service="echo") == 3
        for client in (a, b, c):
            await client.aclose()


async def test_a_failed_tls_handshake_is_counted(
    autojump_clock: trio.testing.MockClock, tls_files: TLSFiles
) -> None:
    metrics = Metrics()
    service = EchoService(tls_cert=tls_files.cert, tls_key=tls_files.key)
    async with open_memory_server(service, metrics=metrics) as server:
        client = await server.connect()  # plain text to a TLS service
        await client.send(b"GET / HTTP/1.0\r\n\r\n")
        await client.expect_closed()
        good = await server.connect(tls=tls_files.client_context())
        await good.send(b"hi")
        assert await good.receive_exactly(2) == b"hi"
        await good.aclose()
        await trio.testing.wait_all_tasks_blocked()
    assert metrics.value("trionet_tls_handshake_failures_total", service="echo") == 1
    assert metrics.value("trionet_connections_total", service="echo", end="eof") == 1


async def test_chat_members_messages_and_evictions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    chat = ChatService(rate=0, sendq=4096)
    async with open_memory_server(chat, metrics=metrics, lockstep=True) as server:
        ann, bob = await server.connect(), await server.connect()
        for client, nick in ((ann, "ann"), (bob, "bob")):
            await client.expect("WELCOME trionet chat — send /nick <name> to join")
            await client.send_line(f"/nick {nick}")
            await client.expect(f"OK nick {nick}")
        await ann.expect("JOIN bob")
        await ann.send_line("hello")
        await bob.expect("MSG ann hello")
        await ann.send_line("/msg bob psst")
        await bob.expect("PRIV ann psst")
        # bob stops reading: ann's traffic piles up for him until he is evicted.
        big = "x" * 1000
        for _ in range(10):
            await ann.send_line(big)
        await ann.expect("LEAVE bob slow-consumer")
        text = metrics.render(server.server.services).decode()
    assert 'trionet_chat_members{service="chat"} 1.0' in text
    assert 'trionet_chat_evictions_total{service="chat"} 1.0' in text
    # hello, psst and the ten big lines.
    assert 'trionet_chat_messages_total{service="chat"} 12.0' in text


@attrs.define(eq=False)
class Held(Service):
    """A line service that works on its one request until ``release`` is set."""

    name: ClassVar[str] = "held"
    release: trio.Event = attrs.field(factory=trio.Event)

    async def handle(self, conn: Connection) -> None:
        async for _line in conn:
            with conn.busy():
                await self.release.wait()
            await conn.send_line("done")


async def test_readiness_follows_start_and_drain(autojump_clock: trio.testing.MockClock) -> None:
    server = Server([Held()], listeners={"held": [MemoryListener()]}, grace=30)
    assert server.readiness() == "starting"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert server.readiness() is None
        server.shutdown()
        assert server.readiness() == "draining: shutting down"


# -- the request parser (sans-I/O) --------------------------------------------------------


def test_parse_request_accepts_a_scrape() -> None:
    head = (
        b"GET /metrics?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nUser-Agent: Prometheus/2.42"
        b"\r\nAccept: text/plain"
    )
    request = parse_request(head)
    assert (request.method, request.path, request.keep_alive) == ("GET", "/metrics", True)
    closing = parse_request(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close")
    assert (closing.method, closing.keep_alive) == ("HEAD", False)
    assert not parse_request(b"GET /readyz HTTP/1.0").keep_alive


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /metrics HTTP/1.1", 400),  # no Host
        (b"POST /metrics HTTP/1.1\r\nHost: x", 405),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nHost: y", 400),
        (b"GET  /metrics HTTP/1.1\r\nHost: x", 400),
        (b"GET metrics HTTP/1.1\r\nHost: x", 400),
        (b"GET /metrics HTTP/2\r\nHost: x", 400),
        (b"GET /metrics HTTP/1.1\r\nHost x", 400),
        (b"GET /metrics HTTP/1.1\r\n folded: header", 400),
    ],
)
def test_parse_request_refuses(head: bytes, status: int) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(head)
    assert caught.value.status == status


# -- the endpoint over a real socket --------------------------------------------------------


async def _http(port: int, raw: bytes) -> bytes:
    """Send ``raw`` and read until the server closes (bounded)."""
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
            return data


async def test_endpoint_answers_health_readiness_and_errors() -> None:
    state: dict[str, str | None] = {"why": "starting"}

    async def render() -> tuple[bytes, str]:
        if state["why"] == "broken":
            raise ValueError("half-written file")
        return b"# metrics\n", "text/plain; version=0.0.4"

    async def readiness() -> str | None:
        if state["why"] == "broken":
            raise ValueError("half-written file")
        return state["why"]

    async with trio.open_nursery() as nursery:
        ((_, port), *_) = await nursery.start(serve_monitor, "127.0.0.1", 0, render, readiness)
        # Two requests on one kept-alive connection, then one that closes it.
        reply = await _http(
            port,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        first, second, third = reply.split(b"HTTP/1.1 ")[1:]
        assert first.startswith(b"200 OK\r\n") and first.endswith(b"\r\n\r\nok\n")
        assert second.startswith(b"503 ") and second.endswith(b"not ready: starting\n")
        assert third.startswith(b"200 OK\r\n") and b"version=0.0.4" in third
        assert third.endswith(b"# metrics\n") and b"Connection: close" in third
        state["why"] = None
        reply = await _http(port, b"GET /readyz HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"ready\n")
        # Errors close the connection.
        assert (await _http(port, b"GET /nope HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        assert (await _http(port, b"DELETE / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 405 ")
        assert (await _http(port, b"hello\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        huge = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 10000 + b"\r\n\r\n"
        assert (await _http(port, huge)).startswith(b"HTTP/1.1 431 ")
        head = await _http(port, b"HEAD /healthz HTTP/1.0\r\n\r\n")
        assert head.endswith(b"\r\n\r\n") and b"Content-Length: 3" in head
        # A source that fails is an answer too, never a dropped request.
        state["why"] = "broken"
        reply = await _http(port, b"GET /readyz HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 503 ") and b"half-written file" in reply
        reply = await _http(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 500 ")
        nursery.cancel_scope.cancel()


async def test_readyz_is_503_while_draining() -> None:
    """A busy connection keeps the server draining after shutdown(): /readyz says so."""
    metrics = Metrics()
    held = Held()
    async with open_memory_server(held, grace=60, metrics=metrics) as server:

        async def render() -> tuple[bytes, str]:
            return metrics.render(), "text/plain"

        async def readiness() -> str | None:
            return server.server.readiness()

        async with trio.open_nursery() as nursery:
            ((_, port), *_) = await nursery.start(serve_monitor, "127.0.0.1", 0, render, readiness)
            ready = b"GET /readyz HTTP/1.0\r\n\r\n"
            assert (await _http(port, ready)).startswith(b"HTTP/1.1 200 ")
            client = await server.connect()
            await client.send_line("work")
            await trio.testing.wait_all_tasks_blocked()
            assert metrics.value("trionet_ready") == 1
            server.shutdown()
            reply = await _http(port, ready)
            assert reply.startswith(b"HTTP/1.1 503 ")
            assert reply.endswith(b"not ready: draining: shutting down\n")
            assert metrics.value("trionet_ready") == 0
            held.release.set()
            await client.expect("done")
            nursery.cancel_scope.cancel()


# -- real processes ---------------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, from the text format."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


def _promtool(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


def _echo_round(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        assert got == payload


@pytest.mark.skipif(not os.path.exists(PROMTOOL), reason="promtool is not installed")
def test_a_scrape_passes_promtool_and_counts_connections(
    serve: Callable[..., Serve], tls_files: TLSFiles
) -> None:
    p = serve(
        "echo",
        "calc",
        "--port",
        "echo=0",
        "--port",
        "calc=0",
        "--metrics-port",
        "0",
        "--tls-cert",
        tls_files.cert,
        "--tls-key",
        tls_files.key,
    )
    metrics_port = int(p.wait_for(r"metrics listening on 127\.0\.0\.1:(\d+)")[0][1])
    echo = p.port("echo")
    context = tls_files.client_context()
    for _ in range(2):
        with (
            socket.create_connection(("127.0.0.1", echo), timeout=20) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as s,
        ):
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
            s.unwrap()  # close_notify: the server reads end of input
    with socket.create_connection(("127.0.0.1", echo), timeout=20) as s:
        s.sendall(b"not tls\r\n\r\n")  # a failed handshake
        with contextlib.suppress(ConnectionResetError):  # an alert or a reset
            s.recv(100)
    p.wait_for(r"tls handshake failed")
    p.wait_for(r"echo 127\.0\.0\.1:\d+ #\S+ end=", 2)
    assert _get(metrics_port, "/healthz") == (200, "ok\n")
    assert _get(metrics_port, "/readyz") == (200, "ready\n")
    status, text = _get(metrics_port, "/metrics")
    assert status == 200
    checked = _promtool(text)
    assert checked.returncode == 0 and checked.stdout == checked.stderr == "", checked
    values = _samples(text)
    assert values['trionet_connections_total{end="eof",service="echo"}'] == 2, p.lines
    assert values['trionet_bytes_received_total{service="echo"}'] == 8
    assert values['trionet_tls_handshake_failures_total{service="echo"}'] == 1
    assert values['trionet_connections_open{service="calc"}'] == 0
    assert p.stop() == 0


def test_metrics_port_in_use_stops_the_process(serve: Callable[..., Serve]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = serve("echo", "--port", "0", "--metrics-port", str(port))
        assert p.proc.wait(30) == 1
        p.wait_for(rf"cannot start metrics on 127\.0\.0\.1:{port}: address already in use")


def test_one_scrape_of_the_parent_covers_every_worker(serve: Callable[..., Serve]) -> None:
    p = serve("echo", "--port", "0", "--workers", "2", "--metrics-port", "0")
    metrics_port = int(p.wait_for(r"metrics listening on 127\.0\.0\.1:(\d+)")[0][1])
    echo = p.port("echo")
    pids = [int(m[1]) for m in p.wait_for(r"worker \d+ started \(pid (\d+)\)", 2)]
    deadline = time.monotonic() + 60
    while _get(metrics_port, "/readyz")[0] != 200:
        assert time.monotonic() < deadline, "the workers never became ready"
        time.sleep(0.05)
    for _ in range(20):
        _echo_round(echo, b"0123456789")
    p.wait_for(r"end=eof", 20)
    # Kill one worker: its counts stay in the parent's figures.
    os.kill(pids[0], signal.SIGKILL)
    p.wait_for(rf"worker \d+ \(pid {pids[0]}\) died")
    p.wait_for(r"worker \d+ started \(pid (\d+)\)", 3)
    for _ in range(5):
        _echo_round(echo, b"abc")
    p.wait_for(r"end=eof", 25)
    status, text = _get(metrics_port, "/metrics")
    assert status == 200
    values = _samples(text)
    assert values['trionet_connections_total{end="eof",service="echo"}'] == 25
    assert values['trionet_bytes_received_total{service="echo"}'] == 20 * 10 + 5 * 3
    assert values['trionet_connection_duration_seconds_count{service="echo"}'] == 25
    assert values["trionet_worker_restarts_total"] == 1
    # The dead worker's live gauges are gone: at most the two live ones are ready.
    assert values["trionet_ready"] <= 2
    assert values['trionet_connections_open{service="echo"}'] == 0
    if os.path.exists(PROMTOOL):
        checked = _promtool(text)
        assert checked.returncode == 0 and checked.stdout == checked.stderr == "", checked
    # The workers' files are in the directory the parent named in their
    # environment; the parent removes it on the way out.
    with open(f"/proc/{pids[1]}/environ", "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    folder = env[b"PROMETHEUS_MULTIPROC_DIR"].decode()
    assert any(name.startswith("counter_") for name in os.listdir(folder))
    assert p.stop() == 0
    assert not os.path.exists(folder)


def wait_ready(port: int, expected: int) -> str:
    """Poll ``/readyz`` until it answers ``expected`` (bounded); its body."""
    deadline = time.monotonic() + 60
    while True:
        status, body = _get(port, "/readyz")
        if status == expected:
            return body
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.05)


def test_readyz_of_workers_follows_their_redis_links(
    serve: Callable[..., Serve], redis_server: RedisServer
) -> None:
    p = serve(
        "chat", "--port", "0", "--workers", "2", "--redis", redis_server.url, "--metrics-port", "0"
    )
    metrics_port = int(p.wait_for(r"metrics listening on 127\.0\.0\.1:(\d+)")[0][1])
    assert wait_ready(metrics_port, 200) == "ready\n"
    redis_server.kill()
    assert wait_ready(metrics_port, 503) == "not ready: Redis link down (chat)\n"
    redis_server.start()
    wait_ready(metrics_port, 200)
    values = _samples(_get(metrics_port, "/metrics")[1])
    assert values['trionet_redis_up{service="chat"}'] == 1
    # Stopped workers cannot finish: the parent stays draining, and says so.
    pids = [int(m[1]) for m in p.wait_for(r"worker \d+ started \(pid (\d+)\)", 2)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        p.signal(signal.SIGTERM)
        p.wait_for(r"SIGTERM received: stopping")
        assert _get(metrics_port, "/readyz") == (503, "not ready: draining: shutting down\n")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert p.stop() == 0


def test_readyz_follows_the_redis_link(
    serve: Callable[..., Serve], redis_server: RedisServer
) -> None:
    p = serve("chat", "--port", "0", "--redis", redis_server.url, "--metrics-port", "0")
    metrics_port = int(p.wait_for(r"metrics listening on 127\.0\.0\.1:(\d+)")[0][1])
    p.port("chat")
    wait_ready(metrics_port, 200)
    assert _samples(_get(metrics_port, "/metrics")[1])['trionet_redis_up{service="chat"}'] == 1
    redis_server.kill()
    assert wait_ready(metrics_port, 503) == "not ready: Redis link down (chat)\n"
    assert _samples(_get(metrics_port, "/metrics")[1])['trionet_redis_up{service="chat"}'] == 0
    time.sleep(3)  # retries pile up meanwhile
    redis_server.start()
    wait_ready(metrics_port, 200)
    assert p.stop() == 0
    # The outage is two lines of trionet's own, whatever coredis said in between,
    # and coredis's own lines are each one line, never a traceback.
    assert p.count(r"Redis at .* unreachable") == 1
    assert p.count(r"Redis at .* reachable again") == 1
    assert p.count(r"^Traceback|NoneType: None") == 0
    # The link does its own reconnecting (coredis's retries are off), and
    # whatever coredis still says shows at most once per kind of message,
    # plus a count when the burst ended (the burst limiter: test_logs.py).
    said = [line for line in p.lines if "coredis" in line]
    summaries = [line for line in said if "more time(s) over" in line]
    starts = [line.split("coredis", 1)[1] for line in said if line not in summaries]
    assert len(starts) == len({re.sub(r"\d+", "#", text) for text in starts}), said
    assert len(summaries) <= len(starts)


@pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="prometheus is not installed")
def test_a_real_prometheus_scrapes_trionet(serve: Callable[..., Serve], tmp_path: Path) -> None:
    p = serve("echo", "--port", "0", "--metrics-port", "0")
    metrics_port = int(p.wait_for(r"metrics listening on 127\.0\.0\.1:(\d+)")[0][1])
    for _ in range(3):
        _echo_round(p.port("echo"), b"x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        prom_port = s.getsockname()[1]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: trionet\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    prom = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = urllib.parse.urlencode(
            {"query": 'trionet_connections_total{service="echo",end="eof"}'}
        )
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?{query}"
        deadline = time.monotonic() + 120
        while True:
            assert prom.poll() is None, "prometheus exited"
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    answer = json.load(response)
                result = answer["data"]["result"]
                if result:
                    break
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "prometheus never had the value"
            time.sleep(0.5)
        (series,) = result
        assert series["metric"]["job"] == "trionet"
        assert float(series["value"][1]) == 3
    finally:
        prom.terminate()
        prom.wait(30)
    assert p.stop() == 0


def test_reading_the_workers_files_retries_a_file_half_made() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise struct.error("unpack_from requires a buffer of at least 4 bytes")
        return "read"

    assert read_retrying(flaky) == "read" and len(calls) == 3

    def broken() -> str:
        raise struct.error("still empty")

    with pytest.raises(struct.error):
        read_retrying(broken)
