"""PROXY protocol: the pure parser (properties with hypothesis), the server in
memory (the real client address drives the per-address cap and the logs; only
--proxy-from may send a header; a deadline), a real socket, and a real haproxy
in front (send-proxy-v2), plain and with TLS passed through.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import shutil
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import Serve, TLSFiles, _free_port
from hypothesis import given, settings
from hypothesis import strategies as st

import trionet
from trionet import Connection, Server, Service
from trionet._metrics import Metrics
from trionet._proxy import (
    MAX_HEADER,
    MAX_V2_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    address_allowed,
    parse_networks,
    parse_proxy_header,
)
from trionet.testing import Client, MemoryListener

# -- encoders (the test's own, from the specification) --------------------------------------


def v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, dst: str, sport: int, dport: int, *, command: int = 1, tlv: bytes = b"") -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + struct.pack("!HH", sport, dport) + tlv
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


# -- the parser ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    ports,
    ports,
    st.sampled_from([1, 2]),
    st.binary(max_size=40),
    st.binary(max_size=64),
)
def test_any_valid_header_parses_whole_and_leaves_what_follows(
    addresses: tuple[str, str], sport: int, dport: int, version: int, tlv: bytes, after: bytes
) -> None:
    src, dst = addresses
    raw = v1(src, dst, sport, dport) if version == 1 else v2(src, dst, sport, dport, tlv=tlv)
    header = parse_proxy_header(raw + after)
    assert header == ProxyHeader(version, len(raw), (src, sport), (dst, dport))
    # Fed a byte at a time, every proper prefix asks for more, never errs.
    for end in range(len(raw)):
        assert parse_proxy_header(raw[:end]) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=MAX_HEADER + 10))
def test_any_bytes_are_a_header_more_needed_or_one_clear_error(data: bytes) -> None:
    try:
        header = parse_proxy_header(data)
    except ProxyProtocolError:
        return
    if header is None:
        assert len(data) < MAX_HEADER  # bounded: nothing waits on more than that
    else:
        assert 0 < header.length <= len(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=30).filter(lambda b: b[:1] not in (b"P", b"\r")))
def test_anything_else_is_refused_at_the_first_byte(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError, match="no PROXY protocol header"):
        parse_proxy_header(data[:1])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
        (b"PROXZ", "no PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "line feed without a carriage return"),
        (b"PROXY " + b"x" * 120, "longer than 107 bytes"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "expected TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "::1 is not an IPv4 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad port '65536'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad port '\\+1'"),
        (b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n", "bad address '1.2.3.999'"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c", "unknown version 3"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c", "unknown command 2"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4), "addresses cut short"),
        (
            V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_PAYLOAD + 1),
            "is too many",
        ),
    ],
)
def test_bad_headers_say_why(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(data)


def test_headers_without_a_usable_address() -> None:
    # v1 UNKNOWN, v2 LOCAL (a health check), v2 over a unix socket.
    unknown = b"PROXY UNKNOWN whatever\r\n"
    assert parse_proxy_header(unknown) == ProxyHeader(1, len(unknown), None, None)
    local = v2("1.2.3.4", "5.6.7.8", 1, 2, command=0)
    assert parse_proxy_header(local) == ProxyHeader(2, len(local), None, None)
    unix = V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", 216) + bytes(216)
    assert parse_proxy_header(unix) == ProxyHeader(2, len(unix), None, None)
    assert ProxyHeader(2, 0, ("2001:db8::1", 443), None).peer == "[2001:db8::1]:443"


def test_networks() -> None:
    loopback = parse_networks("127.0.0.0/8, ::1")
    assert address_allowed("127.3.4.5", loopback)
    assert address_allowed("[::1]", loopback)
    assert address_allowed("::ffff:127.0.0.1", loopback)  # IPv4 seen through IPv6
    assert not address_allowed("10.0.0.1", loopback)
    assert not address_allowed(None, loopback)  # a unix socket, say
    assert not address_allowed("memory", loopback)
    with pytest.raises(ValueError, match="not an address or CIDR network: 'ten'"):
        parse_networks("10.0.0.0/8,ten")


# -- in memory ------------------------------------------------------------------------------------


class Whoami(Service):
    """Answers ``who`` with the peer the server sees; logs through ``conn.log``."""

    name = "whoami"

    async def handle(self, conn: Connection) -> None:
        conn.log.info("hello from the handler")
        async for line in conn:
            await conn.send_line(f"you are {conn.peer}" if line == "who" else f"ok {line}")


async def _server(nursery: trio.Nursery, **options: object) -> tuple[Server, MemoryListener]:
    listener = MemoryListener()
    server = Server([Whoami(proxy_protocol=True, **options)], listeners={"whoami": [listener]})
    await nursery.start(server.run)
    return server, listener


async def test_the_header_names_the_peer_for_the_handler_and_the_logs(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        server, listener = await _server(nursery)
        stream = await listener.connect("127.0.0.1:40000")  # the balancer
        # Header and request in one write: the request must not be lost.
        await stream.send_all(v1("203.0.113.7", "192.0.2.1", 5555, 7005) + b"who\nQUIT\n")
        client = Client(stream)
        await client.expect("you are 203.0.113.7:5555", "BYE")
        await client.expect_closed()
        server.shutdown()
    lines = [r.getMessage() for r in caplog.records]
    assert any("[whoami #" in m and "203.0.113.7:5555] hello from the handler" in m for m in lines)
    (access,) = [m for m in lines if "end=quit" in m]
    assert access.startswith("whoami 203.0.113.7:5555 #")


async def test_retiring_serves_a_connection_still_sending_its_header(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A connection accepted before a retirement but not yet a Connection (its
    PROXY header still to come) is served, not met with the shutdown's BYE."""
    async with trio.open_nursery() as nursery:
        server, listener = await _server(nursery)
        stream = await listener.connect("127.0.0.1:40000")
        await trio.testing.wait_all_tasks_blocked()  # accepted; waiting for its header
        server.retire(60)
        await trio.sleep(1)
        await stream.send_all(v1("203.0.113.7", "192.0.2.1", 5555, 7005) + b"who\nQUIT\n")
        client = Client(stream)
        await client.expect("you are 203.0.113.7:5555", "BYE")
        await client.expect_closed()
        ended = trio.current_time()
    # Once it was over, the retired server ended (not after the 60 s grace).
    assert trio.current_time() - ended < 1


async def test_the_per_address_cap_counts_real_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        server, listener = await _server(nursery, max_per_address=1)

        async def through_balancer(client_ip: str, port: int) -> Client:
            stream = await listener.connect("127.0.0.1:40000")
            await stream.send_all(v2(client_ip, "192.0.2.1", port, 7005))
            return Client(stream)

        a = await through_balancer("198.51.100.1", 1000)
        await a.send_line("x")
        await a.expect("ok x")
        b = await through_balancer("198.51.100.2", 1000)  # another client: served
        await b.send_line("y")
        await b.expect("ok y")
        again = await through_balancer("198.51.100.1", 1001)  # a's second: over the cap
        await again.expect("BYE busy")
        await again.expect_closed()
        server.shutdown()


async def test_a_connection_holds_its_slot_while_its_header_is_awaited(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        server, listener = await _server(nursery, max_connections=1)
        silent = await listener.connect("127.0.0.1:1")  # says nothing (yet)
        await trio.sleep(1)
        assert server.connection_counts() == {"whoami": 1}
        full = await listener.connect("127.0.0.1:2")
        await Client(full).expect("BYE busy")
        await Client(silent, timeout=60).expect_closed()  # its deadline passed
        assert server.connection_counts() == {"whoami": 0}
        later = await listener.connect("127.0.0.1:3")
        await later.send_all(v1("198.51.100.10", "192.0.2.1", 10, 7005) + b"who\n")
        await Client(later).expect("you are 198.51.100.10:10")
        server.shutdown()


async def test_a_header_from_elsewhere_is_refused_unread(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        server, listener = await _server(nursery, proxy_from="10.0.0.0/8")
        stream = await listener.connect("192.0.2.50:1234")  # not a balancer
        await stream.send_all(v1("127.0.0.1", "127.0.0.1", 1, 2) + b"who\n")
        await Client(stream).expect_closed()
        ok = await listener.connect("10.1.2.3:4321")  # a balancer
        await ok.send_all(v1("198.51.100.9", "192.0.2.1", 77, 7005) + b"who\n")
        await Client(ok).expect("you are 198.51.100.9:77")
        server.shutdown()
    (refusal,) = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refusal.levelno == logging.WARNING
    assert refusal.getMessage() == (
        "whoami 192.0.2.50:1234 refused: not a --proxy-from address, "
        "so its PROXY header is not trusted"
    )


async def test_refusals_are_counted_in_the_metrics(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    service = Whoami(proxy_protocol=True, proxy_from=parse_networks("10.0.0.0/8"))
    listener = MemoryListener()
    server = Server([service], listeners={"whoami": [listener]}, metrics=metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert metrics.value("trionet_proxy_refused_total", service="whoami") == 0
        stream = await listener.connect("192.0.2.50:1234")  # not a balancer: refused
        await stream.send_all(v1("127.0.0.1", "127.0.0.1", 1, 2) + b"who\n")
        await Client(stream).expect_closed()
        check = await listener.connect("10.1.2.3:1")  # a health check: connects, closes
        await check.aclose()
        bad = await listener.connect("10.1.2.3:2")  # a balancer without a header: refused
        await bad.send_all(b"who\n")
        await Client(bad).expect_closed()
        ok = await listener.connect("10.1.2.3:4321")
        await ok.send_all(v1("198.51.100.9", "192.0.2.1", 77, 7005) + b"who\n")
        await Client(ok).expect("you are 198.51.100.9:77")
        await trio.testing.wait_all_tasks_blocked()
        server.shutdown()
    assert metrics.value("trionet_proxy_refused_total", service="whoami") == 2


async def test_the_header_has_a_deadline_and_may_come_in_pieces(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        server, listener = await _server(nursery)
        silent = await listener.connect("127.0.0.1:1")
        started = trio.current_time()
        await Client(silent, timeout=60).expect_closed()
        assert 4.9 < trio.current_time() - started < 5.5
        slow = await listener.connect("127.0.0.1:2")
        for byte in v2("2001:db8::7", "2001:db8::1", 9, 7005):
            await slow.send_all(bytes([byte]))
            await trio.sleep(0.01)
        await slow.send_all(b"who\n")
        await Client(slow).expect("you are [2001:db8::7]:9")
        garbage = await listener.connect("127.0.0.1:3")
        await garbage.send_all(b"who\n")
        await Client(garbage).expect_closed()
        server.shutdown()
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == [
        "whoami 127.0.0.1:1 refused: no complete PROXY header within 5s",
        "whoami 127.0.0.1:3 refused: no PROXY protocol header",
    ]


async def test_tls_after_the_header_in_memory(
    autojump_clock: trio.testing.MockClock, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        server, listener = await _server(nursery, tls_cert=tls_files.cert, tls_key=tls_files.key)
        raw = await listener.connect("127.0.0.1:40000")
        await raw.send_all(v1("198.51.100.3", "192.0.2.1", 4444, 7005))
        tls = trio.SSLStream(raw, tls_files.client_context(), server_hostname="localhost")
        client = Client(tls)
        await client.send_line("who")
        await client.expect("you are 198.51.100.3:4444")
        # A failed handshake is logged with the client's address too.
        plain = await listener.connect("127.0.0.1:40001")
        await plain.send_all(v1("198.51.100.4", "192.0.2.1", 4445, 7005) + b"who are you?\n")
        await Client(plain).expect_closed()
        server.shutdown()
    assert any(
        r.getMessage().startswith("whoami 198.51.100.4:4445 tls handshake failed: not TLS")
        for r in caplog.records
    )


# -- real sockets -------------------------------------------------------------------------------


def _exchange(port: int, *chunks: bytes, source: str = "127.0.0.1") -> bytes:
    """Connect from ``source``, send ``chunks`` (a pause between), half-close, read all."""
    return _exchange_from(port, *chunks, source=source)[0]


def _exchange_from(port: int, *chunks: bytes, source: str) -> tuple[bytes, int]:
    """As :func:`_exchange`; also the client's own port (what the server's log names)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as s:
        for i, chunk in enumerate(chunks):
            if i:
                time.sleep(0.05)  # separate segments: the header arrives in pieces
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while data := s.recv(65536):
            out += data
        return out, s.getsockname()[1]


def _refused(port: int, data: bytes, source: str = "127.0.0.1") -> bool:
    """True if the server closed without a byte.

    Closing with input unread sends a reset, which the client may meet at
    its send, its half-close (ENOTCONN) or its read, depending on timing.
    """
    try:
        return _exchange(port, data, source=source) == b""
    except OSError as exc:
        return isinstance(exc, ConnectionError) or exc.errno == errno.ENOTCONN


def test_over_a_real_socket(serve: Callable[..., Serve]) -> None:
    p = serve("calc", "--port", "0", "--proxy-protocol")
    port = p.port("calc")
    header = v2("198.51.100.4", "127.0.0.1", 6000, port)
    assert _exchange(port, header[:7], header[7:20], header[20:] + b"6*7\n") == b"OK 42\n"
    assert _exchange(port, v1("198.51.100.5", "127.0.0.1", 6001, port) + b"1+1\n") == b"OK 2\n"
    assert _refused(port, b"1+1\n")  # no header
    p.wait_for(r"calc 127\.0\.0\.1:\d+ refused: no PROXY protocol header")
    p.wait_for(r"calc 198\.51\.100\.4:6000 #\S+ end=eof")
    p.wait_for(r"calc 198\.51\.100\.5:6001 #\S+ end=eof")
    assert p.stop() == 0


def test_only_proxy_from_may_send_a_header_over_a_real_socket(
    serve: Callable[..., Serve],
) -> None:
    p = serve(
        *("calc", "--port", "0", "--proxy-protocol", "--proxy-from", "127.0.0.2/32"),
        *("--metrics-port", "0"),
    )
    port = p.port("calc")
    header = v1("198.51.100.6", "127.0.0.1", 6002, port)
    assert _refused(port, header + b"1+1\n", source="127.0.0.1")
    assert _exchange(port, header + b"1+1\n", source="127.0.0.2") == b"OK 2\n"
    p.wait_for(r"calc 127\.0\.0\.1:\d+ refused: not a --proxy-from address")
    p.wait_for(r"calc 198\.51\.100\.6:6002 #\S+ end=eof")
    metrics_port = int(p.wait_for(r"metrics listening on 127\.0\.0\.1:(\d+)")[0][1])
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=20) as page:
        text = page.read().decode()
    assert 'trionet_proxy_refused_total{service="calc"} 1.0' in text.splitlines(), text
    assert p.stop() == 0


# -- behind a real haproxy ----------------------------------------------------------------------

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[int], int]]:
    """Start haproxy (mode tcp, send-proxy-v2) in front of a port; its own port."""
    if not Path(HAPROXY).exists():
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(backend: int) -> int:
        front = _free_port()
        config = tmp_path / f"haproxy-{front}.cfg"
        config.write_text(
            "defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 60s\n"
            "  timeout server 60s\n"
            f"frontend front\n  bind 127.0.0.1:{front}\n  default_backend back\n"
            # With health checks: they connect and close, sending nothing.
            f"backend back\n  server trionet 127.0.0.1:{backend} send-proxy-v2 check inter 200\n"
        )
        procs.append(subprocess.Popen([HAPROXY, "-f", str(config), "-db"], stderr=subprocess.PIPE))
        deadline = time.monotonic() + 30
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", front), timeout=1).close()
                return front
            except OSError:
                assert procs[-1].poll() is None, procs[-1].stderr and procs[-1].stderr.read()
                assert time.monotonic() < deadline, "haproxy did not listen within 30 s"
                time.sleep(0.05)

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


def test_behind_haproxy_the_real_client_counts(
    serve: Callable[..., Serve], haproxy: Callable[[int], int]
) -> None:
    p = serve("calc", "--port", "0", "--proxy-protocol", "--max-per-address", "1")
    front = haproxy(p.port("calc"))
    with socket.create_connection(("127.0.0.1", front), 30, ("127.0.0.2", 0)) as held:
        held.sendall(b"1+1\n")
        assert held.recv(100) == b"OK 2\n"
        # Another client is served, though haproxy's own address is the same;
        # the same client again is over its cap.
        assert _exchange(front, b"2+2\n", source="127.0.0.3") == b"OK 4\n"
        assert _exchange(front, b"3+3\n", source="127.0.0.2") == b"BYE busy\n"
        port = held.getsockname()[1]
    p.wait_for(rf"calc 127\.0\.0\.2:{port} #\S+ end=eof")
    p.wait_for(r"calc 127\.0\.0\.3:\d+ #\S+ end=eof")
    p.wait_for(r"calc 127\.0\.0\.2:\d+ turned away \(address limit for 127\.0\.0\.2\)")
    # haproxy's health checks (connect, close) are no warnings: nothing was refused.
    p.wait_for(r"calc \S+ closed before sending anything")
    assert p.count("refused") == 0
    assert p.stop() == 0


def test_behind_haproxy_with_tls_passed_through(
    serve: Callable[..., Serve], haproxy: Callable[[int], int], tls_files: TLSFiles
) -> None:
    p = serve(
        *("calc", "--port", "0", "--proxy-protocol"),
        *("--tls-cert", tls_files.cert, "--tls-key", tls_files.key),
    )
    front = haproxy(p.port("calc"))
    ctx = ssl.create_default_context(cafile=tls_files.ca)
    with (
        socket.create_connection(("127.0.0.1", front), 30, ("127.0.0.4", 0)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"2**16\n")
        assert tls.recv(100) == b"OK 65536\n"
        port = tls.getsockname()[1]
    p.wait_for(rf"calc 127\.0\.0\.4:{port} #\S+ end=\w+ .* tls")
    assert p.stop() == 0


# -- options ------------------------------------------------------------------------------------


async def test_a_reload_turns_the_proxy_protocol_on_for_new_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listener = MemoryListener()
    server = Server([Whoami()], listeners={"whoami": [listener]})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        before = Client(await listener.connect("127.0.0.1:1"))
        await before.send_line("who")
        await before.expect("you are 127.0.0.1:1")
        networks = parse_networks("127.0.0.1")
        server.reload({"whoami": {"proxy_protocol": True, "proxy_from": networks}})
        after = await listener.connect("127.0.0.1:2")
        await after.send_all(v1("198.51.100.8", "192.0.2.1", 8, 7005) + b"who\n")
        await Client(after).expect("you are 198.51.100.8:8")
        await before.send_line("who")  # the open one is unchanged
        await before.expect("you are 127.0.0.1:1")
        server.shutdown()


def test_options_on_the_command_line_and_in_the_config_file(tmp_path: Path) -> None:
    (calc,) = trionet.build_services(["calc"])
    assert (calc.proxy_protocol, calc.proxy_from) == (False, parse_networks("127.0.0.0/8,::1"))
    config = tmp_path / "trionet.toml"
    config.write_text('[common]\nproxy-protocol = true\n[calc]\nproxy-from = "10.0.0.0/8"\n')
    (calc,) = trionet.build_services(["calc", "--config", str(config)])
    assert (calc.proxy_protocol, calc.proxy_from) == (True, parse_networks("10.0.0.0/8"))
    (calc,) = trionet.build_services(
        ["calc", "--config", str(config), "--proxy-from", "192.0.2.1,192.0.2.0/30"]
    )
    assert calc.proxy_from == parse_networks(["192.0.2.1/32", "192.0.2.0/30"])
    config.write_text('[calc]\nproxy-from = "10.0.0.0/8,nope"\n')
    with pytest.raises(trionet.ConfigError, match="not an address or CIDR network: 'nope'"):
        trionet.build_services(["calc", "--config", str(config)])


def test_chat_behind_haproxy_logs_its_members_real_addresses(
    serve: Callable[..., Serve], haproxy: Callable[[int], int]
) -> None:
    p = serve("chat", "--port", "0", "--proxy-protocol")
    front = haproxy(p.port("chat"))
    ports = []
    for source, nick in (("127.0.0.5", "ann"), ("127.0.0.6", "ben")):
        reply, port = _exchange_from(front, f"/nick {nick}\n/quit\n".encode(), source=source)
        assert f"OK nick {nick}\n".encode() in reply
        ports.append(port)
    p.wait_for(rf"chat 127\.0\.0\.5:{ports[0]} #\S+ end=quit")
    p.wait_for(rf"chat 127\.0\.0\.6:{ports[1]} #\S+ end=quit")
    assert p.stop() == 0


def test_chat_web_page_behind_haproxy(
    serve: Callable[..., Serve], haproxy: Callable[[int], int]
) -> None:
    """The chat's web port takes the header too (haproxy's health checks included)."""
    p = serve("chat", "--port", "0", "--web-port", "0", "--proxy-protocol")
    front = haproxy(p.port("chat web"))
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    reply, port = _exchange_from(front, request, source="127.0.0.7")
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"<!doctype html>" in reply
    p.wait_for(rf"chat web 127\.0\.0\.7:{port} GET / 200")
    assert p.stop() == 0
    assert not p.matching(r"refused"), p.matching(r"refused")
