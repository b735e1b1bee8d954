"""The class-to-image family: a class label (and a seed) to an image, through a
class-conditional diffusers UNet2DModel (`num_class_embeds`) and the scheduler
saved beside it, in a diffusers pipeline directory (unet/, scheduler/,
model_index.json). diffusers' own DDPMPipeline/DDIMPipeline pass no class
labels, so the denoising loop is the few lines below, with one generator per
image as the text-to-image family does.

`demo-digits` is one: a small UNet trained on scikit-learn's handwritten digits
(models/digits.py), so its output is recognisable."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models import image
from models.batch_rows import StepProgress, live_rows, seeds_of
from models.base import InputInvalid, IsCancelled, OnProgress, Result, check_bound, module_bytes, parse

FAMILY = "class-to-image"
PINS = True
SEED_MAX = 2**32 - 1
SCHEMA_LIMITS = [
    ("num_classes", "label", "exclusiveMaximum"),
    ("max_inference_steps", "num_inference_steps", "maximum"),
    ("max_images", "num_images", "maximum"),
]
# num_classes: labels run 0 .. num_classes - 1 (the UNet's num_class_embeds).
LIMITS = {"num_classes", "max_inference_steps", "max_images"}


class Input(BaseModel):
    """A class-to-image job's `input`."""

    model_config = ConfigDict(extra="forbid")

    label: int = Field(ge=0, description="The class to draw (demo-digits: the digit 0-9).")
    num_inference_steps: int = Field(25, ge=1, description="Denoising steps; more is slower and usually cleaner.")
    num_images: int = Field(1, ge=1, description="Images of this class; image k uses seed + k.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX,
                             description="Random seed of the first image; the same input and seed give the same images.")
    scale: int = Field(1, ge=1, le=8, description="Each pixel drawn as scale x scale pixels (nearest neighbour), "
                                                  "so a small model's images can be seen.")


def validate(raw: Any, limits: dict) -> Input:
    """The job input as an `Input`; raises InputInvalid naming "input.<field>"."""
    inp = parse(Input, raw)
    errors: list[dict[str, str]] = []
    classes = limits.get("num_classes")
    if classes is not None and inp.label >= classes:
        errors.append({"field": "input.label", "message": f"must be below {classes} for this model, got {inp.label}"})
    check_bound(errors, "input.num_inference_steps", inp.num_inference_steps, limits.get("max_inference_steps"))
    check_bound(errors, "input.num_images", inp.num_images, limits.get("max_images"))
    if errors:
        raise InputInvalid(errors)
    return inp


def batch_key(inp: Input) -> str:
    # One loop shares the timesteps; labels, seeds, counts and scale are per row.
    return f"{inp.num_inference_steps}"


def load(checkpoint: str, device: str, dtype: str, revision: str | None = None,
         variant: str | None = None) -> ClassImageModel:
    """Load the pipeline directory `checkpoint` (a UNet2DModel with class
    embeddings and its scheduler) onto `device`."""
    import torch

    pipe = image.load_pipeline("DiffusionPipeline", checkpoint, device, dtype, revision, variant)
    if getattr(pipe.unet.config, "num_class_embeds", None) is None:
        raise ValueError(f"{checkpoint}: the UNet has no class embeddings (num_class_embeds); not class-conditional")
    return ClassImageModel(pipe, torch.device(device))


check = image.check


class ClassImageModel:
    """A class-conditional UNet and its scheduler, running a batch of jobs in one denoising loop."""

    def __init__(self, pipe, device):
        self.unet = pipe.unet.eval()
        self.scheduler_config = pipe.scheduler.config
        self.scheduler_cls = type(pipe.scheduler)
        self.device = device
        self.num_classes = int(self.unet.config.num_class_embeds)
        self.nbytes = module_bytes(self.unet)

    def run(self, inputs: list[Input], on_progress: OnProgress, is_cancelled: IsCancelled) -> list[Result | None]:
        import torch

        results: list[Result | None] = [None] * len(inputs)
        live, rows = live_rows(inputs, is_cancelled, batch_key)
        if not live:
            return results
        steps = rows[0].num_inference_steps
        for inp in rows:
            if inp.label >= self.num_classes:
                raise ValueError(f"input.label {inp.label} is not below this model's {self.num_classes} classes")
        cfg = self.unet.config
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        dtype = self.unet.dtype
        # Image k of a job starts from noise of its own generator (seed + k):
        # the same whatever else is in the batch.
        noise, labels, owner = [], [], []
        seeds = seeds_of(rows)
        for r, (inp, seed) in enumerate(zip(rows, seeds)):
            for k in range(inp.num_images):
                g = torch.Generator(device="cpu").manual_seed(seed + k)
                noise.append(torch.randn(shape, generator=g))
                labels.append(inp.label)
                owner.append(r)
        x = torch.stack(noise).to(self.device, dtype)
        class_labels = torch.tensor(labels, device=self.device)
        # A scheduler of its own per batch: schedulers keep state between steps.
        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        progress = StepProgress(live, steps, on_progress, is_cancelled)
        with torch.inference_mode():
            for n, t in enumerate(scheduler.timesteps):
                eps = self.unet(x, t, class_labels=class_labels).sample
                # eta 0 where the scheduler has one (DDIM): no noise drawn after the start.
                x = scheduler.step(eps, t, x).prev_sample
                progress.report(n + 1)
                if all(progress.cancelled):
                    return results
        pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        for r, i in progress.wanted():
            inp, seed = rows[r], seeds[r]
            mine = [j for j, o in enumerate(owner) if o == r]
            meta, files = [], {}
            for k, j in enumerate(mine):
                img = _image(pixels[j], inp.scale)
                name = f"{k}.png"
                files[name] = (image._png(img), "image/png")
                meta.append({"file": name, "content_type": "image/png", "width": img.width, "height": img.height,
                             "seed": seed + k, "label": inp.label})
            results[i] = Result(output={"images": meta}, files=files)
        return results


def _image(chw, scale: int):
    """A (channels, h, w) uint8 array as a PIL image (grey for one channel), each pixel scale x scale."""
    from PIL import Image

    img = Image.fromarray(chw[0]) if chw.shape[0] == 1 else Image.fromarray(chw.transpose(1, 2, 0))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img
