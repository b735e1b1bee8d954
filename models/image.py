"""The image-generation family: input schema, validation, and batched runs of
any diffusers text-to-image pipeline (Stable Diffusion 1/2, SDXL, SD3, Flux,
PixArt, ...), loaded through AutoPipelineForText2Image, with a scheduler
chosen per job."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from models.base import InputInvalid, IsCancelled, OnProgress, Result, check_bound, check_chars, parse
from models.batch_rows import PipelineModel, StepProgress, generators, live_rows, seeds_of
from models.libraries import quiet

FAMILY = "image-generation"
SEED_MAX = 2**32 - 1
# The registry may pin a diffusers pipeline's `revision` and `variant`.
PINS = True
# A job's `scheduler` -> (diffusers class, extra config). Each is made from the
# pipeline's own scheduler config, so betas and timestep spacing stay the model's.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SchedulerName = Literal["euler", "euler-a", "dpm++", "dpm++-karras", "ddim", "pndm", "lms", "heun", "unipc"]
# Registry limits as JSON-schema bounds of the input: (limit, field, keyword).
SCHEMA_LIMITS = [
    ("max_width", "width", "maximum"),
    ("max_height", "height", "maximum"),
    ("max_inference_steps", "num_inference_steps", "maximum"),
    ("max_images", "num_images", "maximum"),
    ("max_prompt_chars", "prompt", "maxLength"),
    ("max_prompt_chars", "negative_prompt", "maxLength"),
    ("schedulers", "scheduler", "enum"),
]
# Every key a registry entry's `limits` may hold; `schedulers` lists the
# schedulers a job may pick (default: all of SCHEDULERS the pipeline takes).
LIMITS = {"max_width", "max_height", "max_inference_steps", "max_images", "max_prompt_chars", "schedulers"}
LIMIT_CHOICES = {"schedulers": tuple(SCHEDULERS)}


class Input(BaseModel):
    """An image-generation job's `input`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What the image should show.")
    negative_prompt: str = Field("", description="What the image should not show (used when guidance_scale > 1).")
    width: int = Field(64, ge=8, multiple_of=8, description="Image width in pixels, a multiple of 8.")
    height: int = Field(64, ge=8, multiple_of=8, description="Image height in pixels, a multiple of 8.")
    num_inference_steps: int = Field(10, ge=1, description="Denoising steps; more is slower and usually finer.")
    guidance_scale: float = Field(
        7.5, ge=0, le=100, description="Classifier-free guidance: how closely to follow the prompt; <= 1 turns it off."
    )
    num_images: int = Field(1, ge=1, description="Images to make from this prompt; image k uses seed + k.")
    seed: int | None = Field(
        None, ge=0, le=SEED_MAX, description="Random seed of the first image; the same input and seed give the same images."
    )
    scheduler: SchedulerName | None = Field(
        None, description="The sampler of the denoising loop; none: the pipeline's own. Flow-matching pipelines "
                          "(SD3, Flux) take none of these."
    )

    # Our own check before pydantic's generic one, so the message says what to do.
    @field_validator("width", "height", mode="before")
    @classmethod
    def _multiple_of_8(cls, value: Any, info) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value % 8:
            # parse() appends "(got <value>)" to the message.
            raise PydanticCustomError("multiple_of", f"`{info.field_name}` must be a multiple of 8")
        return value


def validate(raw: Any, limits: dict) -> Input:
    """The job input as an `Input`; raises InputInvalid naming "input.<field>"."""
    inp = parse(Input, raw)
    errors = limit_errors(inp, limits)
    if errors:
        raise InputInvalid(errors)
    return inp


def limit_errors(inp: Input, limits: dict) -> list[dict[str, str]]:
    """What of a parsed input the model's registry limits refuse (the image-to-image family's too)."""
    errors: list[dict[str, str]] = []
    check_bound(errors, "input.width", inp.width, limits.get("max_width"))
    check_bound(errors, "input.height", inp.height, limits.get("max_height"))
    check_bound(errors, "input.num_inference_steps", inp.num_inference_steps, limits.get("max_inference_steps"))
    check_bound(errors, "input.num_images", inp.num_images, limits.get("max_images"))
    check_chars(errors, "input.prompt", inp.prompt, limits.get("max_prompt_chars"))
    check_chars(errors, "input.negative_prompt", inp.negative_prompt, limits.get("max_prompt_chars"))
    allowed = limits.get("schedulers")
    if inp.scheduler is not None and allowed is not None and inp.scheduler not in allowed:
        errors.append({"field": "input.scheduler",
                       "message": f"must be one of {sorted(allowed)} for this model, got {inp.scheduler!r}"})
    return errors


def batch_key(inp: Input) -> str:
    # One pipeline call shares the latent shape, the scheduler's timesteps, the
    # guidance (it decides whether the batch is doubled for CFG), the images per
    # prompt and the scheduler (one per pipeline call).
    return (f"{inp.width}x{inp.height}|{inp.num_inference_steps}|{inp.guidance_scale}|{inp.num_images}"
            f"|{inp.scheduler or 'default'}")


def load(checkpoint: str, device: str, dtype: str, revision: str | None = None,
         variant: str | None = None) -> "ImageModel":
    """Load a text-to-image pipeline from `checkpoint` (a local directory or hub
    id, at `revision`, with weights of `variant`) onto `device`. Whatever
    pipeline class its model_index.json names, AutoPipelineForText2Image maps
    to its text-to-image form (an img2img checkpoint loads as text-to-image);
    one it does not know loads as the class named."""
    import torch

    return ImageModel(load_pipeline("AutoPipelineForText2Image", checkpoint, device, dtype, revision, variant),
                      torch.device(device))


def load_pipeline(auto: str, checkpoint: str, device: str, dtype: str, revision: str | None, variant: str | None):
    """The pipeline in `checkpoint` through diffusers' AutoPipeline `auto`, on `device`."""
    import diffusers
    import torch

    quiet()

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype for an image model must be one of {sorted(dtypes)}, got {dtype!r}")
    index = diffusers.DiffusionPipeline.load_config(checkpoint, revision=revision)
    kwargs: dict[str, Any] = {"revision": revision, "variant": variant, "dtype": dtypes[dtype]}
    if "safety_checker" in index:
        # genq stores what it makes; filtering it is the operator's policy, not a model component.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        # DiffusionPipeline itself loads the class the index names (the audio family's way).
        pipe = getattr(diffusers, auto).from_pretrained(checkpoint, **kwargs)
    except ValueError as exc:
        if "AutoPipeline can't find a pipeline" not in str(exc) or auto != "AutoPipelineForText2Image":
            raise
        pipe = diffusers.DiffusionPipeline.from_pretrained(checkpoint, **kwargs)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check(checkpoint: str, revision: str | None = None, variant: str | None = None) -> list[str]:
    """What is wrong with a checkpoint directory, read from its configs only
    (no weights loaded): the pipeline index, each component's folder and
    config, and weights of the pinned variant. [] when nothing is."""
    root = Path(checkpoint)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        return [f"{root}: no model_index.json (not a diffusers pipeline directory)"]
    try:
        index = json.loads(index_path.read_text())
    except ValueError as exc:
        return [f"{index_path}: not JSON ({exc})"]
    problems = []
    from diffusers import pipelines

    if not hasattr(pipelines, str(index.get("_class_name"))):
        problems.append(f"{index_path}: unknown pipeline class {index.get('_class_name')!r} in this diffusers")
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        folder = root / name
        if not folder.is_dir():
            problems.append(f"{folder}: missing (model_index.json names component {name!r})")
            continue
        configs = [f for f in ("config.json", "scheduler_config.json", "tokenizer_config.json",
                               "preprocessor_config.json") if (folder / f).is_file()]
        if not configs:
            problems.append(f"{folder}: no config file")
            continue
        for config in configs:
            try:
                json.loads((folder / config).read_text())
            except ValueError as exc:
                problems.append(f"{folder / config}: not JSON ({exc})")
        if "config.json" in configs and name not in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            weights = [f.name for f in folder.iterdir() if f.name.endswith((".safetensors", ".bin"))]
            if variant:
                weights = [w for w in weights if f".{variant}." in w]
            if not weights:
                problems.append(f"{folder}: no weights" + (f" of variant {variant!r}" if variant else ""))
    return problems


class ImageModel(PipelineModel):
    """A loaded pipeline that runs a batch of same-shaped image jobs in one call."""

    def __init__(self, pipe, device):
        super().__init__(pipe, device)
        # The pipeline's own scheduler, and those made from its config, by job choice.
        self.schedulers = {None: pipe.scheduler}

    def steps_run(self, first) -> int:
        """Denoising steps a batch runs (progress counts to it)."""
        return first.num_inference_steps

    def extra_args(self, rows: list) -> dict:
        """Pipeline arguments beyond text-to-image's (the image-to-image family adds its images)."""
        return {}

    def finish_images(self, rows: list, images: list) -> list:
        """The pipeline's images as stored (inpainting pastes them over their input outside the mask)."""
        return images

    def _use_scheduler(self, name: str | None) -> None:
        """Put the job's scheduler in the pipeline, made once from the pipeline's own config."""
        if name not in self.schedulers:
            import diffusers

            default = self.schedulers[None]
            cls_name, extra = SCHEDULERS[name]
            cls = getattr(diffusers, cls_name)
            compatible = {c.__name__ for c in getattr(default, "compatibles", [])} | {type(default).__name__}
            if cls_name not in compatible:
                raise ValueError(f"input.scheduler {name!r} ({cls_name}) does not work with this pipeline's "
                                 f"{type(default).__name__}; compatible: {sorted(compatible)}")
            self.schedulers[name] = cls.from_config(default.config, **extra)
        self.pipe.scheduler = self.schedulers[name]

    def run(self, inputs: list[Input], on_progress: OnProgress, is_cancelled: IsCancelled) -> list[Result | None]:
        results: list[Result | None] = [None] * len(inputs)
        live, rows = live_rows(inputs, is_cancelled, batch_key)
        if not live:
            return results
        first = rows[0]
        per = first.num_images
        # One generator per image, seeded seed + k, in the order the pipeline lays
        # out its batch (prompt-major): image k of a job gets the same starting
        # noise whatever else is in the batch.
        seeds = seeds_of(rows)
        progress = StepProgress(live, self.steps_run(first), on_progress, is_cancelled)
        args = dict(
            prompt=[inp.prompt for inp in rows],
            negative_prompt=[inp.negative_prompt for inp in rows],
            width=first.width,
            height=first.height,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            num_images_per_prompt=per,
            generator=generators([seed + k for seed in seeds for k in range(per)], self.device),
            output_type="pil",
            callback_on_step_end=progress.step_end,
            **self.extra_args(rows),
        )
        # Pipelines differ in what they take (Flux has no negative prompt in
        # some versions, a few no step callback): pass what this one does.
        self._use_scheduler(first.scheduler)
        try:
            images = self.call(args).images
        finally:
            # Between batches the pipeline holds its own scheduler (what save_pretrained would write).
            self._use_scheduler(None)

        images = self.finish_images(rows, images)
        for r, i in progress.wanted():
            seed = seeds[r]
            meta, files = [], {}
            for k in range(per):
                img = images[r * per + k]
                name = f"{k}.png"
                files[name] = (_png(img), "image/png")
                meta.append(
                    {"file": name, "content_type": "image/png", "width": img.width, "height": img.height, "seed": seed + k}
                )
            results[i] = Result(output={"images": meta}, files=files)
        return results


def _png(img) -> bytes:
    # PIL writes no timestamp or text chunks unless asked (pnginfo), so the same
    # pixels always give the same bytes.
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
