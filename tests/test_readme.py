"""The README's "write your own service" example: its test passes, and it runs.

The example is extracted from README.md itself, so the README cannot drift
from what works: it is imported and its own test run, served over TCP, run
as a real program (``python shout.py``) and stopped with SIGINT while a
client is connected, and run by name through ``python -m trionet.serve
shout:ShoutService``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import trio
import trio.testing
from conftest import Opened

import trionet
import trionet.testing

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def example_code() -> str:
    match = re.search(r"<!-- readme-example[^>]*-->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README example block not found"
    return match.group(1)


def example_pytest_ini() -> str:
    pattern = r"<!-- readme-pytest-ini[^>]*-->\n *```ini\n(.*?) *```"
    match = re.search(pattern, README.read_text(), re.S)
    assert match, "README pytest.ini block not found"
    return textwrap.dedent(match.group(1))


def load_example(tmp_path: Path) -> ModuleType:
    path = tmp_path / "shout.py"
    path.write_text(example_code())
    spec = importlib.util.spec_from_file_location("shout", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["shout"] = module
    spec.loader.exec_module(module)
    return module


def test_the_example_is_short() -> None:
    """A complete service, its test and its program in under 40 lines."""
    assert len(example_code().splitlines()) < 40


async def test_readme_example_test_passes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    shout = load_example(tmp_path)
    await shout.test_shout(autojump_clock)


def test_pytest_runs_the_example_as_the_readme_says(tmp_path: Path) -> None:
    """A user's folder: shout.py and the README's pytest.ini, then `pytest shout.py`."""
    (tmp_path / "shout.py").write_text(example_code())
    (tmp_path / "pytest.ini").write_text(example_pytest_ini())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}

    def pytest_shout() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "shout.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = pytest_shout()
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\b1 passed\b", done.stdout), done.stdout
    # Without the configuration, pytest refuses the async test: the snippet matters.
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    bare = pytest_shout()
    assert bare.returncode != 0


async def test_readme_example_over_tcp(tmp_path: Path, opened: Opened) -> None:
    shout = load_example(tmp_path)
    service = shout.ShoutService(port=0)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.serve, [service])
        host, port = addresses["shout"][0]
        with trio.fail_after(10):
            client = await opened.client(port, host)
            await client.send(b"one\r\ntwo\n")
            await client.expect("ONE!", "TWO!")
            await client.send_line("quit")  # built in: any case
            await client.expect("BYE")
            await client.expect_closed()
        assert service.lines == 2
        nursery.cancel_scope.cancel()


async def run_and_interrupt(
    cmd: list[str], cwd: Path, signum: int, opened: Opened
) -> tuple[int, str]:
    """Start ``cmd``, talk to the shout service, signal it with a client connected.

    Returns the exit status and stderr; checks the client got ``BYE shutdown``.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await trio.lowlevel.open_process(
        cmd, cwd=cwd, env=env, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stderr is not None
    err = bytearray()
    try:
        with trio.fail_after(20):
            while not (m := re.search(rb"shout listening on ([\d.]+):(\d+)", err)):
                chunk = await proc.stderr.receive_some()
                assert chunk, err.decode()
                err += chunk
            client = await opened.client(int(m[2]), m[1].decode())
            await client.send_line("hi")
            await client.expect("HI!")
            proc.send_signal(signum)
            await client.expect("BYE shutdown")
            await client.expect_closed()
            while chunk := await proc.stderr.receive_some():
                err += chunk
            status = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return status, err.decode()


async def test_readme_example_as_a_program(tmp_path: Path, opened: Opened) -> None:
    """``python shout.py``: logging, Ctrl-C with a client connected, exit 0, no traceback."""
    (tmp_path / "shout.py").write_text(example_code())
    status, err = await run_and_interrupt(
        [sys.executable, "shout.py", "--port", "0"], tmp_path, signal.SIGINT, opened
    )
    assert status == 0, err
    assert "SIGINT received: shutting down gracefully" in err
    assert re.search(r"shout 127\.0\.0\.1:\d+ #[a-z0-9]+-\d+ end=shutdown", err), err  # access log
    assert "Traceback" not in err


async def test_readme_example_by_name_from_trionet_serve(tmp_path: Path, opened: Opened) -> None:
    (tmp_path / "shout.py").write_text(example_code())
    status, err = await run_and_interrupt(
        [sys.executable, "-m", "trionet.serve", "shout:ShoutService", "--port", "0"],
        tmp_path,
        signal.SIGTERM,
        opened,
    )
    assert status == 0, err
    assert "Traceback" not in err
