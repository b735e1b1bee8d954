"""The registry's batching knobs: text batches continuously unless told not
to, images statically, and a wrong value is refused naming the model and knob."""
from __future__ import annotations

import pytest
import yaml

from models.registry import Registry, RegistryError


def load(tmp_path, **entry) -> Registry:
    base = {"family": "text-generation", "checkpoint": "demo:text", "pool": "p"}
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"models": {"m": {**base, **entry}}}))
    return Registry.load(path)


def test_text_batches_continuously_and_images_statically_by_default(tmp_path):
    assert load(tmp_path)["m"].batching == "continuous"
    assert load(tmp_path, family="image-generation", checkpoint="demo:image")["m"].batching == "static"
    spec = load(tmp_path, batching="static", max_batch_tokens=4096, engine="vllm")["m"]
    assert (spec.batching, spec.max_batch_tokens, spec.engine) == ("static", 4096, "vllm")


@pytest.mark.parametrize("entry, message", [
    ({"batching": "dynamic"}, "batching must be one of ('continuous', 'static'), got 'dynamic'"),
    ({"family": "image-generation", "batching": "continuous"}, "batching 'continuous' needs a family that decodes"),
    ({"engine": "tgi"}, "engine must be one of ('transformers', 'vllm'), got 'tgi'"),
    ({"max_batch_tokens": 0}, "max_batch_tokens must be a positive integer, got 0"),
    ({"max_batch_tokens": "lots"}, "max_batch_tokens must be a positive integer, got 'lots'"),
])
def test_a_wrong_batching_knob_is_refused_naming_it(tmp_path, entry, message):
    with pytest.raises(RegistryError) as exc:
        load(tmp_path, **entry)
    assert message in str(exc.value) and "model 'm'" in str(exc.value)


@pytest.mark.parametrize("entry, message", [
    ({"max_batch_sise": 8}, "model 'm': unknown key 'max_batch_sise'; did you mean 'max_batch_size'?"),
    ({"chekpoint": "demo:text"}, "unknown key 'chekpoint'; did you mean 'checkpoint'?"),
    ({"limits": {"max_new_tokns": 9}}, "model 'm': unknown limit 'max_new_tokns' for family 'text-generation'; "
                                        "did you mean 'max_new_tokens'?"),
    ({"family": "image-generation", "checkpoint": "demo:image", "limits": {"max_widht": 9}},
     "did you mean 'max_width'?"),
    ({"zzz": 1}, "unknown key 'zzz'; known keys: "),
    ({"dtype": "fp8"}, "dtype must be one of ('float32', 'float16', 'bfloat16', 'int8'), got 'fp8'"),
    ({"max_batch_size": 0}, "max_batch_size Input should be greater than or equal to 1 (got 0)"),
    ({"pool": ""}, "needs 'pool'"),
    ({"variant": "fp16"}, "'revision' and 'variant' are for diffusers pipelines; 'text-generation' takes neither"),
    ({"family": "image-generation", "checkpoint": "demo:image", "limits": {"schedulers": ["euler", "dpm+"]}},
     "limits.schedulers has unknown 'dpm+'; did you mean 'dpm++'?"),
    ({"family": "inpainting", "checkpoint": "demo:image", "limits": {"schedulers": "euler"}},
     "limits.schedulers must be a non-empty list, got 'euler'"),
])
def test_a_wrong_key_is_refused_naming_the_model_the_key_and_the_closest_known(tmp_path, entry, message):
    with pytest.raises(RegistryError) as exc:
        load(tmp_path, **entry)
    assert message in str(exc.value)


def test_a_missing_key_is_named(tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text("models:\n  m: {family: text-generation, pool: p}\n")
    with pytest.raises(RegistryError, match="model 'm': needs 'checkpoint'"):
        Registry.load(path)


def test_an_unknown_top_level_key_is_refused(tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text("model:\n  m: {family: text-generation, checkpoint: demo:text, pool: p}\n")
    with pytest.raises(RegistryError, match="unknown top-level key 'model'; did you mean 'models'"):
        Registry.load(path)


def test_image_models_take_revision_and_variant_pins(tmp_path):
    spec = load(tmp_path, family="image-generation", checkpoint="org/sdxl", revision="abc123", variant="fp16")["m"]
    assert (spec.revision, spec.variant) == ("abc123", "fp16")


def test_read_reports_every_bad_entry_and_keeps_the_good_ones(tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text("models:\n"
                    "  good: {family: text-generation, checkpoint: demo:text, pool: p}\n"
                    "  typo: {family: text-generation, checkpoint: demo:text, pool: p, max_wait: 5}\n"
                    "  nofam: {family: speech, checkpoint: demo:text, pool: p}\n")
    specs, errors = Registry.read(path)
    assert list(specs) == ["good"]
    assert "did you mean 'max_wait_ms'?" in errors["typo"]
    assert "unknown model family 'speech'" in errors["nofam"]
