"""Load generator for scripts/bench/chat.py: one process driving many chat clients.

Lean on purpose (raw non-blocking sockets and one epoll loop, no Trio), so
that the generator is not what limits the measurement. bench/chat.py runs
several of these processes side by side and checks the server's CPU.

Protocol with the parent, over stdin/stdout: connect and join every client,
print ``ready``, wait for a ``go`` line, run, print one JSON line of results.
Latencies (ns) are written to the ``--latencies`` file as raw int64s, and
those of the messages sent by the *other* generators' clients to
``<latencies>.other`` (with two servers on Redis: the messages that crossed
Redis; with one server: the same hop as the rest).

Each sender keeps at most ``--window`` of its own messages in flight, a
message being in flight until every client of *this* process has received
it. A message's text is ``<sender> <seq> <monotonic send time in ns>``;
CLOCK_MONOTONIC is shared by every process of the machine, so the receiving
process computes the delivery latency directly.
"""

from __future__ import annotations

import argparse
import array
import json
import resource
import select
import socket
import sys
import time


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--first", type=int, required=True, help="index of this process's first client")
    p.add_argument("--count", type=int, required=True, help="clients in this process")
    p.add_argument("--senders", type=int, nargs="*", default=[], help="indices that send")
    p.add_argument("--all-senders", type=int, required=True, help="senders in all processes")
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--latencies", required=True)
    a = p.parse_args()

    ids = list(range(a.first, a.first + a.count))
    socks: dict[int, socket.socket] = {}
    for i in ids:
        s = socket.create_connection(("127.0.0.1", a.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"/nick c%03d\n" % i)
        socks[i] = s
    for i, s in socks.items():  # wait for every OK nick (blocking, before the run)
        buf = b""
        s.settimeout(10)
        while b"OK nick" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit(f"client {i}: closed while joining: {buf!r}")
            buf += chunk
        s.setblocking(False)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1

    ep = select.epoll()
    by_fd = {}
    for i, s in socks.items():
        ep.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = i
    rest = {i: b"" for i in ids}
    senders = [i for i in a.senders if i in socks]
    sent = dict.fromkeys(senders, 0)
    acked = dict.fromkeys(senders, 0)
    local_recipients = {s: a.count - 1 for s in senders}
    counts: dict[bytes, int] = {}
    expected = sum(a.all_senders * a.messages - (a.messages if i in senders else 0) for i in ids)
    received = 0
    lat = array.array("q")
    lat_other = array.array("q")  # sent by another generator's clients
    cpu0 = _cpu()
    start = time.monotonic_ns()
    deadline = start + int(a.timeout * 1e9)
    last = start

    def pump_senders() -> None:
        for s in senders:
            n = min(a.window - (sent[s] - acked[s]), a.messages - sent[s])
            if n <= 0:
                continue
            now = time.monotonic_ns()
            data = b"".join(b"%d %d %d\n" % (s, sent[s] + k, now) for k in range(n))
            socks[s].setblocking(True)
            socks[s].sendall(data)  # small; the kernel takes it at once
            socks[s].setblocking(False)
            sent[s] += n

    pump_senders()
    while received < expected and time.monotonic_ns() < deadline:
        events = ep.poll(1.0)
        now = time.monotonic_ns()
        for fd, _ in events:
            i = by_fd[fd]
            try:
                data = socks[i].recv(1 << 18)
            except BlockingIOError:
                continue
            if not data:
                raise SystemExit(f"client {i}: server closed the connection")
            lines = (rest[i] + data).split(b"\n")
            rest[i] = lines.pop()
            for line in lines:
                if line[:4] != b"MSG ":
                    continue
                _, _, s, q, t = line.split(b" ")
                lat.append(now - int(t))
                received += 1
                si = int(s)
                if si not in local_recipients:
                    lat_other.append(now - int(t))
                if si in local_recipients:
                    key = s + b" " + q
                    c = counts.get(key, 0) + 1
                    if c == local_recipients[si]:
                        acked[si] += 1
                        del counts[key]
                    else:
                        counts[key] = c
            last = now
        pump_senders()
    cpu = _cpu() - cpu0
    for s in socks.values():
        s.close()
    with open(a.latencies, "wb") as f:
        lat.tofile(f)
    with open(a.latencies + ".other", "wb") as f:
        lat_other.tofile(f)
    print(
        json.dumps(
            {
                "received": received,
                "expected": expected,
                "start_ns": start,
                "last_ns": last,
                "cpu_s": cpu,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
