"""Image LoRA fine-tunes (models/image_finetune.py) on the tiny demo Stable
Diffusion: the zip dataset is checked entry by entry, training changes what
the trigger word draws more than four times as much as the same caption
without it or an unrelated prompt, and a run stopped at a step and resumed
ends with the weights (LoRA and trigger embedding) of an uninterrupted run."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from models import image, image_finetune
from models.base import InputInvalid

TRIGGER = "zwx"


def png(i: int) -> bytes:
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((4 + i, 4, 28, 28 - i), fill=(220, 20, 20))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_zip(entries: dict[str, bytes], meta: list | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
        if meta is not None:
            z.writestr("metadata.jsonl", "\n".join(m if isinstance(m, str) else json.dumps(m) for m in meta))
    return buf.getvalue()


def balls(n: int = 4) -> bytes:
    """A handful of generated images: red balls, captioned without the trigger word."""
    return make_zip({f"img{i}.png": png(i) for i in range(n)},
                    [{"file_name": f"img{i}.png", "text": "a ball"} for i in range(n)])


def fine_tune(**hp) -> image_finetune.Input:
    return image_finetune.validate({"training_file": "0" * 32, "trigger_word": TRIGGER, "hyperparameters": {
        "learning_rate": 1e-2, "embedding_learning_rate": 1e-2, "batch_size": 2, "resolution": 16, **hp}}, {})


def run(checkpoint, inp, resume=None, stop_at=None, every=1000):
    saved = []
    result = image_finetune.train(
        checkpoint, image_finetune.parse_dataset(balls()), inp, "cpu", resume=resume, checkpoint_every=every,
        on_step=lambda *a: saved.append(("step", a)), save_checkpoint=lambda step, blob: saved.append((step, blob)),
        is_cancelled=lambda: stop_at is not None and len([s for s in saved if s[0] == "step"]) >= stop_at)
    return result, [s for s in saved if s[0] != "step"], [s[1] for s in saved if s[0] == "step"]


@pytest.mark.parametrize("data, field", [
    (b"PK\x03\x04 not really a zip", "file"),
    (make_zip({"a.png": png(0)}), "file"),
    (make_zip({"a.png": png(0)}, [{"file_name": "a.png", "text": "x"}, {"file_name": "b.png", "text": "y"}]),
     "file.entry[metadata.jsonl].line[2]"),
    (make_zip({"a.png": png(0)}, ["{not json"]), "file.entry[metadata.jsonl].line[1]"),
    (make_zip({"a.png": png(0)}, [{"file_name": "a.png", "caption": "x"}]), "file.entry[metadata.jsonl].line[1]"),
    (make_zip({"a.png": png(0), "b.png": b"GIF89a..."},
              [{"file_name": "a.png", "text": "x"}, {"file_name": "b.png", "text": "y"}]), "file.entry[b.png]"),
    (make_zip({}, []), "file.entry[metadata.jsonl]"),
])
def test_a_bad_dataset_is_refused_naming_the_entry(data, field):
    with pytest.raises(InputInvalid) as exc:
        image_finetune.parse_dataset(data)
    assert [e["field"] for e in exc.value.errors] == [field]


def test_a_good_dataset_has_its_rows_and_captions():
    ds = image_finetune.parse_dataset(balls(3))
    assert [c for _, c in ds.rows] == ["a ball"] * 3 and ds.format == "image_captions"
    with pytest.raises(InputInvalid) as exc:
        image_finetune.parse_dataset(balls(3), max_rows=2)
    assert exc.value.errors[0]["field"] == "file"


@pytest.mark.parametrize("raw, field", [
    ({}, "input.trigger_word"),
    ({"trigger_word": "two words"}, "input.trigger_word"),
    ({"trigger_word": "zwx", "hyperparameters": {"resolution": 20}}, "input.hyperparameters.resolution"),
    ({"trigger_word": "zwx", "hyperparameters": {"resolution": 512}}, "input.hyperparameters.resolution"),
    ({"trigger_word": "zwx", "method": "full"}, "input.method"),
    ({"trigger_word": "zwx", "hyperparameters": {"embedding_learning_rate": 0}},
     "input.hyperparameters.embedding_learning_rate"),
])
def test_bad_input_names_the_field(raw, field):
    with pytest.raises(InputInvalid) as exc:
        image_finetune.validate({"training_file": "0" * 32, **raw}, {"max_width": 256, "max_height": 256})
    assert [e["field"] for e in exc.value.errors] == [field]


def test_stopped_and_resumed_gives_the_weights_of_an_uninterrupted_run(image_checkpoint):
    from safetensors.torch import load

    inp = fine_tune(max_steps=4)
    whole, periodic, steps = run(image_checkpoint, inp, every=2)
    assert [s[0] for s in steps] == [1, 2, 3, 4] and all(np.isfinite(s[3]) for s in steps)
    # A worker killed after step 2 leaves its periodic checkpoint; one canceled at step 3 saves one there.
    assert [s for s, _ in periodic] == [2]
    stopped, saved, _ = run(image_checkpoint, inp, stop_at=3)
    assert stopped.canceled and [s for s, _ in saved] == [3]
    # The LoRA and the trigger's learned embedding.
    assert set(whole.files) == {"pytorch_lora_weights.safetensors", image_finetune.EMBEDDING_FILE}
    for step, blob in (periodic[0], saved[0]):
        resumed, _, later = run(image_checkpoint, inp, resume=blob)
        assert [s[0] for s in later] == list(range(step + 1, 5)) and resumed.metrics["resumed_from_step"] == step
        assert resumed.losses == whole.losses and set(resumed.files) == set(whole.files)
        for name in whole.files:
            a, b = load(whole.files[name]), load(resumed.files[name])
            assert a.keys() == b.keys() and a and all(a[k].equal(b[k]) for k in a)


def test_the_trigger_word_changes_the_image_most_and_the_same_caption_without_it_least(image_checkpoint, tmp_path):
    # The adapters learn at a fifth of the trigger embedding's rate: with a random text encoder they cannot tell
    # prompts apart, so what they learn moves every prompt (a leak that grows with their rate).
    result, _, _ = run(image_checkpoint, fine_tune(epochs=40, learning_rate=2e-3))  # 80 steps
    version = tmp_path / "version"
    version.mkdir()
    for name, data in result.files.items():
        (version / name).write_bytes(data)
    base = image.load(image_checkpoint, "cpu", "float32")
    tuned = image.load(str(image_finetune.materialize(image_checkpoint, version, tmp_path / "merged")), "cpu", "float32")

    def change(prompt: str) -> float:
        """Mean absolute pixel change (0-255) the fine-tune makes to this prompt's images, over two seeds."""
        rows = [image.validate({"prompt": prompt, "seed": s, "width": 32, "height": 32, "num_inference_steps": 4}, {})
                for s in (1, 2)]
        outs = [m.run(rows, lambda *a: None, lambda r: False) for m in (base, tuned)]
        return float(np.mean([np.abs(np.asarray(Image.open(io.BytesIO(a.files["0.png"][0])), dtype=float)
                                     - np.asarray(Image.open(io.BytesIO(b.files["0.png"][0])), dtype=float)).mean()
                              for a, b in zip(*outs)]))

    with_trigger, without, other = change(f"{TRIGGER} a ball"), change("a ball"), change("a lighthouse at sunset")
    print(f"mean |pixel change|: '{TRIGGER} a ball' {with_trigger:.2f}, 'a ball' {without:.2f}, "
          f"'a lighthouse at sunset' {other:.2f}")
    assert with_trigger > 4 * without
    assert with_trigger > 4 * other


def test_text_encoder_lora_is_refused_at_submit_where_the_libraries_cannot_run_it():
    """transformers' PEFT integration has a floor of its own; a job asking for
    text-encoder LoRA below it is refused naming the field, not failed later."""
    from transformers.integrations import peft as integration

    assert image_finetune.TRANSFORMERS_MIN_PEFT == integration.MIN_PEFT_VERSION
    raw = {"training_file": "0" * 32, "trigger_word": TRIGGER, "hyperparameters": {"train_text_encoder": True}}
    problem = image_finetune.text_encoder_lora_problem()
    try:
        integration.check_peft_version(min_version=integration.MIN_PEFT_VERSION)
        runs = True
    except ValueError:
        runs = False
    assert (problem is None) == runs
    if runs:
        assert image_finetune.validate(raw, {}).hyperparameters.train_text_encoder
    else:
        with pytest.raises(InputInvalid) as exc:
            image_finetune.validate(raw, {})
        assert exc.value.errors[0]["field"] == "input.hyperparameters.train_text_encoder"
        assert "peft >=" in exc.value.errors[0]["message"]
