"""Which model a name means to a tenant: a model in the registry, or a
fine-tuned version that tenant owns (`<base>:ft-<suffix>-<id>`)."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from genq.schema import ModelVersion

FT_MARK = ":ft-"


def version_name(base: str, suffix: str, job_id: str) -> str:
    return f"{base}{FT_MARK}{suffix}-{job_id[-6:]}"


def version_spec(registry, version: ModelVersion):
    """The registry spec of the version's base, renamed and pointed at the
    version's weights; same family, pool, limits and batching. None if the
    base has left the registry."""
    base = registry.get(version.base_model)
    if base is None:
        return None
    return base.fine_tuned(version.name, version.method, version.storage_prefix,
                           f"{version.method} fine-tune of {base.name} (job {version.job_id})")


def resolve(session: Session, registry, name: str, tenant_id: str | None = None):
    """The spec for `name`, or None. With tenant_id, another tenant's
    fine-tuned version is None too: it does not exist for this caller."""
    spec = registry.get(name)
    if spec is not None or FT_MARK not in name:
        return spec
    query = select(ModelVersion).where(ModelVersion.name == name)
    if tenant_id is not None:
        query = query.where(ModelVersion.tenant_id == tenant_id)
    version = session.scalar(query)
    return version_spec(registry, version) if version else None


def tenant_versions(session: Session, registry, tenant_id: str) -> list:
    versions = session.scalars(select(ModelVersion).where(ModelVersion.tenant_id == tenant_id).order_by(ModelVersion.id))
    return [spec for v in versions if (spec := version_spec(registry, v)) is not None]
