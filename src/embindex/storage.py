"""Filesystems for corpus, model and index URIs (local, file://, s3://, gs://).

One place turns a URI plus options into an fsspec filesystem (for small files we write ourselves)
and a pyarrow filesystem (for Ray Data and Parquet). Credentials come from the options or the
standard AWS environment variables; they are never logged, and `StorageOptions.__repr__` hides them.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

log = logging.getLogger("embindex.storage")
T = TypeVar("T")


@dataclass(frozen=True)
class StorageOptions:
    """Connection settings for object storage. Empty fields fall back to the AWS environment."""

    endpoint_url: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    region: str | None = None
    anon: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "StorageOptions":
        d = dict(d or {})
        return cls(
            endpoint_url=d.get("endpoint_url"),
            key=d.get("key"),
            secret=d.get("secret"),
            region=d.get("region"),
            anon=bool(d.get("anon", False)),
        )

    def resolved(self) -> "StorageOptions":
        env = os.environ
        return StorageOptions(
            endpoint_url=self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            key=self.key or env.get("AWS_ACCESS_KEY_ID"),
            secret=self.secret or env.get("AWS_SECRET_ACCESS_KEY"),
            region=self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            anon=self.anon,
        )


def scheme_of(uri: str) -> str:
    parsed = urlparse(uri)
    if len(parsed.scheme) <= 1:  # "" or a Windows drive letter
        return "file"
    return parsed.scheme


def is_remote(uri: str) -> bool:
    return scheme_of(uri) != "file"


def strip_scheme(uri: str) -> str:
    """Path as the filesystem objects expect it: 'bucket/key' for s3/gs, absolute path for local."""
    scheme = scheme_of(uri)
    if scheme == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return os.path.abspath(os.path.expanduser(path))
    return uri.split("://", 1)[1].rstrip("/")


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts) if is_remote(uri) else os.path.join(uri, *parts)


def fsspec_filesystem(uri: str, options: StorageOptions | None = None) -> fsspec.AbstractFileSystem:
    scheme = scheme_of(uri)
    opts = (options or StorageOptions()).resolved()
    if scheme == "file":
        return fsspec.filesystem("file", auto_mkdir=True)
    if scheme in ("s3", "s3a"):
        kwargs: dict[str, Any] = {"anon": opts.anon}
        if opts.key and opts.secret:
            kwargs.update(key=opts.key, secret=opts.secret)
        client_kwargs: dict[str, Any] = {}
        if opts.endpoint_url:
            client_kwargs["endpoint_url"] = opts.endpoint_url
        if opts.region:
            client_kwargs["region_name"] = opts.region
        if client_kwargs:
            kwargs["client_kwargs"] = client_kwargs
        # Listing caches hide objects written by other processes (e.g. Ray workers) from this one.
        kwargs["use_listings_cache"] = False
        return fsspec.filesystem("s3", skip_instance_cache=True, **kwargs)
    if scheme in ("gs", "gcs"):
        try:
            return fsspec.filesystem("gcs", token="anon" if opts.anon else None)
        except ImportError as e:  # pragma: no cover - depends on an optional extra
            raise ImportError("gs:// needs gcsfs: pip install 'embindex[gcs]'") from e
    return fsspec.filesystem(scheme)


def arrow_filesystem(uri: str, options: StorageOptions | None = None) -> pafs.FileSystem:
    """A pyarrow filesystem for Ray Data / Parquet; native S3 client for s3://, fsspec bridge otherwise."""
    scheme = scheme_of(uri)
    opts = (options or StorageOptions()).resolved()
    if scheme == "file":
        return pafs.LocalFileSystem()
    if scheme in ("s3", "s3a"):
        kwargs: dict[str, Any] = {"region": opts.region or "us-east-1",
                                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=10)}
        if opts.anon:
            kwargs["anonymous"] = True
        elif opts.key and opts.secret:
            kwargs.update(access_key=opts.key, secret_key=opts.secret)
        if opts.endpoint_url:
            ep = urlparse(opts.endpoint_url)
            kwargs.update(
                endpoint_override=ep.netloc or ep.path,
                scheme=ep.scheme or "https",
                force_virtual_addressing=False,
            )
        return pafs.S3FileSystem(**kwargs)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_filesystem(uri, options)))


RETRY_DELAYS = (0.5, 1, 2, 4, 8, 15)  # ~30 s: rides out an object store restart or a network blip


def with_retries(fn: Callable[[], T], what: str, delays: Sequence[float] = RETRY_DELAYS) -> T:
    """Run `fn`, retrying transient I/O failures (connection errors, timeouts, 5xx) with backoff.
    Missing files and permission errors are not retried."""
    for attempt, delay in enumerate((*delays, None)):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except (OSError, TimeoutError, ConnectionError) as e:
            if delay is None:
                raise OSError(f"{what} failed after {attempt + 1} attempts: {e}") from e
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(e).__name__, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Storage:
    """A root URI with its filesystem: read/write small files and list under it. Object-store calls are
    retried on transient errors; writes are whole objects, so a retried write is idempotent."""

    def __init__(self, root: str, options: StorageOptions | None = None):
        self.root = root.rstrip("/") if is_remote(root) else strip_scheme(root)
        self.options = options or StorageOptions()
        self.fs = fsspec_filesystem(self.root, self.options)

    def uri(self, *parts: str) -> str:
        return join(self.root, *parts)

    def fs_path(self, rel: str) -> str:
        return strip_scheme(self.uri(rel))

    def exists(self, rel: str) -> bool:
        return with_retries(lambda: self.fs.exists(self.fs_path(rel)), f"exists {rel}")

    def read_bytes(self, rel: str) -> bytes:
        def read() -> bytes:
            with self.fs.open(self.fs_path(rel), "rb") as f:
                return f.read()

        return with_retries(read, f"read {rel}")

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Whole-object write: atomic on object stores (one PUT); temp file + rename locally."""
        path = self.fs_path(rel)
        if not is_remote(self.root):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        def put() -> None:
            with self.fs.open(path, "wb") as f:
                f.write(data)

        with_retries(put, f"write {rel}")

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def listdir(self, rel: str) -> list[str]:
        path = self.fs_path(rel)

        def ls() -> list[str]:
            if not self.fs.exists(path):
                return []
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))

        return with_retries(ls, f"list {rel}")
