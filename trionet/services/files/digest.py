"""SHA-256 digests of served files: computed off the event loop, cached.

Hashing a 1 GiB file takes about half a second of CPU and possibly much
longer of disk reads. It runs in worker threads (``trio.to_thread``), in
slices of :data:`HASH_SLICE` bytes so that a cancelled download (client
gone, server shutting down) stops hashing within one slice instead of
holding a thread and its descriptor for the whole file.

Results are cached by ``(device, inode, size, mtime_ns)`` of the opened
descriptor, so a repeated download costs no hashing. A file rewritten in
place gets a new mtime and therefore a new key. Concurrent requests for the
same key share one computation ("single flight"): twenty clients asking
for the same cold file cause one hash, not twenty.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import OrderedDict
from typing import Final, NamedTuple

import attrs
import trio

__all__ = ["HASH_SLICE", "READ_CHUNK", "DigestCache", "DigestKey", "hash_range"]

#: Bytes read per ``os.pread`` while hashing (hashlib releases the GIL for
#: large updates, so other threads and the event loop keep running).
READ_CHUNK: Final = 1 << 20
#: Bytes hashed per worker-thread call: cancellation is checked between slices.
HASH_SLICE: Final = 32 << 20


class DigestKey(NamedTuple):
    """What identifies one version of a file's contents, from ``fstat``."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> DigestKey:
        """The key of the file ``st`` describes (it must be a regular file)."""
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("only regular files have digests")
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def hash_range(fd: int, start: int, stop: int, h: hashlib._Hash) -> int:
    """Feed bytes ``start:stop`` of ``fd`` to ``h`` (blocking; run it in a thread).

    Returns the number of bytes hashed, which is less than asked only if
    the file got shorter meanwhile. Reads with ``pread``, so the
    descriptor's own offset is left alone (other readers may share it).
    """
    pos = start
    while pos < stop:
        data = os.pread(fd, min(READ_CHUNK, stop - pos), pos)
        if not data:
            break
        h.update(data)
        pos += len(data)
    return pos - start


@attrs.define(eq=False)
class DigestCache:
    """A bounded LRU cache of hex SHA-256 digests with single-flight computation.

    Args:
      max_entries: entries kept; the least recently used go first.
    """

    max_entries: int = 4096
    _entries: OrderedDict[DigestKey, str] = attrs.field(init=False, factory=OrderedDict)
    _in_flight: dict[DigestKey, trio.Event] = attrs.field(init=False, factory=dict)
    #: Digests computed (cache misses that completed), for tests and stats.
    computed: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError("max_entries must be at least 1")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: DigestKey) -> str | None:
        """The cached digest for ``key`` (marking it recently used), or ``None``."""
        digest = self._entries.get(key)
        if digest is not None:
            self._entries.move_to_end(key)
        return digest

    def put(self, key: DigestKey, digest: str) -> None:
        """Remember ``digest`` for ``key``, evicting the oldest entry if full."""
        self._entries[key] = digest
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def digest(self, fd: int, key: DigestKey) -> str | None:
        """The hex SHA-256 of the ``key.size`` first bytes of ``fd``.

        Computed in worker threads on a miss, shared with concurrent callers
        asking for the same key. Returns ``None`` (and caches nothing) if
        the file got shorter while being hashed: the caller cannot promise
        ``key.size`` bytes then.
        """
        while True:
            cached = self.get(key)
            if cached is not None:
                return cached
            pending = self._in_flight.get(key)
            if pending is None:
                break
            # Another task is hashing this very file; wait for it. If it was
            # cancelled, the loop finds no entry and this task takes over.
            await pending.wait()
        done = self._in_flight[key] = trio.Event()
        try:
            h = hashlib.sha256()
            pos = 0
            while pos < key.size:
                want = min(HASH_SLICE, key.size - pos)
                got = await trio.to_thread.run_sync(hash_range, fd, pos, pos + want, h)
                if got < want:
                    return None  # the file got shorter under us
                pos += got
            digest = h.hexdigest()
            self.computed += 1
            self.put(key, digest)
            return digest
        finally:
            del self._in_flight[key]
            done.set()
