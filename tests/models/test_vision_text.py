"""Tests of the image-text-to-text family: text from an image and a prompt,
each row's own sampling alone or batched, limits and stops, the image read."""
from __future__ import annotations

import pytest

from models import vision_text as vt
from models.base import InputInvalid
from tests.models.test_image_to_image import png, uri


def never(row: int) -> bool:
    return False


def ignore(row: int, current: int, total: int) -> None:
    pass


@pytest.fixture(scope="module")
def model(vision_text_checkpoint):
    return vt.load(vision_text_checkpoint, "cpu", "float32")


def job(prompt: str, color, seed: int, **kw) -> vt.Input:
    return vt.attach_files(vt.validate({"prompt": prompt, "image": uri(png(color)), "seed": seed, **kw}, {}), None)


def test_the_demo_loads_as_llava_and_answers_in_text(model):
    assert type(model.model).__name__ == "LlavaForConditionalGeneration"
    out = model.run([job("what is it?", (200, 0, 0), 1, max_new_tokens=6)], ignore, never)[0].output
    assert set(out) == {"text", "tokens", "finish_reason"} and isinstance(out["text"], str)
    assert (out["tokens"], out["finish_reason"]) == (6, "length") or out["finish_reason"] == "stop"


def test_a_job_gives_the_same_tokens_alone_or_beside_any_settings(model):
    rows = [job("what is it?", (200, 0, 0), 1, max_new_tokens=8),
            job("hi", (0, 0, 200), 2, max_new_tokens=4, temperature=0.7, top_k=20, repetition_penalty=1.3),
            job("describe the picture, please", (0, 200, 0), 3, max_new_tokens=5, temperature=0, top_p=0.5)]
    batched = model.run(rows, ignore, never)
    for inp, got in zip(rows, batched):
        assert model.run([inp], ignore, never)[0].output == got.output
    assert [r.output["tokens"] for r in batched if r.output["finish_reason"] == "length"] == [
        inp.max_new_tokens for inp, r in zip(rows, batched) if r.output["finish_reason"] == "length"]


def test_the_image_and_the_seed_matter(model):
    base = model.run([job("what is it?", (200, 0, 0), 1, max_new_tokens=8, temperature=0)], ignore, never)[0]
    other = model.run([job("what is it?", (0, 0, 200), 1, max_new_tokens=8, temperature=0)], ignore, never)[0]
    reseeded = model.run([job("what is it?", (200, 0, 0), 2, max_new_tokens=8)], ignore, never)[0]
    sampled = model.run([job("what is it?", (200, 0, 0), 1, max_new_tokens=8)], ignore, never)[0]
    assert base.output != other.output
    assert reseeded.output != sampled.output


def test_progress_and_cancel(model):
    calls = []
    out = model.run([job("a", (1, 1, 1), 1, max_new_tokens=3), job("b", (2, 2, 2), 2, max_new_tokens=3)],
                    lambda *a: calls.append(a), lambda row: row == 1 and bool(calls))
    assert out[1] is None and out[0] is not None
    assert [c for c in calls if c[0] == 0] == [(0, 1, 3), (0, 2, 3), (0, 3, 3)]


@pytest.mark.parametrize("raw, field", [
    ({"image": "https://example.com/x.png"}, "input.image"),
    ({"max_new_tokens": 11}, "input.max_new_tokens"),
    ({"prompt": "x" * 21}, "input.prompt"),
    ({"top_p": 0}, "input.top_p"),
])
def test_out_of_bounds_input_names_the_field(raw, field):
    with pytest.raises(InputInvalid) as exc:
        vt.validate({"prompt": "a", "image": "f" * 32, "max_new_tokens": 5, **raw},
                    {"max_new_tokens": 10, "max_prompt_chars": 20})
    assert [e["field"] for e in exc.value.errors] == [field]
