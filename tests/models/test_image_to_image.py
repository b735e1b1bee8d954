"""Tests of the image-to-image family: the input image read and resized, each
job's own image and seeds alone or batched, the steps strength leaves, progress."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from models import image_to_image as i2i
from tests.models.test_image import assert_same_images, ignore, never, pngs


def png(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def model(image_checkpoint):
    return i2i.load(image_checkpoint, "cpu", "float32")


def job(image: str, seed: int, files=None, **kw) -> i2i.Input:
    inp = i2i.validate({"prompt": "a fox", "image": image, "seed": seed, "num_inference_steps": 4, "strength": 0.5,
                        **kw}, {})
    return i2i.attach_files(inp, (files or {}).get)


def test_the_demo_checkpoint_loads_as_an_image_to_image_pipeline(model):
    assert type(model.pipe).__name__ == "StableDiffusionImg2ImgPipeline"


def test_output_is_pngs_at_the_asked_size_from_a_file_or_a_data_uri(model):
    red = png((220, 20, 20))
    file_id = "a" * 32
    from_file = model.run([job(file_id, 3, {file_id: red}, width=48, height=32)], ignore, never)[0]
    from_uri = model.run([job(uri(red), 3, width=48, height=32)], ignore, never)[0]
    assert from_file.output["images"] == [{"file": "0.png", "content_type": "image/png", "width": 48, "height": 32,
                                           "seed": 3}]
    img = Image.open(io.BytesIO(pngs(from_file)[0]))
    assert (img.format, img.size) == ("PNG", (48, 32))
    assert pngs(from_file) == pngs(from_uri)


def test_the_input_image_matters(model):
    red, blue = (model.run([job(uri(png(c)), 5)], ignore, never)[0] for c in ((220, 20, 20), (20, 20, 220)))
    assert pngs(red) != pngs(blue)
    # At low strength the output keeps the input's colour.
    pixels = Image.open(io.BytesIO(pngs(red)[0])).convert("RGB").resize((1, 1)).getpixel((0, 0))
    assert pixels[0] > pixels[2], pixels


def test_each_job_keeps_its_image_and_seeds_alone_or_batched(model):
    rows = [job(uri(png((220, 20, 20))), 1, num_images=2), job(uri(png((20, 200, 20))), 2, num_images=2)]
    batched = model.run(rows, ignore, never)
    for inp, got in zip(rows, batched):
        assert_same_images(pngs(got), pngs(model.run([inp], ignore, never)[0]))


def test_progress_counts_the_steps_strength_leaves(model, progress):
    model.run([job(uri(png((1, 2, 3))), 1, strength=0.75)], progress, never)
    assert progress.calls == {0: [(1, 3), (2, 3), (3, 3)]}


def test_strength_is_part_of_the_batch_key():
    a = i2i.validate({"prompt": "a", "image": "f" * 32, "strength": 0.5}, {})
    assert i2i.batch_key(a) != i2i.batch_key(a.model_copy(update={"strength": 0.6}))
    assert i2i.batch_key(a) == i2i.batch_key(a.model_copy(update={"image": "e" * 32, "seed": 4}))


def test_an_unread_image_is_refused_rather_than_run_without_it(model):
    inp = i2i.validate({"prompt": "a", "image": "f" * 32, "num_inference_steps": 2}, {})
    with pytest.raises(ValueError, match="attach_files"):
        model.run([inp], ignore, never)
