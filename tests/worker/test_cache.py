"""The per-process model cache: LRU within a memory budget, dtype and device checks."""
from __future__ import annotations

import pytest

from genq.errors import ModelError
from genq.settings import Settings
from models.registry import ModelSpec
from worker.cache import ModelCache, make_loader


def spec(name: str, family: str, checkpoint: str, dtype: str = "float32") -> ModelSpec:
    return ModelSpec(name=name, family=family, checkpoint=checkpoint, pool="p", dtype=dtype)


@pytest.fixture
def loader(model_dir):
    return make_loader(Settings.from_env({}, model_dir=model_dir, device="cpu"))


TEXT = spec("t", "text-generation", "demo:text")
IMAGE = spec("i", "image-generation", "demo:image")


def test_hits_and_misses(loader):
    cache = ModelCache(loader, budget_bytes=10**12)
    first = cache.get(TEXT)
    assert cache.get(TEXT) is first
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.last_load_seconds is None  # a hit loads nothing


def test_evicts_least_recently_used_when_over_budget(loader):
    probe = ModelCache(loader, budget_bytes=10**12)
    text_bytes, image_bytes = probe.get(TEXT).nbytes, probe.get(IMAGE).nbytes
    assert text_bytes > 0 and image_bytes > 0
    # Room for either model alone, not both.
    cache = ModelCache(loader, budget_bytes=max(text_bytes, image_bytes) + 1)
    cache.get(TEXT)
    cache.get(IMAGE)
    assert cache.loaded() == ["i"]
    assert cache.used_bytes <= cache.budget_bytes
    cache.get(TEXT)
    assert cache.loaded() == ["t"] and cache.misses == 3


def test_keeps_order_by_use(loader):
    cache = ModelCache(loader, budget_bytes=10**12)
    cache.get(TEXT)
    cache.get(IMAGE)
    cache.get(TEXT)
    assert cache.loaded() == ["i", "t"]  # least recently used first


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu_is_a_clear_error(loader, dtype):
    with pytest.raises(ModelError, match=f"asks for dtype '{dtype}', which needs a GPU, but this worker's device is 'cpu'"):
        loader(spec("half", "text-generation", "demo:text", dtype))


def test_int8_without_bitsandbytes_is_a_clear_error(loader):
    with pytest.raises(ModelError, match="int8.*bitsandbytes"):
        loader(spec("q", "text-generation", "demo:text", "int8"))


def test_missing_checkpoint_names_it(loader, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="could not load model 'gone'"):
        loader(spec("gone", "text-generation", missing))
