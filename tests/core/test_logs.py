"""Logs: ``--log-format json``, ``--access-log on|off``, connection ids, quiet libraries.

Over real processes every line of stderr is parsed as JSON; every kind of
access line (served, turned away, failed TLS handshake, chat's web page)
carries the same fields; with ``--workers`` the workers' lines are JSON too
and connection ids never repeat. In memory: the JSON formatter on the
server's own records, and the rate limiter of third-party lines.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import Serve, TLSFiles

from trionet._logs import Bursts, json_formatter
from trionet.services.echo.server import EchoService
from trionet.testing import open_memory_server

ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d")
ACCESS_FIELDS = {
    "service": str,
    "worker": int,
    "conn": str,
    "peer": str,
    "tls": bool,
    "end": str,
    "duration": float,
    "bytes_in": int,
    "bytes_out": int,
}


def parse_all(p: Serve) -> list[dict[str, Any]]:
    """Every line the stopped process logged, as JSON; fails on any other line."""
    # Its workers' last lines may still be on their way through the pipe.
    wait_until(lambda: "<eof>" in p.lines)
    records = []
    for line in p.lines:
        if line == "<eof>":
            continue
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert ISO_TIME.fullmatch(record["time"]), record
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        assert isinstance(record["logger"], str) and isinstance(record["message"], str)
        records.append(record)
    return records


def check_access(record: dict[str, Any]) -> None:
    for field, kind in ACCESS_FIELDS.items():
        assert isinstance(record[field], kind), (field, record)
    assert not isinstance(record["worker"], bool)


def wait_until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_json_lines_and_every_kind_of_access_line(
    serve: Callable[..., Serve], tls_files: TLSFiles
) -> None:
    p = serve(
        "echo",
        "chat",
        "--port",
        "echo=0",
        "--port",
        "chat=0",
        "--web-port",
        "0",
        "--tls-cert",
        tls_files.cert,
        "--tls-key",
        tls_files.key,
        "--max-connections",
        "1",
        "--log-format",
        "json",
    )
    echo = p.port("echo")
    web = int(p.wait_for(r"chat web listening on 127\.0\.0\.1:(\d+)")[0][1])
    context = tls_files.client_context()
    # Served (TLS), and a second client turned away while the first holds the slot.
    with (
        socket.create_connection(("127.0.0.1", echo), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as held,
    ):
        held.sendall(b"hi")
        assert held.recv(2) == b"hi"
        with socket.create_connection(("127.0.0.1", echo), timeout=20) as extra:
            assert extra.recv(10) == b""  # echo closes without a word
        p.wait_for(r"turned away")
        held.unwrap()
    p.wait_for(r"end=eof")  # the slot is free again
    # A failed handshake.
    with socket.create_connection(("127.0.0.1", echo), timeout=20) as plain:
        plain.sendall(b"hello\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):  # an alert or a reset
            plain.recv(100)
    # Chat's page, over HTTPS.
    with (
        socket.create_connection(("127.0.0.1", web), timeout=20) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as page,
    ):
        page.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert page.recv(100).startswith(b"HTTP/1.1 200")
    p.wait_for(r"end=eof")
    p.wait_for(r"tls handshake failed")
    p.wait_for(r"GET / 200")
    assert p.stop() == 0
    records = parse_all(p)
    access = [r for r in records if r["logger"] == "trionet.access"]
    for record in access:
        check_access(record)
    ends = {r["end"] for r in access}
    assert {"eof", "busy", "tls-failed", "http-200"} <= ends, access
    served = next(r for r in access if r["end"] == "eof")
    assert served["tls"] is True and served["bytes_in"] == served["bytes_out"] == 2
    assert served["service"] == "echo" and served["worker"] == 0
    assert re.fullmatch(r"127\.0\.0\.1:\d+", served["peer"])
    failed = next(r for r in access if r["end"] == "tls-failed")
    assert failed["error"].startswith("not TLS")
    page_line = next(r for r in access if r["end"] == "http-200")
    assert (page_line["service"], page_line["status"], page_line["tls"]) == (
        "chat web",
        200,
        True,
    )
    assert len({r["conn"] for r in access}) == len(access)
    # The listening lines, and the rest, are JSON as well.
    assert any(r["message"].startswith("echo listening on 127.0.0.1:") for r in records)


def test_workers_log_json_with_ids_unique_across_workers(serve: Callable[..., Serve]) -> None:
    p = serve("calc", "--port", "0", "--workers", "2", "--log-format", "json")
    port = p.port("calc")
    p.wait_for(r"worker \d+ started", 2)
    for i in range(30):
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(f"{i} + 1\nQUIT\n".encode())
            data = b""
            while chunk := s.recv(100):
                data += chunk
            assert data == f"OK {i + 1}\nBYE\n".encode()
    p.wait_for(r"end=quit", 30)
    assert p.stop() == 0
    records = parse_all(p)
    access = [r for r in records if r["logger"] == "trionet.access"]
    assert len(access) == 30
    for record in access:
        check_access(record)
        assert record["worker"] in (1, 2)
    assert len({r["conn"] for r in access}) == 30
    assert not any("[worker" in r["message"] for r in records)
    # The parent's lines say worker 0; a worker's own lines (shutting down)
    # say which it is. (A worker still starting when SIGTERM came may not
    # have logged any.)
    assert {r["worker"] for r in records} <= {0, 1, 2}
    assert [r for r in records if r["worker"] == 0 and r["message"] == "stopped"]
    assert [r for r in records if r["worker"] > 0 and r["message"] == "stopped"]


def test_access_log_switch_is_independent_of_the_level(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    def one_request(p: Serve) -> None:
        with socket.create_connection(("127.0.0.1", port_of(p)), timeout=20) as s:
            s.sendall(b"1+1\nQUIT\n")
            while s.recv(100):
                pass

    def port_of(p: Serve) -> int:
        # With --log-level WARNING there is no "listening" line: use the port given.
        return given

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        given = s.getsockname()[1]
    quiet = serve("calc", "--port", str(given), "--log-level", "WARNING")
    wait_until(lambda: _connectable(given))
    one_request(quiet)
    quiet.wait_for(r"calc 127\.0\.0\.1:\d+ #\S+ end=quit")
    assert quiet.stop() == 0
    assert quiet.count("listening on") == 0  # INFO lines are off, access lines are not
    # Off in the config file's [common] table, in JSON, with the metrics port there too.
    config = tmp_path / "trionet.toml"
    config.write_text('[common]\naccess-log = "off"\nlog-format = "json"\nmetrics-port = 0\n')
    silent = serve("calc", "--port", "0", "--config", str(config))
    given = silent.port("calc")
    one_request(silent)
    assert silent.stop() == 0
    records = parse_all(silent)
    assert not [r for r in records if r["logger"] == "trionet.access"]
    assert any("calc listening on" in r["message"] for r in records)
    assert any("metrics listening on" in r["message"] for r in records)


def _connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def test_text_lines_carry_the_zone(serve: Callable[..., Serve]) -> None:
    p = serve("echo", "--port", "0")
    p.port("echo")
    assert p.stop() == 0
    first = p.lines[0]
    stamp = first.split(" ", 1)[0]
    assert ISO_TIME.fullmatch(stamp), first


# -- in memory ---------------------------------------------------------------------------


async def test_access_records_carry_the_fields_and_format_as_json(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trionet.access")
    async with open_memory_server(EchoService()) as server:
        client = await server.connect(peer="192.0.2.7:4000")
        await client.send(b"abc")
        assert await client.receive_exactly(3) == b"abc"
        await trio.sleep(1.5)
        await client.send_eof()
        await client.expect_closed()
        await trio.testing.wait_all_tasks_blocked()
    (record,) = [r for r in caplog.records if r.name == "trionet.access"]
    line = json_formatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    check_access(data)
    assert data["peer"] == "192.0.2.7:4000" and data["end"] == "eof"
    assert (data["bytes_in"], data["bytes_out"], data["tls"]) == (3, 3, False)
    assert data["duration"] == pytest.approx(1.5, abs=0.01)
    assert data["message"] == (
        f"echo 192.0.2.7:4000 #{data['conn']} end=eof duration=1.500s in=3 out=3"
    )
    assert ISO_TIME.fullmatch(data["time"]) and data["level"] == "INFO"


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_third_party_bursts_are_logged_at_start_and_end() -> None:
    clock = _Clock()
    bursts = Bursts(quiet=10.0, clock=clock)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    handler.addFilter(bursts)
    lib = logging.getLogger("somelib")
    lib.propagate = False
    lib.addHandler(handler)
    lib.setLevel(logging.INFO)
    ours = logging.getLogger("trionet.test_burst")
    ours.propagate = False
    ours.addHandler(handler)
    try:
        for attempt in range(1, 6):
            lib.info("Retry attempt %d due to error: refused", attempt)
            clock.now += 1
            ours.warning("our own line %d", attempt)  # never limited
        assert out.getvalue().count("Retry attempt") == 1
        assert out.getvalue().count("our own line") == 5
        clock.now += 9.5  # 10.5 s after the last repeat
        bursts.flush()
        lines = out.getvalue().splitlines()
        assert lines[-1] == (
            "somelib INFO Retry attempt 5 due to error: refused (repeated 4 more time(s) over 4.0s)"
        )
        # A new burst starts afresh; a lone line has no summary.
        lib.info("Retry attempt 1 due to error: refused")
        clock.now += 11
        bursts.flush()
        assert (
            out.getvalue().splitlines()[-1] == "somelib INFO Retry attempt 1 due to error: refused"
        )
        # A traceback becomes part of the line; "NoneType: None" disappears.
        try:
            raise ConnectionError("gone\nreally")
        except ConnectionError:
            lib.exception("Connection attempt failed!")
        lib.info("Connection closed unexpectedly!", exc_info=True)  # outside any except
        tail = out.getvalue().splitlines()[-2:]
        assert tail == [
            "somelib ERROR Connection attempt failed!: ConnectionError: gone | really",
            "somelib INFO Connection closed unexpectedly!",
        ]
        assert "Traceback" not in out.getvalue() and "NoneType" not in out.getvalue()
    finally:
        lib.removeHandler(handler)
        ours.removeHandler(handler)
        lib.propagate = ours.propagate = True


def test_an_uncaught_exception_is_one_json_line_too() -> None:
    code = (
        "from trionet._logs import setup_logging\n"
        "setup_logging(fmt='json')\n"
        "raise ValueError('boom')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert (record["level"], record["message"]) == ("CRITICAL", "uncaught exception")
    assert "ValueError: boom" in record["exc_info"]
