"""The model registry: which models exist, which family runs them, where their
checkpoint is, which pool serves them and what limits their inputs have.

Read from a YAML file (models/registry.yaml by default, GENQ_REGISTRY to
override). Importing this module or a family's schema never imports torch.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from models import checkpoints

# family name -> module holding it; one self-contained file per family. A
# registry entry may also name a family by its module's dotted path (a family
# kept outside this package, like the one the fault tests crash workers with).
FAMILIES = {
    "text-generation": "models.text",
    "image-generation": "models.image",
    "image-to-image": "models.image_to_image",
    "inpainting": "models.inpainting",
    "text-to-audio": "models.audio",
    "text-to-video": "models.video",
    "image-text-to-text": "models.vision_text",
    "class-to-image": "models.class_image",
}
DTYPES = ("float32", "float16", "bfloat16", "int8")
# How a model's jobs share the worker: "continuous" (rows join and leave a
# running batch at each decode step; families whose loaded model has an
# `engine`) or "static" (a batch is claimed, run to its end, then the next).
BATCHING = ("continuous", "static")
ENGINES = ("transformers", "vllm")


class RegistryError(ValueError):
    pass


class Entry(BaseModel):
    """One model's entry in the registry file, as written there. Unknown keys
    are refused: a typo (`max_batch_sise: 8`) must not run silently at the default."""

    model_config = ConfigDict(extra="forbid")

    family: str = Field(min_length=1)
    checkpoint: str = Field(min_length=1)
    pool: str = Field(min_length=1)
    dtype: str = "float32"
    max_batch_size: int = Field(1, ge=1)
    max_wait_ms: int = Field(0, ge=0)
    # None: the family's default (continuous where it decodes step by step).
    batching: str | None = None
    max_batch_tokens: int | None = None
    engine: str = "transformers"
    limits: dict[str, Any] = Field(default_factory=dict)
    description: str = ""
    revision: str | None = Field(None, min_length=1)
    variant: str | None = Field(None, min_length=1)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        return _one_of(value, DTYPES)

    @field_validator("batching")
    @classmethod
    def _batching(cls, value: str | None) -> str | None:
        return None if value is None else _one_of(value, BATCHING)

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        return _one_of(value, ENGINES)

    @field_validator("max_batch_tokens", mode="before")
    @classmethod
    def _max_batch_tokens(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"must be a positive integer, got {value!r}")
        return value


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"must be one of {allowed}, got {value!r}")
    return value


def _closest(key: str, known) -> str:
    """ "; did you mean 'x'?" for the known key nearest a mistyped one (difflib), or the
    known keys when none is near."""
    match = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else f"; known keys: {', '.join(sorted(known))}"


def _entry_errors(exc: ValidationError) -> str:
    """pydantic's errors about a registry entry, in the registry's words."""
    out = []
    for err in exc.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            out.append(f"unknown key {key!r}{_closest(key, Entry.model_fields)}")
        elif err["type"] == "missing" or (err["type"] == "string_too_short" and key in ("family", "checkpoint", "pool")):
            out.append(f"needs {key!r}")
        else:
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] != "value_error":
                message = f"{message} (got {err['input']!r:.80})"
            out.append(f"{key} {message}")
    return "; ".join(out)


def _check_limits(where: str, family: str, module: ModuleType, limits: dict) -> None:
    """Every key under `limits` must be one the family reads (its LIMITS); a
    family module that declares none (one kept outside this package) takes any."""
    known = getattr(module, "LIMITS", None)
    if known is None:
        return
    for key in limits:
        if key not in known:
            raise RegistryError(f"{where}: unknown limit {key!r} for family {family!r}{_closest(key, known)}")
    # A limit that lists choices (an image model's schedulers) lists known ones.
    for key, choices in getattr(module, "LIMIT_CHOICES", {}).items():
        value = limits.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not value:
            raise RegistryError(f"{where}: limits.{key} must be a non-empty list, got {value!r:.80}")
        for choice in value:
            if choice not in choices:
                raise RegistryError(f"{where}: limits.{key} has unknown {choice!r}{_closest(choice, choices)}")


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
    # For a LoRA fine-tune served as an adapter on its loaded base (models/text_adapters.py):
    # the base model's name. Its jobs share batches with the base's and its other adapters'.
    adapter_of: str = ""
    # Pins of a diffusers pipeline: the hub revision (a commit, tag or branch)
    # and the weights' variant ("fp16" loads *.fp16.safetensors).
    revision: str | None = None
    variant: str | None = None

    @property
    def module(self) -> ModuleType:
        return family_module(self.family)

    def validate(self, raw: Any):
        """The job input as the family's pydantic model; raises InputInvalid."""
        return self.module.validate(raw, self.limits)

    def fine_tuned(self, name: str, method: str, storage_prefix: str, description: str) -> "ModelSpec":
        """A fine-tuned version of this model: renamed and pointed at its own
        weights in storage, with the same family, pool, limits and batching.
        A LoRA fine-tune of a family that serves adapters (on the transformers
        engine, unquantized) runs as an adapter on this loaded model; any other
        as a model of its own."""
        adapter = method == "lora" and getattr(self.module, "ADAPTERS", False) and self.engine == "transformers" \
            and self.dtype != "int8" and not self.adapter_of
        return dataclasses.replace(self, name=name, checkpoint=checkpoints.fine_tuned(method, storage_prefix),
                                   base_checkpoint=self.checkpoint, description=description,
                                   adapter_of=self.name if adapter else "")

    @property
    def batch_model(self) -> str:
        """The loaded model this model's jobs run on, which claims group by:
        the base for a LoRA fine-tune served as an adapter, else itself."""
        return self.adapter_of or self.name

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
                if keyword == "enum":  # a list limit narrows the choices (an image model's schedulers)
                    target[keyword] = [v for v in current or [] if v in self.limits[limit]]
                else:
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
        """The registry in `path`; raises RegistryError at its first wrong entry."""
        specs, errors = cls.read(path)
        if errors:
            raise RegistryError(next(iter(errors.values())))
        return cls(specs)

    @classmethod
    def read(cls, path: Path | str) -> tuple[dict[str, ModelSpec], dict[str, str]]:
        """Every entry of the registry in `path`: ({name: spec}, {name: what is wrong
        with it}). A file that cannot be read at all raises RegistryError."""
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise RegistryError(f"model registry {str(path)!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise RegistryError(f"model registry {str(path)!r} is not YAML: {exc}") from None
        if not isinstance(doc, dict) or set(doc) - {"models"}:
            extra = sorted(set(doc) - {"models"}) if isinstance(doc, dict) else [type(doc).__name__]
            raise RegistryError(f"model registry {str(path)!r}: unknown top-level key {extra[0]!r}"
                                f"{_closest(extra[0], ['models'])}")
        specs, errors = {}, {}
        for name, entry in (doc.get("models") or {}).items():
            try:
                specs[name] = cls._spec(name, {} if entry is None else entry, path)
            except RegistryError as exc:
                errors[name] = str(exc)
        return specs, errors

    @staticmethod
    def _spec(name: str, entry: Any, path: Path) -> ModelSpec:
        where = f"{path}: model {name!r}"
        if not isinstance(entry, dict):
            raise RegistryError(f"{where} must be a mapping of keys, got {entry!r:.80}")
        try:
            parsed = Entry.model_validate(entry)
        except ValidationError as exc:
            raise RegistryError(f"{where}: {_entry_errors(exc)}") from None
        module = family_module(parsed.family)
        _check_limits(where, parsed.family, module, parsed.limits)
        # Families that can schedule per step batch continuously unless told not to.
        batching = parsed.batching or ("continuous" if getattr(module, "CONTINUOUS", False) else "static")
        if batching == "continuous" and not getattr(module, "CONTINUOUS", False):
            raise RegistryError(f"{where}: batching 'continuous' needs a family that decodes step by step; "
                                f"{parsed.family!r} batches statically")
        if (parsed.revision or parsed.variant) and not getattr(module, "PINS", False):
            raise RegistryError(f"{where}: 'revision' and 'variant' are for diffusers pipelines; "
                                f"{parsed.family!r} takes neither")
        return ModelSpec(
            name=name,
            family=parsed.family,
            checkpoint=checkpoints.normalize(parsed.checkpoint, path.parent),
            pool=parsed.pool,
            dtype=parsed.dtype,
            max_batch_size=parsed.max_batch_size,
            max_wait_ms=parsed.max_wait_ms,
            batching=batching,
            max_batch_tokens=parsed.max_batch_tokens,
            engine=parsed.engine,
            limits=dict(parsed.limits),
            description=parsed.description,
            revision=parsed.revision,
            variant=parsed.variant,
        )

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
