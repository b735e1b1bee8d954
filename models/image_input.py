"""Input images of the image families: a file id of the caller's (uploaded with
purpose=image) or a data URI, checked for type, bytes and pixels before any
job is queued. Never a URL: the server fetches nothing on a job's behalf.

Pillow reads only the header to learn the size, so a decompression bomb is
refused before it is decoded. No torch here: the API checks uploads with it."""
from __future__ import annotations

import base64
import binascii
import io
import re

# A file id (genq.schema.new_id) or `data:image/<type>;base64,<data>`.
FILE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
DATA_URI_RE = re.compile(r"^data:(image/[a-z0-9.+-]+);base64,(.*)$", re.DOTALL)
# What an input image may be: Pillow's format name -> its content type.
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# Defaults where the registry sets no `max_input_bytes` / `max_input_pixels`.
MAX_BYTES = 10 * 2**20
MAX_PIXELS = 2048 * 2048


class ImageRefused(ValueError):
    """An input image that may not be used; the message says why, for a 422."""


def is_file_id(value: str) -> bool:
    return bool(FILE_ID_RE.match(value))


def check(data: bytes, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> tuple[str, int, int]:
    """(content type, width, height) of an image that is PNG, JPEG or WebP,
    at most `max_bytes` long and `max_pixels` in area, and decodes whole."""
    from PIL import Image

    if len(data) > max_bytes:
        raise ImageRefused(f"is {len(data)} bytes; at most {max_bytes} are allowed")
    try:
        img = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Exception:
        raise ImageRefused(f"is not an image of a known type ({', '.join(FORMATS.values())})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRefused(f"is {width}x{height} = {width * height} pixels; at most {max_pixels} are allowed")
    try:
        img.load()  # only now is it decoded, bounded by the pixel check above
    except Exception as exc:
        raise ImageRefused(f"is a truncated or corrupt {img.format} ({exc})") from None
    return FORMATS[img.format], width, height


def from_data_uri(value: str) -> bytes:
    """The bytes of `data:image/...;base64,...`; ImageRefused when it is not one."""
    match = DATA_URI_RE.match(value)
    if match is None:
        raise ImageRefused("must be a file id (POST /v1/files with purpose=image) or a data:image/...;base64, URI")
    try:
        return base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise ImageRefused("is a data URI whose base64 does not decode") from None


def check_reference(value: str, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> None:
    """A job's image field: a file id passes here (its owner and purpose are
    the API's to check), a data URI is decoded and checked whole."""
    if is_file_id(value):
        return
    check(from_data_uri(value), max_bytes, max_pixels)


def read(value: str, read_file) -> bytes:
    """The bytes a checked reference names: a file's through `read_file(file id)`, a data URI's own."""
    return read_file(value) if is_file_id(value) else from_data_uri(value)


def decode_rgb(data: bytes):
    """The image as RGB at its own size (a model's processor resizes it its own way)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def decode(data: bytes, width: int, height: int):
    """The image as RGB at width x height, as the pipeline takes it."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
