"""Object storage for job outputs: any S3 endpoint through boto3, or a local
folder for the embedded default.

Keys are deterministic (`jobs/<id>/<name>`), so a re-run overwrites rather
than adds. S3 outputs are handed out as presigned GET URLs; local ones are
served by the API to the job's owner only.

A name a client chose (an output's name in a URL) becomes a key only through
`child_key`, which keeps it under its owner's prefix; both storages refuse
any key that could step out of where it is put (`..`, `.`, empty segments,
backslashes, control characters, absolute names) as a second line: a local
path would resolve them, and an HTTP client or an S3-compatible server may
normalise `..` in a URL.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from genq.errors import ConfigError
from genq.settings import Settings


class NotFound(KeyError):
    pass


class UnsafeKey(ValueError):
    """A key, or a name meant to become part of one, that could step out of
    its prefix. No object can have it: to a client it is just not found."""


def check_key(key: str) -> str:
    """`key` if every `/`-separated segment of it is a plain name: not empty
    (no leading, trailing or doubled `/`), not `.` or `..`, with no backslash
    and no control character. Raises UnsafeKey otherwise."""
    if not isinstance(key, str) or not key:
        raise UnsafeKey(f"a storage key must be a non-empty string, got {key!r}")
    if "\\" in key or any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in key):
        raise UnsafeKey(f"a storage key must not hold a backslash or a control character, got {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafeKey(f"a storage key must not hold an empty, '.' or '..' segment, got {key!r}")
    return key


def child_key(prefix: str, name: str) -> str:
    """The key of `name` (which a user may have chosen, and which may hold
    `/` for nested names) under `prefix`: always inside it, or UnsafeKey."""
    check_key(name)
    return check_key(f"{prefix.rstrip('/')}/{name}")


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def list(self, prefix: str) -> list[str]:
        """Keys under a prefix, sorted."""

    def presigned_url(self, key: str) -> str | None:
        """A URL anyone holding it can GET, or None when the API must serve the key."""

    def delete(self, key: str) -> None:
        """Remove an object, or with a key ending in "/" every object under that
        prefix. Idempotent: what is already gone is no error."""

    def check(self) -> None:
        """Raise if the storage cannot be reached (for /readyz)."""


def job_key(job_id: str, name: str) -> str:
    return child_key(f"jobs/{job_id}", name)


def file_key(file_id: str) -> str:
    """Where an uploaded file's content lies: the id alone names it, never the client's file name."""
    return f"files/{file_id}/content"


class LocalStorage:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        # check_key leaves nothing to resolve upwards; a symbolic link inside
        # the root could still point out of it.
        if self.root.resolve() not in path.parents:
            raise NotFound(key)
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):  # a folder is no object either
            raise NotFound(key) from None

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        root = self.root.resolve()
        return sorted(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))

    def presigned_url(self, key: str) -> str | None:
        check_key(key)
        return None

    def delete(self, key: str) -> None:
        if key.endswith("/"):
            path = self._path(key.rstrip("/"))
            # Errors ignored, then checked: another sweeper removing the same
            # files meanwhile is no failure, anything left behind is.
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                raise OSError(f"could not remove everything under {key!r} in local storage")
            return
        try:
            self._path(key).unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            pass

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise OSError(f"storage folder {self.root} is not writable")


class S3Storage:
    def __init__(self, bucket: str, prefix: str, settings: Settings):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.expires = settings.presign_seconds

        def client(endpoint_url: str | None):
            return boto3.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=settings.s3_region,
                aws_access_key_id=settings.s3_access_key_id,
                aws_secret_access_key=settings.s3_secret_access_key,
                # Short timeouts and a few retries: a hung S3 must not hang a request.
                config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3},
                              signature_version="s3v4"),
            )

        self.client = client(settings.s3_endpoint_url)
        # Presigning is local arithmetic (no request), and the signature covers
        # the host: a URL for clients must be signed for the address they use,
        # which may not resolve from here (and the other way round).
        public = settings.s3_public_endpoint_url
        self.presigner = client(public) if public and public != settings.s3_endpoint_url else self.client

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise NotFound(key) from None

    def list(self, prefix: str) -> list[str]:
        keys = []
        full = self._key(prefix.rstrip("/")) + "/"
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for item in page.get("Contents", []):
                keys.append(item["Key"][len(self.prefix) + 1:] if self.prefix else item["Key"])
        return sorted(keys)

    def delete(self, key: str) -> None:
        if not key.endswith("/"):
            # S3 answers 204 for a key that is not there: already idempotent.
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
            return
        full = self._key(key.rstrip("/")) + "/"
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if objects:  # a page holds at most 1,000 keys, as many as one DeleteObjects takes
                found = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
                if found.get("Errors"):
                    first = found["Errors"][0]
                    raise OSError(f"S3 refused to delete {first.get('Key')}: {first.get('Code')} {first.get('Message')}")

    def presigned_url(self, key: str) -> str | None:
        return self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=self.expires
        )

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:
            self.client.create_bucket(Bucket=self.bucket)


def make_storage(settings: Settings) -> Storage:
    url = urlparse(settings.storage_url)
    if url.scheme == "file":
        return LocalStorage(Path(url.path))
    if url.scheme == "s3":
        if not url.netloc:
            raise ConfigError(f"GENQ_STORAGE_URL needs a bucket: s3://bucket[/prefix], got {settings.storage_url!r}")
        return S3Storage(url.netloc, url.path, settings)
    raise ConfigError(f"GENQ_STORAGE_URL must be s3://bucket or file:///dir, got {settings.storage_url!r}")
