"""Tests of the class-to-image family on demo-digits, the demo a person can
recognise: a digits classifier trained here names the generated digits, where
it names the random-weight model's no better than chance."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models import class_image, digits
from models.base import InputInvalid

LIMITS = {"num_classes": 10, "max_inference_steps": 50, "max_images": 8}


def never(row: int) -> bool:
    return False


def ignore(row: int, current: int, total: int) -> None:
    pass


@pytest.fixture(scope="module")
def model(digits_checkpoint):
    return class_image.load(digits_checkpoint, "cpu", "float32")


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    dest = tmp_path_factory.mktemp("untrained-digits") / "pipe"
    digits.build_untrained(dest)
    return class_image.load(str(dest), "cpu", "float32")


@pytest.fixture(scope="module")
def classifier():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    data = load_digits()
    return LogisticRegression(max_iter=5000).fit(data.data, data.target)


def job(label: int, seed: int, **kw) -> class_image.Input:
    return class_image.validate({"label": label, "seed": seed, "num_inference_steps": 20, **kw}, LIMITS)


def pixels(result, k: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.files[f"{k}.png"][0])), dtype=np.float64)


def recognised(model, classifier, seeds=range(5)) -> tuple[float, float]:
    """(share of generated digits the classifier names right, its mean confidence in the right digit)."""
    rows = [job(label, seed) for label in range(10) for seed in seeds]
    results = model.run(rows, ignore, never)
    # Back to the data set's scale: ink 0-16 on 8x8.
    x = np.stack([pixels(r).reshape(-1) for r in results]) / 255 * 16
    proba = classifier.predict_proba(x)
    labels = np.array([r.label for r in rows])
    right = proba[np.arange(len(rows)), labels]
    return float((proba.argmax(1) == labels).mean()), float(right.mean())


def test_a_classifier_recognises_the_generated_digits_and_not_the_random_models(model, untrained, classifier):
    accuracy, confidence = recognised(model, classifier)
    random_accuracy, random_confidence = recognised(untrained, classifier)
    print(f"demo-digits: {accuracy:.0%} named right, confidence {confidence:.2f}; "
          f"random weights: {random_accuracy:.0%}, {random_confidence:.2f}")
    assert accuracy >= 0.8 and confidence >= 0.7
    assert random_accuracy <= 0.3


def test_output_is_a_grey_png_of_the_models_size_times_scale(model):
    result = model.run([job(3, 1, scale=4, num_images=2)], ignore, never)[0]
    assert [m["seed"] for m in result.output["images"]] == [1, 2]
    assert result.output["images"][0] == {"file": "0.png", "content_type": "image/png", "width": 32, "height": 32,
                                          "seed": 1, "label": 3}
    img = Image.open(io.BytesIO(result.files["0.png"][0]))
    assert (img.format, img.mode, img.size) == ("PNG", "L", (32, 32))


def test_a_job_is_the_same_alone_or_batched_and_seeds_differ(model):
    rows = [job(7, 1), job(2, 5, num_images=2), job(7, 2)]
    batched = model.run(rows, ignore, never)
    for inp, got in zip(rows, batched):
        alone = model.run([inp], ignore, never)[0]
        for k in range(inp.num_images):
            assert np.abs(pixels(got, k) - pixels(alone, k)).max() <= 1
    assert not np.array_equal(pixels(batched[0]), pixels(batched[2]))


def test_progress_counts_steps_and_a_cancelled_row_gives_none(model):
    calls = []
    out = model.run([job(1, 1, num_inference_steps=3), job(2, 2, num_inference_steps=3)],
                    lambda *a: calls.append(a), lambda row: row == 1 and bool(calls))
    assert out[1] is None and out[0] is not None
    assert [c for c in calls if c[0] == 0] == [(0, s, 3) for s in (1, 2, 3)]


@pytest.mark.parametrize("raw, field", [
    ({"label": 10}, "input.label"),
    ({"label": -1}, "input.label"),
    ({"num_inference_steps": 51}, "input.num_inference_steps"),
    ({"num_images": 9}, "input.num_images"),
    ({"scale": 9}, "input.scale"),
    ({"prompt": "a seven"}, "input.prompt"),
])
def test_out_of_bounds_input_names_the_field(raw, field):
    with pytest.raises(InputInvalid) as exc:
        class_image.validate({"label": 1, **raw}, LIMITS)
    assert [e["field"] for e in exc.value.errors] == [field]


def test_steps_split_batches_and_labels_do_not():
    a = job(1, 1)
    assert class_image.batch_key(a) == class_image.batch_key(a.model_copy(update={"label": 9, "seed": 3, "scale": 2}))
    assert class_image.batch_key(a) != class_image.batch_key(a.model_copy(update={"num_inference_steps": 5}))
