"""A real webhook receiver for tests: an HTTP server on 127.0.0.1 in a thread
that answers each path from a script, verifies every request with
standardwebhooks.Webhook(secret).verify, and processes each webhook-id once,
as a receiver following the Standard Webhooks spec does."""
from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: dict = field(default_factory=dict)
    # Seconds spent "processing" before answering (a slow receiver).
    delay: float = 0.0


@dataclass
class Received:
    path: str
    at: float  # time.monotonic() on arrival
    headers: dict[str, str]
    body: bytes
    # None when it verified; else why not.
    verify_error: str | None
    answered: int


class Receiver:
    def __init__(self, tls: ssl.SSLContext | None = None):
        self.requests: list[Received] = []
        # webhook-id -> payload, for each event processed (verified and answered 2xx); once each.
        self.processed: dict[str, dict] = {}
        self.duplicates = 0
        # Requests being answered now, and the most at once, per path.
        self.busy: dict[str, int] = {}
        self.most_busy: dict[str, int] = {}
        self._scripts: dict[str, list[Answer]] = {}
        self._secrets: dict[str, str] = {}
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def script(self, path: str, *answers: Answer | int, secret: str | None = None) -> None:
        """Answer requests to `path` with these, one each; the last repeats."""
        with self._lock:
            self._scripts[path] = [a if isinstance(a, Answer) else Answer(a) for a in answers]
            if secret:
                self._secrets[path] = secret

    def to(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, predicate, timeout: float = 30, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver: no {what} within {timeout}s; got {[(r.path, r.answered) for r in self.requests]}")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[Answer, str | None]:
        with self._lock:
            script = self._scripts.get(path) or [Answer(404)]
            answer = script.pop(0) if len(script) > 1 else script[0]
            secret = self._secrets.get(path)
        error = None
        if secret is None:
            error = "no secret for this path"
        else:
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError as exc:
                error = str(exc)
        return answer, error

    def _process(self, headers: dict[str, str], body: bytes) -> None:
        with self._lock:
            msg_id = headers["webhook-id"]
            if msg_id in self.processed:
                self.duplicates += 1  # a retry of an event already handled: dropped, as the spec says
            else:
                self.processed[msg_id] = json.loads(body)

    def _handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                answer, error = receiver._answer(self.path, headers, body)
                with receiver._lock:
                    receiver.requests.append(Received(self.path, arrived, headers, body, error, answer.status))
                    receiver.busy[self.path] = receiver.busy.get(self.path, 0) + 1
                    receiver.most_busy[self.path] = max(receiver.most_busy.get(self.path, 0), receiver.busy[self.path])
                if answer.delay:
                    time.sleep(answer.delay)
                if error is None and 200 <= answer.status < 300:
                    receiver._process(headers, body)
                with receiver._lock:
                    # Before the answer leaves: a sender cannot have seen it and sent more yet.
                    receiver.busy[self.path] -= 1
                try:
                    self.send_response(answer.status)
                    for k, v in answer.headers.items():
                        self.send_header(k, str(v))
                    payload = b"" if answer.status < 300 else f"answer {answer.status}".encode()
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the sender is gone (killed, or it timed out)

            def log_message(self, *args):
                pass

        return Handler
