"""The text-to-video family: a prompt to a short clip through a diffusers video
pipeline (TextToVideoSD, or whatever class the checkpoint's model_index.json
names), batched, one generator per clip, written as an animated WebP.

Why WebP: none of genq's dependencies has an MP4 (H.264) encoder; Pillow
writes animated WebP, lossless, which browsers play like a GIF but in full
colour."""
from __future__ import annotations

import io
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models import image
from models.batch_rows import PipelineModel, StepProgress, generators, live_rows, seeds_of
from models.base import InputInvalid, IsCancelled, OnProgress, Result, check_bound, check_chars, parse

FAMILY = "text-to-video"
PINS = True
SEED_MAX = 2**32 - 1
SCHEMA_LIMITS = [
    ("max_width", "width", "maximum"),
    ("max_height", "height", "maximum"),
    ("max_frames", "num_frames", "maximum"),
    ("max_inference_steps", "num_inference_steps", "maximum"),
    ("max_prompt_chars", "prompt", "maxLength"),
    ("max_prompt_chars", "negative_prompt", "maxLength"),
]
LIMITS = {"max_width", "max_height", "max_frames", "max_duration_s", "max_inference_steps", "max_prompt_chars"}


class Input(BaseModel):
    """A text-to-video job's `input`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What the clip should show.")
    negative_prompt: str = Field("", description="What it should not show (used when guidance_scale > 1).")
    width: int = Field(64, ge=8, multiple_of=8, description="Frame width in pixels, a multiple of 8.")
    height: int = Field(64, ge=8, multiple_of=8, description="Frame height in pixels, a multiple of 8.")
    num_frames: int = Field(8, ge=1, description="Frames in the clip.")
    fps: int = Field(8, ge=1, le=60, description="Frames per second when played: the clip lasts num_frames / fps s.")
    num_inference_steps: int = Field(10, ge=1, description="Denoising steps; more is slower and usually finer.")
    guidance_scale: float = Field(9.0, ge=0, le=100, description="How closely to follow the prompt; <= 1 turns it off.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Random seed; the same input and seed give the same clip.")


def validate(raw: Any, limits: dict) -> Input:
    """The job input as an `Input`; raises InputInvalid naming "input.<field>"."""
    inp = parse(Input, raw)
    errors: list[dict[str, str]] = []
    check_bound(errors, "input.width", inp.width, limits.get("max_width"))
    check_bound(errors, "input.height", inp.height, limits.get("max_height"))
    check_bound(errors, "input.num_frames", inp.num_frames, limits.get("max_frames"))
    check_bound(errors, "input.num_inference_steps", inp.num_inference_steps, limits.get("max_inference_steps"))
    check_chars(errors, "input.prompt", inp.prompt, limits.get("max_prompt_chars"))
    check_chars(errors, "input.negative_prompt", inp.negative_prompt, limits.get("max_prompt_chars"))
    longest = limits.get("max_duration_s")
    if longest is not None and inp.num_frames / inp.fps > longest:
        errors.append({"field": "input.fps", "message": f"num_frames / fps = {inp.num_frames / inp.fps:.3g} s; at "
                                                        f"most {longest} s for this model"})
    if errors:
        raise InputInvalid(errors)
    return inp


def batch_key(inp: Input) -> str:
    # One call shares the latent shape (size and frames), the timesteps and the guidance; fps is only playback.
    return f"{inp.width}x{inp.height}x{inp.num_frames}|{inp.num_inference_steps}|{inp.guidance_scale}"


def load(checkpoint: str, device: str, dtype: str, revision: str | None = None,
         variant: str | None = None) -> "VideoModel":
    """Load the video pipeline in `checkpoint` onto `device`, as the class its index names."""
    import torch

    return VideoModel(image.load_pipeline("DiffusionPipeline", checkpoint, device, dtype, revision, variant),
                      torch.device(device))


check = image.check


class VideoModel(PipelineModel):
    """A loaded video pipeline that runs a batch of same-shaped clips in one call."""

    def run(self, inputs: list[Input], on_progress: OnProgress, is_cancelled: IsCancelled) -> list[Result | None]:
        import numpy as np

        results: list[Result | None] = [None] * len(inputs)
        live, rows = live_rows(inputs, is_cancelled, batch_key)
        if not live:
            return results
        first = rows[0]
        seeds = seeds_of(rows)
        progress = StepProgress(live, first.num_inference_steps, on_progress, is_cancelled)
        args = dict(prompt=[inp.prompt for inp in rows], negative_prompt=[inp.negative_prompt for inp in rows],
                    width=first.width, height=first.height, num_frames=first.num_frames,
                    num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                    generator=generators(seeds, self.device), output_type="np", **progress.callbacks(self.call_args))
        clips = np.asarray(self.call(args).frames)
        for r, i in progress.wanted():
            inp = rows[r]
            frames = clips[r]  # (frames, height, width, channels) in [0, 1]
            results[i] = Result(
                output={"video": {"file": "video.webp", "content_type": "image/webp", "width": int(frames.shape[2]),
                                  "height": int(frames.shape[1]), "frames": int(frames.shape[0]), "fps": inp.fps,
                                  "duration_s": round(frames.shape[0] / inp.fps, 4), "seed": seeds[r]}},
                files={"video.webp": (_webp(frames, inp.fps), "image/webp")},
            )
        return results


def _webp(frames, fps: int) -> bytes:
    """The frames as a lossless animated WebP that loops, each shown 1/fps s."""
    import numpy as np
    from PIL import Image

    images = [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0, lossless=True)
    return buf.getvalue()
