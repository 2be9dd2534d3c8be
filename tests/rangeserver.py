"""A static file server on 127.0.0.1 that answers ``Range`` requests and logs them.

Python's ``http.server`` lists folders and serves files but ignores ``Range`` (before 3.14),
so this handler adds single ranges (``206 Partial Content`` with ``Content-Range``), an
``ETag`` from the file's inode, size and mtime, and a log of every byte range it sent:
tests check from it that each tensor byte was read once. ``ranges=False`` serves as a
server without range support does (the whole file, ``200``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-(\d+)?")


@dataclass
class Log:
    """What the server sent: ``(path, start, end)`` of each GET, and the count of HEADs."""

    gets: list[tuple[str, int, int]] = field(default_factory=list)
    heads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bytes_sent(self, name: str | None = None) -> int:
        return sum(e - s for p, s, e in self.gets if name is None or p.endswith("/" + name))


class _Handler(SimpleHTTPRequestHandler):
    log_record: Log
    ranges: bool
    protocol_version = "HTTP/1.1"  # keep-alive: one connection serves many ranged reads

    def setup(self) -> None:
        super().setup()  # headers and body go out as separate writes: no Nagle delay
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def end_headers(self) -> None:
        path = self.translate_path(self.path)
        if os.path.isfile(path):
            st = os.stat(path)
            self.send_header("ETag", f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"')
            if self.ranges:
                self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def do_HEAD(self) -> None:
        with self.log_record.lock:
            self.log_record.heads += 1
        super().do_HEAD()

    def do_GET(self) -> None:
        path = self.translate_path(self.path)
        m = _RANGE.fullmatch(self.headers.get("Range", ""))
        if not (self.ranges and m and os.path.isfile(path)):
            if os.path.isfile(path):
                with self.log_record.lock:
                    self.log_record.gets.append((self.path, 0, os.path.getsize(path)))
            super().do_GET()
            return
        size = os.path.getsize(path)
        start = int(m[1])
        end = min(int(m[2]) + 1 if m[2] else size, size)
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        with self.log_record.lock:
            self.log_record.gets.append((self.path, start, end))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def serve(folder: str, *, ranges: bool = True) -> Iterator[tuple[str, Log]]:
    """Serve ``folder`` on an ephemeral port; yields the base URL and the request log."""
    log = Log()
    handler = type("Handler", (_Handler,), {"log_record": log, "ranges": ranges})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=folder))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
