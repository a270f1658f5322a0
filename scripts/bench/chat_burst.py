"""The burst probe of issue 12, against the log and the old fan-out, side by side.

N members join, then each sends 10 lines of 4,000 bytes at once (a burst
that default flood control allows) and reads everything it is sent. For
each server, in its own process and at default settings: how many members
were evicted (closed before they had every message), how many received
every message, and the server's memory (VmRSS once all joined, VmHWM = peak
after the burst, from /proc). Servers alternate, ``--rounds`` times.

* trionet — ``python -m trionet.serve chat`` (the room as a log),
* fanout  — scripts/bench/chat_fanout.py (a queue per member, as before).

Usage: python scripts/bench/chat_burst.py [--members 50 100] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import trio
from harness import status_kib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PER, SIZE = 10, 4000


def start(name: str, log: IO[bytes]) -> tuple[subprocess.Popen[bytes], int]:
    if name == "trionet":
        cmd = [sys.executable, "-m", "trionet.serve", "chat", "--port", "0"]
    else:
        cmd = [sys.executable, str(HERE / "chat_fanout.py"), "--sendq", str(1 << 20), "0"]
    pattern = rb"chat listening on [\d.]+:(\d+)"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        log.seek(0)
        found = re.search(pattern, log.read())
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{name} did not start")


async def probe(port: int, pid: int, n: int) -> dict[str, float]:
    streams = []
    for i in range(n):
        s = await trio.open_tcp_stream("127.0.0.1", port)
        await s.send_all(b"/nick c%d\n" % i)
        buf = b""
        while b"OK nick" not in buf:
            buf += await s.receive_some()
        streams.append(s)
    await trio.sleep(0.2)
    before = status_kib(pid, "VmRSS")
    complete = evicted = 0

    async def member(i: int, s: trio.SocketStream) -> None:
        nonlocal complete, evicted
        data = b"".join((b"c%d #%d " % (i, k)).ljust(SIZE, b"x") + b"\n" for k in range(PER))
        await s.send_all(data)
        msgs = 0
        rest = b""
        while msgs < (n - 1) * PER:
            try:
                chunk = await s.receive_some(1 << 16)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                evicted += 1
                return
            *lines, rest = (rest + chunk).split(b"\n")
            msgs += sum(line.startswith(b"MSG ") for line in lines)
        complete += 1

    with trio.move_on_after(60):
        async with trio.open_nursery() as nursery:
            for i, s in enumerate(streams):
                nursery.start_soon(member, i, s)
    peak = status_kib(pid, "VmHWM")
    for s in streams:
        await s.aclose()
    return {"evicted": evicted, "complete": complete, "before": before, "peak": peak}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--members", type=int, nargs="+", default=[50, 100])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--servers", nargs="+", default=["trionet", "fanout"])
    a = p.parse_args()
    print(f"each member sends {PER} lines of {SIZE} bytes at once; default settings")
    print(
        f"{'server':<8} {'members':>7} {'evicted':>7} {'got all':>7} {'RSS MB':>7} {'peak +MB':>8}"
    )
    for _ in range(a.rounds):
        for n in a.members:
            for name in a.servers:
                # A fresh process per probe: a clean peak RSS.
                with tempfile.TemporaryFile() as log:
                    proc, port = start(name, log)
                    try:
                        r = trio.run(probe, port, proc.pid, n)
                    finally:
                        proc.terminate()
                        proc.wait(10)
                print(
                    f"{name:<8} {n:>7} {r['evicted']:>7} {r['complete']:>7} "
                    f"{r['before'] / 1024:>7.1f} {(r['peak'] - r['before']) / 1024:>8.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
