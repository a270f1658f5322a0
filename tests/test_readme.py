"""The README's "write your own service" example runs, and its test passes.

The example is extracted from README.md itself, so the README cannot drift
from what works.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import trio
import trio.testing

import trionet
import trionet.testing

README = Path(__file__).resolve().parent.parent / "README.md"


def load_example(tmp_path: Path) -> ModuleType:
    text = README.read_text()
    match = re.search(r"<!-- readme-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "README example block not found"
    code = match.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 40
    path = tmp_path / "shout.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("shout", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["shout"] = module
    spec.loader.exec_module(module)
    return module


async def test_readme_example_test_passes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    shout = load_example(tmp_path)
    await shout.test_shout(autojump_clock)


async def test_readme_example_over_tcp(tmp_path: Path) -> None:
    shout = load_example(tmp_path)
    service = shout.ShoutService(port=0)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(trionet.serve, [service])
        host, port = addresses["shout"][0]
        with trio.fail_after(10):
            client = trionet.testing.Client(await trio.open_tcp_stream(host, port))
            await client.send(b"one\r\ntwo\n")
            await client.expect("ONE!", "TWO!")
            await client.send_line("quit")
            await client.expect("BYE")
            await client.expect_closed()
        assert service.lines == 2
        nursery.cancel_scope.cancel()
