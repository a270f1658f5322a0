"""The sans-I/O line framer, with no I/O at all.

Rules for these tests: pure functions only, no Trio, no clock. The property
tests state the framer's contract: however the network chunks a byte
string, the same lines and the same errors come out.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trionet import BadEncoding, LineBuffer, LineEvent, LineTooLong


def events(buf: LineBuffer) -> list[LineEvent]:
    out: list[LineEvent] = []
    while (ev := buf.next_event()) is not None:
        out.append(ev)
    return out


def frame(chunks: list[bytes], max_line: int = 16, eof: bool = False) -> list[LineEvent]:
    buf = LineBuffer(max_line)
    out: list[LineEvent] = []
    for chunk in chunks:
        buf.feed(chunk)
        out += events(buf)
    if eof:
        buf.feed_eof()
        out += events(buf)
    return out


def reference(data: bytes, max_line: int, eof: bool) -> list[LineEvent]:
    """The framing rules of PROTOCOL.md, written the slow obvious way."""
    out: list[LineEvent] = []
    parts = data.split(b"\n")
    tail = parts.pop()
    if eof and tail:
        parts.append(tail)
        tail = b""
    for raw in parts:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > max_line:
            out.append(LineTooLong(max_line))
            continue
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(BadEncoding(raw))
    # An unterminated tail that is already over the limit is reported
    # before its LF arrives (so it never has to be buffered).
    if len(tail) > max_line + 1 or (len(tail) == max_line + 1 and not tail.endswith(b"\r")):
        out.append(LineTooLong(max_line))
    return out


def test_lines_crlf_and_lone_cr() -> None:
    assert frame([b"a\nb\r\nc\r\r\n\n"]) == ["a", "b", "c\r", ""]


def test_partial_line_waits_for_lf() -> None:
    buf = LineBuffer(16)
    buf.feed(b"hel")
    assert buf.next_event() is None
    buf.feed(b"lo\r")
    assert buf.next_event() is None
    buf.feed(b"\nnext")
    assert events(buf) == ["hello"]
    assert len(buf) == 4


def test_limit_counts_the_line_not_its_terminator() -> None:
    assert frame([b"x" * 16 + b"\r\n"]) == ["x" * 16]
    assert frame([b"x" * 16 + b"\n"]) == ["x" * 16]
    assert frame([b"x" * 17 + b"\n"]) == [LineTooLong(16)]
    # A CR right at the limit may be half of a CRLF: it waits for the LF.
    buf = LineBuffer(16)
    buf.feed(b"x" * 16 + b"\r")
    assert buf.next_event() is None
    buf.feed(b"\n")
    assert events(buf) == ["x" * 16]


def test_over_long_line_reported_before_its_end_and_discarded() -> None:
    buf = LineBuffer(8)
    buf.feed(b"a" * 20)
    assert events(buf) == [LineTooLong(8)]
    # Nothing of the long line is kept while it goes on.
    assert len(buf) == 0
    buf.feed(b"b" * 10_000)
    assert events(buf) == []
    assert len(buf) == 0
    buf.feed(b"ccc\nok\n")
    assert events(buf) == ["ok"]


def test_bad_utf8_is_reported_and_reading_continues() -> None:
    assert frame([b"\xff\xfe\nfine\n", "é\n".encode()]) == [
        BadEncoding(b"\xff\xfe"),
        "fine",
        "é",
    ]
    # A multi-byte character split across chunks is not an error.
    data = "ü\n".encode()
    assert frame([data[:1], data[1:]]) == ["ü"]


def test_eof_delivers_the_unterminated_last_line() -> None:
    assert frame([b"a\nlast"], eof=True) == ["a", "last"]
    assert frame([b"a\n"], eof=True) == ["a"]
    buf = LineBuffer(8)
    buf.feed_eof()
    assert buf.next_event() is None
    assert buf.at_eof


def test_take_bytes_switches_to_raw_mid_stream() -> None:
    buf = LineBuffer(16)
    buf.feed(b"OK 5\nhello")
    assert buf.next_event() == "OK 5"
    assert buf.take_bytes(3) == b"hel"
    assert buf.take_bytes() == b"lo"
    assert len(buf) == 0


def test_search_resumes_where_it_stopped() -> None:
    """Trickling a line byte by byte scans each byte once (no O(n²) rescans)."""
    buf = LineBuffer(100_000)
    for i in range(1, 5001):
        buf.feed(b"x")
        assert buf.next_event() is None
        # Everything buffered is already known to contain no LF.
        assert buf._scanned == i
    buf.feed(b"\n")
    assert buf.next_event() == "x" * 5000


def test_invalid_limit() -> None:
    with pytest.raises(ValueError):
        LineBuffer(0)


def chunkings(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """Every way of cutting ``data`` into consecutive chunks."""
    return st.lists(st.integers(0, len(data)), max_size=12).map(
        lambda cuts: [
            data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)
        ]
    )


line_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"\n", b"\r\n", b"\r", b"\xff", "é".encode(), b"ab"]),
        st.binary(max_size=12),
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), payload=line_bytes, max_line=st.integers(1, 12), eof=st.booleans())
def test_any_chunking_gives_the_same_events(
    data: st.DataObject, payload: bytes, max_line: int, eof: bool
) -> None:
    chunks = data.draw(chunkings(payload))
    assert b"".join(chunks) == payload
    whole = frame([payload], max_line, eof)
    assert frame(chunks, max_line, eof) == whole
    assert whole == reference(payload, max_line, eof)


@settings(max_examples=200, deadline=None)
@given(payload=line_bytes, max_line=st.integers(1, 12))
def test_memory_never_exceeds_limit_plus_one_chunk(payload: bytes, max_line: int) -> None:
    buf = LineBuffer(max_line)
    for byte in payload:
        buf.feed(bytes([byte]))
        events(buf)
        assert len(buf) <= max_line + 1
