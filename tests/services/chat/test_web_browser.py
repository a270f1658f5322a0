"""The chat page in a real browser: headless Chromium (Debian's /usr/bin/chromium),
driven by Playwright, next to a raw TCP client like nc.

These tests are synchronous (Playwright's sync API runs its own event loop);
the chat server runs with trio in a thread of the test process. scripts/test
installs Debian's chromium when it is missing; Playwright never downloads a
browser here.
"""

from __future__ import annotations

import queue
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import trionet
from trionet import Connection, Service
from trionet.services.chat.server import WELCOME, ChatService
from trionet.services.chat.web import open_web_listeners

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "needs Chromium at /usr/bin/chromium (Debian package 'chromium'; scripts/test "
        "installs it when run as root with apt-get)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Two names for this machine, as DNS could give them: one the chat is
    # told about (--web-host-name), one a rebinding attacker's.
    "--host-resolver-rules=MAP chat.example 127.0.0.1, MAP evil.example 127.0.0.1",
    # Chromium's own checks on a public page reaching a local address would
    # stop the rebinding attack before the server sees it; browsers without
    # them (Firefox, Safari) let it through, so the server must refuse it.
    "--disable-features=BlockInsecurePrivateNetworkRequests,"
    "PrivateNetworkAccessSendPreflights,LocalNetworkAccessChecks",
]
TIMEOUT_MS = 5000


# -- a server in a thread, a browser, a raw TCP client -------------------------------


@attrs.define
class ThreadServer:
    """A trionet server whose trio runs in a thread of its own."""

    server: trionet.Server
    addresses: dict[str, list[tuple[str, int]]]
    token: trio.lowlevel.TrioToken

    def port(self, label: str) -> int:
        return self.addresses[label][0][1]

    def shutdown(self) -> None:
        """Begin the graceful shutdown (as SIGTERM does), from the test's thread."""
        trio.from_thread.run_sync(self.server.shutdown, trio_token=self.token)


@contextmanager
def serve_in_thread(service: Service) -> Iterator[ThreadServer]:
    """Run ``service`` until the block ends; no browser call ever blocks trio."""
    server = trionet.Server([service])
    started: queue.Queue[ThreadServer] = queue.Queue()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.run)
            started.put(ThreadServer(server, addresses, trio.lowlevel.current_trio_token()))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    running = started.get(timeout=10)
    try:
        yield running
    finally:
        if not server.shutting_down:
            running.shutdown()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One Chromium for the module, with a fresh profile; pages are its tabs."""
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            timeout=30_000,
            viewport={"width": 1000, "height": 700},
        )
        ctx.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        try:
            yield ctx
        finally:
            ctx.close()


@pytest.fixture
def pages(context: Any) -> Iterator[list[Any]]:
    """Open tabs, each recording the dialogs it was shown; closed after the test."""
    opened: list[Any] = []
    yield opened
    for page in opened:
        page.close()


def open_page(context: Any, pages: list[Any], url: str, nick: str | None) -> Any:
    page = context.new_page()
    page.dialogs = []  # an alert() would land here (and fail the test)

    def on_dialog(dialog: Any) -> None:
        page.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    pages.append(page)
    page.goto(url)
    if nick is not None:
        page.fill("#nick", nick)
        page.press("#nick", "Enter")
        expect(page.locator("body")).to_have_attribute("data-state", "joined")
    return page


def expect_said(page: Any, kind: str, nick: str, text: str) -> None:
    """The page's newest line of ``kind`` (msg, action, priv) is ``nick``: ``text``."""
    line = page.locator(f"#log li.{kind}").last
    expect(line.locator(".text")).to_have_text(text)
    expect(line.locator(".nick")).to_have_text(nick)


def say(page: Any, line: str) -> None:
    page.fill("#line", line)
    page.press("#line", "Enter")


class Nc:
    """A line client on a plain socket, as ``nc 127.0.0.1 PORT`` would be."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_MS / 1000)
        self.buf = b""

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n")

    def receive_line(self) -> str:
        """The next line (the socket's timeout bounds each wait)."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, f"the server closed; unfinished line {self.buf!r}"
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\n", 1)
        return raw.decode()

    def wait_for(self, want: str) -> list[str]:
        """Read lines until ``want``; returns the lines before it."""
        seen: list[str] = []
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while (line := self.receive_line()) != want:
            seen.append(line)
            assert time.monotonic() < deadline, f"no {want!r} in time; got {seen}"
        return seen

    def close(self) -> None:
        self.sock.close()


@contextmanager
def chat_server(**options: Any) -> Iterator[tuple[ThreadServer, int, str]]:
    """A chat with its web page; yields the server, its TCP port and the page's URL."""
    with serve_in_thread(ChatService(port=0, web_port=0, **options)) as running:
        yield running, running.port("chat"), f"http://127.0.0.1:{running.port('chat web')}/"


# -- the tests ---------------------------------------------------------------------------


def test_two_pages_and_nc_talk(context: Any, pages: list[Any]) -> None:
    with chat_server() as (_, port, url):
        alice = open_page(context, pages, url, "alice")
        bob = open_page(context, pages, url, "bob")
        expect(alice.locator("#log")).to_contain_text("bob joined")

        nc = Nc(port)
        nc.wait_for(WELCOME)
        nc.send("/nick carol")
        nc.wait_for("OK nick carol")
        for page in (alice, bob):
            expect(page.locator("#log")).to_contain_text("carol joined")
            expect(page.locator("#members li")).to_have_text(
                [re.compile("alice"), re.compile("bob"), re.compile("carol")]
            )

        # A page's own message: shown by the page itself, relayed to the others.
        say(alice, "hello from alice")
        expect(alice.locator("#log li.own")).to_contain_text("hello from alice")
        expect_said(bob, "msg", "alice", "hello from alice")
        nc.wait_for("MSG alice hello from alice")

        say(bob, "/me waves")
        expect_said(alice, "action", "bob", "waves")
        nc.wait_for("ACTION bob waves")

        nc.send("/msg alice psst")
        expect_said(alice, "priv", "carol", "psst")
        nc.send("hello from nc")
        expect_said(bob, "msg", "carol", "hello from nc")
        expect(bob.locator("#log")).not_to_contain_text("psst")  # private stays private

        # Hostile text is shown as text: no element made of it, no script run.
        hostile = "<img src=x onerror=alert(1)><b>bold</b>"
        nc.send(hostile)
        for page in (alice, bob):
            expect_said(page, "msg", "carol", hostile)
            assert page.locator("img").count() == 0
            assert page.locator("#log b").count() == 0
        alice.wait_for_timeout(300)  # room for an onerror to fire, were there one
        assert alice.dialogs == [] and bob.dialogs == []

        say(bob, "/nick bobby")
        expect(alice.locator("#log")).to_contain_text("bob is now bobby")
        nc.wait_for("NICK bob bobby")
        expect(alice.locator("#members li")).to_have_text(
            [re.compile("alice"), re.compile("bobby"), re.compile("carol")]
        )

        nc.send("/quit")
        nc.wait_for("BYE")
        nc.close()
        expect(alice.locator("#log")).to_contain_text("carol left")
        expect(alice.locator("#members li")).to_have_count(2)


def test_late_joiner_sees_history_or_none(context: Any, pages: list[Any]) -> None:
    """With /history the earlier messages are shown; without it, no error either."""
    with chat_server() as (_, port, url):
        nc = Nc(port)
        nc.wait_for(WELCOME)
        nc.send("/nick carol")
        nc.wait_for("OK nick carol")
        nc.send("said before you came")
        nc.send("/me was here")
        nc.send("/history 1")  # does this server keep history?
        reply = nc.receive_line()
        while reply.startswith("HIST "):
            reply = nc.receive_line()
        late = open_page(context, pages, url, "dora")
        expect(late.locator("#log")).to_have_attribute("data-history", re.compile("done|none"))
        if reply.startswith("OK history"):
            box = late.locator("#log li.history")
            expect(box).to_contain_text("said before you came")
            expect(box.locator("li.action")).to_contain_text("was here")
        else:
            expect(late.locator("#log")).to_have_attribute("data-history", "none")
        assert late.locator("#log .notice.error").count() == 0
        nc.close()


def test_history_is_shown_once(context: Any, pages: list[Any]) -> None:
    """HIST lines render as earlier messages, without repeating a message that
    arrived live between joining and the history's answer."""
    with serve_in_thread(ScriptedHistory(port=0)) as running:
        url = f"http://127.0.0.1:{running.port('scripted web')}/"
        page = open_page(context, pages, url, "dora")
        expect(page.locator("#log")).to_have_attribute("data-history", "done")
        box = page.locator("#log li.history li")
        expect(box.locator(".text")).to_have_text(["first", "waves"])
        expect(box.nth(1)).to_have_class("action")
        expect(page.locator("#log li.history")).to_contain_text("earlier messages")
        expect(page.locator("#log li.msg:not(li.history li)")).to_have_count(1)
        expect(page.locator("#members li")).to_have_text([re.compile("dora"), re.compile("old")])


def test_shutdown_notice_and_reconnect(context: Any, pages: list[Any]) -> None:
    with chat_server() as (server, _, url):
        page = open_page(context, pages, url, "alice")
        web_port = int(url.rsplit(":", 1)[1].strip("/"))
        say(page, "before the restart")
        server.shutdown()
        expect(page.locator("#banner")).to_be_visible()
        expect(page.locator("#banner-text")).to_have_text("The server shut down.")
        expect(page.locator("#reconnect")).to_be_visible()
        expect(page.locator("#line")).to_be_disabled()
    # A new server on the same port: the button rejoins with the same nick.
    with serve_in_thread(ChatService(port=0, web_port=web_port)):
        page.click("#reconnect")
        expect(page.locator("body")).to_have_attribute("data-state", "joined")
        expect(page.locator("#status")).to_have_text("connected as alice")
        expect(page.locator("#banner")).to_be_hidden()
        expect(page.locator("#log")).to_contain_text("before the restart")  # kept


def test_page_by_its_names_and_not_after_dns_rebinding(context: Any, pages: list[Any]) -> None:
    """Issue 19: a page from evil.example whose name then resolves to this
    machine (DNS rebinding) must not join; the page by the names it is
    served under still does."""
    with chat_server(web_host_names=("chat.example",)) as (_, _, url):
        web = int(url.rsplit(":", 1)[1].strip("/"))
        alice = open_page(context, pages, f"http://localhost:{web}/", "alice")
        bob = open_page(context, pages, f"http://chat.example:{web}/", "bob")
        say(bob, "hi from a name")
        expect_said(alice, "msg", "bob", "hi from a name")
        # The attacker's page, as evil.example serves it before the rebinding
        # (fulfilled by the browser here: nothing is fetched from anywhere).
        evil = context.new_page()
        pages.append(evil)
        evil.route(
            f"http://evil.example:{web}/",
            lambda route: route.fulfill(status=200, content_type="text/html", body="<p>evil</p>"),
        )
        evil.goto(f"http://evil.example:{web}/")
        outcome = evil.evaluate(
            """url => new Promise(done => {
                const ws = new WebSocket(url);
                ws.onmessage = (e) => done("joined: " + e.data);
                ws.onerror = () => done("refused");
            })""",
            f"ws://evil.example:{web}/ws",
        )
        assert outcome == "refused"
        # Nor does the page itself load under that name.
        evil.unroute(f"http://evil.example:{web}/")
        response = evil.goto(f"http://evil.example:{web}/")
        assert response is not None and response.status == 403


def test_phone_width(context: Any, pages: list[Any]) -> None:
    with chat_server() as (_, _, url):
        page = open_page(context, pages, url, None)
        page.set_viewport_size({"width": 360, "height": 720})
        page.fill("#nick", "a-rather-long-nick_for_a_phone")
        page.press("#nick", "Enter")
        expect(page.locator("body")).to_have_attribute("data-state", "joined")
        say(page, "a long line " * 20)
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        expect(page.locator("#members-panel")).to_be_hidden()
        page.click("#members-toggle")
        expect(page.locator("#members-panel")).to_be_visible()
        expect(page.locator("#members li")).to_have_count(1)


class ScriptedHistory(Service):
    """A fake chat that answers the page's first lines with a fixed script:
    a live message arrives before the history, which repeats it last."""

    name = "scripted"

    async def handle(self, conn: Connection) -> None:
        await conn.send_line(WELCOME)
        while (line := await conn.receive_line()) is not None:
            if line.startswith("/nick "):
                await conn.send_line(f"OK nick {line[6:]}")
            elif line == "/who":
                await conn.send_line("MSG old newest")  # live, before the history
                await conn.send_line("WHO dora old")
            elif line == "/history":
                for hist in ("MSG old first", "ACTION old waves", "MSG old newest"):
                    await conn.send_line(f"HIST 1700000000000 {hist}")
                await conn.send_line("OK history 3")

    async def open_extra_listeners(self, host: str) -> list[trio.abc.Listener[Any]]:
        self.web = await open_web_listeners(host, 0)
        return list(self.web)

    async def run_background(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            for listener in self.web:
                await nursery.start(listener.run)
            task_status.started()
