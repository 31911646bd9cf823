"""A local stand-in for the three Hub endpoints ``huggingface_hub.CommitScheduler`` calls (create a repository,
ask how to upload each file, commit), for tests on machines that reach no Hub: point ``HF_ENDPOINT`` at it.

It keeps every committed file's content, as a dataset repository would, and every request's path and
``Authorization`` header. Only small files sent inline ("regular" uploads) are accepted; anything else is recorded
in ``unexpected`` and answered 404 (a GET only answered 404: the client's optional look-ups)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class HubStub:
    def __init__(self, url: str = ""):
        self.url = url
        self.files: dict[str, dict[str, str]] = {}  # repo id -> path -> content
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str, str]] = []  # method, path, Authorization
        self.unexpected: list[str] = []
        self.lock = threading.Lock()

    def answer(self, method: str, path: str, authorization: str, body: bytes) -> tuple[int, dict]:
        with self.lock:
            self.requests.append((method, path, authorization))
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo = "/".join(filter(None, (payload["organization"], payload["name"])))
            with self.lock:
                self.files.setdefault(repo, {})
            return 200, {"url": f"{self.url}/datasets/{repo}", "name": repo, "id": repo}
        if method == "POST" and re.fullmatch(rf"/api/datasets/{REPO}/preupload/main", path):
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if method == "POST" and (match := re.fullmatch(rf"/api/datasets/{REPO}/commit/main", path)):
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            added = {}
            for line in lines:
                if line["key"] == "file" and line["value"]["encoding"] == "base64":
                    added[line["value"]["path"]] = base64.b64decode(line["value"]["content"]).decode()
                elif line["key"] != "header":
                    self.unexpected.append(f"commit operation {line['key']}")
            with self.lock:
                self.files.setdefault(match["repo"], {}).update(added)
                self.commits.append({"repo": match["repo"], "files": sorted(added)})
                oid = hashlib.sha1(str(len(self.commits)).encode()).hexdigest()
            return 200, {"commitUrl": f"{self.url}/datasets/{match['repo']}/commit/{oid}", "commitOid": oid}
        if method != "GET":  # the client's optional look-ups may go unanswered
            self.unexpected.append(f"{method} {path}")
        return 404, {"error": f"the Hub stub does not serve {method} {path}"}


@contextmanager
def running_hub_stub():
    """Yield ``(stub, url)`` of a ``HubStub`` serving on a free loopback port."""
    stub = HubStub()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.respond()

        def do_POST(self):
            self.respond()

        def respond(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = stub.answer(
                self.command, self.path.split("?")[0], self.headers.get("Authorization", ""), body
            )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub, stub.url
    finally:
        server.shutdown()
        server.server_close()
