"""Tests of the inpainting family: only the masked part changes, each job's own
image, mask and seeds alone or batched, and the mask is an input like the image."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models import inpainting
from models.base import InputInvalid
from tests.models.test_image import assert_same_images, ignore, never, pngs
from tests.models.test_image_to_image import png, uri


def mask(box=(0, 0, 32, 64), size=(64, 64)) -> bytes:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    buf = io.BytesIO()
    m.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(image_checkpoint):
    return inpainting.load(image_checkpoint, "cpu", "float32")


def job(image: bytes, mask_bytes: bytes, seed: int, **kw) -> inpainting.Input:
    files = {"a" * 32: image, "b" * 32: mask_bytes}
    inp = inpainting.validate({"prompt": "a fox", "image": "a" * 32, "mask_image": "b" * 32, "seed": seed,
                               "num_inference_steps": 3, **kw}, {})
    return inpainting.attach_files(inp, files.__getitem__)


def test_the_demo_checkpoint_loads_as_an_inpainting_pipeline(model):
    assert type(model.pipe).__name__ == "StableDiffusionInpaintPipeline"


def test_only_the_masked_part_changes(model):
    red = png((220, 20, 20), size=(64, 64))
    out = Image.open(io.BytesIO(pngs(model.run([job(red, mask(), 4)], ignore, never)[0])[0]))
    pixels = np.asarray(out.convert("RGB"), dtype=np.int16)
    assert out.size == (64, 64)
    assert (pixels[:, 32:] == [220, 20, 20]).all()  # kept: the input's own pixels
    assert np.abs(pixels[:, :32] - [220, 20, 20]).mean() > 10  # repainted


def test_each_job_keeps_its_image_mask_and_seeds_alone_or_batched(model):
    rows = [job(png((220, 20, 20)), mask(), 1, num_images=2),
            job(png((20, 20, 220)), mask((16, 16, 48, 48)), 2, num_images=2)]
    batched = model.run(rows, ignore, never)
    for inp, got in zip(rows, batched):
        assert_same_images(pngs(got), pngs(model.run([inp], ignore, never)[0]))


@pytest.mark.parametrize("raw, field", [
    ({"mask_image": "http://example.com/m.png"}, "input.mask_image"),
    ({"mask_image": None}, "input.mask_image"),
    ({"image": "data:image/png;base64,AAAA"}, "input.image"),
])
def test_a_bad_mask_or_image_names_its_field(raw, field):
    base = {"prompt": "a", "image": "a" * 32, "mask_image": "b" * 32}
    with pytest.raises(InputInvalid) as exc:
        inpainting.validate({**base, **raw}, {})
    assert [e["field"] for e in exc.value.errors] == [field]


def test_an_unread_mask_is_refused(model):
    inp = inpainting.validate({"prompt": "a", "image": uri(png((1, 1, 1))), "mask_image": "b" * 32}, {})
    inp = inpainting.image_to_image.attach_files(inp, {}.get)  # the image only
    with pytest.raises(ValueError, match="mask_image was not read"):
        model.run([inp], ignore, never)
