"""The one entry point: ports per service, the config file, plugins, QUIT built in,
and type checking a user's service against an installed trionet.

Option layering is tested in-process through ``trionet.build_services`` (what
``run`` would run); plugins and port mapping also as real processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import trio
import trio.testing
from conftest import Opened

import trionet
from trionet import Connection, Service
from trionet.services.calc import CalcService
from trionet.services.chat import ChatService
from trionet.services.echo import EchoService
from trionet.services.guess import GuessService
from trionet.testing import open_memory_server

ROOT = Path(__file__).resolve().parents[2]


# -- ports -----------------------------------------------------------------------


def test_port_per_service() -> None:
    echo, calc = trionet.build_services(
        ["echo", "calc", "--port", "echo=17001", "--port", "calc=0"]
    )
    assert (echo.name, echo.effective_port, calc.name, calc.effective_port) == (
        "echo",
        17001,
        "calc",
        0,
    )
    (calc,) = trionet.build_services(["calc", "--port", "0"])
    assert calc.effective_port == 0
    # 0 alone means "a free port" for every service run.
    echo, calc = trionet.build_services(["echo", "calc", "--port", "0"])
    assert (echo.effective_port, calc.effective_port) == (0, 0)
    everything = trionet.build_services(["--port", "0", "--port", "chat=17003"])
    assert {s.name: s.effective_port for s in everything} == dict.fromkeys(
        ["echo", "guess", "files", "calc"], 0
    ) | {"chat": 17003}
    everything = trionet.build_services(["--port", "chat=17003"])
    assert [s.name for s in everything] == ["echo", "guess", "chat", "files", "calc"]
    assert {s.name: s.effective_port for s in everything}["chat"] == 17003


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["echo", "calc", "--port", "5"], "--port 5 with several services"),
        (["--port", "7777"], "use --port NAME=PORT for each"),
        (["echo", "--port", "calc=5"], "calc is not one of the services run"),
    ],
)
def test_port_mistakes_are_explained(argv: list[str], message: str) -> None:
    with pytest.raises(trionet.ConfigError, match=re.escape(message)):
        trionet.build_services(argv)


@pytest.mark.parametrize(
    "ports",
    [
        ["--port", "chat=0", "--port", "calc=0"]
        + [f"--port={n}=0" for n in ("echo", "guess", "files")],
        ["--port", "0"],  # what `scripts/serve --port 0` passes on
    ],
)
def test_several_services_moved_in_one_process(ports: list[str], tmp_path: Path) -> None:
    """The contract's example, as a process: every service off its default port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trionet.serve", "--root", str(tmp_path), *ports],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        seen: dict[str, int] = {}
        while len(seen) < 5:
            line = proc.stderr.readline()
            assert line, "server exited"
            if m := re.search(r"(\w+) listening on 127\.0\.0\.1:(\d+)$", line.strip()):
                seen[m[1]] = int(m[2])
        assert set(seen) == {"echo", "guess", "chat", "files", "calc"}
        assert all(port not in range(7001, 7006) for port in seen.values())
    finally:
        proc.send_signal(signal.SIGINT)
        status = proc.wait(20)
        proc.stderr.close()
        assert status == 0


# -- the config file ---------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "trionet.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_config_file_layers_under_the_command_line(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        """
        [common]
        services = ["chat", "guess"]
        idle-timeout = 600
        line-timeout = 20

        [chat]
        port = 17003
        rate = 2.5
        idle-timeout = 900

        [guess]
        host = "127.0.0.2"
        range = [1, 10]
        """,
    )
    chat, guess = trionet.build_services(["--config", config])
    assert isinstance(chat, ChatService) and isinstance(guess, GuessService)
    assert (chat.effective_port, chat.rate, chat.idle_timeout, chat.line_timeout) == (
        17003,
        2.5,
        900,
        20,
    )
    assert (guess.host, guess.lo, guess.hi, guess.idle_timeout) == ("127.0.0.2", 1, 10, 600)
    # Flags given on the command line win over the file, for every service.
    chat, guess = trionet.build_services(
        ["--config", config, "--idle-timeout", "5", "--port", "chat=0"]
    )
    assert (chat.idle_timeout, guess.idle_timeout, chat.effective_port) == (5, 5, 0)
    # Named services win over the file's list.
    (calc,) = trionet.build_services(["calc", "--config", config])
    assert isinstance(calc, CalcService) and calc.idle_timeout == 600


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[chat]\nrat = 5\n", "[chat] unknown key 'rat'"),
        ("[common]\nrate = 5\n", "[common] unknown key 'rate'"),  # chat's, not common
        ("[calc]\nrate = 5\n", "[calc] unknown key 'rate'"),  # chat's, not calc's
        ("[nope]\nport = 5\n", "unknown service table [nope]"),
        ("[chat]\nport = 70000\n", "[chat] port: must be 0..65535"),
        ("[chat]\nrate = 'fast'\n", "[chat] rate"),
        ("[common]\nidle-timeout = -1\n", "[common] idle-timeout: must be >= 0"),
        ("[guess]\nrange = [1]\n", "[guess] range: expected a list of 2 values"),
        ("[common\n", "trionet.toml"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path, text)
    with pytest.raises(trionet.ConfigError, match=re.escape(message)):
        trionet.build_services(["--config", config])


def test_config_errors_stop_the_process_with_one_line(tmp_path: Path) -> None:
    config = write(tmp_path, "[chat]\nrat = 5\n")
    done = subprocess.run(
        [sys.executable, "-m", "trionet.serve", "--config", config],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr.strip().endswith("[chat] unknown key 'rat'"), done.stderr
    assert "Traceback" not in done.stderr


def test_help_explains_the_config_file_and_every_option() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trionet.serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0
    for flag in (
        "--config",
        "--port",
        "NAME=PORT",
        "--workers",
        "--tls-cert",
        "--line-timeout",
        "--max-per-address",
        "--web-port",
        "[common]",
        "[chat]",
    ):
        assert flag in done.stdout, flag


def test_an_instance_keeps_its_settings_but_for_what_is_given() -> None:
    calc = CalcService(idle_timeout=42, max_line=100)
    (built,) = trionet.build_services(["--line-timeout", "7"], [calc])
    assert (built.idle_timeout, built.max_line, built.line_timeout) == (42, 100, 7)


# -- QUIT built in -------------------------------------------------------------------


@attrs.define(kw_only=True, eq=False)
class Plain(Service):
    """A line service with no quit handling of its own."""

    name: ClassVar[str] = "plain"

    async def handle(self, conn: Connection) -> None:
        async for line in conn:
            conn.write_line(f"got {line}")


@attrs.define(kw_only=True, eq=False)
class Farewell(Plain):
    name: ClassVar[str] = "farewell"
    quit_command: ClassVar[str | None] = "LOGOUT"

    async def on_quit(self, conn: Connection, reason: str) -> None:
        await conn.send_line(f"BYE {reason or 'then'}")


@attrs.define(kw_only=True, eq=False)
class NoQuit(Plain):
    name: ClassVar[str] = "noquit"
    quit_command: ClassVar[str | None] = None


async def test_quit_is_built_in(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="trionet.access")
    async with open_memory_server(Plain(), Farewell(), NoQuit()) as server:
        plain = await server.connect("plain")
        await plain.send(b"one\n  qUiT  \nnever\n")
        await plain.expect("got one", "BYE")
        await plain.expect_closed()
        farewell = await server.connect("farewell")
        await farewell.send_line("QUIT")
        await farewell.send_line("logout see you")
        await farewell.expect("got QUIT", "BYE see you")
        await farewell.expect_closed()
        noquit = await server.connect("noquit")
        await noquit.send_line("QUIT")
        await noquit.expect("got QUIT")
        await noquit.aclose()
    ends = [r.getMessage() for r in caplog.records if r.name == "trionet.access"]
    assert any(m.startswith("plain ") and "end=quit" in m for m in ends), ends
    assert any(m.startswith("farewell ") and "end=quit" in m for m in ends), ends


async def test_quit_over_tcp_for_every_line_service(opened: Opened) -> None:
    services = [
        GuessService(port=0),
        CalcService(port=0),
        ChatService(port=0),
        trionet.services.files.FilesService(port=0),
    ]
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.serve, services)
        with trio.fail_after(10):
            for name, command in [
                ("guess", "quit"),
                ("calc", "Quit"),
                ("files", "QUIT"),
                ("chat", "/quit"),
            ]:
                host, port = addresses[name][0]
                client = await opened.client(port, host)
                await client.send_line(command)
                lines = []
                while (line := await client.receive_line()) is not None:
                    lines.append(line)
                assert lines[-1] == "BYE", (name, lines)
        nursery.cancel_scope.cancel()


def test_echo_has_no_quit() -> None:
    assert EchoService().line_based is False  # raw bytes: "QUIT" is echoed like any bytes


# -- plugins -----------------------------------------------------------------------


PLUGIN = '''
"""A throwaway plugin: a key-value store, with an option and a client."""
import argparse
import sys
from typing import Any, ClassVar

import attrs
import trio

import trionet


@attrs.define(kw_only=True, eq=False)
class KVService(trionet.Service):
    """Keeps keys and values for every client.

    (No summary: --help shows the first line above.)
    """

    name: ClassVar[str] = "kv"
    default_port: ClassVar[int] = 7199
    max_keys: int = 2
    data: dict[str, str] = attrs.field(factory=dict)

    async def handle(self, conn: trionet.Connection) -> None:
        async for line in conn:
            word, _, rest = line.partition(" ")
            if word == "SET":
                key, _, value = rest.partition(" ")
                if key not in self.data and len(self.data) >= self.max_keys:
                    conn.write_line("ERR full")
                else:
                    self.data[key] = value
                    conn.write_line("OK")
            elif word == "GET":
                conn.write_line(f"VALUE {self.data.get(rest, '')}")

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        group.add_argument("--max-keys", type=int, default=2)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **common: Any) -> "KVService":
        return cls(max_keys=args.max_keys, **common)


def client_main(argv: list[str]) -> int:
    port, *words = argv

    async def main() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", int(port))
        await stream.send_all((" ".join(words) + "\\nQUIT\\n").encode())
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
        sys.stdout.write(data.decode())

    trio.run(main)
    return 0
'''


def install_plugin(where: Path) -> dict[str, str]:
    """A plugin "installed" on a path entry: its module and its distribution metadata."""
    (where / "trionet_kv.py").write_text(PLUGIN)
    info = where / "trionet_kv-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: trionet-kv\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[trionet.services]\nkv = trionet_kv:KVService\n\n"
        "[trionet.clients]\nkv = trionet_kv:client_main\n"
    )
    return {**os.environ, "PYTHONPATH": f"{where}{os.pathsep}{ROOT}"}


def test_a_plugin_is_served_and_its_client_runs_by_name(tmp_path: Path) -> None:
    env = install_plugin(tmp_path)
    help_text = subprocess.run(
        [sys.executable, "-m", "trionet.serve", "kv", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "--max-keys" in help_text
    assert re.search(r"kv +port 7199 +Keeps keys and values for every client\.\n", help_text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trionet.serve", "kv", "--port", "0", "--max-keys", "1"],
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        while not (m := re.search(r"kv listening on 127\.0\.0\.1:(\d+)", proc.stderr.readline())):
            assert proc.poll() is None, "server exited"
        port = m[1]

        def client(*words: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "trionet.client", "kv", port, *words],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        assert client("SET", "a", "1") == "OK\nBYE\n"
        assert client("SET", "b", "2") == "ERR full\nBYE\n"  # --max-keys 1 reached it
        assert client("GET", "a") == "VALUE 1\nBYE\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(20)
        proc.stderr.close()
        assert status == 0


def test_two_classes_under_one_name_are_an_error(tmp_path: Path) -> None:
    """A user's module:Class may not be shadowed by (or shadow) an installed plugin."""
    env = install_plugin(tmp_path)
    (tmp_path / "mykv.py").write_text(
        "from typing import ClassVar\nimport trionet\n\n"
        "class MyKV(trionet.Service):\n    name: ClassVar[str] = 'kv'\n"
    )

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trionet.serve", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )

    clash = serve("mykv:MyKV", "--port", "0")
    assert clash.returncode == 1
    assert "two different services are named 'kv'" in clash.stderr
    assert "trionet_kv:KVService" in clash.stderr and "mykv:MyKV" in clash.stderr
    # The same class by its entry point and by its path is one service.
    same = serve("trionet_kv:KVService", "kv", "--help")
    assert same.returncode == 0 and "--max-keys" in same.stdout, same.stderr


def test_unknown_service_names_what_is_installed() -> None:
    with pytest.raises(trionet.PluginError, match=r"unknown service 'nope'.*calc"):
        trionet.build_services(["nope"])
    with pytest.raises(trionet.PluginError, match="cannot import 'no_such_module'"):
        trionet.build_services(["no_such_module:Thing"])


# -- a user's project, type-checked against the installed trionet ---------------------


def test_mypy_strict_checks_a_users_service_outside_the_source_tree(tmp_path: Path) -> None:
    user = tmp_path / "my_service.py"
    user.write_text(
        textwrap.dedent(
            """
            import sys
            from typing import ClassVar

            import attrs

            import trionet
            from trionet.testing import open_memory_server


            @attrs.define(kw_only=True, eq=False)
            class Hello(trionet.Service):
                name: ClassVar[str] = "hello"

                async def handle(self, conn: trionet.Connection) -> None:
                    async for line in conn:
                        conn.write_line(f"hello {line}")


            async def check() -> None:
                async with open_memory_server(Hello()) as server:
                    client = await server.connect()
                    await client.send_line("x")
                    await client.expect("hello x")


            if __name__ == "__main__":
                sys.exit(trionet.run([Hello], argv=sys.argv[1:]))
            """
        )
    )
    bad = tmp_path / "bad_service.py"
    bad.write_text("import trionet\n\nx: int = trionet.run([])  # fine\ny: str = trionet.run([])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    good = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "my_service.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert good.returncode == 0, good.stdout + good.stderr
    wrong = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "bad_service.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # trionet was found and its types used: the wrong assignment is caught.
    assert (
        wrong.returncode == 1
        and 'Incompatible types in assignment (expression has type "int"' in wrong.stdout
    ), wrong.stdout
