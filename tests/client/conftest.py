"""One real `genq up` for every test of the client and the CLI (this package),
and a proxy in front of it that can drop a connection after the request went through."""
from __future__ import annotations

import secrets
import shutil
import socket
import threading

import httpx
import pytest

from tests.helpers import free_port
from tests.test_up import start_up, stop_up

# Streams end after 2 s, so most streams in these tests is resumed at
# least once; a tenant may hold 2 streams (the 3rd is 429), the server 4 (the
# 5th is 503): small numbers the error tests reach with a few connections.
STREAM_SECONDS = 2
# Webhooks may go to the tests' receiver on 127.0.0.1 over http (the console's delivery log).
UP_ENV = dict(GENQ_EVENT_STREAM_SECONDS=str(STREAM_SECONDS), GENQ_MAX_HELD_REQUESTS="2", GENQ_API_HELD_THREADS="4",
              GENQ_PROGRESS_INTERVAL="0.1", GENQ_WEBHOOK_ALLOW_HTTP="true", GENQ_WEBHOOK_ALLOWED_HOSTS="127.0.0.1")


# Debian's chromium, driven by playwright (whose own browser download cannot work here).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = ("no chromium on PATH (make test installs Debian's where apt-get is at hand and it runs as root)")


@pytest.fixture(scope="package")
def browser():
    """One headless chromium for the browser tests of this package; they skip, saying why, without it."""
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="package")
def up(tmp_path_factory, model_dir):
    started = start_up(tmp_path_factory.mktemp("client") / "genq-home", model_dir, ready_lines=2, **UP_ENV)
    yield {**started, "key": started["headers"]["Authorization"].split()[1]}
    stop_up(started)


def new_tenant(up) -> str:
    """A fresh tenant's key, made through the admin API with `genq up`'s (admin) key."""
    resp = httpx.post(f"{up['url']}/v1/admin/keys", headers=up["headers"],
                      json={"tenant": f"t-{secrets.token_hex(4)}"}, timeout=30)
    assert resp.status_code == 201, resp.text
    return resp.json()["key"]


class DroppingProxy:
    """A TCP proxy to the API. While `drops` > 0, each connection's request is
    forwarded whole and the API's first bytes awaited (so the API has acted
    on it), then the client's connection is closed without the answer."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.drops = 0
        self.dropped = 0
        self.port = free_port()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        up = socket.create_connection(self.upstream)
        with conn, up:
            if self.drops > 0:
                self.drops -= 1
                up.sendall(_read_request(conn))
                up.recv(1)  # the API answered: the request has been carried out
                self.dropped += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return  # closed with a reset: the client hears no answer
            threading.Thread(target=_pipe, args=(up, conn), daemon=True).start()
            _pipe(conn, up)

    def close(self):
        self.sock.close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def _pipe(src: socket.socket, dst: socket.socket):
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def proxy(up):
    p = DroppingProxy(int(up["url"].rsplit(":", 1)[1]))
    yield p
    p.close()
