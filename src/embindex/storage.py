"""Filesystems for corpus, model and index URIs (local, file://, s3://, gs://).

One place turns a URI plus options into an fsspec filesystem (for small files we write ourselves)
and a pyarrow filesystem (for Ray Data and Parquet). Credentials come from the options or the
standard AWS environment variables; they are never logged, and `StorageOptions.__repr__` hides them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import posixpath
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import fsspec
import fsspec.asyn
import pyarrow.fs as pafs

log = logging.getLogger("embindex.storage")

# Retries: one layer, the object-store clients' own, configured here for both filesystems; embindex code
# calls them once and never loops around them. S3 uses the AWS "standard" retry mode (botocore for
# fsspec, the C++ SDK's for pyarrow): connection errors, timeouts, throttling and 5xx are retried with
# jittered exponential backoff capped at 20 s, 10 attempts (about a minute: rides out an object-store
# restart or a network blip); 4xx answers (missing object, failed precondition, denied) are not.
# s3fs's own loop around botocore is switched off (retries=1: one call), so attempts do not multiply.
# gcsfs retries 5xx / 429 / connection errors itself.
S3_MAX_ATTEMPTS = 10


@dataclass(frozen=True)
class StorageOptions:
    """Connection settings for object storage. Empty fields fall back to the AWS environment; with no
    credentials anywhere, the SDKs' own chain applies (profiles, web identity / IRSA, instance metadata).

    `token`: an S3 session token (temporary credentials), or for gs:// a gcsfs token (a service-account JSON
    path, "google_default", ...)."""

    endpoint_url: str | None = None
    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    region: str | None = None
    anon: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "StorageOptions":
        d = dict(d or {})
        return cls(
            endpoint_url=d.get("endpoint_url"),
            key=d.get("key"),
            secret=d.get("secret"),
            token=d.get("token"),
            region=d.get("region"),
            anon=bool(d.get("anon", False)),
        )

    def resolved(self) -> "StorageOptions":
        """Explicit key/secret (and token) as given; else all three from the AWS environment variables,
        so temporary credentials keep their session token."""
        env = os.environ
        explicit = bool(self.key and self.secret)
        return StorageOptions(
            endpoint_url=self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            key=self.key if explicit else env.get("AWS_ACCESS_KEY_ID"),
            secret=self.secret if explicit else env.get("AWS_SECRET_ACCESS_KEY"),
            token=self.token if explicit else env.get("AWS_SESSION_TOKEN"),
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
            kwargs.update(key=opts.key, secret=opts.secret, token=opts.token)
        client_kwargs: dict[str, Any] = {}
        if opts.endpoint_url:
            client_kwargs["endpoint_url"] = opts.endpoint_url
        if opts.region:
            client_kwargs["region_name"] = opts.region
        if client_kwargs:
            kwargs["client_kwargs"] = client_kwargs
        kwargs["config_kwargs"] = {"retries": {"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS}}
        # Listing caches hide objects written by other processes (e.g. Ray workers) from this one.
        kwargs["use_listings_cache"] = False
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **kwargs)
        fs.retries = 1  # s3fs's own loop (a class attribute) off: botocore's standard mode is the one layer
        return fs
    if scheme in ("gs", "gcs"):
        given = options or StorageOptions()  # not the AWS environment
        gcs: dict[str, Any] = {"token": "anon" if given.anon else given.token}
        if given.endpoint_url:  # e.g. a fake-gcs-server
            gcs["endpoint_url"] = given.endpoint_url
        try:
            return fsspec.filesystem("gcs", **gcs)
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
                                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)}
        if opts.anon:
            kwargs["anonymous"] = True
        elif opts.key and opts.secret:
            kwargs.update(access_key=opts.key, secret_key=opts.secret)
            if opts.token:
                kwargs["session_token"] = opts.token
        if opts.endpoint_url:
            ep = urlparse(opts.endpoint_url)
            kwargs.update(
                endpoint_override=ep.netloc or ep.path,
                scheme=ep.scheme or "https",
                force_virtual_addressing=False,
            )
        return pafs.S3FileSystem(**kwargs)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_filesystem(uri, options)))


class ConditionalWritesUnsupported(RuntimeError):
    """The store cannot create-if-absent / compare-and-swap: publishing on it needs the lease protocol."""


def _s3_error_code(e: BaseException) -> str | None:
    cause = e.__cause__
    response = getattr(cause, "response", None) or {}
    return response.get("Error", {}).get("Code")


@contextlib.contextmanager
def _flocked(lock_path: str):
    """An exclusive advisory lock held for the block (every embindex writer takes it)."""
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class Storage:
    """A root URI with its filesystem: read/write small files and list under it. The client retries
    transient object-store errors (see S3_MAX_ATTEMPTS); writes are whole objects, so a retried write
    is idempotent."""

    def __init__(self, root: str, options: StorageOptions | None = None):
        self.root = root.rstrip("/") if is_remote(root) else strip_scheme(root)
        self.options = options or StorageOptions()
        self.fs = fsspec_filesystem(self.root, self.options)

    def uri(self, *parts: str) -> str:
        return join(self.root, *parts)

    def fs_path(self, rel: str) -> str:
        return strip_scheme(self.uri(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.fs_path(rel))

    def read_bytes(self, rel: str) -> bytes:
        """The whole file in one GET: a file object's HEAD-then-GET fails (s3fs FileExpired) when
        another writer replaces a pointer such as `_latest` in between."""
        return self.fs.cat_file(self.fs_path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Whole-object write: atomic on object stores (one PUT); temp file + rename locally."""
        path = self.fs_path(rel)
        if not is_remote(self.root):
            os.replace(self._local_temp(path, data), path)
            return
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    # -- conditional writes (the commit protocol of index/publish.py builds on these) ------------
    def create_bytes(self, rel: str, data: bytes) -> None:
        """Write `rel` only if it does not exist (FileExistsError otherwise); never a partial file.
        Local: temp file + link(2), which fails if the name exists. S3: PUT with `If-None-Match: *`."""
        path = self.fs_path(rel)
        if not is_remote(self.root):
            tmp = self._local_temp(path, data)
            try:
                os.link(tmp, path)
            finally:
                os.unlink(tmp)
            return
        bucket, key = self._s3_key(rel)
        self._check_conditional_writes()
        self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")

    def read_tagged(self, rel: str) -> tuple[bytes | None, str | None]:
        """(content, tag) of `rel`, or (None, None) when absent; the tag is what `swap_bytes` compares."""
        path = self.fs_path(rel)
        if not is_remote(self.root):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None, None
            return data, hashlib.sha256(data).hexdigest()
        bucket, key = self._s3_key(rel)

        async def get() -> tuple[bytes, str]:  # one GET: the content and the ETag of the same object
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None, None

    def swap_bytes(self, rel: str, data: bytes, tag: str | None) -> bool:
        """Compare-and-swap: replace `rel` with `data` only if its tag is still `tag` (None: only if it
        does not exist). True when written, False when `rel` changed since it was read.
        Local: under an exclusive flock of `<rel>.lock`, compare, then temp file + rename. S3: PUT with
        `If-Match: <etag>` (or `If-None-Match: *`)."""
        path = self.fs_path(rel)
        if not is_remote(self.root):
            with _flocked(path + ".lock"):
                if self.read_tagged(rel)[1] != tag:
                    return False
                os.replace(self._local_temp(path, data), path)
            return True
        bucket, key = self._s3_key(rel)
        self._check_conditional_writes()
        cond = {"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
        except FileExistsError:  # If-None-Match failed: someone created it
            return False
        except FileNotFoundError:  # If-Match on an object that was deleted
            return False
        except OSError as e:
            if _s3_error_code(e) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def delete(self, rel: str) -> None:
        """Remove a file or a folder; a missing one is not an error (two cleaners may race)."""
        path = self.fs_path(rel)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    @property
    def has_conditional_writes(self) -> bool:
        """Local disks and S3 (AWS, and S3 servers that honour If-None-Match / If-Match)."""
        return scheme_of(self.root) in ("file", "s3", "s3a")

    def _local_temp(self, path: str, data: bytes) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _s3_key(self, rel: str) -> tuple[str, str]:
        if not self.has_conditional_writes:
            raise ConditionalWritesUnsupported(
                f"{scheme_of(self.root)}:// has no conditional writes here; publish with index.commit: lease")
        bucket, _, key = self.fs_path(rel).partition("/")
        return bucket, key

    def _check_conditional_writes(self) -> None:
        """Once per Storage: prove the S3 server refuses a second create (some S3-compatible servers
        ignore If-None-Match and would let two writers overwrite each other's manifest)."""
        if getattr(self, "_conditional_ok", False):
            return
        rel = f"_probe/{secrets.token_hex(8)}"
        bucket, key = self.fs_path(rel).partition("/")[::2]
        put = lambda: self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")  # noqa: E731
        put()
        try:
            put()
            honoured = False
        except FileExistsError:
            honoured = True
        except OSError as e:
            honoured = _s3_error_code(e) == "PreconditionFailed"
        finally:
            self.delete(rel)
        if not honoured:
            raise ConditionalWritesUnsupported(
                f"the object store at {self.root} ignores conditional writes (If-None-Match): two writers "
                "could overwrite each other's versions. Publish with index.commit: lease, or use a store "
                "that supports them")
        self._conditional_ok = True

    def listdir(self, rel: str) -> list[str]:
        path = self.fs_path(rel)

        if not self.fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
