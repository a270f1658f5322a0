"""Make docs/chat-web.png: the chat page on a desktop and on a phone, side by side.

    .venv/bin/python scripts/chat_screenshot.py [OUT.png]

Starts a chat server (``python -m trionet.serve chat``) on free ports, lets
two netcat-style members say a few things before anyone is on the page (so
the page shows them as history), opens a desktop page (alice) and a phone
page (bob) in Debian's /usr/bin/chromium through Playwright, plays a short
conversation (an action, private messages, a link, a leave) and puts the two
screenshots side by side, by showing them in one more page (no image library
needed). Times on the page are the real ones.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "chat-web.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Member:
    """A line client on a plain socket (as ``nc``)."""

    def __init__(self, port: int, nick: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.file.readline()  # WELCOME
        self.say(f"/nick {nick}")
        self.file.readline()  # OK nick

    def say(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")
        time.sleep(0.15)  # a conversation, not a burst (and flood control stays happy)


def main() -> None:
    port, web = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "trionet.serve", "chat", "--port", str(port), "--web-port", str(web)]
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", web), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{web}/"
        carol, dave = Member(port, "carol"), Member(port, "dave")
        carol.say("morning! the new build is up")
        dave.say("/me is making coffee")
        dave.say("changelog: https://example.org/trionet/changes")

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            desk = browser.new_context(viewport={"width": 900, "height": 560}).new_page()
            phone_context = browser.new_context(
                viewport={"width": 360, "height": 560}, is_mobile=True, has_touch=True
            )
            phone = phone_context.new_page()
            for page, nick in ((desk, "alice"), (phone, "bob")):
                page.goto(url)
                page.fill("#nick", nick)
                page.press("#nick", "Enter")
                expect(page.locator("body")).to_have_attribute("data-state", "joined")
                expect(page.locator("#log")).to_have_attribute("data-history", "done")
            carol.say("nice, I'm still on netcat")
            phone.fill("#line", "/me waves from a phone")
            phone.press("#line", "Enter")
            carol.say("/msg alice lunch at 1?")
            desk.fill("#line", "/msg carol sure")
            desk.press("#line", "Enter")
            carol.say("<img src=x onerror=alert(1)> shows as text, right?")
            desk.fill("#line", "yes: everything from the server is text, never HTML")
            desk.press("#line", "Enter")
            dave.say("/quit gotta run")
            expect(phone.locator("#log")).to_contain_text("dave left")
            expect(desk.locator("#log")).to_contain_text("dave left")
            desk.locator("#line").blur()
            shots = [base64.b64encode(pg.screenshot()).decode() for pg in (desk, phone)]

            board = browser.new_page(viewport={"width": 1320, "height": 600})
            board.set_content(
                '<body style="margin:0;background:#dfe1e4;display:flex;gap:20px;padding:20px">'
                + "".join(
                    f'<img style="box-shadow:0 2px 8px #0003" src="data:image/png;base64,{s}">'
                    for s in shots
                )
                + "</body>"
            )
            board.screenshot(path=str(OUT))
            browser.close()
        print(f"wrote {OUT}")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
