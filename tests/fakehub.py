"""A small Hugging Face Hub stand-in on 127.0.0.1 for testing phema's ``hf://`` path offline.

It serves the routes that ``huggingface_hub``'s own client (``HfApi``, ``HfFileSystem``)
calls for what phema does: repo creation and info, tree listing, paths-info, ranged
``resolve`` downloads, preupload (every file is answered "regular", so neither LFS nor
Xet is involved) and NDJSON commits. It keeps every commit, so tests can count them and
check what each one held. Faults can be injected: ``fail_commits`` answers the next N
commits with HTTP 500 after reading the body, as a server that dies mid-upload would.

Not covered: LFS/Xet transfers, auth, rate limits, pagination, pull requests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

_API = re.compile(
    r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)"
    r"(?:/(revision|tree|paths-info|preupload|commit)(?:/([^/]+))?(/.*)?)?$"
)
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, object]] = field(default_factory=list)
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files

    def at(self, revision: str | None) -> dict[str, bytes]:
        """The files at a commit sha; the branch head for any other revision."""
        return self.history.get(revision or "", self.files)

    @property
    def sha(self) -> str:
        return str(self.commits[-1]["oid"]) if self.commits else "0" * 40


@dataclass
class FakeHub:
    """State shared by the handler threads."""

    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    fail_commits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    endpoint: str = ""

    def repo(self, kind: str, repo_id: str) -> Repo | None:
        return self.repos.get((kind.rstrip("s"), repo_id))


def _entries(repo: Repo, prefix: str, recursive: bool) -> list[dict[str, object]]:
    prefix = prefix.strip("/")
    out: dict[str, dict[str, object]] = {}
    for path, data in sorted(repo.files.items()):
        if prefix and not path.startswith(prefix + "/"):
            continue
        rest = path[len(prefix) + 1 :] if prefix else path
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            if not recursive and depth > 1:
                break
            d = "/".join(([prefix] if prefix else []) + parts[:depth])
            out[d] = {"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()}
        if recursive or len(parts) == 1:
            out[path] = _file_entry(path, data)
    return list(out.values())


def _file_entry(path: str, data: bytes) -> dict[str, object]:
    return {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}


def make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out separately: avoid 40 ms stalls

        def log_message(self, *args: object) -> None:
            pass

        def _send(
            self, code: int, body: bytes = b"", headers: dict[str, str] | None = None
        ) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, code: int, obj: object, headers: dict[str, str] | None = None) -> None:
            self._send(
                code,
                json.dumps(obj).encode(),
                {"Content-Type": "application/json", **(headers or {})},
            )

        def _missing(self, what: str = "RepoNotFound") -> None:
            self._json(404, {"error": "not found"}, {"X-Error-Code": what})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _record(self) -> None:
            with hub.lock:
                hub.requests.append(
                    (self.command, urlparse(self.path).path, self.headers.get("Range"))
                )

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            self._record()
            url = urlparse(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            if m := _RESOLVE.match(path):
                return self._resolve(m.group(1) or "models", m.group(2), m.group(4), m.group(3))
            m = _API.match(path)
            if not m:
                return self._missing("EntryNotFound")
            kind, repo_id, verb, _rev, rest = m.groups()
            repo = hub.repo(kind, repo_id)
            if repo is None:
                return self._missing()
            if verb in ("revision", None):
                return self._json(
                    200,
                    {
                        "id": repo_id,
                        "sha": repo.sha,
                        "private": True,
                        "siblings": [{"rfilename": p} for p in repo.files],
                    },
                )
            if verb == "tree":
                prefix = (rest or "").strip("/")
                pinned = Repo(files=repo.at(unquote(_rev or "")))
                if prefix and prefix not in {e["path"] for e in _entries(pinned, "", True)}:
                    return self._missing("EntryNotFound")
                recursive = query.get("recursive", ["False"])[0].lower() == "true"
                return self._json(200, _entries(pinned, prefix, recursive))
            return self._missing("EntryNotFound")

        def _resolve(self, kind: str, repo_id: str, path: str, revision: str) -> None:
            repo = hub.repo(kind, repo_id)
            if repo is None:
                return self._missing()
            data = repo.at(unquote(revision)).get(path)
            if data is None:
                return self._missing("EntryNotFound")
            headers = {
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                "X-Repo-Commit": repo.sha,
                "Accept-Ranges": "bytes",
            }
            rng = self.headers.get("Range")
            if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng)):
                start = int(m.group(1))
                end = min(int(m.group(2)) + 1 if m.group(2) else len(data), len(data))
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
                return self._send(206, data[start:end], headers)
            return self._send(200, data, headers)

        def do_POST(self) -> None:
            self._record()
            path = unquote(urlparse(self.path).path)
            body = self._body()
            if path == "/api/repos/create":
                req = json.loads(body)
                kind = req.get("type") or "model"
                repo_id = (
                    f"{req['organization']}/{req['name']}"
                    if req.get("organization")
                    else req["name"]
                )
                prefix = "" if kind == "model" else f"{kind}s/"
                url = {"url": f"{hub.endpoint}/{prefix}{repo_id}"}
                with hub.lock:
                    if (kind, repo_id) in hub.repos:
                        return self._json(409, {"error": "repo exists", **url})
                    hub.repos[(kind, repo_id)] = Repo()
                return self._json(200, url)
            m = _API.match(path)
            if not m:
                return self._missing("EntryNotFound")
            kind, repo_id, verb, _rev, _ = m.groups()
            repo = hub.repo(kind, repo_id)
            if repo is None:
                return self._missing()
            if verb == "paths-info":
                wanted = parse_qs(body.decode()).get("paths", [])
                known = {e["path"]: e for e in _entries(repo, "", True)}
                return self._json(200, [known[p] for p in wanted if p in known])
            if verb == "preupload":
                files = json.loads(body)["files"]
                return self._json(
                    200,
                    {
                        "files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                            for f in files
                        ]
                    },
                )
            if verb == "commit":
                return self._commit(kind, repo_id, repo, body)
            return self._missing("EntryNotFound")

        def _commit(self, kind: str, repo_id: str, repo: Repo, body: bytes) -> None:
            with hub.lock:
                if hub.fail_commits > 0:
                    hub.fail_commits -= 1
                    return self._json(500, {"error": "injected failure mid-upload"})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                parent = header.get("parentCommit")
                if parent and parent != repo.sha:
                    return self._json(412, {"error": "parent commit is not the branch head"})
                added = {}
                for item in lines:
                    if item["key"] == "file":
                        added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        repo.files.pop(item["value"]["path"], None)
                repo.files.update(added)
                oid = hashlib.sha1(f"{repo.sha}{sorted(added)}".encode()).hexdigest()
                repo.commits.append(
                    {"oid": oid, "summary": header.get("summary"), "files": sorted(added)}
                )
                repo.history[oid] = dict(repo.files)
            prefix = "" if kind == "models" else f"{kind}/"
            return self._json(
                200,
                {
                    "commitUrl": f"{hub.endpoint}/{prefix}{repo_id}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": None,
                },
            )

    return Handler


def start() -> tuple[FakeHub, ThreadingHTTPServer]:
    """Serve a fresh fake Hub on an ephemeral port of 127.0.0.1 (call ``shutdown()`` to stop)."""
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
    server.daemon_threads = True
    hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hub, server
