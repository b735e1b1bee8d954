"""Tests of the text-to-audio family: WAV of the asked length, seeds alone or
batched, duration bounds, progress and cancellation."""
from __future__ import annotations

import io
import wave

import numpy as np
import pytest

from models import audio
from models.base import InputInvalid

LIMITS = {"max_duration_s": 2, "max_inference_steps": 20, "max_prompt_chars": 50}


def never(row: int) -> bool:
    return False


def ignore(row: int, current: int, total: int) -> None:
    pass


@pytest.fixture(scope="module")
def model(audio_checkpoint):
    return audio.load(audio_checkpoint, "cpu", "float32")


def job(prompt: str, seed: int, **kw) -> audio.Input:
    return audio.validate({"prompt": prompt, "seed": seed, "num_inference_steps": 3, "duration_s": 0.5, **kw}, LIMITS)


def samples(result) -> np.ndarray:
    with wave.open(io.BytesIO(result.files["audio.wav"][0])) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2")


def test_output_is_a_wav_of_the_asked_length(model):
    result = model.run([job("rain on a roof", 7, duration_s=0.75)], ignore, never)[0]
    assert result.output == {"audio": {"file": "audio.wav", "content_type": "audio/wav", "sample_rate": 16000,
                                       "duration_s": 0.75, "seed": 7}}
    with wave.open(io.BytesIO(result.files["audio.wav"][0])) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 16000, 12000)
    assert np.abs(samples(result)).max() > 1000  # not silence


def test_a_job_sounds_the_same_alone_or_batched_and_seeds_differ(model):
    rows = [job("rain", 1), job("a dog barks", 2), job("rain", 2)]
    batched = model.run(rows, ignore, never)
    for inp, got in zip(rows, batched):
        alone = samples(model.run([inp], ignore, never)[0])
        assert np.abs(samples(got).astype(int) - alone).max() <= 1
    assert not np.array_equal(samples(batched[0]), samples(batched[2]))


def test_progress_counts_steps_and_a_cancelled_row_gives_none(model):
    calls = []
    out = model.run([job("a", 1), job("b", 2)], lambda *a: calls.append(a), lambda row: row == 1 and bool(calls))
    assert out[1] is None and out[0] is not None
    assert [c for c in calls if c[0] == 0] == [(0, s, 3) for s in (1, 2, 3)]


@pytest.mark.parametrize("raw, field", [
    ({"duration_s": 3}, "input.duration_s"),
    ({"duration_s": 0.05}, "input.duration_s"),
    ({"num_inference_steps": 21}, "input.num_inference_steps"),
    ({"prompt": "x" * 51}, "input.prompt"),
    ({"voice": "alto"}, "input.voice"),
])
def test_out_of_bounds_input_names_the_field(raw, field):
    with pytest.raises(InputInvalid) as exc:
        audio.validate({"prompt": "rain", **raw}, LIMITS)
    assert [e["field"] for e in exc.value.errors] == [field]


def test_duration_steps_and_guidance_split_batches():
    a = job("a", 1)
    assert audio.batch_key(a) == audio.batch_key(a.model_copy(update={"prompt": "b", "seed": 9}))
    assert audio.batch_key(a) != audio.batch_key(a.model_copy(update={"duration_s": 1.0}))
