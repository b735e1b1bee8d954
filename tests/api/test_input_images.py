"""Input images at the API: files with purpose=image checked for type, bytes and
pixels before they are stored; image-to-image jobs name a file of the caller's
(another tenant's is 404) or carry a data URI, never a URL."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from api.app import create_app
from tests.helpers import make_key

PROBLEM = "application/problem+json"


def png(width: int = 40, height: int = 30, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


def upload(client, headers, data: bytes, purpose: str = "image"):
    return client.post("/v1/files", data={"purpose": purpose, "file": (io.BytesIO(data), "in.png")},
                       headers=headers, content_type="multipart/form-data")


def job(image: str, **extra) -> dict:
    return {"model": "demo-image-to-image",
            "input": {"prompt": "a fox", "image": image, "num_inference_steps": 4, **extra}}


@pytest.fixture
def alice(embedded_settings):
    return make_key(embedded_settings, "alice")


@pytest.fixture
def bob(embedded_settings):
    return make_key(embedded_settings, "bob")


def test_an_image_file_is_stored_with_its_type_and_served_back(client, alice):
    data = png(fmt="JPEG")
    resp = upload(client, alice, data)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    f = resp.get_json()
    assert (f["purpose"], f["format"], f["bytes"]) == ("image", "image/jpeg", len(data))
    content = client.get(f"/v1/files/{f['id']}/content", headers=alice)
    assert (content.status_code, content.mimetype, content.data) == (200, "image/jpeg", data)


@pytest.mark.parametrize("data, message", [
    (b"GIF89a not allowed", "is not an image of a known type (image/png, image/jpeg, image/webp)"),
    (png()[:60], "is a truncated or corrupt PNG"),
    (png(3000, 2000), "is 3000x2000 = 6000000 pixels; at most 4194304 are allowed"),
])
def test_a_bad_image_file_is_422_naming_the_file_and_nothing_is_stored(client, alice, data, message):
    resp = upload(client, alice, data)
    assert resp.status_code == 422 and resp.mimetype == PROBLEM
    [error] = resp.get_json()["errors"]
    assert error["field"] == "file" and message in error["message"], error
    assert client.get("/v1/files", headers=alice).get_json()["data"] == []


def test_an_image_over_the_byte_bound_is_422(embedded_settings, alice):
    client = create_app(embedded_settings.replace(max_image_bytes=100)).test_client()
    resp = upload(client, alice, png())
    assert resp.status_code == 422
    assert resp.get_json()["errors"][0]["message"].endswith("bytes; at most 100 are allowed")


def test_a_job_names_its_own_image_file_and_anothers_is_404(client, alice, bob):
    file_id = upload(client, alice, png()).get_json()["id"]
    resp = client.post("/v1/jobs", json=job(file_id), headers=alice)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert resp.get_json()["type"] == "image-to-image" and resp.get_json()["input"]["image"] == file_id
    for key, missing in ((bob, file_id), (alice, "0" * 32)):
        resp = client.post("/v1/jobs", json=job(missing), headers=key)
        assert resp.status_code == 404 and resp.mimetype == PROBLEM
        assert [e["field"] for e in resp.get_json()["errors"]] == ["input.image"]


def test_a_dataset_file_is_no_input_image(client, alice):
    dataset = upload(client, alice, b'{"text": "hi"}\n', purpose="fine-tune").get_json()["id"]
    resp = client.post("/v1/jobs", json=job(dataset), headers=alice)
    assert resp.status_code == 422
    assert resp.get_json()["errors"] == [{"field": "input.image",
                                          "message": f"file {dataset} has purpose 'fine-tune', not 'image'"}]


@pytest.mark.parametrize("image, extra, field, message", [
    ("https://example.com/cat.png", {}, "input.image", "must be a file id (POST /v1/files with purpose=image) or a "
                                                       "data:image/...;base64, URI"),
    ("data:image/png;base64,@@@", {}, "input.image", "is a data URI whose base64 does not decode"),
    ("data:image/png;base64," + base64.b64encode(png(1100, 1000)).decode(), {}, "input.image",
     "is 1100x1000 = 1100000 pixels; at most 1048576 are allowed"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), {}, "input.image",
     "is not an image of a known type"),
    ("data:image/png;base64," + base64.b64encode(png()).decode(), {"strength": 0.1}, "input.strength",
     "runs no step: strength x num_inference_steps = 0.1 x 4 is under 1"),
    ("data:image/png;base64," + base64.b64encode(png()).decode(), {"strength": 1.5}, "input.strength",
     "less than or equal to 1"),
    ("data:image/png;base64," + base64.b64encode(png()).decode(), {"width": 512}, "input.width",
     "must be at most 256 for this model, got 512"),
])
def test_an_out_of_bounds_input_is_422_naming_the_field(client, alice, image, extra, field, message):
    resp = client.post("/v1/jobs", json=job(image, **extra), headers=alice)
    assert resp.status_code == 422 and resp.mimetype == PROBLEM, resp.get_data(as_text=True)[:300]
    [error] = resp.get_json()["errors"]
    assert error["field"] == field and message in error["message"], error


def test_a_data_uri_job_is_queued(client, alice):
    uri = "data:image/webp;base64," + base64.b64encode(png(fmt="WEBP")).decode()
    resp = client.post("/v1/jobs", json=job(uri, strength=0.5), headers=alice)
    assert resp.status_code == 202, resp.get_data(as_text=True)


def test_a_file_over_the_models_own_pixel_bound_is_422(client, alice):
    # Within the service's upload bound (4,194,304 pixels), over demo-image-to-image's (1,048,576).
    file_id = upload(client, alice, png(1100, 1000)).get_json()["id"]
    resp = client.post("/v1/jobs", json=job(file_id), headers=alice)
    assert resp.status_code == 422
    assert resp.get_json()["errors"] == [{"field": "input.image", "message": f"file {file_id} is 1100x1000 = "
                                          "1100000 pixels; at most 1048576 are allowed"}]
