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
