"""Publish order and version numbering, on a recording storage (no Ray)."""

from __future__ import annotations

import pytest

from embindex.index import layout
from embindex.index.manifest import Counts, Manifest, ModelEntry, TierEntry
from embindex.index.publish import latest_version, list_versions, next_version, publish, read_manifest
from embindex.storage import Storage


class RecordingStorage(Storage):
    def __init__(self, root):
        super().__init__(root)
        self.writes: list[str] = []

    def write_bytes(self, rel, data):
        self.writes.append(rel)
        super().write_bytes(rel, data)


def _manifest(version: str, parent: str | None = None) -> Manifest:
    return Manifest(
        version=version, created_at="2026-01-01T00:00:00+00:00", run_id="r", parent=parent,
        model=ModelEntry(name="hf-encoder", path="p", checkpoint_hash="sha256:0", max_length=8, pooling="mean",
                         dtype="float32"),
        outputs={"single": True}, dim=8, tiers=[TierEntry(dim=8, factory="Flat", files=["shards/r/t.faiss"])],
        shards=[], counts=Counts(rows_in=0, documents=0, chunks=0, vectors=0, rejected=0),
    )


def test_latest_is_written_last_and_versions_advance(tmp_path):
    store = RecordingStorage(str(tmp_path))
    assert next_version(store) == "v000001" and latest_version(store) is None
    with pytest.raises(FileNotFoundError, match="no published version"):
        read_manifest(store)
    publish(store, _manifest("v000001"))
    assert store.writes == [layout.manifest_path("v000001"), layout.LATEST]
    assert next_version(store) == "v000002"
    publish(store, _manifest("v000002", parent="v000001"))
    assert store.writes[-1] == layout.LATEST and latest_version(store) == "v000002"
    assert list_versions(store) == ["v000001", "v000002"]
    assert read_manifest(store, "v000001").version == "v000001"
    assert read_manifest(store).parent == "v000001"
    with pytest.raises(FileExistsError):
        publish(store, _manifest("v000002"))
    assert not [p for p in tmp_path.rglob("*.tmp-*")]  # local writes go through temp + rename
