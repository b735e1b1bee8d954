"""The text-to-audio family: a prompt to a WAV clip through a diffusers audio
pipeline (AudioLDM, AudioLDM 2, MusicLDM, Stable Audio: whatever class the
checkpoint's model_index.json names), batched, one generator per clip."""
from __future__ import annotations

import io
import wave
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models import image
from models.batch_rows import PipelineModel, StepProgress, generators, live_rows, seeds_of
from models.base import InputInvalid, IsCancelled, OnProgress, Result, check_bound, check_chars, parse

FAMILY = "text-to-audio"
PINS = True
SEED_MAX = 2**32 - 1
MIN_DURATION_S = 0.1
SCHEMA_LIMITS = [
    ("max_duration_s", "duration_s", "maximum"),
    ("max_inference_steps", "num_inference_steps", "maximum"),
    ("max_prompt_chars", "prompt", "maxLength"),
    ("max_prompt_chars", "negative_prompt", "maxLength"),
]
LIMITS = {"max_duration_s", "max_inference_steps", "max_prompt_chars"}


class Input(BaseModel):
    """A text-to-audio job's `input`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="What the clip should sound like.")
    negative_prompt: str = Field("", description="What it should not sound like (used when guidance_scale > 1).")
    duration_s: float = Field(1.0, ge=MIN_DURATION_S, description="Length of the clip in seconds.")
    num_inference_steps: int = Field(10, ge=1, description="Denoising steps; more is slower and usually cleaner.")
    guidance_scale: float = Field(2.5, ge=0, le=100, description="How closely to follow the prompt; <= 1 turns it off.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Random seed; the same input and seed give the same clip.")


def validate(raw: Any, limits: dict) -> Input:
    """The job input as an `Input`; raises InputInvalid naming "input.<field>"."""
    inp = parse(Input, raw)
    errors: list[dict[str, str]] = []
    check_bound(errors, "input.duration_s", inp.duration_s, limits.get("max_duration_s"))
    check_bound(errors, "input.num_inference_steps", inp.num_inference_steps, limits.get("max_inference_steps"))
    check_chars(errors, "input.prompt", inp.prompt, limits.get("max_prompt_chars"))
    check_chars(errors, "input.negative_prompt", inp.negative_prompt, limits.get("max_prompt_chars"))
    if errors:
        raise InputInvalid(errors)
    return inp


def batch_key(inp: Input) -> str:
    # One call shares the latent length (the duration), the timesteps and the guidance.
    return f"{inp.duration_s}s|{inp.num_inference_steps}|{inp.guidance_scale}"


def load(checkpoint: str, device: str, dtype: str, revision: str | None = None,
         variant: str | None = None) -> "AudioModel":
    """Load the audio pipeline in `checkpoint` onto `device`, as the class its index names."""
    import torch

    return AudioModel(image.load_pipeline("DiffusionPipeline", checkpoint, device, dtype, revision, variant),
                      torch.device(device))


check = image.check


class AudioModel(PipelineModel):
    """A loaded audio pipeline that runs a batch of same-length clips in one call."""

    def __init__(self, pipe, device):
        super().__init__(pipe, device)
        vocoder = getattr(pipe, "vocoder", None)
        self.sample_rate = int(vocoder.config.sampling_rate if vocoder is not None else pipe.vae.sampling_rate)

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
                    num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                    num_waveforms_per_prompt=1, generator=generators(seeds, self.device), output_type="np",
                    **progress.callbacks(self.call_args))
        # The clip's length: AudioLDM's name for it, or Stable Audio's.
        args["audio_length_in_s" if "audio_length_in_s" in self.call_args else "audio_end_in_s"] = first.duration_s
        audios = self.call(args).audios
        audios = np.asarray(audios, dtype=np.float32)
        for r, i in progress.wanted():
            clip = audios[r].reshape(-1) if audios[r].ndim == 1 or audios[r].shape[0] == 1 else audios[r].T
            data = _wav(clip, self.sample_rate)
            frames = clip.shape[0]
            results[i] = Result(
                output={"audio": {"file": "audio.wav", "content_type": "audio/wav", "sample_rate": self.sample_rate,
                                  "duration_s": round(frames / self.sample_rate, 4), "seed": seeds[r]}},
                files={"audio.wav": (data, "audio/wav")},
            )
        return results


def _wav(samples, sample_rate: int) -> bytes:
    """16-bit PCM WAV (the stdlib writes it; every player reads it). `samples`
    is (frames,) or (frames, channels) in [-1, 1]; beyond is clipped."""
    import numpy as np

    pcm = (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buf.getvalue()
