#!/usr/bin/env python3
"""The first reply on a fresh TLS 1.3 connection, for a client without TCP_NODELAY.

Issue 19: Python's ``ssl`` client (most scripts) does not set TCP_NODELAY;
its first request after the handshake waited about 44 ms for an answer from
trionet and from a plain Trio ``SSLStream`` server, against 0.7 ms from
``openssl s_server``. The cause: OpenSSL sends the TLS 1.3 session tickets
with the server's first write, so after reading the client's Finished the
server has nothing to send, Linux delays its ACK (40 ms), and the client's
Nagle algorithm holds the request until that ACK comes. trionet now puts
the socket in quick-ACK mode once the handshake is done.

For each server (trionet's calc with TLS, and a plain Trio SSLStream server
answering each read with ``OK 42``), in its own process, rounds alternating:
--conns fresh connections each, one request each, from a client with and
without TCP_NODELAY; the time from sending the request to the whole reply.
Printed: the median and the worst, in ms.

Usage: .venv/bin/python scripts/bench/tls_first_reply.py [--rounds 3] [--conns 20]
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tls import make_certs  # this folder's TLS benchmark

ROOT = Path(__file__).resolve().parents[2]


def baseline(cert: str, key: str) -> None:
    """A plain Trio TLS server: ``OK 42`` for every read."""
    import trio

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            while await stream.receive_some():
                await stream.send_all(b"OK 42\n")
        except trio.BrokenResourceError:
            pass

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1")
            listeners = await nursery.start(serve, handle, 0, ctx)
            port = listeners[0].transport_listener.socket.getsockname()[1]
            print(port, flush=True)

    trio.run(main)


def start(kind: str, cert: str, key: str, folder: str) -> tuple[subprocess.Popen[bytes], int]:
    if kind == "trionet":
        argv = [sys.executable, "-m", "trionet.serve", "calc", "--port", "0"]
        argv += ["--tls-cert", cert, "--tls-key", key]
        log = Path(folder, "trionet.log")
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, stderr=out)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            for line in log.read_text().splitlines():
                if "listening on" in line:
                    return proc, int(line.split(":")[-1].split()[0])
            time.sleep(0.05)
        raise SystemExit(f"the trionet server did not start: {log.read_text()}")
    argv = [sys.executable, __file__, "--baseline", cert, key]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if not first.strip().isdigit():
        raise SystemExit("the baseline server did not start")
    return proc, int(first)


def first_replies(port: int, ca: str, conns: int, nodelay: bool) -> list[float]:
    ctx = ssl.create_default_context(cafile=ca)
    times = []
    for _ in range(conns):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            if nodelay:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                start = time.perf_counter()
                s.sendall(b"6*7\n")
                reply = b""
                while not reply.endswith(b"\n"):
                    reply += s.recv(100)
                times.append((time.perf_counter() - start) * 1000)
                assert reply == b"OK 42\n", reply
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conns", type=int, default=20, help="connections per round and case")
    parser.add_argument("--baseline", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        return baseline(*args.baseline)
    with tempfile.TemporaryDirectory() as folder:
        ca, cert, key = make_certs(Path(folder))
        servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        results: dict[tuple[str, bool], list[float]] = {}
        try:
            for kind in ("trionet", "baseline"):
                servers[kind] = start(kind, cert, key, folder)
            for _ in range(args.rounds):
                for kind, (_, port) in servers.items():
                    for nodelay in (False, True):
                        got = first_replies(port, ca, args.conns, nodelay)
                        results.setdefault((kind, nodelay), []).extend(got)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(10)
    print(f"load average {os.getloadavg()[0]:.2f}; first reply after a TLS 1.3 handshake:")
    for (kind, nodelay), times in results.items():
        client = "client with TCP_NODELAY   " if nodelay else "client without TCP_NODELAY"
        print(
            f"  {kind:<9} {client}  median {statistics.median(times):6.2f} ms   "
            f"worst {max(times):6.2f} ms   ({len(times)} connections)"
        )


if __name__ == "__main__":
    main()
