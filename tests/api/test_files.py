"""The /v1/files routes at their edges: any file name uploads and downloads
(RFC 6266, nothing injected), deeply nested rows are a 422 naming the line,
and a tenant's stored files are bounded by a quota, concurrent uploads
included (SQLite and Postgres)."""
from __future__ import annotations

import secrets
import threading
from urllib.parse import unquote

import pytest
from sqlalchemy import update
from werkzeug.http import parse_options_header

from api.app import create_app
from genq.db import make_engine, make_sessionmaker
from genq.schema import File
from tests.helpers import make_key

PROBLEM = "application/problem+json"


def sessions_for(settings):
    return make_sessionmaker(make_engine(settings.database_url))


def multipart(data: bytes, disposition_name: str) -> tuple[bytes, str]:
    """A multipart body whose file part carries `disposition_name` as written
    (a quoted filename, or filename*=UTF-8''... as browsers send non-ASCII)."""
    boundary = secrets.token_hex(8)
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; {disposition_name}\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def upload(client, headers, data: bytes = b'{"text": "hi"}\n', disposition_name: str = 'filename="d.jsonl"'):
    body, ctype = multipart(data, disposition_name)
    return client.post("/v1/files", data=body, headers={**headers, "Content-Type": ctype})


# --- names ------------------------------------------------------------------------


def test_nul_and_control_characters_in_an_upload_name_are_cleaned(any_db):
    client = create_app(any_db).test_client()
    headers = make_key(any_db, f"nul-{secrets.token_hex(3)}")
    resp = upload(client, headers, disposition_name="filename*=UTF-8''a%00b%0D%0Ac%E2%80%AE.jsonl")
    assert resp.status_code == 201, resp.get_data(as_text=True)[:300]
    assert resp.get_json()["filename"] == "a_b__c_.jsonl"


def test_a_deeply_nested_dataset_row_is_422_naming_its_line(client, embedded_settings):
    headers = make_key(embedded_settings, "nest")
    deep = b'{"text": "ok"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n" + b'{"text": ' + b"9" * 5000 + b"}\n"
    resp = upload(client, headers, deep)
    assert resp.status_code == 422, resp.get_data(as_text=True)[:300]
    fields = [e["field"] for e in resp.get_json()["errors"]]
    assert fields == ["file.line[2]", "file.line[3]"]


# --- downloads ----------------------------------------------------------------


@pytest.mark.parametrize("sent, shown", [
    ('filename="plain.jsonl"', "plain.jsonl"),
    ("filename*=UTF-8''a%22b%3B%20filename%3Devil.exe.jsonl", 'a"b; filename=evil.exe.jsonl'),
    ("filename*=UTF-8''%E6%95%B0%E6%8D%AE%20donn%C3%A9es.jsonl", "数据 données.jsonl"),
    ("filename*=UTF-8''line%0D%0ASet-Cookie%3A%20x%3D1.jsonl", "line__Set-Cookie: x=1.jsonl"),
    ("filename*=UTF-8''back%5C%5Cslash.jsonl", "back__slash.jsonl"),
])
def test_any_file_name_downloads_without_injecting_parameters(client, embedded_settings, sent, shown):
    headers = make_key(embedded_settings, "names")
    made = upload(client, headers, disposition_name=sent)
    assert made.status_code == 201, made.get_data(as_text=True)
    assert made.get_json()["filename"] == shown
    resp = client.get(f"/v1/files/{made.get_json()['id']}/content", headers=headers)
    assert resp.status_code == 200 and resp.data == b'{"text": "hi"}\n'
    assert_disposition(resp.headers["Content-Disposition"], shown)


def test_an_old_record_with_a_newline_in_its_name_still_downloads(client, embedded_settings):
    headers = make_key(embedded_settings, "legacy")
    file_id = upload(client, headers).get_json()["id"]
    name = 'old\r\nSet-Cookie: x=1"; filename="evil.exe'
    with sessions_for(embedded_settings).begin() as session:
        session.execute(update(File).where(File.id == file_id).values(filename=name))
    resp = client.get(f"/v1/files/{file_id}/content", headers=headers)
    assert resp.status_code == 200
    assert "Set-Cookie" not in resp.headers
    assert_disposition(resp.headers["Content-Disposition"], name)


def assert_disposition(value: str, name: str) -> None:
    assert "\r" not in value and "\n" not in value
    kind, params = parse_options_header(value)
    assert kind == "attachment"
    # werkzeug's parser decodes filename* into "filename"; nothing else may appear.
    assert set(params) == {"filename"}, params
    assert params["filename"] == name
    star = value.split("filename*=UTF-8''", 1)[1]
    assert unquote(star) == name
    fallback = value.split('filename="', 1)[1].split('"', 1)[0]
    assert fallback.isascii() and not set(fallback) & set('"\\;\r\n')


# --- the stored-files quota ---------------------------------------------------


def test_uploads_past_the_tenant_quota_are_413_naming_file(embedded_settings):
    row = b'{"text": "' + b"x" * 80 + b'"}\n'
    client = create_app(embedded_settings.replace(max_tenant_file_bytes=3 * len(row))).test_client()
    headers, other = make_key(embedded_settings, "q1"), make_key(embedded_settings, "q2")
    assert upload(client, headers, row * 2).status_code == 201
    over = upload(client, headers, row * 2)
    assert over.status_code == 413 and over.mimetype == PROBLEM
    problem = over.get_json()
    assert problem["errors"][0]["field"] == "file"
    assert f"{2 * len(row)} bytes" in problem["detail"] and f"quota of {3 * len(row)} bytes" in problem["detail"]
    assert upload(client, headers, row).status_code == 201  # exactly at the quota
    assert upload(client, other, row * 2).status_code == 201  # another tenant has a quota of its own


def test_concurrent_uploads_cannot_pass_the_quota_together(any_db):
    row = b'{"text": "' + b"x" * 200 + b'"}\n'
    quota = len(row) * 5
    app = create_app(any_db.replace(max_tenant_file_bytes=quota))
    headers = make_key(any_db, f"race-{secrets.token_hex(3)}")
    barrier, codes = threading.Barrier(8), []

    def one():
        client = app.test_client()
        barrier.wait()
        codes.append(upload(client, headers, row * 3).status_code)  # each is over half the quota

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stored = sum(f["bytes"] for f in app.test_client().get("/v1/files", headers=headers).get_json()["data"])
    assert sorted(codes) == [201] + [413] * 7, codes
    assert stored == len(row) * 3 <= quota
