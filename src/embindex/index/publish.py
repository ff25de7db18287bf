"""Versions and the atomic switch: a manifest is written first, `_latest` last.

Readers resolve `_latest` to a version and then read only that version's immutable files, so they see
the old version or the new one, never a mix.
"""

from __future__ import annotations

from ..storage import Storage
from . import layout
from .manifest import Manifest


def list_versions(storage: Storage) -> list[str]:
    names = [n for n in storage.listdir(layout.VERSIONS_DIR) if layout.VERSION_RE.match(n)]
    return sorted(names, key=layout.version_number)


def latest_version(storage: Storage) -> str | None:
    if not storage.exists(layout.LATEST):
        return None
    name = storage.read_text(layout.LATEST).strip()
    layout.version_number(name)  # validates
    return name


def next_version(storage: Storage) -> str:
    versions = list_versions(storage)
    n = layout.version_number(versions[-1]) + 1 if versions else 1
    return layout.version_name(n)


def read_manifest(storage: Storage, version: str | None = None) -> Manifest:
    version = version or latest_version(storage)
    if version is None:
        raise FileNotFoundError(f"{storage.root} has no published version (no {layout.LATEST})")
    return Manifest.from_json(storage.read_text(layout.manifest_path(version)))


def publish(storage: Storage, manifest: Manifest) -> str:
    """Write the manifest, then switch `_latest` to it. Returns the version's manifest URI."""
    rel = layout.manifest_path(manifest.version)
    if storage.exists(rel):
        raise FileExistsError(f"version {manifest.version} already exists in {storage.root}")
    storage.write_text(rel, manifest.to_json())
    storage.write_text(layout.LATEST, manifest.version + "\n")
    return storage.uri(rel)
