#!/usr/bin/env python3
"""Benchmark trionet's TLS against plain Trio ``SSLStream`` servers, same certificate.

One run on 127.0.0.1; every server runs in its own process, rounds are
interleaved (the order rotates each round) and medians plus ratios are
printed:

  (a) echo ping-pong inside TLS: 100 connections, one 64-byte message in
      flight each; round trips per second. trionet's echo service with
      TLS, against Trio's tutorial echo server wrapped in ``SSLStream``
      (``trio.serve_ssl_over_tcp``). The load is one lean process (stdlib
      ``ssl`` sockets on epoll: OpenSSL in C). Also printed: the server's
      user and system CPU per round trip, read from /proc, which this
      shared machine's noise disturbs less than the rate.
  (b) a 1 GiB download inside TLS, saved to disk: the trionet files server
      and ``python -m trionet.client files get --tls`` (which also checks
      the file's sha256), against ``curl --cacert`` from a plain Trio HTTPS
      file server (``SSLStream``, 1 MiB reads in a worker thread, the same
      chunk size as trionet's). Seconds per download (process start-up
      included), shown as MB/s. Before each download the previous output
      is deleted and ``sync`` run (outside the timed part). Two reference
      rows: curl doing the client's whole job (``curl | tee FILE |
      sha256sum``), and the trionet server with a lean discard client (what
      the server alone can send).

Certificates come from ``trustme`` (in the ``test`` extra: run from the
project's .venv). Temporary files are deleted at the end.

Usage: .venv/bin/python scripts/bench/tls.py [--rounds 5] [--seconds 3] [--size-mib 1024]
       [--only a|b] [--before TREE]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    ROOT,
    Server,
    add_before_argument,
    cpu_seconds,
    describe_machine,
    median,
    rounds,
    sides,
    start_pingpong,
)

MESSAGE = b"m" * 64
#: The baseline file server's read size (trionet's files server reads 1 MiB too).
FILE_CHUNK = 1 << 20


def make_certs(folder: Path) -> tuple[str, str, str]:
    """A CA and a certificate for 127.0.0.1 it issued: (ca, cert, key) PEM paths."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    paths = str(folder / "ca.pem"), str(folder / "cert.pem"), str(folder / "key.pem")
    ca.cert_pem.write_to_path(paths[0])
    Path(paths[1]).write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(paths[2])
    return paths


# -- the servers (each run in its own process) ----------------------------------------------


def trionet_server(kind: str, cert: str, key: str, root: str) -> None:
    import logging

    import trio

    import trionet
    from trionet.services.echo import EchoService
    from trionet.services.files import FilesService

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("trionet").setLevel(logging.INFO)  # the "listening on" line
    logging.getLogger("trionet.access").setLevel(logging.WARNING)
    options: dict[str, Any] = {"port": 0, "tls_cert": cert, "tls_key": key}
    service: trionet.Service = (
        EchoService(max_connections=10000, **options)
        if kind == "echo"
        else FilesService(root=root, **options)
    )
    trio.run(trionet.serve, [service])


def baseline_server(kind: str, cert: str, key: str, root: str) -> None:
    import trio

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def echo(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    async def files(stream: trio.SSLStream[trio.SocketStream]) -> None:
        # Just enough HTTP for curl: GET /NAME, one response, close.
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                if not (data := await stream.receive_some()):
                    return
                request += data
            name = request.split(b" ", 2)[1].decode().lstrip("/")
            path = os.path.join(root, name)
            size = (await trio.Path(path).stat()).st_size
            await stream.send_all(
                f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode()
            )
            async with await trio.open_file(path, "rb") as f:
                while chunk := await f.read(FILE_CHUNK):
                    await stream.send_all(chunk)
            await stream.aclose()
        except trio.BrokenResourceError:
            pass

    async def main() -> None:
        handler = echo if kind == "echo" else files
        serve = functools.partial(
            trio.serve_ssl_over_tcp, host="127.0.0.1", https_compatible=kind == "files"
        )
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve, handler, 0, ctx)
            port = listeners[0].transport_listener.socket.getsockname()[1]
            print(f"baseline listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)

    trio.run(main)


def start(who: str, kind: str, cert: str, key: str, root: str, tree: str | None = None) -> Server:
    side = "baseline" if who == "baseline" else "trionet"
    argv = [sys.executable, __file__, "_server", side, kind, cert, key, root]
    return Server(argv, tree=tree if who == "before" else None)


# -- (a) the ping-pong load (its own process) ---------------------------------------------


def gen_pingpong(
    port: int, pid: int, seconds: float, cafile: str, conns: int = 100
) -> dict[str, float]:
    ctx = ssl.create_default_context(cafile=cafile)
    socks: list[ssl.SSLSocket] = []
    for _ in range(conns):
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")  # handshake, blocking
        s.setblocking(False)
        socks.append(s)
    ep, by_fd, pending = start_pingpong(socks, MESSAGE)
    count = 0
    warm_until = time.monotonic() + 0.5
    end = warm_until + seconds
    counting = False
    cpu = (0.0, 0.0)
    while (now := time.monotonic()) < end:
        if not counting and now >= warm_until:
            counting, count, cpu = True, 0, cpu_seconds(pid)
        for fd, _ in ep.poll(0.2):
            s = by_fd[fd]
            while True:  # drain what OpenSSL holds decrypted, not only the socket
                try:
                    data = s.recv(4096)
                except ssl.SSLWantReadError:
                    break  # a partial record, or a session ticket
                if not data:
                    raise SystemExit("server closed")
                pending[fd] -= len(data)
                if pending[fd] == 0:
                    count += 1
                    s.send(MESSAGE)
                    pending[fd] = len(MESSAGE)
                if not s.pending():
                    break
    user, system = (after - before for after, before in zip(cpu_seconds(pid), cpu, strict=True))
    for s in socks:
        s.close()
    return {
        "value": count / seconds,
        "user_us": user / count * 1e6,
        "system_us": system / count * 1e6,
    }


def measure_pingpong(
    who: str, certs: tuple[str, str, str], seconds: float, tree: str | None
) -> tuple[float, float, float]:
    ca, cert, key = certs
    with start(who, "echo", cert, key, ".", tree) as server:
        out = subprocess.run(
            [sys.executable, __file__, "_gen", *map(str, [server.port, server.pid, seconds]), ca],
            capture_output=True,
            text=True,
            timeout=seconds * 4 + 120,
            check=True,
        )
        result = json.loads(out.stdout)
        return float(result["value"]), float(result["user_us"]), float(result["system_us"])


# -- (b) the download -----------------------------------------------------------------------


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(16 << 20, left)
            f.write(os.urandom(n))
            left -= n


#: (b)'s contenders: the server each downloads from, and what the row means.
DOWNLOADS = {
    "trionet": ("trionet", "trionet files client (sha256 checked)"),
    "baseline": ("baseline", "curl --cacert, saved"),
    "curl+sha": ("baseline", "reference: curl | tee FILE | sha256sum"),
    "server": ("trionet", "reference: trionet server, lean discard client"),
}


def discard(port: int, ca: str, size: int) -> None:
    """(b) reference row: GET over TLS and drop the bytes (stdlib ssl, blocking)."""
    ctx = ssl.create_default_context(cafile=ca)
    with ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1"
    ) as sock:
        sock.sendall(b"GET big.bin\n")
        head = b""
        while b"\n" not in head:
            head += sock.recv(65536)
        line, _, rest = head.partition(b"\n")
        if not line.startswith(b"OK "):
            raise SystemExit(f"unexpected reply {line!r}")
        left = size - len(rest)
        buf = bytearray(1 << 20)
        while left > 0:
            n = sock.recv_into(buf)
            if not n:
                raise SystemExit("connection closed early")
            left -= n


def download_command(row: str, port: int, ca: str, out: str, size: int) -> list[str]:
    url = f"https://127.0.0.1:{port}/big.bin"
    curl = ["curl", "--silent", "--show-error", "--fail", "--cacert", ca]
    if row == "trionet":
        return [
            *[sys.executable, "-m", "trionet.client", "files", "get", "big.bin"],
            *["-o", out, "--port", str(port), "--tls", "--cafile", ca],
        ]
    if row == "baseline":
        return [*curl, "-o", out, url]
    if row == "curl+sha":
        pipeline = f"{' '.join(curl)} {url} | tee {out} | sha256sum >/dev/null"
        return ["bash", "-o", "pipefail", "-c", pipeline]
    return [sys.executable, __file__, "_discard", str(port), ca, str(size)]


def timed_download(row: str, port: int, ca: str, out: Path, size: int) -> float:
    out.unlink(missing_ok=True)
    subprocess.run(["sync"], check=True)
    command = download_command(row, port, ca, str(out), size)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if row != "server" and out.stat().st_size != size:
        raise SystemExit(f"{row}: got {out.stat().st_size} bytes, expected {size}")
    return elapsed


# -- orchestration ------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per (a) measurement")
    parser.add_argument("--size-mib", type=int, default=1024, help="file size for (b)")
    parser.add_argument("--only", choices=["a", "b"], default=None, help="run one part")
    add_before_argument(parser)
    args = parser.parse_args()
    if args.only != "a" and shutil.which("curl") is None:
        raise SystemExit("(b) needs curl; run with --only a")

    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        folder = Path(tmp)
        certs = make_certs(folder)
        size = args.size_mib << 20
        servers: dict[str, Server] = {}
        try:
            if args.only != "a":
                root = folder / "root"
                root.mkdir()
                make_file(root / "big.bin", size)
                for who in ("trionet", "baseline"):
                    servers[who] = start(who, "files", certs[1], certs[2], str(root))
                # Warm up: the page cache, and trionet's digest of the file.
                for row in ("trionet", "baseline"):
                    timed_download(row, servers[row].port, certs[0], folder / "out.bin", size)
            for r, order in rounds(args.rounds, sides(args)):
                for who in order:
                    if args.only != "b":
                        value, user, system = measure_pingpong(
                            who, certs, args.seconds, args.before
                        )
                        results.setdefault(("a", who), []).append(value)
                        results.setdefault(("a-user", who), []).append(user)
                        results.setdefault(("a-system", who), []).append(system)
                        print(
                            f"round {r + 1} (a) {who:8} {value:10.0f} round trips/s, server CPU "
                            f"per round trip: user {user:5.1f} us, system {system:5.1f} us",
                            flush=True,
                        )
                if args.only != "a":
                    rows = list(DOWNLOADS)
                    shift = r % len(rows)
                    for row in rows[shift:] + rows[:shift]:
                        port = servers[DOWNLOADS[row][0]].port
                        seconds = timed_download(row, port, certs[0], folder / "out.bin", size)
                        results.setdefault(("b", row), []).append(size / seconds / 1e6)
                        print(
                            f"round {r + 1} (b) {row:8} {seconds:8.3f} s "
                            f"{size / seconds / 1e6:8.0f} MB/s",
                            flush=True,
                        )
        finally:
            for server in servers.values():
                server.stop()

    print(
        f"\nmedians over {args.rounds} interleaved rounds ({describe_machine()}, "
        f"{ssl.OPENSSL_VERSION}):"
    )
    if ("a", "trionet") in results:
        t, b = (median(results["a", w]) for w in ("trionet", "baseline"))
        print(
            f"  (a) echo ping-pong   trionet {t:8.0f}  baseline {b:8.0f} round trips/s   "
            f"ratio trionet/baseline {t / b:.2f} (higher is better)"
        )
        if args.before:
            was = median(results["a", "before"])
            print(f"      before {was:8.0f} round trips/s, ratio trionet/before {t / was:.2f}")
        for part in ("user", "system"):
            t, b = (median(results[f"a-{part}", w]) for w in ("trionet", "baseline"))
            was = ""
            if args.before:
                was = f", before {median(results[f'a-{part}', 'before']):5.1f} us"
            print(
                f"      server {part:6} CPU per round trip: trionet {t:5.1f} us, "
                f"baseline {b:5.1f} us{was}, ratio baseline/trionet {b / t:.2f} (higher is better)"
            )
    if ("b", "trionet") in results:
        b = median(results["b", "baseline"])
        print(f"  (b) {args.size_mib} MiB download inside TLS (ratio to curl, higher is better):")
        for row, (_, meaning) in DOWNLOADS.items():
            t = median(results["b", row])
            print(f"      {row:9} {t:6.0f} MB/s  {t / b:5.2f}x  {meaning}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_server":
        _, _, who, kind, cert, key, root = sys.argv
        (trionet_server if who == "trionet" else baseline_server)(kind, cert, key, root)
    elif len(sys.argv) > 1 and sys.argv[1] == "_discard":
        discard(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_gen":
        _, _, port, pid, seconds, cafile = sys.argv
        print(json.dumps(gen_pingpong(int(port), int(pid), float(seconds), cafile)))
    else:
        main()
