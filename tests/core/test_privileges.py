"""``--user``/``--group``: bind a low port and read the TLS key as root, then drop.

The process tests need root (they are skipped, saying so, otherwise): a
port below 1024, then the real, effective, saved and filesystem ids of the
serving process read from ``/proc/PID/status``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from conftest import ROOT, Opened, Serve, TLSFiles

from trionet._privileges import PrivilegeError, resolve_identity
from trionet.testing import Client

NOBODY = pwd.getpwnam("nobody")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")


def _free_low_port() -> int:
    """A free port below 1024 on 127.0.0.1 (only root can bind one)."""
    for port in range(1000, 600, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


def _ids(pid: int) -> dict[str, list[int]]:
    """``Uid``, ``Gid`` (real, effective, saved, filesystem) and ``Groups`` of ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: [int(v) for v in fields[k].split()] for k in ("Uid", "Gid", "Groups")}


def test_resolve_identity() -> None:
    who = resolve_identity("nobody")
    assert (who.uid, who.gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert resolve_identity(str(NOBODY.pw_uid), "root").gid == 0
    with pytest.raises(PrivilegeError, match="--user no-such-user-here: no such user"):
        resolve_identity("no-such-user-here")
    with pytest.raises(PrivilegeError, match="--group no-such-group-here: no such group"):
        resolve_identity("nobody", "no-such-group-here")


@pytest.mark.parametrize("where", ["flag", "config"])
def test_unknown_user_stops_the_process_with_one_line(tmp_path: Path, where: str) -> None:
    config = tmp_path / "trionet.toml"
    config.write_text('[common]\nuser = "no-such-user"\n')
    given = ["--user", "no-such-user"] if where == "flag" else ["--config", str(config)]
    done = subprocess.run(
        [sys.executable, "-m", "trionet.serve", "calc", "--port", "0", *given],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["trionet: error: --user no-such-user: no such user"]


@root_only
async def test_calc_on_a_low_port_runs_as_nobody(
    serve: Callable[..., Serve], opened: Opened
) -> None:
    port = _free_low_port()
    p = serve("calc", "--port", str(port), "--user", "nobody")
    assert p.port("calc") == port
    p.wait_for(r"running as user nobody")
    ids = _ids(p.proc.pid)
    assert ids["Uid"] == [NOBODY.pw_uid] * 4
    assert ids["Gid"] == [NOBODY.pw_gid] * 4
    assert 0 not in ids["Groups"]
    with trio.fail_after(30):
        client = await opened.client(port, timeout=20)
        await client.send_line("6*7")
        await client.expect("OK 42")
    assert p.stop() == 0


@root_only
async def test_a_key_only_root_can_read_is_read_before_dropping(
    serve: Callable[..., Serve], tmp_path: Path, tls_files: TLSFiles, opened: Opened
) -> None:
    key = tmp_path / "key.pem"
    shutil.copy(tls_files.key, key)
    key.chmod(0o600)
    port = _free_low_port()
    p = serve(
        *("calc", "--port", str(port), "--user", "nobody"),
        *("--tls-cert", tls_files.cert, "--tls-key", str(key)),
    )
    p.wait_for(r"calc listening on .* \(tls\)")
    assert _ids(p.proc.pid)["Uid"] == [NOBODY.pw_uid] * 4
    info = key.stat()  # nobody could not have read it
    assert (info.st_uid, info.st_mode & 0o077) == (0, 0)
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(stream, tls_files.client_context(), server_hostname="localhost")
        client = opened.add(Client(tls, timeout=20))
        await client.send_line("2**10")
        await client.expect("OK 1024")
        # Having dropped root, a reload cannot read that key again: it says
        # so in one line and the running certificate stays (docs/deploy.md:
        # give the key to the user's group, or run workers, whose parent
        # stays root).
        p.signal(signal.SIGHUP)
        await trio.to_thread.run_sync(lambda: p.wait_for(r"reload failed: .*Permission denied"))
        await client.send_line("2**11")
        await client.expect("OK 2048")
    assert p.stop() == 0


@root_only
async def test_workers_run_as_the_user(serve: Callable[..., Serve], opened: Opened) -> None:
    port = _free_low_port()
    p = serve("calc", "--port", str(port), "--user", "nobody", "--workers", "2")
    pids = [int(m[1]) for m in p.wait_for(r"worker \d+ started \(pid (\d+)\)", count=2)]
    p.wait_for(r"running as user nobody", count=2)
    for pid in pids:
        assert _ids(pid)["Uid"] == [NOBODY.pw_uid] * 4
    # The parent, which never reads a client's byte, keeps root to start the
    # workers of the next reload (they read the TLS key again).
    assert _ids(p.proc.pid)["Uid"] == [0] * 4
    with trio.fail_after(30):
        for i in range(4):
            client = await opened.client(port, timeout=20)
            await client.send_line(f"{i}+1")
            await client.expect(f"OK {i + 1}")
    assert p.stop() == 0
