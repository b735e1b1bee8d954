"""Storage keys: a name a user chose stays under its prefix, and both storages
refuse any key that could step out of where it is put."""
from __future__ import annotations

import urllib.request

import pytest

from genq.settings import Settings
from genq.storage import LocalStorage, NotFound, S3Storage, UnsafeKey, child_key, job_key, make_storage
from tests.conftest import new_bucket

UNSAFE = ["", ".", "..", "../x", "a/../b", "a/..", "./a", "a/./b", "/abs", "a//b", "a/", "..\\x", "a\\b",
          "a\x00b", "a\nb", "a\rb", "\x7f", "a\x85b"]


@pytest.mark.parametrize("name", ["0.png", "checkpoints/step-000050.pt", "a..b", "...", ".hidden", "données.jsonl",
                                  "a b"])
def test_child_key_keeps_plain_names_under_the_prefix(name):
    assert child_key("jobs/abc", name) == f"jobs/abc/{name}"
    assert job_key("abc", name) == f"jobs/abc/{name}"


@pytest.mark.parametrize("name", UNSAFE)
def test_child_key_refuses_names_that_could_leave_the_prefix(name):
    with pytest.raises(UnsafeKey):
        child_key("jobs/abc", name)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "storage")
    settings = Settings.from_env({}, home=tmp_path, **new_bucket(request.getfixturevalue("s3_endpoint")))
    store = make_storage(settings)
    assert isinstance(store, S3Storage)
    return store


@pytest.mark.parametrize("key", ["jobs/a/../b/0.png", "../outside", "jobs/a/..", "/jobs/a/0.png", "jobs//a",
                                 "jobs/a\x00/0.png", "jobs\\..\\x"])
def test_both_storages_refuse_unsafe_keys_on_every_operation(storage, key):
    for call in (lambda: storage.put(key, b"x", "text/plain"), lambda: storage.get(key),
                 lambda: storage.list(key), lambda: storage.presigned_url(key)):
        with pytest.raises(UnsafeKey):
            call()
    if isinstance(storage, LocalStorage):
        assert not storage.root.exists() or not any(storage.root.rglob("*"))


def test_a_folder_or_a_missing_object_is_not_found(storage):
    storage.put("jobs/a/checkpoints/step-1.pt", b"x", "application/octet-stream")
    assert storage.get("jobs/a/checkpoints/step-1.pt") == b"x"
    assert storage.list("jobs/a") == ["jobs/a/checkpoints/step-1.pt"]
    for key in ("jobs/a/checkpoints", "jobs/a/nothing", "jobs/a/checkpoints/step-1.pt/x"):
        with pytest.raises(NotFound):
            storage.get(key)


def test_a_symbolic_link_out_of_the_root_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    storage = LocalStorage(tmp_path / "storage")
    (tmp_path / "storage" / "jobs").mkdir(parents=True)
    (tmp_path / "storage" / "jobs" / "a").symlink_to(outside)
    with pytest.raises(NotFound):
        storage.get("jobs/a/secret")


def test_presigned_urls_name_the_public_endpoint_and_everything_else_goes_to_the_inner_one(tmp_path, s3_endpoint):
    # The inner endpoint is moto at 127.0.0.1; "localhost" stands in for the
    # address clients use (Compose: the published port instead of s3:8333).
    bucket = new_bucket(s3_endpoint)
    port = s3_endpoint.rsplit(":", 1)[1]
    public = f"http://localhost:{port}"
    store = make_storage(Settings.from_env({}, home=tmp_path, s3_public_endpoint_url=public, **bucket))
    store.put("jobs/a/0.png", b"png", "image/png")
    url = store.presigned_url("jobs/a/0.png")
    assert url.startswith(f"{public}/"), url
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"png"

    # A public address this machine cannot reach at all: reads and writes
    # still work, so they never use it; only the URL names it.
    unreachable = "http://genq-public.invalid:9"
    store = make_storage(Settings.from_env({}, home=tmp_path, s3_public_endpoint_url=unreachable, **bucket))
    store.put("jobs/b/0.png", b"b", "image/png")
    assert store.get("jobs/b/0.png") == b"b" and store.list("jobs/b") == ["jobs/b/0.png"]
    assert store.presigned_url("jobs/b/0.png").startswith(f"{unreachable}/")

    # Unset: presigned for the one endpoint there is, as before.
    plain = make_storage(Settings.from_env({}, home=tmp_path, **bucket))
    assert plain.presigned_url("jobs/a/0.png").startswith(f"{s3_endpoint}/")
