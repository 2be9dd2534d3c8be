"""A static file server on 127.0.0.1 that answers ``Range`` requests and logs them.

Python's ``http.server`` lists folders and serves files but ignores ``Range`` (before 3.14),
so this handler adds single ranges (``206 Partial Content`` with ``Content-Range``), an
``ETag`` from the file's inode, size and mtime, and a log of every byte range it sent:
tests check from it that each tensor byte was read once. ``ranges=False`` serves as a
server without range support does (the whole file, ``200``). ``faults`` (a dict the test may
change while serving) makes it misbehave: ``shift`` answers every range from byte 0, ``gzip``
sends ranges of the gzipped file, ``head_status``/``get_status`` map a file name to an error
status, ``listing`` replaces every folder's index page.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
    faults: dict[str, Any]
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

    def _fault(self, kind: str) -> bool:
        status = self.faults.get(kind, {}).get(self.path.rsplit("/", 1)[-1])
        if status is None:
            return False
        self.send_response(status)
        self.send_header("Content-Length", "0")
        super().end_headers()
        return True

    def do_HEAD(self) -> None:
        with self.log_record.lock:
            self.log_record.heads += 1
        if not self._fault("head_status"):
            super().do_HEAD()

    def do_GET(self) -> None:
        if self._fault("get_status"):
            return
        if self.path.endswith("/") and "listing" in self.faults:
            body = self.faults["listing"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            super().end_headers()
            self.wfile.write(body)
            return
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
            whole = f.read()
        if self.faults.get("gzip"):
            whole = gzip.compress(whole, mtime=0)
        if self.faults.get("shift"):
            start, end = 0, end - start
        data = whole[start:end]
        with self.log_record.lock:
            self.log_record.gets.append((self.path, start, end))
        self.send_response(206)
        if self.faults.get("gzip"):
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextlib.contextmanager
def serve(
    folder: str, *, ranges: bool = True, faults: dict[str, Any] | None = None
) -> Iterator[tuple[str, Log]]:
    """Serve ``folder`` on an ephemeral port; yields the base URL and the request log."""
    log = Log()
    attrs = {"log_record": log, "ranges": ranges, "faults": {} if faults is None else faults}
    handler = type("Handler", (_Handler,), attrs)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=folder))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()
