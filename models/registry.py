"""The model registry: which models exist, which family runs them, where their
checkpoint is, which pool serves them and what limits their inputs have.

Read from a YAML file (models/registry.yaml by default, GENQ_REGISTRY to
override). Importing this module or a family's schema never imports torch.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from models import checkpoints

# family name -> module holding it; one self-contained file per family. A
# registry entry may also name a family by its module's dotted path (a family
# kept outside this package, like the one the fault tests crash workers with).
FAMILIES = {
    "text-generation": "models.text",
    "image-generation": "models.image",
}
DTYPES = ("float32", "float16", "bfloat16", "int8")
# How a model's jobs share the worker: "continuous" (rows join and leave a
# running batch at each decode step; families whose loaded model has an
# `engine`) or "static" (a batch is claimed, run to its end, then the next).
BATCHING = ("continuous", "static")
ENGINES = ("transformers", "vllm")


class RegistryError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    checkpoint: str
    pool: str
    dtype: str = "float32"
    max_batch_size: int = 1
    max_wait_ms: int = 0
    batching: str = "static"
    # Continuous batching's KV budget: rows x their longest (prompt + new
    # tokens) may not pass it; None bounds by max_batch_size alone.
    max_batch_tokens: int | None = None
    # What runs a text model: transformers on torch, or vLLM where installed.
    engine: str = "transformers"
    limits: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    # For a fine-tuned version: the base model's checkpoint its weights build on.
    base_checkpoint: str = ""

    @property
    def module(self) -> ModuleType:
        return family_module(self.family)

    def validate(self, raw: Any):
        """The job input as the family's pydantic model; raises InputInvalid."""
        return self.module.validate(raw, self.limits)

    def fine_tuned(self, name: str, method: str, storage_prefix: str, description: str) -> "ModelSpec":
        """A fine-tuned version of this model: renamed and pointed at its own
        weights in storage, with the same family, pool, limits and batching."""
        return dataclasses.replace(self, name=name, checkpoint=checkpoints.fine_tuned(method, storage_prefix),
                                   base_checkpoint=self.checkpoint, description=description)

    def batch_key(self, inp) -> str:
        return f"{self.dtype}|{self.module.batch_key(inp)}"

    def input_schema(self) -> dict:
        """The family's input schema with this model's registry limits as
        bounds, so the schema admits exactly what validation accepts."""
        schema = _inline_defs(self.module.Input.model_json_schema())
        for limit, fieldname, keyword in getattr(self.module, "SCHEMA_LIMITS", []):
            if self.limits.get(limit) is not None:
                prop = schema["properties"][fieldname]
                target = next((b for b in prop.get("anyOf", []) if b.get("type") != "null"), prop)
                current = target.get(keyword)
                target[keyword] = self.limits[limit] if current is None else min(current, self.limits[limit])
        return schema


def _inline_defs(schema: dict) -> dict:
    """The schema with its nested models (`$defs`, `#/$defs/...` refs) written
    in place: it is embedded in other documents (OpenAPI components), where
    a `#/$defs` ref would point at that document's root."""
    defs = schema.pop("$defs", {})

    def walk(value):
        if isinstance(value, dict):
            target = value.get("$ref", "")
            if target.startswith("#/$defs/"):
                return walk({**defs[target.removeprefix("#/$defs/")], **{k: v for k, v in value.items() if k != "$ref"}})
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(schema)


def family_module(family: str) -> ModuleType:
    module = FAMILIES.get(family) or (family if "." in family else None)
    if module is None:
        raise RegistryError(f"unknown model family {family!r}; known: {sorted(FAMILIES)} or a module's dotted path")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise RegistryError(f"model family {family!r}: cannot import module {module!r}: {exc}") from None


class Registry:
    def __init__(self, specs: dict[str, ModelSpec]):
        self._specs = dict(specs)

    @classmethod
    def load(cls, path: Path | str) -> "Registry":
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise RegistryError(f"model registry {str(path)!r} does not exist") from None
        specs = {}
        for name, entry in (doc.get("models") or {}).items():
            specs[name] = cls._spec(name, entry or {}, path)
        return cls(specs)

    @staticmethod
    def _spec(name: str, entry: dict, path: Path) -> ModelSpec:
        where = f"{path}: model {name!r}"
        for key in ("family", "checkpoint", "pool"):
            if not entry.get(key):
                raise RegistryError(f"{where} needs {key!r}")
        dtype = entry.get("dtype", "float32")
        if dtype not in DTYPES:
            raise RegistryError(f"{where}: dtype must be one of {DTYPES}, got {dtype!r}")
        module = family_module(entry["family"])
        # Families that can schedule per step batch continuously unless told not to.
        batching = entry.get("batching", "continuous" if getattr(module, "CONTINUOUS", False) else "static")
        if batching not in BATCHING:
            raise RegistryError(f"{where}: batching must be one of {BATCHING}, got {batching!r}")
        if batching == "continuous" and not getattr(module, "CONTINUOUS", False):
            raise RegistryError(f"{where}: batching 'continuous' needs a family that decodes step by step; "
                                f"{entry['family']!r} batches statically")
        engine = entry.get("engine", "transformers")
        if engine not in ENGINES:
            raise RegistryError(f"{where}: engine must be one of {ENGINES}, got {engine!r}")
        max_batch_tokens = entry.get("max_batch_tokens")
        if max_batch_tokens is not None and (not isinstance(max_batch_tokens, int) or max_batch_tokens < 1):
            raise RegistryError(f"{where}: max_batch_tokens must be a positive integer, got {max_batch_tokens!r}")
        try:
            return ModelSpec(
                name=name,
                family=entry["family"],
                checkpoint=checkpoints.normalize(str(entry["checkpoint"]), path.parent),
                pool=str(entry["pool"]),
                dtype=dtype,
                max_batch_size=int(entry.get("max_batch_size", 1)),
                max_wait_ms=int(entry.get("max_wait_ms", 0)),
                batching=batching,
                max_batch_tokens=max_batch_tokens,
                engine=engine,
                limits=dict(entry.get("limits") or {}),
                description=str(entry.get("description", "")),
            )
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"{where}: {exc}") from None

    def get(self, name: str) -> ModelSpec | None:
        return self._specs.get(name)

    def __getitem__(self, name: str) -> ModelSpec:
        return self._specs[name]

    def __iter__(self):
        return iter(self._specs.values())

    def names(self) -> list[str]:
        return sorted(self._specs)

    def pools(self) -> list[str]:
        return sorted({s.pool for s in self._specs.values()})

    def in_pools(self, pools: list[str]) -> list[ModelSpec]:
        return [s for s in self._specs.values() if s.pool in pools]
