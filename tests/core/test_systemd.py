"""systemd: socket activation through ``systemd-socket-activate``, ``sd_notify``
messages caught on a datagram socket of the test's own, and the example units
checked by ``systemd-analyze verify``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Serve, _free_port

import trionet
from trionet._systemd import ActivationError, Notifier, assign_sockets

ACTIVATE = shutil.which("systemd-socket-activate")
ANALYZE = shutil.which("systemd-analyze")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate not installed (Debian package systemd)"
)


def _ask(port: int, request: bytes, timeout: float = 30) -> bytes:
    """Send ``request`` to 127.0.0.1:``port``, half-close, read everything back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


# -- socket activation --------------------------------------------------------------------


def test_sockets_go_to_the_service_they_are_named_after() -> None:
    a, b, c = (socket.socket() for _ in range(3))
    try:
        assert assign_sockets([("calc", a), ("echo", b)], ["echo", "calc"]) == {
            "calc": [a],
            "echo": [b],
        }
        assert assign_sockets([(None, a), (None, b)], ["calc"]) == {"calc": [a, b]}
        with pytest.raises(ActivationError, match=r"unnamed socket .* several services"):
            assign_sockets([(None, c)], ["calc", "echo"])
        with pytest.raises(ActivationError, match=r"named 'chat' .* no such service"):
            assign_sockets([("chat", c)], ["calc", "echo"])
    finally:
        for s in (a, b, c):
            s.close()


@needs_activate
@pytest.mark.parametrize("workers", ["1", "2"])
def test_one_unnamed_socket_goes_to_the_one_service(
    serve: Callable[..., Serve], workers: str
) -> None:
    port = _free_port()
    p = serve(
        "calc",
        "--workers",
        workers,
        prefix=[str(ACTIVATE), "-l", f"127.0.0.1:{port}", "-E", "PATH"],
    )
    p.wait_for(rf"Listening on 127\.0\.0\.1:{port} as 3")
    # systemd-socket-activate starts the service on the first connection,
    # which waits in the socket's queue meanwhile: it is served, not refused.
    assert _ask(port, b"6*7\n") == b"OK 42\n"
    assert p.port("calc") == port  # the socket passed, not calc's own 7005
    assert _ask(port, b"1+1\nQUIT\n") == b"OK 2\nBYE\n"
    assert p.stop() == 0


@needs_activate
def test_named_sockets_go_to_their_services(serve: Callable[..., Serve]) -> None:
    calc, echo = _free_port(), _free_port()
    prefix = [str(ACTIVATE), "-l", f"127.0.0.1:{echo}", "-l", f"127.0.0.1:{calc}"]
    p = serve("calc", "echo", prefix=[*prefix, "--fdname=echo:calc", "-E", "PATH"])
    p.wait_for(r"Listening on .* as 4")
    assert _ask(calc, b"2**8\n") == b"OK 256\n"
    assert _ask(echo, b"2**8\n") == b"2**8\n"
    assert (p.port("calc"), p.port("echo")) == (calc, echo)
    assert p.stop() == 0


@needs_activate
def test_a_socket_no_service_has_stops_the_process(serve: Callable[..., Serve]) -> None:
    port = _free_port()
    p = serve("calc", prefix=[str(ACTIVATE), "-l", f"127.0.0.1:{port}", "--fdname=chat"])
    p.wait_for(r"Listening on")
    try:  # the process stops without serving: the waiting client is dropped
        got = _ask(port, b"1+1\n")
    except OSError:
        got = b""
    assert got == b""
    assert p.proc.wait(60) == 1
    (line,) = [line for line in p.lines if "ERROR" in line]
    assert "socket activation: a socket named 'chat' was passed but no such service runs" in line


# -- sd_notify -------------------------------------------------------------------------------


class NotifySocket:
    """A datagram socket standing in for systemd's: the messages it received."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        # The kernel says who sent each message (systemd checks it too).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(1)
        self.address = address
        self.messages: list[dict[str, str]] = []
        self.senders: set[str] = set()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60) -> dict[str, str]:
        """The first message (from the start) with ``key`` (equal to ``value``)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if key in message and (value is None or message[key] == value):
                    return message
            seen = len(self.messages)
            assert time.monotonic() < deadline, (key, value, self.messages[-10:])
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            for level, kind, cred in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    message["sender"] = str(struct.unpack("3i", cred)[0])
            self.messages.append(message)
            self.senders.add(message.get("sender", "?"))

    def after(self, index: int) -> NotifySocket:
        """Forget the first ``index`` messages (so wait_for looks at later ones only)."""
        del self.messages[:index]
        return self


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    address = str(tmp_path / "notify") if request.param == "path" else f"@trionet-{os.getpid()}"
    listener = NotifySocket(address)
    try:
        yield listener
    finally:
        listener.sock.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sd_notify_ready_status_watchdog_reload_stopping(
    serve: Callable[..., Serve], notify_socket: NotifySocket, workers: str
) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "400000"}
    p = serve("calc", "--port", "0", "--workers", workers, env=env)
    ready = notify_socket.wait_for("READY", "1")
    port = p.port("calc")  # logged before READY=1
    if workers == "2":
        # With workers, ready means every worker serves.
        assert ready["STATUS"].startswith("2 worker(s) serving")
        p.wait_for(r"worker \d started", count=2)
    else:
        assert ready["STATUS"] == "0 connection(s) open (calc 0)"
    # A keep-alive every half WATCHDOG_USEC (0.2 s here).
    for _ in range(3):
        notify_socket.wait_for("WATCHDOG", "1")
        notify_socket.after(len(notify_socket.messages))
    # STATUS follows the number of connections.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(b"1+1\n")
        assert client.recv(100) == b"OK 2\n"
        status = notify_socket.wait_for("STATUS")["STATUS"]
        while "1 connection(s) open" not in status:
            notify_socket.after(len(notify_socket.messages))
            status = notify_socket.wait_for("STATUS")["STATUS"]
    # A reload is RELOADING=1 (with the monotonic clock), then READY=1.
    notify_socket.after(len(notify_socket.messages))
    p.signal(signal.SIGHUP)
    reloading = notify_socket.wait_for("RELOADING", "1")
    assert re.fullmatch(r"\d+", reloading["MONOTONIC_USEC"])
    index = notify_socket.messages.index(reloading)
    notify_socket.after(index).wait_for("READY", "1")
    p.signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING", "1")
    assert p.proc.wait(60) == 0
    # Workers tell their parent, never systemd: only the main process notifies.
    assert notify_socket.senders == {str(p.proc.pid)}


def test_no_notify_socket_means_no_messages() -> None:
    notifier = Notifier(None)
    assert not notifier.enabled
    notifier.ready("x")  # nothing to send to, nothing raised


# -- the example units ------------------------------------------------------------------------


def _exec_start_argv() -> list[str]:
    text = (ROOT / "docs/deploy/trionet.service").read_text()
    (line,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    return shlex.split(line)


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_the_example_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # The units name /opt/trionet/bin/trionet-serve, which verify requires to
    # exist: check them with this checkout's own trionet-serve in its place.
    here = Path(sys.executable).parent
    assert (here / "trionet-serve").exists()
    for name in ("trionet.socket", "trionet.service"):
        text = (ROOT / "docs/deploy" / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/trionet/bin/", f"{here}/"))
    done = subprocess.run(
        [
            str(ANALYZE),
            "verify",
            str(tmp_path / "trionet.socket"),
            str(tmp_path / "trionet.service"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_example_unit_has_descriptors_for_its_connections() -> None:
    text = (ROOT / "docs/deploy/trionet.service").read_text()
    limit = int(re.findall(r"^LimitNOFILE=(\d+)$", text, re.M)[0])
    argv = _exec_start_argv()[1:]
    at = argv.index("--config")
    del argv[at : at + 2]  # /etc/trionet/trionet.toml is not here
    services = trionet.build_services(argv)
    assert limit >= sum(s.max_connections for s in services) + 64
    socket_text = (ROOT / "docs/deploy/trionet.socket").read_text()
    (name,) = re.findall(r"^FileDescriptorName=(.*)$", socket_text, re.M)
    assert [s.name for s in services] == [name]
