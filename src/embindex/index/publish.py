"""Versions and the commit protocol: many writers, one `_latest`, no version ever overwritten.

A run records the version it started from (its base). To publish it
1. claims the next version number by *creating* `versions/vN/manifest.json` only if absent
   (S3 `If-None-Match: *`, local link(2)); a taken number means another writer got there: it tries N+1;
2. writes its run's publish marker (a published run id is never reused, see commits.py);
3. switches `_latest` from its base to vN by compare-and-swap (S3 `If-Match: <etag>`, local flock +
   compare + rename). `_latest` therefore only ever moves from the version a writer started from to a
   version built on it. When `_latest` moved since the run started, the claimed manifest is deleted
   (it was never published) and the run either rebases (a full build: its parent becomes the new
   latest) or stops with IndexChangedError (reindex and compact, whose delta is against their base).

Stores without conditional writes use a lease object instead (`index.commit: lease`, see lease.py).
Readers resolve `_latest` to a version and then read only that version's immutable files, so they see
the old version or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from typing import Callable, Iterator, Literal

from ..storage import ConditionalWritesUnsupported, Storage
from . import commits, layout
from .lease import Lease
from .manifest import Manifest

CommitMode = Literal["auto", "conditional", "lease"]
MAX_ATTEMPTS = 20


class IndexChangedError(RuntimeError):
    """`_latest` moved while a run that depends on its base (reindex, compact) was running."""


def list_versions(storage: Storage) -> list[str]:
    names = [n for n in storage.listdir(layout.VERSIONS_DIR) if layout.VERSION_RE.match(n)]
    return sorted(names, key=layout.version_number)


def latest_version(storage: Storage) -> str | None:
    if not storage.exists(layout.LATEST):
        return None
    return _parse_latest(storage.read_text(layout.LATEST))


def _parse_latest(text: str) -> str:
    name = text.strip()
    layout.version_number(name)  # validates
    return name


def read_manifest(storage: Storage, version: str | None = None) -> Manifest:
    version = version or latest_version(storage)
    if version is None:
        raise FileNotFoundError(f"{storage.root} has no published version (no {layout.LATEST})")
    return Manifest.from_json(storage.read_text(layout.manifest_path(version)))


class _Ops:
    """The three primitives the protocol needs, conditional or under a lease."""

    def __init__(self, store: Storage, mode: CommitMode):
        if mode == "auto":
            mode = "conditional" if store.has_conditional_writes else "lease"
        if mode == "conditional" and not store.has_conditional_writes:
            raise ConditionalWritesUnsupported(f"{store.root}: no conditional writes; use index.commit: lease")
        self.store, self.mode = store, mode

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        if self.mode == "lease":
            with Lease(self.store):
                yield
        else:
            yield

    def read_latest(self) -> tuple[str | None, str | None]:
        if self.mode == "lease":
            return latest_version(self.store), None
        data, tag = self.store.read_tagged(layout.LATEST)
        return (_parse_latest(data.decode()) if data is not None else None), tag

    def create(self, rel: str, data: bytes) -> None:
        if self.mode == "lease":  # only the lease holder writes: check-then-write is safe
            if self.store.exists(rel):
                raise FileExistsError(rel)
            self.store.write_bytes(rel, data)
        else:
            self.store.create_bytes(rel, data)

    def swap_latest(self, version: str, expected: str | None, tag: str | None) -> bool:
        data = (version + "\n").encode()
        if self.mode == "lease":
            if latest_version(self.store) != expected:
                return False
            self.store.write_bytes(layout.LATEST, data)
            return True
        return self.store.swap_bytes(layout.LATEST, data, tag)


def publish(store: Storage, manifest: Manifest, base: str | None, *, rebase: bool = False,
            commit: CommitMode = "auto", log: Callable[[str], None] | None = None) -> Manifest:
    """Publish `manifest` as the next version on top of `base` (the version the run started from;
    None for an empty index). Returns the manifest as published (version, parent, created_at set).

    `rebase`: when `_latest` moved since `base`, publish on top of the new latest (full builds);
    otherwise raise IndexChangedError and publish nothing."""
    log = log or (lambda _m: None)
    ops = _Ops(store, commit)
    with ops.session():
        for _ in range(MAX_ATTEMPTS):
            latest, tag = ops.read_latest()
            if latest != base:
                if not rebase:
                    raise IndexChangedError(
                        f"index changed under this run: it started from {base or 'an empty index'}, but "
                        f"{store.root} is now at {latest}; nothing was published. Run it again on the new version")
                log(f"[embindex] {store.root} moved from {base} to {latest} during this run; publishing on top of it")
                base = latest
            numbers = [layout.version_number(v) for v in list_versions(store)]
            n = max(numbers + [layout.version_number(latest) if latest else 0]) + 1
            m = manifest.model_copy(update={"version": layout.version_name(n), "parent": base,
                                            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            try:
                ops.create(layout.manifest_path(m.version), m.to_json().encode())
            except FileExistsError:  # another writer claimed this number: look again
                continue
            commits.mark_publishing(store, m.run_id, m.version)
            # a lost reply to a swap that did happen looks like a failed swap: check before undoing it
            if ops.swap_latest(m.version, latest, tag) or latest_version(store) == m.version:
                return m
            store.delete(f"{layout.VERSIONS_DIR}/{m.version}")  # never published: withdraw the claim
            commits.clear_publishing(store, m.run_id, m.version)
    raise IndexChangedError(f"could not publish to {store.root} after {MAX_ATTEMPTS} attempts: "
                            "too many concurrent writers")
