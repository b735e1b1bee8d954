"""Loaded models kept per worker process, least recently used evicted first
once their memory passes the budget."""
from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from typing import Callable

from genq.errors import GenqError, ModelError
from models import checkpoints
from models.registry import ModelSpec
from worker import metrics

log = logging.getLogger(__name__)

GPU_DTYPES = ("float16", "bfloat16")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_dtype(spec: ModelSpec, device: str) -> None:
    if spec.dtype in GPU_DTYPES and not device.startswith("cuda"):
        raise ModelError(
            f"model {spec.name!r} asks for dtype {spec.dtype!r}, which needs a GPU, but this worker's device is {device!r}; "
            "use float32 on CPU workers",
            code="unsupported_dtype",
        )


class ModelCache:
    def __init__(self, loader: Callable[[ModelSpec], object], budget_bytes: int):
        self._loader = loader
        self.budget_bytes = budget_bytes
        self._loaded: OrderedDict[str, object] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.last_load_seconds: float | None = None
        # The last load of each model that failed, {model: reason}; cleared when
        # one succeeds. The worker's heartbeat shows it to operators.
        self.load_errors: dict[str, str] = {}

    def get(self, spec: ModelSpec):
        key = f"{spec.name}|{spec.checkpoint}|{spec.dtype}"
        if key in self._loaded:
            self.hits += 1
            metrics.CACHE_LOOKUPS.labels(spec.name, "hit").inc()
            self.last_load_seconds = None
            self._loaded.move_to_end(key)
            return self._loaded[key]
        self.misses += 1
        metrics.CACHE_LOOKUPS.labels(spec.name, "miss").inc()
        started = time.monotonic()
        try:
            model = self._loader(spec)
        except Exception as exc:
            self.load_errors[spec.name] = (getattr(exc, "message", None) or str(exc) or type(exc).__name__)[:500]
            raise
        self.load_errors.pop(spec.name, None)
        self.last_load_seconds = time.monotonic() - started
        metrics.MODEL_LOAD_SECONDS.labels(spec.name).observe(self.last_load_seconds)
        log.info("loaded model %s in %.2fs (%.1f MB)", spec.name, self.last_load_seconds, getattr(model, "nbytes", 0) / 1e6)
        self._loaded[key] = model
        self._evict(keep=key)
        return model

    def _evict(self, keep: str) -> None:
        while self.used_bytes > self.budget_bytes and len(self._loaded) > 1:
            victim = next(k for k in self._loaded if k != keep)
            log.info("evicting model %s to stay within %d bytes", victim, self.budget_bytes)
            del self._loaded[victim]
            gc.collect()
            _empty_cuda_cache()

    @property
    def used_bytes(self) -> int:
        return sum(getattr(m, "nbytes", 0) for m in self._loaded.values())

    def loaded(self) -> list[str]:
        return [k.split("|", 1)[0] for k in self._loaded]


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_loader(settings, storage=None) -> Callable[[ModelSpec], object]:
    """Load a model for this worker: its checkpoint resolved to a local
    directory (built, or fetched from storage), then the family's
    from_pretrained path on the configured device and dtype."""
    device = resolve_device(settings.device)
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)

    def load(spec: ModelSpec):
        check_dtype(spec, device)
        try:
            # Only a model on another engine says so: other families take no engine.
            # vLLM sizes its rows and KV cache when it loads.
            extra = {"engine": spec.engine, "max_rows": spec.max_batch_size,
                     "max_batch_tokens": spec.max_batch_tokens} if spec.engine != "transformers" else {}
            # Pins only a diffusers family takes (the registry refuses them elsewhere).
            extra.update({k: v for k, v in (("revision", spec.revision), ("variant", spec.variant)) if v})
            if settings.engine_process and spec.engine == "transformers" and getattr(spec.module, "ENGINE_PROCESS", False):
                extra.update(process=True, torch_threads=settings.torch_threads)
            return spec.module.load(checkpoints.resolve(spec, settings.model_dir, storage), device, spec.dtype,
                                    **extra)
        except GenqError:
            raise
        except Exception as exc:
            raise ModelError(f"could not load model {spec.name!r} from {spec.checkpoint!r}: {exc}",
                             code="model_load_failed") from exc

    return load
