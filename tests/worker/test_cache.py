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


def test_torch_threads_setting_reaches_the_worker_process():
    """GENQ_TORCH_THREADS is applied when a worker builds its loader, and 0 leaves
    torch's default (checked in child processes: the count is per process)."""
    import os
    import subprocess
    import sys

    def threads(setting: str) -> tuple[int, int]:
        code = ("import torch; from genq.settings import Settings; from worker.cache import make_loader; "
                "before = torch.get_num_threads(); "
                f"make_loader(Settings.from_env({{'GENQ_TORCH_THREADS': '{setting}', 'GENQ_DEVICE': 'cpu'}})); "
                "print(before, torch.get_num_threads())")
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        before, after = out.stdout.split()
        return int(before), int(after)

    default, unchanged = threads("0")
    assert unchanged == default
    assert threads("1") == (default, 1)
    assert threads("3") == (default, 3)


def test_negative_torch_threads_is_a_clear_error():
    from genq.errors import ConfigError

    with pytest.raises(ConfigError, match="GENQ_TORCH_THREADS must be 0.*got -2"):
        Settings.from_env({"GENQ_TORCH_THREADS": "-2"})
    with pytest.raises(ConfigError, match="GENQ_TORCH_THREADS must be an integer, got 'two'"):
        Settings.from_env({"GENQ_TORCH_THREADS": "two"})
