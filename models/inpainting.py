"""The inpainting family: a prompt, an input image and a mask (white: repaint,
black: keep) through any diffusers inpainting pipeline
(AutoPipelineForInpainting; a text-to-image checkpoint loads as its inpainting
form). Everything else is the image-to-image family's (models/image_to_image.py).
Outside the mask the output is the input image's own pixels: diffusers'
inpainting of a 4-channel model only blends latents there, which the VAE does
not give back exactly, so each output is composited over the input."""
from __future__ import annotations

from typing import Any

from pydantic import Field, PrivateAttr

from models import image, image_input, image_to_image
from models.base import InputInvalid, parse

FAMILY = "inpainting"
PINS = True
FILE_FIELDS = ("image", "mask_image")
SCHEMA_LIMITS = image.SCHEMA_LIMITS
LIMIT_CHOICES = image.LIMIT_CHOICES
LIMITS = image_to_image.LIMITS


class Input(image_to_image.Input):
    """An inpainting job's `input`: an image-to-image input plus the mask of what to repaint."""

    strength: float = Field(
        1.0, gt=0, le=1, description="How far from the input image to go inside the mask: 1 repaints it whole."
    )
    mask_image: str = Field(
        description="What to repaint: white (or any non-black) pixels are repainted, black ones kept. A file id "
                    "(purpose=image) or a data:image/...;base64, URI, resized to width x height."
    )
    _mask_bytes: bytes | None = PrivateAttr(None)


def validate(raw: Any, limits: dict) -> Input:
    """The job input as an `Input`; raises InputInvalid naming "input.<field>"."""
    inp = parse(Input, raw)
    errors = image_to_image.reference_errors(inp, limits)
    try:
        image_input.check_reference(inp.mask_image, limits.get("max_input_bytes", image_input.MAX_BYTES),
                                    limits.get("max_input_pixels", image_input.MAX_PIXELS))
    except image_input.ImageRefused as exc:
        errors.append({"field": "input.mask_image", "message": str(exc)})
    if errors:
        raise InputInvalid(errors)
    return inp


batch_key = image_to_image.batch_key


def attach_files(inp: Input, read_file) -> Input:
    """The input with its image's and mask's bytes read (storage or data URI)."""
    inp = image_to_image.attach_files(inp, read_file)
    inp._mask_bytes = image_input.read(inp.mask_image, read_file)
    return inp


def load(checkpoint: str, device: str, dtype: str, revision: str | None = None,
         variant: str | None = None) -> "InpaintingModel":
    """Load an inpainting pipeline from `checkpoint` onto `device`."""
    import torch

    return InpaintingModel(image.load_pipeline("AutoPipelineForInpainting", checkpoint, device, dtype, revision,
                                               variant), torch.device(device))


check = image.check


class InpaintingModel(image_to_image.ImageToImageModel):
    """Image-to-image runs with a mask per job, each output pasted over its input outside the mask."""

    def extra_args(self, rows: list[Input]) -> dict:
        args = super().extra_args(rows)
        masks = []
        for inp in rows:
            if inp._mask_bytes is None:
                raise ValueError("input.mask_image was not read: attach_files() runs before the model")
            masks += [self._mask(inp)] * inp.num_images
        return {**args, "mask_image": masks}

    def finish_images(self, rows: list[Input], images: list) -> list:
        from PIL import Image

        out = []
        for r, inp in enumerate(rows):
            original = image_input.decode(inp._image_bytes, inp.width, inp.height)
            mask = self._mask(inp)
            for k in range(inp.num_images):
                out.append(Image.composite(images[r * inp.num_images + k].convert("RGB"), original, mask))
        return out

    @staticmethod
    def _mask(inp: Input):
        # Any pixel that is not black is repainted: a binary mask, as the composite above needs.
        return image_input.decode(inp._mask_bytes, inp.width, inp.height).convert("L").point(lambda v: 255 if v else 0)
