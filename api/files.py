"""The /v1/files routes: upload a fine-tuning dataset or an input image (each
checked before it is accepted), read its record and its content.

A file's content is stored at `files/<id>/content`: the name the client gave
is never part of a storage key, only shown back (cleaned of control
characters) in the record and in the download's Content-Disposition."""
from __future__ import annotations

import hashlib
import re
import unicodedata
from urllib.parse import quote

from typing import Annotated, Literal

from flask import Blueprint, Response, request
from pydantic import ConfigDict, Field, with_config
from sqlalchemy import select
from typing_extensions import TypedDict

from api import idempotency, serialize
from api.auth import caller, require_key
from api.context import ctx
from api.errors import ApiError, invalid
from api.jobs import ID_RE, page_args, retention_of
from api.limits import check_file_quota
from genq import retention
from genq.schema import File, new_id
from genq.serialize import ObjectId, Timestamp
from genq.storage import file_key
from models import image_finetune, image_input
from models.finetune import parse_dataset

bp = Blueprint("files", __name__, url_prefix="/v1/files")
# fine-tune: a JSONL dataset, or a zip of captioned images (an image model's
# fine-tune, models/image_finetune.py); image: an input image of the image families.
PURPOSES = ("fine-tune", "image")


@with_config(ConfigDict(title="File"))
class FileView(TypedDict):
    id: ObjectId
    object: Literal["file"]
    bytes: int
    filename: str
    purpose: Literal["fine-tune", "image"]
    rows: Annotated[int, Field(description="A dataset's rows (0 for an image).")]
    format: Annotated[str, Field(description=(
        "A dataset's row format (prompt_completion, text; image_captions for a zip of images), or an image's "
        "content type (image/png, image/jpeg, image/webp)."))]
    created_at: Timestamp
    expires_at: Annotated[Timestamp | None, Field(description="When the file is deleted (retention); null when kept.")]


def describe(f: File) -> FileView:
    kept = retention_of(f.tenant_id)["files"]
    return {"id": f.id, "object": "file", "bytes": f.bytes, "filename": f.filename, "purpose": f.purpose,
            "rows": f.rows, "format": f.format, "created_at": serialize.rfc3339(f.created_at),
            "expires_at": serialize.rfc3339(retention.expires_at(f.created_at, kept))}


def own_file(session, file_id: str) -> File:
    f = session.get(File, file_id) if ID_RE.match(file_id) else None
    if f is None or f.tenant_id != caller().tenant_id:
        raise ApiError(404, f"no file {file_id!r}")
    return f


@bp.post("")
@require_key
def upload():
    c = ctx()
    # Datasets are bigger than JSON bodies: this route has its own limit.
    request.max_content_length = c.settings.max_file_bytes
    if not request.mimetype.startswith("multipart/form-data"):
        raise ApiError(415, "send the file as multipart/form-data with fields 'file' and 'purpose'")
    purpose = request.form.get("purpose")
    if purpose not in PURPOSES:
        raise invalid("purpose", f"must be one of {list(PURPOSES)}, got {purpose!r}")
    upload = request.files.get("file")
    if upload is None:
        raise invalid("file", "is required: " + ("an image" if purpose == "image" else "a JSONL file"))
    data = upload.read()
    name = display_name(upload.filename)
    # A retry with the same Idempotency-Key gets the file the first upload made.
    idem = idempotency.from_request("file", {"purpose": purpose, "filename": name,
                                             "sha256": hashlib.sha256(data).hexdigest()})
    if idem is not None and (earlier := idem.earlier()) is not None:
        return replay(earlier)
    # Cheap and early, so a tenant over quota stores nothing; checked again
    # under a lock below, where two concurrent uploads are told apart.
    with c.session() as session:
        check_file_quota(session, caller().tenant_id, len(data), c.settings)
    if purpose == "image":
        # Type, bytes and pixels checked here, so a job naming it is never queued with a bad one.
        try:
            content_type, _, _ = image_input.check(data, c.settings.max_image_bytes, c.settings.max_image_pixels)
        except image_input.ImageRefused as exc:
            raise invalid("file", str(exc)) from None
        rows, fmt = 0, content_type
    elif image_finetune.is_zip(data):
        # A zip of captioned images: an image fine-tune's dataset, every image checked as an input image is.
        dataset = image_finetune.parse_dataset(data, max_rows=c.settings.max_dataset_rows,
                                               max_image_bytes=c.settings.max_image_bytes,
                                               max_image_pixels=c.settings.max_image_pixels)
        rows, fmt, content_type = len(dataset.rows), dataset.format, "application/zip"
    else:
        dataset = parse_dataset(data, max_rows=c.settings.max_dataset_rows)
        rows, fmt, content_type = len(dataset.rows), dataset.format, "application/jsonl"
    file_id = new_id()
    key = file_key(file_id)
    # Stored before the row is committed: a row always has its content.
    c.storage.put(key, data, content_type)
    with idempotency.race(idem) as race, c.session() as session, session.begin():
        check_file_quota(session, caller().tenant_id, len(data), c.settings, lock=True)
        f = File(id=file_id, tenant_id=caller().tenant_id, purpose=purpose, filename=name, bytes=len(data),
                 rows=rows, format=fmt, storage_key=key)
        session.add(f)
        race.record(session, file_id)
    if race.winner is not None:
        # A concurrent duplicate committed first; this upload's stored copy
        # stays behind unreferenced (storage has no delete here), as it does
        # when a concurrent upload took the last of the quota.
        return replay(race.winner)
    return describe(f), 201, {"Location": f"/v1/files/{file_id}"}


def display_name(raw: str | None) -> str:
    """The client's file name as the record shows it: path separators made
    `_`, control and format characters (NUL, CR/LF, bidi overrides) made `_`,
    at most the last 255 characters; a name that is nothing but dots (or
    nothing) becomes "dataset.jsonl"."""
    name = "".join("_" if ch in "/\\" or unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch
                   for ch in raw or "")[-255:]
    return name if name.strip(". ") else "dataset.jsonl"


def attachment(filename: str) -> str:
    """Content-Disposition for a download (RFC 6266): the name in UTF-8 as
    `filename*` (RFC 8187), which current browsers use, and an ASCII stand-in
    as `filename` for older clients, with nothing in either that could end
    the value or start another parameter (quotes, backslashes, `;`, CR/LF)."""
    ascii_name = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode("ascii")
    fallback = re.sub(r"[^A-Za-z0-9._ ()+=,@-]", "_", ascii_name).strip() or "dataset.jsonl"
    # RFC 8187 attr-char: the only characters filename* may carry unencoded.
    encoded = quote(filename, safe="!#$&+-.^_`|~")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def replay(file_id: str):
    with ctx().session() as session:
        f = session.get(File, file_id)
    return describe(f), 201, {"Location": f"/v1/files/{file_id}", **idempotency.REPLAYED}


@bp.get("")
@require_key
def list_files():
    limit, cursor = page_args()
    query = select(File).where(File.tenant_id == caller().tenant_id)
    if cursor:
        query = query.where(File.id < cursor)
    with ctx().session() as session:
        rows = list(session.scalars(query.order_by(File.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    return {"data": [describe(f) for f in page], "next_cursor": page[-1].id if len(rows) > limit else None}


@bp.get("/<file_id>")
@require_key
def get_file(file_id: str):
    with ctx().session() as session:
        return describe(own_file(session, file_id))


@bp.delete("/<file_id>")
@require_key
def delete_file(file_id: str):
    """The file and its content go; 409 while a queued or running fine-tune trains on it."""
    with ctx().session() as session, session.begin():
        owed = retention.delete_file(session, own_file(session, file_id))
    ctx().settle_deletes(owed)
    return Response(status=204)


@bp.get("/<file_id>/content")
@require_key
def file_content(file_id: str):
    with ctx().session() as session:
        f = own_file(session, file_id)
    # An image's format is its content type (image/png, ...); a dataset's is its row format.
    mimetype = f.format if f.purpose == "image" else "application/jsonl"
    return Response(ctx().storage.get(f.storage_key), mimetype=mimetype,
                    headers={"Content-Disposition": attachment(f.filename)})
