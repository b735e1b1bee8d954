"""The /v1/models routes: what can be run, with each model's input schema."""
from __future__ import annotations

from flask import Blueprint

from api.auth import require_key
from api.context import ctx
from api.errors import ApiError
from models.registry import ModelSpec

bp = Blueprint("models", __name__, url_prefix="/v1/models")


def describe(spec: ModelSpec) -> dict:
    return {
        "name": spec.name,
        "type": spec.family,
        "status": "ready",
        "description": spec.description,
        "pool": spec.pool,
        "dtype": spec.dtype,
        "max_batch_size": spec.max_batch_size,
        "limits": spec.limits,
        "input_schema": spec.input_schema(),
    }


@bp.get("")
@require_key
def list_models():
    return {"data": [describe(s) for s in sorted(ctx().registry, key=lambda s: s.name)], "next_cursor": None}


@bp.get("/<path:name>")
@require_key
def get_model(name: str):
    spec = ctx().registry.get(name)
    if spec is None:
        raise ApiError(404, f"no model {name!r}")
    return describe(spec)
