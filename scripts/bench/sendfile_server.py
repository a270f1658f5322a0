"""The plainest sendfile server: scripts/bench/files.py's reference row (z).

Answers ``GET NAME`` like the files service (``OK <size> -``, then the bytes;
no digest, no checks, no concurrency) from one blocking thread, the whole file
in ``os.sendfile`` calls of as much as the kernel takes: no event loop, no
Python per chunk. Row (a) is read against it: a files service near it spends
nothing worth measuring on its side of the copy, and what is left of (a)'s time
is the kernel's loopback and the receiver's copy.

Usage: python scripts/bench/sendfile_server.py PORT ROOT
"""

from __future__ import annotations

import os
import socket
import sys


def serve(port: int, root: str) -> None:
    with socket.create_server(("127.0.0.1", port)) as server:
        while True:
            conn, _ = server.accept()
            with conn:
                buf = b""
                while b"\n" not in buf:
                    data = conn.recv(4096)
                    if not data:
                        break
                    buf += data
                words = buf.split(b"\n", 1)[0].split(b" ")
                if len(words) != 2 or words[0] != b"GET":
                    continue  # a port probe, or not ours
                path = os.path.join(root, os.path.basename(words[1].decode()))
                fd = os.open(path, os.O_RDONLY)
                try:
                    size = os.fstat(fd).st_size
                    conn.sendall(b"OK %d -\n" % size)
                    offset = 0
                    while offset < size:
                        offset += os.sendfile(conn.fileno(), fd, offset, size - offset)
                finally:
                    os.close(fd)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
