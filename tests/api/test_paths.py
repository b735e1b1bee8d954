"""User-supplied names never leave their owner's storage prefix: output names,
upload filenames. Attacked over a real HTTP connection that sends the path as
written (the Flask test client normalises some spellings away), on local
storage and on S3 (moto over HTTP)."""
from __future__ import annotations

import http.client
import threading
from urllib.parse import quote

import pytest
from werkzeug.serving import make_server

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.schema import File
from genq.storage import make_storage
from tests.conftest import new_bucket
from tests.helpers import make_key

PROBLEM = "application/problem+json"


class Served:
    """The API on a werkzeug server in a thread, spoken to with http.client."""

    def __init__(self, settings):
        self.settings = settings
        self.server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method: str, raw_path: str, headers: dict, body: bytes | None = None) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.server_port, timeout=30)
        try:
            conn.request(method, raw_path, body=body, headers=headers)  # the path goes out exactly as written
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, headers: dict, body: bytes | None = None, **extra) -> dict:
        import json

        status, _, data = self.request(method, path, {**headers, **extra}, body)
        assert status < 300, (status, data)
        return json.loads(data)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["local", "s3"])
def served(request, embedded_settings):
    settings = embedded_settings
    if request.param == "s3":
        settings = settings.replace(**new_bucket(request.getfixturevalue("s3_endpoint")))
    s = Served(settings)
    yield s
    s.close()


def submit(served: Served, headers: dict) -> str:
    body = b'{"model": "demo-text", "input": {"prompt": "x"}}'
    return served.json("POST", "/v1/jobs", headers, body, **{"Content-Type": "application/json"})["id"]


@pytest.fixture
def world(served):
    """Bob's objects, in storage under the keys genq's own code gives them: a
    job's output, a fine-tune checkpoint, a fine-tuned model's weights and an
    uploaded dataset. Alice owns one queued job: the door she knocks at."""
    settings = served.settings
    alice, bob = make_key(settings, "alice"), make_key(settings, "bob")
    storage = make_storage(settings)
    bob_job = submit(served, bob)
    dataset = b'{"text": "BOB-DATASET-SECRET"}\n'
    body, ctype = _multipart(dataset)
    file_id = served.json("POST", "/v1/files", {**bob, **ctype}, body)["id"]
    with make_sessionmaker(make_engine(settings.database_url))() as session:
        dataset_key = session.get(File, file_id).storage_key
    secrets = {
        "output": (f"jobs/{bob_job}/0.png", b"\x89PNG BOB-OUTPUT-SECRET"),
        "checkpoint": (f"jobs/{bob_job}/checkpoints/step-000005.pt", b"BOB-CHECKPOINT-SECRET"),
        "weights": ("models/0123456789abcdef0123456789abcdef/adapter_model.safetensors", b"BOB-WEIGHTS-SECRET"),
        "dataset": (dataset_key, dataset),
    }
    for what in ("output", "checkpoint", "weights"):
        key, data = secrets[what]
        storage.put(key, data, "application/octet-stream")
    alice_job = submit(served, alice)
    storage.put(f"jobs/{alice_job}/0.png", b"\x89PNG ALICE-OWN", "image/png")
    storage.put(f"jobs/{alice_job}/checkpoints/step-000005.pt", b"ALICE-OWN-CHECKPOINT", "application/octet-stream")
    return {"alice": alice, "alice_job": alice_job, "bob_job": bob_job, "secrets": secrets, "storage": storage}


def _multipart(data: bytes, filename: str = "data.jsonl") -> tuple[bytes, dict]:
    boundary = "genqboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def spellings(relative: str) -> list[str]:
    """`relative` (a path with ../ segments) as clients that do not normalise send it."""
    return [
        relative,                                              # raw ../
        relative.replace("/", "%2F"),                          # ..%2F
        quote(relative, safe="").replace(".", "%2e"),          # %2e%2e%2f
        relative.replace("../", "..%2f"),                      # ..%2f, the rest as is
        relative.replace("../", "%2e%2e/"),                    # %2e%2e/
        relative.replace("../", ".%2e/"),                      # .%2e/
        relative.replace("/", "%5C"),                          # backslashes
        relative.replace("../", "./../"),                      # ./ before ../
    ]


@pytest.mark.parametrize("what", ["output", "checkpoint", "weights", "dataset"])
def test_another_tenants_objects_are_404_through_output_names(served, world, what):
    key, secret = world["secrets"][what]
    base = f"/v1/jobs/{world['alice_job']}/outputs/"
    relatives = ["../../" + key]
    if key.startswith(f"jobs/{world['bob_job']}/"):
        relatives.append("../" + key.removeprefix("jobs/"))
    paths = [base + s for r in relatives for s in spellings(r)]
    root = getattr(world["storage"], "root", None)
    if root is not None:
        # An absolute name inside the storage root.
        paths.append(base + quote(str(root.resolve() / key), safe=""))
        paths.append(base + "/" + str(root.resolve() / key).lstrip("/"))
    assert world["storage"].get(key) == secret  # it is there to be stolen
    for path in paths:
        status, headers, body = served.request("GET", path, world["alice"])
        if status == 308:
            # werkzeug's routing merges doubled slashes with a redirect: follow it.
            assert secret not in body, path
            status, headers, body = served.request("GET", headers["Location"], world["alice"])
        assert secret not in body, path
        assert status == 404, (path, status, body[:200])
        assert headers["Content-Type"] == PROBLEM, path


def test_own_outputs_and_checkpoints_are_still_served(served, world):
    base = f"/v1/jobs/{world['alice_job']}/outputs/"
    status, _, body = served.request("GET", base + "0.png", world["alice"])
    assert (status, body) == (200, b"\x89PNG ALICE-OWN")
    status, _, body = served.request("GET", base + "checkpoints/step-000005.pt", world["alice"])
    assert (status, body) == (200, b"ALICE-OWN-CHECKPOINT")


@pytest.mark.parametrize("name", ["..", ".", "..%2F", "%2e%2e", "a/../0.png", "a//b", "%00", "0.png%00", "a%01b"])
def test_refused_output_names_are_4xx_never_500(served, world, name):
    status, headers, body = served.request("GET", f"/v1/jobs/{world['alice_job']}/outputs/{name}", world["alice"])
    assert status in (404, 422), (name, status, body[:300])
    assert headers["Content-Type"] == PROBLEM


@pytest.mark.parametrize("filename", ["..", "../x", "../../escape.jsonl", ".", "/abs.jsonl", "a\x00b.jsonl",
                                      "..\\..\\x.jsonl", "\x01\x7f.jsonl"])
def test_an_upload_named_like_a_path_is_stored_under_its_own_id(served, embedded_settings, filename):
    headers = make_key(served.settings, "uploader")
    storage = make_storage(served.settings)
    data = b'{"text": "hello"}\n'
    body, ctype = _multipart(data, filename)
    status, _, answer = served.request("POST", "/v1/files", {**headers, **ctype}, body)
    assert status == 201, (status, answer[:300])
    import json

    made = json.loads(answer)
    assert "\x00" not in made["filename"] and "/" not in made["filename"] and "\x01" not in made["filename"]
    with make_sessionmaker(make_engine(served.settings.database_url))() as session:
        key = session.get(File, made["id"]).storage_key
    assert key.startswith(f"files/{made['id']}/")
    assert storage.get(key) == data
    status, _, content = served.request("GET", f"/v1/files/{made['id']}/content", headers)
    assert (status, content) == (200, data)
    # Nothing stored outside files/<id>/: no orphan in the storage root.
    if hasattr(storage, "root"):
        stray = [p for p in storage.root.rglob("*") if p.is_file() and not p.relative_to(storage.root).parts[0] == "files"]
        assert stray == []
        assert [p.name for p in (storage.root / "files").iterdir()] == [made["id"]]
    else:
        assert storage.list("files") == [key]
