"""Soak the chat's web port: browser members and page loads come and go, watching memory.

One ``python -m trionet.serve chat --web-port 0`` process. Each round,
``--members`` WebSocket members connect at once, take a nick, say a line and
``/quit``, while as many page loads (``GET /``) run beside them. After every
``--every`` rounds it prints the process's resident memory (VmRSS).

What it is for: the web listener keeps per-connection state (the waits for a
first byte, requests under way, per-address counts) that must all go when the
connection does; a page that people keep open, reload and close for months
must not make the process grow. Passes when the process grew by at most
``--max-growth`` KiB over the second half of the run and every member got its
answers (a failed one stops the run with its error).

Usage: python scripts/bench/chat_web_soak.py [--rounds 200] [--members 50] [--max-growth 1024]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import trio
import trio_websocket

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chat_soak import check_rounds, soak_parser  # noqa: E402  (chat_soak.py)
from harness import ROOT, status_kib  # noqa: E402


def start_chat() -> tuple[subprocess.Popen[str], int]:
    """The chat with a web port (access log off: thousands of lines otherwise)."""
    cmd = [
        sys.executable, "-m", "trionet.serve", "chat", "--port", "0", "--web-port", "0",
        "--access-log", "off", "--rate", "1000000", "--burst", "1000000",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if found := re.search(r"chat web listening on [\d.]+:(\d+)", line):
            return proc, int(found.group(1))
    raise SystemExit(f"the chat did not start (exit {proc.wait()})")


async def member(port: int, n: int) -> None:
    """One browser member: nick, a line, /quit, until the server closes."""
    url = f"ws://127.0.0.1:{port}/ws"
    origin = [(b"origin", f"http://127.0.0.1:{port}".encode())]
    async with trio_websocket.open_websocket_url(url, extra_headers=origin) as ws:
        await ws.get_message()  # WELCOME
        await ws.send_message(f"/nick web{n}")
        if (reply := await ws.get_message()) != f"OK nick web{n}":
            raise SystemExit(f"member {n}: {reply!r}")
        await ws.send_message("hello")
        await ws.send_message("/quit")
        try:
            while await ws.get_message() != "BYE":
                pass
        except trio_websocket.ConnectionClosed:
            raise SystemExit(f"member {n}: closed before BYE") from None


async def page(port: int) -> None:
    """One page load, read to the end."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        head = await stream.receive_some(65536)
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"page: {bytes(head[:60])!r}")
        while await stream.receive_some(65536):
            pass


async def soak(a: argparse.Namespace, pid: int, port: int) -> list[int]:
    history = []
    for r in range(a.rounds):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n in range(a.members):
                    nursery.start_soon(member, port, n)
                    nursery.start_soon(page, port)
        history.append(status_kib(pid))
        if r % a.every == 0 or r == a.rounds - 1:
            print(f"{r + 1:>5} {history[-1]:>9}", flush=True)
    return history


def main() -> int:
    p = soak_parser(__doc__, rounds=200, max_growth=1024)
    p.add_argument(
        "--members", type=int, default=50, help="members (and page loads) per round "
        "(default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--every", type=int, default=20, help="print every N rounds (default: %(default)s)"
    )
    a = p.parse_args()
    check_rounds(p, a)
    proc, port = start_chat()
    try:
        print(f"{a.members} browser members and {a.members} page loads per round")
        print(f"{'round':>5} {'RSS KiB':>9}")
        history = trio.run(soak, a, proc.pid, port)
    finally:
        proc.terminate()
        proc.wait(10)
    half = len(history) // 2
    growth = history[-1] - history[half - 1]
    print(
        f"\n{a.rounds * a.members} members and as many page loads; growth after round "
        f"{half}: {growth} KiB (since round 1: {history[-1] - history[0]} KiB)"
    )
    ok = growth <= a.max_growth
    print(f"  grew by at most {a.max_growth} KiB over the second half: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
