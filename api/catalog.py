"""The /v1/models routes: what can be run, with each model's input schema."""
from __future__ import annotations

from typing import Any, Literal

from flask import Blueprint, Response
from pydantic import ConfigDict, with_config
from sqlalchemy import select
from typing_extensions import TypedDict

from api.auth import caller, require_key
from api.context import ctx
from api.errors import ApiError
from genq import catalog, retention
from genq.schema import ModelVersion
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


@bp.delete("/<path:name>")
@require_key
def delete_model(name: str):
    """One of the caller's fine-tuned models goes: its weights and its
    fine-tune's checkpoints. Jobs already queued for it fail (unknown_model)."""
    c = ctx()
    with c.session() as session, session.begin():
        version = session.scalar(select(ModelVersion).where(ModelVersion.name == name,
                                                            ModelVersion.tenant_id == caller().tenant_id))
        if version is None:
            if c.registry.get(name) is not None:
                raise ApiError(403, f"model {name!r} is a shared model of this service; only your fine-tuned "
                                    "models can be deleted")
            raise ApiError(404, f"no model {name!r}")
        owed = retention.delete_model(session, version)
    c.settle_deletes(owed)
    return Response(status=204)


@bp.get("/<path:name>")
@require_key
def get_model(name: str):
    c = ctx()
    with c.session() as session:
        spec = catalog.resolve(session, c.registry, name, caller().tenant_id)
    if spec is None:
        raise ApiError(404, f"no model {name!r}")
    return describe(spec, owned=c.registry.get(name) is None)
