"""The object store seam: a small, byte-oriented view of one S3 bucket.

Only this module imports the S3 SDK. Everything else asks for put, get, a range,
delete, list and stat, and sees `ObjectStoreUnavailable` when the store cannot answer,
so callers map one exception to DICOM 0xA700 / HTTP 503.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

# A single PUT up to this size; multipart (parts of this size) above it.
PART_SIZE = 16 * 1024 * 1024


class ObjectStoreUnavailable(RuntimeError):
    """The object store did not answer or refused the request."""


class ObjectNotFound(KeyError):
    """No object under that key."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def _endpoint_host(endpoint: str) -> tuple[str, bool | None]:
    """Accept ``host:port`` or a URL; a URL's scheme decides TLS."""
    if "://" not in endpoint:
        return endpoint, None
    parts = urlsplit(endpoint)
    return parts.netloc, parts.scheme == "https"


class ObjectStore:
    """One bucket in an S3-compatible store (MinIO in production, SeaweedFS embedded)."""

    def __init__(
        self, endpoint: str, access_key: str, secret_key: str, bucket: str, secure: bool = False
    ) -> None:
        host, scheme_secure = _endpoint_host(endpoint)
        self.bucket = bucket
        self.endpoint = host
        # Short timeouts and no SDK-level retries: a store that is down must become
        # a failure status within seconds, not a hung association.
        http = urllib3.PoolManager(
            num_pools=4,
            maxsize=32,
            timeout=urllib3.Timeout(connect=3.0, read=60.0),
            retries=urllib3.Retry(total=1, connect=1, read=0, backoff_factor=0.1),
        )
        self._client = Minio(
            host,
            access_key=access_key,
            secret_key=secret_key,
            secure=scheme_secure if scheme_secure is not None else secure,
            http_client=http,
        )

    def _call(self, what: str, func, *args, **kwargs):
        try:
            return func(*args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(args[1] if len(args) > 1 else what) from exc
            raise ObjectStoreUnavailable(f"{what}: {exc.code}: {exc.message}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise ObjectStoreUnavailable(f"{what}: {exc}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        if not self._call("bucket_exists", self._client.bucket_exists, self.bucket):
            try:
                self._call("make_bucket", self._client.make_bucket, self.bucket)
            except ObjectStoreUnavailable:
                # Another replica may have created it between the two calls.
                if not self._call("bucket_exists", self._client.bucket_exists, self.bucket):
                    raise

    def ping(self) -> None:
        """Raise `ObjectStoreUnavailable` unless the bucket answers."""
        if not self._call("bucket_exists", self._client.bucket_exists, self.bucket):
            raise ObjectStoreUnavailable(f"bucket {self.bucket!r} does not exist")

    def put_file(self, key: str, path: Path, content_type: str = "application/dicom") -> None:
        """Upload a file; multipart above `PART_SIZE`, so memory stays at one part."""
        size = path.stat().st_size
        with path.open("rb") as handle:
            self.put_stream(key, handle, size, content_type)

    def put_stream(
        self, key: str, stream: BinaryIO, size: int, content_type: str = "application/octet-stream"
    ) -> None:
        self._call(
            f"put {key}",
            self._client.put_object,
            self.bucket,
            key,
            stream,
            size,
            content_type=content_type,
            part_size=PART_SIZE,
        )

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        self.put_stream(key, io.BytesIO(data), len(data), content_type)

    def get(self, key: str) -> bytes:
        response = self._call(f"get {key}", self._client.get_object, self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def head(self, key: str, length: int) -> bytes:
        """The first `length` bytes of an object (all of it if shorter): a header's worth."""
        return self.read_range(key, 0, length)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes of an object from `offset` (fewer at its end)."""
        response = self._call(
            f"get {key}", self._client.get_object, self.bucket, key, offset=offset, length=length
        )
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def open(self, key: str, size: int, block: int = 1024 * 1024) -> io.BufferedReader:
        """A seekable file over an object that fetches only the ranges read, a block at a
        time: one frame of a large multi-frame object costs a few range GETs, not the whole."""
        return io.BufferedReader(_RangeReader(self, key, size), buffer_size=block)

    def stream(self, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
        """Yield an object's bytes in chunks, so a large object never sits in memory whole."""
        response = self._call(f"get {key}", self._client.get_object, self.bucket, key)
        try:
            yield from response.stream(chunk_size)
        finally:
            response.close()
            response.release_conn()

    def stat(self, key: str) -> ObjectInfo:
        info = self._call(f"stat {key}", self._client.stat_object, self.bucket, key)
        return ObjectInfo(key=key, size=int(info.size or 0))

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", self._client.remove_object, self.bucket, key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        objects = self._call(
            f"list {prefix}", self._client.list_objects, self.bucket, prefix=prefix, recursive=True
        )
        try:
            for obj in objects:
                yield ObjectInfo(key=obj.object_name, size=int(obj.size or 0))
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise ObjectStoreUnavailable(f"list {prefix}: {exc}") from exc


class _RangeReader(io.RawIOBase):
    """The raw side of `ObjectStore.open`: each read is one range GET."""

    def __init__(self, store: ObjectStore, key: str, size: int) -> None:
        self.store = store
        self.key = key
        self.name = key  # what pydicom reports as the file name
        self.size = size
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        length = min(len(buffer), self.size - self.position)
        if length <= 0:
            return 0
        data = self.store.read_range(self.key, self.position, length)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)
