"""The image-to-image family: a prompt and an input image (a file id or a data
URI) through any diffusers image-to-image pipeline (AutoPipelineForImage2Image:
Stable Diffusion, SDXL, Kandinsky, Flux, ...). Inputs, limits, seeds,
schedulers and batching are the image-generation family's (models/image.py),
plus the image and how much of it to keep."""
from __future__ import annotations

from typing import Any

from pydantic import Field, PrivateAttr

from models import image, image_input
from models.base import InputInvalid, parse

FAMILY = "image-to-image"
PINS = True
# Input fields that may hold a file id: the API checks the caller owns each
# (purpose=image), and the worker reads its bytes (attach_files).
FILE_FIELDS = ("image",)
SCHEMA_LIMITS = image.SCHEMA_LIMITS
LIMIT_CHOICES = image.LIMIT_CHOICES
LIMITS = image.LIMITS | {"max_input_bytes", "max_input_pixels"}


class Input(image.Input):
    """An image-to-image job's `input`: an image-generation input plus the image to start from."""

    image: str = Field(
        description="The image to start from: a file id (POST /v1/files with purpose=image) or a "
                    "data:image/png|jpeg|webp;base64,... URI. It is resized to width x height. Never a URL."
    )
    strength: float = Field(
        0.8, gt=0, le=1, description="How far from the input image to go: 1 ignores it, near 0 keeps it; the "
                                     "pipeline runs strength x num_inference_steps steps."
    )
    # The image's bytes once the worker has read them (attach_files); never part of the stored input.
    _image_bytes: bytes | None = PrivateAttr(None)


def validate(raw: Any, limits: dict) -> Input:
    """The job input as an `Input`; raises InputInvalid naming "input.<field>"."""
    inp = parse(Input, raw)
    errors = reference_errors(inp, limits)
    if errors:
        raise InputInvalid(errors)
    return inp


def reference_errors(inp: Input, limits: dict) -> list[dict[str, str]]:
    """What the registry limits refuse in a parsed input, its image and its strength (inpainting's too)."""
    errors = image.limit_errors(inp, limits)
    try:
        image_input.check_reference(inp.image, limits.get("max_input_bytes", image_input.MAX_BYTES),
                                    limits.get("max_input_pixels", image_input.MAX_PIXELS))
    except image_input.ImageRefused as exc:
        errors.append({"field": "input.image", "message": str(exc)})
    if int(inp.num_inference_steps * inp.strength) < 1:
        errors.append({"field": "input.strength", "message": f"runs no step: strength x num_inference_steps = "
                                                             f"{inp.strength} x {inp.num_inference_steps} is under 1"})
    return errors


def batch_key(inp: Input) -> str:
    # The pipeline takes one strength per call; input images are resized to the output size.
    return f"{image.batch_key(inp)}|{inp.strength}"


def attach_files(inp: Input, read_file) -> Input:
    """The input with its image's bytes read, from storage (`read_file(file id)`) or its data URI."""
    inp = inp.model_copy()
    inp._image_bytes = image_input.read(inp.image, read_file)
    return inp


def load(checkpoint: str, device: str, dtype: str, revision: str | None = None,
         variant: str | None = None) -> "ImageToImageModel":
    """Load an image-to-image pipeline from `checkpoint` onto `device`; a
    text-to-image checkpoint loads as its image-to-image form (same weights)."""
    import torch

    return ImageToImageModel(image.load_pipeline("AutoPipelineForImage2Image", checkpoint, device, dtype, revision,
                                                 variant), torch.device(device))


check = image.check


class ImageToImageModel(image.ImageModel):
    """The image family's batched runs, each job starting from its own image."""

    def steps_run(self, first: Input) -> int:
        # As diffusers' img2img pipelines count: the first (1 - strength) of the schedule is skipped.
        return min(int(first.num_inference_steps * first.strength), first.num_inference_steps)

    def extra_args(self, rows: list[Input]) -> dict:
        # One input image per output image, prompt-major as the generators: a
        # pipeline given fewer images than outputs would tile them
        # (img0, img1, img0, img1) against prompts laid out p0, p0, p1, p1.
        images = []
        for inp in rows:
            if inp._image_bytes is None:
                raise ValueError("input.image was not read: attach_files() runs before the model")
            images += [image_input.decode(inp._image_bytes, inp.width, inp.height)] * inp.num_images
        return {"image": images, "strength": rows[0].strength}
