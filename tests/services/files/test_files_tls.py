"""files inside TLS: the generic send path, same sizes, digests and resume.

Over TLS the server cannot use ``sendfile`` (the kernel would send the
file's bytes unencrypted); it sends chunks through the TLS stream, and the
client receives through its generic path. In memory both ends run a real
:class:`trio.SSLStream`; over TCP the real client runs, cut part way by a
byte-limited proxy and then resumed.
"""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import pytest
import trio
from conftest import TLSFiles
from test_files_client import cutting_proxy

import trionet
from trionet._client import EXIT_DROPPED
from trionet.services.files.client import client_main
from trionet.services.files.server import FilesService
from trionet.testing import open_memory_server

SIZE = 3 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    root = tmp_path_factory.mktemp("served")
    data = random.Random(11).randbytes(SIZE)
    (root / "big.bin").write_bytes(data)
    return root, data


def service(root: Path, files: TLSFiles) -> FilesService:
    return FilesService(root=str(root), port=0, tls_cert=files.cert, tls_key=files.key)


async def test_get_and_rest_inside_tls_in_memory(
    served: tuple[Path, bytes], tls_files: TLSFiles
) -> None:
    # Not on the autojump clock: the server hashes and reads in worker threads.
    root, data = served
    digest = hashlib.sha256(data).hexdigest()
    with trio.fail_after(20):
        async with open_memory_server(service(root, tls_files)) as server:
            client = await server.connect(tls=tls_files.client_context())
            await client.send_line("GET big.bin")
            await client.expect(f"OK {SIZE} {digest}")
            assert await client.receive_exactly(SIZE) == data
            await client.send_line("REST 1000000")
            await client.expect("OK rest 1000000")
            await client.send_line("GET big.bin")
            await client.expect(f"OK {SIZE} {digest}")  # still the whole file's
            assert await client.receive_exactly(SIZE - 1_000_000) == data[1_000_000:]
            await client.send_line("QUIT")
            await client.expect("BYE")
            await client.expect_closed()


async def run_cli(argv: list[str]) -> int:
    """Run the client's ``main`` (its own ``trio.run``) in a worker thread."""
    return await trio.to_thread.run_sync(client_main, argv)


async def test_download_cut_and_resumed_over_tls(
    served: tuple[Path, bytes],
    tls_files: TLSFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trionet.access")
    root, data = served
    out = tmp_path / "big.bin"
    tls = ["--tls", "--cafile", tls_files.ca]
    with trio.fail_after(30):
        server = trionet.Server([service(root, tls_files)])
        async with trio.open_nursery() as nursery:
            host, port = (await nursery.start(server.run))["files"][0]
            # The proxy cuts the connection after 1 MB of encrypted bytes.
            async with cutting_proxy((host, port), 1_000_000) as (phost, pport):
                cut = ["--host", phost, "--port", str(pport), *tls]
                assert await run_cli(["get", "big.bin", "-o", str(out), *cut]) == EXIT_DROPPED
            kept = (tmp_path / "big.bin.part").read_bytes()
            assert 0 < len(kept) < 1_000_000 and data.startswith(kept)
            caplog.clear()
            direct = ["--host", host, "--port", str(port), *tls]
            assert await run_cli(["get", "big.bin", "-o", str(out), "--resume", *direct]) == 0
            assert out.read_bytes() == data
            assert not (tmp_path / "big.bin.part").exists()
            server.shutdown()
    # Only the missing bytes crossed the wire the second time, inside TLS.
    (line,) = [r.getMessage() for r in caplog.records if " end=" in r.getMessage()]
    assert line.endswith(" tls")
    sent = int(line.split(" out=")[1].split()[0])
    assert sent < SIZE - len(kept) + 200
