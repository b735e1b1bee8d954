"""Tests of the text-to-video family: an animated WebP with the asked frames,
size and timing, seeds alone or batched, frame and duration bounds, progress."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageSequence

from models import video
from models.base import InputInvalid

LIMITS = {"max_width": 64, "max_height": 64, "max_frames": 8, "max_duration_s": 2, "max_inference_steps": 20,
          "max_prompt_chars": 50}


def never(row: int) -> bool:
    return False


def ignore(row: int, current: int, total: int) -> None:
    pass


@pytest.fixture(scope="module")
def model(video_checkpoint):
    return video.load(video_checkpoint, "cpu", "float32")


def job(prompt: str, seed: int, **kw) -> video.Input:
    return video.validate({"prompt": prompt, "seed": seed, "num_inference_steps": 2, "num_frames": 4, "width": 32,
                           "height": 24, **kw}, LIMITS)


def frames(result) -> list[np.ndarray]:
    clip = Image.open(io.BytesIO(result.files["video.webp"][0]))
    assert clip.format == "WEBP"
    return [np.asarray(f.convert("RGB"), dtype=np.int16) for f in ImageSequence.Iterator(clip)]


def test_output_is_an_animated_webp_of_the_asked_frames_size_and_timing(model):
    result = model.run([job("a cat walks", 7, fps=4)], ignore, never)[0]
    assert result.output == {"video": {"file": "video.webp", "content_type": "image/webp", "width": 32, "height": 24,
                                       "frames": 4, "fps": 4, "duration_s": 1.0, "seed": 7}}
    clip = Image.open(io.BytesIO(result.files["video.webp"][0]))
    assert (clip.n_frames, clip.size, clip.is_animated) == (4, (32, 24), True)
    clip.load()  # Pillow reads a WebP frame's duration as it decodes it
    assert clip.info["duration"] == 250
    got = frames(result)
    assert len(got) == 4 and any(np.abs(got[0] - f).max() > 0 for f in got[1:])


def test_a_job_gets_the_same_clip_alone_or_batched(model):
    rows = [job("a", 1), job("b", 2)]
    for inp, got in zip(rows, model.run(rows, ignore, never)):
        alone = frames(model.run([inp], ignore, never)[0])
        assert max(np.abs(a - b).max() for a, b in zip(frames(got), alone)) <= 1


def test_progress_counts_steps(model):
    calls = []
    model.run([job("a", 1)], lambda *a: calls.append(a), never)
    assert calls == [(0, 1, 2), (0, 2, 2)]


@pytest.mark.parametrize("raw, field", [
    ({"num_frames": 9}, "input.num_frames"),
    ({"num_frames": 0}, "input.num_frames"),
    ({"num_frames": 8, "fps": 2}, "input.fps"),  # 4 s > max_duration_s
    ({"width": 72}, "input.width"),
    ({"height": 20}, "input.height"),
    ({"fps": 61}, "input.fps"),
])
def test_out_of_bounds_input_names_the_field(raw, field):
    with pytest.raises(InputInvalid) as exc:
        video.validate({"prompt": "a", **raw}, LIMITS)
    assert [e["field"] for e in exc.value.errors] == [field]


def test_fps_does_not_split_batches():
    a = job("a", 1)
    assert video.batch_key(a) == video.batch_key(a.model_copy(update={"fps": 12, "seed": 3}))
    assert video.batch_key(a) != video.batch_key(a.model_copy(update={"num_frames": 5}))
