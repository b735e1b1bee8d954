"""The contract between a model family and the worker, with no torch in sight.

A family module (models/text.py, models/image.py) exposes:

    FAMILY = "text-generation"
    Input                     pydantic model of the job's `input`
    validate(raw, limits)     -> Input; raises genq-free InputInvalid naming "input.<field>"
    batch_key(inp)            -> str: what must match for jobs to share a forward pass
    load(checkpoint, device, dtype) -> a loaded model with
        run(inputs, on_progress, is_cancelled) -> list[Result | None] in input order
        (None for a row that was cancelled), and `nbytes` (memory it holds)

This module and the family modules' top levels import pydantic only, so the API
can validate inputs without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pydantic import BaseModel, ValidationError

# on_progress(row, current, total): row `row` of the batch has done `current` of `total` units.
OnProgress = Callable[[int, int, int], None]
# is_cancelled(row): the job in row `row` has been cancelled; stop spending on it.
IsCancelled = Callable[[int], bool]


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of torch `modules` (what a loaded model holds)."""
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


def pipeline_bytes(pipe) -> int:
    """Bytes of a diffusers pipeline's torch components (its tokenizers and schedulers hold none)."""
    return module_bytes(*(c for c in pipe.components.values() if hasattr(c, "parameters")))


class InputInvalid(ValueError):
    """A job input failed validation. `errors` is a list of {"field", "message"}."""

    def __init__(self, errors: list[dict[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


@dataclass
class Result:
    """One job's output. Entries of `output` that carry {"file": name} refer to
    `files[name] = (bytes, content_type)`; the worker stores those and swaps the
    name for a storage key."""

    output: dict[str, Any]
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)


class Loaded(Protocol):
    nbytes: int

    def run(self, inputs: list, on_progress: OnProgress, is_cancelled: IsCancelled) -> list[Result | None]: ...


def parse(model: type[BaseModel], raw: Any, prefix: str = "input") -> BaseModel:
    """Validate `raw` into `model`, turning pydantic's errors into field-named ones."""
    if not isinstance(raw, dict):
        raise InputInvalid([{"field": prefix, "message": "must be a JSON object"}])
    try:
        return model.model_validate(raw, strict=True)
    except ValidationError as exc:
        raise InputInvalid(pydantic_errors(exc, prefix)) from None


def pydantic_errors(exc: ValidationError, prefix: str) -> list[dict[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        fieldname = f"{prefix}.{loc}" if loc and prefix else (loc or prefix)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "is not a known field"
        elif "input" in err and err["type"] not in ("missing",):
            message = f"{message} (got {err['input']!r:.80})"
        out.append({"field": fieldname, "message": message})
    return out


def check_bound(errors: list, fieldname: str, value, limit, what: str = "at most") -> None:
    """Append an error when `value` exceeds a registry limit (None = no limit)."""
    if limit is not None and value is not None and value > limit:
        errors.append({"field": fieldname, "message": f"must be {what} {limit} for this model, got {value}"})


def check_chars(errors: list, fieldname: str, text: str, limit) -> None:
    """Append an error when a string is longer than a registry limit (None = no limit)."""
    if limit is not None and len(text) > limit:
        errors.append({"field": fieldname, "message": f"must be at most {limit} characters for this model, got {len(text)}"})
