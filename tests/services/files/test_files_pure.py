"""Pure parts of the files service: path rules, offsets, digest cache, client parsing."""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trionet.services.files import digest as files_digest
from trionet.services.files.client import Announce, Progress, format_progress, parse_ok
from trionet.services.files.digest import DigestCache, DigestKey, hash_range
from trionet.services.files.paths import (
    NameProblem,
    is_hidden_part,
    listable,
    name_problem,
    relative_inside,
    split_name,
)
from trionet.services.files.server import _parse_offset

P = NameProblem

# The path matrix: every kind of name the protocol forbids, and some it allows.
MATRIX = [
    ("hello.txt", None),
    ("data/big.bin", None),
    ("a b/c d.txt", None),
    ("naïve/日本.txt", None),
    ("x..y", None),  # dots inside a part are fine
    ("a.", None),
    ("", P.EMPTY),
    ("/etc/passwd", P.ABSOLUTE),
    ("/", P.ABSOLUTE),
    ("a//b", P.EMPTY_PART),
    ("a/", P.EMPTY_PART),
    ("..", P.DOT_PART),
    ("../etc/passwd", P.DOT_PART),
    ("a/../../b", P.DOT_PART),
    ("a/..", P.DOT_PART),
    (".", P.DOT_PART),
    ("./a", P.DOT_PART),
    (".hidden", P.HIDDEN),
    ("dir/.git/config", P.HIDDEN),
    (".ssh/id_rsa", P.HIDDEN),
    ("a\\b", P.BACKSLASH),
    ("..\\..\\windows", P.BACKSLASH),
    ("a\x00b", P.CONTROL),
    ("a\tb", P.CONTROL),
    ("a\rb", P.CONTROL),
    ("a\x1b[31m", P.CONTROL),
    ("a\x7f", P.CONTROL),
    ("a\x85b", P.CONTROL),  # C1 control (NEL)
    ("/\x00", P.CONTROL),
    ("bad\udcffname", P.ENCODING),
]


@pytest.mark.parametrize(("name", "problem"), MATRIX)
def test_name_matrix(name: str, problem: NameProblem | None) -> None:
    assert name_problem(name) is problem
    if problem is None:
        assert split_name(name) == tuple(name.split("/"))
        assert listable(tuple(name.split("/")))
    else:
        with pytest.raises(ValueError, match=problem.value):
            split_name(name)


def test_hidden_part() -> None:
    assert is_hidden_part(".x") and is_hidden_part(".") and is_hidden_part("..")
    assert not is_hidden_part("x.") and not is_hidden_part("a.b")


@given(st.text(min_size=1, max_size=40))
def test_accepted_names_stay_inside(name: str) -> None:
    # Whatever text is accepted, joining it to a root and normalising it can
    # never climb out of the root nor land on the root itself.
    if name_problem(name) is None:
        joined = posixpath.normpath(posixpath.join("/srv/root", name))
        assert relative_inside("/srv/root", joined) == tuple(name.split("/"))


@pytest.mark.parametrize(
    ("root", "path", "want"),
    [
        ("/srv/root", "/srv/root/a", ("a",)),
        ("/srv/root", "/srv/root/a/b.txt", ("a", "b.txt")),
        ("/srv/root/", "/srv/root/a", ("a",)),
        ("/srv/root", "/srv/root", None),
        ("/srv/root", "/srv/root/", None),
        ("/srv/root", "/srv/root2/a", None),
        ("/srv/root", "/srv/a", None),
        ("/srv/root", "/etc/passwd", None),
        ("/srv/root", "/srv/root/../x", None),
        ("/srv/root", "/srv/root/a//b", None),
        ("/", "/etc/passwd", ("etc", "passwd")),
    ],
)
def test_relative_inside(root: str, path: str, want: tuple[str, ...] | None) -> None:
    assert relative_inside(root, path) == want


def test_relative_inside_needs_absolute_paths() -> None:
    with pytest.raises(ValueError):
        relative_inside("srv", "/srv/a")


def test_listable() -> None:
    assert listable(("a", "b"))
    assert not listable(())
    assert not listable(("a", ".git", "x"))
    assert not listable(("new\nline",))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("0", 0),
        ("5", 5),
        ("007", 7),
        (" 12 ", 12),
        ("9" * 19, int("9" * 19)),
        ("9" * 20, None),
        ("", None),
        (" ", None),
        ("-1", None),
        ("+1", None),
        ("1.5", None),
        ("0x10", None),
        ("1_000", None),
        ("١٢", None),  # Arabic-Indic digits are digits to str.isdigit, not to us
        ("5 6", None),
    ],
)
def test_parse_offset(text: str, want: int | None) -> None:
    assert _parse_offset(text) == want


# -- digest cache -------------------------------------------------------------------


def _key(n: int) -> DigestKey:
    return DigestKey(1, n, 10, 123)


def test_cache_lru() -> None:
    cache = DigestCache(max_entries=2)
    cache.put(_key(1), "a")
    cache.put(_key(2), "b")
    assert cache.get(_key(1)) == "a"  # 1 is now the most recent
    cache.put(_key(3), "c")
    assert cache.get(_key(2)) is None
    assert cache.get(_key(1)) == "a" and cache.get(_key(3)) == "c"
    assert len(cache) == 2
    with pytest.raises(ValueError):
        DigestCache(max_entries=0)


def test_key_from_stat(tmp_path: Path) -> None:
    path = os.path.join(str(tmp_path), "f")
    with open(path, "wb") as f:
        f.write(b"abc")
    st_ = os.stat(path)
    key = DigestKey.from_stat(st_)
    assert key == (st_.st_dev, st_.st_ino, 3, st_.st_mtime_ns)
    with pytest.raises(ValueError):
        DigestKey.from_stat(os.stat(str(tmp_path)))


def test_hash_range(tmp_path: Path) -> None:
    data = os.urandom(3 * files_digest.READ_CHUNK + 17)
    path = os.path.join(str(tmp_path), "f")
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        h = hashlib.sha256()
        assert hash_range(fd, 5, len(data), h) == len(data) - 5
        assert h.hexdigest() == hashlib.sha256(data[5:]).hexdigest()
        h = hashlib.sha256()
        assert hash_range(fd, 0, len(data) + 100, h) == len(data)  # short: file ended
    finally:
        os.close(fd)


async def test_cache_single_flight(tmp_path: Path) -> None:
    data = os.urandom(1000)
    path = str(tmp_path / "f")
    (tmp_path / "f").write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        key = DigestKey.from_stat(os.fstat(fd))
        cache = DigestCache()
        results: list[str | None] = []

        async def ask() -> None:
            results.append(await cache.digest(fd, key))

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(ask)
        assert results == [hashlib.sha256(data).hexdigest()] * 10
        assert cache.computed == 1
        # A key promising more bytes than the file holds: no digest, nothing cached.
        longer = key._replace(size=2000)
        assert await cache.digest(fd, longer) is None
        assert cache.get(longer) is None
    finally:
        os.close(fd)


# -- client parsing and progress ------------------------------------------------------


def test_parse_ok() -> None:
    digest = "ab" * 32
    assert parse_ok(f"OK 12 {digest}") == Announce(12, digest)
    assert parse_ok(f"OK 12 {digest.upper()}") is None
    assert parse_ok(f"OK -1 {digest}") is None
    assert parse_ok("OK rest 5") is None
    assert parse_ok(f"OK 12 {digest} x") is None
    assert parse_ok("ERR not-found x") is None


def test_format_progress() -> None:
    line = format_progress(512 << 20, 1 << 30, 256 << 20)
    assert line.startswith("[############------------]  50.0%")
    assert "512.0 MiB/1.0 GiB" in line and "256.0 MiB/s" in line and "ETA 0:02" in line
    assert format_progress(0, 100, 0.0).endswith("ETA --:--")
    assert "100.0%" in format_progress(100, 100, 5.0) and "ETA 0:00" in format_progress(100, 100, 1)
    assert "100.0%" in format_progress(0, 0, 0.0)


def test_progress_throttles_and_is_quiet_off_terminal() -> None:
    now = [0.0]
    out = io.StringIO()
    bar = Progress(1000, out, interval=0.1, clock=lambda: now[0], start_bytes=500)
    now[0] = 1.0
    bar.update(600)
    bar.update(700)  # same instant: throttled
    now[0] = 2.0
    bar.update(1000, final=True)
    assert bar.drawn == 2
    text = out.getvalue()
    # The rate counts only this run's bytes: 100 B in 1 s, then 500 B in 2 s.
    assert "100 B/s" in text and "250 B/s" in text and text.endswith("\n")
    silent = Progress(1000, None)
    silent.update(1000, final=True)
    assert silent.drawn == 0
