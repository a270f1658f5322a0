"""The chat page in a real browser: headless Chromium (Debian's /usr/bin/chromium),
driven by Playwright, next to a raw TCP client like nc.

These tests are synchronous (Playwright's sync API runs its own event loop);
the chat server runs with trio in a thread of the test process. One Chromium
serves the module; each person on the page gets a browser context of their
own (their own localStorage, where the page keeps the nick to rejoin with). scripts/test
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
from typing import Any, Final

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
def browser() -> Iterator[Any]:
    """One Chromium for the module; each person gets a context of their own."""
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=ARGS, timeout=30_000
        )
        expect.set_options(timeout=TIMEOUT_MS)
        try:
            yield launched
        finally:
            launched.close()


class People:
    """Browser contexts, one per person (their own storage: the remembered
    nick is theirs), and the tabs opened in them; closed after the test."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser
        self.contexts: list[Any] = []

    def open(self, url: str, nick: str | None, *, context: Any = None, phone: bool = False) -> Any:
        """A new tab at ``url`` (in a new person's context unless ``context``
        is given), joined as ``nick`` unless that is None."""
        if context is None:
            size = {"width": 360, "height": 640} if phone else {"width": 1000, "height": 700}
            context = self.browser.new_context(viewport=size, is_mobile=phone, has_touch=phone)
            context.set_default_timeout(TIMEOUT_MS)
            self.contexts.append(context)
        page = context.new_page()
        page.dialogs = []  # an alert() would land here (and fail the test)

        def on_dialog(dialog: Any) -> None:
            page.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.goto(url)
        if nick is not None:
            page.fill("#nick", nick)
            page.press("#nick", "Enter")
            expect(page.locator("body")).to_have_attribute("data-state", "joined")
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def people(browser: Any) -> Iterator[People]:
    opened = People(browser)
    yield opened
    opened.close()


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


def test_two_pages_and_nc_talk(people: People) -> None:
    with chat_server() as (_, port, url):
        alice = people.open(url, "alice")
        bob = people.open(url, "bob")
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


def test_late_joiner_sees_history_or_none(people: People) -> None:
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
        late = people.open(url, "dora")
        expect(late.locator("#log")).to_have_attribute("data-history", re.compile("done|none"))
        if reply.startswith("OK history"):
            box = late.locator("#log li.history")
            expect(box).to_contain_text("said before you came")
            expect(box.locator("li.action")).to_contain_text("was here")
        else:
            expect(late.locator("#log")).to_have_attribute("data-history", "none")
        assert late.locator("#log .notice.error").count() == 0
        nc.close()


def texts(page: Any) -> list[str]:
    """The text of every message and action on the page, in order."""
    return page.locator("#log li.msg .text, #log li.action .text").all_text_contents()


def test_history_dates_colours_and_a_rejoin_without_repeats(people: People) -> None:
    """Earlier messages come under a heading, with a date line per day, the
    live line that is also the history's newest shown once, and distinct
    colours for the most recent speakers; after the connection drops the
    page rejoins by itself and adds only what it had not shown."""
    with serve_in_thread(ScriptedHistory(port=0)) as running:
        url = f"http://127.0.0.1:{running.port('scripted web')}/"
        page = people.open(url, "dora")
        expect(page.locator("#log")).to_have_attribute("data-history", "done")
        box = page.locator("#log li.history")
        expect(box.locator("p")).to_have_text("earlier messages")
        expect(box.locator("li.action")).to_have_text(re.compile(r"\*\s*old waves$"))
        expect(box.locator("li.older")).to_have_count(len(ScriptedHistory.FIRST) - 1)
        expect(box.locator("li.own")).to_have_text([re.compile("dora said this before")])
        assert texts(page) == [line.split(" ", 3)[3] for line in ScriptedHistory.FIRST]
        # A date line where the day changes (and today's after the history).
        dates = page.locator("#log li.date").all_text_contents()
        assert len(dates) == 3 and "2023" in dates[0] and "2023" in dates[1], dates
        # The 16 most recent speakers have 16 different colours.
        colours = page.evaluate(
            """() => {
                const last = new Map();  // nick -> colour of its newest line
                const said = "#log li.msg .nick, #log li.action .nick";
                for (const el of document.querySelectorAll(said)) {
                    last.delete(el.textContent);
                    last.set(el.textContent, getComputedStyle(el).color);
                }
                return [...last.values()].slice(-16);
            }"""
        )
        assert len(colours) == 16 and len(set(colours)) == 16, colours
        expect(page.locator("#members li")).to_have_text([re.compile("dora"), re.compile("old")])

        say(page, "/drop")  # the fake server closes the connection
        expect(page.locator("#status")).to_have_text(re.compile("reconnecting"))
        expect(page.locator("#log li.divider")).to_have_text("— reconnected as dora —")
        expect(page.locator("#log")).to_have_attribute("data-history", "done")
        away = page.locator("#log li.history").last
        expect(away.locator("p")).to_have_text("2 messages while you were away")
        expect(page.locator("#status")).to_have_text("connected as dora")
        # "ok" was said again while away: shown twice, as it was said twice;
        # "newest" and "live again" once each.
        assert texts(page) == [
            *(line.split(" ", 3)[3] for line in ScriptedHistory.FIRST),
            "ok",
            "while away",
            "live again",
        ]
        # The view followed all along (through the banner coming and going).
        expect(page.locator("#log li.msg").last).to_be_in_viewport()
        assert page.dialogs == []


def test_restart_rejoins_by_itself_and_reload_remembers(people: People) -> None:
    with chat_server() as (server, _, url):
        alice = people.open(url, "alice")
        bob = people.open(url, "bob")
        web_port = int(url.rsplit(":", 1)[1].strip("/"))
        say(alice, "before the restart")
        expect_said(bob, "msg", "alice", "before the restart")
        server.shutdown()
        for page in (alice, bob):
            expect(page.locator("#banner-text")).to_contain_text("The server shut down.")
            expect(page.locator("#line")).to_be_disabled()
            expect(page.locator("#line")).to_have_attribute("placeholder", re.compile("reconnect"))
            expect(page.locator("body")).to_have_class(re.compile("offline"))  # members greyed
            expect(page.locator("#members-title")).to_contain_text("before the disconnect")
    # A new server on the same port: both pages rejoin, no click, within 5 s
    # (back-off: the first try after about 1 s, the next about 2 s later).
    with serve_in_thread(ChatService(port=0, web_port=web_port)) as restarted:
        started = time.monotonic()
        for page, nick in ((alice, "alice"), (bob, "bob")):
            expect(page.locator("#status")).to_have_text(f"connected as {nick}", timeout=5000)
        assert time.monotonic() - started < 5 + 1  # (+1: the expect's own polling)
        for page in (alice, bob):
            expect(page.locator("#banner")).to_be_hidden()
            expect(page.locator("body")).not_to_have_class(re.compile("offline"))
            expect(page.locator("#members li")).to_have_count(2)
        say(alice, "after the restart")
        expect_said(bob, "msg", "alice", "after the restart")
        for page in (alice, bob):
            assert texts(page) == ["before the restart", "after the restart"]

        # A reload, and a new tab once the old one is closed, rejoin with the nick.
        bob.reload()
        expect(bob.locator("#status")).to_have_text("connected as bob")
        expect(bob.locator("#join")).to_be_hidden()
        context = alice.context
        alice.close()
        again = people.open(url, None, context=context)
        expect(again.locator("#status")).to_have_text("connected as alice")
        nc = Nc(restarted.port("chat"))
        nc.wait_for(WELCOME)
        nc.send("/nick carol")
        nc.send("/who")
        nc.wait_for("WHO alice bob carol")
        nc.close()


def test_page_by_its_names_and_not_after_dns_rebinding(people: People) -> None:
    """Issue 19: a page from evil.example whose name then resolves to this
    machine (DNS rebinding) must not join; the page by the names it is
    served under still does."""
    with chat_server(web_host_names=("chat.example",)) as (_, _, url):
        web = int(url.rsplit(":", 1)[1].strip("/"))
        alice = people.open(f"http://localhost:{web}/", "alice")
        bob = people.open(f"http://chat.example:{web}/", "bob")
        say(bob, "hi from a name")
        expect_said(alice, "msg", "bob", "hi from a name")
        # The attacker's page, as evil.example serves it before the rebinding
        # (fulfilled by the browser here: nothing is fetched from anywhere).
        evil = alice.context.new_page()
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


def test_phone_reader_follows_the_conversation(people: People) -> None:
    """On a phone, after joining a room with 40 earlier lines the newest is in
    view and so is each new one; a reader scrolled up stays where they are and
    gets a "new messages" button; a hidden tab counts unread lines in its title."""
    with chat_server(rate=0) as (_, port, url):
        nc = Nc(port)
        nc.wait_for(WELCOME)
        nc.send("/nick carol")
        for i in range(40):
            nc.send(f"earlier line {i}")
        nc.send("/history 1")
        nc.wait_for("OK history 1")
        page = people.open(url, "phone", phone=True)
        expect(page.locator("#log")).to_have_attribute("data-history", "done")
        line = page.locator("#log li.msg")
        expect(line.filter(has_text="earlier line 39")).to_be_in_viewport()
        expect(line.filter(has_text="earlier line 0")).not_to_be_in_viewport()
        nc.send("said after joining")
        expect(line.filter(has_text="said after joining")).to_be_in_viewport()
        say(page, "my own reply")
        expect(line.filter(has_text="my own reply")).to_be_in_viewport()

        # The reader scrolls up (the handler runs now, not at the next frame).
        page.evaluate(
            "log = document.getElementById('log'); log.scrollTop = 200;"
            "log.dispatchEvent(new Event('scroll'))"
        )
        nc.send("while reading 1")
        nc.send("while reading 2")
        expect(page.locator("#jump")).to_have_text("2 new messages ↓")
        assert page.evaluate("document.getElementById('log').scrollTop") == 200
        expect(line.filter(has_text="while reading 2")).not_to_be_in_viewport()
        expect(page.locator("#log li.unread + li")).to_contain_text("while reading 1")
        page.click("#jump")
        expect(line.filter(has_text="while reading 2")).to_be_in_viewport()
        expect(page.locator("#jump")).to_be_hidden()

        # The tab is hidden: its title counts what arrives.
        page.evaluate(VISIBILITY, True)
        nc.send("while away 1")
        nc.send("/me while away 2")
        expect(page).to_have_title("(2) trionet chat")
        page.evaluate(VISIBILITY, False)
        expect(page).to_have_title("trionet chat")
        expect(page.locator("#log li.unread + li")).to_contain_text("while away 1")
        nc.close()


# As a browser does when the tab goes to the background (or comes back).
VISIBILITY = """(hidden) => {
    Object.defineProperty(document, "hidden", { configurable: true, get: () => hidden });
    Object.defineProperty(document, "visibilityState",
        { configurable: true, get: () => (hidden ? "hidden" : "visible") });
    document.dispatchEvent(new Event("visibilitychange"));
}"""


def test_keys_clicks_links_help_and_history(people: People) -> None:
    with chat_server() as (_, _, url):
        alice = people.open(url, "alice")
        bob = people.open(url, "bob")
        expect(alice.locator("#members li")).to_have_count(2)
        say(alice, "first line")
        say(alice, "second line")
        field = alice.locator("#line")
        # Up and Down bring back what was sent; Down past the newest, the draft.
        field.fill("a draft")
        for key, want in [
            ("ArrowUp", "second line"),
            ("ArrowUp", "first line"),
            ("ArrowUp", "first line"),
            ("ArrowDown", "second line"),
            ("ArrowDown", "a draft"),
        ]:
            field.press(key)
            expect(field).to_have_value(want)
        # Tab completes nicks (with ": " first on the line) and commands.
        for typed, want in [
            ("b", "bob: "),
            ("/msg B", "/msg bob "),
            ("/hi", "/history "),
            ("zz", "zz"),
        ]:
            field.fill(typed)
            field.press("Tab")
            expect(field).to_have_value(want)
        field.fill("")

        # A clicked nick (in the conversation or the member list) starts a /msg.
        web = f"http://127.0.0.1:{url.rsplit(':', 1)[1].strip('/')}/nowhere"
        say(bob, f"see https://example.invalid/a_(b). or {web}, not javascript:alert(1)")
        said = alice.locator("#log li.msg").last
        # (The locator is lazy: wait for bob's line, not alice's own before it.)
        expect(said.locator(".nick")).to_have_text("bob")
        said.locator(".nick").click()
        expect(field).to_have_value("/msg bob ")
        field.fill("")
        alice.locator("#members .nick", has_text="bob").click()
        expect(field).to_have_value("/msg bob ")
        field.fill("")

        # Links: http(s) only, opened apart from this page.
        links = said.locator("a")
        expect(links).to_have_text(["https://example.invalid/a_(b)", web])
        assert [links.nth(i).get_attribute("href") for i in range(2)] == [
            "https://example.invalid/a_(b)",
            web,
        ]
        for i in range(2):
            assert links.nth(i).get_attribute("rel") == "noopener noreferrer"
            assert links.nth(i).get_attribute("target") == "_blank"
        expect(said.locator(".text")).to_contain_text("not javascript:alert(1)")
        assert alice.locator("a[href^='javascript']").count() == 0
        with alice.context.expect_page() as opened:
            links.nth(1).click()
        popup = opened.value
        expect(popup.locator("body")).to_have_text("404 not found")
        assert popup.evaluate("window.opener") is None
        popup.close()

        # /help explains each command.
        say(alice, "/help")
        help_terms = alice.locator("#log li.help dt")
        expect(help_terms.first).to_have_text("/nick NAME")
        expect(alice.locator("#log li.help dd").nth(2)).to_contain_text("private message")
        expect(help_terms).to_have_count(
            7 + 3  # the server's seven commands, three keys
        )

        # /history typed by hand: a heading first, older lines, yours marked.
        say(alice, "/history 3")
        box = alice.locator("#log li.history").last
        expect(box.locator("p")).to_have_text("the last 3 messages (/history)")
        expect(box.locator("li.older")).to_have_count(3)
        expect(box.locator("li.older").last).to_be_in_viewport()  # the view followed
        expect(box.locator("li.own .text")).to_have_text(["first line", "second line"])
        assert box.evaluate("box => box.firstElementChild.tagName") == "P"
        assert alice.dialogs == [] and bob.dialogs == []


def test_phone_width(people: People) -> None:
    with chat_server() as (_, _, url):
        page = people.open(url, None, phone=True)
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
    """A fake chat that answers the page with a fixed script. On the first
    connection a live message arrives before the history, which repeats it
    last; ``/drop`` closes the connection; on the next one the history
    overlaps what was shown, with two new lines and a live one."""

    name = "scripted"
    #: The first history: two lines on one day of 2023, 20 other speakers the
    #: next day (and dora herself), then s03 again, s21, "ok" and "newest".
    FIRST: Final = [
        "1700000000000 MSG old first",
        "1700000001000 ACTION old waves",
        *(f"1700090000000 MSG s{i:02} line {i}" for i in range(1, 21)),
        "1700090000000 MSG dora dora said this before",
        "1700090000000 MSG s03 again",
        "1700090000000 MSG s21 newcomer",
        "1700090000000 MSG old ok",
        "1700090000000 MSG old newest",
    ]
    #: The history after the reconnect: the end of the first, then new lines.
    SECOND: Final = [
        "1700090000000 MSG old ok",
        "1700090000000 MSG old newest",
        "1700090500000 MSG old ok",
        "1700090500000 MSG old while away",
        "1700090500000 MSG old live again",
    ]

    connections = 0

    async def handle(self, conn: Connection) -> None:
        type(self).connections += 1
        first = self.connections == 1
        await conn.send_line(WELCOME)
        while (line := await conn.receive_line()) is not None:
            if line.startswith("/nick "):
                await conn.send_line(f"OK nick {line[6:]}")
            elif line == "/who":
                live = "MSG old newest" if first else "MSG old live again"
                await conn.send_line(live)  # live, before the history
                await conn.send_line("WHO dora old")
            elif line.startswith("/history"):
                lines = self.FIRST if first else self.SECOND
                for hist in lines:
                    await conn.send_line(f"HIST {hist}")
                await conn.send_line(f"OK history {len(lines)}")
            elif line == "/drop":
                return

    async def open_extra_listeners(self, host: str) -> list[trio.abc.Listener[Any]]:
        self.web = await open_web_listeners(host, 0)
        return list(self.web)

    async def run_background(self, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            for listener in self.web:
                await nursery.start(listener.run)
            task_status.started()
