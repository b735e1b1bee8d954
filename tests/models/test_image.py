"""Tests of the image-generation family: validation, deterministic PNGs, batch invariance, cancellation, progress."""
from __future__ import annotations

import io
import json

import pytest

from models import image
from models.base import InputInvalid

LIMITS = {"max_width": 128, "max_height": 128, "max_inference_steps": 20, "max_images": 4, "max_prompt_chars": 50}
STEPS = 3  # enough to exercise the scheduler, few enough to keep the suite quick


def never(row: int) -> bool:
    return False


def ignore(row: int, current: int, total: int) -> None:
    pass


def job(prompt: str, seed: int, **kw) -> image.Input:
    return image.Input(prompt=prompt, seed=seed, num_inference_steps=STEPS, **kw)


def pngs(result) -> list[bytes]:
    return [result.files[img["file"]][0] for img in result.output["images"]]


def assert_same_images(got: list[bytes], want: list[bytes]) -> None:
    """Same images from different batch layouts: identical bytes, or off by one level in a few subpixels.

    The UNet and VAE outputs of one image differ by ~1e-6 between batch sizes on
    CPU (oneDNN picks its convolution algorithm by batch size; MKL's GEMM handles
    the rows of a small batch differently), and a value sitting on a rounding
    edge then lands one step away in uint8. Measured over 57 images: 44 byte
    for byte, the rest at most 1/255 apart in 20 of 1.1M subpixels.
    """
    import numpy as np
    from PIL import Image

    assert len(got) == len(want)
    for a, b in zip(got, want):
        if a == b:
            continue
        x = np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16)
        y = np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16)
        assert x.shape == y.shape
        diff = np.abs(x - y)
        assert diff.max() <= 1, f"max pixel difference {diff.max()}"
        assert (diff > 0).mean() < 0.001, f"{(diff > 0).sum()} of {diff.size} subpixels differ"


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"prompt": "a fox", "style": "oil"}, "input.style"),
        ({"prompt": "a fox", "num_inference_steps": "10"}, "input.num_inference_steps"),
        ({"prompt": "a fox", "width": 100}, "input.width"),
        ({"prompt": "a fox", "height": 12}, "input.height"),
        ({"prompt": "a fox", "width": 0}, "input.width"),
        ({"prompt": "a fox", "width": 136}, "input.width"),
        ({"prompt": "a fox", "num_inference_steps": 21}, "input.num_inference_steps"),
        ({"prompt": "a fox", "num_images": 5}, "input.num_images"),
        ({"prompt": "a fox", "num_images": 0}, "input.num_images"),
        ({"prompt": "a fox", "guidance_scale": -1}, "input.guidance_scale"),
        ({"prompt": "x" * 51}, "input.prompt"),
        ({"prompt": "a fox", "negative_prompt": "x" * 51}, "input.negative_prompt"),
        ({"prompt": "a fox", "seed": -1}, "input.seed"),
        ({"width": 64}, "input.prompt"),
    ],
)
def test_invalid_input_names_the_field(raw, field):
    with pytest.raises(InputInvalid) as exc:
        image.validate(raw, LIMITS)
    assert [e["field"] for e in exc.value.errors] == [field], exc.value.errors


def test_error_messages_say_what_was_wrong():
    with pytest.raises(InputInvalid) as exc:
        image.validate({"prompt": "a fox", "width": 100}, LIMITS)
    assert exc.value.errors == [{"field": "input.width", "message": "`width` must be a multiple of 8 (got 100)"}]
    with pytest.raises(InputInvalid) as exc:
        image.validate({"prompt": "a fox", "width": 256, "num_images": 9}, LIMITS)
    assert exc.value.errors == [
        {"field": "input.width", "message": "must be at most 128 for this model, got 256"},
        {"field": "input.num_images", "message": "must be at most 4 for this model, got 9"},
    ]


def test_valid_input_defaults_schema_and_batch_key():
    inp = image.validate({"prompt": "a fox", "guidance_scale": 7}, LIMITS)
    assert (inp.width, inp.height, inp.num_inference_steps, inp.num_images, inp.negative_prompt, inp.seed) == (
        64, 64, 10, 1, "", None
    )
    assert image.batch_key(inp) == "64x64|10|7.0|1|default"
    # Prompts and seeds do not split batches; shapes and steps do.
    assert image.batch_key(inp.model_copy(update={"prompt": "b", "seed": 3})) == image.batch_key(inp)
    assert image.batch_key(inp.model_copy(update={"width": 72})) != image.batch_key(inp)
    schema = image.Input.model_json_schema()
    json.dumps(schema)
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
    assert schema["properties"]["width"]["multipleOf"] == 8
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name


def test_output_is_png_files_with_their_seeds(image_model):
    from PIL import Image

    result = image_model.run([job("a red fox", 7, width=64, height=32, num_images=2)], ignore, never)[0]
    assert result.output == {
        "images": [
            {"file": "0.png", "content_type": "image/png", "width": 64, "height": 32, "seed": 7},
            {"file": "1.png", "content_type": "image/png", "width": 64, "height": 32, "seed": 8},
        ]
    }
    for name, (data, content_type) in result.files.items():
        assert content_type == "image/png"
        img = Image.open(io.BytesIO(data))
        assert (img.format, img.size, img.mode) == ("PNG", (64, 32), "RGB")
    assert result.files["0.png"][0] != result.files["1.png"][0]


def test_same_input_same_png_bytes(image_model):
    # Same batch layout, same kernels: byte for byte, no tolerance.
    inp = job("a lighthouse at sunset", 42)
    assert pngs(image_model.run([inp], ignore, never)[0]) == pngs(image_model.run([inp], ignore, never)[0])
    rows = [inp, job("a fox", 1)]
    assert [pngs(r) for r in image_model.run(rows, ignore, never)] == [pngs(r) for r in image_model.run(rows, ignore, never)]


def test_job_alone_equals_job_in_a_batch_of_three(image_model):
    """Alone or batched, a job gets the same starting noise and so the same images (up to float rounding)."""
    rows = [
        job("a lighthouse", 1, negative_prompt="blurry", num_images=2),
        job("a red fox in the snow", 2**32 - 1, num_images=2),
        job("x", 3, num_images=2),
    ]
    batched = image_model.run(rows, ignore, never)
    for inp, got in zip(rows, batched):
        assert_same_images(pngs(got), pngs(image_model.run([inp], ignore, never)[0]))


def test_image_k_of_a_job_is_seed_plus_k(image_model):
    two = image_model.run([job("a red fox", 5, num_images=2)], ignore, never)[0]
    one = image_model.run([job("a red fox", 6)], ignore, never)[0]
    assert_same_images(pngs(two)[1:], pngs(one))


def test_cancelled_row_returns_none_while_batch_mates_complete(image_model, progress):
    rows = [job("a lighthouse", 1), job("a red fox", 2), job("x", 3)]

    def is_cancelled(row: int) -> bool:
        return row == 1 and bool(progress.calls.get(1))

    out = image_model.run(rows, progress, is_cancelled)
    assert out[1] is None
    assert progress.calls[1] == [(1, STEPS)]
    for i in (0, 2):
        assert_same_images(pngs(out[i]), pngs(image_model.run([rows[i]], ignore, never)[0]))


def test_all_rows_cancelled_interrupts_the_pipeline(image_model, progress):
    rows = [job("a lighthouse", 1), job("a red fox", 2)]
    out = image_model.run(rows, progress, lambda row: bool(progress.calls.get(row)))
    assert out == [None, None]
    # Each row reported its first step, then the pipeline skipped the rest.
    assert progress.calls == {0: [(1, STEPS)], 1: [(1, STEPS)]}
    assert image_model.run(rows, ignore, lambda row: True) == [None, None]


def test_progress_rises_to_the_step_count(image_model, progress):
    image_model.run([job("a", 1), job("b", 2)], progress, never)
    assert progress.calls == {r: [(s, STEPS) for s in range(1, STEPS + 1)] for r in (0, 1)}


def test_mismatched_batch_is_refused(image_model):
    with pytest.raises(ValueError, match="batch_key"):
        image_model.run([job("a", 1), job("b", 2, width=72)], ignore, never)


def test_loaded_pipeline_reports_its_size(image_model):
    assert 1_000_000 < image_model.nbytes < 100_000_000


def test_int8_is_refused_for_images(image_checkpoint):
    with pytest.raises(ValueError, match="int8"):
        image.load(image_checkpoint, "cpu", "int8")


def test_shipped_registry_limits_apply():
    from pathlib import Path

    from models.registry import Registry

    spec = Registry.load(Path(__file__).resolve().parents[2] / "models" / "registry.yaml")["demo-image"]
    assert spec.module is image
    assert spec.validate({"prompt": "a fox", "width": 256, "num_images": 4}).width == 256
    with pytest.raises(InputInvalid) as exc:
        spec.validate({"prompt": "a fox", "width": 264})
    assert exc.value.errors[0]["field"] == "input.width"
    assert spec.batch_key(spec.validate({"prompt": "a fox"})) == "float32|64x64|10|7.5|1|default"


@pytest.mark.parametrize("raw, field, message", [
    ({"prompt": "a fox", "scheduler": "dpm+++"}, "input.scheduler", "Input should be 'euler', 'euler-a'"),
    ({"prompt": "a fox", "scheduler": "heun"}, "input.scheduler",
     "must be one of ['ddim', 'euler'] for this model, got 'heun'"),
])
def test_a_scheduler_outside_the_choices_is_refused(raw, field, message):
    with pytest.raises(InputInvalid) as exc:
        image.validate(raw, {**LIMITS, "schedulers": ["euler", "ddim"]})
    [error] = exc.value.errors
    assert error["field"] == field and message in error["message"]


def test_each_job_runs_with_its_own_scheduler(image_model):
    default = pngs(image_model.run([job("a lighthouse", 3)], ignore, never)[0])
    euler = pngs(image_model.run([job("a lighthouse", 3, scheduler="euler")], ignore, never)[0])
    dpm = pngs(image_model.run([job("a lighthouse", 3, scheduler="dpm++")], ignore, never)[0])
    assert len({default[0], euler[0], dpm[0]}) == 3
    # The pipeline's own scheduler comes back for the next job that names none, state and all.
    assert pngs(image_model.run([job("a lighthouse", 3)], ignore, never)[0]) == default
    assert pngs(image_model.run([job("a lighthouse", 3, scheduler="euler")], ignore, never)[0]) == euler
    assert image.batch_key(job("a", 1, scheduler="euler")) != image.batch_key(job("a", 1))


def test_another_pipeline_class_loads_and_batches_the_same_way(image_xl_checkpoint):
    """SDXL (two text encoders, size conditioning) through the same loader: AutoPipelineForText2Image."""
    from PIL import Image

    model = image.load(image_xl_checkpoint, "cpu", "float32")
    assert type(model.pipe).__name__ == "StableDiffusionXLPipeline"
    rows = [job("a lighthouse", 1, width=32, height=32, scheduler="euler-a"),
            job("a red fox", 2, width=32, height=32, scheduler="euler-a")]
    batched = model.run(rows, ignore, never)
    img = Image.open(io.BytesIO(pngs(batched[0])[0]))
    assert (img.format, img.size) == ("PNG", (32, 32))
    assert_same_images(pngs(batched[1]), pngs(model.run([rows[1]], ignore, never)[0]))


def test_a_variant_pinned_in_the_registry_loads_those_weights(image_model, tmp_path):
    image_model.pipe.save_pretrained(tmp_path, variant="fp16")  # the name only: the tensors stay float32
    assert image.check(str(tmp_path), variant="fp16") == []
    assert image.check(str(tmp_path), variant="bf16") == [
        f"{tmp_path / c}: no weights of variant 'bf16'" for c in ("text_encoder", "unet", "vae")]
    pinned = image.load(str(tmp_path), "cpu", "float32", variant="fp16")
    inp = job("a lighthouse", 9)
    assert pngs(pinned.run([inp], ignore, never)[0]) == pngs(image_model.run([inp], ignore, never)[0])
    with pytest.raises(ValueError, match="bf16"):
        image.load(str(tmp_path), "cpu", "float32", variant="bf16")


def test_a_models_schedulers_narrow_its_input_schema():
    from pathlib import Path

    from models.registry import Registry

    registry = Registry.load(Path(__file__).resolve().parents[2] / "models" / "registry.yaml")
    [choices] = [b for b in registry["demo-image-xl"].input_schema()["properties"]["scheduler"]["anyOf"] if "enum" in b]
    assert choices["enum"] == ["euler", "euler-a", "dpm++", "dpm++-karras", "ddim", "unipc"]
    [everything] = [b for b in registry["demo-image"].input_schema()["properties"]["scheduler"]["anyOf"] if "enum" in b]
    assert everything["enum"] == list(image.SCHEDULERS)
