"""The /v1/models routes: what can be run, with each model's input schema."""
from __future__ import annotations

from typing import Any, Literal

from flask import Blueprint
from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict

from api.auth import caller, require_key
from api.context import ctx
from api.errors import ApiError
from genq import catalog
from models.registry import ModelSpec

bp = Blueprint("models", __name__, url_prefix="/v1/models")


@with_config(ConfigDict(title="Model"))
class ModelView(TypedDict):
    name: str
    owned_by: Literal["you", "genq"]
    type: str
    status: Literal["ready"]
    description: str | None
    pool: str
    dtype: str
    max_batch_size: int
    limits: dict[str, Any]
    input_schema: dict[str, Any]


def describe(spec: ModelSpec, owned: bool = False) -> ModelView:
    return {
        "name": spec.name,
        "owned_by": "you" if owned else "genq",
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
    c = ctx()
    with c.session() as session:
        versions = catalog.tenant_versions(session, c.registry, caller().tenant_id)
    shared = sorted(c.registry, key=lambda s: s.name)
    return {"data": [describe(s) for s in shared] + [describe(v, owned=True) for v in versions], "next_cursor": None}


@bp.get("/<path:name>")
@require_key
def get_model(name: str):
    c = ctx()
    with c.session() as session:
        spec = catalog.resolve(session, c.registry, name, caller().tenant_id)
    if spec is None:
        raise ApiError(404, f"no model {name!r}")
    return describe(spec, owned=c.registry.get(name) is None)
