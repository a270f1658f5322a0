"""One room across hosts: two chat processes in two network namespaces, Redis on a third.

Each "host" is a network namespace this test creates (and deletes, whatever
happens), wired to the Redis namespace by a veth pair with addresses in
10.213.0.0/16 that exist only inside these namespaces; no address is added
to the machine's own network. The clients talk to each chat process from
inside its namespace (``socat`` run there). Skipped unless root with
``ip netns`` working.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from tests.conftest import REDIS_SERVER
from trionet.services.chat.server import WELCOME
from trionet.testing import Client


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def hosts() -> Iterator[dict[str, str]]:
    """Namespaces a, b and r (Redis): a is 10.213.1.1, b is 10.213.2.1, r is .2 on both."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("socat") is None:
        pytest.skip("needs root, ip (iproute2) and socat")
    tag = f"tn{os.getpid()}"
    names = {role: f"{tag}{role}" for role in "abr"}
    made: list[str] = []
    try:
        for ns in names.values():
            try:
                _ip("netns", "add", ns)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"ip netns add failed: {exc.stderr.decode().strip()}")
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        r = names["r"]
        for role, net in (("a", 1), ("b", 2)):
            ns = names[role]
            # Made inside the host's namespace, its peer moved straight into r's.
            _ip(
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                f"r{role}",
                "netns",
                r,
            )
            _ip("-n", ns, "addr", "add", f"10.213.{net}.1/24", "dev", "eth0")
            _ip("-n", r, "addr", "add", f"10.213.{net}.2/24", "dev", f"r{role}")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", r, "link", "set", f"r{role}", "up")
        yield names
    finally:
        for ns in made:  # (deleting a namespace deletes its veth ends and their peers)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


class NsClient(Client):
    """A chat client connected from inside namespace ``ns`` (through socat there)."""

    @classmethod
    async def open(cls, nursery: trio.Nursery, ns: str, port: int) -> NsClient:
        run = functools.partial(
            trio.run_process,
            ["ip", "netns", "exec", ns, "socat", "-", f"TCP:127.0.0.1:{port}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            check=False,
        )
        proc = await nursery.start(run)
        return cls(trio.StapledStream(proc.stdin, proc.stdout), timeout=20)


async def _join(nursery: trio.Nursery, ns: str, port: int, nick: str) -> Client:
    client = await NsClient.open(nursery, ns, port)
    await client.expect(WELCOME)
    await client.send_line(f"/nick {nick}")
    await client.expect(f"OK nick {nick}")
    return client


@pytest.fixture
def redis_host(hosts: dict[str, str]) -> Iterator[None]:
    """redis-server in namespace r, on 10.213.1.2 and 10.213.2.2 port 6379."""
    redis = subprocess.Popen(
        ["ip", "netns", "exec", hosts["r"], REDIS_SERVER, "--bind", "10.213.1.2", "10.213.2.2",
         "--port", "6379", "--save", "", "--appendonly", "no", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        redis.kill()
        redis.wait()


async def _expect_among(client: Client, want: str) -> None:
    """Read until ``want`` (other JOINs may come first)."""
    for _ in range(20):
        if await client.receive_line() == want:
            return
    raise AssertionError(f"no {want!r}")


async def test_one_room_across_hosts(
    hosts: dict[str, str], redis_host: None, serve: Callable[..., Any]
) -> None:
    chat = {
        role: serve(
            "chat", "--port", "7003", "--redis", f"redis://10.213.{net}.2:6379",
            "--redis-liveness", "3", "--rate", "0", prefix=("ip", "netns", "exec", hosts[role]),
        )
        for role, net in (("a", 1), ("b", 2))
    }  # fmt: skip
    for process in chat.values():
        process.wait_for("chat listening on 127.0.0.1:7003")
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            alice = await _join(nursery, hosts["a"], 7003, "alice")
            amy = await _join(nursery, hosts["a"], 7003, "amy")
            bob = await _join(nursery, hosts["b"], 7003, "bob")
            for client in (alice, amy):
                await _expect_among(client, "JOIN bob")
            # Both ways, and 100 lines in the order they were sent.
            await alice.send(b"".join(b"line %d\n" % i for i in range(100)))
            got = []
            while len(got) < 100:
                line = await bob.receive_line()
                assert line is not None
                if line.startswith("MSG alice "):
                    got.append(line)
            assert got == [f"MSG alice line {i}" for i in range(100)]
            await bob.send_line("hello from host b")
            await _expect_among(alice, "MSG bob hello from host b")
            # Host a's process killed: host b announces both its members.
            chat["a"].signal(signal.SIGKILL)
            killed = time.monotonic()
            leaves = set()
            while len(leaves) < 2:
                line = await bob.receive_line(timeout=20)
                assert line is not None
                if line.startswith("LEAVE "):
                    leaves.add(line)
            assert leaves == {"LEAVE alice", "LEAVE amy"}
            assert time.monotonic() - killed < 15
            await bob.send_line("/who")
            await bob.expect("WHO bob")
            nursery.cancel_scope.cancel()
    assert chat["b"].count("Traceback") == 0
    assert chat["b"].stop() == 0
