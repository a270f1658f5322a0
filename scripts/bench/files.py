#!/usr/bin/env python3
"""Benchmark the files service against ``python -m http.server`` + curl.

One run, on 127.0.0.1, with a file of random bytes (1 GiB by default) in a
temporary directory that is deleted at the end. Rounds are interleaved
(each round runs every contender once, in a rotating order) because this
machine's loopback figures swing widely from one second to the next:

  (a) trionet files server, discard client (read and drop, like
      ``curl -o /dev/null``), in this process;
  (b) the full trionet client: ``python -m trionet.client files get`` as a
      process, writing to disk and checking size and sha256 (process start
      included);
  (c) ``python -m http.server`` downloaded with ``curl -o /dev/null`` (a
      Python discard client over HTTP when curl is not installed);
  (d) for reference only, when curl is installed: the same curl writing the
      file to disk (no digest), to show what the disk alone costs (b);
  (p) for reference: (a) with a plain discard client, woken for every
      segment (no ``SO_RCVLOWAT``), to show what the client's batching adds;
  (s) for reference: the client's process start-up alone
      (``python -m trionet.client files --help``);
  (h) for reference: SHA-256 of the file's size in memory, one core
      (hashlib, 4 MiB updates);
  (z) for reference: scripts/bench/sendfile_server.py, the plainest
      sendfile server (one blocking thread, the whole file in ``os.sendfile``
      calls, no digest, no event loop), with (a)'s discard client: what the
      kernel gives a server with no Python per chunk, to read (a) against.

(s) + (h) is a floor for (b): the client cannot hash a byte before it has
started, and SHA-256 is one sequential chain (no second core can help).
The summary shows how far (b) could at best get relative to (c).

Every measurement of every row starts from the same state: the previous
output is deleted and ``sync`` run first (outside the timed part), because
writing on this VM swings with writeback and page state.

Before the rounds it also shows that hashing does not stall the server:
while the first GET of the fresh file is being hashed, another client's
``LIST`` is timed.

Usage: python scripts/bench/files.py [--size-mib 1024] [--rounds 7] [--before TREE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness import ROOT, add_before_argument, free_port, median, rounds, wait_listening

CHUNK = 16 << 20
#: The discard clients' receive buffer (preallocated, reused).
DISCARD_BUFFER = 4 << 20


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def read_line(sock: socket.socket) -> tuple[str, bytes]:
    """The first line from ``sock`` and whatever arrived after it."""
    buf = b""
    while b"\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("server closed before replying")
        buf += data
    line, _, rest = buf.partition(b"\n")
    return line.decode(), rest


#: Bytes the discard clients let queue up before the kernel wakes them.
DISCARD_LOWAT = 1 << 20
_DISCARD = bytearray(DISCARD_BUFFER)


def discard(sock: socket.socket, left: int, *, batch: bool = True) -> None:
    """Receive ``left`` bytes and drop them: blocking ``recv_into`` one reused buffer.

    ``SO_RCVLOWAT`` makes the kernel wake this reader once a MiB is queued
    instead of for every 64 KiB loopback segment (wake-ups are what costs
    most on this VM, on both ends: the sender then also runs in bigger
    batches). The kernel wakes a blocked reader when the bytes queued and
    not yet copied reach the mark, while the reader may already have copied
    up to a mark's worth in that call: so the mark stays raised only while
    at least twice the mark is still due, and is 1 for the tail.
    """
    view = memoryview(_DISCARD)
    recv_into = sock.recv_into
    mark = 1
    while left > 0:
        want = DISCARD_LOWAT if batch and left >= 2 * DISCARD_LOWAT else 1
        if want != mark:
            mark = want
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
        n = recv_into(view, min(DISCARD_BUFFER, left))
        if not n:
            raise SystemExit(f"connection closed with {left} bytes still to come")
        left -= n


def trionet_discard(port: int, name: str, *, batch: bool = True) -> int:
    """(a): GET and drop the bytes; returns the byte count.

    With ``batch=False`` (row p, for reference) the receive mark stays at 1:
    the reader is woken for every segment, as a naive client would be.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(f"GET {name}\n".encode())
        line, rest = read_line(sock)
        word, size, _digest = line.split(" ")
        if word != "OK":
            raise SystemExit(f"unexpected reply: {line}")
        discard(sock, int(size) - len(rest), batch=batch)
        return int(size)


def client_startup() -> None:
    """(s): the client process, started and done with no transfer."""
    cmd = [sys.executable, "-m", "trionet.client", "files", "--help"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, timeout=60)


def sha256_alone(size: int) -> None:
    """(h): SHA-256 of ``size`` bytes already in memory, as the client feeds it."""
    h = hashlib.sha256()
    view = memoryview(_HASHED)
    left = size
    while left > 0:
        n = min(len(view), left)
        h.update(view[:n])
        left -= n
    h.hexdigest()


_HASHED = bytearray(os.urandom(4 << 20))


def fresh(out: Path) -> None:
    """Same starting state for every measurement: no previous output, nothing dirty."""
    for path in (out, out.with_name(out.name + ".part")):
        path.unlink(missing_ok=True)
    subprocess.run(["sync"], check=True)


def trionet_client(port: int, name: str, out: Path) -> None:
    """(b): the real client, as a process, writing and verifying."""
    cmd = [sys.executable, "-m", "trionet.client", "files", "get", name]
    cmd += ["-o", str(out), "--port", str(port)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"trionet client failed ({done.returncode}): {done.stderr.strip()}")


def http_download(port: int, name: str, size: int) -> None:
    """(c): curl from http.server, or a Python discard client without curl."""
    url = f"http://127.0.0.1:{port}/{name}"
    curl = shutil.which("curl")
    if curl:
        subprocess.run([curl, "-sSf", "-o", "/dev/null", url], check=True, timeout=300)
        return
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(f"GET /{name} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("http.server closed early")
            buf += data
        discard(sock, size - len(buf.partition(b"\r\n\r\n")[2]))


def curl_to_disk(port: int, name: str, out: Path) -> None:
    """(d): curl writing to disk, for reference."""
    url = f"http://127.0.0.1:{port}/{name}"
    subprocess.run(["curl", "-sSf", "-o", str(out), url], check=True, timeout=300)


def list_latency_while_hashing(port: int, name: str) -> tuple[float, float]:
    """Time a LIST sent while another client's first GET is being hashed."""
    hashing_done = threading.Event()
    first_byte: list[float] = []

    def first_get() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            sock.sendall(f"GET {name}\n".encode())
            line, rest = read_line(sock)
            first_byte.append(time.monotonic())
            hashing_done.set()
            discard(sock, int(line.split(" ")[1]) - len(rest))

    started = time.monotonic()
    thread = threading.Thread(target=first_get)
    thread.start()
    time.sleep(0.1)  # let the hash start
    with socket.create_connection(("127.0.0.1", port)) as sock:
        t0 = time.monotonic()
        sock.sendall(b"LIST\n")
        buf = b""
        while b"END " not in buf:
            buf += sock.recv(65536)
        latency = time.monotonic() - t0
    if hashing_done.is_set():
        print("note: the hash finished before LIST was sent; latency not meaningful")
    thread.join(300)
    return latency, first_byte[0] - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="file size (default: 1024)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    add_before_argument(parser)
    args = parser.parse_args()
    if args.rounds < 1 or args.size_mib < 1:
        parser.error("--rounds and --size-mib must be at least 1")
    size = args.size_mib << 20
    tmp = Path(tempfile.mkdtemp(prefix="bench_files_"))
    free = shutil.disk_usage(tmp).free
    print(f"{free / 2**30:.1f} GiB free in {tmp.parent}")
    if free < 2 * size + (1 << 30):
        shutil.rmtree(tmp)
        raise SystemExit("not enough free space for the file and one downloaded copy")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        root = tmp / "root"
        root.mkdir()
        name = "big.bin"
        print(f"creating {args.size_mib} MiB of random bytes in {root} ...", flush=True)
        make_file(root / name, size)
        tport, hport = free_port(), free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        serve = [sys.executable, "-m", "trionet.serve", "files", "--port", str(tport)]
        serve += ["--root", str(root), "--log-level", "WARNING"]
        procs.append(subprocess.Popen(serve, cwd=ROOT, env=env))
        zport = free_port()
        plain = [sys.executable, str(Path(__file__).with_name("sendfile_server.py"))]
        procs.append(subprocess.Popen([*plain, str(zport), str(root)]))
        http = [sys.executable, "-m", "http.server", str(hport), "--bind", "127.0.0.1"]
        http += ["--directory", str(root)]
        procs.append(subprocess.Popen(http, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_listening(tport, procs[0])
        wait_listening(zport, procs[1])
        wait_listening(hport, procs[2])

        latency, hashed = list_latency_while_hashing(tport, name)
        print(
            f"first GET (cold digest): OK after {hashed:.2f}s; "
            f"a LIST sent meanwhile answered in {latency * 1000:.1f} ms"
        )
        out = tmp / "out.bin"
        http_download(hport, name, size)  # warm-ups, not counted
        trionet_client(tport, name, out)
        contenders: dict[str, Callable[[], object]] = {
            "a trionet discard": lambda: trionet_discard(tport, name),
            "b trionet client": lambda: trionet_client(tport, name, out),
            "c http.server+curl" if shutil.which("curl") else "c http.server+py": lambda: (
                http_download(hport, name, size)
            ),
        }
        if shutil.which("curl"):
            contenders["d curl to disk (ref)"] = lambda: curl_to_disk(hport, name, out)
        contenders["p plain discard"] = lambda: trionet_discard(tport, name, batch=False)
        contenders["s client start-up"] = client_startup
        contenders["h sha256 alone"] = lambda: sha256_alone(size)
        contenders["z plain sendfile"] = lambda: trionet_discard(zport, name)
        if args.before:  # row a's server from another checkout
            bport = free_port()
            before = [*serve[:5], str(bport), *serve[6:]]
            env_before = {**os.environ, "PYTHONPATH": args.before}
            procs.append(subprocess.Popen(before, cwd=args.before, env=env_before))
            wait_listening(bport, procs[-1])
            trionet_discard(bport, name)  # warm-up: its digest of the file
            contenders["A before discard"] = lambda: trionet_discard(bport, name)
        times: dict[str, list[float]] = {k: [] for k in contenders}
        keys = list(contenders)
        for r, order in rounds(args.rounds, keys):
            row = []
            for key in order:
                fresh(out)
                t0 = time.perf_counter()
                contenders[key]()
                dt = time.perf_counter() - t0
                times[key].append(dt)
                row.append(f"{key[0]} {dt:5.3f}s")
            print(f"round {r + 1}: " + "  ".join(sorted(row)), flush=True)
        fresh(out)

        med = {key: median(times[key]) for key in keys}
        base = med[keys[2]]
        print(f"\nmedian of {args.rounds} rounds, {args.size_mib} MiB:")
        for key in keys:
            rate = f"{size / med[key] / 1e6:7.0f} MB/s" if key[0] in "abcdphzA" else " " * 12
            print(f"  {key:20} {med[key]:6.3f} s  {rate}  {base / med[key]:4.2f}x (c)")
        ratio_a = base / med[keys[0]]
        ratio_b = base / med[keys[1]]
        floor = med["s client start-up"] + med["h sha256 alone"]
        print(
            f"(a) against the plain sendfile server (z): "
            f"{med['z plain sendfile'] / med[keys[0]]:.2f}x its speed"
        )
        print(
            f"\ntargets: (a) {ratio_a:.2f}x (c), >= 1.3: {'met' if ratio_a >= 1.3 else 'NOT met'}; "
            f"(b) {ratio_b:.2f}x (c), >= 0.8: {'met' if ratio_b >= 0.8 else 'NOT met'}"
        )
        print(
            f"floor for (b): start-up (s) + sha256 (h) = {floor:.3f} s, so (b) can reach "
            f"about {base / floor:.2f}x (c) at best, whatever the network and disk do; "
            f"(b) is {med[keys[1]] - floor:+.3f} s from that floor"
        )
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
